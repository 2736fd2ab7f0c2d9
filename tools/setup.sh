#!/usr/bin/env bash
# Idempotent set-up of everything fa_hvd needs on a Debian machine:
#   1. an MPI (Debian's openmpi-bin, libopenmpi-dev) when mpirun is missing;
#   2. a virtual environment .venv with tools/requirements.txt;
#   3. horovod==0.28.1 built with PyTorch, MPI and Gloo (settings in
#      tools/horovod-build.env), its wheel cached by torch version;
#   4. fa_hvd itself in editable mode.
# A stamp in .venv records what was set up; when nothing changed a rerun takes
# a second or two. Environment: FA_HVD_CACHE (wheel cache, default
# ~/.cache/fa_hvd), HOROVOD_GPU_OPERATIONS=NCCL for a GPU build, PYTHON.
set -euo pipefail

FA_HVD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FA_HVD_ROOT
cd "$FA_HVD_ROOT"
VENV="$FA_HVD_ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
CACHE="${FA_HVD_CACHE:-$HOME/.cache/fa_hvd}"
HOROVOD_VERSION=0.28.1
STAMP="$VENV/.fa_hvd-setup"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# The Horovod flavour: nccl when HOROVOD_GPU_OPERATIONS=NCCL, cpu when it is set to
# anything else; unset, the flavour of the last set-up stays (so a later plain
# `make test` keeps an NCCL build).
FLAVOUR_FILE="$VENV/.fa_hvd-flavour"
if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then
  flavour=$([ "$HOROVOD_GPU_OPERATIONS" = NCCL ] && echo nccl || echo cpu)
elif [ -f "$FLAVOUR_FILE" ]; then
  flavour="$(cat "$FLAVOUR_FILE")"
else
  flavour="cpu"
fi
fingerprint="$(cat tools/requirements.txt tools/horovod-build.env tools/horovod-build.cmake \
  tools/setup.sh pyproject.toml | sha256sum | cut -c1-16)-$flavour"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ] && command -v mpirun >/dev/null \
   && "$PY" -c "import horovod.torch, fa_hvd" 2>/dev/null; then
  say "up to date (.venv, horovod $HOROVOD_VERSION, $(mpirun --version 2>/dev/null | head -1))"
  exit 0
fi

# --- what a build needs, checked up front ------------------------------------
missing=()
for tool in "$PYTHON" g++ make cmake; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (a C++ compiler, make and CMake >= 3.13 are needed to build Horovod)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" --version 2>&1); fa_hvd needs Python >= 3.11 (pyproject.toml: requires-python)"

# --- 1. MPI ------------------------------------------------------------------
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null; then
  command -v apt-get >/dev/null \
    || die "no MPI (mpirun/mpicxx) and no apt-get to install one: install Open MPI or MPICH with its development headers, then rerun"
  say "installing Open MPI with apt-get"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi
# Open MPI refuses to run as root unless told it is fine (containers, CI).
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# --- 2. virtual environment ----------------------------------------------------
if [ ! -x "$PY" ]; then
  say "creating .venv"
  "$PYTHON" -m venv "$VENV"
fi
say "installing Python packages (tools/requirements.txt)"
"$PY" -m pip install -q --disable-pip-version-check -r tools/requirements.txt

# --- 3. Horovod -----------------------------------------------------------------
torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
wheel_dir="$CACHE/horovod-$HOROVOD_VERSION-torch$torch_version-$py_tag-$flavour"
want_nccl=$([ "$flavour" = nccl ] && echo True || echo False)
if ! "$PY" -c "import horovod, horovod.torch as h
assert horovod.__version__ == '$HOROVOD_VERSION' and bool(h.nccl_built()) == $want_nccl" 2>/dev/null; then
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheel_dir"
    log="$wheel_dir/build.log"
    say "building horovod $HOROVOD_VERSION against torch $torch_version ($flavour; a few minutes; log: $log)"
    # shellcheck source=tools/horovod-build.env
    source tools/horovod-build.env
    if [ "$flavour" = nccl ] && [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-}" ]; then
      # No NCCL named: use the one torch brought (nvidia-nccl-*), which ships only libnccl.so.2.
      nccl_pkg="$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)"
      [ -f "$nccl_pkg/include/nccl.h" ] \
        || die "HOROVOD_GPU_OPERATIONS=NCCL: set HOROVOD_NCCL_HOME (or HOROVOD_NCCL_INCLUDE and HOROVOD_NCCL_LIB)"
      mkdir -p "$wheel_dir/nccl-lib"
      ln -sf "$nccl_pkg/lib/libnccl.so.2" "$wheel_dir/nccl-lib/libnccl.so"
      export HOROVOD_NCCL_INCLUDE="$nccl_pkg/include" HOROVOD_NCCL_LIB="$wheel_dir/nccl-lib"
      say "NCCL from $nccl_pkg"
    fi
    if ! "$PY" -m pip wheel -v --no-cache-dir --no-deps --no-build-isolation --no-binary horovod \
         -w "$wheel_dir/tmp" "horovod==$HOROVOD_VERSION" >"$log" 2>&1; then
      tail -n 40 "$log" >&2
      rm -rf "$wheel_dir/tmp"
      die "the Horovod build failed; the last 40 lines are above, the whole log is $log"
    fi
    mv "$wheel_dir"/tmp/horovod-*.whl "$wheel_dir"/ && rm -rf "$wheel_dir/tmp"
  fi
  say "installing cached horovod wheel from $wheel_dir"
  "$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
fi

# --- 4. fa_hvd itself -------------------------------------------------------------
say "installing fa_hvd (editable)"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

"$VENV/bin/horovodrun" --check-build | sed -n '/Available/,$p' | tr -s ' \n' ' ' | sed 's/^/[setup] horovod: /'; echo
echo "$flavour" >"$FLAVOUR_FILE"
echo "$fingerprint" >"$STAMP"
say "done"
