"""Transport plumbing that needs no second rank: how long a rank waits, that it really waits, and
the torch.distributed transport's object messages (no pickle between ranks)."""

import logging
import time

import pytest

from fa_hvd.comm.base import collective_timeout, wait_until


@pytest.mark.parametrize("environ,expected", [
    ({}, None),  # the default: wait, as Horovod does; a busy rank is never killed
    ({"FA_HVD_COLLECTIVE_TIMEOUT_SECONDS": "0"}, None),
    ({"FA_HVD_COLLECTIVE_TIMEOUT_SECONDS": "90"}, 90.0),
    ({"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5"}, 35.0),  # Horovod's shutdown, with a backstop under Gloo
    ({"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "0"}, None),
    ({"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5", "FA_HVD_COLLECTIVE_TIMEOUT_SECONDS": "0"}, None),
])
def test_collective_timeout_from_the_environment(environ, expected):
    assert collective_timeout(environ) == expected


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_timeout_names_the_variable(value):
    with pytest.raises(ValueError, match="FA_HVD_COLLECTIVE_TIMEOUT_SECONDS"):
        collective_timeout({"FA_HVD_COLLECTIVE_TIMEOUT_SECONDS": value})


def test_without_a_timeout_the_wait_lasts_until_done_and_says_so(caplog):
    ready_at = time.monotonic() + 0.3
    with caplog.at_level(logging.WARNING, logger="fa_hvd"):
        wait_until(lambda: time.monotonic() >= ready_at, None, "rank 3: allgather 'x'", first_notice=0.1)
    assert time.monotonic() >= ready_at
    notices = [r.getMessage() for r in caplog.records]
    assert notices and all(m.startswith("rank 3: allgather 'x': still waiting after") for m in notices)
    assert len(notices) == 2  # after 0.1 s and 0.2 s, then doubling


def test_a_timeout_ends_the_wait():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer from every rank within 0 s"):
        wait_until(lambda: False, 0.2, "rank 1: allgather 'y'")
    assert 0.2 <= time.monotonic() - start < 1.0

