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
