"""Schema helpers for per-shard parquet tables: where a shard's parquet lives, and one schema for all shards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from imgcurate.errors import ShardError

__all__ = ["parquet_path_for", "conform", "unify", "is_error_column"]


def is_error_column(column: str, dtype: Any = None) -> bool:
    """Whether a metadata column holds per-sample error text: ``error`` (the input's) or ``<step>_error``; given its
    ``dtype``, only one that can hold text (a number named ``reconstruction_error`` is a score, not an error)."""
    if not (column == "error" or column.endswith("_error")):
        return False
    if dtype is None:
        return True
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
        return False
    arrow = getattr(dtype, "pyarrow_dtype", None)
    return arrow is None or pa.types.is_string(arrow) or pa.types.is_large_string(arrow) or pa.types.is_null(arrow)


def parquet_path_for(tar_path: str) -> str:
    """The parquet that sits beside a tar shard: ``00012.tar`` -> ``00012.parquet``."""
    return tar_path[: -len(".tar")] + ".parquet" if tar_path.endswith(".tar") else tar_path + ".parquet"


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Gives a shard's table the dataset's unified schema: missing columns become nulls, types are cast."""
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            if column.type != field.type:
                # an integer column that is floating point in another shard is read as floating point, as pandas
                # reads an integer column with nulls (integers above 2**53 are rounded to the nearest float)
                lossy = pa.types.is_integer(column.type) and pa.types.is_floating(field.type)
                column = column.cast(field.type, safe=not lossy)
            arrays.append(column)
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def unify(schemas: Sequence[pa.Schema], paths: Sequence[str]) -> pa.Schema:
    """One schema for all shards: the union of their columns, types promoted; a column null everywhere is text.

    Raises:
        ShardError: two shards disagree on a column's type in a way that cannot be promoted, naming the shard that
            differs from the first.
    """
    try:
        schema = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        problem = f"parquet schema cannot be unified with the other shards' ({err})"
        raise ShardError(_odd_one(schemas, paths), problem) from None
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in schema]
    return pa.schema(fields)


def _odd_one(schemas: Sequence[pa.Schema], paths: Sequence[str]) -> str:
    """The first shard whose schema does not unify with the shards before it."""
    merged = schemas[0].remove_metadata()
    for schema, path in zip(schemas[1:], paths[1:], strict=True):
        try:
            merged = pa.unify_schemas([merged, schema.remove_metadata()], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return path
    return paths[0]
