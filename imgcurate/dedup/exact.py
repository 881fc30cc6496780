"""Exact duplicates: the same image bytes (or, optionally, the same decoded pixels) stored more than once."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa

from imgcurate._dask import Shard, zip_columns
from imgcurate.backends import with_columns
from imgcurate.io.tar import aligned_images
from imgcurate.steps.base import ShardIO, Step
from imgcurate.steps.grouped import ROW, SHARD, back_to_shards, by_group, host, place, positions

if TYPE_CHECKING:
    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["ExactDuplicates"]

_BY = ("bytes", "pixels")


def _pixel_digest(data: bytes) -> str:
    from imgcurate.embedders.decode import decode_rgb

    image = decode_rgb(data)
    digest = hashlib.sha256(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _hash_shard(part: Any, shard: Shard, io: ShardIO, by: str) -> pd.DataFrame:
    """Each row's key, digest (None without a readable image) and position, read from its shard's tar."""
    frame = host(part, [io.id_col])
    keys = frame[io.id_col].tolist()
    digests: list[str | None] = []
    for data, _ in aligned_images(shard.tar, keys, io.storage_options):
        if data is None:
            digests.append(None)
        elif by == "bytes":
            digests.append(hashlib.sha256(data).hexdigest())
        else:
            try:
                digests.append(_pixel_digest(data))
            except Exception:  # noqa: BLE001 - undecodable: no pixel hash, recorded as null
                digests.append(None)
    out = positions(frame, shard.index)
    out["key"] = pd.array(keys, dtype=object)
    out["digest"] = pd.array(digests, dtype=object)
    return out


_HASH_META = pd.DataFrame(
    {
        SHARD: pd.Series([], dtype="int64"),
        ROW: pd.Series([], dtype="int64"),
        "key": pd.Series([], dtype=object),
        "digest": pd.Series([], dtype=object),
    }
)
_MARK_META = pd.DataFrame(
    {SHARD: pd.Series([], dtype="int64"), ROW: pd.Series([], dtype="int64"), "of": pd.Series([], dtype=object)}
)


def _mark_copies(part: pd.DataFrame) -> pd.DataFrame:
    """Within whole hash groups: every row after the first (in shard, row order) is a copy of the first."""
    part = part.sort_values([SHARD, ROW], kind="stable")
    groups = part.groupby("digest", sort=False)
    first = groups["key"].transform("first")
    copies = groups.cumcount().to_numpy() > 0
    return pd.DataFrame({SHARD: part[SHARD].to_numpy()[copies], ROW: part[ROW].to_numpy()[copies],
                         "of": first.to_numpy()[copies]})  # fmt: skip


class ExactDuplicates(Step):
    """Marks every copy of an image but the first (in shard order) and says which sample it duplicates.

    The hashes are computed shard by shard; the first copy of each hash is found with a Dask shuffle on the hash
    (each hash's rows meet in one task on a worker), and the answers are shuffled back to their shards, so nothing
    that grows with the dataset is held by the client or carried by a task.

    Args:
        by: ``bytes`` hashes the stored image bytes (cheap); ``pixels`` hashes the decoded RGB pixels, which also
            catches the same image saved twice with different metadata (EXIF, PNG chunks) but costs a decode.
        hash_column: output column with the sha256 hex digest (null when the sample has no readable image).
        duplicate_column: output bool column, true for every copy after the first.
        duplicate_of_column: output column with the id of the first copy (null for firsts and uniques).

    Example:
        >>> ds = ExactDuplicates()(ds)  # doctest: +SKIP
        >>> ds.to_webdataset("out/", filter_column=...)  # keep ~exact_duplicate
    """

    def __init__(
        self,
        by: str = "bytes",
        hash_column: str = "image_sha256",
        duplicate_column: str = "exact_duplicate",
        duplicate_of_column: str = "exact_duplicate_of",
    ):
        if by not in _BY:
            raise ValueError(f"by must be one of {', '.join(_BY)}, got {by!r}")
        self.by = by
        self.hash_column = hash_column
        self.duplicate_column = duplicate_column
        self.duplicate_of_column = duplicate_of_column

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.hash_column: pa.string(), self.duplicate_column: pa.bool_(), self.duplicate_of_column: pa.string()}

    def added(self, dataset: ImageTextPairDataset) -> dd.DataFrame:
        df = dataset.metadata
        io = ShardIO(dataset.id_col, dataset.storage_options)
        hashes = dataset.map_shards(_hash_shard, io, self.by, meta=_HASH_META, frame=df[[dataset.id_col]])
        marked = by_group(hashes[hashes["digest"].notnull()], "digest", _mark_copies, meta=_MARK_META)
        back = back_to_shards(marked, dataset.num_shards)
        types = self.output_columns()
        flags = place(hashes, back, {"of": None}, {"of": pa.string()}, meta=_MARK_META[["of"]])
        found = zip_columns(hashes[["digest"]], flags)
        return dd.map_partitions(_columns, df[[dataset.id_col]], found, self, types, meta=self.output_meta(df._meta),
                                 align_dataframes=False, enforce_metadata=False)  # fmt: skip


def _columns(part: Any, found: pd.DataFrame, step: ExactDuplicates, types: dict) -> Any:
    """The step's columns for one partition, in the partition's own backend."""
    of = found["of"]
    values = {
        step.hash_column: pa.array(found["digest"].tolist(), pa.string(), from_pandas=True),
        step.duplicate_column: of.notna().to_numpy(dtype=bool),
        step.duplicate_of_column: pa.array(of.tolist(), pa.string(), from_pandas=True),
    }
    return with_columns(part[[]], values, types)[list(types)]
