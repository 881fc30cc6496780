"""The one device rule: whether work runs on a GPU, decided once per process, by running an operation there.

``auto`` means a GPU only when a tiny operation on it succeeds: a CUDA tensor operation for torch (the embedders,
the classifiers, the decoders), and a tiny cuDF operation for the RAPIDS libraries (the cudf backend). A driver that
is visible but unusable (for example older than the installed CUDA build needs) therefore means the CPU, with a
warning that says why, never a GPU path that fails half way through a job. Nothing here imports a GPU library unless
a GPU driver is visible.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import warnings

__all__ = ["driver_visible", "torch_cuda_usable", "cudf_usable", "gpu_available", "resolve_device"]


def driver_visible() -> bool:
    """True when an NVIDIA driver and device are visible to this process (checked without importing anything)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return pathlib.Path("/proc/driver/nvidia/version").exists() or pathlib.Path("/dev/nvidia0").exists()


@functools.cache
def torch_cuda_usable() -> bool:
    """True when torch runs an operation on the GPU here (decided once per process)."""
    if not driver_visible() or importlib.util.find_spec("torch") is None:
        return False
    import torch

    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is false (the driver may be older than this torch's CUDA)")
        ok = int(torch.ones(2, device="cuda").sum().item()) == 2
    except Exception as err:  # noqa: BLE001 - any failure means: not usable, said once
        warnings.warn(f"a GPU driver is visible but torch cannot use it ({err}); running on the CPU", stacklevel=2)
        return False
    return ok


@functools.cache
def cudf_usable() -> bool:
    """True when cuDF is installed and runs an operation on the GPU here (decided once per process)."""
    if not driver_visible() or importlib.util.find_spec("cudf") is None:
        return False
    try:
        import cudf

        ok = int(cudf.Series([1, 1]).sum()) == 2
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"cudf is installed but cannot use the GPU ({err}); using the pandas backend", stacklevel=2)
        return False
    return ok


def gpu_available() -> bool:
    """True when torch can run on a GPU here (the answer every ``auto`` device choice uses)."""
    return torch_cuda_usable()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; other names are returned as given."""
    if device != "auto":
        return device
    return "cuda" if gpu_available() else "cpu"
