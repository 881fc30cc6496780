"""ImageTextPairDataset: WebDataset tar shards plus a Dask metadata frame, one partition per shard.

The invariant that everything relies on: ``metadata.partitions[i]`` describes samples of ``tar_files[i]``, in tar
order. Rows may be dropped (a filtered frame is still aligned) but never moved to another partition or reordered.
The partition count is checked whenever a frame goes back into a dataset; the keys are checked against the tar
whenever a step reads the shard, so a broken alignment is always an error, never a silent mismatch.
"""

from __future__ import annotations

import concurrent.futures
import functools
import posixpath
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcurate import progress
from imgcurate._dask import map_with_shard, row_ids, shard_divisions, shard_frame, zip_columns
from imgcurate.backends import get_backend, resolve_backend_name, to_arrow
from imgcurate.errors import AlignmentError, ShardError
from imgcurate.io._fs import check_reachable, files_in, folder_fs, shard_tars, task_url, write_parquet
from imgcurate.io.export import check_export_complete, check_listed_shards
from imgcurate.io.schema import conform, parquet_path_for
from imgcurate.io.shards import ERROR_COLUMN, KEY_COLUMN, scan_shard
from imgcurate.io.validate import (
    STATUS_COLUMN,
    STATUS_MESSAGE_COLUMN,
    check_scanned_stats,
    check_shard,
    check_unique_keys,
    stats_path_for,
    unify_schemas,
    with_status_errors,
)

__all__ = ["ImageTextPairDataset"]


@dataclass(frozen=True)
class _Part:
    """What one metadata partition is read from: a parquet path or an in-memory table."""

    tar: str
    parquet: str | None
    table: pa.Table | None


def _read_partition(item: tuple[int, _Part], schema: pa.Schema, backend: str, storage_options: dict) -> Any:
    shard, part = item
    if part.table is not None:
        table = part.table
    else:
        try:
            with fsspec.open(part.parquet, "rb", **storage_options) as f:
                table = pq.read_table(f, columns=[n for n in schema.names if n in pq.read_schema(f).names])
        except (OSError, pa.ArrowException) as err:
            raise ShardError(part.parquet, f"cannot read parquet ({err})") from None
    frame = get_backend(backend).from_arrow(conform(with_status_errors(table), schema))
    frame.index = row_ids(shard, len(frame))  # global row ids: see imgcurate._dask
    return frame


def _still_declared(types: dict[str, pa.DataType], before: Any, after: Any) -> dict[str, pa.DataType]:
    """The declared types of the columns that a new frame (``after``'s meta) still holds as they were (``before``'s):
    a column replaced with values of another dtype, or dropped, loses its declared type."""
    kept = set(map(str, after.columns)) & set(map(str, before.columns))
    return {name: t for name, t in types.items() if name in kept and after[name].dtype == before[name].dtype}


class ImageTextPairDataset:
    """Image-text pairs in WebDataset tar shards, described by a Dask metadata frame with one partition per shard.

    Args:
        path: the folder (local path or fsspec URL) that holds the shards.
        metadata: the Dask frame, partition ``i`` describing ``tar_files[i]``.
        tar_files: the shard paths, in order.
        id_col: the column that holds sample keys.
        storage_options: passed to fsspec for every file access.
        shards: the shard frame (one row per shard: its index and tar path, :func:`imgcurate._dask.shard_frame`);
            None builds it from ``tar_files``.
        input_schema: the arrow schema the metadata was read from (:meth:`from_webdataset` gives it), kept through
            :meth:`with_metadata`; the export writes each column that still has the dtype it was read as with its
            input type (see :attr:`input_schema`).
        input_rows: the number of rows the metadata was read with (:meth:`from_webdataset` gives it, from the
            parquet footers), kept through :meth:`with_metadata` (an upper bound on the rows of a frame given there);
            steps check against it before any work (see :attr:`input_rows`).
        column_types: the arrow types that steps declare for the columns they added (see :attr:`column_types`).

    Example:
        >>> ds = ImageTextPairDataset.from_webdataset("shards/")  # doctest: +SKIP
        >>> df = ds.metadata
        >>> ds = ds.with_metadata(df.assign(keep=df.width >= 256))
        >>> ds.to_webdataset("curated/", filter_column="keep")
    """

    def __init__(
        self,
        path: str,
        metadata: dd.DataFrame,
        tar_files: Sequence[str],
        id_col: str = KEY_COLUMN,
        *,
        storage_options: dict | None = None,
        shards: dd.DataFrame | None = None,
        input_schema: pa.Schema | None = None,
        input_rows: int | None = None,
        column_types: Mapping[str, pa.DataType] | None = None,
    ):
        self.path = path
        self.tar_files = list(tar_files)
        self.id_col = id_col
        self.storage_options = dict(storage_options or {})
        self._input_schema = input_schema
        self._input_rows = input_rows
        names = set(map(str, metadata.columns))
        self._column_types = {name: t for name, t in (column_types or {}).items() if name in names}
        if shards is not None:
            self.__dict__["shards"] = shards
        self._metadata = self._checked(metadata)

    # ------------------------------------------------------------------ opening
    @classmethod
    def from_webdataset(
        cls,
        path: str,
        id_col: str = KEY_COLUMN,
        *,
        storage_options: dict | None = None,
        backend: str | None = None,
        validate: bool = True,
    ) -> ImageTextPairDataset:
        """Opens a folder of ``*.tar`` shards with their per-shard parquet files.

        A shard without its parquet gets one built by scanning the tar (with a progress bar) and written beside it.
        Files that do not end in ``.tar`` are ignored.

        Args:
            path: the folder, a local path or any fsspec URL.
            id_col: the column of sample keys.
            storage_options: passed to fsspec.
            backend: ``auto``, ``pandas`` or ``cudf``; None reads the ``imgcurate.backend`` config key.
            validate: check each shard completely (see :mod:`imgcurate.io.validate`): decode every parquet column,
                read each tar's headers to its end and check its keys against the parquet's, and check that no key is
                in two shards (cheap on local disks; on remote stores every header is a request and every parquet is
                read once, so turn it off there once a dataset is known to be sound).

        Returns:
            The dataset, its metadata frame lazily reading one parquet per partition.

        Raises:
            FileNotFoundError: the folder holds no tar shard.
            ValueError: a location fsspec cannot open (an unknown protocol, or its package not installed).
            ShardError: a tar is unreadable or truncated, a parquet lacks ``id_col``, or a parquet's keys differ from
                its tar's (naming the shard and the first differing key); a parquet has no tar beside it, or the
                folder's export manifest lists a tar that is not there (a shard would be left out without a word).
        """
        storage_options = dict(storage_options or {})
        backend = resolve_backend_name(backend)
        fs, root = folder_fs(path, storage_options)
        check_reachable(fs, path)
        check_export_complete(fs, root, path)
        tars = shard_tars(fs, root, path)
        existing = set(files_in(fs, root, "*.parquet"))
        check_listed_shards(fs, root, tars)
        lost: dict[str, int] = {}  # shard -> failed downloads that only its missing parquet recorded

        def prepare(tar: str) -> tuple[_Part, pa.Schema, int]:
            full_tar = task_url(fs, tar)
            pq_path = parquet_path_for(tar)
            full_pq = task_url(fs, pq_path)
            if pq_path not in existing:
                if fs.isdir(pq_path):  # a dataset folder of parquet parts (Spark, Dask): not read, and not written into
                    raise ShardError(
                        full_pq,
                        "is a folder, not a parquet file: a shard's metadata is one parquet file "
                        "beside its tar (move the folder away to have it rebuilt from the tar)",
                    )
                table = scan_shard(full_tar, id_col, storage_options)
                failed = check_scanned_stats(full_tar, storage_options, table.num_rows)
                if failed:
                    lost[full_tar] = failed
                try:
                    write_parquet(table, full_pq, storage_options)
                except OSError as err:
                    message = f"{full_pq}: could not write the scanned metadata ({err}); keeping it in memory"
                    warnings.warn(message, stacklevel=2)
                    return _Part(full_tar, None, table), table.schema, table.num_rows
                return _Part(full_tar, full_pq, None), table.schema, table.num_rows
            return _Part(full_tar, full_pq, None), *check_shard(full_tar, full_pq, id_col, storage_options, validate)

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            prepared = list(progress.bar(pool.map(prepare, tars), desc="opening shards", total=len(tars), unit="shard"))
        if lost:  # one warning for the folder, not one per shard
            first = min(lost)
            warnings.warn(f"{len(lost)} shard(s) had no parquet: their metadata was rebuilt from the tars, which hold "
                          f"no row for the {sum(lost.values())} failed downloads that img2dataset's statistics files "
                          f"record (the first: {stats_path_for(first)})", stacklevel=2)  # fmt: skip
        parts = [p for p, _, _ in prepared]
        schema = unify_schemas([s for _, s, _ in prepared], [p.tar for p in parts])
        if validate:
            sources = [p.parquet if p.table is None else p.table for p in parts]
            check_unique_keys(sources, [p.tar for p in parts], id_col, storage_options)
        metadata = cls._metadata_frame(parts, schema, backend, storage_options)
        return cls(path, metadata, [p.tar for p in parts], id_col, storage_options=storage_options,
                   input_schema=schema, input_rows=sum(n for _, _, n in prepared))  # fmt: skip

    @staticmethod
    def _metadata_frame(parts: list[_Part], schema: pa.Schema, backend: str, storage_options: dict) -> dd.DataFrame:
        meta = get_backend(backend).from_arrow(schema.empty_table())
        meta.index = row_ids(0, 0)
        # Our reader already gives strings their arrow-backed dtype; dask's own string conversion would also turn
        # object columns that hold arrays (embeddings) into text.
        config = {"dataframe.backend": get_backend(backend).dask_backend, "dataframe.convert-string": False}
        with dask.config.set(config):
            return dd.from_map(
                _read_partition,
                list(enumerate(parts)),
                args=[schema, backend, storage_options],
                meta=meta,
                divisions=shard_divisions(len(parts)),
                label="imgcurate-metadata",
                enforce_metadata=False,
            )

    # ------------------------------------------------------------------ metadata
    @property
    def metadata(self) -> dd.DataFrame:
        """The Dask metadata frame: partition ``i`` describes ``tar_files[i]``."""
        return self._metadata

    @property
    def column_types(self) -> dict[str, pa.DataType]:
        """The arrow types that steps declared for the columns they added (kept through :meth:`with_metadata` while
        the column exists). cuDF holds a fixed-size list (an embedding) as a plain list, so the export writes such a
        column with its declared fixed size on either backend."""
        return dict(self._column_types)

    @property
    def input_schema(self) -> pa.Schema | None:
        """The arrow schema of the input's parquet files, unified over the shards (None for a dataset built from a
        frame of its own).

        Reading maps several arrow types to one dtype (every integer width to ``Int64``, a dictionary of any index
        width to ``category``, plain and large strings to text), so the export writes a column whose dtype is still
        the one its input type is read as with that input type (unless some shard's values no longer fit it: then
        every output shard has the type the frame converts to). An export of an export writes the same parquet bytes.
        """
        return self._input_schema

    @property
    def input_rows(self) -> int | None:
        """The number of rows of the input as opened, summed over the parquet footers (or the scanned tars) without
        reading data; None for a dataset built from a frame of its own. Steps add columns and never rows, so this
        bounds the rows a step sees from above (a frame given to :meth:`with_metadata` may hold fewer);
        :meth:`Step.check_rows` compares it with the minimum a step needs (semantic dedup: ``n_clusters``), so that a
        run fails before its embedding pass, not after it."""
        return self._input_rows

    @property
    def num_shards(self) -> int:
        """The number of shards (tar files), which is the metadata's number of partitions."""
        return len(self.tar_files)

    def _checked(self, metadata: dd.DataFrame) -> dd.DataFrame:
        if not isinstance(metadata, dd.DataFrame):
            raise TypeError(f"metadata must be a dask DataFrame, got {type(metadata).__name__}")
        if metadata.npartitions != len(self.tar_files):
            raise AlignmentError(
                f"metadata has {metadata.npartitions} partitions for {len(self.tar_files)} tar shards: partition i must"
                " describe tar_files[i]. Do not repartition or drop partitions; select samples with a boolean column "
                "(or row filters, which keep the partitioning) instead."
            )
        if self.id_col not in metadata.columns:
            raise AlignmentError(f"metadata has no {self.id_col!r} column, which ties its rows to the tar samples")
        if tuple(metadata.divisions) != shard_divisions(len(self.tar_files)):
            # a frame built elsewhere: give its rows their global ids, so Dask keeps it aligned with the shards
            metadata = map_with_shard(_as_is, metadata, self.shards, meta=metadata._meta)
        return metadata

    @functools.cached_property
    def shards(self) -> dd.DataFrame:
        """A Dask frame with one row per shard (``shard``: its index, ``tar``: its path), one partition per shard.

        Zipped partition by partition with :attr:`metadata`, it hands each task its own tar path and nothing else
        (see :meth:`map_shards`).
        """
        return shard_frame(self.tar_files)

    def with_metadata(self, metadata: dd.DataFrame) -> ImageTextPairDataset:
        """A dataset over the same shards with a new metadata frame.

        Args:
            metadata: a frame derived from :attr:`metadata` (new columns, row filters), one partition per shard.

        Raises:
            AlignmentError: the frame's partition count differs from the shard count or it lacks the id column.
                Keys are also checked against each tar whenever a step reads it.
        """
        return type(self)(
            self.path, metadata, self.tar_files, self.id_col, storage_options=self.storage_options,
            shards=self.__dict__.get("shards"), input_schema=self._input_schema, input_rows=self._input_rows,
            column_types=_still_declared(self._column_types, self._metadata._meta, metadata._meta),
        )  # fmt: skip

    def with_columns(
        self, columns: dd.DataFrame, types: Mapping[str, pa.DataType] | None = None
    ) -> ImageTextPairDataset:
        """A dataset whose metadata has the columns of ``columns`` added (or replaced).

        Args:
            columns: a frame with one partition per shard holding, for each metadata row in order, the new values
                (what a step computes; see :mod:`imgcurate.steps.base`).
            types: the arrow types the columns were declared with (a step's ``output_columns()``), kept in
                :attr:`column_types`; a replaced column without one loses the type declared before.
        """
        out = self.with_metadata(zip_columns(self._metadata, columns))
        new = set(map(str, columns.columns))
        declared = {name: t for name, t in self._column_types.items() if name not in new}
        declared.update({name: t for name, t in (types or {}).items() if name in new})
        out._column_types = declared
        return out

    def map_shards(self, func: Callable, *args: Any, meta: Any, frame: dd.DataFrame | None = None) -> dd.DataFrame:
        """``func(partition, shard, *args)`` on each metadata partition, ``shard`` being its
        :class:`~imgcurate._dask.Shard` (index and tar path). Each task carries its own shard only.

        Args:
            func: the per-shard function; it returns a partition like ``meta``.
            *args: further arguments, the same for every shard (keep them small: they travel with every task).
            meta: the empty frame of what ``func`` returns.
            frame: the frame to map (default: :attr:`metadata`); it must have one partition per shard.
        """
        return map_with_shard(func, self._metadata if frame is None else frame, self.shards, *args, meta=meta)

    def persist(self, desc: str = "computing metadata") -> ImageTextPairDataset:
        """The same dataset with its metadata computed now and held in memory.

        Steps are lazy: until something computes the frame, an embedder added to it has not run. Whatever computes
        a lazy frame runs every step behind it again, so anything that reads the frame more than once (a report
        followed by an export) should read a persisted dataset. Within one compute every step runs once per shard,
        dedup steps included. A pipeline with a run directory writes each step's results to disk instead of holding
        them in memory. Under a distributed client the partitions stay on the workers. ``desc`` labels the
        progress bar.

        Example:
            >>> ds = TimmImageEmbedder("resnet50")(ds).persist()  # doctest: +SKIP
        """
        return self.with_metadata(progress.persist(self._metadata, desc=desc))

    def save_metadata(self, path: str | None = None, columns: Sequence[str] | None = None) -> list[str]:
        """Writes the metadata as one parquet per shard, named after the tars (``00012.tar`` -> ``00012.parquet``).

        Args:
            path: the folder to write to; None overwrites the parquet files beside the tars (atomically), which
                then must still describe their tars: each shard's rows are its parquet's rows, in order, and the
                columns that record failed downloads (``status``, ``error_message``, ``error``) are kept.
            columns: the columns to write (the id column is always written); None writes all.

        Returns:
            The paths written.

        Raises:
            ShardError: in place, a shard whose rows or failure columns the frame changed (a row filter, or
                ``columns`` leaving out ``status``): its parquet is left as it was (and the other shards' are
                written; each of them still describes its tar). Write such a frame to another folder, or export it.
        """
        df = self._metadata
        if columns is not None:
            df = df[[self.id_col, *[c for c in columns if c != self.id_col]]]
        if path is not None:
            fs, root = fsspec.core.url_to_fs(path, **self.storage_options)
            check_reachable(fs, path)
            fs.makedirs(root, exist_ok=True)
            path = task_url(fs, root)
        written = self.map_shards(_save_partition, path, self.storage_options, self.id_col,
                                  meta=pd.Series([], dtype=object), frame=df)  # fmt: skip
        return progress.compute([written], desc="saving metadata")[0].tolist()

    # ------------------------------------------------------------------ export
    def to_webdataset(
        self,
        path: str,
        filter_column: str | None = None,
        samples_per_shard: int = 10000,
        max_shards: int | None = None,
        old_id_col: str | None = None,
        *,
        overwrite: bool = False,
        index_files: bool = False,
        storage_options: dict | None = None,
    ) -> ImageTextPairDataset:
        """Re-shards the kept samples into new tar shards with their parquet, copying member bytes unchanged.

        See :func:`imgcurate.io.export.export_webdataset` for the details (key scheme, streaming, atomicity).

        Args:
            path: the output folder (local or an fsspec URL); it must differ from the input.
            filter_column: a boolean metadata column: the rows where it is true are exported (null counts as false).
                None exports every row.
            samples_per_shard: samples per output shard (the last one may hold fewer).
            max_shards: write only the first this many shards (a subset); None writes every kept sample.
            old_id_col: keep each sample's old key in this column (the export gives new keys).
            overwrite: replace the shards already in ``path``; otherwise a folder holding shards is an error.
            index_files: also write each shard's DALI index (``.idx``).
            storage_options: fsspec's options for ``path``; None uses the dataset's own (give them to read from one
                object store, bucket or account and write to another, e.g. ``s3://`` input to a local folder).

        Returns:
            The new dataset, opened from ``path`` (with ``storage_options``).

        Raises:
            ValueError: an unknown or non-boolean filter column, ``path`` equal to the input, or nothing selected.
            FileExistsError: ``path`` holds shards and ``overwrite`` is false.
        """
        self._export(path, filter_column=filter_column, samples_per_shard=samples_per_shard, max_shards=max_shards,
                     old_id_col=old_id_col, overwrite=overwrite, index_files=index_files,
                     storage_options=storage_options)  # fmt: skip
        out_so = self.storage_options if storage_options is None else storage_options
        return ImageTextPairDataset.from_webdataset(path, self.id_col, storage_options=out_so, validate=False)

    def _export(self, path: str, **kwargs: Any) -> int:
        """:meth:`to_webdataset` without opening the export afterwards (a pipeline records the export it published
        first); returns the number of samples written."""
        from imgcurate.io.export import export_webdataset

        out_so = kwargs.pop("storage_options", None)
        return export_webdataset(
            self._metadata, self.shards, path, source=self.path, id_col=self.id_col,
            storage_options=self.storage_options, output_storage_options=out_so, input_schema=self._input_schema,
            column_types=self._column_types, **kwargs,
        )  # fmt: skip

    def __repr__(self) -> str:
        cols = ", ".join(map(str, self._metadata.columns))
        return f"ImageTextPairDataset(path={self.path!r}, shards={len(self.tar_files)}, columns=[{cols}])"


def _save_partition(part: Any, shard: Any, folder: str | None, storage_options: dict, id_col: str) -> pd.Series:
    target = parquet_path_for(shard.tar if folder is None else posixpath.join(folder, posixpath.basename(shard.tar)))
    table = to_arrow(part)
    if folder is None:
        _check_replaces(target, table, id_col, storage_options)
    write_parquet(table, target, storage_options)
    return pd.Series([target], dtype=object)


#: The columns that excuse a parquet row without a sample in the tar (img2dataset's failed downloads).
_FAILURE_COLUMNS = (STATUS_COLUMN, STATUS_MESSAGE_COLUMN, ERROR_COLUMN)


def _check_replaces(parquet: str, table: pa.Table, id_col: str, storage_options: dict) -> None:
    """``table`` may replace the shard's ``parquet`` beside its tar: the same keys in the same order, and every column
    of the parquet that records a failure (a status other than ``success``, an error) kept; else the folder would no
    longer open."""
    try:
        with fsspec.open(parquet, "rb", **storage_options) as f:
            pf = pq.ParquetFile(f)
            present = [name for name in _FAILURE_COLUMNS if name in pf.schema_arrow.names and name != id_col]
            old = pf.read(columns=[id_col, *present])
    except FileNotFoundError:  # its metadata was kept in memory (it could not be written at open)
        return
    keys = old.column(id_col).cast(pa.string())
    advice = "save to another folder (path=...) or export the selection with to_webdataset"
    new_keys = table.column(id_col).cast(pa.string())
    if not keys.equals(new_keys):
        how = (f"{len(new_keys)} rows where it has {len(keys)}" if len(new_keys) != len(keys)
               else "its keys changed or in another order")  # fmt: skip
        raise ShardError(parquet, f"cannot be replaced by metadata with other rows ({how}): it describes its tar; "
                                  f"{advice}")  # fmt: skip
    dropped = [name for name in present if name not in table.column_names and _records_failures(old.column(name))]
    if dropped:
        raise ShardError(parquet, f"cannot be replaced by metadata without its column {dropped[0]!r}, which records "
                                  f"failed downloads: include it in columns, or {advice}")  # fmt: skip


def _records_failures(column: pa.ChunkedArray) -> bool:
    values = column.cast(pa.string())
    return bool(pc.any(pc.fill_null(pc.not_equal(values, "success"), False)).as_py())


def _as_is(part: Any, shard: Any) -> Any:
    return part.copy(deep=False)
