"""What a task carries must not grow with the number of shards (synthetic frames and paths: nothing is read)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from distributed.protocol.pickle import dumps

from imgcurate.classifiers import AestheticClassifier
from imgcurate.dedup import ExactDuplicates, SemanticDeduplicator
from imgcurate.embedders import TimmImageEmbedder
from imgcurate.filters import SampleFilter
from imgcurate.io.export import _plan, selection, write_tasks
from imgcurate.synthetic import synthetic_dataset


def _largest_task(collection) -> int:
    """The largest pickled task of a collection's graph, leaving out Dask's own shuffle barriers: one task per
    shuffle that lists every input partition's key (how Dask synchronises an all-to-all exchange)."""
    graph = dict(collection.__dask_graph__())
    sizes = [len(dumps(task)) for key, task in graph.items() if not str(key).startswith("('barrier-")]
    return max(sizes)


STEPS = {
    "embedder": lambda: TimmImageEmbedder("test_resnet"),
    "classifier": lambda: AestheticClassifier(),
    "filter": lambda: SampleFilter(min_width=256),
    "exact dedup": lambda: ExactDuplicates(),
    "semantic dedup": lambda: SemanticDeduplicator(n_clusters=8),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_a_step_task_does_not_grow_with_the_shard_count(name):
    sizes = {}
    for n in (1000, 8000):
        ds = synthetic_dataset(n, rows_per_shard=10, dim=768)
        sizes[n] = _largest_task(STEPS[name]()(ds).metadata)
    # the same code at 8x the shards: only the digits of a partition number may grow a key
    assert sizes[8000] <= sizes[1000] + 64, sizes


def test_export_tasks_do_not_grow_with_the_shard_count():
    sizes = {}
    for n in (1000, 8000):
        ds = synthetic_dataset(n, rows_per_shard=10)
        select = selection(ds.metadata, ds.shards, "/out/.imgcurate-staging", None, {})
        plan = _plan([10] * n, 25, None)
        schema = pa.schema([("key", pa.string())])
        writes = write_tasks(plan, list(range(len(plan))), ds.tar_files, "/out/.staging", 25, "key", None, schema,
                             {}, False)  # fmt: skip
        write_sizes = [len(dumps(dict(w.__dask_graph__())[w.key])) for w in writes[:: max(1, len(writes) // 50)]]
        sizes[n] = (_largest_task(select), max(write_sizes))
    assert sizes[8000][0] <= sizes[1000][0] + 64 and sizes[8000][1] <= sizes[1000][1] + 64, sizes


def test_synthetic_dedup_finds_its_planted_copies():
    """The synthetic frames the scale benchmark uses: planted near-copies are what semantic dedup finds."""
    ds = synthetic_dataset(6, rows_per_shard=200, dim=32, seed=3)
    df = SemanticDeduplicator(n_clusters=4, eps=1e-3)(ds).metadata.compute()
    assert 0 < int(df.is_duplicate.sum()) <= int(0.03 * len(df))
    assert np.isin(df.loc[df.is_duplicate, "duplicate_of"], df["key"]).all()
