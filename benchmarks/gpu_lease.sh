#!/usr/bin/env bash
# benchmarks/gpu_check.sh on a GPU machine that reaches no package registry and brings its own
# Python with a CUDA build of torch (a lent device, a cluster node with a site-wide torch module).
# Horovod is built there from its source release, given as a file, with NCCL (taken from torch's
# own nvidia-nccl package) and Gloo, without MPI, into a private folder; its build runs while
# the checks that need no Horovod (parts 0-2) use the GPU. Logs and JSON lines end up in one
# tarball.
# Usage: benchmarks/gpu_lease.sh HOROVOD_SDIST OUT_DIR
#   (fetch the source release where a registry is reachable:
#    pip download --no-deps --no-binary :all: horovod==0.28.1 -d DIR)
# Horovod's build needs cffi: wheels of cffi and pycparser for that Python beside the source
# release are installed first (pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 cffi pycparser -d DIR).
# Environment: PYTHON (default python3), FA_HVD_BUILD_JOBS, HOROVOD_BUILD_CUDA_CC_LIST (default 90),
# GPU_LEASE_PARTS (gpu_check.sh's parts run while Horovod builds; default "0 1 2").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sdist=$(realpath "$1")
out=$(realpath -m "$2")
py=${PYTHON:-python3}
work=$(mktemp -d)
site=$work/site
results=$work/results
mkdir -p "$out" "$site" "$results"
say() { printf '[gpu_lease %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
pack() { tar -czf "$out/gpu_results.tgz" -C "$results" --exclude=checkpoints . 2>/dev/null; }  # after each stage

build_horovod() {
  export FA_HVD_ROOT=$root
  # shellcheck source=tools/horovod-build.env
  source "$root/tools/horovod-build.env"
  unset HOROVOD_WITH_MPI
  export HOROVOD_WITHOUT_MPI=1 HOROVOD_GPU_OPERATIONS=NCCL
  # gcc >= 13 no longer brings <string> and <cstdint> in through other headers; Horovod 0.28.1
  # relies on that (horovod/common/group_table.h).
  export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-include string -include cstdint"
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  export CUDA_HOME CUDAToolkit_ROOT=$CUDA_HOME
  nccl_h=$("$py" -c 'import glob, os, nvidia; print(next(iter(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "**", "nccl.h"), recursive=True))), ""))')
  [ -n "$nccl_h" ] || { echo "no nccl.h in the nvidia packages"; return 1; }
  local nccl=$(dirname "$(dirname "$nccl_h")")
  mkdir -p "$work/nccl-lib"
  ln -sf "$(ls "$nccl"/lib/libnccl.so* | head -1)" "$work/nccl-lib/libnccl.so"
  export HOROVOD_NCCL_INCLUDE=$nccl/include HOROVOD_NCCL_LIB=$work/nccl-lib
  echo "CUDA_HOME=$CUDA_HOME NCCL=$nccl"
  "$py" -m pip install -q --no-deps --no-index --target "$site" "$(dirname "$sdist")"/{cffi,pycparser}-*.whl || return 1
  PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$py" -m pip wheel -v --no-deps --no-build-isolation -w "$work/wheel" "$sdist" \
    && "$py" -m pip install -q --no-deps --target "$site" "$work"/wheel/horovod-*.whl
}

say "building Horovod with NCCL in the background (log: horovod_build.log)"
start=$SECONDS
build_horovod >"$results/horovod_build.log" 2>&1 &
build=$!
PYTHON=$py GPU_CHECK_PARTS="${GPU_LEASE_PARTS:-0 1 2}" "$root/benchmarks/gpu_check.sh" "$results"
pack
wait "$build"
status=$?
say "Horovod build: exit $status after $((SECONDS - start)) s"
echo "horovod build exit $status after $((SECONDS - start)) s" >>"$results/versions.txt"
tail -5 "$results/horovod_build.log" >&2
PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH PYTHON=$py GPU_CHECK_PARTS="0 3 4 5" \
  "$root/benchmarks/gpu_check.sh" "$results"
pack
say "results: $out/gpu_results.tgz"
