"""Exact duplicates: the same image bytes (or, optionally, the same decoded pixels) stored more than once."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate import progress
from imgcurate.backends import with_columns
from imgcurate.dataset import partition_number
from imgcurate.io.tar import aligned_images

if TYPE_CHECKING:
    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["ExactDuplicates"]


def _pixel_digest(data: bytes) -> str:
    from imgcurate.embedders.decode import decode_rgb

    image = decode_rgb(data)
    digest = hashlib.sha256(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ExactDuplicates:
    """Marks every copy of an image but the first (in shard order) and says which sample it duplicates.

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
        if by not in ("bytes", "pixels"):
            raise ValueError(f"by must be 'bytes' or 'pixels', got {by!r}")
        self.by = by
        self.hash_column = hash_column
        self.duplicate_column = duplicate_column
        self.duplicate_of_column = duplicate_of_column

    def _hash_partition(self, part: Any, tar: str, id_col: str, so: dict) -> tuple[list[str], list[str | None]]:
        frame = part if isinstance(part, pd.DataFrame) else part.to_pandas()
        keys = frame[id_col].tolist()
        digests: list[str | None] = []
        for data, _ in aligned_images(tar, keys, so):
            if data is None:
                digests.append(None)
            elif self.by == "bytes":
                digests.append(hashlib.sha256(data).hexdigest())
            else:
                try:
                    digests.append(_pixel_digest(data))
                except Exception:  # undecodable: no pixel hash, recorded as null
                    digests.append(None)
        return keys, digests

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """Hashes every image now (one read of the shards, with progress) and adds the three columns lazily.

        The input is persisted first, so the steps before this one run once, not again at export.
        """
        dataset = dataset.persist()
        df, so = dataset.metadata, dataset.storage_options
        tasks = [
            dask.delayed(self._hash_partition)(part, tar, dataset.id_col, so)
            for part, tar in zip(df.to_delayed(), dataset.tar_files, strict=True)
        ]
        hashed = progress.compute(tasks, desc="hashing images")
        first: dict[str, str] = {}
        columns = []
        for keys, digests in hashed:
            dup, dup_of = [], []
            for key, digest in zip(keys, digests, strict=True):
                if digest is not None and digest in first:
                    dup.append(True)
                    dup_of.append(first[digest])
                else:
                    if digest is not None:
                        first[digest] = key
                    dup.append(False)
                    dup_of.append(None)
            columns.append((digests, dup, dup_of))

        types = {
            self.hash_column: pa.string(),
            self.duplicate_column: pa.bool_(),
            self.duplicate_of_column: pa.string(),
        }

        def values(digests: list, dup: list, dup_of: list) -> dict[str, Any]:
            return {
                self.hash_column: pd.array(digests, dtype=pd.StringDtype("pyarrow", na_value=np.nan)),
                self.duplicate_column: np.asarray(dup, dtype=bool),
                self.duplicate_of_column: pd.array(dup_of, dtype=pd.StringDtype("pyarrow", na_value=np.nan)),
            }

        def add(part: Any, partition_info=None) -> Any:
            return with_columns(part, values(*columns[partition_number(partition_info)]), types)

        meta = with_columns(df._meta, values([], [], []), types)
        out = df.map_partitions(add, meta=meta, enforce_metadata=False)
        return dataset.with_metadata(out, arrow_types=types)
