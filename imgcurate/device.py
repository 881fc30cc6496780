"""The one device rule: whether work runs on a GPU, decided once per process, by running an operation there.

``auto`` means a GPU only when a tiny operation on it succeeds: a CUDA tensor operation for torch (the embedders,
the classifiers, the decoders), and a tiny cuDF operation for the RAPIDS libraries (the cudf backend). A driver that
is visible but unusable (for example older than the installed CUDA build needs) therefore means the CPU, with a
warning that says why, never a GPU path that fails half way through a job. Nothing here imports a GPU library unless
a GPU driver is visible.

Every caller asks here: :func:`resolve_device` (embedders, classifiers, the estimate), :func:`gpu_available`
(semantic dedup's similarity tiles), :func:`cudf_usable` (the ``auto`` backend), :func:`workers_have_distinct_gpus`
(the KMeans backend) and :mod:`imgcurate.doctor`, which prints the same answers with their reasons.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import re
import warnings
from typing import Any

__all__ = [
    "driver_visible",
    "driver_version",
    "driver_hint",
    "torch_cuda_problem",
    "torch_cuda_usable",
    "cudf_problem",
    "cudf_usable",
    "gpu_available",
    "resolve_device",
    "workers_have_distinct_gpus",
    "worker_gpu",
]

_DRIVER_FILE = "/proc/driver/nvidia/version"
#: The oldest Linux driver of each CUDA major version (NVIDIA's CUDA toolkit release notes, minor version
#: compatibility): a CUDA 13 build needs driver 580 or newer, a CUDA 12 build 525 or newer.
MIN_DRIVER = {12: 525, 13: 580}


def driver_visible() -> bool:
    """True when an NVIDIA driver and device are visible to this process (checked without importing anything)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return pathlib.Path(_DRIVER_FILE).exists() or pathlib.Path("/dev/nvidia0").exists()


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. ``"580.65.06"``) read from ``/proc``, or None when unknown."""
    try:
        text = pathlib.Path(_DRIVER_FILE).read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text) or re.search(
        r"\s(\d{3,}\.\d+(?:\.\d+)?)\s", text
    )
    return found.group(1) if found else None


def driver_hint(cuda_version: str | None) -> str:
    """Why a visible driver may not run a build for ``cuda_version`` (``"13.0"``), or ``""`` when it should."""
    driver = driver_version()
    if not driver or not cuda_version:
        return ""
    try:
        major, need = int(str(cuda_version).split(".")[0]), int(driver.split(".")[0])
    except ValueError:
        return ""
    floor = MIN_DRIVER.get(major)
    if floor is not None and need < floor:
        return (
            f"; the NVIDIA driver {driver} is older than CUDA {cuda_version} needs (driver >= {floor}): update the "
            f"driver, or install the CUDA {_newest_cuda(need)} builds of torch and the GPU extra"
        )
    return ""


def _newest_cuda(driver_major: int) -> str:
    """The newest CUDA major version a driver of ``driver_major`` runs."""
    fits = [major for major, floor in MIN_DRIVER.items() if driver_major >= floor]
    return str(max(fits)) if fits else "11"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def torch_cuda_visible_problem(index: int = 0) -> str | None:
    """None when torch sees a GPU of ``index`` here, else why not; unlike :func:`torch_cuda_problem` it runs
    nothing on the GPU, so no CUDA context is made in this process (a client that starts GPU workers next)."""
    return _torch_cuda(run=False, index=index)


@functools.cache
def torch_cuda_problem() -> str | None:
    """None when torch runs an operation on the GPU here, else why not (decided once per process)."""
    return _torch_cuda(run=True)


def _torch_cuda(run: bool, index: int = 0) -> str | None:
    """Why torch cannot use the GPU of ``index`` here (None when it can): with ``run``, a tensor sum on it."""
    if not driver_visible():
        return "no NVIDIA driver is visible"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is false")
        count = None if run else torch.cuda.device_count()
        if run and int(torch.ones(2, device="cuda").sum().item()) != 2:
            raise RuntimeError("a CUDA tensor sum gave a wrong answer")
    except Exception as err:  # noqa: BLE001 - any failure means: not usable, with the reason
        return f"torch {torch.__version__} cannot use the GPU ({_first_line(err)}){driver_hint(torch.version.cuda)}"
    if count is not None and index >= count:
        return f"torch sees {count} GPU(s), not one of index {index}"
    return None


@functools.cache
def torch_cuda_usable() -> bool:
    """True when torch runs an operation on the GPU here; warns once why not when a driver is visible."""
    problem = torch_cuda_problem()
    if problem is not None and driver_visible():
        warnings.warn(f"a GPU driver is visible but {problem}; running on the CPU", stacklevel=2)
    return problem is None


def _cudf_cuda_version() -> str | None:
    """The CUDA major version of the installed cuDF wheel (``cudf-cu13`` -> ``"13"``), from its metadata."""
    from importlib import metadata

    for major in sorted(MIN_DRIVER, reverse=True):
        try:
            metadata.version(f"cudf-cu{major}")
        except metadata.PackageNotFoundError:
            continue
        return str(major)
    return None


@functools.cache
def cudf_problem() -> str | None:
    """None when cuDF is installed and runs an operation on the GPU here, else why not (once per process)."""
    if not driver_visible():
        return "no NVIDIA driver is visible"
    if importlib.util.find_spec("cudf") is None:
        return "cudf is not installed (pip install 'imgcurate[gpu]')"
    try:
        import cudf

        if int(cudf.Series([1, 1]).sum()) != 2:
            raise RuntimeError("a cuDF sum gave a wrong answer")
    except Exception as err:  # noqa: BLE001
        return f"cudf cannot use the GPU ({_first_line(err)}){driver_hint(_cudf_cuda_version())}"
    return None


@functools.cache
def cudf_usable() -> bool:
    """True when cuDF runs an operation on the GPU here; warns once why not when it is installed."""
    problem = cudf_problem()
    if problem is not None and driver_visible() and importlib.util.find_spec("cudf") is not None:
        warnings.warn(f"{problem}; using the pandas backend", stacklevel=2)
    return problem is None


def gpu_available() -> bool:
    """True when torch can run on a GPU here (the answer every ``auto`` device choice uses)."""
    return torch_cuda_usable()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; other names are returned as given."""
    if device != "auto":
        return device
    return "cuda" if gpu_available() else "cpu"


# ---------------------------------------------------------------------------------------------------- workers
def worker_gpu() -> str | None:
    """The GPU this process uses by default, as a string that names one physical device, or None without a driver.

    CUDA numbers devices within ``CUDA_VISIBLE_DEVICES``, so device 0 of a process is that list's first entry
    (dask-cuda gives each worker a rotated list, ``"1,2,3,0"`` and so on). An index is turned into the device's UUID
    with NVML when ``nvidia-ml-py`` is installed (it comes with dask-cuda), so ``"0"`` and ``"GPU-..."`` for the same
    card agree; without NVML the entry itself is the answer. Runs on a Dask worker through ``client.run``.
    """
    if not driver_visible():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible else "0"
    if first.isdigit():
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(int(first)))
            finally:
                pynvml.nvmlShutdown()
            return uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        except Exception:  # noqa: BLE001 - NVML missing or failing: the index still names the device
            return first
    return first


def workers_have_distinct_gpus(client: Any) -> bool:
    """True when every worker of a distributed ``client`` has a GPU and no two share one (dask-cuda's layout).

    cuML's multi-GPU estimators start one NCCL rank per worker, and NCCL refuses two ranks on one GPU, which is what
    a plain ``LocalCluster`` of several workers on a one-GPU machine gives. A single worker with a GPU counts as
    distinct. None (no client), no workers, or any worker without a GPU: False.
    """
    if client is None:
        return False
    try:
        gpus = client.run(worker_gpu)
    except Exception as err:  # noqa: BLE001 - a client that cannot reach its workers cannot run cuml-dask either
        warnings.warn(f"could not ask the Dask workers for their GPUs ({_first_line(err)})", stacklevel=2)
        return False
    values = list(gpus.values())
    return bool(values) and None not in values and len(set(values)) == len(values)
