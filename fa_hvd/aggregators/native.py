"""Sorting networks compiled to C: every comparator of a column in registers, ``G`` read once.

The eager path (:mod:`.selection`) runs each comparator of a network as torch
operations over a cache-sized block, some 17 passes over the block for a median
of 15. Here the pruned network for the rule's sorted positions, followed by the
rule's reduction (:class:`.selection.Reduction`), becomes straight-line C (one local
variable per wire, ``min``/``max`` per comparator) inside a loop over the columns,
which the C compiler vectorises: each column's values stay in registers, ``G`` is
read once and the result written once.

Each network is compiled on first use with the system's C compiler (``CC``,
default ``cc``; the set-up already needs one for Horovod), ``-O3 -march=native``,
into ``$FA_HVD_CACHE/kernels`` (default ``~/.cache/fa_hvd``), named by a hash of its
code and of this CPU's flags (a home directory shared by different nodes keeps one
build per CPU kind), and loaded with ``ctypes``, which releases the GIL during the
call. If it cannot be built, or ``FA_HVD_NATIVE=0``, the rules use the eager torch
path and say so once; so do every other rank's (:func:`agree`, at start-up and after each
elastic reset), as the compiled Gram (:mod:`.native_gram`) is not bit-identical to BLAS's.
CPU, fp32 and fp64. A network's input is finite (robust rules
drop non-finite rows), which a *checked* network (:func:`run`'s ``checked``) tests in
the same pass: it also sums each column's values and subtracts ``s - s`` (``+0`` for a
finite sum, NaN otherwise: a NaN or +/-Inf value propagates through any sum) from the
result, which leaves a result unchanged bit for bit (``x - (+0) = x`` for every ``x``,
``-0`` included) and says whether every sum was finite. So a rule reads ``G`` once
when its rows are clean, and checks them row by row only when a sum was not
(a non-finite value, or finite values whose sum overflowed). Min and max are exact
and each reduction does the eager path's arithmetic in the same order
(``-ffp-contract=off``: no fused multiply-adds), so the results are the eager
path's (up to the sign of a zero).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_log = logging.getLogger("fa_hvd")
_TYPES = {torch.float32: "float", torch.float64: "double"}
MIN_COLUMNS_PER_THREAD = 1 << 14


_everywhere: bool | None = None  # agree(): whether every rank of the run can use the kernels (None: not asked)


def enabled() -> bool:
    """Whether the compiled kernels may run: ``FA_HVD_NATIVE`` is not ``0`` and no :func:`agree` said otherwise."""
    return os.environ.get("FA_HVD_NATIVE", "1") != "0" and _everywhere is not False


def usable_here() -> bool:
    """Whether this process can run the compiled kernels (switch on, a compiler that works), whatever
    the other ranks can: what each rank tells the others before :func:`agree`."""
    return os.environ.get("FA_HVD_NATIVE", "1") != "0" and _compiler_works()


def agree(everyone: list[bool]) -> bool:
    """Take the compiled kernels only if every rank can (``everyone``: :func:`usable_here` of each
    rank of the run, the same list on every rank). The compiled Gram and BLAS's differ in their last
    bits, so ranks on different paths would compute different aggregates; a run where some rank
    cannot compile takes the torch path on every rank. Called again when the world changes (a rank
    that left may have been the one without a compiler). Returns the decision."""
    global _everywhere
    _everywhere = all(everyone)
    return _everywhere


def supports(G: torch.Tensor) -> bool:
    """Whether compiled networks can read ``G``: a CPU fp32/fp64 matrix with unit column stride."""
    return enabled() and G.device.type == "cpu" and G.dtype in _TYPES and G.stride(1) == 1 and _compiler_works()


def source(network, p: int, reduction, ctype: str, checked: bool = False) -> str:
    """C code: ``network`` (:class:`.selection.Comparator` s) on ``p`` wires, then ``reduction``'s C form.

    ``checked``: the function also takes an ``int32_t *`` set to 1 when some column's sum
    was not finite (module docstring), else 0.
    """
    flag = ", int32_t *restrict nonfinite" if checked else ""
    lines = [
        "#include <stdint.h>",
        "#include <math.h>",
        f"void network(const {ctype} *const *rows, {ctype} *restrict out, int64_t n{flag}) {{",
        *[f"  const {ctype} *restrict r{i} = rows[{i}];" for i in range(p)],
        *(["  int32_t bad = 0;"] if checked else []),
        "#pragma GCC ivdep",
        "  for (int64_t j = 0; j < n; ++j) {",
        *[f"    {ctype} w{i} = r{i}[j];" for i in range(p)],
        f"    {ctype} t, result;",
    ]
    if checked:
        lines += [f"    {ctype} s = {' + '.join(f'w{i}' for i in range(p))};", "    s = s - s;", "    bad |= s != s;"]
    for c in network:
        a, b = f"w{c.low}", f"w{c.high}"
        if c.min_needed and c.max_needed:
            lines.append(f"    t = {b} < {a} ? {b} : {a}; {b} = {b} > {a} ? {b} : {a}; {a} = t;")
        elif c.min_needed:
            lines.append(f"    {a} = {b} < {a} ? {b} : {a};")
        else:
            lines.append(f"    {b} = {b} > {a} ? {b} : {a};")
    lines += ["    " + line for line in reduction.c([f"w{k}" for k in reduction.positions], ctype)]
    lines += ["    out[j] = result - s;" if checked else "    out[j] = result;", "  }",
              *(["  *nonfinite = bad;"] if checked else []), "}", ""]
    return "\n".join(lines)


def run(network, p: int, reduction, rows: list[torch.Tensor], out: torch.Tensor, checked: bool = False) -> bool:
    """``out[j]`` = ``reduction`` of the sorted column ``j`` of ``rows`` (equal-length, contiguous).

    With ``checked``, False when some column's sum was not finite (a NaN or +/-Inf
    value, or an overflow; that column of ``out`` is NaN), else True; always True
    without. With ``torch.get_num_threads() > 1`` the columns are split between that
    many threads, as torch's own operations would use them.
    """
    function = _function(network, p, reduction, rows[0].dtype, checked)
    n = rows[0].numel()
    threads = max(1, min(torch.get_num_threads(), n // MIN_COLUMNS_PER_THREAD))
    bounds = [n * t // threads for t in range(threads + 1)]
    flags = (ctypes.c_int32 * threads)()

    def call(t: int) -> None:
        start, stop, step = bounds[t], bounds[t + 1], rows[0].element_size()
        row_ptrs = (ctypes.c_void_p * p)(*[r.data_ptr() + start * step for r in rows])
        flag = (ctypes.byref(flags, 4 * t),) if checked else ()
        function(row_ptrs, ctypes.c_void_p(out.data_ptr() + start * step), ctypes.c_int64(stop - start), *flag)

    if threads == 1:
        call(0)
    else:
        list(_pool(threads).map(call, range(threads)))
    return not any(flags)


@functools.lru_cache(maxsize=None)
def _function(network, p: int, reduction, dtype: torch.dtype, checked: bool):
    return function(source(network, p, reduction, _TYPES[dtype], checked), "network")


def function(code: str, name: str, extra_flags: tuple[str, ...] = ()):
    """The C function ``name`` (returning ``void``) of ``code``, compiled once with :func:`_flags` and
    ``extra_flags`` (see :func:`_built`)."""
    found = getattr(ctypes.CDLL(str(_built(code, extra_flags))), name)
    found.restype = None
    return found


def cache_dir() -> Path:
    return Path(os.environ.get("FA_HVD_CACHE", Path.home() / ".cache" / "fa_hvd")) / "kernels"


def _flags() -> list[str]:
    return ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]


COMPILE_TIMEOUT = 120
"""Seconds one kernel may take to compile before the build is stopped (and its compiler processes killed)."""


def _built(code: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library of ``code``, compiled once per code, compiler flags and CPU kind."""
    flags = [*_flags(), *extra_flags]
    key = hashlib.sha256("\n".join([code, *flags, sys.platform, _cpu()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"network-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: ranks may build at once
            c_file, built = Path(tmp) / "network.c", Path(tmp) / target.name
            c_file.write_text(code)
            _compile([os.environ.get("CC", "cc"), *flags, "-o", str(built), str(c_file)])
            os.replace(built, target)
    return target


def _compile(command: list[str]) -> None:
    """Run the compiler; on :data:`COMPILE_TIMEOUT` kill its whole process group (``cc`` runs ``cc1``, which a
    kill of ``cc`` alone leaves running) and raise :class:`subprocess.TimeoutExpired`."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command, out, err)


@functools.lru_cache(maxsize=1)
def _cpu() -> str:
    """This CPU's model and flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    return {flag for line in _cpu().splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@functools.lru_cache(maxsize=1)
def _compiler_works() -> bool:
    """Whether a tiny network compiles and loads here (checked once; a warning if not)."""
    from .median import middle_values

    try:
        ctypes.CDLL(str(_built(source((), 1, middle_values(1), "float"))))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        _log.warning("fa_hvd: compiled sorting networks unavailable (%s %s); median, trimmed_mean and bulyan "
                     "use the slower torch path", exc, detail.decode(errors="replace")[-300:])
        return False
    return True


@functools.lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fa_hvd_network")
