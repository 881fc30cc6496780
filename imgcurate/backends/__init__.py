"""Dataframe backends: the one place that knows pandas from cuDF.

A backend is picked by name from the ``imgcurate.backend`` config key (``auto``, ``pandas`` or ``cudf``). Partition
functions receive the backend's *name* (a plain string that pickles cheaply to Dask workers) or look the backend up
from the partition itself with :func:`backend_of`. cuDF is imported only inside :class:`CudfBackend`, so a CPU
machine never imports it.

Every conversion between frames, arrow tables, host arrays and embedding matrices lives here, so that steps never
branch on the frame type:

- :func:`to_arrow` / :func:`from_arrow`: a partition to an arrow table with declared column types, and back.
- :func:`with_columns`: a partition with new columns (numpy arrays, pandas Series or arrow arrays), only the new
  columns travelling to the GPU on cuDF.
- :func:`embedding_array` / :func:`embedding_matrix`: embeddings are ONE arrow type on both backends, a fixed-size list
  of float32 (``pa.list_(pa.float32(), dim)``, :func:`embedding_type`); a partition's embeddings become a
  ``(rows, dim)`` float32 matrix in one vectorised call. On pandas the column's dtype is ``pd.ArrowDtype`` of that
  type. cuDF holds it as a list column (its arrow import maps fixed-size lists to lists); :func:`to_arrow` gives it
  back its fixed size from the declared type.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from imgcurate import config
from imgcurate.errors import MissingDependencyError

__all__ = [
    "Backend",
    "PandasBackend",
    "CudfBackend",
    "get_backend",
    "backend_of",
    "host_index",
    "on_gpu",
    "resolve_backend_name",
    "gpu_available",
    "to_arrow",
    "from_arrow",
    "to_pandas",
    "empty_frame",
    "with_columns",
    "embedding_type",
    "embedding_array",
    "embedding_matrix",
    "is_embedding_type",
    "arrow_type_of",
    "not_embeddings",
]


# ---------------------------------------------------------------------------------------------------- embeddings
def embedding_type(dim: int) -> pa.DataType:
    """The arrow type of an embedding column: a fixed-size list of ``dim`` float32."""
    return pa.list_(pa.float32(), int(dim))


def is_embedding_type(arrow_type: pa.DataType) -> bool:
    """True for list types of floats (fixed size or not), the types an embedding column may have."""
    if pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return pa.types.is_floating(arrow_type.value_type)
    return False


def arrow_type_of(dtype: Any) -> pa.DataType | None:
    """The arrow type a column's dtype holds, on either backend, or None where the dtype does not say (object
    columns: pandas' of arrays, cuDF's text): pandas' arrow dtypes, pandas' text dtypes (as text), numbers and
    booleans (numpy's and pandas' nullable dtypes), and cuDF's nested dtypes (lists, structs), which give their arrow
    type through ``to_arrow`` (a cuDF list has no fixed size)."""
    if isinstance(dtype, pd.ArrowDtype):
        return dtype.pyarrow_dtype
    if isinstance(dtype, pd.StringDtype):
        return pa.large_string()
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
        try:  # numpy dtypes (either backend) and pandas' nullable ones (their numpy dtype)
            return pa.from_numpy_dtype(np.dtype(getattr(dtype, "numpy_dtype", dtype)))
        except (TypeError, pa.ArrowNotImplementedError):
            return None
    to_arrow = getattr(dtype, "to_arrow", None)
    if callable(to_arrow):
        try:
            found = to_arrow()
        except Exception:  # noqa: BLE001 - a dtype that cannot say its arrow type says nothing
            return None
        return found if isinstance(found, pa.DataType) else None
    return None


def not_embeddings(dtype: Any, name: str) -> str | None:
    """Why a column of this dtype (either backend) cannot hold embeddings, or None when it can or its dtype does not
    say (a pandas object column is read row by row)."""
    arrow_type = arrow_type_of(dtype)
    if arrow_type is None or is_embedding_type(arrow_type):
        return None
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return str(_text_error(name))
    return f"column {name!r} holds {arrow_type}, not embeddings"


def embedding_array(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """An arrow column of embeddings from a ``(n, dim)`` matrix; rows where ``valid`` is false are null.

    NaN values inside an embedding stay NaN (floats), never null elements.
    """
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) matrix, got shape {matrix.shape}")
    values = pa.array(matrix.reshape(-1), type=pa.float32())  # from numpy: NaN stays a value, not a null
    mask = None if valid is None or valid.all() else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1], mask=mask)


def embedding_matrix(values: Any, name: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """A column of embeddings as ``(valid, matrix)``: a bool array with one entry per row, and the float32
    ``(valid rows, dim)`` matrix of the non-null rows, in one vectorised conversion.

    Accepts the arrow-backed columns of either backend, and also pandas object columns of numpy arrays or lists
    (frames that users build themselves).

    Raises:
        ValueError: embeddings of different lengths.
        TypeError: the column holds text or numbers instead of embeddings (with what to do about it).
    """
    if not isinstance(values, pd.Series):
        return backend_of(values).embedding_matrix(values, name)
    dtype = values.dtype
    if isinstance(dtype, pd.ArrowDtype) and is_embedding_type(dtype.pyarrow_dtype):
        return _arrow_matrix(pa.chunked_array(values.array._pa_array).combine_chunks(), name)
    if pd.api.types.is_object_dtype(dtype):
        valid = values.notna().to_numpy(dtype=bool)
        rows = values[valid].tolist()
        if rows and isinstance(rows[0], str):
            raise _text_error(name)
        if not rows:
            return valid, np.zeros((0, 0), dtype=np.float32)
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(f"column {name!r} holds embeddings of different lengths ({_lengths(lengths)})")
        return valid, np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    if pd.api.types.is_string_dtype(dtype):
        raise _text_error(name)
    raise TypeError(f"column {name!r} has dtype {dtype}, not embeddings (a list of float32 per row)")


def _arrow_matrix(array: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    n_valid = int(valid.sum())
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
    else:
        lengths = pa.compute.list_value_length(array).drop_null().unique().to_pylist()
        if len(lengths) > 1:
            raise ValueError(f"column {name!r} holds embeddings of different lengths ({_lengths(lengths)})")
        dim = lengths[0] if lengths else 0
    flat = array.flatten()  # the values of the non-null rows only, in order
    matrix = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n_valid, dim)
    return valid, np.ascontiguousarray(matrix)


def _lengths(lengths: Any) -> str:
    return ", ".join(str(n) for n in sorted(lengths)) + " values"


def _text_error(name: str) -> TypeError:
    return TypeError(
        f"column {name!r} holds text, not embeddings: dask turns a pandas column of numpy arrays into strings "
        "when a frame is built with dd.from_pandas (its 'dataframe.convert-string' setting). Store embeddings with "
        "an arrow list type instead: pd.Series(imgcurate.backends.embedding_array(matrix), dtype=pd.ArrowDtype("
        "imgcurate.backends.embedding_type(dim))), or build the frame under dask.config.set({'dataframe.convert-"
        "string': False})"
    )


# ---------------------------------------------------------------------------------------------------- backends
def _pandas_type(arrow_type: pa.DataType) -> Any:
    """Pandas dtype for an arrow type, chosen so that every partition gets the same dtype whatever its nulls."""
    if pa.types.is_uint64(arrow_type):  # above 2**63 - 1 a value does not fit Int64
        return pd.UInt64Dtype()
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    if pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return pd.ArrowDtype(arrow_type)
    if pa.types.is_struct(arrow_type) or pa.types.is_map(arrow_type):
        return pd.ArrowDtype(arrow_type)
    return None  # pyarrow's default conversion


def _cast_declared(table: pa.Table, types: Mapping[str, pa.DataType] | None, where_fits: bool = False) -> pa.Table:
    for name, arrow_type in (types or {}).items():
        if name in table.column_names and table.column(name).type != arrow_type:
            index = table.column_names.index(name)
            try:
                column = table.column(name).cast(arrow_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                if not where_fits:
                    raise
                continue
            table = table.set_column(index, table.schema.field(index).with_type(arrow_type), column)
    return table


class Backend:
    """Converts between arrow tables and one kind of in-memory frame."""

    name: str = ""
    dask_backend: str = ""

    def owns(self, frame: Any) -> bool:
        raise NotImplementedError

    def from_arrow(self, table: pa.Table) -> Any:
        raise NotImplementedError

    def to_arrow(self, frame: Any) -> pa.Table:
        raise NotImplementedError

    def to_pandas(self, frame: Any) -> pd.DataFrame:
        raise NotImplementedError

    def embedding_matrix(self, values: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class PandasBackend(Backend):
    """pandas frames, with nullable integer and boolean dtypes so that partitions agree with their ``meta``."""

    name = "pandas"
    dask_backend = "pandas"

    def owns(self, frame: Any) -> bool:
        return isinstance(frame, pd.DataFrame | pd.Series)

    def from_arrow(self, table: pa.Table) -> pd.DataFrame:
        frame = table.to_pandas(types_mapper=_pandas_type)
        for field in table.schema:
            if pa.types.is_dictionary(field.type) and not len(frame[field.name].cat.categories):
                # a dictionary without values (an empty or all-null partition, and ``meta``) would get object
                # categories, where partitions with values get their values' dtype: pandas refuses to concatenate
                # categoricals whose categories differ in dtype
                empty = pd.Index(pa.array([], field.type.value_type).to_pandas())
                frame[field.name] = frame[field.name].cat.set_categories(empty)
        return frame

    def to_arrow(self, frame: pd.DataFrame) -> pa.Table:
        return pa.Table.from_pandas(frame, preserve_index=False)

    def to_pandas(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame

    def embedding_matrix(self, values: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
        return embedding_matrix(values, name)


def nan_as_null(table: pa.Table) -> pa.Table:
    """A table's top-level floating-point columns with NaN as null, as ``pa.Table.from_pandas`` writes a pandas frame
    (NaN inside a list, an embedding's value, stays NaN): so that the cuDF backend, whose arrow export keeps NaN as a
    value, writes the same parquet as the pandas backend (a missing score is null in either)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_floating(field.type):
            column = table.column(i)
            if pc.any(pc.is_nan(column)).as_py():
                table = table.set_column(i, field, pc.if_else(pc.is_nan(column), pa.scalar(None, field.type), column))
    return table


class CudfBackend(Backend):
    """cuDF frames on the GPU. Imports cudf on first use only."""

    name = "cudf"
    dask_backend = "cudf"

    @functools.cached_property
    def _cudf(self):
        try:
            import cudf
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise MissingDependencyError("the cudf backend", "cudf-cu13", extra="gpu") from err
        return cudf

    def owns(self, frame: Any) -> bool:
        return type(frame).__module__.startswith("cudf")

    def from_arrow(self, table: pa.Table) -> Any:
        # cuDF stores lists of any size, with 32-bit offsets: a fixed-size or large list goes in as a plain list (the
        # fixed size comes back in to_arrow from the declared type); its arrow import takes no other list type
        fields = [
            pa.field(f.name, pa.list_(f.type.value_type), f.nullable)
            if pa.types.is_fixed_size_list(f.type) or pa.types.is_large_list(f.type)
            else f
            for f in table.schema
        ]
        return self._cudf.DataFrame.from_arrow(table.cast(pa.schema(fields)))

    def to_arrow(self, frame: Any) -> pa.Table:
        table = frame.to_arrow(preserve_index=False)
        # cuDF exports a list or struct column that is empty or all null (``meta``, a partition without values) as
        # arrow's null type: give it the type its dtype holds, as for every other partition
        for i, field in enumerate(table.schema):
            if pa.types.is_null(field.type):
                declared = arrow_type_of(frame[field.name].dtype)
                if declared is not None:
                    table = table.set_column(i, pa.field(field.name, declared), pa.nulls(len(table), declared))
        return nan_as_null(table)

    def to_pandas(self, frame: Any) -> pd.DataFrame:
        """Through arrow, with the pandas backend's dtypes: a list column (embeddings) arrives as one arrow-backed
        column in a single copy, where cuDF's own ``to_pandas`` builds a Python list per row. NaN inside a list
        stays NaN: cuDF keeps nulls in a mask, so its arrow export has them as nulls and NaN as values."""
        if not hasattr(frame, "columns"):  # a Series
            return self.to_pandas(frame.to_frame(name="values"))["values"].rename(frame.name)
        out = _backend_instance("pandas").from_arrow(self.to_arrow(frame))
        out.index = frame.index.to_pandas()
        return out

    def embedding_matrix(self, values: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
        # a cuDF list column: its leaves are one flat device array, the non-null rows one after the other
        valid = values.notna().to_numpy()
        n_valid = int(valid.sum())
        present = values[values.notna()]
        lengths = present.list.len().unique().to_numpy()
        if len(lengths) > 1:
            raise ValueError(f"column {name!r} holds embeddings of different lengths ({_lengths(lengths.tolist())})")
        leaves = present.list.leaves
        if leaves.null_count:
            leaves = leaves.fillna(np.nan)
        flat = leaves.astype(np.float32).to_numpy()
        if n_valid and len(flat) % n_valid:
            raise ValueError(f"column {name!r} holds embeddings of different lengths")
        return valid, flat.reshape(n_valid, -1 if n_valid else 0)


_BACKENDS: dict[str, type[Backend]] = {"pandas": PandasBackend, "cudf": CudfBackend}


def gpu_available() -> bool:
    """True when a GPU can be used here (see :mod:`imgcurate.device`, the one place that decides)."""
    from imgcurate.device import gpu_available as available

    return available()


def resolve_backend_name(name: str | None = None) -> str:
    """Turns ``None`` (the config) or ``auto`` into ``pandas`` or ``cudf``.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    name = name or config.get("backend", "auto")
    if name == "auto":
        from imgcurate.device import cudf_usable

        return "cudf" if cudf_usable() else "pandas"
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of auto, {', '.join(_BACKENDS)}")
    return name


def get_backend(name: str | None = None) -> Backend:
    """The backend object for a name (``None``/``auto`` resolved from the config at each call)."""
    return _backend_instance(resolve_backend_name(name))


@functools.cache
def _backend_instance(name: str) -> Backend:
    return _BACKENDS[name]()


def host_index(index: Any) -> pd.Index:
    """A partition's index on the host (a pandas index)."""
    return index if isinstance(index, pd.Index) else index.to_pandas()


def on_gpu(frame: Any) -> bool:
    """True for a cuDF partition (or ``meta``), False for pandas."""
    return backend_of(frame).name == "cudf"


def backend_of(frame: Any) -> Backend:
    """The backend of a partition (or series) by its type: pandas, else cuDF."""
    pandas = _backend_instance("pandas")
    return pandas if pandas.owns(frame) else _backend_instance("cudf")


# ---------------------------------------------------------------------------------------------------- frames
def to_arrow(frame: Any, types: Mapping[str, pa.DataType] | None = None, *, where_fits: bool = False) -> pa.Table:
    """A partition (pandas or cuDF) as an arrow table; columns named in ``types`` are cast to their declared type
    (a safe cast: a value that does not fit raises, or with ``where_fits`` leaves that column's type as it is)."""
    return _cast_declared(backend_of(frame).to_arrow(frame), types, where_fits)


def from_arrow(table: pa.Table, backend: str | None = None) -> Any:
    """An arrow table as a frame of ``backend`` (a name; None reads the config)."""
    return get_backend(backend).from_arrow(table)


def to_pandas(frame: Any) -> pd.DataFrame:
    """A partition (or its ``meta``) as a pandas frame, copied to the host from the GPU when needed."""
    return backend_of(frame).to_pandas(frame)


def empty_frame(types: Mapping[str, pa.DataType], backend: str | None = None) -> Any:
    """An empty frame of ``backend`` whose columns have the given arrow types (a step's ``meta``)."""
    schema = pa.schema([pa.field(name, t) for name, t in types.items()])
    return get_backend(backend).from_arrow(schema.empty_table())


def with_columns(part: Any, columns: Mapping[str, Any], types: Mapping[str, pa.DataType] | None = None) -> Any:
    """``part`` (a pandas or cuDF partition, or its empty ``meta``) with ``columns`` added or replaced.

    Values are numpy arrays, pandas Series (their own index is ignored) or arrow arrays, one value per row in row
    order. ``types`` gives the arrow type of columns; a column whose type is given gets exactly that type. For a cuDF
    partition only the new columns travel to the GPU, through arrow.
    """
    types = dict(types or {})
    arrays = {name: _as_arrow(values, types.get(name)) for name, values in columns.items()}
    if isinstance(part, pd.DataFrame):
        new = pa.table(arrays).to_pandas(types_mapper=_pandas_type) if arrays else pd.DataFrame()
        new.index = part.index
        return part.assign(**{name: new[name] for name in new.columns})
    extra = backend_of(part).from_arrow(pa.table(arrays))
    out = part.copy(deep=False)
    extra.index = out.index
    for name in extra.columns:
        out[name] = extra[name]
    return out


def _as_arrow(values: Any, arrow_type: pa.DataType | None) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        array = values
    elif isinstance(values, pd.Series):
        array = pa.Array.from_pandas(values)
    else:
        array = pa.array(values, from_pandas=True) if arrow_type is None else None
        if array is None:
            array = pa.array(values, type=arrow_type, from_pandas=not pa.types.is_floating(arrow_type))
    if arrow_type is not None and array.type != arrow_type:
        array = array.cast(arrow_type)
    return array
