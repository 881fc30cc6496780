from __future__ import annotations

import os
import re

import pytest
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
    capsys.readouterr()
    assert main(["init-config", str(tmp_path / "c.yaml")]) == 2  # kept: one line, as every mistake
    assert capsys.readouterr().err == f"imgcurate: error: {tmp_path / 'c.yaml'} exists; pass --force to overwrite\n"


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
    assert dedup.memory_bytes == 2 * 36 * width * 4 and dedup.seconds > 0 and "dedup.py" in dedup.notes
    # test_vit is not in the throughput table: its time is scaled from the closest measured model by GFLOP/img
    from imgcurate.estimate import THROUGHPUT, model_size

    params, gflop = model_size("test_vit", (3, 160, 160))
    rate, ref_gflop, _ = min(THROUGHPUT["cpu"].values(), key=lambda r: abs(r[1] - gflop))
    assert embed.seconds == pytest.approx(36 / (rate * ref_gflop / gflop)) and "scaled by GFLOP/img" in embed.notes
    assert embed.memory_bytes >= params * 4 and embed.gpu_memory_bytes == 0
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


def test_stages_verbose_and_json_list_parameters_gpu_and_optional_packages(monkeypatch, capsys):
    import json

    from imgcurate import pipeline
    from imgcurate.steps.base import Requirement

    assert main(["stages", "--json", "--verbose"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert set(infos) == set(pipeline.STAGES)
    emb = infos["TimmImageEmbedder"]
    params = {p["name"]: p for p in emb["parameters"]}
    assert params["model_name"]["required"] and params["model_name"]["type"] == "str"
    assert params["batch_size"]["default"] is None and emb["gpu"] == "optional"
    assert infos["SampleFilter"]["gpu"] == "no"
    assert {p["name"]: p["default"] for p in infos["SampleFilter"]["parameters"]}["min_aesthetic"] is None
    assert {p["name"]: p["default"] for p in infos["SampleFilter"]["parameters"]}["drop_duplicates"] == []
    assert not [i["name"] for i in infos.values() if "`" in i["summary"] or ":class:" in i["summary"]]  # plain text
    assert infos["ClipEmbedder"]["requires"][0]["package"] == "open-clip-torch"

    # a missing optional package, and a step whose module cannot be imported: listed, not fatal
    from imgcurate.embedders.clip import ClipEmbedder

    monkeypatch.setattr(ClipEmbedder, "requires", (Requirement("no_such_module_xyz", "no-such-pkg", extra="clip"),))
    monkeypatch.setitem(pipeline.STAGES, "Broken", "no_such_module_xyz.steps:Broken")
    assert main(["stages", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "needs no-such-pkg: not installed (pip install 'imgcurate[clip]')" in out
    assert "Broken: (no summary)\n  unavailable here: No module named 'no_such_module_xyz'" in out
    assert "model_name: str (required)" in out and "GPU: optional" in out
    assert main(["stages", "--json"]) == 0
    short = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert short["ClipEmbedder"]["available"] is False and short["Broken"]["available"] is False
    assert short["SampleFilter"] == {
        "name": "SampleFilter",
        "summary": short["SampleFilter"]["summary"],
        "available": True,
    }
    assert main(["stages"]) == 0
    assert "Broken" in capsys.readouterr().out


def test_config_round_trips_every_flag_combination(sample_dir, tmp_path, capsys):
    import itertools

    from imgcurate.cli import DEFAULT_MODEL, make_config
    from imgcurate.pipeline import Pipeline

    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    out = tmp_path / "c.yaml"
    for dedup, no_aes, no_nsfw, aes, nsfw, batch in itertools.product(
        (True, False), (False, True), (False, True), (5.0, 0.5), (0.5, 0.9), (None, 32)
    ):
        argv = ["config", "--input-path", str(sample_dir), "--output-path", str(tmp_path / "o"), "--force"]
        argv += ["--output-file", str(out)] + ["--aesthetic-threshold", str(aes)] * (not no_aes)
        argv += ["--nsfw-threshold", str(nsfw)] * (not no_nsfw)
        argv += ["--dedup" if dedup else "--no-dedup", "--images-per-tar", "7"]
        argv += ["--no-aesthetic"] * no_aes + ["--no-nsfw"] * no_nsfw + ["--batch-size", str(batch)] * bool(batch)
        assert main(argv) == 0, argv
        flags = {"input_path": str(sample_dir), "output_path": str(tmp_path / "o"), "dedup": dedup,
                 "aesthetic_threshold": None if no_aes else aes, "nsfw_threshold": None if no_nsfw else nsfw,
                 "batch_size": batch, "images_per_tar": 7}  # fmt: skip
        err = capsys.readouterr().err
        assert ("0-10 scale" in err) == (aes < 1 and not no_aes)
        config = yaml.safe_load(out.read_text())
        assert config["steps"] == make_config(**flags)["steps"]
        pipeline = Pipeline.from_config(config)  # every key and type checked
        pipeline.check(ds)  # the column flow on the sample's meta (nothing computed)
        names = [type(s).__name__ for s in pipeline.steps]
        expected = ["ExactDuplicates"] * dedup + ["TimmImageEmbedder"] * (dedup or not (no_aes and no_nsfw))
        expected += ["SemanticDeduplicator"] * dedup + ["SampleFilter"]
        assert names == expected, argv
        filt = pipeline.steps[-1]
        assert filt.min_aesthetic == (None if no_aes else aes) and filt.max_nsfw == (None if no_nsfw else nsfw)
        assert list(filt.drop_duplicates) == (["exact_duplicate", "is_duplicate"] if dedup else [])
        if "TimmImageEmbedder" in names:
            emb = pipeline.steps[names.index("TimmImageEmbedder")]
            assert emb.model_name == DEFAULT_MODEL and emb.pretrained
            heads = [type(c).__name__ for c in emb.classifiers]
            assert heads == ["AestheticClassifier"] * (not no_aes) + ["NsfwClassifier"] * (not no_nsfw)
            if batch:
                assert emb.batch_size == batch
        if dedup:
            assert pipeline.steps[2].n_clusters == 1  # 36 samples: one cluster per 1,000
        assert pipeline.export == {"path": str(tmp_path / "o"), "filter_column": "keep", "samples_per_shard": 7,
                                   "old_id_col": "old_key"}  # fmt: skip
        assert pipeline.input == str(sample_dir)


def test_config_rejects_bad_values_and_keeps_existing_files(tmp_path, capsys):
    base = ["config", "--input-path", "in", "--output-path", "out", "--output-file", str(tmp_path / "c.yaml")]
    assert main(base + ["--aesthetic-threshold", "50"]) == 2
    assert "the aesthetic score is 0-10" in capsys.readouterr().err
    assert main(base + ["--nsfw-threshold", "1.5"]) == 2
    with pytest.raises(SystemExit, match="2"):  # refused by the argument parser
        main(base + ["--images-per-tar", "0"])
    assert main(base + ["--model", "no_such_model_xyz"]) == 2
    assert "unknown timm model" in capsys.readouterr().err
    assert not (tmp_path / "c.yaml").exists()
    assert main(base + ["--no-dedup", "--no-nsfw"]) == 0
    assert main(base) == 2  # exists, no --force: a one-line mistake
    text = (tmp_path / "c.yaml").read_text()
    assert "NsfwClassifier" not in text and "n_clusters: 1000" not in text
    capsys.readouterr()
    assert main(base + ["--force"]) == 0  # "in" does not exist: the clusters are not counted, and it says so
    assert "n_clusters: 1000" in (tmp_path / "c.yaml").read_text()
    assert "imgcurate: warning: n_clusters: 1000, as the input cannot be counted here (in: " in capsys.readouterr().err


def test_estimate_names_the_columns_each_step_adds_as_configured(sample_dir, tmp_path, capsys):
    config = {"input": str(sample_dir), "steps": [
        {"ExactDuplicates": {"hash_column": "h", "duplicate_column": "d", "duplicate_of_column": "d_of"}},
        {"SampleFilter": {"min_width": 10, "keep_column": "ok", "reason_column": "why"}}]}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["estimate", str(tmp_path / "p.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("ExactDuplicates") and "h, d, d_of, h_error" in line for line in lines), lines
    assert any(line.startswith("SampleFilter") and "ok, why" in line for line in lines), lines


def test_estimate_from_the_input_alone_and_with_a_config_flag(sample_dir, tmp_path, capsys):
    from imgcurate.estimate import THROUGHPUT, estimate_config, model_size

    assert main(["estimate", "--input-path", str(sample_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"input: {sample_dir}: 4 shards, 36 samples")
    assert main(["estimate"]) == 2
    assert "give --input-path DIR" in capsys.readouterr().err

    config = {
        "input": str(tmp_path / "elsewhere"),  # replaced by --input-path
        "steps": [{"TimmImageEmbedder": {"model_name": "resnet50", "batch_size": 8, "device": "cuda"}},
                  {"TimmImageEmbedder": {"model_name": "resnet50", "batch_size": 8, "device": "cpu",
                                         "image_embedding_column": "cpu_embedding"}}],
    }  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["estimate", "--config", str(tmp_path / "p.yaml"), "--input-path", str(sample_dir)]) == 0
    printed = capsys.readouterr().out
    assert "4 shards, 36 samples" in printed and "GPU mem" in printed and "no measured throughput on cuda" in printed
    gpu, cpu = estimate_config(str(tmp_path / "p.yaml"), input_path=str(sample_dir)).steps
    params, gflop = model_size("resnet50", (3, 224, 224))
    assert params == 25_557_032 and gflop == pytest.approx(THROUGHPUT["cpu"]["resnet50"][1], rel=0.01)
    batch = 8 * 3 * 224 * 224 * 4
    assert gpu.seconds is None and gpu.gpu_memory_bytes == params * 4 + 2 * batch and gpu.memory_bytes == 4 * batch
    assert cpu.seconds == pytest.approx(36 / THROUGHPUT["cpu"]["resnet50"][0]) and "RESULTS.md" in cpu.notes
    assert cpu.gpu_memory_bytes == 0
    assert main(["estimate", str(tmp_path / "p.yaml"), "--config", str(tmp_path / "p.yaml")]) == 2


def test_config_checks_the_column_flow_when_the_input_is_there(sample_dir, tmp_path, capsys):
    """ViT-H/14 gives 1024-d embeddings: the aesthetic heads (ViT-L/14, ViT-B/32) cannot read them, the NSFW head for
    H/14 can; ViT-B/32's 512-d embeddings have both heads."""
    argv = ["config", "--input-path", str(sample_dir), "--output-path", "o", "--output-file", str(tmp_path / "c.yaml")]
    argv += ["--no-dedup", "--model"]
    assert main(argv + ["vit_huge_patch14_clip_224.laion2b"]) == 2
    assert "AestheticClassifier" in capsys.readouterr().err and not (tmp_path / "c.yaml").exists()
    assert main(argv + ["vit_huge_patch14_clip_224.laion2b", "--no-aesthetic"]) == 0
    assert "NsfwClassifier" in (tmp_path / "c.yaml").read_text()
    assert main(argv + ["vit_base_patch32_clip_224.openai", "--force"]) == 0
    text = (tmp_path / "c.yaml").read_text()
    assert "AestheticClassifier" in text and "NsfwClassifier" in text


def test_the_readme_main_job_keeps_one_sample_per_photo(tmp_path, capsys, fresh_models):
    """examples/sample_pipeline.yaml, which the README's first command runs: embed, exact and semantic dedup,
    filter, report and export on the bundled sample, offline (seeded random weights, with a warning: the model
    cache starts empty, so the warning is not lost to a model an earlier test loaded in this process)."""
    import pathlib

    config = yaml.safe_load((pathlib.Path(__file__).parents[1] / "examples" / "sample_pipeline.yaml").read_text())
    assert main(["sample", str(tmp_path / "shards")]) == 0
    config["input"], config["output"] = str(tmp_path / "shards"), str(tmp_path / "curated")
    config["reports"]["duplicates"] = str(tmp_path / "duplicates.html")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    shown = capsys.readouterr()
    # imgcurate's own warnings, on the command line: one line each, not Python's file:line format
    assert re.search(r"^imgcurate: warning: .*seeded random weights", shown.err, re.M)
    assert "UserWarning" not in shown.err
    src = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute()
    out = ImageTextPairDataset.from_webdataset(str(tmp_path / "curated")).metadata.compute()
    wide = src[(src["width"] >= 256) & src["error"].isna()]
    assert not out["source"].duplicated().any()  # every copy found: one sample per photo is left
    # the semantic step keeps the widest copy, so no photo with a copy of 256 pixels or more is lost to the filter
    assert set(out["source"]) == set(wide["source"])
    assert "semantic duplicates" in shown.out


def test_config_clip_and_caption_flags_round_trip(sample_dir, tmp_path, capsys):
    import itertools

    from imgcurate.cli import make_config
    from imgcurate.pipeline import Pipeline
    from imgcurate.text import PRESETS

    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    out = tmp_path / "c.yaml"
    rules = [[], ["--min-clip-score", "0.25"], ["--clip-top-fraction", "0.3"], ["--filter-preset", "laion2b"],
             ["--filter-preset", "datacomp_basic"]]  # fmt: skip
    for clip, rule, languages, words, no_aes in itertools.product(
        (None, "ViT-B-32"), rules, (None, "en,de"), (None, 2), (False, True)
    ):
        argv = ["config", "--input-path", str(sample_dir), "--output-path", str(tmp_path / "o"), "--force"]
        argv += ["--output-file", str(out), *rule] + ["--no-aesthetic"] * no_aes
        argv += ["--clip-model", clip] * bool(clip) + ["--languages", languages] * bool(languages)
        argv += ["--min-caption-words", str(words)] * bool(words)
        preset = PRESETS.get(rule[1], {}) if rule and rule[0] == "--filter-preset" else {}
        needs_clip = rule[:1] in (["--min-clip-score"], ["--clip-top-fraction"]) or "min_clip_score" in preset
        capsys.readouterr()
        if needs_clip and clip is None:
            assert main(argv) == 2, argv
            assert "needs the CLIP embedder (--clip-model" in capsys.readouterr().err
            continue
        assert main(argv) == 0, argv
        config = yaml.safe_load(out.read_text())
        flags = {"aesthetic_threshold": None if no_aes else 5.0, "clip_model": clip, "min_caption_words": words,
                 "languages": languages.split(",") if languages else []}  # fmt: skip
        if rule:
            flags[rule[0][2:].replace("-", "_")] = rule[1] if rule[0] == "--filter-preset" else float(rule[1])
        assert config["steps"] == make_config(str(sample_dir), str(tmp_path / "o"), **flags)["steps"]
        pipeline = Pipeline.from_config(config)
        pipeline.check(ds)  # every column each step reads is made by a step before it
        names = [type(s).__name__ for s in pipeline.steps]
        captions = bool(languages or words or {"languages", "min_words"} & set(preset))
        text_filter = bool(rule or languages or words)
        expected = ["ExactDuplicates", "ClipEmbedder" if clip else "TimmImageEmbedder"]
        expected += ["CaptionFeatures"] * captions + ["SemanticDeduplicator"]
        expected += ["ClipTextFilter" if text_filter else "SampleFilter"]
        assert names == expected, argv
        emb, filt = pipeline.steps[1], pipeline.steps[-1]
        if clip:
            assert (emb.model_name, emb.pretrained) == ("ViT-B-32", "openai")
            assert "clip_score" in emb.output_columns()
        heads = [type(c).__name__ for c in emb.classifiers]
        assert heads == ["AestheticClassifier"] * (not no_aes) + ["NsfwClassifier"], argv
        assert filt.min_aesthetic == (None if no_aes else 5.0) and filt.max_nsfw == 0.5
        if languages:
            assert list(filt.languages) == ["en", "de"]
        elif "languages" in preset:
            assert list(filt.languages) == list(preset["languages"])
        if rule[:1] == ["--min-clip-score"]:
            assert filt.min_clip_score == 0.25
        if rule[:1] == ["--clip-top-fraction"]:
            assert filt.clip_top_fraction == 0.3
        if words:
            assert filt.min_words == 2
    for bad, message in ((["--min-clip-score", "3"], "cosine"), (["--clip-top-fraction", "0"], "fraction"),
                         (["--filter-preset", "nope"], "unknown preset 'nope'"),
                         (["--min-caption-words", "-1"], "non-negative integer")):  # fmt: skip
        argv = ["config", "--input-path", "in", "--output-path", "o", "--output-file", str(tmp_path / "x.yaml"), *bad]
        if bad[0] == "--min-caption-words":  # refused by the argument parser
            with pytest.raises(SystemExit, match="2"):
                main([*argv, "--clip-model", "ViT-B-32"])
        else:
            assert main([*argv, "--clip-model", "ViT-B-32"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_config_min_caption_words_0_writes_no_minimum_words_rule(sample_dir, tmp_path, capsys):
    """``--min-caption-words 0`` writes the config that leaving the flag out writes (no rule, no CaptionFeatures for
    it), as the flags that switch a rule off do; with a preset that sets a minimum it is refused, not dropped."""
    base = ["config", "--input-path", str(sample_dir), "--output-path", str(tmp_path / "o"), "--model", "test_resnet",
            "--no-aesthetic", "--no-nsfw"]  # fmt: skip

    def written(name: str, *flags: str) -> str:
        assert main([*base, "--output-file", str(tmp_path / name), *flags]) == 0, flags
        return (tmp_path / name).read_text()

    plain = written("plain.yaml")
    assert written("zero.yaml", "--min-caption-words", "0") == plain
    assert "min_words" not in plain and "CaptionFeatures" not in plain and "ClipTextFilter" not in plain
    languages = written("en.yaml", "--languages", "en")
    assert written("en-zero.yaml", "--languages", "en", "--min-caption-words", "0") == languages
    assert "min_words" not in languages and "CaptionFeatures" in languages
    one = yaml.safe_load(written("one.yaml", "--min-caption-words", "1"))
    assert one["steps"][-1]["ClipTextFilter"]["min_words"] == 1
    capsys.readouterr()
    argv = [*base, "--output-file", str(tmp_path / "basic.yaml"), "--filter-preset", "datacomp_basic"]
    assert main([*argv, "--min-caption-words", "0"]) == 2
    err = capsys.readouterr().err
    assert err == ("imgcurate: error: --min-caption-words 0 has no effect with --filter-preset datacomp_basic (it "
                   "sets min_words 3): leave one of them out\n")  # fmt: skip
    assert not (tmp_path / "basic.yaml").exists()
