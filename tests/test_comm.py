"""Transport plumbing that needs no second rank: how long a rank waits, that it really waits, and
the torch.distributed transport's object messages (no pickle between ranks)."""

import logging
import re
import time

import pytest
import torch

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


# -- torch.distributed transport: object messages without pickle ---------------------------------
def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and (a == b or (a != a and b != b))


def test_object_messages_carry_rank_and_optimizer_state_exactly():
    from fa_hvd.checkpoint import rng_state
    from fa_hvd.comm.torchdist import decode_object, encode_object

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    message = {"rng": rng_state(), "state": opt.state_dict(), "crc": 2**40 + 1, "none": None, "nan": float("nan"),
               "bytes": b"\x00\xff" * 5, "empty": torch.zeros(0, 3, dtype=torch.bfloat16), 7: (True, "x", -1.5),
               "signature": [("0.weight", (2, 3), "torch.float32", True)], "flags": torch.tensor([True, False])}
    assert _same(decode_object(encode_object(message)), message)


@pytest.mark.parametrize("damage, why", [
    (lambda m: m[:-1], "the header describes"),
    (lambda m: b"\x80\x04\x95" + m[3:], "no object header"),  # a pickle's opening bytes
    (lambda m: m.replace(b'"torch.float32"', b'"torch.complex"'), "torch.complex"),
    (lambda m: m.replace(b'[2,3]', b'[9,9]'), "shape [9, 9]"),
    (lambda m: m.replace(b'["L",', b'["X",'), "unknown tag"),
])
def test_a_malformed_object_message_is_refused_naming_its_sender(damage, why):
    from fa_hvd.comm.torchdist import decode_object, encode_object

    message = encode_object([torch.ones(2, 3), "ok"])
    with pytest.raises(ValueError, match=f"malformed object message from rank 3: .*{re.escape(why)}"):
        decode_object(damage(message), "rank 3")


def test_objects_that_are_not_plain_data_are_not_sent():
    from fa_hvd.comm.torchdist import MAX_DEPTH, encode_object

    with pytest.raises(ValueError, match="Linear is not plain data"):
        encode_object({"model": torch.nn.Linear(1, 1)})
    deep = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):
        encode_object(deep)
