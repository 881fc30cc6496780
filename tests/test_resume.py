"""Runs that resume: step results on disk per shard, reruns after SIGKILL, distributed semantic dedup."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from imgcurate import ImageTextPairDataset
from imgcurate.dedup import SemanticDeduplicator
from imgcurate.pipeline import Pipeline
from imgcurate.testing import make_sample_shards

RUN = "import sys; from imgcurate.cli import main; sys.exit(main(sys.argv[1:]))"


def _config(shards, out, run_dir, weights):
    return {
        "input": str(shards),
        "output": str(out),
        "run_dir": str(run_dir),
        "steps": [
            {"TimmImageEmbedder": {"model_name": "resnet18", "checkpoint_path": weights, "batch_size": 2}},
            {"ExactDuplicates": {}},
            {"SemanticDeduplicator": {"n_clusters": 3, "eps": 1e-4}},
            {"SampleFilter": {"drop_duplicates": ["exact_duplicate", "is_duplicate"]}},
        ],
        "export": {"filter_column": "keep", "samples_per_shard": 4, "old_id_col": "old_key"},
    }


def _start(config_path, env):
    return subprocess.Popen([sys.executable, "-c", RUN, "run", str(config_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _kill_when(proc, ready, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run neither reached the point to kill it nor finished")


def _files(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder)) if (folder / p).is_file()}


@pytest.fixture(scope="module")
def twenty_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_sample_shards(str(root / "shards"), samples_per_shard=2)  # 18 shards
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = str(root / "resnet18.safetensors")
    save_file(timm.create_model("resnet18").state_dict(), weights)
    return root, weights


def test_sigkill_during_embedding_and_export_then_rerun_gives_the_same_bytes(twenty_shards, tmp_path):
    root, weights = twenty_shards
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DASK_IMGCURATE__PROGRESS": "false"}
    reference = yaml.safe_dump(_config(root / "shards", tmp_path / "ref", tmp_path / "ref.run", weights))
    (tmp_path / "ref.yaml").write_text(reference)
    assert subprocess.run([sys.executable, "-c", RUN, "run", str(tmp_path / "ref.yaml")], env=env).returncode == 0

    run_dir = tmp_path / "run"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(_config(root / "shards", tmp_path / "out", run_dir, weights)))
    embed_dir = lambda: [p for p in (run_dir / "steps").glob("00-*")] if (run_dir / "steps").exists() else []  # noqa: E731

    def some_embedded():
        return any(len(list(d.glob("*.done"))) >= 2 for d in embed_dir())

    assert _kill_when(_start(tmp_path / "p.yaml", env), some_embedded), "the run finished before it could be killed"
    done_before = len(list(embed_dir()[0].glob("*.done")))
    assert 2 <= done_before < 18 and not (tmp_path / "out").exists()

    def exporting():
        return any((tmp_path / "out" / ".imgcurate-staging").glob("*.tar"))

    killed_in_export = _kill_when(_start(tmp_path / "p.yaml", env), exporting)
    summary = json.loads((run_dir / "summary.json").read_text()) if not killed_in_export else None
    if killed_in_export:
        assert not list((tmp_path / "out").glob("*.tar"))  # nothing published
        done = subprocess.run([sys.executable, "-c", RUN, "run", str(tmp_path / "p.yaml")], env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert all(s["shards_computed"] == 0 for s in summary["steps"])  # every step was done: all reused
    else:  # the second run finished before it reached the export: it still reused the embedded shards
        assert summary["steps"][0]["shards_reused"] == done_before
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    ref = json.loads((tmp_path / "ref.run" / "summary.json").read_text())
    for key in ("samples_in", "samples_kept", "duplicates", "drops_by_reason"):
        assert summary[key] == ref[key], key


def test_changed_settings_recompute_only_that_step_and_the_ones_after(sample_dir, tmp_path):
    config = {
        "input": str(sample_dir),
        "run_dir": "memory://imgcurate-test-run",
        "steps": [{"ExactDuplicates": {}}, {"SampleFilter": {"min_width": 300}}],
    }
    first = Pipeline.from_config(config)
    facts = {}
    first.run(summary=facts.update)
    assert [s["shards_computed"] for s in facts["steps"]] == [4, 4]
    config["steps"][1]["SampleFilter"]["min_width"] = 400
    again = {}
    out = Pipeline.from_config(config).run(summary=again.update)
    assert [(s["shards_computed"], s["shards_reused"]) for s in again["steps"]] == [(0, 4), (4, 0)]
    df = out.metadata.compute()
    assert (df["keep"] == (df["width"] >= 400)).all()
    assert again["drops_by_reason"] == {"width < 400": int((df["width"] < 400).sum())}


def test_a_step_whose_results_version_changed_is_computed_again(sample_dir, monkeypatch):
    """A run directory computed by an imgcurate whose step gave other results for the same configuration (a new
    ``results_version``) computes that step again, and the steps after it, rather than mixing old shards with new."""
    from imgcurate.dedup import ExactDuplicates

    later = {"SampleFilter": {"min_width": 400, "keep_column": "big", "reason_column": "why"}}
    config = {"input": str(sample_dir), "run_dir": "memory://imgcurate-test-version",
              "steps": [{"SampleFilter": {"min_width": 300}}, {"ExactDuplicates": {}}, later]}  # fmt: skip
    Pipeline.from_config(config).run()
    from user_steps import CaptionLength

    assert "results_version" not in json.dumps(CaptionLength().describe())  # 1 is not written
    monkeypatch.setattr(ExactDuplicates, "results_version", ExactDuplicates.results_version + 1)
    again = {}
    Pipeline.from_config(config).run(summary=again.update)
    assert [(s["shards_computed"], s["shards_reused"]) for s in again["steps"]] == [(0, 4), (4, 0), (4, 0)]


def _widened(factor):
    def widen(ds):
        df = ds.metadata
        return ds.with_metadata(df.assign(width=df["width"] * factor))

    return widen


def test_a_plain_callable_among_the_steps_is_part_of_the_fingerprint_of_the_steps_after_it(sample_dir, tmp_path):
    """A ``dataset -> dataset`` callable changes what the steps after it read: another callable (here the same
    code with another value in its closure) computes them again, the same one reuses them."""
    from imgcurate.filters import SampleFilter

    def run(factor):
        facts = {}
        pipeline = Pipeline(steps=[_widened(factor), SampleFilter(min_width=300)], input=str(sample_dir),
                            run_dir=str(tmp_path / "run"))  # fmt: skip
        out = pipeline.run(summary=facts.update).metadata.compute()
        return facts, out

    first, out = run(1)
    assert first["steps"][0]["shards_computed"] == 4 and not out["keep"].all()
    again, _ = run(1)
    assert (again["steps"][0]["shards_computed"], again["steps"][0]["shards_reused"]) == (0, 4)
    wider, out = run(100)
    assert wider["steps"][0]["shards_computed"] == 4 and out["keep"].all()


_DESCRIBE_CALLABLES = """
import functools, sys
import numpy as np
from imgcurate.rundir import callable_description
LIMITS = {"width", "height", sys.argv[1]}
class Widen:
    def __init__(self, factor):
        self.factor = factor
    def __call__(self, ds):
        return ds
def reads_a_global(ds):
    return LIMITS
def closing_over(x):
    table = np.arange(4) * x
    return lambda ds: (x, table)
for f in (Widen(2), reads_a_global, closing_over(2), functools.partial(reads_a_global), lambda ds: ds):
    print(callable_description(f)["digest"])
"""


def test_a_plain_callable_is_described_the_same_in_every_process():
    """The fingerprint of a callable must not change from one process to the next (hash seeds order sets; pickles
    of classes defined in __main__ carry a random id), or the steps after it would never be reused; a value it
    reads that differs changes it."""

    def digests(seed, value="x"):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run([sys.executable, "-c", _DESCRIBE_CALLABLES, value], env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        return done.stdout.split()

    first = digests(1)
    assert len(set(first)) == 5 and digests(2) == first == digests(3)
    other = digests(1, "y")  # another value in the global set: what reads it changes, the others do not
    assert [a == b for a, b in zip(first, other, strict=True)] == [True, False, True, False, True]


def test_the_summary_counts_the_columns_the_steps_name_whatever_their_names(sample_dir, tmp_path):
    """Drops and duplicates are read from the columns the steps were told to write, and the filter that makes the
    export's column gives the reasons; the run report shows them."""
    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "steps": [{"ExactDuplicates": {"duplicate_column": "dup", "duplicate_of_column": "dup_of"}},
                  {"SampleFilter": {"min_width": 10**6, "keep_column": "wide", "reason_column": "why_not_wide"}},
                  {"SampleFilter": {"min_width": 300, "drop_duplicates": ["dup"], "keep_column": "ok",
                                    "reason_column": "why"}}],
        "export": {"filter_column": "ok"},
    }  # fmt: skip
    facts = {}
    Pipeline.from_config(config).run(summary=facts.update)
    df = ImageTextPairDataset.from_webdataset(str(sample_dir)).metadata.compute()
    narrow = int((df["width"] < 300).sum())
    assert facts["duplicates"] == {"exact": 2}
    assert facts["drop_reason_column"] == "why" and facts["drops_by_reason"]["width < 300"] == narrow
    assert facts["drops_by_reason"]["dup"] + narrow >= facts["samples_in"] - facts["samples_kept"]
    report = (tmp_path / "out.run" / "report.html").read_text()
    assert "width &lt; 300: " in report or "width < 300: " in report
    assert "No dedup step ran" not in report and facts["duplicate_columns"] == [["dup", "dup_of", None]]
    # a run over that export without a dedup step: its input's duplicate columns are an earlier run's, not shown
    again = {"input": str(tmp_path / "out"), "output": str(tmp_path / "again"),
             "steps": [{"SampleFilter": {"min_width": 300}}], "export": {"filter_column": "keep"}}  # fmt: skip
    facts = {}
    Pipeline.from_config(again).run(summary=facts.update)
    assert facts["duplicates"] == {} and facts["duplicate_columns"] == []
    assert "No dedup step ran" in (tmp_path / "again.run" / "report.html").read_text()


def test_a_step_of_ones_own_is_counted_by_the_default_names_of_its_columns():
    from user_steps import CaptionLength

    from imgcurate.dedup import ExactDuplicates
    from imgcurate.filters import SampleFilter

    assert CaptionLength(column="is_duplicate").summary_columns() == {"duplicates:semantic": "is_duplicate"}
    assert CaptionLength().summary_columns() == {}
    assert ExactDuplicates(duplicate_column="dup").summary_columns() == {
        "duplicates:exact": "dup",
        "duplicate_of:exact": "exact_duplicate_of",
    }
    assert SampleFilter().summary_columns() == {"keep": "keep", "drop_reason": "drop_reason"}


@pytest.fixture(scope="module")
def two_worker_processes():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as client:
            yield client


@pytest.mark.parametrize("mode", ["greedy", "connected"])
@pytest.mark.parametrize("keep", ["hard", "easy", "random", ["score"]])
def test_semantic_dedup_on_a_local_cluster_equals_find_on_the_gathered_array(two_worker_processes, mode, keep):
    _check_cluster_against_find(two_worker_processes, mode, keep)


@pytest.mark.parametrize("method", ["p2p", "disk"])
def test_semantic_dedup_through_a_configured_shuffle_method_equals_find(two_worker_processes, method):
    """Few shards take Dask's tasks shuffle unless a method is configured: p2p and disk, configured, give the same
    columns."""
    from imgcurate.steps.grouped import shuffle_method

    with dask.config.set({"dataframe.shuffle.method": method}):
        assert shuffle_method(7) == method
        _check_cluster_against_find(two_worker_processes, "connected", "random")


def test_few_shards_take_the_one_stage_tasks_shuffle_and_many_take_dasks_default(two_worker_processes):
    from imgcurate.steps.grouped import SMALL, shuffle_method

    with dask.config.set({"dataframe.shuffle.method": None}):
        assert shuffle_method(1) == shuffle_method(SMALL) == "tasks"
        assert shuffle_method(SMALL + 1) == "disk"  # no distributed client: Dask's local default
        with two_worker_processes.as_current():
            assert shuffle_method(SMALL + 1) == "p2p"
            assert shuffle_method(SMALL) == "tasks"


def _check_cluster_against_find(client, mode, keep):
    from imgcurate.synthetic import synthetic_dataset

    ds = synthetic_dataset(7, rows_per_shard=60, dim=16, seed=5)
    df = ds.metadata
    ds = ds.with_metadata(df.assign(score=(df["width"] % 7).astype("float64")))
    dedup = SemanticDeduplicator(n_clusters=5, eps=[1e-3, 0.2], mode=mode, which_to_keep=keep)
    local = ds.metadata.compute()
    x = np.stack(local["image_embedding"]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = x[np.random.default_rng(0).choice(len(x), 5, replace=False)]
    with client.as_current():
        got = ds.with_columns(dedup.added(ds, centroids=centroids)).metadata.compute()
    rank = local[["score"]].to_numpy() if isinstance(keep, list) else None
    want = dedup.find(x, centroids=centroids, rank_values=rank)
    np.testing.assert_array_equal(got["cluster"].to_numpy(dtype=np.int64), want["cluster"])
    np.testing.assert_allclose(got["distance_to_centroid"], want["distance"], atol=1e-6)
    best = np.where(np.isinf(want["max_similarity"]), np.nan, want["max_similarity"])
    np.testing.assert_allclose(got["max_similarity"], best, atol=1e-6)
    keys = local["key"].to_numpy(dtype=object)
    want_of = [keys[r] if r >= 0 else None for r in want["duplicate_of"]]
    assert [None if v is None or v != v else v for v in got["duplicate_of"]] == want_of
    assert (got["is_duplicate_eps0.001"].to_numpy() == want["is_duplicate_0.001"]).all()
    assert (got["is_duplicate_eps0.2"].to_numpy() == want["is_duplicate_0.2"]).all()
    assert got["key"].tolist() == local["key"].tolist()  # rows stay with their shards, in order


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_semantic_dedup_over_more_shards_than_one_task_merges_equals_find(two_worker_processes, where):
    """40 shards: neighbouring shards are merged before the shuffle to 3 group partitions (disk shuffle on the
    threads, p2p on the cluster), and the answers come back to their shards in order."""
    from imgcurate.steps.grouped import MERGE
    from imgcurate.synthetic import synthetic_dataset

    ds = synthetic_dataset(40, rows_per_shard=12, dim=16, seed=7)
    assert ds.num_shards > 2 * MERGE
    dedup = SemanticDeduplicator(n_clusters=20, eps=0.3)
    local = ds.metadata.compute()
    x = np.stack(local["image_embedding"]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = x[np.random.default_rng(1).choice(len(x), 20, replace=False)]
    added = dedup.added(ds, centroids=centroids)
    if where == "cluster":
        with two_worker_processes.as_current():
            got = ds.with_columns(added).metadata.compute()
    else:
        got = ds.with_columns(added).metadata.compute(scheduler="threads")
    want = dedup.find(x, centroids=centroids)
    assert want["is_duplicate_0.3"].sum() > 0
    np.testing.assert_array_equal(got["cluster"].to_numpy(dtype=np.int64), want["cluster"])
    keys = local["key"].to_numpy(dtype=object)
    assert [None if v is None or v != v else v for v in got["duplicate_of"]] == [
        keys[r] if r >= 0 else None for r in want["duplicate_of"]
    ]
    assert (got["is_duplicate"].to_numpy() == want["is_duplicate_0.3"]).all()
    assert got.index.tolist() == local.index.tolist()


@pytest.mark.parametrize("keep", ["random", ["score"]])
def test_semantic_dedup_fitted_first_equals_the_fit_inside_the_graph(two_worker_processes, keep):
    """fit() then added(centroids=...) (stored input: what a pipeline with a run directory runs) draws the same sample
    and gives the same columns as the fit inside one graph."""
    from imgcurate.synthetic import synthetic_dataset

    ds = synthetic_dataset(9, rows_per_shard=40, dim=16, seed=3)
    df = ds.metadata
    ds = ds.with_metadata(df.assign(score=(df["width"] % 5).astype("float64")))
    dedup = SemanticDeduplicator(n_clusters=4, eps=0.2, which_to_keep=keep, fit_sample=100, max_iter=5)
    with two_worker_processes.as_current():
        centroids = dedup.fit(ds)
        first = ds.with_columns(dedup.added_from_storage(ds)).metadata.compute()
        inside = ds.with_columns(dedup.added(ds)).metadata.compute()
    assert centroids.shape == (4, 16) and centroids.dtype == np.float32
    assert first["is_duplicate"].sum() > 0
    pd.testing.assert_frame_equal(first, inside)


def test_a_run_directory_fits_semantic_dedup_in_passes_of_its_own_and_writes_the_in_graph_answer(tmp_path, monkeypatch):
    """A step computed into a run directory reads its input from storage: semantic dedup fits the centroids first,
    once, in passes of their own, and the written columns equal the one-graph answer."""
    from imgcurate.rundir import RunDir
    from imgcurate.synthetic import synthetic_dataset

    ds = synthetic_dataset(6, rows_per_shard=40, dim=16, seed=5)
    dedup = SemanticDeduplicator(n_clusters=4, eps=0.2, fit_sample=100, max_iter=5)
    fits = []
    original = SemanticDeduplicator.fit

    def counted(self, dataset):
        fits.append(dataset.num_shards)
        return original(self, dataset)

    monkeypatch.setattr(SemanticDeduplicator, "fit", counted)
    written, record = RunDir(str(tmp_path / "run")).compute_step(ds, dedup, 0, "e" * 64)
    assert fits == [6] and record.computed == 6
    got = written.compute()
    want = dedup.added(ds).compute()
    assert got["is_duplicate"].sum() > 0
    pd.testing.assert_frame_equal(got[list(want.columns)], want, check_dtype=False)


def test_an_export_run_on_memory_storage(sample_dir):
    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    pipeline = Pipeline(steps=[], export={"path": "memory://exported/out"}, run_dir="memory://exported/run")
    out = pipeline.run(ds)
    assert out.num_shards == 1 and len(out.metadata) == 36


def test_new_weights_at_the_same_path_recompute_the_embedder(sample_dir, tmp_path):
    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"

    def save(seed):
        torch.manual_seed(seed)
        save_file(timm.create_model("test_resnet").state_dict(), str(weights))

    config = {
        "input": str(sample_dir),
        "run_dir": str(tmp_path / "run"),
        "steps": [{"TimmImageEmbedder": {"model_name": "test_resnet", "checkpoint_path": str(weights),
                                         "batch_size": 8, "device": "cpu"}}],
    }  # fmt: skip
    save(0)
    facts = {}
    first = Pipeline.from_config(config).run(summary=facts.update).metadata.compute()
    assert [s["shards_computed"] for s in facts["steps"]] == [4]
    Pipeline.from_config(config).run(summary=facts.update)
    assert [(s["shards_computed"], s["shards_reused"]) for s in facts["steps"]] == [(0, 4)]
    save(1)  # other weights, same file name
    second = Pipeline.from_config(config).run(summary=facts.update).metadata.compute()
    assert [(s["shards_computed"], s["shards_reused"]) for s in facts["steps"]] == [(4, 0)]
    a, b = np.stack(first["image_embedding"]), np.stack(second["image_embedding"])
    assert a.shape == b.shape and not np.allclose(a, b)


def test_if_available_weights_that_appear_later_recompute_the_embedder(monkeypatch):
    import imgcurate.embedders.timm as timm_module
    from imgcurate.embedders import TimmImageEmbedder

    monkeypatch.setattr(timm_module, "pretrained_weights_cached", lambda name: False)
    random_weights = TimmImageEmbedder("test_resnet", pretrained="if-available").fingerprint()
    monkeypatch.setattr(timm_module, "pretrained_weights_cached", lambda name: True)
    assert TimmImageEmbedder("test_resnet", pretrained="if-available").fingerprint() != random_weights


class _Stop(BaseException):
    """A stop that nothing in the run catches, as a kill."""


def _small_config(sample_dir, tmp_path, min_width=0):
    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "steps": [{"ExactDuplicates": {}},
                  {"SampleFilter": {"min_width": min_width, "drop_duplicates": ["exact_duplicate"]}}],
        "export": {"filter_column": "keep", "samples_per_shard": 5},
    }  # fmt: skip
    path = tmp_path / f"p{min_width}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_run_without_an_export_counts_what_its_last_filter_keeps(sample_dir, tmp_path, capsys):
    from imgcurate.cli import main

    first = {"min_width": 0, "rules": [{"column": "width", "op": "<", "value": 0}]}
    last = {"min_width": 256, "keep_column": "wide", "reason_column": "why"}
    config = {"input": str(sample_dir), "run_dir": str(tmp_path / "r.run"),
              "steps": [{"SampleFilter": first}, {"SampleFilter": last}]}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    summary = json.loads((tmp_path / "r.run" / "summary.json").read_text())
    wide = ImageTextPairDataset.from_webdataset(str(sample_dir)).metadata["width"].ge(256).sum().compute()
    assert (summary["samples_in"], summary["samples_kept"], summary["keep_column"]) == (36, wide, "wide")
    assert summary["drops_by_reason"] == {"width < 256": 36 - wide}
    assert f"samples in: 36, kept: {wide}" in capsys.readouterr().out


@pytest.mark.parametrize("before", ["publish", "exported.json"])
def test_a_run_stopped_while_exporting_finishes_on_the_same_command_without_overwrite(sample_dir, tmp_path,
                                                                                      monkeypatch, before):  # fmt: skip
    """Stopped after its export began, before it was recorded as published (here: before publishing, and after
    publishing but before ``exported.json``), the same command exports again without --overwrite, into a folder
    that held an earlier export that --overwrite allowed it to replace; the bytes are an uninterrupted run's."""
    from imgcurate.cli import main
    from imgcurate.io import export as export_module
    from imgcurate.rundir import RunDir

    config = _small_config(sample_dir, tmp_path)
    assert main(["run", _small_config(sample_dir, tmp_path, min_width=300)]) == 0  # another export in the folder
    write_json, publish = RunDir.write_json, export_module.publish

    def stop_at_the_record(self, name, value):
        if name == "exported.json":
            raise _Stop
        return write_json(self, name, value)

    def stop_at_publish(*args, **kwargs):
        raise _Stop

    if before == "publish":
        monkeypatch.setattr(export_module, "publish", stop_at_publish)
    else:
        monkeypatch.setattr(RunDir, "write_json", stop_at_the_record)
    with pytest.raises(_Stop):
        main(["run", config, "--overwrite"])
    monkeypatch.setattr(RunDir, "write_json", write_json)
    monkeypatch.setattr(export_module, "publish", publish)
    assert (tmp_path / "out.run" / "exporting.json").exists()
    assert main(["run", config]) == 0  # the same command without --overwrite
    assert not (tmp_path / "out.run" / "exporting.json").exists()
    exported = _files(tmp_path / "out")
    assert main(["run", config, "--run-dir", str(tmp_path / "fresh.run"), "--output", str(tmp_path / "fresh")]) == 0
    assert exported == _files(tmp_path / "fresh")
    assert main(["run", _small_config(sample_dir, tmp_path, min_width=300)]) == 2  # another run's export is there


def test_an_export_refused_the_folder_records_no_begun_export(sample_dir, tmp_path, monkeypatch):
    """Another export reached the folder after the run's early check (the steps run in between): the run's export is
    refused, and its rerun, without --overwrite, is refused too rather than taken for a stopped export."""
    from imgcurate.cli import main

    assert main(["run", _small_config(sample_dir, tmp_path, min_width=300)]) == 0  # another config's export
    theirs = _files(tmp_path / "out")
    monkeypatch.setattr(Pipeline, "_check_export_folder", lambda self: None)  # as if checked before theirs came
    config = _small_config(sample_dir, tmp_path)
    assert main(["run", config]) == 2
    assert not (tmp_path / "out.run" / "exporting.json").exists()
    monkeypatch.undo()
    assert main(["run", config]) == 2
    assert _files(tmp_path / "out") == theirs


def test_a_stop_as_the_export_is_recorded_leaves_no_mark_to_replace_another_export(sample_dir, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """Stopped between recording the published export (exported.json) and removing the mark of a begun one
    (exporting.json): the rerun finishes and removes the mark; and whether or not it ran first, a later run of the
    same config is refused a folder where another run's export was published since, as any other run is."""
    from imgcurate.cli import main
    from imgcurate.rundir import RunDir

    write_json = RunDir.write_json

    def stop_after_exported(self, name, value):
        write_json(self, name, value)
        if name == "exported.json":
            raise _Stop

    for rerun_first in (True, False):
        base = tmp_path / f"rerun_first_{rerun_first}"
        base.mkdir()
        config = _small_config(sample_dir, base)
        monkeypatch.setattr(RunDir, "write_json", stop_after_exported)
        with pytest.raises(_Stop):
            main(["run", config])
        monkeypatch.setattr(RunDir, "write_json", write_json)
        run_dir = base / "out.run"
        assert (run_dir / "exporting.json").exists() and (run_dir / "exported.json").exists()
        if rerun_first:
            assert main(["run", config]) == 0
            assert not (run_dir / "exporting.json").exists()
        other = yaml.safe_load(open(config))
        other["export"]["samples_per_shard"] = 3
        other["run_dir"] = str(base / "other.run")
        (base / "other.yaml").write_text(yaml.safe_dump(other))
        assert main(["run", str(base / "other.yaml"), "--overwrite"]) == 0
        theirs = _files(base / "out")
        assert main(["run", config]) == 2  # another run's export is there: not replaced without --overwrite
        assert _files(base / "out") == theirs


def test_a_run_stopped_after_its_export_finishes_on_the_same_command_without_overwrite(sample_dir, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """Stopped after the export was published (before the summary and the run report), the same command finishes
    the run without exporting again and without --overwrite; the export's bytes stay. Another configuration's run
    is still refused the folder, which holds an export that is not its own."""
    from imgcurate.cli import main
    from imgcurate.rundir import RunDir

    config = _small_config(sample_dir, tmp_path)
    write_json = RunDir.write_json

    def stop_at_the_summary(self, name, value):
        if name == "summary.json":
            raise _Stop
        return write_json(self, name, value)

    monkeypatch.setattr(RunDir, "write_json", stop_at_the_summary)
    with pytest.raises(_Stop):
        main(["run", config])
    monkeypatch.setattr(RunDir, "write_json", write_json)
    out, run_dir = tmp_path / "out", tmp_path / "out.run"
    exported = _files(out)
    assert "_imgcurate_export.json" in exported and not (run_dir / "summary.json").exists()
    assert main(["run", config]) == 0
    assert _files(out) == exported
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exported"]["reused"] is True and summary["exported"]["shards"] == out_shards(out)
    assert all(s["shards_computed"] == 0 for s in summary["steps"])
    assert main(["run", _small_config(sample_dir, tmp_path, min_width=300)]) == 2  # another run's export is there
    (out / "00001.tar").unlink()  # a damaged export: the same run no longer takes it as its own
    assert main(["run", config]) == 2
    assert main(["run", config, "--overwrite"]) == 0  # and --overwrite writes it again
    assert _files(out) == exported and (run_dir / "summary.json").exists()
    assert "reused" not in json.loads((run_dir / "summary.json").read_text())["exported"]
    # another run's export of the same shard sizes, published over it: the first run's rerun does not take it
    other = yaml.safe_load(open(config))
    other["export"]["old_id_col"] = "old_key"
    other["run_dir"] = str(tmp_path / "other.run")
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert main(["run", str(tmp_path / "other.yaml"), "--overwrite"]) == 0
    theirs = _files(out)
    assert theirs != exported and theirs["00000.tar"] == exported["00000.tar"]  # same samples, other columns
    assert main(["run", config]) == 2
    assert _files(out) == theirs


def out_shards(folder):
    return len(list(folder.glob("*.tar")))


def test_a_run_stopped_while_opening_its_published_export_finishes_without_overwrite(sample_dir, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """The export is recorded in the run directory as soon as it is published, before the pipeline opens it (which
    takes long at many shards): a stop there leaves a run that the same command finishes."""
    from imgcurate import ImageTextPairDataset
    from imgcurate.cli import main

    config = _small_config(sample_dir, tmp_path)
    out = tmp_path / "out"
    opened = ImageTextPairDataset.from_webdataset.__func__

    def stop_at_the_export(cls, path, *args, **kwargs):
        if os.path.abspath(str(path)) == str(out):
            raise _Stop
        return opened(cls, path, *args, **kwargs)

    monkeypatch.setattr(ImageTextPairDataset, "from_webdataset", classmethod(stop_at_the_export))
    with pytest.raises(_Stop):
        main(["run", config])
    monkeypatch.setattr(ImageTextPairDataset, "from_webdataset", classmethod(opened))
    exported = _files(out)
    assert (tmp_path / "out.run" / "exported.json").exists() and not (tmp_path / "out.run" / "summary.json").exists()
    assert main(["run", config]) == 0
    assert _files(out) == exported
    assert json.loads((tmp_path / "out.run" / "summary.json").read_text())["exported"]["reused"] is True


def test_a_rerun_removes_what_killed_writers_left_beside_its_reports_and_in_done_step_folders(sample_dir, tmp_path):
    from imgcurate.cli import main

    config = yaml.safe_load(open(_small_config(sample_dir, tmp_path)))
    (tmp_path / "reports").mkdir()
    config["reports"] = {"duplicates": str(tmp_path / "reports" / "dups.html")}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    steps = sorted((tmp_path / "out.run" / "steps").iterdir())
    left = [tmp_path / "reports" / "dups.html.tmp-0123456789ab", steps[-1] / "thresholds.json.tmp-0123456789ab"]
    others = tmp_path / "reports" / "notes.html.tmp-0123456789ab"  # another writer's, in a shared folder
    for path in [*left, others]:
        path.write_bytes(b"half")
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    assert not any(path.exists() for path in left) and others.exists()


def test_a_damaged_run_directory_is_repaired_by_the_rerun(sample_dir, tmp_path, capsys):
    """A step result deleted behind its marker is computed again; what killed writers left is removed; a run.json,
    a staging plan or a step's thresholds that cannot be read are written again; a step result that cannot be read
    is named."""
    from imgcurate.cli import main

    config = _small_config(sample_dir, tmp_path)
    assert main(["run", config]) == 0
    out, run_dir = tmp_path / "out", tmp_path / "out.run"
    exported = _files(out)
    step = next((run_dir / "steps").glob("00-*"))
    (step / "000001.parquet").unlink()
    (step / "000002.parquet.tmp-0123456789ab").write_bytes(b"half written")
    (run_dir / "run.json").write_text("")
    (run_dir / "summary.json.tmp-0123456789ab").write_text("{")
    (out / ".imgcurate-staging").mkdir()
    (out / ".imgcurate-staging" / "plan.json").write_text("")
    marks = next((run_dir / "steps").glob("01-*")) / "thresholds.json"
    wanted = json.loads(marks.read_text())
    marks.write_text("{")  # damaged, its shards all done: written again
    assert main(["run", config, "--overwrite"]) == 0
    assert json.loads(marks.read_text()) == wanted == {"width": [["min_width", 0.0]]}
    assert _files(out) == exported and not (out / ".imgcurate-staging").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["shards_computed"], s["shards_reused"]) for s in summary["steps"]][0] == (1, 3)
    assert not list(run_dir.rglob("*.tmp-*"))
    (step / "000003.parquet").write_bytes(b"not a parquet")
    capsys.readouterr()
    assert main(["run", config, "--overwrite"]) == 2
    assert re.search(r"000003\.parquet: cannot read this step result .+ delete it and rerun", capsys.readouterr().err)
    (step / "000003.parquet").write_bytes((step / "000000.parquet").read_bytes())  # another shard's results
    assert main(["run", config, "--overwrite"]) == 2
    assert re.search(r"000003\.parquet: this step result holds rows of another shard than shard 3; delete it and "
                     r"rerun", capsys.readouterr().err)  # fmt: skip
    table = pq.read_table(step / "000000.parquet")
    pq.write_table(table.drop_columns([table.column_names[-1]]), step / "000003.parquet")  # a column short
    assert main(["run", config, "--overwrite"]) == 2
    assert re.search(r"000003\.parquet: this step result has no column '.+'; delete it and rerun",
                     capsys.readouterr().err)  # fmt: skip
