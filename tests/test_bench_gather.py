"""``fa-hvd-bench gather`` under a real horovodrun: each rank's peak memory in a checkpoint's per-rank
state exchange. The figures count buffers, so a loose bound on them holds on any machine."""

import json

import pytest

from conftest import launch, output, untagged

pytestmark = pytest.mark.slow

MIB = 32


def test_the_gather_holds_every_state_on_rank_0_alone():
    proc = launch("gloo", 3, ["fa-hvd-bench", "gather", "--mib", str(MIB)])
    assert proc.returncode == 0, output(proc)
    [line] = [json.loads(line) for line in untagged(proc.stdout).splitlines() if '"bench": "gather"' in line]
    assert (line["method"], line["ranks"], line["state_mib"], line["states_held"]) == ("gather", 3, MIB, [3, 0, 0])
    root, *others = line["peak_growth_mib"]
    # rank 0: its own encoded state and row, three received rows and three decoded states; the others only
    # their encoded state and the row it travels in (the allgather gave every rank rank 0's share)
    assert all(MIB <= g <= 3 * MIB for g in others), line
    assert root >= 6 * MIB, line
