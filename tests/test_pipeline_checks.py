"""Pipelines check everything before work, and compute each step once per shard."""

from __future__ import annotations

import os

import pytest
import yaml
from user_steps import CaptionLength

import imgcurate.dataset
from imgcurate.cli import main
from imgcurate.embedders.base import ImageEmbedder
from imgcurate.pipeline import Pipeline


def _base(sample_dir, tmp_path):
    return {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "steps": [
            {"TimmImageEmbedder": {"model_name": "test_resnet", "batch_size": 8}},
            {"ExactDuplicates": {}},
            {"SampleFilter": {"min_width": 256, "drop_duplicates": ["exact_duplicate"]}},
        ],
        "export": {"filter_column": "keep", "samples_per_shard": 10},
    }


MISTAKES = {
    "no samples per shard": (
        lambda c: c["export"].update(samples_per_shard=0),
        "export: samples_per_shard must be an integer of at least 1, got 0",
    ),
    "no shards at all": (
        lambda c: c["export"].update(max_shards=0),
        "export: max_shards must be None or an integer of at least 1, got 0",
    ),
    "unknown export key": (
        lambda c: c["export"].update(sampels_per_shard=10),
        "export: unknown key 'sampels_per_shard' (did you mean 'samples_per_shard'?)",
    ),
    "text for an integer": (
        lambda c: c["export"].update(samples_per_shard="100"),
        "export.samples_per_shard: expected an integer, got '100' (str)",
    ),
    "text for a width": (
        lambda c: c["steps"][2]["SampleFilter"].update(min_width="256"),
        "steps[2].SampleFilter.min_width: expected an integer or null, got '256' (str)",
    ),
    "a typo in a column": (
        lambda c: c["steps"][2]["SampleFilter"].update(drop_duplicates=["exact_duplicat"]),
        "steps[2].SampleFilter: SampleFilter reads column(s) 'exact_duplicat' that the metadata does not have",
    ),
    "a typo in a cluster option": (
        lambda c: c.update(cluster={"n_worker": 2}),
        "cluster: unknown key 'n_worker' (did you mean 'n_workers'?)",
    ),
    "a KMeans backend that is not installed": (
        lambda c: c["steps"].append({"SemanticDeduplicator": {"n_clusters": 2, "kmeans_backend": "cuml"}}),
        "kmeans_backend 'cuml' needs 'cuml-cu13', which is not installed",
    ),
    "more clusters than input rows": (
        lambda c: c["steps"].insert(2, {"SemanticDeduplicator": {"n_clusters": 1_000_000}}),
        "steps[2].SemanticDeduplicator: the input has 36 rows, fewer than n_clusters=1000000 (KMeans needs a sample "
        "per cluster): lower n_clusters",  # the step's name once
    ),
    "an unknown step": (lambda c: c["steps"].append({"SemanticDedup": {}}), "unknown step 'SemanticDedup'"),
    "a filter column no step makes": (
        lambda c: c["export"].update(filter_column="kept"),
        "export.filter_column: no column 'kept' at the end of the steps",
    ),
    "a step that is not a step": (
        lambda c: c["steps"].append({"imgcurate.dataset:ImageTextPairDataset": {}}),
        "is not a subclass of imgcurate.steps.Step",
    ),
    "two steps writing one column": (
        lambda c: c["steps"].append({"SampleFilter": {"min_height": 100}}),
        "steps[3].SampleFilter: writes the column 'keep', which steps[2].SampleFilter writes too",
    ),
    "a step writing the key column": (
        lambda c: c["steps"][2]["SampleFilter"].update(keep_column="key"),
        "steps[2].SampleFilter: writes the key column 'key'",
    ),
    "keep and reason in one column": (
        lambda c: c["steps"][2]["SampleFilter"].update(reason_column="keep"),
        "steps[2].SampleFilter: keep_column and reason_column are both 'keep'",
    ),
    "a rule compared with the wrong type": (
        lambda c: c["steps"][2]["SampleFilter"].update(rules=[{"column": "width", "op": ">", "value": "abc"}]),
        "steps[2].SampleFilter: SampleFilter's rules[0] (width > 'abc'): column 'width' holds",
    ),
    "text ordered by a rule": (
        lambda c: c["steps"][2]["SampleFilter"].update(rules=[{"column": "caption", "op": ">=", "value": "m"}]),
        "steps[2].SampleFilter: SampleFilter's rules[0] (caption >= 'm'): column 'caption' holds",
    ),
    "a text column as duplicate marks": (
        lambda c: c["steps"][2]["SampleFilter"].update(drop_duplicates=["exact_duplicate_of"]),
        "steps[2].SampleFilter: SampleFilter's drop_duplicates column 'exact_duplicate_of' holds",
    ),
    "a separator in a rule's reason": (
        lambda c: c["steps"][2]["SampleFilter"].update(
            rules=[{"column": "width", "op": ">", "value": 3, "reason": "narrow; small"}]
        ),
        "steps[2].SampleFilter: rules[0]: rule width > 3: its reason 'narrow; small' contains ';'",
    ),
    "a misspelled rule key": (
        lambda c: c["steps"][2]["SampleFilter"].update(rules=[{"column": "width", "opp": ">", "value": 3}]),
        "rules[0]: unknown key 'opp'",
    ),
    "text for a flag of an embedder whose hints name type-checking imports": (
        lambda c: c["steps"][0]["TimmImageEmbedder"].update(normalize_embeddings="no"),
        "steps[0].TimmImageEmbedder.normalize_embeddings: expected",
    ),
    "a classifier given as a bare name": (
        lambda c: c["steps"][0]["TimmImageEmbedder"].update(classifiers=["AestheticClassifier"]),
        "steps[0].TimmImageEmbedder: classifiers[0]: expected a classifier",
    ),
    "an unknown device": (
        lambda c: c["steps"][0]["TimmImageEmbedder"].update(device="gpu"),
        "device must be auto, cpu, cuda or cuda:N, got 'gpu'",
    ),
    "no workers": (lambda c: c.update(cluster={"n_workers": 0}), "cluster.n_workers: expected at least 1, got 0"),
    "an export section without a folder": (
        lambda c: c.pop("output"),
        "export: give the folder to write as 'path'",
    ),
    "a report without a file": (
        lambda c: c.update(reports={"duplicates": None}),
        "reports.duplicates: give the file to write",
    ),
    "a filter column that is not boolean": (
        lambda c: c["export"].update(filter_column="drop_reason"),
        "export.filter_column: 'drop_reason' holds",
    ),
    "a duplicates report with no dedup step": (
        lambda c: (
            c["steps"].pop(1),
            c["steps"][1]["SampleFilter"].pop("drop_duplicates"),
            c.update(reports={"duplicates": "d.html"}),
        ),
        "reports.duplicates: the metadata has no dedup columns",
    ),  # fmt: skip
    "a run directory in memory with worker processes": (
        lambda c: c.update(cluster={"n_workers": 1, "processes": True}, run_dir="memory://run"),
        "run_dir: memory://run is in this process's memory, which the cluster's worker processes do not share",
    ),
    "an export in memory on a running scheduler": (
        lambda c: c.update(cluster={"address": "tcp://127.0.0.1:1"}, output="memory://out"),
        "export.path: memory://out is in this process's memory, which the cluster's worker processes do not share",
    ),
    "a report named like an input shard": (
        lambda c: c.update(reports={"scores": c["input"] + "/00000.tar"}),
        "reports.scores.path: {input}/00000.tar is named like a file of the dataset in the input folder: give the",
    ),
    "a report over a file of the run directory": (
        lambda c: c.update(
            run_dir=os.path.dirname(c["input"]),
            reports={"scores": os.path.join(os.path.dirname(c["input"]), "summary.json")},
        ),
        "summary.json is one of the run directory's own files: give the report another name",
    ),  # fmt: skip
    "a run directory that is the input folder": (
        lambda c: c.update(run_dir=c["input"]),
        "run_dir: {input} is the input folder: give the run directory a folder of its own",
    ),
    "old keys into a column that the steps leave": (
        lambda c: c["export"].update(old_id_col="caption"),
        "export.old_id_col: 'caption' is already a column at the end of the steps",
    ),
    "an export into the input folder": (
        lambda c: c.update(output=c["input"]),
        "export.path: {input} is the input folder: export into a folder of its own",
    ),
    "a negative tile size": (
        lambda c: c["steps"].insert(2, {"SemanticDeduplicator": {"n_clusters": 2, "block_size": -5}}),
        "steps[2].SemanticDeduplicator: block_size must be an integer of at least 1, got -5",
    ),
    "no KMeans iterations": (
        lambda c: c["steps"].insert(2, {"SemanticDeduplicator": {"n_clusters": 2, "max_iter": 0}}),
        "steps[2].SemanticDeduplicator: max_iter must be an integer of at least 1, got 0",
    ),
    "a ranking column named twice": (
        lambda c: c["steps"].insert(2, {"SemanticDeduplicator": {"n_clusters": 2, "which_to_keep": ["width"] * 2}}),
        "steps[2].SemanticDeduplicator: which_to_keep names the column 'width' twice",
    ),
    "duplicates report columns that are not three": (
        lambda c: c.update(reports={"duplicates": {"path": "d.html", "columns": ["exact_duplicate"]}}),
        "reports.duplicates.columns: give three columns",
    ),
    "duplicates report columns that no step makes": (
        lambda c: c.update(reports={"duplicates": {"path": "d.html", "columns": ["nope", "exact_duplicate_of", None]}}),
        "reports.duplicates.columns: no column 'nope' at the end of the steps",
    ),
    "a scores report with no score": (
        lambda c: c.update(
            reports={"scores": {"path": "s.png", "columns": ["aesthetic_score"], "reason_column": "why"}}
        ),  # fmt: skip
        "reports.scores: none of the columns 'aesthetic_score' (nor 'why') is there at the end of the steps",
    ),
    "a threshold for a column the scores report does not draw": (
        lambda c: c.update(reports={"scores": {"path": "s.png", "columns": ["width"], "thresholds": {"nope": 5}}}),
        "reports.scores.thresholds: 'nope' is not one of the report's columns ('width')",
    ),
    "a memory limit of a fraction above one": (
        lambda c: c.update(cluster={"n_workers": 1, "memory_limit": 1.5}),
        "cluster.memory_limit: expected bytes ('4GiB', at least 64MiB; 0 for no limit), a fraction in (0, 1]",
    ),
    "a negative memory limit in text": (
        lambda c: c.update(cluster={"n_workers": 1, "memory_limit": "-1GB"}),
        "cluster.memory_limit: expected bytes",
    ),
    "a negative dashboard port": (
        lambda c: c.update(cluster={"n_workers": 1, "dashboard_address": -5}),
        "cluster.dashboard_address: expected an address (':8787') or a port, got -5",
    ),
    "two reports in one file": (
        lambda c: c.update(reports={"duplicates": "same.html", "scores": "same.html"}),
        "reports.scores.path: same.html is the file of reports.duplicates too",
    ),
    "cluster environment that is not a mapping": (
        lambda c: c.update(cluster={"n_workers": 1, "env": 5}),
        "cluster.env: expected 'NAME: value' environment variables, got 5",
    ),
    "a memory limit that is not bytes": (
        lambda c: c.update(cluster={"n_workers": 1, "memory_limit": "lots"}),
        "cluster.memory_limit: expected bytes ('4GiB', at least 64MiB; 0 for no limit), a fraction in (0, 1] or "
        "'auto', got 'lots'",
    ),
    "a negative scheduler port": (
        lambda c: c.update(cluster={"n_workers": 1, "scheduler_port": -5}),
        "cluster.scheduler_port: expected a port number (0 for any), got -5",
    ),
    "a file as the cluster's local directory": (
        lambda c: c.update(cluster={"n_workers": 1, "local_directory": c["input"] + "/00000.tar"}),
        "cluster.local_directory: {input}/00000.tar is a file, not a folder",
    ),
    "a dashboard address the cluster cannot start with": (
        lambda c: c.update(cluster={"n_workers": 1, "dashboard_address": "not-a-host-name.invalid:0"}),
        "cluster: the local cluster did not start with these options",
    ),
    "a report into a folder that does not exist": (
        lambda c: c.update(reports={"scores": "/nonexistent-folder/s.html"}),
        "reports.scores.path: the folder /nonexistent-folder does not exist",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_config_mistake_is_one_line_and_exit_2_before_any_partition_is_computed(
    sample_dir, tmp_path, capsys, monkeypatch, mistake
):
    def never(*args, **kwargs):
        raise AssertionError("a partition was computed before the config was checked")

    monkeypatch.setattr(imgcurate.dataset, "_read_partition", never)
    monkeypatch.setattr(ImageEmbedder, "embed_shard", never)
    config = _base(sample_dir, tmp_path)
    change, message = MISTAKES[mistake]
    change(config)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert message.format(input=sample_dir) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_report_over_a_dataset_file_or_a_file_of_another_kind_is_refused_before_any_work(
    sample_dir, tmp_path, capsys, monkeypatch
):
    """A report may go in the export folder, but not under a name the export writes (the export would replace it,
    or it would be taken for part of the dataset), nor over an existing file that is not a report."""
    monkeypatch.setattr(ImageEmbedder, "embed_shard", lambda *a, **k: pytest.fail("a step ran"))
    (tmp_path / "out").mkdir()
    (tmp_path / "notes.txt").write_text("a file of the user's")
    (tmp_path / "reports").mkdir()
    for path, problem in [
        (tmp_path / "out" / "00000.tar", "is named like a file of the dataset in the export folder"),
        (tmp_path / "notes.txt", "holds a file that is not a report; a report does not replace it"),
        (tmp_path / "reports", "is a folder: give the report the name of a file"),
    ]:
        config = _base(sample_dir, tmp_path)
        config["reports"] = {"scores": str(path)}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
        assert main(["run", str(tmp_path / "p.yaml")]) == 2
        assert f"reports.scores.path: {path}" in (err := capsys.readouterr().err) and problem in err, err
    assert os.listdir(tmp_path / "out") == [] and (tmp_path / "notes.txt").read_text() == "a file of the user's"
    assert os.listdir(tmp_path / "reports") == []
    from imgcurate.io._fs import atomic_open

    with pytest.raises(IsADirectoryError, match=r"reports: cannot write it: it is a folder"):
        with atomic_open(str(tmp_path / "reports"), "wb") as f:  # no writer moves its file into a folder
            f.write(b"x")
    assert os.listdir(tmp_path / "reports") == []


def test_config_file_mistakes_name_the_file(sample_dir, tmp_path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text(f"input: {sample_dir}\nsteps:\n  - ExactDuplicates: {{}}\nsteps:\n  - SampleFilter: {{}}\n")
    assert main(["run", str(config)]) == 2  # the plain YAML loader would run the second list alone
    assert f"{config}: not valid YAML (the key 'steps' is given twice" in capsys.readouterr().err
    config.write_text(f"input: {sample_dir}\nsteps:\n  - SampleFilter: {{min_widht: 3}}\n")
    assert main(["run", str(config)]) == 2
    assert f"{config}: steps[0].SampleFilter: unknown key 'min_widht'" in capsys.readouterr().err


def test_an_export_without_filter_column_keeps_what_the_filter_keeps(sample_dir, tmp_path, capsys):
    """``output:`` with a filter among the steps exports the filter's survivors (its keep column, renamed or not);
    ``filter_column: null`` exports every row; two filters must be told apart; output and export.path must agree."""
    from imgcurate import ImageTextPairDataset

    def run(name, export=None, steps=None):
        steps = steps or [{"ExactDuplicates": {}}, {"SampleFilter": {"min_width": 300, "keep_column": "ok"}}]
        config = {"input": str(sample_dir), "output": str(tmp_path / name), "steps": steps}
        if export is not None:
            config["export"] = export
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        return main(["run", str(tmp_path / f"{name}.yaml")])

    assert run("kept") == 0
    source = ImageTextPairDataset.from_webdataset(str(sample_dir)).metadata.compute()
    kept = ImageTextPairDataset.from_webdataset(str(tmp_path / "kept"), validate=False).metadata.compute()
    assert 0 < len(kept) < len(source) and bool(kept["ok"].all())
    assert "kept" in capsys.readouterr().out
    # the same export given on the command line, after the config is read
    config = {"input": str(sample_dir), "steps": [{"SampleFilter": {"min_width": 300, "keep_column": "ok"}}]}
    (tmp_path / "flag.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "flag.yaml"), "--output", str(tmp_path / "flag")]) == 0
    flagged = ImageTextPairDataset.from_webdataset(str(tmp_path / "flag"), validate=False).metadata.compute()
    assert len(flagged) == len(kept) and bool(flagged["ok"].all())
    assert run("all", export={"filter_column": None}) == 0
    assert len(ImageTextPairDataset.from_webdataset(str(tmp_path / "all")).metadata) == len(source)
    two = [{"SampleFilter": {"min_width": 300}}, {"SampleFilter": {"min_height": 300, "keep_column": "tall",
                                                                   "reason_column": "why"}}]  # fmt: skip
    capsys.readouterr()
    assert run("two", steps=two) == 2
    assert "export: several steps write a keep column ('keep' (SampleFilter), 'tall' (SampleFilter))" in (
        capsys.readouterr().err)  # fmt: skip
    assert run("both", export={"path": str(tmp_path / "elsewhere")}) == 2
    assert "name two folders" in capsys.readouterr().err


def test_yaml_exponents_tilde_report_paths_and_filter_ranges(sample_dir, tmp_path, capsys, monkeypatch):
    """``eps: 1e-4`` is a number (YAML 1.2; PyYAML's 1.1 rule made it text), a report path under ``~`` is the home
    folder's as every other path is, and filter bounds that cannot mean anything are refused before any work."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    config = tmp_path / "p.yaml"
    config.write_text(
        f"input: {sample_dir}\nsteps:\n  - ExactDuplicates: {{}}\n"
        "  - SemanticDeduplicator: {n_clusters: 2, eps: 1e-4, embedding_column: exact_duplicate}\n"
    )
    pipeline = Pipeline.from_yaml(str(config))
    assert pipeline.steps[1].eps == [1e-4]
    config.write_text(f"input: {sample_dir}\nsteps:\n  - ExactDuplicates: {{}}\nreports: {{duplicates: ~/d.html}}\n")
    assert main(["run", str(config)]) == 0
    assert (tmp_path / "home" / "d.html").read_bytes().startswith(b"<!doctype html")
    capsys.readouterr()
    config.write_text(f"input: {sample_dir}\nsteps:\n  - SampleFilter: {{rules: [[width, '>=', 5]]}}\n")
    assert main(["run", str(config)]) == 2  # the form a rule takes in YAML is named
    assert "rules: expected a list of a mapping with column, op, value, reason" in capsys.readouterr().err
    config.write_text(f"input: {sample_dir}\nsteps:\n  - SampleFilter: {{rules: [{{column: width, op: '>=', "
                      "value: 300}]}\n")  # fmt: skip
    assert main(["run", str(config)]) == 0
    capsys.readouterr()
    for option, value, problem in [("max_aspect_ratio", 0.5, "at least 1"), ("min_width", -5, "at least 0 pixels")]:
        config.write_text(f"input: {sample_dir}\nsteps:\n  - SampleFilter: {{{option}: {value}}}\n")
        assert main(["run", str(config)]) == 2
        assert f"steps[0].SampleFilter: {option}: " in (err := capsys.readouterr().err) and problem in err, err


def test_an_export_folder_that_holds_shards_is_refused_before_any_step_runs(sample_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.tar").write_bytes(b"an older export")
    monkeypatch.setattr(ImageEmbedder, "embed_shard", lambda *a, **k: pytest.fail("a step ran before the check"))
    config = _base(sample_dir, tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) != 0
    assert "already holds shards" in capsys.readouterr().err
    assert (tmp_path / "out" / "00000.tar").read_bytes() == b"an older export"


def test_without_an_export_each_step_runs_once_per_shard(sample_ds, embedded_shards):
    embedded = embedded_shards
    CaptionLength.calls.clear()
    config = {
        "steps": [
            {"TimmImageEmbedder": {"model_name": "test_resnet", "batch_size": 8}},
            {"user_steps:CaptionLength": {}},
            {"SemanticDeduplicator": {"n_clusters": 3}},
            {"SampleFilter": {"drop_duplicates": ["is_duplicate"]}},
        ]
    }
    facts = {}
    out = Pipeline.from_config(config).run(sample_ds, summary=facts.update)
    assert sorted(embedded) == sorted(sample_ds.tar_files)
    assert sorted(CaptionLength.calls) == [0, 1, 2, 3]
    assert facts["samples_in"] == 36 and "caption_chars" in out.metadata.columns


def test_with_reports_and_an_export_each_step_still_runs_once_per_shard(sample_ds, tmp_path, embedded_shards):
    embedded = embedded_shards
    CaptionLength.calls.clear()
    pipeline = Pipeline(
        steps=[Pipeline.from_config({"steps": [{"TimmImageEmbedder": {"model_name": "test_resnet"}}]}).steps[0],
               CaptionLength(), Pipeline.from_config({"steps": [{"ExactDuplicates": {}}]}).steps[0]],
        reports={"duplicates": {"path": str(tmp_path / "dups.html")},
                 "scores": {"path": str(tmp_path / "s.png"), "columns": ["caption_chars"]}},
        export={"path": str(tmp_path / "out"), "samples_per_shard": 9},
    )  # fmt: skip
    out = pipeline.run(sample_ds)
    assert sorted(embedded) == sorted(sample_ds.tar_files)
    assert sorted(CaptionLength.calls) == [0, 1, 2, 3]
    assert len(out.metadata) == 36 and (tmp_path / "dups.html").exists() and (tmp_path / "s.png").exists()
    # the rerun reads everything back from the run directory: nothing is computed again
    embedded.clear()
    CaptionLength.calls.clear()
    pipeline.export["overwrite"] = True
    pipeline.run(sample_ds)
    assert embedded == [] and CaptionLength.calls == []


def test_a_scheduler_address_where_none_answers_is_one_line(sample_dir, tmp_path, capsys):
    import dask

    config = _base(sample_dir, tmp_path)
    config["cluster"] = {"address": "tcp://127.0.0.1:9"}  # the discard port: nothing listens there
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["run", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err == "imgcurate: error: cluster.address: no Dask scheduler answered at tcp://127.0.0.1:9 within 1s (OSError)"
    )
    assert not (tmp_path / "out").exists()


def test_yaml_merge_keys_are_read_and_may_be_overridden(sample_dir, tmp_path):
    from imgcurate.pipeline import read_config

    config = tmp_path / "p.yaml"
    config.write_text(
        f"input: {sample_dir}\n"
        "size: &size {min_width: 10, min_height: 5}\n"
        "steps:\n"
        "  - SampleFilter: {<<: *size, min_height: 7}\n"
    )
    assert read_config(str(config))["steps"] == [{"SampleFilter": {"min_width": 10, "min_height": 7}}]
    config.write_text("a: 1\nb: &b {x: 1}\nc: {<<: *b, y: 2, y: 3}\n")  # a key given twice is still refused
    with pytest.raises(Exception, match="the key 'y' is given twice"):
        read_config(str(config))


def test_a_step_that_replaces_an_input_column_is_warned_about(sample_dir, tmp_path):
    config = {"input": str(sample_dir), "steps": [{"user_steps:CaptionLength": {"column": "caption"}}]}
    pipeline = Pipeline.from_config(config)
    with pytest.warns(UserWarning, match=r"steps\[0\]\.CaptionLength: replaces the input's column 'caption'"):
        pipeline.check(pipeline.open_input())


def test_cluster_options_that_distributed_takes_pass_the_checks():
    from imgcurate.pipeline import check_cluster

    spec = {"n_workers": 1, "dashboard_address": 8787, "memory_limit": "2GiB", "env": {"OMP_NUM_THREADS": 1}}
    assert check_cluster(spec) == spec
    assert check_cluster({"dashboard_address": ":0", "memory_limit": 0.5, "scheduler_port": 0})


def test_a_run_directory_given_takes_the_storage_options_of_its_own_filesystem_only():
    from imgcurate.pipeline import Pipeline

    so, export_so = {"anon": True}, {"key": "k"}

    def options(**kwargs):
        return Pipeline(steps=[], storage_options=so, **kwargs)._run_dir_options()

    assert options(input="s3://in/shards", run_dir="s3a://other/run") == so  # the same kind of store
    assert options(input="s3://in/shards", run_dir="simplecache::s3://other/run") == so
    assert options(input="s3://in/shards", run_dir="/local/run") == {}  # S3 keys are not for another filesystem
    assert options(input="/local/shards", run_dir="memory://run") == {}
    assert options(run_dir="s3://b/run") == so  # run(dataset) with no input: the options given
    export = {"path": "memory://out", "storage_options": export_so}
    assert options(input="s3://in/shards", run_dir="memory://run", export=export) == export_so
    assert options(input="s3://in/shards", export=export) == export_so  # the default run dir, beside the export


def test_a_cuda_clusters_options_include_those_dask_cuda_hands_to_local_cluster():
    pytest.importorskip("dask_cuda")  # installed by .ci/run: it imports without a GPU
    from imgcurate.errors import ConfigError
    from imgcurate.pipeline import check_cluster

    spec = {"type": "cuda", "n_workers": 1, "dashboard_address": ":0", "host": "127.0.0.1", "env": {"A": "1"},
            "rmm_pool_size": "1GB", "CUDA_VISIBLE_DEVICES": "0"}  # fmt: skip
    assert check_cluster(spec) == spec
    with pytest.raises(ConfigError, match=r"cluster: unknown key 'dashbord_address'"):
        check_cluster({"type": "cuda", "dashbord_address": ":0"})
    with pytest.raises(ConfigError, match=r"cluster\.env: dask-cuda sets CUDA_VISIBLE_DEVICES .+ cluster\.CUDA_VI"):
        check_cluster({"type": "cuda", "env": {"CUDA_VISIBLE_DEVICES": "1"}})


def test_packages_a_step_chooses_are_checked_on_the_workers_of_a_client_made_before_the_run(sample_dir, tmp_path,
                                                                                             monkeypatch):  # fmt: skip
    """A step's packages that its configuration chooses (the KMeans backend, language identification) are checked
    on every worker before any work, as its module is."""
    from distributed import Client, LocalCluster

    from imgcurate.dedup import SemanticDeduplicator
    from imgcurate.errors import ClusterError
    from imgcurate.pipeline import Pipeline
    from imgcurate.steps.base import Requirement
    from imgcurate.text import CaptionFeatures

    def modules(step, backend="pandas"):
        return [r.module for r in step.worker_requirements(backend)]

    assert modules(SemanticDeduplicator(n_clusters=2)) == ["faiss"]
    assert modules(SemanticDeduplicator(n_clusters=2), "cudf") == ["cuml"]
    # workers on distinct GPUs (dask-cuda's layout) make the default cuML's Dask KMeans, which needs its dask extra
    monkeypatch.setattr("imgcurate.device.workers_have_distinct_gpus", lambda client: True)
    assert modules(SemanticDeduplicator(n_clusters=2), "cudf") == ["cuml", "raft_dask", "dask_cudf"]
    assert modules(SemanticDeduplicator(n_clusters=2)) == ["faiss"]
    monkeypatch.undo()
    assert modules(SemanticDeduplicator(n_clusters=2, kmeans_backend="sklearn"), "cudf") == ["sklearn"]
    assert modules(CaptionFeatures()) == ["py3langid"] and modules(CaptionFeatures(language=False)) == []
    missing = Requirement("a_kmeans_package_not_installed", "faiss-cpu")
    monkeypatch.setattr(SemanticDeduplicator, "worker_requirements", lambda self, backend: [missing])
    config = {"input": str(sample_dir), "output": str(tmp_path / "out"),
              "steps": [{"TimmImageEmbedder": {"model_name": "test_resnet"}},
                        {"SemanticDeduplicator": {"n_clusters": 2}}]}  # fmt: skip
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster):
            with pytest.raises(ClusterError, match=r"^cluster: 2 of 2 workers cannot import "
                               r"'a_kmeans_package_not_installed', which SemanticDeduplicator \(pip install "
                               r"faiss-cpu\) needs"):  # fmt: skip
                Pipeline.from_config(config).run()
    assert not (tmp_path / "out").exists()


def test_a_step_told_to_use_a_gpu_is_checked_where_its_tasks_run(sample_dir, tmp_path, capsys):
    """``device: cuda`` where torch cannot use a GPU: one line before any work from run (torch's error came from the
    first shard, a traceback), a would-not-work line from doctor; estimate still estimates (a config for the GPU
    nodes, written elsewhere). On a cluster given by its address the workers check themselves, not the client
    (which may have no GPU of its own)."""
    from distributed import LocalCluster

    from imgcurate import device
    from imgcurate.errors import ClusterError

    if device.torch_cuda_problem() is None:
        pytest.skip("torch can use a GPU here")
    steps = [{"TimmImageEmbedder": {"model_name": "test_resnet", "device": "cuda",
                                    "classifiers": []}}]  # fmt: skip
    config = {"input": str(sample_dir), "output": str(tmp_path / "out"), "steps": steps}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    problem = "steps[0].TimmImageEmbedder: device 'cuda', but no NVIDIA driver is visible: use device 'auto' or 'cpu'"
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"imgcurate: error: {problem}"
    assert not (tmp_path / "out.run").exists()
    assert main(["estimate", str(tmp_path / "p.yaml")]) == 0  # a config for the GPU nodes, estimated anywhere
    capsys.readouterr()
    assert main(["estimate", str(tmp_path / "p.yaml"), "--measure"]) == 2  # but not timed here: one line
    assert (
        capsys.readouterr().err.strip() == f"imgcurate: error: {problem} (--measure times the steps on this "
        "machine: estimate without it, or on a machine with that device)"
    )
    assert main(["doctor", "--config", str(tmp_path / "p.yaml")]) == 1  # its table, then what would not work
    assert f"would not work: {problem}" in capsys.readouterr().out
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        config["cluster"] = {"address": cluster.scheduler_address}
        with pytest.raises(ClusterError, match=r"device 'cuda', but no NVIDIA driver is visible"):
            Pipeline.from_config(config).run()
    assert not (tmp_path / "out").exists()


def test_a_cudf_run_checks_that_the_workers_have_cudf(sample_ds):
    """With the cuDF backend every worker holds cuDF partitions: cudf and dask_cudf must import there (this machine
    has neither, as a CPU-only worker of a GPU job would)."""
    import importlib.util

    from distributed import Client, LocalCluster

    from imgcurate.dedup import ExactDuplicates
    from imgcurate.errors import ClusterError
    from imgcurate.pipeline import check_workers

    if importlib.util.find_spec("cudf") is not None:
        pytest.skip("cudf is installed here")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            check_workers(client, [ExactDuplicates()], "pandas")
            with pytest.raises(ClusterError, match=r"^cluster: 2 of 2 workers cannot import 'cudf', which the cudf "
                                                   r"backend \(pip install cudf-cu13\) needs"):  # fmt: skip
                check_workers(client, [ExactDuplicates()], "cudf")


def test_the_source_digest_workers_are_compared_by_follows_the_package_files_only(tmp_path, monkeypatch):
    """What tells two checkouts of one version apart: the package's .py and .yaml files, by path and bytes; an
    editor's lock file, a notebook's checkpoints and compiled files are not part of it."""
    import shutil

    import imgcurate
    from imgcurate.pipeline import _identity_function

    identity = _identity_function()
    version, digest = identity()
    copy = tmp_path / "imgcurate"
    shutil.copytree(os.path.dirname(imgcurate.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(imgcurate, "__file__", str(copy / "__init__.py"))
    assert identity() == (version, digest)
    (copy / ".#cli.py").symlink_to(tmp_path / "gone")  # Emacs' lock file: a dangling link
    (copy / ".ipynb_checkpoints").mkdir()
    (copy / ".ipynb_checkpoints" / "cli-checkpoint.py").write_text("x = 1\n")
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "stray.py").write_text("x = 1\n")
    assert identity() == (version, digest)
    with open(copy / "cli.py", "a") as f:
        f.write("# changed\n")
    assert identity()[0] == version and identity()[1] != digest


def test_a_cluster_the_run_starts_does_not_print_the_shuffle_plugins_start_and_stop_warnings():
    """distributed's p2p shuffle plugin warns when each shuffle starts and ends, in the scheduler this process runs;
    the run's output stays its own, and the logger is as it was afterwards."""
    import logging

    from imgcurate.pipeline import _cluster

    logger = logging.getLogger("distributed.shuffle._scheduler_plugin")
    before = logger.level
    with _cluster({"n_workers": 1, "processes": False, "dashboard_address": None}):
        assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    assert logger.level == before
