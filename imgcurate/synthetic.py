"""Synthetic datasets of any shard count, for scale tests and benchmarks: metadata only, nothing on disk is read.

:func:`synthetic_dataset` builds an :class:`~imgcurate.dataset.ImageTextPairDataset` over ``n`` made-up tar paths
whose metadata partitions are generated where they run (keys, sizes, and optionally seeded random embeddings with a
few planted near-copies). It is how ``benchmarks/scale.py`` and the scale tests build graphs over 10^5 shards
without 10^5 files.
"""

from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate._dask import row_ids, shard_divisions
from imgcurate.backends import embedding_array, embedding_type
from imgcurate.dataset import ImageTextPairDataset

__all__ = ["synthetic_dataset", "synthetic_partition"]


def synthetic_partition(shard: int, rows: int, dim: int | None, seed: int = 0, copies: float = 0.01) -> pd.DataFrame:
    """Shard ``shard``'s metadata: ``key``, ``width``, ``height`` and, with ``dim``, unit ``image_embedding`` rows
    of which a fraction ``copies`` are near-copies (cosine > 0.9999) of another row of the same shard."""
    rng = np.random.default_rng([seed, shard])
    frame = pd.DataFrame(
        {
            "key": pd.array([f"{shard:06d}{j:05d}" for j in range(rows)], dtype="string[pyarrow]"),
            "width": pd.array(rng.integers(64, 1024, rows), dtype="Int64"),
            "height": pd.array(rng.integers(64, 1024, rows), dtype="Int64"),
        },
        index=row_ids(shard, rows),
    )
    if dim is not None:
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        planted = rng.random(rows) < copies
        sources = rng.integers(0, rows, rows)
        x[planted] = x[sources[planted]] + 1e-3 * rng.standard_normal((int(planted.sum()), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        frame["image_embedding"] = pd.Series(
            pd.arrays.ArrowExtensionArray(embedding_array(x)),
            index=frame.index,
            dtype=pd.ArrowDtype(embedding_type(dim)),
        )
    return frame


def _make(item: tuple[int, int], dim: int | None, seed: int) -> pd.DataFrame:
    return synthetic_partition(item[0], item[1], dim, seed)


def synthetic_dataset(
    nshards: int, rows_per_shard: int = 1000, dim: int | None = None, seed: int = 0, root: str = "/synthetic"
) -> ImageTextPairDataset:
    """A dataset of ``nshards`` made-up shards (``<root>/000000.tar`` ...), its metadata generated per partition."""
    meta = synthetic_partition(0, 0, dim, seed)
    with dask.config.set({"dataframe.convert-string": False}):  # the keys are arrow strings already
        metadata = dd.from_map(
            _make, [(i, rows_per_shard) for i in range(nshards)], args=[dim, seed], meta=meta,
            divisions=shard_divisions(nshards), label="synthetic-metadata", enforce_metadata=False,
        )  # fmt: skip
    tars = [f"{root}/{i:06d}.tar" for i in range(nshards)]
    return ImageTextPairDataset(root, metadata, tars)


_ = pa  # the embedding column's arrow type comes from imgcurate.backends
