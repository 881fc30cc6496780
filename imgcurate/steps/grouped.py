"""Steps whose answer for a row depends on other shards' rows (dedup), done with Dask shuffles, never on the client.

The shape of every such step:

1. a per-shard pass gives each row its group key (a hash, a cluster) plus its position: ``_shard`` and ``_row``;
2. :func:`by_group` shuffles those rows so that each group lands whole in one partition, and runs a function on
   each partition there (on a worker);
3. :func:`back_to_shards` shuffles the per-row results back to the partition of the shard they came from, in row
   order;
4. :func:`place` spreads them over the shard's rows (rows without a result get the defaults).

No task carries anything whose size grows with the dataset, and the client holds only the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate._dask import to_partitions
from imgcurate.backends import to_pandas, with_columns

__all__ = ["SHARD", "ROW", "by_group", "back_to_shards", "place"]

#: The columns that carry a row's origin through the shuffles.
SHARD, ROW = "_shard", "_row"


def by_group(rows: dd.DataFrame, key: str, func: Callable[..., pd.DataFrame], *args: Any, meta: Any,
             npartitions: int | None = None) -> dd.DataFrame:  # fmt: skip
    """Shuffles ``rows`` on ``key`` so every group is whole in one partition, then maps ``func(partition, *args)``."""
    shuffled = rows.shuffle(on=key, npartitions=npartitions or rows.npartitions)
    return shuffled.map_partitions(func, *args, meta=meta, enforce_metadata=False)


def _sorted_by_row(part: pd.DataFrame) -> pd.DataFrame:
    return part.sort_values(ROW, kind="stable")


def back_to_shards(results: dd.DataFrame, nshards: int) -> dd.DataFrame:
    """Per-row results (with ``_shard`` and ``_row``) moved to partition ``_shard``, sorted by ``_row``."""
    moved = to_partitions(results, SHARD, nshards)
    return moved.map_partitions(_sorted_by_row, meta=moved._meta, enforce_metadata=False)


def _place(part: Any, results: pd.DataFrame, defaults: Mapping[str, Any], types: Mapping[str, pa.DataType]) -> Any:
    n = len(part)
    base = pd.DataFrame(index=pd.RangeIndex(n))
    rows = results[ROW].to_numpy(dtype=np.int64)
    columns = {}
    for name, default in defaults.items():
        values = np.full(n, default, dtype=object if default is None or isinstance(default, str) else None)
        if len(rows):
            got = results[name]
            values[rows] = got.to_numpy(dtype=values.dtype, na_value=default) if got.dtype != object else got.to_numpy()
        columns[name] = values
    return with_columns(base, columns, types)[list(defaults)]


def place(frame: dd.DataFrame, results: dd.DataFrame, defaults: Mapping[str, Any],
          types: Mapping[str, pa.DataType], meta: Any) -> dd.DataFrame:  # fmt: skip
    """For each partition of ``frame``, the columns ``defaults`` names, filled from ``results`` (one partition per
    shard, rows sorted by ``_row``) where a row has a result, else the default. The result is on the host (pandas)
    whatever the backend of ``frame``, whose rows it only counts."""
    return dd.map_partitions(
        _place, frame, results, dict(defaults), dict(types), meta=meta, align_dataframes=False,
        enforce_metadata=False,
    )  # fmt: skip


def positions(part: Any, shard: int) -> pd.DataFrame:
    """``_shard`` and ``_row`` for every row of a partition (host pandas)."""
    return pd.DataFrame({SHARD: np.full(len(part), shard, dtype=np.int64), ROW: np.arange(len(part), dtype=np.int64)})


def host(part: Any, columns: list[str]) -> pd.DataFrame:
    """Some columns of a partition, on the host, with a fresh range index."""
    return to_pandas(part[columns]).reset_index(drop=True)
