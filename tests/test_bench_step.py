"""``fa-hvd-bench step`` under a real 4-rank horovodrun: it runs and reports every variant."""

import json

import pytest

from conftest import launch, output, untagged

pytestmark = pytest.mark.slow


def test_step_benchmark_reports_all_variants():
    proc = launch("gloo", 4, ["fa-hvd-bench", "step", "--rounds", "2", "--steps", "2", "--warmup", "1"])
    assert proc.returncode == 0, output(proc)
    rows = [json.loads(line) for line in untagged(proc.stdout).splitlines() if '"bench": "step"' in line]
    assert [r["variant"] for r in rows] == ["horovod_allreduce", "fa_hvd_mean", "fa_hvd_flag"]
    n = rows[0]["parameters"]
    assert rows[0]["bytes_received_per_rank_per_step"] == int(2 * 3 / 4 * 4 * n)
    assert all(r["bytes_received_per_rank_per_step"] == 3 * 4 * n for r in rows[1:])
    assert all(r["median_s"] > 0 and r["ranks"] == 4 for r in rows)
    assert rows[0]["vs_horovod"] == 1.0
