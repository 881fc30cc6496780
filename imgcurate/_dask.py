"""Dask plumbing shared by the dataset, the steps and the export (beside the backends, below io).

Every per-shard task must carry only its own shard: a mapped function never closes over the list of all tar paths
or over results whose size grows with the dataset. The pieces here keep it so:

- :func:`shard_frame` is a tiny Dask frame with one row per shard (its index and tar path), built like
  ``dd.from_map`` so that each of its tasks holds one ``(index, tar)`` pair (but not marked as reading input).
- :func:`map_with_shard` maps a function over a metadata frame zipped partition by partition with that frame: the
  function receives its partition and a :class:`Shard`, nothing else that grows with the shard count.
- :func:`to_partitions` shuffles rows to the partition that their ``_partitions`` column names.
- :func:`zip_columns` puts the columns of one frame beside another's, partition by partition.

Row ids: the metadata frame's index is ``shard << 40 | row`` (a row's global id), so every frame over the shards has
*known divisions* ``(0, 1 << 40, 2 << 40, ...)``. Dask combines two frames partition by partition only when it can
tell that they are aligned; for frames with several origins (a step's results beside the metadata) it decides by
their divisions, and with unknown divisions it would shuffle rows by index value. Known, equal divisions keep every
frame of a dataset aligned with its shards, whatever steps made it. Per-shard functions mapped with
:func:`map_with_shard` get that index on their results automatically.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask._task_spec import Task
from dask.dataframe.dask_expr._collection import new_collection
from dask.dataframe.dask_expr._expr import MapPartitions, SetDivisions
from dask.dataframe.dask_expr.io import FromMap

from imgcurate.backends import host_index
from imgcurate.cpu import reuse_freed_memory

__all__ = [
    "Shard",
    "shard_frame",
    "shard_divisions",
    "with_shard_divisions",
    "row_ids",
    "map_with_shard",
    "to_partitions",
    "zip_columns",
    "PARTITION_COLUMN",
    "SHARD_BITS",
]

#: The column that names a row's target partition in :func:`to_partitions` (dask's own name for it).
PARTITION_COLUMN = "_partitions"
#: A row's global id is ``shard << SHARD_BITS | row``: up to 2**40 rows per shard and 2**23 shards.
SHARD_BITS = 40


def shard_divisions(nshards: int) -> tuple[int, ...]:
    """The divisions of a frame with one partition per shard and row ids as its index."""
    if nshards == 0:
        return (None, None)
    return tuple(i << SHARD_BITS for i in range(nshards)) + ((nshards << SHARD_BITS) - 1,)


def row_ids(shard: int, nrows: int) -> np.ndarray:
    """The global ids of a shard's ``nrows`` rows (the metadata index)."""
    return (np.int64(shard) << SHARD_BITS) + np.arange(nrows, dtype=np.int64)


class Shard(NamedTuple):
    """What a per-shard task knows of its shard: its position in the dataset and its tar path."""

    index: int
    tar: str


def _shard_row(item: tuple[int, str]) -> pd.DataFrame:
    index = pd.Index(row_ids(item[0], 1))
    return pd.DataFrame({"shard": pd.Series([item[0]], dtype="int64", index=index),
                         "tar": pd.Series([item[1]], dtype=object, index=index)})  # fmt: skip


_SHARD_META = pd.DataFrame(
    {"shard": pd.Series([], dtype="int64"), "tar": pd.Series([], dtype=object)}, index=pd.Index([], dtype="int64")
)


class _ShardRows(FromMap):
    """Dask's ``from_map`` expression whose tasks are not marked as data producers.

    Dask marks every ``from_map`` task as one, and a fused task as one when any of its parts is; the distributed
    scheduler places such tasks like the roots of a graph, on whichever worker has a free thread, without looking at
    where their other inputs are. The shard frame is fused into per-shard passes, so that mark made a pass over a
    frame already held on the workers (a persisted frame, an embedder's output) fetch about half of its partitions
    from the other worker (measured: 47 of a semantic dedup count pass's 100 partitions, at 100k x 512 on two
    workers). Without it, such a pass runs where its partitions are; a pass that reads its input (parquet, tars) is
    still a data producer through that reader, queued like a root.
    """

    def _filtered_task(self, name: Any, index: int) -> Task:
        return Task(name, self.func, *[v[index] for v in self.iterables], *self.args, **self.kwargs)


def shard_frame(tar_files: Sequence[str], label: str = "imgcurate-shards") -> dd.DataFrame:
    """One row per shard (``shard``, ``tar``), one partition per shard; each task holds its own pair only.

    Frames with different ``label``s are different frames to Dask: a frame that only one pass uses is fused into
    that pass's tasks (no task of its own) when the graph is fused (a frame's own ``persist`` or ``optimize``, and
    :func:`imgcurate.progress.compute`), where one frame shared by several passes is a task per shard. Its tasks
    are not data producers (see :class:`_ShardRows`), so a pass fused with it is placed by its other inputs.
    """
    # the expression itself, not dd.from_map: that would also wrap it in dask's string conversion, a step in every
    # task for a path that is only passed on
    items = list(enumerate(tar_files))
    if not items:
        raise ValueError("a shard frame needs at least one shard")
    return new_collection(
        _ShardRows(_shard_row, [items], [], {}, _SHARD_META, False, shard_divisions(len(items)), label)
    )


def _call_with_shard(part: Any, shard: pd.DataFrame, func: Callable, *args: Any, **kwargs: Any) -> Any:
    if len(shard) != 1:  # pragma: no cover - a frame built by shard_frame always has one row per partition
        raise RuntimeError("a shard frame partition must hold exactly one shard")
    reuse_freed_memory()  # in a nanny's worker, large arrays would be mapped and zero-filled afresh each time
    index = int(shard["shard"].iloc[0])
    out = func(part, Shard(index, str(shard["tar"].iloc[0])), *args, **kwargs)
    if not hasattr(out, "index"):
        return out
    ids = host_index(part.index)
    lo = index << SHARD_BITS
    if len(out) == len(part) and (not len(ids) or (ids.min() >= lo and ids.max() < lo + (1 << SHARD_BITS))):
        # one result per row: the rows' own ids
        out.index = part.index if type(out).__module__ == type(part).__module__ else ids
    else:  # a summary of the shard, or rows without ids yet: fresh ids within the shard's range
        out.index = row_ids(index, len(out))
    return out


def map_with_shard(
    func: Callable, frame: dd.DataFrame, shards: dd.DataFrame, *args: Any, meta: Any, **kwargs: Any
) -> dd.DataFrame:
    """``func(partition, shard, *args, **kwargs)`` on every partition of ``frame``, ``shard`` being its :class:`Shard`.

    ``frame`` and ``shards`` must have the same number of partitions (partition ``i`` describes shard ``i``). The
    result gets the divisions of the shards: a function that returns one row per input row gets the input's row ids
    as its index, one that returns a summary gets ids in its shard's range.
    """
    if frame.npartitions != shards.npartitions:
        raise ValueError(f"{frame.npartitions} metadata partitions for {shards.npartitions} shards")
    out = dd.map_partitions(
        _call_with_shard, frame, shards, func, *args, meta=meta, align_dataframes=False, enforce_metadata=False,
        **kwargs,
    )  # fmt: skip
    return out if out.known_divisions else out.clear_divisions().pipe(_with_divisions, shards.divisions)


def _with_divisions(frame: dd.DataFrame, divisions: tuple) -> dd.DataFrame:
    """``frame`` declared to have ``divisions`` (its partitions' index values must lie within them)."""
    return new_collection(_DeclaredDivisions(frame.expr, divisions))


class _DeclaredDivisions(SetDivisions):
    """Dask's ``SetDivisions``, whose tasks pass their partition through without carrying the divisions (Dask's own
    puts the whole tuple, one entry per shard, into every task)."""

    @functools.cached_property
    def _args(self) -> list:
        return [self.frame]

    @functools.cached_property
    def _kwargs(self) -> dict:
        return {}


def with_shard_divisions(frame: dd.DataFrame) -> dd.DataFrame:
    """``frame`` (one partition per shard, row ids as its index) declared to have the shards' divisions.

    A frame made by ``map_partitions`` keeps its single task per partition: the mapping is re-declared as one whose
    divisions are the shards' (no added step, which Dask would fuse into every task at a cost when it builds the
    graph). Any other frame gets a pass-through step that declares them.
    """
    if type(frame.expr) is MapPartitions:
        return new_collection(_ShardMapPartitions(*frame.expr.operands))
    return _with_divisions(frame, shard_divisions(frame.npartitions))


class _ShardMapPartitions(MapPartitions):
    """Dask's ``map_partitions`` whose output partitions are the shards, with their divisions."""

    def _divisions(self) -> tuple:
        return shard_divisions(self.frame.npartitions)


def to_partitions(frame: dd.DataFrame, npartitions: int, method: str | None = None) -> dd.DataFrame:
    """Moves every row to the partition that its int64 ``_partitions`` column names (0 <= value < ``npartitions``).

    A shuffle, done by Dask's own shuffle machinery (tasks, disk or p2p: ``method``, else as configured): dask
    routes rows by a ``_partitions`` column without hashing it, which is what :meth:`DataFrame.set_index` does with
    its divisions.
    No task carries a list that grows with ``npartitions``. Row order within a partition is not kept: sort after.
    The output keeps the ``_partitions`` column under the disk and tasks methods and not under p2p; readers select
    the columns they need. With fewer output than input partitions, the disk and tasks methods first concatenate
    neighbouring input partitions (dask's own rule), so callers merge them to a bounded count first.
    """
    from dask.dataframe.dask_expr._shuffle import Shuffle

    return new_collection(Shuffle(frame.expr, PARTITION_COLUMN, npartitions, True, method, None))


def _zip(left: Any, right: Any) -> Any:
    if len(left) != len(right):
        raise ValueError(f"cannot put {len(right)} rows of new columns beside a partition of {len(left)} rows")
    out = left.copy(deep=False)
    right = right.copy(deep=False)
    right.index = out.index
    for name in right.columns:
        out[name] = right[name]
    return out


def zip_columns(frame: dd.DataFrame, columns: dd.DataFrame) -> dd.DataFrame:
    """``frame`` with the columns of ``columns`` (same partitions, same rows in the same order) beside it."""
    if frame.npartitions != columns.npartitions:
        raise ValueError(f"{columns.npartitions} partitions of new columns for {frame.npartitions} partitions")
    meta = _zip(frame._meta, columns._meta)
    return dd.map_partitions(_zip, frame, columns, meta=meta, align_dataframes=False, enforce_metadata=False)
