"""CPU settings for inference: the allocator, the thread layout and the local Dask cluster's shape.

Two facts measured on the development machine (2 cores, see ``benchmarks/RESULTS.md``) shape this module:

- **Allocation.** Every activation tensor of a CNN at batch 16-64 is larger than glibc's mmap threshold, so glibc
  maps each one fresh and the kernel zero-fills it page by page: 40-60 % of a forward pass was page faults. Telling
  glibc never to use mmap for large blocks and never to give freed memory back (``M_MMAP_MAX=0``,
  ``M_TRIM_THRESHOLD`` high) makes the second batch reuse the first batch's pages: 1.5-2.4x. The price is that a
  process keeps its peak heap. :func:`keep_freed_memory` sets it in the running process (the model loader calls it
  on the CPU); :data:`MALLOC_ENV` is the same as environment variables, for processes you start yourself. Dask's
  nanny starts its workers with a setting that stops glibc from adapting at all, so every task of the steps first
  restores glibc's adapted thresholds in its worker (:func:`reuse_freed_memory`: bounded, unlike the model's).
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
_lock = threading.Lock()
_kept = False
_reused = False


def _libc() -> Any:
    """glibc, or None (another C library, or not Linux): the mallopt tunables are glibc's."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # musl and others: no mallopt tunables
    return libc


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
    """Makes glibc's malloc serve blocks of up to 32 MiB from its heap, reusing freed ones, and give memory back to
    the system only when more than 64 MiB is free at the heap's top (idempotent; cheap to call again).

    Those are the thresholds glibc adapts to by itself, and the setting that Dask's nanny switches off: it starts
    every worker process with ``MALLOC_TRIM_THRESHOLD_`` set (``distributed.nanny.pre-spawn-environ``), and glibc
    then keeps its initial 128 KiB mmap threshold, so every larger array (a similarity tile, a shard's normalised
    embeddings) is mapped fresh and zero-filled page by page by the kernel. Measured in such a worker: 98,000 page
    faults and 1.35x the time for 100 products of 1,000 x 512 float32 matrices, against 1,300 in a plain process.
    The steps' worker tasks call this, so the dedup and export passes run as fast in a nanny's worker as in a plain
    process; at most 64 MiB of freed memory stays with the process, unlike :func:`keep_freed_memory` (which, once
    called, wins: it keeps everything). Process-wide; turned off by
    ``DASK_IMGCURATE__CPU__REUSE_FREED_MEMORY=0`` in the workers' environment (a worker reads its own config).

    Returns:
        True when the settings (or :func:`keep_freed_memory`'s) are in force; False on a C library other than glibc
        or when switched off.
    """
    global _reused
    if _reused or _kept:
        return True
    from imgcurate import config

    if not config.get("cpu.reuse_freed_memory", True):
        return False
    with _lock:
        if not (_reused or _kept):
            libc = _libc()
            if libc is None:
                return False
            _reused = bool(libc.mallopt(_M_MMAP_THRESHOLD, _REUSE_MMAP_THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, _REUSE_TRIM_THRESHOLD)
            )
        return _reused or _kept


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
