"""Steps whose answer for a row depends on other shards' rows (dedup), done with Dask shuffles, never on the client.

The shape of every such step:

1. a per-shard pass gives *every* row of its shard its position (``_shard``, ``_row``), what the grouped function
   needs (a hash, a cluster, an embedding) and the group partition it goes to (``_partitions``, from
   :func:`group_of`; rows that need no partner go anywhere, e.g. to their shard's own group);
2. :func:`grouped` concatenates every :data:`MERGE` neighbouring shards' rows (a bounded task; not under p2p, which
   sends each shard's rows on its own), shuffles the rows to ``groups`` partitions so that each group lands whole in
   one (Dask's tasks method up to :data:`SMALL` shards, else Dask's default: :func:`shuffle_method`), runs a
   function there (on a worker) that answers every row it holds, and shuffles the answers straight back to one
   partition per shard;
3. :func:`per_shard` turns each shard's answers (all of its rows, put back in row order) into the step's columns.

Tasks per shard: the per-shard pass, one task that collects the shard's answers from the shuffle and one that
builds its columns (and under p2p the task that sends the shard's rows); the merging, the grouped function and the
shuffle's splitting run on ``groups`` partitions, about one per :data:`MERGE` shards. No task carries anything whose
size grows with the dataset, and the client holds only the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from imgcurate._dask import PARTITION_COLUMN, row_ids, to_partitions, with_shard_divisions
from imgcurate.backends import to_pandas
from imgcurate.cpu import reuse_freed_memory

__all__ = [
    "SHARD",
    "ROW",
    "GROUP",
    "MERGE",
    "SMALL",
    "shuffle_method",
    "group_count",
    "group_of",
    "grouped",
    "per_shard",
    "positions",
    "host",
    "rows_column",
    "rows_matrix",
    "text_column",
    "take_text",
    "arrow_column",
]

#: The columns that carry a row's origin through the shuffles.
SHARD, ROW = "_shard", "_row"
#: The column that names the group partition a row is shuffled to.
GROUP = PARTITION_COLUMN
#: How many neighbouring shards' rows one task concatenates before the shuffle to the groups. It bounds what such a
#: task holds (``MERGE`` shards) and divides the shuffle's per-shard splitting tasks by as much.
MERGE = 16
#: Up to this many shards, the shuffles use Dask's one-stage tasks method (see :func:`shuffle_method`).
SMALL = 32


def shuffle_method(nshards: int) -> str:
    """The Dask shuffle method for the rows of ``nshards`` shards: Dask's configured ``dataframe.shuffle.method``
    when one is set; else its ``tasks`` method up to :data:`SMALL` shards, and Dask's default above (p2p on a
    distributed client, disk on the local schedulers).

    Up to :data:`SMALL` input partitions the tasks method is one stage (each shard's rows split once, each group
    partition concatenating its pieces; at most ``SMALL`` x ``SMALL`` pieces) and moves the pieces as ordinary task
    results, which the workers keep in memory (spilling under memory pressure as any result) and send between
    processes without a copy of their own. p2p's fixed costs (its extension, a barrier, every byte serialised, sent
    to the worker itself over TCP, written to disk and read back) cost more there: measured at 100,000 rows x 512 in
    10 shards on two worker processes, 2.2-2.8 s against 2.6-2.9 s for the semantic dedup step
    (benchmarks/RESULTS.md). Above ``SMALL`` the
    tasks method needs several stages and its graph grows as n log n, and p2p's spilling to disk matters.
    """
    import dask
    from dask.utils import get_default_shuffle_method

    if dask.config.get("dataframe.shuffle.method", None) or nshards > SMALL:
        return get_default_shuffle_method()
    return "tasks"


def group_count(nshards: int, wanted: int = 1) -> int:
    """The number of group partitions: ``wanted``, but at least one per :data:`MERGE` shards and at most one per
    shard, so that a group partition holds about as much as :data:`MERGE` shards (or its largest group)."""
    return max(1, min(nshards, max(wanted, -(-nshards // MERGE))))


def group_of(codes: np.ndarray, groups: int) -> np.ndarray:
    """The group partition (int64) of each non-negative integer group code."""
    return np.asarray(codes, dtype=np.int64) % groups


def _answer(part: pd.DataFrame, func: Callable[..., pd.DataFrame], *args: Any) -> pd.DataFrame:
    reuse_freed_memory()  # as every shard-wise task does (:func:`imgcurate._dask.map_with_shard`)
    out = func(part.drop(columns=[GROUP], errors="ignore").reset_index(drop=True), *args)
    out[GROUP] = out[SHARD].to_numpy(dtype=np.int64)  # the way back: the partition of the row's shard
    return out


def grouped(rows: dd.DataFrame, func: Callable[..., pd.DataFrame], *args: Any, meta: pd.DataFrame,
            groups: int) -> dd.DataFrame:  # fmt: skip
    """``func(partition, *args)`` on the rows of whole groups, its answers moved back to their shards.

    Args:
        rows: one partition per shard, every row with ``_shard``, ``_row`` and its group partition in ``_partitions``
            (``0 <= _partitions < groups``); rows of one group must share that value.
        func: answers every row of a pandas partition that holds whole groups: one row per input row with its
            ``_shard`` and ``_row`` and the answer's columns (``meta``).
        groups: the group partitions (see :func:`group_count`; at least one per :data:`MERGE` shards).

    Returns:
        One partition per shard holding the answers for its rows, in no particular order (see :func:`per_shard`).
    """
    nshards = rows.npartitions
    method = shuffle_method(nshards)
    # p2p (a distributed client) sends each shard's rows as soon as they are made: merging first would hold MERGE
    # shards' rows in one place (measured: 2x the worker memory, and slower). The disk and tasks methods merge
    # input partitions down to the output count themselves; merging MERGE neighbours first keeps that bounded.
    p2p = method == "p2p"
    merged = rows.repartition(npartitions=-(-nshards // MERGE)) if nshards > MERGE and not p2p else rows
    together = to_partitions(merged, groups if p2p else max(groups, merged.npartitions), method)
    answers = together.map_partitions(_answer, func, *args, meta=meta.assign(**{GROUP: np.int64(0)}).iloc[:0],
                                      enforce_metadata=False)  # fmt: skip
    return to_partitions(answers, nshards, method)


def _call_per_shard(answers: pd.DataFrame, func: Callable, *args: Any, partition_info: dict) -> Any:
    index = partition_info["number"]  # the shard: one output partition per shard, in order
    answers = answers.drop(columns=[GROUP], errors="ignore").sort_values(ROW, kind="stable").reset_index(drop=True)
    if not np.array_equal(answers[ROW].to_numpy(), np.arange(len(answers))):  # pragma: no cover - a broken pass
        raise RuntimeError(f"shard {index}: the answers do not cover its rows 0..{len(answers) - 1} once each")
    out = func(answers, index, *args)
    out.index = row_ids(index, len(out))
    return out


def per_shard(func: Callable[..., Any], answers: dd.DataFrame, *args: Any, meta: Any) -> dd.DataFrame:
    """``func(answers, shard, *args)`` for each shard: its answers from :func:`grouped` in row order (a pandas frame
    with a fresh range index) and its index. ``func`` returns one row per answer; the result has the metadata's row
    ids and divisions."""
    out = answers.map_partitions(_call_per_shard, func, *args, meta=meta, enforce_metadata=False)
    return with_shard_divisions(out)


def positions(part: Any, shard: int) -> pd.DataFrame:
    """``_shard`` and ``_row`` for every row of a partition (host pandas)."""
    return pd.DataFrame({SHARD: np.full(len(part), shard, dtype=np.int64), ROW: np.arange(len(part), dtype=np.int64)})


def host(part: Any, columns: list[str]) -> pd.DataFrame:
    """Some columns of a partition, on the host, with a fresh range index."""
    return to_pandas(part[columns]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------- columns that travel
# The rows that travel through the shuffles are host pandas frames, and every shuffle method turns them into arrow
# tables and back. Dask rebuilds a column's pandas type from its name, which fails for parameterised arrow types (a
# fixed-size list of 512 float32 is not a name it can parse) and turns them into one Python object per row. So a
# matrix travels as one large-binary column (each row's float32 bytes) and text as pandas' arrow string type: both
# are built and read back with one vectorised arrow call, with no Python object per row.
_TEXT = pd.StringDtype("pyarrow")


def rows_column(x: np.ndarray, valid: np.ndarray | None = None) -> pd.api.extensions.ExtensionArray:
    """The rows of a float32 ``(valid rows, dim)`` matrix as a large-binary column, one entry per row; rows where
    ``valid`` is false get an empty entry. No copy of ``x`` (a C-ordered float32 matrix) is made."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x) if valid is None else len(valid)
    width = np.int64(x.shape[1] * 4) if x.ndim == 2 else np.int64(0)
    lengths = np.full(n, width) if valid is None else np.where(valid, width, np.int64(0))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    array = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(x)])
    return pd.arrays.ArrowExtensionArray(array)


def rows_matrix(column: pd.Series, rows: np.ndarray) -> np.ndarray:
    """The float32 matrix of the entries ``rows`` (positions) of a :func:`rows_column` column, in that order; every
    one of them must hold a row of the same length.

    Each row is copied once, straight from the column's buffers into the matrix, with no Python object per row: a
    column concatenated from a shuffle's pieces is a chunked array, which arrow's ``take`` would first combine into
    one array (a copy of every chunk) before taking from it."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return np.zeros((0, 0), dtype=np.float32)
    chunks = arrow_column(column).chunks
    starts = np.cumsum([0] + [len(chunk) for chunk in chunks])
    if rows.min() < 0 or rows.max() >= starts[-1]:
        raise IndexError(f"rows_matrix: a row outside the column's {starts[-1]} rows")
    which = np.searchsorted(starts, rows, side="right") - 1
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(chunks) + 1))
    out = None
    for k, chunk in enumerate(chunks):
        picked = order[bounds[k] : bounds[k + 1]]
        if not len(picked):
            continue
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        local = rows[picked] - starts[k]
        lengths = offsets[local + 1] - offsets[local]
        if out is None:
            out = np.empty((len(rows), int(lengths[0]) // 4), dtype=np.float32)
        width = out.shape[1] * 4
        if (lengths != width).any() or chunk.null_count:
            raise ValueError("rows_matrix: every requested row must hold an embedding of one length, in a column "
                             "rows_column made (no null slots)")  # fmt: skip
        if not width:
            continue
        # the entries that hold a row are back to back in the data buffer: entry i is row (offset_i - offset_0) / width
        # of the chunk's matrix, whatever empty entries (rows without an embedding) lie between them
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        out[picked] = data.view(np.float32).reshape(-1, out.shape[1])[(offsets[local] - offsets[0]) // width]
    return out


def text_column(values: Any) -> pd.api.extensions.ExtensionArray:
    """Text (a pandas or arrow column of strings) as pandas' arrow string column, without a Python object per row
    when it is arrow already."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        array = values
    else:
        try:
            array = pa.array(values, from_pandas=True)
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # Python objects of several types (ids: 7 and "a7"): as text
            array = pa.array([None if pd.api.types.is_scalar(v) and pd.isna(v) else str(v) for v in values],
                             type=pa.large_string())  # fmt: skip
    return pd.array(array.cast(pa.large_string()), dtype=_TEXT)


def take_text(column: pd.Series, rows: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """The entries ``rows`` (positions; -1 gives null) of a text column, as a :func:`text_column`."""
    rows = np.asarray(rows, dtype=np.int64)
    return text_column(pc.take(arrow_column(column), pa.array(rows, mask=rows < 0)))


def arrow_column(column: pd.Series) -> pa.ChunkedArray:
    """An arrow-backed column's data, without a copy (a chunked array, as pandas keeps it)."""
    array = pa.array(column.array)
    return array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])
