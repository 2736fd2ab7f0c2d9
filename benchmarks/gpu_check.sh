#!/usr/bin/env bash
# The GPU checks, in one run, on a machine with a CUDA GPU. Writes its results to OUT_DIR
# (default benchmarks/results/gpu): one log per part and JSON lines per benchmark.
#   0. the machine: nvidia-smi, torch, CUDA, cuDNN and Horovod versions (versions.txt);
#   1. tests/test_cuda.py: the rules and the sharded exchange on CUDA tensors against the CPU,
#      fp16/bf16 gradients aggregated in fp32, a handful of device syncs per call;
#   2. fa-hvd-bench aggregators --device cuda at p = 8, 16, 64 and n = 1e6, 2.5e7, 1e8 in fp32
#      (bf16 at p = 8, 64 and n = 2.5e7, 1e8): FA (default and reference), Multi-Krum, median,
#      trimmed mean, geomed and mean, with geometry.gram alone and the floors (mean, fp32 syrk)
#      timed in the same run (--gram-floor: FA's vs_gram; every rule's vs_mean and vs_syrk);
#   3. fa-hvd-train on the GPU with amp bf16 and fp16 (one rank, a small CNN on the embedded
#      digits, FA; benchmarks/gpu_train.yaml): run to the end twice, and resumed from the first
#      run's halfway checkpoint; the parameters' CRC of each (is CUDA bit-deterministic, is the
#      resume exact), with train.deterministic false and true;
#   4. fa-hvd-bench step --device cuda: ResNet-50 at 224 px, batch 64, Horovod's allreduce
#      against fa_hvd (mean, FA; allgather) on one rank per GPU (NCCL will not put two ranks
#      on one GPU, so a one-GPU machine measures p = 1: fa_hvd's own overhead);
#   5. the test suite but its slow multi-rank jobs (pytest -m "not slow"), on this machine's torch.
# Parts 3-5 need Horovod (HOROVOD_GPU_OPERATIONS=NCCL make setup, or benchmarks/gpu_lease.sh on a
# machine without the registries); without it they are skipped with that reason.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]
# Environment: PYTHON (default .venv/bin/python), GPU_CHECK_PARTS (default "0 1 2 3 4 5").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/benchmarks/results/gpu}")
py=${PYTHON:-$root/.venv/bin/python}
parts=" ${GPU_CHECK_PARTS:-0 1 2 3 4 5} "
mkdir -p "$out"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
say() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
part() { [[ $parts == *" $1 "* ]]; }
hvdrun() { "$py" -c 'import sys; from horovod.runner.launch import run_commandline; sys.exit(run_commandline())' "$@"; }

if part 0; then
  say "0. versions"
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi: not available"
    "$py" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); print("gpu", torch.cuda.get_device_name(0), "x", torch.cuda.device_count())'
    "$py" -c 'import horovod, horovod.torch as h; print("horovod", horovod.__version__, "nccl", h.nccl_built())' 2>&1 | tail -1
  } >>"$out/versions.txt" 2>&1
  cat "$out/versions.txt" >&2
fi

if part 1; then
  say "1. tests/test_cuda.py"
  timeout 300 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs >"$out/test_cuda.log" 2>&1
  tail -3 "$out/test_cuda.log" >&2
fi

if part 2; then
  say "2. aggregators on the GPU"
  rules=mean,median,trimmed_mean,multikrum,geomed,flag
  timeout 240 "$py" -m fa_hvd.bench aggregators --device cuda --dtype float32 --n 1e6,2.5e7,1e8 --p 8,16,64 \
      --f 1 --repeats 7 --warmup 2 --rules "$rules" --gram-floor >"$out/aggregators_float32.jsonl" \
      2>"$out/aggregators_float32.log"
  tail -12 "$out/aggregators_float32.log" >&2
  timeout 150 "$py" -m fa_hvd.bench aggregators --device cuda --dtype bfloat16 --n 2.5e7,1e8 --p 8,64 \
      --f 1 --repeats 7 --warmup 2 --rules "$rules" --gram-floor >"$out/aggregators_bfloat16.jsonl" \
      2>"$out/aggregators_bfloat16.log"
  tail -12 "$out/aggregators_bfloat16.log" >&2
fi

if [[ $parts == *" "[345]" "* ]] && ! "$py" -c 'import horovod.torch' 2>/dev/null; then
  say "3-5: skipped: horovod.torch does not import here"
  exit 0
fi

if part 3; then
  say "3. the trainer on CUDA (amp bf16, fp16; train.deterministic false, true), resumed"
  train_case() {  # AMP DETERMINISTIC NAME [ARGS...]: one run, then its summary line
    local amp=$1 det=$2 name=$3; shift 3
    hvdrun -np 1 -H localhost:1 --gloo "$py" -m fa_hvd.train.trainer --config benchmarks/gpu_train.yaml \
        --set train.amp="$amp" --set train.deterministic="$det" --run-dir "$out/train/$name" "$@" \
        >"$out/train/$name.log" 2>&1
    "$py" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[2], s["status"], s["step"], s["params_crc32"], s["final"])' \
        "$out/train/$name/summary.json" "$name" 2>&1
  }
  train_group() {  # AMP DETERMINISTIC: twice from scratch, then resumed from the first run's step 30
    local name=$1-det-$2
    train_case "$1" "$2" "$name-a" --resume never
    train_case "$1" "$2" "$name-b" --resume never
    mkdir -p "$out/train/$name-resumed/checkpoints"
    cp "$out/train/$name-a/checkpoints/step-000000030.ckpt" "$out/train/$name-resumed/checkpoints/"
    train_case "$1" "$2" "$name-resumed" --resume auto
  }
  mkdir -p "$out/train"
  for amp in bf16 fp16; do
    for det in false true; do
      timeout 240 bash -c "$(declare -f say hvdrun train_case train_group); py='$py' out='$out' train_group $amp $det" \
          >"$out/train/group-$amp-$det.txt" 2>&1 &
    done
  done
  wait
  cat "$out"/train/group-*.txt | tee "$out/train_summary.txt" >&2
fi

if part 4; then
  say "4. a ResNet-50 step"
  timeout 180 bash -c "$(declare -f hvdrun); py='$py'; hvdrun -np 1 -H localhost:1 --gloo \"\$py\" -m fa_hvd.bench step \
      --device cuda --model resnet50 --image 224 --num-classes 1000 --batch-size 64 --exchange allgather \
      --rounds 5 --steps 5 --warmup 3 --f 0 --r 1" >"$out/step.jsonl" 2>"$out/step.log"
  tail -3 "$out/step.log" >&2
fi

if part 5; then
  say "5. the suite without its slow jobs"
  timeout 120 "$py" -m pytest -q -p no:cacheprovider -m "not slow" --ignore=tests/test_setup.py \
      >"$out/test_not_slow.log" 2>&1
  tail -3 "$out/test_not_slow.log" >&2
fi
say "done: $out"
