"""Re-sharding the kept samples of a dataset into new WebDataset shards, streaming and in parallel on Dask.

Two passes, both over Dask:

1. *Stage*: each metadata partition is computed once; its kept rows (``filter_column`` true; null counts as false)
   go to a temporary parquet and their count comes back.
2. *Write*: the counts fix, before any shard is written, which output shard every kept sample lands in and its new
   key. Each output shard is then written by exactly one task, which streams the samples it needs from the input
   tars, one sample in memory at a time, and copies every member's bytes unchanged.

So the result does not depend on the number of workers, no two tasks write the same file, and memory stays flat:
a worker holds at most one metadata partition (pass 1) or one output shard's metadata (pass 2), never image bytes
beyond the current sample. Tars and parquet files are written under temporary names and renamed when complete, and
their bytes are the same on every run (fixed mtime, owner, mode and order).

New keys: sample ``j`` (from 0) of output shard ``s`` gets ``f"{s:05d}{j:0Nd}"`` where ``N`` is the number of digits
of ``samples_per_shard - 1`` (see :func:`imgcurate.io.shards.new_key`); export order is input order.
"""

from __future__ import annotations

import math
import posixpath
import uuid
from typing import TYPE_CHECKING, Any

import dask
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgcurate import progress
from imgcurate.io.shards import ShardWriter, new_key
from imgcurate.io.tar import aligned_samples

if TYPE_CHECKING:
    from imgcurate.dataset import ImageTextPairDataset


def partition_to_arrow(part: Any, arrow_types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """A metadata partition (pandas or cuDF) as an arrow table, with the declared types of array columns."""
    if isinstance(part, pd.DataFrame):
        table = pa.Table.from_pandas(part, preserve_index=False)
    else:
        table = part.to_arrow(preserve_index=False)
    for name, arrow_type in (arrow_types or {}).items():
        if name in table.column_names and table.column(name).type != arrow_type:
            index = table.column_names.index(name)
            table = table.set_column(index, pa.field(name, arrow_type), table.column(name).cast(arrow_type))
    return table


def _keep_mask(part: pd.DataFrame, filter_column: str | None) -> Any:
    if filter_column is None:
        return None
    return part[filter_column].fillna(False).astype(bool)


def _stage(part: Any, index: int, tmp_dir: str, filter_column: str | None, arrow_types: dict, so: dict):
    mask = _keep_mask(part, filter_column)
    kept = part if mask is None else part[mask]
    table = partition_to_arrow(kept, arrow_types)
    if table.num_rows:
        with fsspec.open(posixpath.join(tmp_dir, f"{index:05d}.parquet"), "wb", **so) as f:
            pq.write_table(table, f)
    return table.num_rows, table.schema


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
    slices: list[tuple[int, int, int]],
    tar_files: list[str],
    tmp_dir: str,
    out_dir: str,
    samples_per_shard: int,
    id_col: str,
    old_id_col: str | None,
    schema: pa.Schema,
    so: dict,
    index: bool,
) -> int:
    from imgcurate.dataset import _conform

    tables = []
    with ShardWriter(posixpath.join(out_dir, f"{shard:05d}.tar"), storage_options=so, index=index) as writer:
        for part, first, end in slices:
            with fsspec.open(posixpath.join(tmp_dir, f"{part:05d}.parquet"), "rb", **so) as f:
                table = pq.read_table(f).slice(first, end - first)
            for sample in aligned_samples(tar_files[part], table.column(id_col).to_pylist(), so):
                # a row without a sample (img2dataset's failed downloads) stays a row without a sample
                writer.write(new_key(shard, writer.count, samples_per_shard), {} if sample is None else sample.members)
            tables.append(_conform(table, schema))
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


def export_webdataset(
    dataset: ImageTextPairDataset,
    path: str,
    *,
    filter_column: str | None = None,
    samples_per_shard: int = 10000,
    max_shards: int | None = None,
    old_id_col: str | None = None,
    overwrite: bool = False,
    index_files: bool = False,
) -> ImageTextPairDataset:
    """Writes the samples of ``dataset`` whose ``filter_column`` is true into new shards under ``path``.

    Args:
        dataset: the source dataset.
        path: the output folder (local or fsspec URL), created if needed.
        filter_column: a boolean metadata column; rows where it is true are kept (null counts as false). None keeps
            every row of the metadata frame.
        samples_per_shard: samples per output shard (the last one may hold fewer).
        max_shards: write at most this many shards (the first ones, in order); None writes all.
        old_id_col: if given, the old key of each sample is kept in this column.
        overwrite: replace the shards already in ``path``; otherwise a folder with shards in it is an error.
        index_files: also write each shard's DALI index (``NNNNN.idx``), for ``use_index_files=True`` readers.

    Returns:
        The new dataset, opened from ``path``.

    Raises:
        ValueError: bad arguments (unknown or non-boolean filter column, output equal to input, ...).
        FileExistsError: ``path`` already holds shards and ``overwrite`` is false.
        AlignmentError: a metadata partition no longer matches its tar.
    """
    from imgcurate.dataset import ImageTextPairDataset, _unify

    df, id_col, so = dataset.metadata, dataset.id_col, dataset.storage_options
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if max_shards is not None and max_shards < 0:
        raise ValueError(f"max_shards must be None or >= 0, got {max_shards}")
    if filter_column is not None:
        if filter_column not in df.columns:
            raise ValueError(f"filter_column {filter_column!r} is not a metadata column ({', '.join(df.columns)})")
        if not pd.api.types.is_bool_dtype(df[filter_column].dtype):
            raise ValueError(f"filter_column {filter_column!r} must be boolean, not {df[filter_column].dtype}")
    if old_id_col is not None and old_id_col in df.columns:
        raise ValueError(f"old_id_col {old_id_col!r} is already a metadata column")
    fs, out_root = fsspec.core.url_to_fs(path, **so)
    src_root = fsspec.core.url_to_fs(dataset.path, **so)[1]
    if posixpath.normpath(out_root) == posixpath.normpath(src_root):
        raise ValueError(f"{path}: the output folder must differ from the input folder")
    existing = [f for ext in ("tar", "parquet", "idx") for f in fs.glob(posixpath.join(out_root, f"*.{ext}"))]
    if existing and not overwrite:
        raise FileExistsError(f"{path}: already holds shards; pass overwrite=True to replace them")
    fs.makedirs(out_root, exist_ok=True)
    out_dir = path.rstrip("/")
    tmp_dir = posixpath.join(out_dir, f".imgcurate-tmp-{uuid.uuid4().hex[:12]}")
    fs.makedirs(fsspec.core.url_to_fs(tmp_dir, **so)[1], exist_ok=True)
    try:
        staged = progress.compute(
            [
                dask.delayed(_stage)(part, i, tmp_dir, filter_column, dataset.arrow_types, so)
                for i, part in enumerate(df.to_delayed())
            ],
            desc="export: selecting",
        )
        counts = [n for n, _ in staged]
        schema = _unify([s for _, s in staged], dataset.tar_files)
        plan = _plan(counts, samples_per_shard, max_shards)
        if not plan:
            raise ValueError(f"{path}: no sample is selected for export (filter_column={filter_column!r})")
        write = dask.delayed(_write_shard, pure=False)
        progress.compute(
            [
                write(
                    s,
                    slices,
                    dataset.tar_files,
                    tmp_dir,
                    out_dir,
                    samples_per_shard,
                    id_col,
                    old_id_col,
                    schema,
                    so,
                    index_files,
                )  # fmt: skip
                for s, slices in enumerate(plan)
            ],
            desc="export: writing shards",
        )
    finally:
        fs.rm(fsspec.core.url_to_fs(tmp_dir, **so)[1], recursive=True)
    exts = ("tar", "parquet", "idx") if index_files else ("tar", "parquet")
    written = {f"{s:05d}.{ext}" for s in range(len(plan)) for ext in exts}  # an old index of a new tar goes too
    for stale in existing:
        if posixpath.basename(stale) not in written:
            fs.rm(stale)
    return ImageTextPairDataset.from_webdataset(path, id_col, storage_options=so, validate=False)
