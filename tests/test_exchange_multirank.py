"""The exchanges on real 4-rank jobs: horovodrun (Gloo, MPI), mpirun (mpi4py, over TCP) and
torchrun (torch.distributed over Gloo)."""

import functools

import pytest

from conftest import SCRIPTS, launch, output, results

from fa_hvd.aggregators.geometry import U32

pytestmark = pytest.mark.slow

JOBS = {  # launcher -> (transport, checks, extra environment)
    "gloo": ("horovod", ["alltoall", "rules", "gram_bits", "early", "compression", "optimizer", "replicas", "bytes",
                         "kernels"], {}),
    # horovodrun --mpi pins Open MPI's transports (shared memory on one node: no TCP bytes to count);
    # the rules run through the same Horovod calls as under Gloo.
    "mpi": ("horovod", ["alltoall", "gram_bits", "compression", "optimizer", "replicas"], {}),
    "mpi4py": ("mpi", ["alltoall", "rules", "gram_bits", "compression", "optimizer", "replicas", "bytes"],
               {"OMPI_MCA_btl": "tcp,self"}),
    "torchrun": ("torch", ["alltoall", "rules", "gram_bits", "early", "compression", "optimizer", "replicas", "bytes",
                           "kernels"], {}),
}


@functools.cache
def report(job):
    transport, checks, env = JOBS[job]
    proc = launch(job, 4, ["python", str(SCRIPTS / "exchange_check.py"), "--transport", transport, *checks],
                  env=env, timeout=300)
    found = results(proc)
    assert proc.returncode == 0 and len(found) == 1, output(proc)
    return found[0]


def jobs_with(check):
    return [job for job, (_, checks, _) in JOBS.items() if check in checks]


@pytest.mark.parametrize("job", jobs_with("alltoall"))
def test_alltoall_delivers_uneven_splits_in_rank_order(job):
    assert report(job)["alltoall"]["ok"] == [True] * 4


@pytest.mark.parametrize("job", jobs_with("alltoall"))
def test_an_allgather_fills_the_buffer_its_caller_passes(job):
    """The sharded exchange gathers the aggregate's shards into a buffer it keeps across steps."""
    assert report(job)["alltoall"]["into_out"] == [True] * 4


@pytest.mark.parametrize("job", jobs_with("rules"))
def test_sharded_equals_the_rule_on_the_whole_matrix_and_ranks_agree(job):
    for case, r in report(job)["rules"].items():
        assert r["rel_diff"] < 1e-5 and r["same_non_finite"] and r["ranks_agree"], case


@pytest.mark.parametrize("job", jobs_with("gram_bits"))
def test_the_summed_gram_has_the_same_bits_on_every_rank(job):
    """The same bits on every rank, and the Gram of the whole matrix within geometry's bound: each
    side errs by at most gamma32_{n+2} sum_s ||x_i^s|| ||x_j^s|| (+ fp64 terms), with x^s a piece's
    rows centred on one of its rows; ||x_i^s|| <= ||g_i^s|| + ||r^s||, so by Cauchy-Schwarz at most
    (1 + sqrt(p))^2 = 9 max ||g||^2 for the 4 ranks' pieces and 4 max ||g||^2 for the whole."""
    r = report(job)["gram_bits"]
    gamma = (r["n"] + 2) * U32 / (1 - (r["n"] + 2) * U32)
    assert r["ranks_agree"] and r["rel_error"] < 16 * gamma


@pytest.mark.parametrize("job", jobs_with("early"))
def test_early_rules_give_the_bits_of_the_aggregate_after_the_last_bucket(job):
    """Both transports that wait from any thread: the shards gathered on the worker as each bucket
    arrives give the bits of the shards combined after the last bucket, on every rank."""
    found = report(job)["early"]
    assert len(found) == 6
    for case, r in found.items():
        assert r["bits_equal"] == [True] * 4 and r["threaded"] == [True] * 4, case


@pytest.mark.parametrize("job", jobs_with("compression"))
def test_fp16_compression_on_both_collectives(job):
    r = report(job)["compression"]
    assert r["dtype"] == "torch.float32" and r["max_abs_diff"] < 2e-3


@pytest.mark.parametrize("job", jobs_with("optimizer"))
def test_the_optimizer_trains_alike_with_either_exchange(job):
    r = report(job)["optimizer"]
    assert r["moved"] > 0 and r["max_abs_diff"] < 1e-5 and r["sharded_buckets"] > 1
    assert r["allgather_agree"] and r["sharded_agree"]


@pytest.mark.parametrize("job", jobs_with("replicas"))
def test_replicas_match_and_a_miscomputing_rank_is_named_on_every_rank(job):
    r = report(job)["replicas"]
    assert r["same_as_plain"]
    assert len(set(r["errors"])) == 1 and "shard 1: ranks [1, 2] disagree" in r["errors"][0]


@pytest.mark.parametrize("job", jobs_with("bytes"))
def test_sharded_traffic_is_an_allreduce_as_the_kernel_counts_it(job):
    measured = report(job)["bytes"]
    payload = 4 * measured["n"]
    for rank, r in enumerate(measured["per_rank"]):
        for k in (0, 1):  # sent, received
            assert 2 * 3 / 4 * payload <= r["sharded"][k] <= 1.1 * r["allreduce"][k], (rank, r)
            assert 3 * payload <= r["allgather"][k] <= 1.05 * 3 * payload, (rank, r)


@pytest.mark.parametrize("job", jobs_with("kernels"))
def test_ranks_agree_on_the_compiled_kernels_so_their_aggregates_agree(job):
    """Rank 1 cannot use the compiled kernels (FA_HVD_NATIVE=0) and the others can; the compiled Gram's
    last bits differ from the torch path's on the same rows, so without the start-up agreement the
    ranks would compute different FA aggregates. With it every rank takes the torch path."""
    r = report(job)["kernels"]
    assert r["paths_differ"] == [True] * 4, "the check needs rows on which the two paths differ"
    assert r["compiled_on"] == [False] * 4 and r["ranks_agree"]
