"""Re-sharding the kept samples of a metadata frame into new WebDataset shards, streaming and in parallel on Dask.

Two passes, both over Dask, then a publish step:

1. *Select*: each metadata partition is computed once; its kept rows (``filter_column`` true; null counts as false)
   go to a staging parquet and their count comes back (one small row per shard).
2. *Write*: the counts fix, before any shard is written, which output shard every kept sample lands in and its new
   key. Each output shard is then written by exactly one task, which streams the samples it needs from the input
   tars it names (never the list of all tars), one sample in memory at a time, copying every member's bytes
   unchanged, into the staging folder.
3. *Publish*: a marker file says that the folder is being replaced; the old shards are removed, the new ones moved in,
   a manifest (``_imgcurate_export.json``) written, and the marker removed last. A folder whose marker is still there
   (the export was killed while publishing) does not open: :func:`check_export_complete` raises, naming the folder,
   and a rerun of the same export finishes it. So the folder is the old export, the new one, or an error, never a
   mix of the two.

The staging folder (``.imgcurate-staging`` inside the output folder) keeps the shards already written, with a
fingerprint of the plan (the rows selected, and the size and time, or ETag, of each input tar they come from); a
rerun of the same export after a crash reuses them and writes only the rest. Reruns remove the temporaries that
killed writers left there (``<name>.tmp-`` and 12 hex digits), and in the output folder the manifest's only. The
bytes of every file are the same on every run (fixed mtime, owner, mode and order), whatever the scheduler or the
number of workers.

New keys: sample ``j`` (from 0) of output shard ``s`` gets ``f"{s:05d}{j:0Nd}"`` where ``N`` is the number of digits
of ``samples_per_shard - 1`` (see :func:`imgcurate.io.shards.new_key`); export order is input order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import posixpath
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgcurate import progress
from imgcurate._dask import Shard, map_with_shard
from imgcurate.backends import backend_of, from_arrow, to_arrow, to_pandas
from imgcurate.cpu import reuse_freed_memory
from imgcurate.errors import ConcurrentExportError, ShardError, one_line
from imgcurate.io._fs import (
    atomic_open,
    check_reachable,
    file_stamp,
    files_in,
    in_the_way,
    remove_temporaries,
    remove_tree,
    same_folder,
    shard_parquet,
    task_url,
    temp_name,
)
from imgcurate.io.schema import conform, unify
from imgcurate.io.shards import ShardWriter, new_key
from imgcurate.io.tar import Sample, aligned_samples
from imgcurate.io.validate import failed_rows

__all__ = ["export_webdataset", "check_export_complete", "check_listed_shards", "manifest_digest", "check_sizes",
           "existing_shards", "publish", "MANIFEST", "INCOMPLETE_MARKER", "STAGING"]  # fmt: skip

#: Written last by a finished export: the shards and their sample counts.
MANIFEST = "_imgcurate_export.json"
#: Present while an export replaces a folder's shards; a folder that has it does not open.
INCOMPLETE_MARKER = "_imgcurate_export_incomplete.json"
#: The staging folder inside the output folder.
STAGING = ".imgcurate-staging"
_SHARD_EXTS = ("tar", "parquet", "idx")
_SHARD_FILES = tuple(f"*.{ext}" for ext in _SHARD_EXTS)


def check_export_complete(fs: fsspec.AbstractFileSystem, root: str, path: str) -> None:
    """Raises :class:`ShardError` when an export into ``root`` was stopped while it replaced the shards."""
    if fs.exists(posixpath.join(root, INCOMPLETE_MARKER)):
        raise ShardError(
            path,
            "an export into this folder did not finish (it was stopped while replacing the shards): run the same "
            "export again to finish it, or delete the folder",
        )


def manifest_digest(path: str, storage_options: dict | None = None) -> str | None:
    """The sha256 of the export manifest in the folder ``path``, or None without one: what a run directory records
    of the export it published, to know it again on a rerun."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    manifest = posixpath.join(root, MANIFEST)
    if not fs.isfile(manifest):
        return None
    return hashlib.sha256(fs.cat_file(manifest)).hexdigest()


def check_listed_shards(fs: fsspec.AbstractFileSystem, root: str, tars: list[str]) -> None:
    """Raises :class:`ShardError` when the folder's export manifest lists a tar that ``tars`` (the tar files found
    there) lacks: a shard of a finished export was deleted, or the folder was copied in part."""
    manifest = posixpath.join(root, MANIFEST)
    if not fs.exists(manifest):
        return
    with fs.open(manifest, "rb") as f:
        try:
            listed = [str(s["tar"]) for s in json.loads(f.read()).get("shards", [])]
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise ShardError(task_url(fs, manifest), "is not the export manifest imgcurate writes (unreadable JSON, "
                                                     "or no list of shards)") from None  # fmt: skip
    found = {posixpath.basename(t) for t in tars}
    missing = [name for name in listed if name not in found]
    if missing:
        raise ShardError(
            task_url(fs, posixpath.join(root, missing[0])),
            f"missing: the export manifest {MANIFEST} lists it (shards listed: {len(listed)}; not here as regular "
            f"files: {len(missing)}); restore them, or delete the manifest to open the shards that are here",
        )


def _keep_mask(part: pd.DataFrame, filter_column: str | None) -> Any:
    if filter_column is None:
        return None
    return part[filter_column].fillna(False).astype(bool)


def _input_types(metadata: dd.DataFrame, input_schema: pa.Schema | None) -> dict[str, pa.DataType]:
    """The input type of each column of ``metadata`` that may still hold what was read: its dtype is the one its type
    in ``input_schema`` (the input's parquet schema) is read as.

    Reading maps several arrow types to one dtype (every integer width to ``Int64``, a dictionary of any index width
    to ``category``, plain and large strings to text), and converting a partition back gives one of them (``int64``,
    the smallest index that holds the categories, ``large_string``), not necessarily the input's; the export casts
    such columns back to their input type where their values fit it (:func:`_select`), so an export of an export
    writes the same parquet bytes. A column that a step replaced with another dtype keeps its own type. The dtypes
    are compared on ``meta``, with no data read.
    """
    if input_schema is None:
        return {}
    meta = metadata._meta
    declared = to_arrow(meta).schema
    read = to_arrow(from_arrow(input_schema.empty_table(), backend_of(meta).name)).schema
    return {
        field.name: field.type
        for field in input_schema
        if field.name in declared.names and declared.field(field.name).type == read.field(field.name).type
    }


def _fixed_size_lists(metadata: dd.DataFrame, column_types: Mapping[str, pa.DataType] | None) -> dict:
    """The declared fixed-size list types (embeddings) of columns that ``metadata`` still has. Only these: every
    other declared type is what the frame converts to already, on either backend, and leaving them out keeps the
    export's bytes as they were."""
    names = set(map(str, metadata.columns))
    return {name: t for name, t in (column_types or {}).items() if name in names and pa.types.is_fixed_size_list(t)}


def _select(
    part: Any,
    shard: Shard,
    stage_dir: str,
    filter_column: str | None,
    so: dict,
    expected: bytes,
    types: dict[str, pa.DataType],
    out_so: dict | None = None,
) -> pd.DataFrame:
    """Writes a partition's kept rows to the staging folder (fsspec options ``out_so``, else ``so``: the input's);
    returns one row: shard, tar, count, schema, digest and the tar's stamp (:func:`file_stamp`: its bytes are what
    the staged shards copy, so a rerun after the input changed must not reuse them).

    Columns named in ``types`` (:func:`_input_types`) are cast back to their input type where their values fit it
    (a column whose values do not fit, which a step changed but not its dtype, keeps its type: the shards' schemas
    are then unified to one that holds both, the same for every output shard). ``schema`` is empty when the
    partition's arrow schema is the ``expected`` one (the metadata's declared schema, with those types), so that the
    client receives a schema only from the shards that differ, not one per shard.
    """
    mask = _keep_mask(part, filter_column)
    kept = part if mask is None else part[mask]
    try:
        table = to_arrow(kept, types, where_fits=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:  # e.g. numbers and text in one
        raise ShardError(shard.tar, f"its metadata rows cannot be written to parquet ({one_line(err)}): give each "
                                    "column one type") from None  # fmt: skip
    digest = ""
    if table.num_rows:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        select = posixpath.join(stage_dir, "select", f"{shard.index:05d}.parquet")
        with atomic_open(select, "wb", so if out_so is None else out_so) as f:
            f.write(data)
    schema = table.schema.remove_metadata().serialize().to_pybytes()
    schema = b"" if schema == expected else schema
    stamp = ""
    if table.num_rows:
        fs, tar = fsspec.core.url_to_fs(shard.tar, **so)
        try:
            stamp = file_stamp(fs, fs.info(tar))
        except FileNotFoundError:  # the write pass names it
            stamp = "missing"
    return pd.DataFrame({"shard": [shard.index], "tar": [shard.tar], "count": [table.num_rows], "schema": [schema],
                         "digest": [digest], "stamp": [stamp]})  # fmt: skip


_SELECT_META = pd.DataFrame(
    {
        "shard": pd.Series([], dtype="int64"),
        "tar": pd.Series([], dtype=object),
        "count": pd.Series([], dtype="int64"),
        "schema": pd.Series([], dtype=object),
        "digest": pd.Series([], dtype=object),
        "stamp": pd.Series([], dtype=object),
    }
)


def _plan(counts: list[int], samples_per_shard: int, max_shards: int | None) -> list[list[tuple[int, int, int]]]:
    """For each output shard, the (input partition, first row, end row) slices of kept rows that fill it."""
    total = sum(counts)
    n_out = math.ceil(total / samples_per_shard)
    if max_shards is not None:
        n_out = min(n_out, max_shards)
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(n_out)]
    start = 0  # global index of the partition's first kept row
    for i, count in enumerate(counts):
        row = 0
        while row < count:
            shard = (start + row) // samples_per_shard
            if shard >= n_out:
                return plan
            room = (shard + 1) * samples_per_shard - (start + row)
            take = min(room, count - row)
            plan[shard].append((i, row, row + take))
            row += take
        start += count
    return plan


def _write_shard(
    shard: int,
    slices: list[tuple[int, str, int, int]],
    stage_dir: str,
    samples_per_shard: int,
    id_col: str,
    old_id_col: str | None,
    schema: pa.Schema,
    so: dict,
    index: bool,
    out_so: dict | None = None,
) -> int:
    """Writes output shard ``shard`` into the staging folder from its ``(partition, tar, first, end)`` slices; the
    input tars are read with fsspec options ``so``, the staging folder with ``out_so`` (None: ``so``)."""
    reuse_freed_memory()  # as every shard-wise task does (:func:`imgcurate._dask.map_with_shard`)
    out_so = so if out_so is None else out_so
    tables = []
    with ShardWriter(posixpath.join(stage_dir, f"{shard:05d}.tar"), storage_options=out_so, index=index) as writer:
        for part, tar, first, end in slices:
            with fsspec.open(posixpath.join(stage_dir, "select", f"{part:05d}.parquet"), "rb", **out_so) as f:
                table = pq.read_table(f).slice(first, end - first)
            keys = table.column(id_col).to_pylist()
            missing = []
            for row, sample in enumerate(aligned_samples(tar, keys, so)):
                if sample is None:
                    missing.append(row)
                else:
                    if sample.unread:  # copied in memory: a member over the limit cannot be, and is not dropped
                        why = next(iter(sample.unread.values()))
                        raise ShardError(tar, f"sample {sample.key!r}: {why}, so the export cannot copy it; leave the "
                                              "sample out (filter_column)")  # fmt: skip
                    if index:
                        _check_indexable(tar, sample)
                writer.write(new_key(shard, writer.count, samples_per_shard), {} if sample is None else sample.members)
            # img2dataset's failed downloads stay rows without a sample; any other such row is an error (checked
            # once the whole slice is read, so that rows out of tar order are named as such first)
            failed = failed_rows(table) if missing else []
            unexplained = next((row for row in missing if not failed[row]), None)
            if unexplained is not None:
                raise ShardError(tar, f"the metadata's row for key {keys[unexplained]!r} has no sample in this tar "
                                      "and no status or error recording a failure: its key was changed after the "
                                      "dataset was opened, or its error column dropped")  # fmt: skip
            tables.append(conform(table, schema))
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        new_keys = pa.array([new_key(shard, j, samples_per_shard) for j in range(table.num_rows)], pa.string())
        old_keys = table.column(id_col)
        table = table.set_column(table.column_names.index(id_col), pa.field(id_col, pa.string()), new_keys)
        if old_id_col is not None:
            table = table.add_column(
                table.column_names.index(id_col) + 1, pa.field(old_id_col, old_keys.type), old_keys
            )
        writer.set_metadata(table)
    return writer.count


def _check_indexable(tar: str, sample: Sample) -> None:
    """Raises unless each member of ``sample`` can go in a DALI index (whose fields are separated by spaces): the
    input tar is named, where the index written at the end of the output shard would name a staging file."""
    for ext in sample.members:
        if any(c.isspace() for c in ext):
            raise ShardError(tar, f"sample {sample.key!r} has a member {ext!r} whose extension holds white space, "
                                  "which a DALI index cannot hold: export with index_files=False")  # fmt: skip


def selection(
    metadata: dd.DataFrame,
    shards: dd.DataFrame,
    stage_dir: str,
    filter_column: str | None,
    so: dict,
    types: dict[str, pa.DataType] | None = None,
    out_so: dict | None = None,
) -> dd.DataFrame:
    """The select pass: one row per shard (shard, tar, count, schema, digest); each task reads its own partition.
    Columns named in ``types`` (:func:`_input_types`) are written with those types where their values fit. ``so``
    are the input's fsspec options, ``out_so`` the staging folder's (None: the same)."""
    types = dict(types or {})
    expected = _declared_schema(metadata, types)
    return map_with_shard(_select, metadata, shards, stage_dir, filter_column, so, expected, types, out_so,
                          meta=_SELECT_META)  # fmt: skip


def _declared_schema(metadata: dd.DataFrame, types: dict[str, pa.DataType]) -> bytes:
    declared = to_arrow(metadata._meta).schema
    schema = pa.schema([f.with_type(types.get(f.name, f.type)) for f in declared])
    return schema.serialize().to_pybytes()


def write_tasks(
    plan: list[list[tuple[int, int, int]]],
    todo: list[int],
    tars: list[str],
    stage_dir: str,
    samples_per_shard: int,
    id_col: str,
    old_id_col: str | None,
    schema: pa.Schema,
    so: dict,
    index_files: bool,
    out_so: dict | None = None,
) -> list[Any]:
    """The write pass: one delayed task per output shard in ``todo``, holding only the tars of its own slices (read
    with fsspec options ``so``; the staging folder with ``out_so``, None: the same)."""
    write = dask.delayed(_write_shard, pure=False)
    return [
        write(
            s,
            [(i, tars[i], a, b) for i, a, b in plan[s]],
            stage_dir,
            samples_per_shard,
            id_col,
            old_id_col,
            schema,
            so,
            index_files,
            out_so,
        )  # fmt: skip
        for s in todo
    ]


def check_sizes(samples_per_shard: Any, max_shards: Any) -> None:
    """Raises :class:`ValueError` unless ``samples_per_shard`` is an integer of at least 1 and ``max_shards`` None or
    an integer of at least 1 (no shard at all would export nothing); pipelines check them before any work, too."""
    if not _whole(samples_per_shard) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be an integer of at least 1, got {samples_per_shard!r}")
    if max_shards is not None and (not _whole(max_shards) or max_shards < 1):
        raise ValueError(f"max_shards must be None or an integer of at least 1, got {max_shards!r}")


def _whole(value: Any) -> bool:
    """An integer of Python's or NumPy's (``np.int64(5)``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _check_arguments(
    metadata: dd.DataFrame,
    filter_column: str | None,
    samples_per_shard: int,
    max_shards: int | None,
    old_id_col: str | None,
) -> None:
    check_sizes(samples_per_shard, max_shards)
    if filter_column is not None:
        if filter_column not in metadata.columns:
            columns = ", ".join(map(str, metadata.columns))
            raise ValueError(f"filter_column {filter_column!r} is not a metadata column ({columns})")
        if not pd.api.types.is_bool_dtype(to_pandas(metadata._meta)[filter_column].dtype):
            raise ValueError(f"filter_column {filter_column!r} must be boolean, not {metadata[filter_column].dtype}")
    if old_id_col is not None and old_id_col in metadata.columns:
        raise ValueError(f"old_id_col {old_id_col!r} is already a metadata column")


def _shard_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The files of the shards in the folder ``root``: tars, DALI indexes, img2dataset's ``*_stats.json``, and the
    parquets beside a tar or named like a shard (digits). Another parquet there (a user's table) is not a shard's,
    (:func:`imgcurate.io._fs.shard_parquet`, the rule opening the folder follows too)."""
    found = files_in(fs, root, *_SHARD_FILES, "*_stats.json")
    tars = {posixpath.basename(f)[: -len(".tar")] for f in found if f.endswith(".tar")}

    def of_a_shard(path: str) -> bool:
        stem, _, ext = posixpath.basename(path).rpartition(".")
        return ext != "parquet" or shard_parquet(stem, tars)

    return [f for f in found if of_a_shard(f)]


def existing_shards(fs: fsspec.AbstractFileSystem, root: str, path: str, overwrite: bool) -> None:
    """Raises :class:`FileExistsError` when the folder ``root`` already holds shards and ``overwrite`` is false, unless
    a write into it was stopped while publishing (rerunning it finishes that)."""
    if overwrite or fs.exists(posixpath.join(root, INCOMPLETE_MARKER)):
        return
    if _shard_files(fs, root):
        raise FileExistsError(f"{path}: already holds shards; pass overwrite=True (--overwrite) to replace them")


def export_webdataset(
    metadata: dd.DataFrame,
    shards: dd.DataFrame,
    path: str,
    *,
    source: str,
    id_col: str,
    storage_options: dict | None = None,
    output_storage_options: dict | None = None,
    filter_column: str | None = None,
    samples_per_shard: int = 10000,
    max_shards: int | None = None,
    old_id_col: str | None = None,
    overwrite: bool = False,
    index_files: bool = False,
    input_schema: pa.Schema | None = None,
    column_types: Mapping[str, pa.DataType] | None = None,
    on_start: Callable[[], None] | None = None,
) -> int:
    """Writes the rows of ``metadata`` whose ``filter_column`` is true, with their samples, as new shards in ``path``.

    Args:
        metadata: the metadata frame, partition ``i`` describing shard ``i``.
        shards: the matching shard frame (:func:`imgcurate._dask.shard_frame`).
        path: the output folder (local or fsspec URL), created if needed.
        source: the input folder (the output must differ from it).
        id_col: the key column.
        storage_options: passed to fsspec for the input (and for the output, unless ``output_storage_options``).
        output_storage_options: passed to fsspec for the output folder; None uses ``storage_options`` (reading
            from one object store or account and writing to another needs both).
        filter_column: a boolean metadata column; rows where it is true are kept (null counts as false). None keeps
            every row of the metadata frame.
        samples_per_shard: samples per output shard (the last one may hold fewer).
        max_shards: write at most this many shards (the first ones, in order); None writes all.
        old_id_col: if given, the old key of each sample is kept in this column.
        overwrite: replace the shards already in ``path``; otherwise a folder with shards in it is an error.
        index_files: also write each shard's DALI index (``NNNNN.idx``), for ``use_index_files=True`` readers.
        input_schema: the arrow schema the metadata was read from: columns whose dtype is still the one their type
            there is read as are written with that type (:func:`_input_types`), so that re-exporting an export keeps
            its parquet schema and bytes. None writes the types the frame converts to.
        column_types: the arrow types steps declared for the columns they added
            (:attr:`ImageTextPairDataset.column_types`): a declared fixed-size list (an embedding) is written with
            its fixed size where the frame holds a plain list (as cuDF does), so an export has one schema on either
            backend.
        on_start: called once the output folder is found fit to write (no shards, or ``overwrite``), before
            anything is written there: a pipeline records there that its export began.

    Returns:
        The number of samples written.

    Raises:
        ValueError: bad arguments (unknown or non-boolean filter column, output equal to input, nothing selected).
        FileExistsError: ``path`` already holds shards and ``overwrite`` is false.
        AlignmentError: a metadata partition no longer matches its tar.
    """
    so = dict(storage_options or {})
    out_so = so if output_storage_options is None else dict(output_storage_options)
    _check_arguments(metadata, filter_column, samples_per_shard, max_shards, old_id_col)
    samples_per_shard, max_shards = int(samples_per_shard), None if max_shards is None else int(max_shards)
    fs, out_root = fsspec.core.url_to_fs(path, **out_so)
    check_reachable(fs, path)
    src_fs, src_root = fsspec.core.url_to_fs(source, **so)
    if type(src_fs) is type(fs) and same_folder(fs, out_root, src_root):
        raise ValueError(f"{path}: the output folder must differ from the input folder")
    existing_shards(fs, out_root, path, overwrite)
    blocked = in_the_way(fs, out_root)
    if blocked is not None:
        where, what = blocked
        raise NotADirectoryError(f"{path}: cannot be made a folder: {task_url(fs, where)} is {what}")
    if on_start is not None:
        on_start()
    made = not fs.exists(out_root)
    fs.makedirs(out_root, exist_ok=True)
    remove_temporaries(fs, out_root, of=MANIFEST)  # the one file an export writes there under a temporary name
    out_dir = task_url(fs, out_root)
    stage_dir = posixpath.join(out_dir, STAGING)
    fs.makedirs(posixpath.join(out_root, STAGING, "select"), exist_ok=True)

    types = _input_types(metadata, input_schema)
    types.update(_fixed_size_lists(metadata, column_types))
    selected = selection(metadata, shards, stage_dir, filter_column, so, types, out_so)
    # one small row per shard comes back: its count, its digest, and its schema only where it differs from the meta's
    with _staging_kept(fs, out_root, path):
        (table,) = progress.compute([selected], desc="export: selecting", unit="shard")
    table = table.sort_values("shard")
    counts = table["count"].astype(int).tolist()
    declared = _declared_schema(metadata, types)
    first_with: dict[bytes, str] = {}  # each distinct schema of the shards with kept rows, and the first such shard
    for s, n, tar in zip(table["schema"], counts, table["tar"], strict=True):
        if n:
            first_with.setdefault(s or declared, tar)
    first_with = first_with or {declared: path}
    schemas = sorted(first_with)
    schema = unify([pa.ipc.read_schema(pa.py_buffer(s)) for s in schemas], [first_with[s] for s in schemas])
    plan = _plan(counts, samples_per_shard, max_shards)
    if not plan:  # nothing to write or resume: the folder is left as it was (the select pass staged no rows)
        remove_tree(fs, out_root if made else posixpath.join(out_root, STAGING))
        raise ValueError(f"{path}: no sample is selected for export (filter_column={filter_column!r})")
    tars = table["tar"].tolist()
    table = table.drop(columns=["schema"])
    fingerprint = hashlib.sha256(
        json.dumps(
            [table["digest"].tolist(), table["stamp"].tolist(), tars, samples_per_shard, max_shards, id_col,
             old_id_col, index_files, schema.serialize().to_pybytes().hex()]
        ).encode()
    ).hexdigest()  # fmt: skip
    staged = _staged_shards(fs, posixpath.join(out_root, STAGING), fingerprint, len(plan), index_files, out_so)
    todo = [s for s in range(len(plan)) if s not in staged]
    tasks = write_tasks(plan, todo, tars, stage_dir, samples_per_shard, id_col, old_id_col, schema, so, index_files,
                        out_so)  # fmt: skip
    with _staging_kept(fs, out_root, path):
        progress.compute(tasks, desc="export: writing shards", unit="shard")
    _check_own_staging(fs, posixpath.join(out_root, STAGING), fingerprint, path)
    publish(fs, out_root, len(plan), index_files, [sum(b - a for _, a, b in slices) for slices in plan])
    return sum(b - a for slices in plan for _, a, b in slices)


def _staged_shards(
    fs: fsspec.AbstractFileSystem, stage_root: str, fingerprint: str, n_out: int, index_files: bool,
    storage_options: dict | None = None,
) -> set[int]:  # fmt: skip
    """The output shards already complete in the staging folder from a run of the same plan (none otherwise)."""
    if _staged_plan(fs, stage_root) != fingerprint:
        for stale in files_in(fs, stage_root, *_SHARD_FILES):
            fs.rm(stale)
        with atomic_open(task_url(fs, posixpath.join(stage_root, "plan.json")), "wb", storage_options) as f:
            f.write(json.dumps({"fingerprint": fingerprint}).encode())
        return set()
    remove_temporaries(fs, stage_root)
    exts = _SHARD_EXTS if index_files else _SHARD_EXTS[:2]
    present = set(files_in(fs, stage_root, "*.*"))
    return {s for s in range(n_out) if all(posixpath.join(stage_root, f"{s:05d}.{e}") in present for e in exts)}


def _footer(f: Any) -> bytes:
    """The footer of an open parquet file (its metadata: schema, row groups, column sizes and statistics)."""
    f.seek(-8, 2)
    length = int.from_bytes(f.read(4), "little")
    f.seek(-8 - length, 2)
    return f.read(length)


#: What an export says when it finds that another export into the same folder ran at the same time.
CONCURRENT = "another export into this folder ran at the same time (run one export per folder at a time), then rerun"


@contextlib.contextmanager
def _staging_kept(fs: fsspec.AbstractFileSystem, out_root: str, path: str) -> Iterator[None]:
    """A task that finds the staging folder gone (another export published or cleaned up the same folder meanwhile)
    is a :class:`ConcurrentExportError`, not the missing path."""
    try:
        yield
    except FileNotFoundError as err:
        # only a path inside this export's own staging folder (which it made) counts: a missing input tar is itself
        missing = str(err.filename or err)
        stage_root = posixpath.join(out_root, STAGING)
        fs.invalidate_cache(stage_root)
        if STAGING not in missing or fs.exists(posixpath.join(stage_root, "select")):
            raise
        raise ConcurrentExportError(f"{path}: the staging folder was removed while this export wrote into it: "
                                    f"{CONCURRENT}") from None  # fmt: skip


def _staged_plan(fs: fsspec.AbstractFileSystem, stage_root: str) -> str | None:
    """The fingerprint of the plan whose shards the staging folder holds; None without one, or for a ``plan.json``
    that is not what an export writes (an empty file a kill left: its staged shards are of no known plan)."""
    marker = posixpath.join(stage_root, "plan.json")
    fs.invalidate_cache(stage_root)  # an object store's listing cached before the plan was written
    try:
        with fs.open(marker, "rb") as f:
            found = json.loads(f.read())
    except (FileNotFoundError, ValueError, RecursionError):
        return None
    return found.get("fingerprint") if isinstance(found, dict) else None


def _check_own_staging(fs: fsspec.AbstractFileSystem, stage_root: str, fingerprint: str, path: str) -> None:
    """Raises :class:`ConcurrentExportError` when the staging folder's plan is no longer this export's: another
    export into the same folder replaced it (and its staged shards) while this one wrote."""
    if _staged_plan(fs, stage_root) != fingerprint:
        raise ConcurrentExportError(f"{path}: the staged shards are not this export's: {CONCURRENT}")


def publish(
    fs: fsspec.AbstractFileSystem, root: str, n_out: int, index_files: bool, rows: list[int] | None = None
) -> None:
    """Replaces the shards in ``root`` by the staged ones, behind the incomplete-export marker (see module docs).

    ``rows`` (the samples each new shard must hold) is checked against the published parquets before the manifest
    is written: a shard of another export published at the same time leaves the folder marked as not finished, with
    an error, instead of a mix that opens. The manifest also holds a digest of the shards' parquet footers (their
    schema, sizes and column statistics), so that it names this export and not another one of the same shard sizes;
    it depends on the shards' bytes only, so the same export written twice has the same manifest."""
    stage_root = posixpath.join(root, STAGING)
    marker = posixpath.join(root, INCOMPLETE_MARKER)
    with fs.open(marker, "wb") as f:
        f.write(json.dumps({"staging": STAGING, "shards": n_out}).encode())
    exts = _SHARD_EXTS if index_files else _SHARD_EXTS[:2]
    new = {f"{s:05d}.{ext}" for s in range(n_out) for ext in exts}
    manifest = posixpath.join(root, MANIFEST)
    if fs.exists(manifest):
        fs.rm(manifest)
    # the old shards, and img2dataset's statistics files, which describe the old shards, not the new ones
    for old in _shard_files(fs, root):
        if posixpath.basename(old) not in new:
            fs.rm(old)
    shards = []
    footers = hashlib.sha256()
    for s in range(n_out):
        for ext in exts:
            name = f"{s:05d}.{ext}"
            staged = posixpath.join(stage_root, name)
            if fs.exists(staged):  # a rerun after a crash in this loop finds some files already moved
                fs.mv(staged, posixpath.join(root, name))
        with fs.open(posixpath.join(root, f"{s:05d}.parquet"), "rb") as f:
            shards.append({"tar": f"{s:05d}.tar", "samples": pq.ParquetFile(f).metadata.num_rows})
            footers.update(_footer(f))
        if rows is not None and shards[-1]["samples"] != rows[s]:
            found = shards[-1]["samples"]
            raise ConcurrentExportError(f"{task_url(fs, root)}: {s:05d}.parquet holds {found} samples where this "
                                        f"export wrote {rows[s]}: {CONCURRENT}")  # fmt: skip
    tmp = temp_name(manifest)
    with fs.open(tmp, "wb") as f:
        done = {"shards": shards, "samples": sum(s["samples"] for s in shards), "parquet_footers": footers.hexdigest()}
        f.write(json.dumps(done, indent=1).encode())
    fs.mv(tmp, manifest)
    remove_tree(fs, stage_root)  # on an object store it is gone once its last file has moved
    fs.rm(marker)
