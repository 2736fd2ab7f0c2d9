"""Object messages between ranks: no pickle, bounded, validated; a malformed one names its sender on every rank."""

import io
import pickle

import pytest
import torch

from fa_hvd.comm.messages import MessageError, Optional, check
from local_world import run_ranks

SCHEMA = {str: int}


RAN: list = []


def _pwn():
    RAN.append("code of another rank's choosing ran here")


class _Runs:
    """Unpickling this calls a function of the sender's choosing (here: a recorder)."""

    def __reduce__(self):
        return (_pwn, ())


def test_json_messages_arrive_in_rank_order():
    got = run_ranks(3, lambda t: t.allgather_json({"rank": t.rank, "steps": 10 * t.rank}, "m", SCHEMA))
    assert got == [[{"rank": r, "steps": 10 * r} for r in range(3)]] * 3


@pytest.mark.parametrize("payload,reason", [
    (pickle.dumps(_Runs()), "malformed"),  # a pickle is not JSON: nothing runs
    (b'{"rank": 1, "steps": NaN}', "malformed"),
    (b'{"rank": "one"}', "malformed"),  # valid JSON of the wrong shape
    (b"[" * 100000 + b"]" * 100000, "malformed"),  # nesting deeper than the parser's recursion limit
])
def test_a_malformed_message_raises_on_every_rank_naming_its_sender(payload, reason):
    RAN.clear()

    def rank(t):
        try:
            if t.rank == 2:  # the lying rank hands the transport raw bytes of its choosing
                t.allgather_bytes(payload, "m")
                return None
            t.allgather_json({"rank": t.rank}, "m", SCHEMA)
        except MessageError as exc:
            return str(exc)
        return "no error"

    errors = run_ranks(4, rank)
    assert all(f"rank 2 sent a {reason} m message" in e for e in errors[:2] + errors[3:]), errors
    assert not RAN


def test_an_announced_length_over_the_limit_is_refused_before_allocating():
    def rank(t):
        try:
            t.allgather_bytes(b"x" if t.rank != 1 else b"y" * 100, "m", limit=10)
        except MessageError as exc:
            return str(exc)

    errors = run_ranks(3, rank)
    assert all("rank 1 announced a m message of 100 bytes (the limit is 10)" in e for e in errors)


def test_tensor_state_travels_weights_only():
    state = {"rng": torch.arange(5, dtype=torch.uint8), "python": (3, (1, 2), None), "n": 4}
    got = run_ranks(2, lambda t: t.gather_state({**state, "rank": t.rank}, 0, "s"))[0]
    assert torch.equal(got[1]["rng"], state["rng"]) and got[1]["rank"] == 1 and got[0]["python"] == (3, (1, 2), None)


@pytest.mark.parametrize("root", [0, 2])
def test_gather_state_gives_the_root_every_ranks_state_and_the_others_nothing(monkeypatch, root):
    """Rows 5 bytes wide (the 1 MiB lowered): states of different lengths cross row boundaries and come
    back whole, in rank order, on ``root`` alone; no other rank receives a byte of them."""
    from fa_hvd.comm import base
    from local_world import LocalTransport

    monkeypatch.setattr(base, "GATHER_ROW_BYTES", 5)
    rows = {}
    alltoall = LocalTransport.alltoall_async

    def recording(self, tensor, splits, name, received=None):
        handle = alltoall(self, tensor, splits, name, received)
        result = handle.result
        handle.result = lambda everyone: rows.setdefault(self.rank, result(everyone))
        return handle

    monkeypatch.setattr(LocalTransport, "alltoall_async", recording)
    states = [{"w": torch.arange(3 * r + 1, dtype=torch.float32), "rank": r} for r in range(4)]
    got = run_ranks(4, lambda t: t.gather_state(states[t.rank], root, "s"))
    assert [g is None for g in got] == [r != root for r in range(4)]
    assert [s["rank"] for s in got[root]] == [0, 1, 2, 3]
    assert all(torch.equal(s["w"], e["w"]) for s, e in zip(got[root], states))
    assert all(rows[r].numel() == 0 for r in range(4) if r != root)
    assert rows[root].shape[1] == 5


@pytest.mark.parametrize("root", [0, 2])
def test_a_malformed_gathered_state_raises_on_every_rank_naming_its_sender_and_runs_nothing(root):
    """The root alone reads the states; its verdict reaches the others, so every rank raises alike."""
    buffer = io.BytesIO()
    torch.save({"x": _Runs()}, buffer)

    class Lies:  # what a lying rank 2 makes of its message: a pickle that would run code when loaded
        message = staticmethod(lambda data: buffer.getvalue())

    def rank(t):
        t.lies = Lies() if t.rank == 2 else None
        try:
            t.gather_state({"x": torch.zeros(2)}, root, "s")
        except MessageError as exc:
            return str(exc)
        return "no error"

    RAN.clear()
    errors = run_ranks(4, rank)
    assert all("rank 2 sent a malformed s message" in e for e in errors), errors
    assert not RAN


def test_a_gathered_length_over_the_limit_is_refused_on_every_rank():
    def rank(t):
        try:
            t.gather_state({"x": torch.zeros(1 if t.rank != 1 else 200)}, 0, "s", limit=2000)
        except MessageError as exc:
            return str(exc)

    errors = run_ranks(3, rank)
    assert all(e is not None and "rank 1 announced a s message of" in e and "(the limit is 2000)" in e for e in errors)


def test_broadcast_state_from_the_root():
    got = run_ranks(3, lambda t: t.broadcast_state({"w": torch.ones(2) * 7} if t.rank == 1 else None, 1, "b"))
    assert all(torch.equal(g["w"], torch.full((2,), 7.0)) for g in got)


def test_an_optimizer_state_larger_than_the_state_limit_travels_and_one_larger_than_its_model_is_refused(monkeypatch):
    """broadcast_optimizer_state over a non-Horovod transport: Adam's state of a model whose state is over
    ``MAX_STATE_BYTES`` (lowered here to 1 KiB) arrives, because the limit grows with the model; a root
    that announces more than three fp64 copies of the parameters past it is refused."""
    import fa_hvd
    from fa_hvd.comm import messages

    monkeypatch.setattr(messages, "MAX_STATE_BYTES", 1024)

    def rank(t, padding=0):
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 20)  # 820 parameters: Adam's two fp32 buffers are 6.6 kB
        opt = fa_hvd.DistributedOptimizer(torch.optim.Adam(model.parameters()), aggregator="mean", transport=t)
        model(torch.full((2, 40), 1.0 + t.rank)).sum().backward()
        opt.step()
        if t.rank == 0 and padding:
            opt.state[model.weight]["padding"] = torch.zeros(padding, dtype=torch.float64)
        if t.rank == 1:
            opt.state[model.weight]["exp_avg"].zero_()
        try:
            fa_hvd.broadcast_optimizer_state(opt, root_rank=0)
        except MessageError as exc:
            return str(exc)
        return opt.state[model.weight]["exp_avg"].clone()

    got = run_ranks(2, rank)
    assert len(messages.encode_state(got)) > 1024 and torch.equal(got[0], got[1]) and got[1].abs().sum() > 0
    errors = run_ranks(2, lambda t: rank(t, padding=3 * 820))
    assert all(isinstance(e, str) and "rank 0 announced a fa_hvd.optimizer_state message of" in e and f"(the limit is {1024 + 24 * 820})" in e
               for e in errors)


def test_over_horovod_the_aggregators_state_larger_than_the_state_limit_travels(monkeypatch):
    """Centred clipping's centre (one fp32 value per parameter, 8 kB here) reaches the other rank with
    ``MAX_STATE_BYTES`` lowered to 1 KiB (Horovod's own optimizer broadcast stubbed out)."""
    import horovod.torch.functions

    import fa_hvd
    from fa_hvd.comm import messages

    monkeypatch.setattr(messages, "MAX_STATE_BYTES", 1024)
    monkeypatch.setattr(horovod.torch.functions, "broadcast_optimizer_state", lambda *args: None)

    def rank(t):
        model = torch.nn.Linear(100, 20)  # 2,020 parameters
        opt = fa_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator="cclip",
                                          transport=t)
        opt.aggregator.center = torch.full((2020,), float(t.rank))
        t.name = "horovod"
        fa_hvd.broadcast_optimizer_state(opt, root_rank=1)
        return opt.aggregator.center

    assert all(torch.equal(center, torch.ones(2020)) for center in run_ranks(2, rank))


@pytest.mark.parametrize("value,schema,ok", [
    (3, int, True), (True, int, False), (2, float, True), (None, Optional(str), True), ("x", Optional(str), True),
    ([["a", [1, 2], "f", True]], [(str, [int], str, bool)], True), ([["a", [1], "f"]], [(str, [int], str, bool)], False),
    ({"a": 1}, {str: int}, True), ({"a": "1"}, {str: int}, False), ([1, "x"], [int], False),
])
def test_schemas(value, schema, ok):
    if ok:
        check(value, schema)
    else:
        with pytest.raises(ValueError):
            check(value, schema)
