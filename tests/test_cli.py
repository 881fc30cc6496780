from __future__ import annotations

import os

import yaml

from imgcurate import ImageTextPairDataset
from imgcurate.cli import EXAMPLE_CONFIG, main


def test_sample_then_run_the_example_pipeline(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "shards")]) == 0
    config = yaml.safe_load(EXAMPLE_CONFIG)
    config["input"], config["output"] = str(tmp_path / "shards"), str(tmp_path / "curated")
    config["steps"][1]["SampleFilter"]["min_width"] = 400
    config["reports"]["duplicates"] = str(tmp_path / "report" / "duplicates.html")
    (tmp_path / "report").mkdir()
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    printed = capsys.readouterr().out
    out = ImageTextPairDataset.from_webdataset(str(tmp_path / "curated")).metadata.compute()
    src = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute().reset_index(drop=True)
    # the sample holds byte-identical copies of some originals: whichever comes second in shard order is dropped
    same_bytes = src["variant"].isin(["original", "exact_copy"])
    second = src[same_bytes].duplicated("source").reindex(src.index, fill_value=False)
    wanted = src[(src["width"] >= 400) & ~second]
    assert second.any() and len(wanted) < (src["width"] >= 400).sum()
    assert out["old_key"].tolist() == wanted["key"].tolist()
    assert f"exported {len(out)} samples" in printed and "width < 400" in printed and "exact_duplicate" in printed
    page = (tmp_path / "report" / "duplicates.html").read_text()
    assert "samples flagged ('exact_duplicate')" in page


def test_stages_and_init_config(tmp_path, capsys):
    assert main(["stages"]) == 0
    assert "SampleFilter" in capsys.readouterr().out
    assert main(["init-config", str(tmp_path / "c.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["steps"][1]["SampleFilter"]["min_width"] == 256
    assert main(["init-config", str(tmp_path / "c.yaml")]) == 1


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("input: x\nsteps:\n  - NoSuchStep: {}\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown step 'NoSuchStep'" in capsys.readouterr().err


def test_estimate_counts_the_input_and_sizes_each_step(sample_dir, tmp_path, capsys):
    from imgcurate.estimate import estimate_config

    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "steps": [
            {"TimmImageEmbedder": {"model_name": "test_vit", "batch_size": 4, "device": "cpu"}},
            {"SemanticDeduplicator": {"n_clusters": 3, "max_iter": 10}},
            {"SampleFilter": {"min_width": 256}},
        ],
        "export": {"filter_column": "keep"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    report = estimate_config(str(tmp_path / "p.yaml"))
    tars = sorted(sample_dir.glob("*.tar"))
    assert (report.shards, report.samples) == (4, 36)
    assert report.tar_bytes == sum(t.stat().st_size for t in tars)
    embed, dedup, _, export = report.steps
    import torch

    from imgcurate.embedders import TimmImageEmbedder

    with torch.no_grad():
        width = TimmImageEmbedder("test_vit").model("cpu")(torch.zeros(1, 3, 160, 160)).shape[-1]
    assert embed.adds == f"image_embedding ({width}-d)" and embed.written_bytes == 36 * width * 4
    assert dedup.memory_bytes == 2 * 36 * width * 4 and embed.seconds is None
    assert export.written_bytes == report.tar_bytes
    (sample_dir / "00003.parquet").unlink()  # a shard without parquet is counted from its tar headers
    assert estimate_config(str(tmp_path / "p.yaml")).samples == 36

    assert main(["estimate", str(tmp_path / "p.yaml"), "--measure"]) == 0
    printed = capsys.readouterr().out
    assert "4 shards, 36 samples" in printed and "img/s on cpu" in printed and "GFLOP/s" in printed


def test_a_pipeline_on_its_own_cluster_reports_and_exports_before_closing_it(sample_dir, tmp_path):
    """Dedup steps persist on the cluster's workers; the report and the export must run while the cluster is up."""
    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "processes": False, "dashboard_address": None},
        "steps": [{"ExactDuplicates": {}}, {"SampleFilter": {"drop_duplicates": ["exact_duplicate"]}}],
        "reports": {"duplicates": str(tmp_path / "dups.html")},
        "export": {"filter_column": "keep"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    out = ImageTextPairDataset.from_webdataset(str(tmp_path / "out")).metadata.compute()
    src = ImageTextPairDataset.from_webdataset(str(sample_dir)).metadata.compute()
    copies = int(src["variant"].eq("exact_copy").sum())
    assert len(out) == len(src) - copies - int(src["error"].notna().sum()) and copies > 0
    assert "samples flagged ('exact_duplicate')" in (tmp_path / "dups.html").read_text()


def test_an_unknown_report_is_an_error_before_any_work(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("input: x\nsteps: []\nreports: {histogram: h.png}\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown report 'histogram': choose one of duplicates, scores" in capsys.readouterr().err


def test_the_whole_pipeline_on_worker_processes_keeps_one_sample_per_photo(sample_dir, tmp_path):
    """Embed, dedup, report and export on two worker processes: steps are pickled to the workers, each worker
    builds its own (seeded, hence identical) model, dedup persists on the workers, and the export indexes for DALI."""
    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None},
        "steps": [
            {"ExactDuplicates": {}},
            {"TimmImageEmbedder": {"model_name": "test_resnet", "batch_size": 8}},
            {"SemanticDeduplicator": {"n_clusters": 4, "eps": 1e-4}},
            {"SampleFilter": {"drop_duplicates": ["exact_duplicate", "is_duplicate"], "drop_errors": False}},
        ],
        "reports": {"duplicates": str(tmp_path / "dups.html")},
        "export": {"filter_column": "keep", "index_files": True},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    out = ImageTextPairDataset.from_webdataset(str(tmp_path / "out"))
    df = out.metadata.compute()
    src = ImageTextPairDataset.from_webdataset(str(sample_dir)).metadata.compute()
    assert sorted(df["source"]) == sorted(src["source"].unique())  # one sample of each photo, whatever its copies
    assert all(os.path.exists(t[:-4] + ".idx") for t in out.tar_files)
    assert "samples flagged ('is_duplicate')" in (tmp_path / "dups.html").read_text()


def test_report_arguments_go_to_the_report_and_are_checked_before_any_work(sample_dir, tmp_path, capsys):
    from PIL import Image

    config = {
        "input": str(sample_dir),
        "steps": [{"SampleFilter": {"min_width": 300}}],
        "reports": {"scores": {"path": str(tmp_path / "s.png"), "thresholds": {"aesthetic_score": 5.0}}},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 100  # the drop-reason panel: no score column in this pipeline
    config["reports"]["scores"]["colour"] = "red"
    config["input"] = str(tmp_path / "nowhere")  # never opened: the config fails first
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    assert "reports.scores: unknown key 'colour'" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**config, "reports": {"duplicates": {"max_groups": 3}}}))
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    assert "reports.duplicates: give the file to write as 'path'" in capsys.readouterr().err
