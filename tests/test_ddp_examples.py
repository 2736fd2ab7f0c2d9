"""DDP scripts in the shape of PyTorch's own, unchanged but for the one line that registers
fa_hvd.ddp's hook, under torchrun on 4 ranks (Gloo) with tiny data made here: PyTorch's
examples/distributed/ddp example and torchvision's classification reference (ImageFolder,
resnet18, BatchNorm buffers, a DistributedSampler, evaluation and checkpoints). Rank 3 sends
Gaussian noise (FA_HVD_FAULTS, read by the hook as by fa_hvd.wrap); the scripts run to the end and
every rank holds the same parameters."""

import re

import pytest
from PIL import Image

from conftest import SCRIPTS, launch, output

pytestmark = pytest.mark.slow

FAULTS = {"FA_HVD_FAULTS": "[{kind: gaussian, ranks: [3], params: {sigma: 100.0}}]"}


def _checksums(proc) -> dict[int, str]:
    return {int(rank): crc for rank, crc in re.findall(r"PARAMS rank (\d+) crc ([0-9a-f]{8})", proc.stdout)}


def _check(proc):
    assert proc.returncode == 0, output(proc)
    crcs = _checksums(proc)
    assert sorted(crcs) == [0, 1, 2, 3] and len(set(crcs.values())) == 1, crcs
    assert "rank 3: injecting gaussian" in proc.stdout + proc.stderr, output(proc)


def test_pytorchs_ddp_example_with_the_hook():
    _check(launch("torchrun", 4, ["python", str(SCRIPTS / "ddp_example_style.py"), "--local_world_size", "4"],
                  env=FAULTS))


def test_torchvisions_classification_reference_with_the_hook(tmp_path):
    for split, count in (("train", 8), ("val", 4)):
        for label in ("cat", "dog"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                shade = (40 if label == "cat" else 200) + 3 * i
                Image.new("RGB", (32, 32), (shade, 255 - shade, i * 20)).save(folder / f"{i}.png")
    proc = launch("torchrun", 4, ["python", str(SCRIPTS / "tv_reference_style.py"), "--data-path",
                                  str(tmp_path / "data"), "--model", "resnet18", "-b", "2", "--epochs", "2",
                                  "--lr", "0.01", "--output-dir", str(tmp_path), "--print-freq", "1"], env=FAULTS)
    _check(proc)
    assert proc.stdout.count("Test:  Acc@1") == 2 * 4 and (tmp_path / "checkpoint.pth").exists(), output(proc)
