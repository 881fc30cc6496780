"""CPU settings for inference: the allocator, the thread layout and the local Dask cluster's shape.

Two facts measured on the development machine (2 cores, see ``benchmarks/RESULTS.md``) shape this module:

- **Allocation.** Every activation tensor of a CNN at batch 16-64 is larger than glibc's mmap threshold, so glibc
  maps each one fresh and the kernel zero-fills it page by page: 40-60 % of a forward pass was page faults. Telling
  glibc never to use mmap for large blocks and never to give freed memory back (``M_MMAP_MAX=0``,
  ``M_TRIM_THRESHOLD`` high) makes the second batch reuse the first batch's pages: 1.5-2.4x. The price is that a
  process keeps its peak heap. :func:`keep_freed_memory` sets it in the running process (the model loader calls it
  on the CPU); :data:`MALLOC_ENV` is the same as environment variables, for processes you start yourself. Dask's
  nanny starts its workers with a setting that stops glibc from adapting at all, so every task of the steps first
  restores glibc's adapted thresholds in its worker (:func:`reuse_freed_memory`: the heap's top still goes back).
- **Threads.** With a fixed core budget, independent model calls with one thread each beat one call with all
  threads (1.19x on resnet50 with 2 x 1 against 1 x 2), so a local CPU cluster gets one single-threaded worker
  process per core, and a model call gets ``cores // concurrent calls`` threads (:func:`model_threads`).

Users who launch their own Dask workers should start them with :data:`MALLOC_ENV` in the environment (or rely on the
embedder calling :func:`keep_freed_memory`, which it does unless ``imgcurate.cpu.keep_freed_memory`` is false), and
with ``--nworkers <cores> --nthreads 1``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from typing import Any

__all__ = [
    "MALLOC_ENV",
    "keep_freed_memory",
    "reuse_freed_memory",
    "cpu_count",
    "concurrent_calls",
    "model_threads",
    "local_cluster_kwargs",
]

#: glibc malloc settings as environment variables (read when a process starts): no mmap for large blocks, never trim.
MALLOC_ENV: dict[str, str] = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: :func:`reuse_freed_memory`'s settings: the largest values glibc's own adaptive thresholds reach on 64-bit Linux.
_REUSE_MMAP_THRESHOLD = 32 * 2**20
_REUSE_TRIM_THRESHOLD = 2 * _REUSE_MMAP_THRESHOLD
#: ``MALLOC_TRIM_THRESHOLD_`` as Dask's nanny sets it by default (``distributed.nanny.pre-spawn-environ``).
_NANNY_TRIM_THRESHOLD = "65536"
_lock = threading.Lock()
_kept = False
_reused: bool | None = None  # None: not tried yet in this process


@functools.cache
def _libc() -> Any:
    """glibc, or None (another C library, or not Linux): the mallopt tunables are glibc's. Looked up once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # musl and others: no mallopt tunables
    return libc


def _malloc_chosen(environ: Any = None) -> bool:
    """Whether this process was started with malloc settings of its owner's choosing (:data:`MALLOC_ENV`, or any
    threshold other than the nanny's default trim threshold), which :func:`reuse_freed_memory` leaves alone."""
    env = os.environ if environ is None else environ
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return True
    if any(name in env for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return True
    return env.get("MALLOC_TRIM_THRESHOLD_", _NANNY_TRIM_THRESHOLD) != _NANNY_TRIM_THRESHOLD


def keep_freed_memory() -> bool:
    """Makes glibc's malloc reuse freed large blocks in this process instead of unmapping them (idempotent).

    Process-wide and not undone; called when an embedder loads a model on the CPU, never on import. Turned off by
    ``dask.config.set({"imgcurate.cpu.keep_freed_memory": False})`` (or ``DASK_IMGCURATE__CPU__KEEP_FREED_MEMORY=0``).

    Returns:
        True when the settings are in force (now or from an earlier call); False on a C library other than glibc or
        when switched off.
    """
    global _kept
    from imgcurate import config

    if not config.get("cpu.keep_freed_memory", True):
        return False
    with _lock:
        if _kept:
            return True
        libc = _libc()
        if libc is None:
            return False
        _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        return _kept


def reuse_freed_memory() -> bool:
    """Makes glibc's malloc serve blocks of up to 32 MiB from its heap, reusing freed ones, and give the top of the
    heap back to the system once more than 64 MiB is free there (idempotent; cheap to call again).

    Those are the thresholds glibc adapts to by itself, and the adapting that Dask's nanny switches off: it starts
    every worker process with ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``), and glibc
    then keeps its initial 128 KiB mmap threshold, so every larger array (a similarity tile, a shard's normalised
    embeddings) is mapped fresh and zero-filled page by page by the kernel. Measured in such a worker: 98,000 page
    faults and 1.3-1.5x the time of a plain process (1,300 faults) for 100 products of 1,000 x 512 float32 matrices;
    semantic dedup of 1M rows on two nanny workers 40.6 s instead of 44.4 s (``benchmarks/RESULTS.md``).

    The steps' worker tasks call this. Freed blocks below the heap's top stay with the process for reuse, as in a
    process whose thresholds glibc adapted, so a worker's unmanaged memory can grow past what the nanny's setting
    leaves; :func:`keep_freed_memory` (an embedder on the CPU) goes further and, once called, wins. A process started
    with malloc settings of its own (:data:`MALLOC_ENV`, ``GLIBC_TUNABLES``, or a trim threshold other than the
    nanny's default) is left alone, and so is every process with ``DASK_IMGCURATE__CPU__REUSE_FREED_MEMORY=0`` in
    its environment (a worker reads its own config).

    Returns:
        True when these settings (or :func:`keep_freed_memory`'s) are in force; False otherwise (left alone,
        switched off, or a C library other than glibc).
    """
    global _reused
    if _kept or _reused is not None:
        return _kept or _reused
    from imgcurate import config

    if not config.get("cpu.reuse_freed_memory", True):
        return False
    with _lock:
        if _reused is None and not _kept:
            libc = None if _malloc_chosen() else _libc()
            _reused = (
                libc is not None
                and bool(libc.mallopt(_M_MMAP_THRESHOLD, _REUSE_MMAP_THRESHOLD))
                and bool(libc.mallopt(_M_TRIM_THRESHOLD, _REUSE_TRIM_THRESHOLD))
            )
        return _kept or bool(_reused)


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def concurrent_calls() -> int:
    """How many threads of this process may run a model at the same time, from the Dask scheduler in use.

    A distributed worker runs ``nthreads`` tasks at once; the local threaded scheduler ``num_workers`` (default: the
    cores); the synchronous scheduler one.
    """
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        pass
    import dask

    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    if scheduler in (None, "threads", "threading"):
        return max(1, int(dask.config.get("num_workers", None) or cpu_count()))
    return 1


def model_threads(calls: int | None = None) -> int:
    """Threads for one model call: the cores shared among the calls that run at once.

    In a distributed worker process, ``OMP_NUM_THREADS`` when set (distributed's nanny sets it to 1 for every worker
    it starts, since its sibling worker processes share the cores too).
    """
    if calls is None:
        if _in_distributed_worker() and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            return max(1, int(os.environ["OMP_NUM_THREADS"]))
        calls = concurrent_calls()
    return max(1, cpu_count() // max(1, calls))


def _in_distributed_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def local_cluster_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """``LocalCluster`` keyword arguments for a CPU job: one single-threaded worker process per core unless the spec
    says otherwise, and :data:`MALLOC_ENV` in the workers' environment (their child processes inherit it; the
    workers themselves get the same settings from :func:`keep_freed_memory` when they load a model)."""
    out = dict(spec)
    if "n_workers" not in out and "threads_per_worker" not in out:
        out["n_workers"] = cpu_count()
        out["threads_per_worker"] = 1
    if out.get("processes", True):  # worker processes (a Nanny each) take env; in-process workers do not
        out["env"] = {**MALLOC_ENV, **(out.get("env") or {})}
    return out
