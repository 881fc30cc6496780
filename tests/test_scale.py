"""What a task carries must not grow with the number of shards (synthetic frames and paths: nothing is read)."""

from __future__ import annotations

import numpy as np
import pandas as pd
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
    """The largest pickled task of a collection's graph, leaving out Dask's own shuffle barriers (disk and p2p): one
    task per shuffle that lists every input partition's key (how Dask synchronises an all-to-all exchange)."""
    graph = dict(collection.__dask_graph__())
    sizes = [len(dumps(task)) for key, task in graph.items() if "barrier-" not in str(key)]
    return max(sizes)


def _aesthetic_head(folder):
    """The ViT-L/14 aesthetic head with random weights, as a file (a classifier without one downloads the published
    file when it is applied)."""
    from safetensors.torch import save_file

    from imgcurate.classifiers.aesthetic import AestheticMLP

    save_file(AestheticMLP(768).state_dict(), str(folder / "aesthetic.safetensors"))
    return str(folder / "aesthetic.safetensors")


STEPS = {
    "embedder": lambda folder: TimmImageEmbedder("test_resnet"),
    "classifier": lambda folder: AestheticClassifier(model_path=_aesthetic_head(folder)),
    "filter": lambda folder: SampleFilter(min_width=256),
    "exact dedup": lambda folder: ExactDuplicates(),
    "semantic dedup": lambda folder: SemanticDeduplicator(n_clusters=8),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_a_step_task_does_not_grow_with_the_shard_count(name, tmp_path):
    sizes = {}
    for n in (1000, 8000):
        ds = synthetic_dataset(n, rows_per_shard=10, dim=768)
        sizes[n] = _largest_task(STEPS[name](tmp_path)(ds).metadata)
    # the same code at 8x the shards: only the digits of a partition number may grow a key
    assert sizes[8000] <= sizes[1000] + 64, sizes


def test_given_centroids_are_one_key_of_the_graph_not_a_copy_in_every_task():
    """The run-directory path passes fitted centroids to the assignment: they are one key that each worker fetches
    once, not an argument copied into every task (the workers hold the specs of the tasks queued on them)."""
    ds = synthetic_dataset(50, rows_per_shard=10, dim=256)
    step = SemanticDeduplicator(n_clusters=64)
    centroids = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    graph = dict(step.added(ds, centroids=centroids).optimize().__dask_graph__())
    holding = [key for key, task in graph.items() if len(dumps(task)) > centroids.nbytes]
    assert len(holding) == 1, holding


def test_given_centroids_skip_the_count_pass_unless_the_random_rule_needs_it():
    """With centroids given, only ``which_to_keep="random"`` (seeded by each cluster's first global index) counts the
    shards' embeddings; the other rules assign each shard straight away (one task per shard fewer)."""
    ds = synthetic_dataset(6, rows_per_shard=10, dim=16)
    centroids = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    counting = {}
    for keep in ("hard", "random"):
        graph = dict(SemanticDeduplicator(n_clusters=4, which_to_keep=keep).added(ds, centroids=centroids)
                     .optimize().__dask_graph__())  # fmt: skip
        counting[keep] = sum(b"_count_valid" in dumps(task) for task in graph.values())
    assert counting == {"hard": 0, "random": 6}, counting


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


def test_embeddings_built_by_a_user_with_from_pandas_are_an_error_that_says_what_to_do():
    import dask.dataframe as dd
    import pandas as pd

    from imgcurate.backends import embedding_array, embedding_matrix, embedding_type

    frame = pd.DataFrame({"e": [np.ones(3, np.float32), np.zeros(3, np.float32)]})
    with_text = dd.from_pandas(frame, npartitions=1).compute()["e"]  # dask's convert-string makes these text
    with pytest.raises(TypeError, match=r"holds text, not embeddings: dask turns .*pd\.ArrowDtype"):
        embedding_matrix(with_text, "e")
    fixed = pd.Series(embedding_array(np.ones((2, 3), np.float32)), dtype=pd.ArrowDtype(embedding_type(3)))
    kept = dd.from_pandas(pd.DataFrame({"e": fixed}), npartitions=1).compute()["e"]
    valid, matrix = embedding_matrix(kept, "e")
    assert valid.all() and matrix.shape == (2, 3) and matrix.dtype == np.float32
    valid, matrix = embedding_matrix(frame["e"], "e")  # a plain object column of arrays works too
    assert matrix.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_the_model_cache_tells_differently_configured_instances_apart():
    from imgcurate import _models

    _models.clear()
    a, b = TimmImageEmbedder("test_resnet", output="head"), TimmImageEmbedder("test_resnet", output="pre_logits")
    assert a.model("cpu") is not b.model("cpu")
    assert TimmImageEmbedder("test_resnet", output="head").model("cpu") is a.model("cpu")
    assert a.embedding_dim() != b.embedding_dim()


@pytest.mark.parametrize(("name", "per_shard"), [("exact dedup", 3.5), ("semantic dedup", 7.5)])
def test_dedup_graphs_have_a_few_tasks_per_shard(name, per_shard):
    """The grouped phase runs on about one partition per 16 shards; per shard remain the reads and per-shard passes,
    the collection of the shard's answers and its columns (graph time at 10^5 shards grows with the tasks)."""
    n = 1000
    ds = synthetic_dataset(n, rows_per_shard=10, dim=768)
    tasks = len(dict(STEPS[name](None).added(ds).optimize().__dask_graph__()))
    assert tasks <= per_shard * n, tasks / n


def _rows(part, shard) -> pd.DataFrame:
    return pd.DataFrame({"n": [len(part)]})


def test_no_task_over_a_frame_held_in_memory_is_a_data_producer():
    """The per-shard passes of a dedup step are fused with the shard frame. Were such a task a data producer (Dask's
    mark for tasks that read input, which a fused task takes from any of its parts), the distributed scheduler would
    take it for a root of the graph and place it on any worker with a free thread, whatever worker holds the
    partition it reads (measured: 47 of a count pass's 100 partitions fetched from the other worker, at 100k x 512
    on two workers). Over a frame held in memory, only the shard frame's own tasks (no inputs) may carry the mark."""
    import dask

    with dask.config.set(scheduler="sync"):
        ds = synthetic_dataset(6, rows_per_shard=40, dim=8).persist()
    for step in (SemanticDeduplicator(n_clusters=3), SemanticDeduplicator(n_clusters=3, which_to_keep="random")):
        graph = dict(step.added(ds).optimize().__dask_graph__())
        fused_passes = [task for task in graph.values() if "_call_with_shard" in repr(task)]
        assert fused_passes
        producers = [key for key, task in graph.items() if getattr(task, "data_producer", False) and task.dependencies]
        assert not producers


def test_a_pass_that_reads_its_shards_is_still_placed_as_a_reader(sample_ds):
    """The pass over shards read from storage stays a data producer through its reader (queued like the roots of the
    graph, which bounds what the workers hold), where the shard frame alone no longer is one."""
    from imgcurate._dask import shard_frame

    def producers(collection) -> list[bool]:  # the tasks as they run: optimised, so fused
        return [task.data_producer for task in dict(collection.optimize().__dask_graph__()).values()]

    assert not any(producers(shard_frame(["a.tar", "b.tar"])))
    assert all(producers(sample_ds.map_shards(_rows, meta={"n": "int64"})))
