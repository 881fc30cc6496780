"""Progress bars count shards (tqdm shows the rate and the ETA from the total) on the local schedulers and under a
distributed client."""

from __future__ import annotations

import dask
import pytest

from imgcurate import progress
from imgcurate.dedup import ExactDuplicates
from imgcurate.rundir import RunDir


@pytest.fixture
def bars(monkeypatch):
    """Every bar drawn, by description: (count reached, total, unit)."""
    made = []
    original = progress.bar

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(progress, "bar", recording)
    with dask.config.set({"imgcurate.progress": True}):
        yield lambda desc: [(b.n, b.total, b.unit) for b in made if b.desc == desc]


@pytest.mark.parametrize("where", ["threads", "distributed"])
def test_a_step_counts_its_shards(sample_ds, tmp_path, bars, where):
    from distributed import Client, LocalCluster

    run = RunDir(str(tmp_path / "run"))
    if where == "threads":
        run.compute_step(sample_ds, ExactDuplicates(), 0, "f" * 64)
    else:
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
            with Client(cluster):
                run.compute_step(sample_ds, ExactDuplicates(), 0, "f" * 64)
    n = sample_ds.num_shards
    assert bars("ExactDuplicates: shards") == [(n, n, "shard")]


def test_persist_counts_partitions_and_a_single_task_graph_counts_tasks(sample_ds, bars):
    progress.persist(sample_ds.metadata, desc="persisting")
    n = sample_ds.num_shards
    assert bars("persisting") == [(n, n, "shard")]
    progress.compute([dask.delayed(sum)([1, 2])], desc="one task", unit="shard")
    assert bars("one task") == [(1, 1, "task")]


def test_the_collector_waits_while_a_graph_is_built_and_gets_its_thresholds_back_before_tasks_run():
    import gc

    import dask.dataframe as dd
    import pandas as pd

    before = gc.get_threshold()
    seen_in_graph_build, seen_in_tasks = [], []

    def in_task(part):
        seen_in_tasks.append(gc.get_threshold())
        return part

    class Watch(dask.callbacks.Callback):
        def _start(self, dsk):  # the graph is built; ordering and the scheduler's state come next
            seen_in_graph_build.append(gc.get_threshold())

    frame = dd.from_pandas(pd.DataFrame({"a": range(40)}), npartitions=4).map_partitions(in_task)
    with Watch():
        (total,) = progress.compute([frame["a"].sum()], desc="sum")
    assert int(total) == sum(range(40))
    assert seen_in_graph_build == [(100_000, max(before[1], 50), max(before[2], 100))]
    assert seen_in_tasks and set(seen_in_tasks) == {before}
    assert gc.get_threshold() == before

    # nested contexts restore only when the outermost ends; persist takes the same path; 0 turns it off
    with progress.GraphGC():
        with progress.GraphGC() as inner:
            inner.release()
            inner.release()
            assert gc.get_threshold()[0] == 100_000
        assert gc.get_threshold()[0] == 100_000
    assert gc.get_threshold() == before
    seen_in_tasks.clear()
    progress.persist(frame, desc="persist")
    assert seen_in_tasks and set(seen_in_tasks) == {before}
    with dask.config.set({"imgcurate.graph-gc-threshold": 0}), progress.GraphGC():
        assert gc.get_threshold() == before


def test_the_collector_thresholds_come_back_when_a_graph_fails_to_build():
    import gc

    before = gc.get_threshold()

    class Broken:
        def __dask_graph__(self):
            raise RuntimeError("cannot build")

    with pytest.raises(RuntimeError, match="cannot build"):
        progress.compute([dask.delayed(lambda: 1)(), Broken()], desc="broken")
    assert gc.get_threshold() == before


@pytest.mark.parametrize("processes", [True, False])
def test_a_pipeline_cluster_with_worker_processes_holds_the_collector_thresholds_for_its_lifetime(processes):
    import gc

    from imgcurate.pipeline import _cluster

    before = gc.get_threshold()
    with _cluster({"n_workers": 1, "threads_per_worker": 1, "processes": processes}) as client:
        during = gc.get_threshold()
        assert client.submit(lambda x: x + 1, 1).result() == 2
    # worker processes: this process only builds graphs and schedules; in-process workers run tasks here: unchanged
    assert during == ((100_000, max(before[1], 50), max(before[2], 100)) if processes else before)
    assert gc.get_threshold() == before


def _shard_rows(part, shard):
    import pandas as pd

    return pd.DataFrame({"n": [len(part)], "shard": [shard.index]})


@pytest.mark.parametrize("unit", ["task", "shard"])
def test_a_per_shard_pass_runs_as_one_task_per_shard_on_a_cluster(unit):
    """Dask's client does not fuse a frame's per-partition chains itself; unfused, the shard frame row is a task of
    its own (placed like a root, on any free worker) and the pass may run away from the partition it reads. compute
    and persist hand the client fused graphs: one task per shard for the projection, the shard row and the pass."""
    from distributed import Client, LocalCluster, wait
    from distributed.diagnostics.plugin import SchedulerPlugin

    from imgcurate.synthetic import synthetic_dataset

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster):
            ds = synthetic_dataset(6, rows_per_shard=20, dim=8).persist()
            wait(ds.metadata)
            ran: list[str] = []

            class Recorder(SchedulerPlugin):
                def transition(self, key, start, finish, *args, **kwargs):
                    if finish == "processing":
                        ran.append(key[0] if isinstance(key, tuple) else key)

            cluster.scheduler.add_plugin(Recorder(), name="recorder")
            meta = {"n": "int64", "shard": "int64"}
            passes = ds.map_shards(_shard_rows, meta=meta, frame=ds.metadata[["key", "image_embedding"]])
            (got,) = progress.compute([passes], desc="pass", unit=unit)
            assert got["n"].tolist() == [20] * 6 and got["shard"].tolist() == list(range(6))
            assert not [name for name in ran if name.startswith(("imgcurate-shards-", "getitem-"))]
            ran.clear()
            held = progress.persist(passes, desc="pass")
            wait(held)
            assert not [name for name in ran if name.startswith(("imgcurate-shards-", "getitem-"))]
            assert int(held["n"].sum().compute()) == 120


_CALLS: list[int] = []


def _counted(part):
    _CALLS.append(len(part))
    return part


def test_several_collections_computed_together_share_their_inputs(sample_ds):
    """Collections computed in one call share the work they have in common (each partition computed once), as they
    would under dask.compute: fusing each collection on its own would run their shared input once per collection."""
    _CALLS.clear()
    frame = sample_ds.metadata.map_partitions(_counted, meta=sample_ds.metadata._meta)
    lo, hi, n = progress.compute([frame["width"].min(), frame["width"].max(), frame["width"].count()], desc="range")
    expected = sample_ds.metadata.compute()["width"]
    assert (lo, hi, n) == (expected.min(), expected.max(), expected.count())
    assert len(_CALLS) == sample_ds.num_shards


def test_a_cluster_left_with_no_worker_stops_the_computation_with_an_error_instead_of_waiting_for_ever():
    """Every worker died and none was restarted (or none was started): the tasks would wait for ever."""
    import time

    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client, LocalCluster

    from imgcurate.errors import ClusterError

    frame = dd.from_pandas(pd.DataFrame({"x": range(10)}), npartitions=2)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster):
        with dask.config.set({"imgcurate.no-workers-timeout": 1.5}):
            started = time.perf_counter()
            with pytest.raises(ClusterError, match=r"^cluster: no worker for 1\.5 s \(every worker died"):
                progress.compute([frame.x.sum()], desc="sum", unit="shard")
            assert time.perf_counter() - started < 30
