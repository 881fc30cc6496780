"""Checks made when a dataset is opened, so that structural problems are a ShardError then, never halfway through a job.

Per shard (:func:`check_shard`, run in the opening thread pool):

- the parquet footer is readable, its column names are unique, its key column holds text (the tar's member names
  are text: integer or binary keys would match none of them) and img2dataset's ``status``/``error_message``, when
  present, hold text; with ``validate=True`` every column chunk of every row
  group is decoded once (one column chunk in memory at a time), so a corrupt chunk of any column is found now. On a
  remote store that reads the whole parquet once (a range request per column chunk), which is why it belongs to
  ``validate``;
- with ``validate=True`` the tar is read to its end-of-archive blocks (headers only; see :mod:`imgcurate.io.tar`)
  and its keys are compared with the parquet's: no key may be listed twice in the parquet, and the tar's keys must
  be the parquet's keys in the same order, except
  that a parquet row may have no sample in the tar when it records a failure (img2dataset's ``status`` other than
  ``success``, or an ``error``), which is how img2dataset lists failed downloads;
- img2dataset's ``NNNNN_stats.json`` beside the tar, when present, must agree: ``count`` parquet rows and, with
  ``validate=True``, ``successes`` samples in the tar.

Across shards: :func:`unify_schemas` (a column that is an integer in some shards and a string in others becomes a
string, with a warning naming a shard of each kind) and :func:`check_unique_keys` (a Dask groupby over the key
columns; no list of all keys is ever held on the client).

At read time, :func:`with_status_errors` turns img2dataset's ``status``/``error_message`` into the ``error`` column,
so a failed download is an error row like any other.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcurate.errors import ShardError, one_line
from imgcurate.io.shards import ERROR_COLUMN
from imgcurate.io.tar import read_keys

__all__ = ["check_shard", "check_unique_keys", "stats_path_for", "unify_schemas", "with_status_errors"]

#: img2dataset's per-row outcome and its message.
STATUS_COLUMN = "status"
STATUS_MESSAGE_COLUMN = "error_message"
SUCCESS = "success"


def stats_path_for(tar_path: str) -> str:
    """img2dataset's statistics file of a shard: ``00012.tar`` -> ``00012_stats.json``."""
    return tar_path[: -len(".tar")] + "_stats.json"


def _read_columns(pf: pq.ParquetFile, parquet: str, id_col: str) -> pa.Table:
    """Decodes every column chunk of every row group, one at a time, and keeps the columns needed to compare keys
    (key, status, error)."""
    schema = pf.schema_arrow
    wanted = [c for c in (id_col, STATUS_COLUMN, ERROR_COLUMN) if c in schema.names]
    kept: dict[str, list[pa.Array]] = {name: [] for name in wanted}
    for group in range(pf.num_row_groups):
        for name in schema.names:
            try:
                chunk = pf.read_row_group(group, columns=[name]).column(0)
            except (OSError, pa.ArrowException) as err:
                raise ShardError(parquet, f"column {name!r} of row group {group} cannot be read ({err})") from None
            if name in kept:
                kept[name].extend(chunk.chunks)
    return pa.table({name: pa.chunked_array(chunks, schema.field(name).type) for name, chunks in kept.items()})


def failed_rows(table: pa.Table) -> list[bool]:
    """Rows that record a failure: img2dataset's status other than success, or an error."""
    failed = pa.array([False] * table.num_rows, pa.bool_())
    if STATUS_COLUMN in table.column_names:
        status = table.column(STATUS_COLUMN).cast(pa.string())
        failed = pc.or_(failed, pc.fill_null(pc.not_equal(status, SUCCESS), False))
    if ERROR_COLUMN in table.column_names:
        failed = pc.or_(failed, pc.is_valid(table.column(ERROR_COLUMN)))
    return failed.to_pylist()


def _compare_keys(tar: str, pq_keys: list[str], failed: list[bool], tar_keys: list[str]) -> None:
    """Raises unless ``tar_keys`` are ``pq_keys`` in order, with only failed rows allowed to be absent."""
    at = 0
    for row, key in enumerate(pq_keys):
        if at < len(tar_keys) and tar_keys[at] == key:
            at += 1
            continue
        if failed[row]:  # a failure listed in the parquet with no sample in the tar (img2dataset)
            continue
        found = f"tar has {tar_keys[at]!r}" if at < len(tar_keys) else "tar has no more samples"
        raise ShardError(
            tar,
            f"keys differ from its parquet: row {row}: parquet has key {key!r}, {found} (a parquet row may lack a "
            "sample only when its status or error records a failure)",
        )
    if at < len(tar_keys):
        raise ShardError(
            tar,
            f"keys differ from its parquet: parquet has {len(pq_keys)} rows, tar has {len(tar_keys)} samples; first "
            f"key missing from parquet (or out of order): {tar_keys[at]!r}",
        )


def _read_stats(tar: str, storage_options: dict) -> tuple[str, Any, Any] | None:
    """``(path, count, successes)`` of img2dataset's statistics file beside ``tar``; None when there is none."""
    path = stats_path_for(tar)
    fs, fs_path = fsspec.core.url_to_fs(path, **storage_options)
    if not fs.exists(fs_path):
        return None
    try:
        with fs.open(fs_path, "rb") as f:
            stats = json.load(f)
        return path, stats.get("count"), stats.get("successes")
    except (OSError, ValueError, AttributeError, RecursionError) as err:
        raise ShardError(path, f"not a readable img2dataset statistics file ({one_line(err)})") from None


def _check_stats(tar: str, storage_options: dict, rows: int, samples: int | None) -> None:
    """The shard agrees with img2dataset's statistics file, when there is one: the parquet has a row per URL
    (``count``), or a row per sample written (``successes``: a parquet rebuilt by scanning the tar, which has no row
    for a failed download), and the tar a sample per success."""
    found = _read_stats(tar, storage_options)
    if found is None:
        return
    path, count, successes = found
    if isinstance(count, int) and count != rows and not (isinstance(successes, int) and successes == rows):
        raise ShardError(path, f"says the shard has {count} rows, its parquet has {rows}")
    if samples is not None and isinstance(successes, int) and successes != samples:
        raise ShardError(path, f"says {successes} samples were written, the tar has {samples}")


def check_scanned_stats(tar: str, storage_options: dict, samples: int) -> int:
    """For a shard whose metadata was rebuilt by scanning its tar (its parquet was missing): the tar holds the
    samples img2dataset's statistics file says were written. Returns how many failed downloads, which only the lost
    parquet recorded, now have no row (0 without a statistics file)."""
    found = _read_stats(tar, storage_options)
    if found is None:
        return 0
    path, count, successes = found
    if isinstance(successes, int) and successes != samples:
        raise ShardError(path, f"says {successes} samples were written, the tar has {samples}")
    if isinstance(count, int) and isinstance(successes, int) and count > successes:
        return count - successes
    return 0


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _check_columns(parquet: str, schema: pa.Schema, id_col: str) -> None:
    """The parquet's columns can describe a shard: unique names, a text key column (the tar's member names are
    text: a number or bytes would not match them), and img2dataset's status and message as text when present."""
    names = schema.names
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ShardError(parquet, f"has two columns named {twice!r}")
    if id_col not in names:
        raise ShardError(parquet, f"has no {id_col!r} column (columns: {', '.join(names)})")
    kind = schema.field(id_col).type
    if not _is_text(kind):
        raise ShardError(parquet, f"column {id_col!r} holds {kind}, not text: keys name the tar's members")
    for name in (STATUS_COLUMN, STATUS_MESSAGE_COLUMN):
        if name in names:
            kind = schema.field(name).type
            if not (_is_text(kind) or pa.types.is_null(kind)):
                raise ShardError(parquet, f"column {name!r} holds {kind}, not text")


def check_shard(tar: str, parquet: str, id_col: str, storage_options: dict, validate: bool) -> tuple[pa.Schema, int]:
    """Checks one shard's parquet (and with ``validate`` its tar) and returns the parquet's arrow schema and its row
    count (from the footer).

    Args:
        tar: the tar's path or URL.
        parquet: the parquet beside it.
        id_col: the key column.
        storage_options: passed to fsspec.
        validate: decode every column chunk of the parquet and compare the tar's keys with the parquet's.

    Raises:
        ShardError: naming the file at fault (see the module docstring for what is checked).
    """
    try:
        with fsspec.open(parquet, "rb", **storage_options) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            _check_columns(parquet, schema, id_col)
            rows = pf.metadata.num_rows
            table = _read_columns(pf, parquet, id_col) if validate else None
    except (OSError, pa.ArrowException) as err:
        raise ShardError(parquet, f"not a readable parquet file ({err})") from None
    samples = None
    if table is not None:
        pq_keys = table.column(id_col).cast(pa.string()).to_pylist()
        if len(set(pq_keys)) < len(pq_keys):
            twice = pd.Series(pq_keys)[pd.Series(pq_keys).duplicated()].iloc[0]
            raise ShardError(parquet, f"lists the key {twice!r} twice: each row describes one sample of the tar")
        tar_keys = read_keys(tar, storage_options=storage_options)
        _compare_keys(tar, pq_keys, failed_rows(table), tar_keys)
        samples = len(tar_keys)
    _check_stats(tar, storage_options, rows, samples)
    return with_status_errors(schema.empty_table()).schema, rows


def with_status_errors(table: pa.Table) -> pa.Table:
    """img2dataset's ``status``/``error_message`` as the ``error`` column: ``"<status>: <message>"`` on rows whose
    status is not ``success`` (an existing ``error`` value wins). Tables without ``status`` come back unchanged."""
    if STATUS_COLUMN not in table.column_names:
        return table
    status = table.column(STATUS_COLUMN).cast(pa.string())
    if STATUS_MESSAGE_COLUMN in table.column_names:
        message = table.column(STATUS_MESSAGE_COLUMN).cast(pa.string())
        text = pc.binary_join_element_wise(status, pc.fill_null(message, ""), ": ")
    else:
        text = status
    derived = pc.if_else(pc.fill_null(pc.not_equal(status, SUCCESS), False), text, pa.scalar(None, pa.string()))
    if ERROR_COLUMN in table.column_names:
        index = table.column_names.index(ERROR_COLUMN)
        error = table.column(ERROR_COLUMN)
        if not _is_text(error.type) and not pa.types.is_null(error.type):
            return table
        merged = pc.coalesce(error.cast(pa.string()), derived)
        return table.set_column(index, pa.field(ERROR_COLUMN, pa.string()), merged)
    return table.append_column(pa.field(ERROR_COLUMN, pa.string()), derived)


# ---------------------------------------------------------------------------------------------------- across shards
_TEXT_PROMOTABLE = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string,
                    pa.types.is_large_string, pa.types.is_null)  # fmt: skip


def unify_schemas(schemas: Sequence[pa.Schema], paths: Sequence[str]) -> pa.Schema:
    """One schema for all shards: missing columns are added (null), types are promoted as arrow permits, and a
    column of scalars that is text in some shards and a number or boolean in others becomes text, with a warning.

    Columns that are null in every shard become strings.

    Raises:
        ShardError: a column's types cannot be reconciled, naming the first shard whose type differs from the
            first shard that has the column.
    """
    # each distinct schema once, with the first shard that has it (10^5 shards usually hold a handful of schemas)
    first_with: dict[pa.Schema, str] = {}
    for schema, path in zip(schemas, paths, strict=True):
        first_with.setdefault(schema.remove_metadata(), path)
    schemas, paths = list(first_with), list(first_with.values())
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        schema = _unify_by_column(schemas, paths)
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in schema]
    return pa.schema([_unsigned_as_text(f, schemas, paths) for f in fields])


def _unsigned_as_text(field: pa.Field, schemas: Sequence[pa.Schema], paths: Sequence[str]) -> pa.Field:
    """A column that is uint64 in some shard and a signed integer in another: arrow unifies them to int64, which
    cannot hold uint64 values above 2**63 - 1 (a 64-bit hash); no integer type holds both, so it is read as text,
    with a warning."""
    if not pa.types.is_signed_integer(field.type):
        return field
    typed = [(s.field(field.name).type, p) for s, p in zip(schemas, paths, strict=True) if field.name in s.names]
    unsigned = next((p for t, p in typed if pa.types.is_uint64(t)), None)
    signed = next((p for t, p in typed if pa.types.is_signed_integer(t)), None)
    if unsigned is None or signed is None:
        return field
    warnings.warn(f"column {field.name!r} is uint64 in {unsigned} but a signed integer in {signed}; reading it as "
                  "text in every shard", stacklevel=3)  # fmt: skip
    return pa.field(field.name, pa.string())


def _unify_by_column(schemas: Sequence[pa.Schema], paths: Sequence[str]) -> pa.Schema:
    names: list[str] = []
    for s in schemas:
        names.extend(n for n in s.names if n not in names)
    fields = []
    for name in names:
        typed = [(s.field(name).type, p) for s, p in zip(schemas, paths, strict=True) if name in s.names]
        if any(pa.types.is_dictionary(t) for t, _ in typed) and not all(pa.types.is_dictionary(t) for t, _ in typed):
            # dictionary-encoded in some shards (pandas' categoricals), plain in others: read as the plain values
            typed = [(t.value_type if pa.types.is_dictionary(t) else t, p) for t, p in typed]
        try:
            fields.append(
                pa.unify_schemas(
                    [pa.schema([pa.field(name, t)]) for t, _ in typed], promote_options="permissive"
                ).field(name)
            )
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        first_type, first_path = typed[0]
        odd_type, odd_path = _first_odd(name, typed)
        if all(any(check(t) for check in _TEXT_PROMOTABLE) for t, _ in typed):
            warnings.warn(
                f"column {name!r} is {first_type} in {first_path} but {odd_type} in {odd_path}; reading it as text "
                "in every shard",
                stacklevel=3,
            )
            fields.append(pa.field(name, pa.string()))
            continue
        raise ShardError(
            odd_path,
            f"column {name!r} is {odd_type} here but {first_type} in {first_path}; the shards cannot be unified",
        )
    return pa.schema(fields)


def _first_odd(name: str, typed: list[tuple[pa.DataType, str]]) -> tuple[pa.DataType, str]:
    """The first shard whose type of column ``name`` cannot be unified with the shards before it."""
    so_far = pa.schema([pa.field(name, typed[0][0])])
    for type_, path in typed[1:]:
        try:
            so_far = pa.unify_schemas([so_far, pa.schema([pa.field(name, type_)])], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return type_, path
    return typed[-1]


def _shard_keys(source: str | pa.Table, shard: int, id_col: str, storage_options: dict) -> pd.DataFrame:
    if isinstance(source, pa.Table):
        keys = source.column(id_col)
    else:
        with fsspec.open(source, "rb", **storage_options) as f:
            keys = pq.read_table(f, columns=[id_col]).column(id_col)
    return pd.DataFrame({"key": keys.cast(pa.string()).to_pandas(), "shard": shard}).astype({"shard": "int64"})


def check_unique_keys(
    sources: Sequence[str | pa.Table], tar_files: Sequence[str], id_col: str, storage_options: dict
) -> None:
    """Raises when a key is in two shards, naming both shards and the key.

    A Dask computation: one task reads each shard's key column (``sources``: parquet paths, or tables held in
    memory), a groupby on the key counts the shards of each key, and only duplicated keys (at most a few) come back
    to the client. Duplicates inside one shard are the tar reader's to report.

    Raises:
        ShardError: naming the first shard with the key and the key's other shard.
    """
    import dask.dataframe as dd

    if len(sources) < 2:
        return
    meta = pd.DataFrame({"key": pd.Series([], dtype=object), "shard": pd.Series([], dtype="int64")})
    with _pandas_dask():
        keys = dd.from_map(
            _shard_keys, list(sources), range(len(sources)), args=[id_col, storage_options], meta=meta,
            label="imgcurate-keys", enforce_metadata=False,
        )  # fmt: skip
        groups = keys.groupby("key")["shard"].agg(["min", "max"], split_out=max(1, keys.npartitions // 64))
        found = groups[groups["min"] != groups["max"]].head(1, npartitions=-1, compute=True)
    if len(found):
        key, row = found.index[0], found.iloc[0]
        raise ShardError(
            tar_files[int(row["min"])],
            f"sample key {key!r} is also in {tar_files[int(row['max'])]}: keys must be unique",
        )


def _pandas_dask() -> Any:
    import dask

    return dask.config.set({"dataframe.backend": "pandas", "dataframe.convert-string": False})
