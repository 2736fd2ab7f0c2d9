"""``fa-hvd-bench step``: a training step with Horovod's allreduce (or DDP's) vs fa_hvd, same run.

Run under ``horovodrun -np 4 fa-hvd-bench step``, or ``torchrun --nproc-per-node 4
--no-python fa-hvd-bench step --transport torch``. Each rank builds the same model
(ResNet-18 by default, on the CPU; ``--device cuda``: one GPU per rank) once per variant:

* ``horovod_allreduce``: ``hvd.DistributedOptimizer`` (``op=Average``);
* ``fa_hvd_mean``: ``fa_hvd.DistributedOptimizer`` with ``mean`` and its default buckets;
* ``fa_hvd_mean_one_bucket``: the same with the whole gradient in one bucket (nothing
  leaves before backward ends: the no-overlap baseline);
* ``fa_hvd_flag``: FA with its default buckets;
* with ``--exchange allgather,sharded``, also ``fa_hvd_mean_sharded`` and
  ``fa_hvd_flag_sharded``: the same rules with ``exchange="sharded"``;
* with ``--kept-grads``, also ``..._kept`` twins of fa_hvd's variants (not the one-bucket
  baseline) that zero with ``zero_grad(set_to_none=False)``: the gradients outlive the step,
  so each bucket keeps them in one buffer that is sent as it is, with no copy
  (:meth:`fa_hvd.optimizer._Bucket.share_gradients`); the twin's row carries the cost against
  the variant that copies (``kept_cost``: the ratio of the medians minus 1, and per round,
  ``kept_cost_per_round``), and every fa_hvd row says how many of its buckets were sent with
  no copy (``buckets_sent_without_copy``); ``--profile``'s ``flatten`` is the copy itself;
* with ``--digest-cost``, also ``..._digest`` twins of the FA variants with the
  deferred digest of the aggregate (:mod:`fa_hvd.exchange.digest`, the trainer's
  default), and every FA variant then ends its step as the trainer does, with the
  control row (:func:`fa_hvd.train.control.agree`), which the twin's digest words
  ride in: the digest's cost is the ratio of the two medians (``digest_cost``),
  measured in the same rounds, with each round's ratio (``digest_cost_per_round``:
  the spread), and, less noisy, the median time of rank 0's fingerprint
  (``fingerprint_s``, the only work the digest adds, on a worker thread) over the
  median step (``fingerprint_share``) and how long the step waited for it
  (``fingerprint_wait_s``); and the same ratios of the CPU seconds the rank's
  process spent per step, all threads (``digest_cpu_cost`` and per round), which
  other jobs on the machine disturb less than wall time.

With ``--transport torch`` (torch.distributed, Gloo or NCCL) the baseline is
``ddp_allreduce``, plain ``DistributedDataParallel``, and the variants are
``ddp_hook_mean`` and ``ddp_hook_flag``: DDP with :mod:`fa_hvd.ddp`'s hook (what a DDP
user adds), then ``fa_hvd_mean`` and ``fa_hvd_flag``: the optimizer over the torch
transport (and the ``_sharded`` twins of all four). Ratios are ``vs_ddp``. Under DDP the
exchange runs inside ``backward`` (DDP's buckets and the hook), so the DDP rows have no
exposed time of their own (``null``).

A step is ``zero_grad``, forward, ``backward``, ``synchronize()``, ``step()`` (under
``skip_synchronize``), the same span for every variant. Its *exposed communication* is
the time from the end of ``backward`` (the last gradient) to the end of
``synchronize()`` (the aggregate in ``.grad``): the communication that backward did not
hide, plus, for fa_hvd, the rule. On rank 0 alone (``exposed_s``) that span also holds the
wait for a slower rank's backward, which swings with the ranks' skew from step to step; so
when every rank shares the node, each step is also timed across the job on the node's
``CLOCK_MONOTONIC`` (``exposed_job_s``: from the last rank's end of ``backward`` to the
last rank's end of ``synchronize()``), with its ratio and spread like the rest.

Fairness. Warm-up (``--warmup`` rounds, untimed) and timed rounds both interleave the
variants, ``steps`` steps each, and each round starts one variant later than the one
before (no variant always runs first, after the barrier, or after the same neighbour),
so machine noise and drift hit all alike. Rank 0 prints one JSON line per variant: the
median, min and max step time, the ratio of medians to the baseline's
(``vs_horovod``) and the spread of the per-round ratios (``vs_horovod_spread``: min,
median, max of this variant's round median over the baseline's in the same round), the
same for the exposed time, fa_hvd's own split (``wait_s``: blocked on communication,
``aggregate_s``: the rule), the machine's ``cores``, ``ranks_per_node x threads`` and
whether that ``oversubscribed`` the cores, and the load averages before and after.

Oversubscribed (more ranks x threads on a node than cores), a rank that waits competes
with the ranks that compute, and how it waits decides the figures: Horovod's
``synchronize()`` spins (its C++ ``WaitAndClear`` polls with ``std::this_thread::yield()``),
fa_hvd's transport polls with sleeps from 10 us to 1 ms (:func:`fa_hvd.comm.base.wait_until`)
and gives its core away. That, not fa_hvd's exchange, is why 4 ranks on 2 cores printed
fa_hvd at 0.41x-0.46x Horovod's step. ``--horovod-poll`` adds ``horovod_allreduce_polled``:
Horovod's optimizer unchanged, but the bench waits for its handles as fa_hvd does
(``hvd.poll`` and the same sleeps) before ``synchronize()``; fa_hvd's rows then also carry
``vs_horovod_polled``. Ratios from an oversubscribed run measure the waiting, not the
exchange.

``--profile``: after the rounds, ``--steps`` more steps of each fa_hvd variant and of
the baseline, and one JSON line per variant and rank (``"bench": "step_profile"``) with
the median seconds of each phase of the step, in the order they happen: ``forward``,
``backward`` (without fa_hvd's hooks), ``flatten`` (copying the gradients into buckets)
and ``send`` (handing them to the exchange), both inside backward, for the allgather
exchange without its worker thread ``bucket_work`` (for a Gram rule each bucket copied into
the ``(p, n)`` matrix, its NaN/Inf check and Gram blocks; for the mean the bucket's mean from
its gathered rows; while the later buckets travel), ``wait`` (blocked on the last bucket, without
``bucket_work``; with the worker thread: until it is done with the last bucket; Horovod:
all of ``synchronize()``), the exchange's stages after that (allgather: ``assembled``, the last
bucket's own work, then ``aggregated``, the rest of the rule; sharded: ``gram``, the
partial Gram, its allgather and the evidence, ``solved``, ``combined``, this rank's
shard of the aggregate, ``gathered``, the aggregate's allgather, ``aggregated``),
``unflatten`` (the aggregate into ``.grad``) and ``optimizer_step``. For an allgather
Gram-space rule over several buckets, ``rule_parts`` says what each piece of the rule
costs in all, by running it again on the same gathered matrix: ``finite_check`` (the
rows with NaN or Inf; robust rules without a Gram, whose diagonal tells the others), ``gram``,
``solve`` (the ``p x p`` coefficients) and ``combine`` (``c^T G``); for FA, Krum and the other
plain Gram rules most of ``gram`` ran in ``bucket_work`` or on the worker thread,
whose seconds of bucket work in the last step (beside the training thread, so not in the
step's sum) ``rule_parts`` holds as ``worker_thread``; the sharded exchange's seconds of
bucket work (on its worker, or inside ``wait``) are ``bucket_work`` there, and for a rule that
combines after the last bucket ``bare_gather`` is its step 5 alone (:func:`bare_gather`: the
aggregate's allgather after a barrier, the floor under ``gathered``). The DDP
variants (``--transport torch``) have ``forward``, ``backward`` and ``optimizer_step``, and
with fa_hvd's hook backward split as :func:`hook_phases` says: ``hooks`` (starting each
bucket's exchange), the exchange's stages from the last bucket on (``arrived``, ``gram``,
...), ``handed`` (the parts into DDP's futures) and ``ddp_finalize``. Rank 0 prints them as
a table on stderr too.

Bytes: what each rank really sent and received per step, as the kernel counted
them on its TCP sockets (:mod:`fa_hvd.comm.traffic`; everything the process moved
over TCP, Horovod's own negotiation included; shared memory and NCCL are not
seen), over each round's steps between two barriers, the most of any rank; beside
it the cost model (:mod:`fa_hvd.exchange.cost`: ``2 (p-1)/p * 4n`` for a ring
allreduce of ``n`` fp32 values, ``(p-1) * 4n`` for the allgather, the allreduce's
plus the Gram words for the sharded exchange) and the memory the exchange held
(the sharded exchange counts its own buffers; the allgather's is the model's).
Sharded variants carry ``bytes_vs_allreduce`` (measured, the larger of sent and
received; "not counted" when the sockets saw none of the allreduce's bytes) and a
last summary line holds the sharded mode's bars: bytes per rank <= 1.1x the
allreduce's, step <= 1.1x plain Horovod's. Timing figures belong to whoever reads
them on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fa_hvd.cli_types import integer_at_least

ALLGATHER_VARIANTS = ("fa_hvd_mean", "fa_hvd_mean_one_bucket", "fa_hvd_flag")
SHARDED_VARIANTS = ("fa_hvd_mean_sharded", "fa_hvd_flag_sharded")
TORCH_VARIANTS = ("ddp_hook_mean", "ddp_hook_flag", "fa_hvd_mean", "fa_hvd_flag")
EXCHANGES = ("allgather", "sharded")
BASELINES = {"horovod": ("horovod_allreduce", "vs_horovod"), "torch": ("ddp_allreduce", "vs_ddp")}
POLLED = "horovod_allreduce_polled"
KEPT = "_kept"


def variants_for(exchanges: list[str], transport: str = "horovod", digest_cost: bool = False,
                 horovod_poll: bool = False, kept_grads: bool = False) -> tuple[str, ...]:
    """The transport's own allreduce (and, with ``horovod_poll``, Horovod's waited for as fa_hvd
    waits), then fa_hvd's variants for each exchange asked for (with ``kept_grads``, each with
    buckets of its own followed by its ``_kept`` twin)."""
    names = (BASELINES[transport][0],) + ((POLLED,) if horovod_poll and transport == "horovod" else ())
    for exchange in exchanges:
        suffix = "_sharded" if exchange == "sharded" else ""
        if transport == "torch":
            group = tuple(v + suffix for v in TORCH_VARIANTS)
        else:
            group = ALLGATHER_VARIANTS if exchange == "allgather" else SHARDED_VARIANTS
        for name in group:
            names += (name,) + ((name + KEPT,) if kept_grads and keeps_gradients(name + KEPT) else ())
        if transport == "horovod" and digest_cost:
            names += (f"fa_hvd_flag{suffix}_digest",)
    return names


def keeps_gradients(name: str) -> bool:
    """Whether the variant zeroes with ``zero_grad(set_to_none=False)`` (``--kept-grads``): fa_hvd's
    optimizer with buckets of its own (not the one-bucket baseline, not DDP, whose buckets are DDP's)."""
    return name.endswith(KEPT) and name.startswith("fa_hvd_") and "one_bucket" not in name


def _exchanges(text: str) -> list[str]:
    names = list(dict.fromkeys(part.strip() for part in text.split(",")))
    unknown = [name for name in names if name not in EXCHANGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(EXCHANGES)}, got {text!r}")
    return names


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "step", help="seconds per training step and exposed communication: Horovod allreduce (or DDP) vs "
                     "fa_hvd (run under horovodrun, or torchrun with --transport torch)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", choices=("resnet18", "resnet50", "cnn"), default="resnet18",
                        help="torchvision's ResNet-18 (11.7M parameters), ResNet-50 (25.6M; with --image 224 "
                        "and --num-classes 1000 the ImageNet shape) or a small CNN")
    parser.add_argument("--num-classes", type=integer_at_least(2), default=10,
                        help="classes of the synthetic labels")
    parser.add_argument("--exchange", type=_exchanges, default=["allgather"], metavar="LIST",
                        help="fa_hvd's exchanges to time, comma list of allgather, sharded (default: allgather)")
    parser.add_argument("--digest-cost", action="store_true",
                        help="also time FA with the deferred digest of the aggregate (variants ..._digest); FA "
                             "and its twin then end each step with the trainer's control row, which carries it")
    parser.add_argument("--kept-grads", action="store_true",
                        help="also time fa_hvd's variants zeroing with zero_grad(set_to_none=False) (variants "
                             "..._kept): their buckets are sent with no copy; kept_cost is the ratio to the twin "
                             "that copies")
    parser.add_argument("--transport", choices=tuple(BASELINES), default="horovod",
                        help="horovod (under horovodrun; baseline Horovod's allreduce) or torch (under torchrun; "
                             "baseline plain DDP)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda: one GPU per rank (its local rank), NCCL where Horovod has it")
    parser.add_argument("--width", type=integer_at_least(1), default=32,
                        help="the small CNN's width (channels of the first conv)")
    parser.add_argument("--image", type=integer_at_least(1), default=32, help="input images are 3 x IMAGE x IMAGE")
    parser.add_argument("--batch-size", type=integer_at_least(1), default=16, help="per rank")
    parser.add_argument("--steps", type=integer_at_least(1), default=3, help="steps per variant per round")
    parser.add_argument("--rounds", type=integer_at_least(1), default=5,
                        help="timed rounds (each runs every variant)")
    parser.add_argument("--warmup", type=integer_at_least(0), default=2,
                        help="untimed rounds first (each runs every variant, one step each)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one step's time goes, per variant and rank (step_profile lines)")
    parser.add_argument("--horovod-poll", action="store_true",
                        help="also time horovod_allreduce_polled: Horovod's optimizer, waited for as fa_hvd "
                             "waits (polls and sleeps instead of spinning)")
    parser.add_argument("--f", type=integer_at_least(0), default=None,
                        help="FA's f (default: 1, or 0 below 3 ranks, where FA cannot tolerate one: p >= 2f + 1)")
    parser.add_argument("--r", type=integer_at_least(1), default=None,
                        help="FA's subspace dimension (default: FA's own, it follows p)")
    parser.add_argument("--threads", type=integer_at_least(1), default=1, help="torch threads per rank")
    parser.add_argument("--bucket-bytes", type=integer_at_least(1), default=None,
                        help="fa_hvd's bucket size (default: automatic, about 1/8 of the model within 1..25 MiB)")
    parser.set_defaults(run=run)


def build_model(args) -> torch.nn.Module:
    if args.model in ("resnet18", "resnet50"):
        import torchvision.models

        return getattr(torchvision.models, args.model)(num_classes=args.num_classes)
    from fa_hvd.train.models import small_cnn

    return small_cnn((3, args.image, args.image), args.num_classes, width=args.width)


NOT_COUNTED = "not counted"


def per_round_cost(mine: list[float], twin: list[float], steps: int) -> list[float]:
    """Each round's median step over its twin's in the same round, minus 1 (the spread of the cost:
    the rounds interleave the variants, so a round's noise hits both)."""
    rounds = range(0, len(mine), steps)
    return [round(statistics.median(mine[i : i + steps]) / statistics.median(twin[i : i + steps]) - 1, 4)
            for i in rounds]


def vs_allreduce(mine: list[float], allreduce: list[float]) -> float | str:
    """The larger of the sent and received byte ratios to Horovod's allreduce, or "not counted"
    when the sockets saw none of the allreduce's bytes (Open MPI's shared memory between ranks
    on one node, the default under horovodrun here)."""
    if not all(allreduce):
        return NOT_COUNTED
    return max(m / a for m, a in zip(mine, allreduce))


def ranks_per_node(size: int) -> int:
    """Ranks on this node, from the launcher's environment (horovodrun, mpirun, torchrun); else ``size``."""
    for key in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return size


def spread(values: list[float]) -> list[float] | None:
    """``[min, median, max]`` (None when empty)."""
    return [min(values), statistics.median(values), max(values)] if values else None


def wait_for_horovod(opt) -> None:
    """Wait for Horovod's allreduce handles as fa_hvd's transport waits (``hvd.poll``, then sleeps
    growing from 10 us to 1 ms), so that ``synchronize()`` finds them done and never spins."""
    import horovod.torch as hvd
    from fa_hvd.comm.base import wait_until

    for handle, _ in list(opt._handles.values()):
        if isinstance(handle, int):
            wait_until(lambda: hvd.poll(handle), None, "fa-hvd-bench: Horovod's allreduce")


def step_phases(forward: float, backward: float, synchronize: float, optimizer_step: float,
                stats: dict) -> dict[str, float]:
    """One step's phases in order (module docstring): fa_hvd's from its ``stats``; Horovod's
    ``synchronize()`` is all ``wait``."""
    hooks = stats.get("flatten_s", 0.0) + stats.get("send_s", 0.0)
    phases = {"forward": forward, "backward": backward - hooks}
    if "phases" not in stats:
        return {**phases, "wait": synchronize, "optimizer_step": optimizer_step}
    phases.update({"flatten": stats["flatten_s"], "send": stats["send_s"]})
    if "overlapped_s" in stats:  # the allgather exchange's work on buckets while later ones travel
        phases["bucket_work"] = stats["overlapped_s"]
    phases["wait"] = stats["wait_s"] - stats.get("overlapped_s", 0.0)
    phases.update(stats["phases"])
    phases.update({"unflatten": stats["unflatten_s"], "optimizer_step": optimizer_step})
    return phases


def hook_phases(start: float, forward_done: float, backward_done: float, done: float, state) -> dict[str, float]:
    """A DDP step's phases in order from its stamps: ``forward``, ``backward``; with fa_hvd's hook
    (``state``: :class:`fa_hvd.ddp.RobustHookState`) backward is split into its own work before the
    last bucket, ``hooks`` (the hook starting each bucket's exchange), then the exchange's stages from
    the last bucket on (``arrived``: the last bucket received and the bucket work done, then as the
    optimizer's), ``handed`` (each bucket's part into its future) and ``ddp_finalize`` (DDP writing
    the parts into ``.grad``, to the end of backward); then ``optimizer_step``."""
    from fa_hvd.optimizer import stage_seconds

    phases = {"forward": forward_done - start}
    if state is None:
        phases["backward"] = backward_done - forward_done
    else:
        timings = state.timings
        phases.update({"backward": timings["last_bucket"] - forward_done - state.hook_s, "hooks": state.hook_s,
                       **stage_seconds(timings, "last_bucket"), "ddp_finalize": backward_done - timings["handed"]})
    phases["optimizer_step"] = done - backward_done
    return phases


def rule_parts(rule, G: torch.Tensor | None, repeats: int = 3) -> dict[str, float]:
    """An allgather rule's pieces, timed again on the matrix ``G`` it last saw (median of
    ``repeats``) as the exchange runs them: ``finite_check`` (a robust rule without a Gram; a Gram
    rule reads finiteness off ``K``'s diagonal), ``gram``, ``solve``, ``combine`` (into a kept buffer,
    :class:`~fa_hvd.exchange.base.Outputs`); empty without ``G`` (one bucket: the exchange keeps no
    matrix) and for rules that are not in Gram space."""
    from fa_hvd.aggregators.base import combine, finite_rows, host_gram

    if G is None or not getattr(rule, "gram_space", False):
        return {}
    times = {key: [] for key in ("finite_check", "gram", "solve", "combine")}
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    for _ in range(repeats):
        start = time.perf_counter()
        if rule.robust and not rule.uses_gram:
            finite_rows(G)
        checked = time.perf_counter()
        if rule.uses_gram:
            K = host_gram(G)
            gram_done = time.perf_counter()
            c = rule.coefficients(K, rule.f)
            solved = time.perf_counter()
            combine(G, c, out=out)
        else:  # the mean: one pass, no Gram
            gram_done = solved = checked
            torch.mean(G, dim=0, out=out)
        done = time.perf_counter()
        for key, seconds in zip(times, (checked - start, gram_done - checked, solved - gram_done, done - solved)):
            times[key].append(seconds)
    return {key: statistics.median(v) for key, v in times.items()}


def bare_gather(transport, shards: torch.Tensor, name: str, repeats: int = 5) -> float:
    """The sharded exchange's step 5 alone: this rank's ``shards`` of the aggregate allgathered in the
    exchange's pieces (:func:`~fa_hvd.exchange.sharded.gather_bounds`) into outputs kept across repeats,
    each repeat after a barrier (no rank skew); the median seconds, the floor under ``gathered``."""
    from fa_hvd.exchange.sharded import gather_bounds

    bounds = gather_bounds(shards.shape[1], transport.gather_pieces)
    pieces = [shards[:, a:b].reshape(1, -1) for a, b in zip(bounds, bounds[1:])]
    outs = [torch.empty(transport.size, piece.shape[1], dtype=piece.dtype, device=piece.device) for piece in pieces]
    times = []
    for repeat in range(repeats):
        transport.allreduce_sum(torch.zeros(1), name=f"{name}.barrier{repeat}")
        start = time.perf_counter()
        handles = [transport.allgather_async(piece, name=f"{name}#{k}", out=out)
                   for k, (piece, out) in enumerate(zip(pieces, outs))]
        for handle in handles:
            transport.wait(handle)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    import fa_hvd
    import fa_hvd.ddp
    from fa_hvd.comm import get_transport
    from fa_hvd.comm.traffic import SocketTraffic
    from fa_hvd.exchange import AllgatherExchange
    from fa_hvd.exchange.cost import exchange_cost
    from fa_hvd.train import control

    transport = get_transport(args.transport)
    torch.set_num_threads(args.threads)
    size, rank = transport.size, transport.rank
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", transport.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 3, args.image, args.image, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)
    names = variants_for(args.exchange, args.transport, args.digest_cost, args.horovod_poll, args.kept_grads)
    baseline, ratio = BASELINES[args.transport]
    with_control_row = {n for name in names if name.endswith("_digest") for n in (name, name.removesuffix("_digest"))}
    flag = {"f": min(1, (size - 1) // 2) if args.f is None else args.f,
            **({} if args.r is None else {"r": args.r})}

    def build(name):
        torch.manual_seed(0)
        model = build_model(args).to(device)
        inner = torch.optim.SGD(model.parameters(), lr=0.01)
        named = model.named_parameters()
        exchange = "sharded" if "_sharded" in name else "allgather"
        if name.startswith("horovod_allreduce"):
            import horovod.torch as hvd

            return model, hvd.DistributedOptimizer(inner, named_parameters=named, op=hvd.Average)
        if name.startswith("ddp_"):
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=args.bucket_bytes / 2**20 if args.bucket_bytes else None)
            if name.startswith("ddp_hook"):
                rule = "flag" if name.startswith("ddp_hook_flag") else "mean"
                fa_hvd.ddp.wrap(ddp, aggregator=rule, exchange=exchange, **(flag if rule == "flag" else {}))
            return ddp, inner
        bucket_bytes = 1 << 62 if name == "fa_hvd_mean_one_bucket" else args.bucket_bytes
        if name.startswith("fa_hvd_flag"):
            return model, fa_hvd.DistributedOptimizer(inner, named_parameters=named, aggregator="flag",
                                                      aggregator_params=flag, bucket_bytes=bucket_bytes,
                                                      exchange=exchange, transport=transport,
                                                      digest="deferred" if name.endswith("_digest") else False)
        return model, fa_hvd.DistributedOptimizer(inner, named_parameters=named, aggregator="mean",
                                                  bucket_bytes=bucket_bytes, exchange=exchange, transport=transport)

    variants = {name: build(name) for name in names}
    traffic = SocketTraffic()
    load_before = os.getloadavg()

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.clock_gettime(time.CLOCK_MONOTONIC)  # one clock for every process of a node
    keys = ("step_s", "exposed_s", "wait_s", "aggregate_s", "sent", "received", "peak_bytes", "fingerprint_s",
            "fingerprint_wait_s", "cpu_s")
    samples = {name: {key: [] for key in keys} for name in names}
    per_round = {name: {"step_s": [], "exposed_s": []} for name in names}  # each round's median
    stamps = {name: [] for name in names}  # (end of backward, end of synchronize()) per recorded step
    profiles = {name: [] for name in names}
    parts: dict[str, dict] = {}

    def steps(name, count, record, profile=False):
        model, opt = variants[name]
        for _ in range(count):
            start, cpu = clock(), time.process_time()
            if keeps_gradients(name):
                opt.zero_grad(set_to_none=False)
            else:
                opt.zero_grad()  # Horovod's takes no argument
            loss = F.cross_entropy(model(x), y)
            forward_done = clock()
            loss.backward()
            if name.startswith("ddp_"):  # the exchange ran inside backward
                backward_done = clock()
                opt.step()
                if record:
                    samples[name]["step_s"].append(clock() - start)
                if profile:
                    profiles[name].append(hook_phases(start, forward_done, backward_done, clock(),
                                                      getattr(model, "fa_hvd_state", None)))
                continue
            backward_done = clock()
            if name == "horovod_allreduce_polled":
                wait_for_horovod(opt)
            opt.synchronize()
            synced = clock()
            with opt.skip_synchronize():
                opt.step()
            done = clock()
            stats = getattr(opt, "stats", {})
            if name in with_control_row:  # the trainer's control row, the twin's digest words in it
                control.agree(transport, 0.0, stop=False, checkpoint_due=False, faulty=False, overflowed=False,
                              digest=opt.digest)
                if record and opt.digest is not None:  # the last step's fingerprint (settled by this row)
                    samples[name]["fingerprint_s"].append(opt.digest.seconds)
                    samples[name]["fingerprint_wait_s"].append(opt.digest.waited)
            if record:
                samples[name]["step_s"].append(clock() - start)
                samples[name]["cpu_s"].append(time.process_time() - cpu)
                samples[name]["exposed_s"].append(synced - backward_done)
                stamps[name].append((backward_done, synced))
                for key in ("wait_s", "aggregate_s", "peak_bytes"):
                    if key in stats:
                        samples[name][key].append(stats[key])
            if profile:
                profiles[name].append(step_phases(forward_done - start, backward_done - forward_done,
                                                  synced - backward_done, done - synced, stats))

    order = list(names)
    for _ in range(args.warmup):  # as the timed rounds: interleaved, one variant later each time
        for name in order:
            steps(name, 1, record=False)
        order = order[1:] + order[:1]
    for round_ in range(args.rounds):
        for name in order:
            # Byte counts outside two barriers: no peer's bytes of this round arrive before the
            # first snapshot, and all of them have arrived before the second (barriers: ~100 B).
            before = traffic.totals()
            transport.allreduce_sum(torch.zeros(1), name=f"bench.barrier.{round_}.{name}")
            count = len(samples[name]["step_s"])
            steps(name, args.steps, record=True)
            transport.allreduce_sum(torch.zeros(1), name=f"bench.barrier2.{round_}.{name}")
            after = traffic.totals()
            samples[name]["sent"].append((after[0] - before[0]) / args.steps)
            samples[name]["received"].append((after[1] - before[1]) / args.steps)
            for key in per_round[name]:
                if samples[name][key][count:]:
                    per_round[name][key].append(statistics.median(samples[name][key][count:]))
        order = order[1:] + order[:1]
        if rank == 0:
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
    if args.profile:
        for name in names:
            transport.allreduce_sum(torch.zeros(1), name=f"bench.profile.{name}")
            steps(name, args.steps, record=False, profile=True)
            model, opt = variants[name]
            exchange = getattr(getattr(model, "fa_hvd_state", opt), "exchange", None)
            if "bucket_work_s" in getattr(exchange, "stats", {}):  # the sharded exchange's, inside its stages
                parts[name] = {"bucket_work": exchange.stats["bucket_work_s"]}
                if exchange.shards is not None:
                    parts[name]["bare_gather"] = bare_gather(transport, exchange.shards, f"bench.bare.{name}")
            if isinstance(exchange, AllgatherExchange):  # its (p, n) matrix, kept across steps (several buckets)
                beside = {"worker_thread": exchange.stats["worker_s"]} if "worker_s" in exchange.stats else {}
                parts[name] = {**beside, **rule_parts(exchange.aggregator, exchange._buffer)}
    load_after = os.getloadavg()
    local = ranks_per_node(size)
    if local == size:  # one node: the ranks' clocks are the same clock
        for name, job in job_exposed(transport, stamps).items():
            samples[name]["exposed_job_s"] = job
            per_round[name]["exposed_job_s"] = [statistics.median(job[k:k + args.steps])
                                                for k in range(0, len(job), args.steps)]
    cores = len(os.sched_getaffinity(0))
    machine = {"cores": cores, "ranks_x_threads_per_node": local * args.threads,
               "oversubscribed": local * args.threads > cores,
               "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in load_after]}
    if rank == 0 and machine["oversubscribed"]:
        print(f"fa-hvd-bench step: {local} ranks x {args.threads} thread(s) on {cores} cores: oversubscribed; "
              f"waiting ranks compete with computing ones and Horovod's synchronize() spins while fa_hvd's "
              f"transport sleeps, so the ratios measure the waiting (see --horovod-poll)", file=sys.stderr,
              flush=True)

    n = sum(p.numel() for p in variants[baseline][0].parameters())
    medians = {name: {k: statistics.median(v) for k, v in s.items() if v} for name, s in samples.items()}
    wire = torch.tensor([[[medians[name][k] for k in ("sent", "received")] for name in names]], dtype=torch.float64)
    everyone = transport.allgather(wire, name="bench.bytes")  # (ranks, variants, 2): numbers, not pickles
    most = {name: everyone[:, i].amax(0).tolist() for i, name in enumerate(names)}
    base = medians[baseline]
    profile_rows = gather_profiles(transport, names, profiles, parts) if args.profile else {}

    def round_ratios(name: str, other: str, key: str) -> list[float] | None:
        """This variant's round medians over ``other``'s in the same rounds: ``[min, median, max]`` (None when
        either was not timed so)."""
        pairs = list(zip(per_round[name].get(key, []), per_round[other].get(key, [])))
        return spread([a / b for a, b in pairs]) if len(pairs) == args.rounds else None

    if rank == 0:
        records = []
        for name in names:
            m = medians[name]
            kind = "allreduce" if name in (baseline, POLLED) else "sharded" if "_sharded" in name else "allgather"
            opt = variants[name][1]
            buckets = getattr(opt, "_buckets", None) if kind != "allreduce" else None  # DDP's are its own
            sizes = [b.numel for b in buckets] if buckets else [n]
            model = exchange_cost(kind, sizes, size)  # the deferred digest adds no exchange traffic
            record = {
                "bench": "step", "variant": name, "exchange": kind, "model": args.model, "device": args.device,
                "ranks": size, "parameters": n, "batch_per_rank": args.batch_size,
                "buckets": len(buckets) if buckets else None,
                "median_s": m["step_s"], "min_s": min(samples[name]["step_s"]),
                "max_s": max(samples[name]["step_s"]), ratio: m["step_s"] / base["step_s"],
                f"{ratio}_spread": round_ratios(name, baseline, "step_s"),
                "exposed_s": m.get("exposed_s"),
                f"exposed_{ratio}": m["exposed_s"] / base["exposed_s"] if "exposed_s" in m and "exposed_s" in base
                else None,
                f"exposed_{ratio}_spread": round_ratios(name, baseline, "exposed_s"),
                "exposed_job_s": m.get("exposed_job_s"),
                f"exposed_job_{ratio}": m["exposed_job_s"] / base["exposed_job_s"]
                if "exposed_job_s" in m and "exposed_job_s" in base else None,
                f"exposed_job_{ratio}_spread": round_ratios(name, baseline, "exposed_job_s"),
                "rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads, **machine,
                "bytes_sent_per_rank_per_step": int(most[name][0]),
                "bytes_received_per_rank_per_step": int(most[name][1]),
                "model_bytes_per_rank_per_step": int(model["bytes_received"]),
                "bytes_source": traffic.source,
                "exchange_peak_bytes": int(m["peak_bytes"]) if "peak_bytes" in m else None,
                "model_exchange_bytes": int(model["memory_bytes"]),
            }
            if kind == "sharded":
                record["bytes_vs_allreduce"] = vs_allreduce(most[name], most[baseline])
            record.update({k: m[k] for k in ("wait_s", "aggregate_s") if k in m})
            if name.startswith("fa_hvd_"):
                record["buckets_sent_without_copy"] = sum(b.sends_shared() for b in buckets)
            if keeps_gradients(name):  # no copy into the buckets: this median over its twin's that copies
                twin = name.removesuffix(KEPT)
                record["kept_cost"] = m["step_s"] / medians[twin]["step_s"] - 1
                record["kept_cost_per_round"] = per_round_cost(samples[name]["step_s"], samples[twin]["step_s"],
                                                               args.steps)
            if POLLED in names and name.startswith("fa_hvd"):
                record["vs_horovod_polled"] = m["step_s"] / medians[POLLED]["step_s"]
                record["vs_horovod_polled_spread"] = round_ratios(name, POLLED, "step_s")
            if name.endswith("_digest"):  # the digest's cost: this median over its twin's without it
                twin = name.removesuffix("_digest")
                record["digest_cost"] = m["step_s"] / medians[twin]["step_s"] - 1
                record["digest_cost_per_round"] = per_round_cost(samples[name]["step_s"], samples[twin]["step_s"],
                                                                 args.steps)
                record["fingerprint_s"] = m["fingerprint_s"]  # what the digest adds on this rank, its share:
                record["fingerprint_share"] = m["fingerprint_s"] / m["step_s"]
                record["fingerprint_wait_s"] = m["fingerprint_wait_s"]  # the part the next step waited for
                record["digest_cpu_cost"] = m["cpu_s"] / medians[twin]["cpu_s"] - 1
                record["digest_cpu_cost_per_round"] = per_round_cost(samples[name]["cpu_s"], samples[twin]["cpu_s"],
                                                                     args.steps)
            records.append(record)
            print(json.dumps(record), flush=True)
        sharded = [r for r in records if r["exchange"] == "sharded"]
        if sharded:
            print(json.dumps({"bench": "step", "summary": {
                "ranks": size, "model": args.model, "device": args.device,
                "bytes_vs_allreduce": {r["variant"]: r["bytes_vs_allreduce"] for r in sharded},
                ratio: {r["variant"]: r[ratio] for r in sharded},
                "sharded_bytes_within_1_1x_allreduce": NOT_COUNTED if any(
                    r["bytes_vs_allreduce"] == NOT_COUNTED for r in sharded) else all(
                    r["bytes_vs_allreduce"] <= 1.1 for r in sharded),
                f"sharded_step_within_1_1x_{baseline.split('_')[0]}": all(r[ratio] <= 1.1 for r in sharded),
            }}), flush=True)
        for name, rows in profile_rows.items():
            for r, phases in enumerate(rows):
                print(json.dumps({"bench": "step_profile", "variant": name, "rank": r, **phases}), flush=True)
        if profile_rows:
            print_profiles(profile_rows)
    transport.close()
    return 0


def job_exposed(transport, stamps: dict[str, list[tuple[float, float]]]) -> dict[str, list[float]]:
    """Per variant with stamps, each recorded step's exposed time across the job: the last rank's end of
    ``synchronize()`` minus the last rank's end of ``backward`` (one allgather of every rank's stamps; the
    stamps must come from one clock, ``CLOCK_MONOTONIC`` on one node; every rank recorded the same steps)."""
    timed = [name for name in stamps if stamps[name]]
    if not timed:
        return {}
    mine = torch.tensor([[stamps[name] for name in timed]], dtype=torch.float64)  # (1, variants, steps, 2)
    latest = transport.allgather(mine, name="bench.stamps").amax(0)  # the last rank's, step by step
    return {name: (latest[i, :, 1] - latest[i, :, 0]).tolist() for i, name in enumerate(timed)}


def gather_profiles(transport, names, profiles: dict, parts: dict) -> dict[str, list[dict]]:
    """Every rank's median phases (``{"phases": ..., "rule_parts": ...}``) per profiled variant, for
    rank 0 (one allgather of numbers per variant; every rank has the same phases for a variant)."""
    rows = {}
    for name in names:
        if not profiles[name]:
            continue
        keys = list(profiles[name][0])
        mine = [statistics.median(step[key] for step in profiles[name]) for key in keys]
        extra = list(parts.get(name, {}))
        mine += [parts[name][key] for key in extra]
        everyone = transport.allgather(torch.tensor([mine], dtype=torch.float64), name=f"bench.profile.{name}.rows")
        rows[name] = [{"phases": dict(zip(keys, values[: len(keys)])),
                       **({"rule_parts": dict(zip(extra, values[len(keys):]))} if extra else {})}
                      for values in everyone.tolist()]
    return rows


def print_profiles(rows: dict[str, list[dict]]) -> None:
    """The profile as a table on stderr: one line per variant and rank, milliseconds per phase."""
    for name, ranks in rows.items():
        print(f"profile of {name} (ms per step, median):", file=sys.stderr)
        for r, row in enumerate(ranks):
            cells = [f"{key} {1e3 * seconds:.1f}" for key, seconds in row["phases"].items()]
            if "rule_parts" in row:
                cells.append("[beside the step: " + ", ".join(f"{key} {1e3 * seconds:.1f}"
                                                   for key, seconds in row["rule_parts"].items()) + "]")
            total = sum(row["phases"].values())
            print(f"  rank {r}: " + " | ".join(cells) + f" | total {1e3 * total:.1f}", file=sys.stderr)
    sys.stderr.flush()
