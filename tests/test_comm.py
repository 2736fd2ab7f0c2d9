"""Transport plumbing that needs no second rank: how long a rank waits, that it really waits, and
the torch.distributed transport's object messages (no pickle between ranks) and its process group's end."""

import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from fa_hvd.comm import base
from fa_hvd.comm.base import collective_timeout, wait_until
from fa_hvd.comm.rollcall import RollCall
from local_world import run_ranks


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


class FakeClock:
    """``time`` as fa_hvd.comm.base sees it: only its own sleeps move the clock, so a wait's
    notices do not depend on how loaded the machine is."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_without_a_timeout_the_wait_lasts_until_done_and_says_so(caplog, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(base, "time", clock)
    ready_at = clock.now + 0.3
    with caplog.at_level(logging.WARNING, logger="fa_hvd"):
        wait_until(lambda: clock.now >= ready_at, None, "rank 3: allgather 'x'", first_notice=0.1)
    assert ready_at <= clock.now < ready_at + 1e-3  # until done, and not a pause (<= 1 ms in the first second) more
    notices = [r.getMessage() for r in caplog.records]
    assert notices and all(m.startswith("rank 3: allgather 'x': still waiting after") for m in notices)
    assert len(notices) == 2  # after 0.1 s and 0.2 s, then doubling


def test_a_timeout_ends_the_wait():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer from every rank within 0 s"):
        wait_until(lambda: False, 0.2, "rank 1: allgather 'y'")
    assert 0.2 <= time.monotonic() - start < 30  # not before the timeout; the upper bound only guards a hang


def roll_calls(p: int, timeout: float = 30) -> list[RollCall]:
    """The roll calls of an in-process world of ``p`` ranks (their listeners answer until closed).

    ``timeout``: each call's; a generous one by default, so a listener slow to answer on a loaded
    machine is not taken for a missing rank (a closed port refuses at once, whatever the timeout)."""
    return run_ranks(p, lambda transport: RollCall(transport, timeout=timeout))


def test_the_roll_call_names_the_ranks_that_do_not_answer_and_where_the_others_wait():
    calls = roll_calls(4)
    try:
        host = socket.gethostname()
        assert [call.roster[r][0] for call in calls for r in range(4)] == [host] * 16
        for call in calls:
            call.waiting = "grad"
        assert [call.answers() for call in calls] == [{r: "grad" for r in range(4) if r != me} for me in range(4)]
        assert calls[0].report() == "every other rank answers the roll call and waits in this collective"
        calls[1].waiting = ""  # busy in its own code, or hung there
        calls[2].waiting = "eval"
        calls[3].close()  # gone: nothing listens on its port
        assert calls[0].answers() == {1: "", 2: "eval", 3: None}
        assert calls[0].report() == (f"no answer from rank 3 ({host}); in no collective (busy or hung): rank 1 ({host}); "
                                     f"rank 2 ({host}) waits in 'eval'")
        assert calls[0].report(where=False) == f"no answer from rank 3 ({host})"  # after a failure
    finally:
        for call in calls:
            call.close()


def test_the_roll_call_names_a_rank_that_takes_the_call_but_never_answers():
    """A stopped process: its kernel still accepts the connection, but nothing ever replies."""
    calls = roll_calls(2, timeout=0.5)  # the only rank called here must not answer: its call times out
    mute = socket.create_server(("127.0.0.1", 0))  # listens, never accepts
    try:
        calls[0].roster[1] = [calls[0].roster[1][0], mute.getsockname()[1]]
        start = time.monotonic()
        assert calls[0].answers() == {1: None}
        assert time.monotonic() - start < 5  # one call's timeout (0.5 s), not a hang
    finally:
        mute.close()
        for call in calls:
            call.close()


def test_a_stalled_wait_names_the_ranks_that_do_not_answer(caplog):
    calls = roll_calls(3)
    calls[1].close()
    try:
        with caplog.at_level(logging.WARNING, logger="fa_hvd"), \
                pytest.raises(TimeoutError, match=r"within 1 s; no answer from rank 1 \(.+\); in no collective"):
            wait_until(lambda: False, 0.6, "rank 0: allgather 'z'", first_notice=0.1, who=calls[0].report)
        assert any("still waiting after" in m and "no answer from rank 1 (" in m
                   for m in (r.getMessage() for r in caplog.records)), caplog.text
    finally:
        for call in calls:
            call.close()


def test_a_backend_failure_names_who_does_not_answer_once_per_roster(caplog):
    """After Horovod gave up on a peer (any collective, Horovod's own elastic broadcast included: the
    elastic state's restore() reports too), each rank logs once who does not answer its roll call."""
    from loopback import LoopbackTransport

    calls = roll_calls(3)
    calls[2].close()
    transport = LoopbackTransport(3)
    transport.roll_call = calls[0]
    try:
        with caplog.at_level(logging.WARNING, logger="fa_hvd"):
            transport.report_failure("fa_hvd.opt0.bucket0")
            transport.report_failure()  # the elastic restore after the same failure: said already
        messages = [r.getMessage() for r in caplog.records if "failed in Horovod" in r.getMessage()]
        assert messages == [f"fa_hvd: rank 0: 'fa_hvd.opt0.bucket0' failed in Horovod; "
                            f"no answer from rank 2 ({socket.gethostname()})"], caplog.text
    finally:
        for call in calls:
            call.close()


_CLOSE_CHECK = """
import socket, sys
import torch.distributed as dist
from fa_hvd.comm.torchdist import TorchDistTransport
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
if sys.argv[1] == "user":
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
else:
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
transport = TorchDistTransport()
transport.prepare(["bucket0"])
transport.close()
print(dist.is_initialized())
"""


@pytest.mark.parametrize("started_by, alive_after", [("transport", "False"), ("user", "True")])
def test_the_torch_transport_destroys_only_the_process_group_it_started(started_by, alive_after):
    """A trainer that exits with Gloo's groups alive can abort at teardown, so ``close()`` destroys
    them; a group the user set up (a DDP script) stays the user's to destroy."""
    done = subprocess.run([sys.executable, "-c", _CLOSE_CHECK, started_by], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == alive_after
