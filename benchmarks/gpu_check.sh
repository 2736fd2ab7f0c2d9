#!/usr/bin/env bash
# The GPU checks, in one run, on a machine with CUDA GPUs and the NCCL flavour of the set-up
# (HOROVOD_GPU_OPERATIONS=NCCL make setup). Writes JSON lines under benchmarks/results/.
#   1. tests/test_cuda.py: the rules and the sharded exchange on CUDA tensors against the CPU,
#      fp16/bf16 gradients aggregated in fp32, at most a handful of device syncs per call
#      whatever the number of IRLS iterations.
#   2. fa-hvd-bench aggregators --device cuda at n = 1e6, 1e7, 1e8 and p = 8, 16, 64
#      (fp32; G is 25.6 GB at n = 1e8, p = 64), and FA against the Gram product alone
#      (--gram-floor) at n = 2.5e7 (ResNet-50), p = 64: the goal is FA under 5 ms there.
#   3. fa-hvd-bench step: ResNet-50 on synthetic ImageNet-sized data (3 x 224 x 224, batch
#      32 per GPU), one process per GPU (NCCL), Horovod's allreduce vs fa_hvd in allgather
#      and sharded mode.
# Usage: benchmarks/gpu_check.sh [GPUS]   (default: every visible GPU)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/benchmarks/results
bin=$root/.venv/bin
export PATH=$bin:$PATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
gpus=${1:-$("$bin/python" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$gpus" -lt 1 ]; then echo "gpu_check: no CUDA GPU visible" >&2; exit 1; fi
mkdir -p "$out"
host=$(hostname)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed "s/^/gpu: /" >&2 || true
"$bin/horovodrun" --check-build >&2

echo "== 1. CUDA tests ==" >&2
"$bin/python" -m pytest -q "$root/tests/test_cuda.py" -rs

echo "== 2. aggregators on the GPU ==" >&2
"$bin/fa-hvd-bench" aggregators --device cuda --n 1e6,1e7,1e8 --p 8,16,64 --repeats 5 --warmup 2 \
    --rules mean,median,trimmed_mean,krum,multikrum,bulyan,geomed,cclip,nmean,flag \
    >"$out/gpu_aggregators_$host.jsonl"
"$bin/fa-hvd-bench" aggregators --device cuda --n 2.5e7 --p 64 --repeats 9 --warmup 2 \
    --rules flag --gram-floor >"$out/gpu_flag_floor_$host.jsonl"

echo "== 3. a ResNet-50 step on $gpus GPU(s) ==" >&2
"$bin/horovodrun" -np "$gpus" -H "localhost:$gpus" fa-hvd-bench step --device cuda --model resnet50 \
    --image 224 --num-classes 1000 --batch-size 32 --exchange allgather,sharded --rounds 5 --steps 5 --warmup 3 \
    >"$out/gpu_step_$host.jsonl"
echo "results: $out/gpu_*_$host.jsonl" >&2
