"""Dataframe backends: the one place that knows pandas from cuDF.

A backend is picked by name from the ``imgcurate.backend`` config key (``auto``, ``pandas`` or ``cudf``). Partition
functions receive the backend's *name* (a plain string that pickles cheaply to Dask workers) and look the backend
up with :func:`get_backend` where they run. cuDF is imported only inside :class:`CudfBackend`, so a CPU machine never
imports it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
from typing import Any

import pandas as pd
import pyarrow as pa

from imgcurate import config
from imgcurate.errors import MissingDependencyError

__all__ = [
    "Backend",
    "PandasBackend",
    "CudfBackend",
    "get_backend",
    "resolve_backend_name",
    "gpu_available",
    "with_columns",
]


def _pandas_type(arrow_type: pa.DataType) -> Any:
    """Pandas dtype for an arrow type, chosen so that every partition gets the same dtype whatever its nulls."""
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None  # pyarrow's default conversion


class Backend:
    """Converts between arrow tables and one kind of in-memory frame."""

    name: str = ""
    dask_backend: str = ""

    def from_arrow(self, table: pa.Table) -> Any:
        raise NotImplementedError

    def to_arrow(self, frame: Any) -> pa.Table:
        raise NotImplementedError

    def to_pandas(self, frame: Any) -> pd.DataFrame:
        raise NotImplementedError


class PandasBackend(Backend):
    """pandas frames, with nullable integer and boolean dtypes so that partitions agree with their ``meta``."""

    name = "pandas"
    dask_backend = "pandas"

    def from_arrow(self, table: pa.Table) -> pd.DataFrame:
        return table.to_pandas(types_mapper=_pandas_type)

    def to_arrow(self, frame: pd.DataFrame) -> pa.Table:
        return pa.Table.from_pandas(frame, preserve_index=False)

    def to_pandas(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame


class CudfBackend(Backend):
    """cuDF frames on the GPU. Imports cudf on first use only."""

    name = "cudf"
    dask_backend = "cudf"

    @functools.cached_property
    def _cudf(self):
        try:
            import cudf
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise MissingDependencyError("the cudf backend", "cudf-cu12", extra="gpu") from err
        return cudf

    def from_arrow(self, table: pa.Table) -> Any:
        return self._cudf.DataFrame.from_arrow(table)

    def to_arrow(self, frame: Any) -> pa.Table:
        if isinstance(frame, pd.DataFrame):
            return pa.Table.from_pandas(frame, preserve_index=False)
        return frame.to_arrow(preserve_index=False)

    def to_pandas(self, frame: Any) -> pd.DataFrame:
        if isinstance(frame, pd.DataFrame):
            return frame
        return frame.to_pandas()


_BACKENDS: dict[str, type[Backend]] = {"pandas": PandasBackend, "cudf": CudfBackend}


def gpu_available() -> bool:
    """True when an NVIDIA GPU is visible, checked without importing CUDA libraries."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return pathlib.Path("/proc/driver/nvidia/version").exists() or pathlib.Path("/dev/nvidia0").exists()


def resolve_backend_name(name: str | None = None) -> str:
    """Turns ``None`` (the config) or ``auto`` into ``pandas`` or ``cudf``.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    name = name or config.get("backend", "auto")
    if name == "auto":
        return "cudf" if gpu_available() and importlib.util.find_spec("cudf") is not None else "pandas"
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of auto, {', '.join(_BACKENDS)}")
    return name


def get_backend(name: str | None = None) -> Backend:
    """The backend object for a name (``None``/``auto`` resolved from the config at each call)."""
    return _backend_instance(resolve_backend_name(name))


@functools.cache
def _backend_instance(name: str) -> Backend:
    return _BACKENDS[name]()


def with_columns(part: Any, columns: dict[str, Any], arrow_types: dict[str, pa.DataType] | None = None) -> Any:
    """``part`` (a pandas or cuDF partition, or its empty ``meta``) with ``columns`` added or replaced.

    Values are pandas Series or arrays with one value per row, in row order (a Series' own index is ignored). For a
    cuDF partition only the new columns travel: they go through arrow, with ``arrow_types`` for the columns whose
    type pandas cannot say (lists of floats), and are set on a shallow copy of the partition.
    """
    if isinstance(part, pd.DataFrame):
        return part.assign(**{k: v.set_axis(part.index) if isinstance(v, pd.Series) else v for k, v in columns.items()})
    from imgcurate.io.export import partition_to_arrow

    new = pd.DataFrame({k: v.reset_index(drop=True) if isinstance(v, pd.Series) else v for k, v in columns.items()})
    extra = get_backend("cudf").from_arrow(partition_to_arrow(new, arrow_types))
    out = part.copy(deep=False)
    extra.index = out.index
    for name in extra.columns:
        out[name] = extra[name]
    return out
