from __future__ import annotations

import yaml

from imgcurate import ImageTextPairDataset
from imgcurate.cli import EXAMPLE_CONFIG, main


def test_sample_then_run_the_example_pipeline(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "shards")]) == 0
    config = yaml.safe_load(EXAMPLE_CONFIG)
    config["input"], config["output"] = str(tmp_path / "shards"), str(tmp_path / "curated")
    config["steps"][0]["SampleFilter"]["min_width"] = 400
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    printed = capsys.readouterr().out
    out = ImageTextPairDataset.from_webdataset(str(tmp_path / "curated")).metadata.compute()
    src = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute()
    assert (out["width"] >= 400).all()
    assert len(out) == (src["width"] >= 400).sum()
    assert out["old_key"].tolist() == src[src["width"] >= 400]["key"].tolist()
    assert f"exported {len(out)} samples" in printed and "width < 400" in printed


def test_stages_and_init_config(tmp_path, capsys):
    assert main(["stages"]) == 0
    assert "SampleFilter" in capsys.readouterr().out
    assert main(["init-config", str(tmp_path / "c.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["steps"][0]["SampleFilter"]["min_width"] == 256
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
