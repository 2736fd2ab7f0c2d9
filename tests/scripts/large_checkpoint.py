"""A checkpoint of a synthetic model of SIZE_MIB, written, killed mid-write and resumed.

    python large_checkpoint.py write RUN_DIR SIZE_MIB        # step 1 whole, then step 2 (killed by the test)
    horovodrun -np 2 python large_checkpoint.py resume RUN_DIR [HIDE_RANK]

``write``: the state is generated from a seed, 64 MiB per tensor; step 1 is written whole and
its tensors' SHA-256 printed; then step 2 is written, and the test kills the process mid-write.
``resume``: every rank resumes through fa_hvd.train.resume.choose (rank HIDE_RANK, if given,
cannot read the run directory and gets the file by chunked broadcast) and prints, after
``RESULT``, the step, the SHA-256 over the loaded tensors' bytes, its peak resident memory and
its resident memory before the checkpoint (torch and Horovod imported).
"""

import hashlib
import json
import resource
import sys
from pathlib import Path

import torch

from fa_hvd import checkpoint

TENSOR = 16 << 20  # float32 elements: 64 MiB


def state(size_mib: int, step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    count = max(1, size_mib * (1 << 20) // (4 * TENSOR))
    return {"format": 1, "step": step,
            "model": {f"layer{i}.weight": torch.randn(TENSOR, generator=generator) for i in range(count)}}


def digest(model: dict) -> str:
    sha = hashlib.sha256()
    for name in sorted(model):
        sha.update(name.encode())
        sha.update(model[name].numpy().tobytes())
    return sha.hexdigest()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def main() -> None:
    mode, run_dir = sys.argv[1], Path(sys.argv[2])
    directory = run_dir / "checkpoints"
    if mode == "write":
        baseline = resident_bytes()
        directory.mkdir(parents=True, exist_ok=True)
        first = state(int(sys.argv[3]), 1)
        checkpoint.write(checkpoint.path_for(directory, 1), first, 1)
        print("RESULT " + json.dumps({"digest": digest(first["model"]), "peak_bytes": peak_bytes(),
                                      "baseline_bytes": baseline}), flush=True)
        del first
        checkpoint.write(checkpoint.path_for(directory, 2), state(int(sys.argv[3]), 2), 2)
        return
    from fa_hvd.comm import get_transport
    from fa_hvd.train import resume

    transport = get_transport("horovod")
    baseline = resident_bytes()
    hide = int(sys.argv[3]) if len(sys.argv) > 3 else None
    if transport.rank == hide:
        real = checkpoint.verify
        checkpoint.verify = lambda path: (real(path) if "fa_hvd-ckpt-" in str(path) else (_ for _ in ()).throw(
            checkpoint.CorruptCheckpoint(f"{path}: cannot be read: not mounted on this rank")))
    lock = resume.RunLock(run_dir) if transport.rank == 0 else None
    loaded, notes = resume.choose(transport, run_dir, "auto", lambda s, p: None, lock)
    result = {"rank": transport.rank, "step": loaded["step"], "digest": digest(loaded["model"]),
              "peak_bytes": peak_bytes(), "baseline_bytes": baseline, "notes": notes}
    del loaded
    if lock is not None:
        lock.release()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
