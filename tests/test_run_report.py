"""The run report: written at the end of `imgcurate run` and by `imgcurate report RUN_DIR`, checked against the
run's own results (counts, drops, thumbnails of the right photos, histograms, duplicate groups), and opened in
headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import score_dataset, seeded_checkpoint
from PIL import Image

from imgcurate.cli import main
from imgcurate.errors import ConfigError
from imgcurate.pipeline import Pipeline
from imgcurate.reports import report_run_dir
from imgcurate.reports.run import collect_examples
from imgcurate.reports.scores import collect_scores


def _config(sample_dir, tmp_path, **extra) -> str:
    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "backend": "pandas",
        "steps": [
            {"TimmImageEmbedder": {"model_name": "test_resnet", "batch_size": 8,
                                   "checkpoint_path": seeded_checkpoint(tmp_path, "test_resnet")}},
            {"ExactDuplicates": {}},
            {"SemanticDeduplicator": {"n_clusters": 4, "eps": 1e-4, "mode": "connected"}},
            {"CaptionFeatures": {}},
            {"SampleFilter": {"min_width": 256, "drop_duplicates": ["exact_duplicate", "is_duplicate"],
                              "rules": [{"column": "caption_chars", "op": ">=", "value": 36}]}},
        ],
        "export": {"filter_column": "keep"},
        **extra,
    }  # fmt: skip
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _figures(block: str) -> list[tuple[str, np.ndarray | None]]:
    """(key, thumbnail pixels or None for a placeholder) of every figure in an HTML fragment, in order."""
    out = []
    for body in re.findall(r"<figure>(.*?)</figure>", block, flags=re.S):
        key = re.search(r"<figcaption><b>(.*?)</b>", body).group(1)
        data = re.search(r'src="data:image/jpeg;base64,([^"]+)"', body)
        pixels = None if data is None else np.asarray(Image.open(io.BytesIO(base64.b64decode(data.group(1)))))
        out.append((key, pixels))
    return out


def _images(sample_dir) -> dict[str, Image.Image]:
    """key -> the decoded image, read straight from the tars with tarfile."""
    out = {}
    for name in sorted(os.listdir(sample_dir)):
        if name.endswith(".tar"):
            with tarfile.open(sample_dir / name) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext in ("jpg", "png", "webp", "bmp", "tif", "tiff", "jpeg"):
                        out[key] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    return out


def _first_dropped(df: pd.DataFrame, reason: str, k: int) -> list[str]:
    """The keys of the first ``k`` samples (in shard order) dropped for ``reason``."""
    reasons = df.drop_reason.astype(object).where(df.drop_reason.notna(), "")
    return [k for k, r in zip(df.key, reasons, strict=True) if reason in r.split(";")][:k]


def _without_timestamp(page: str) -> str:
    return re.sub(r"<p>Written [^<]*</p>", "", page)


@pytest.fixture
def finished_run(sample_dir, tmp_path):
    """A finished run of the main job on the sample, and its results read back from the run directory."""
    config = _config(sample_dir, tmp_path)
    assert main(["run", config]) == 0
    pipeline = Pipeline.from_yaml(config)
    result, records = pipeline.compute_steps(pipeline.open_input())  # every shard reused: the run's own columns
    assert all(r.computed == 0 for r in records)
    df = result.metadata.compute()
    return tmp_path / "out.run", result, df


def test_the_run_report_shows_what_the_run_did(finished_run, sample_dir):
    run_dir, result, df = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for anchor in ("counts", "steps", "drops", "errors", "scores", "duplicates"):
        assert f'<h2 id="{anchor}">' in page
    # counts and time per step, from the summary
    assert f"<td>samples in</td><td>{len(df)}</td>" in page
    assert f"<td>samples kept</td><td>{int(df.keep.sum())}</td>" in page
    for step in summary["steps"]:
        assert f"<td>{step['step']}</td><td>{step['shards_computed']}</td><td>{step['shards_reused']}</td>" in page
    # drops by reason: each reason's count, and thumbnails of the first samples dropped for it, of their own photos
    reasons = df.drop_reason.dropna().str.split(";").explode()
    expected = reasons.value_counts()
    assert set(expected.index) == {"width < 256", "exact_duplicate", "is_duplicate", "not caption_chars >= 36"}
    images = _images(sample_dir)
    shown_any = 0
    for reason, count in expected.items():
        heading = re.escape(f"<h3>{html.escape(reason)}: {count}</h3>")
        block = re.search(rf'<div class="reason">{heading}(.*?)</div></div>', page, re.S)
        assert block is not None, reason
        figures = _figures(block.group(1))
        assert [k for k, _ in figures] == _first_dropped(df, reason, 6)
        for key, pixels in figures:
            assert pixels is not None
            original = images[key]
            h, w = pixels.shape[:2]
            assert max(h, w) == 128 and abs(w / h - original.width / original.height) < 0.05
            mean_gap = np.abs(np.asarray(original.resize((w, h)), dtype=np.float64) - pixels).mean()
            assert mean_gap < 12, (key, mean_gap)  # the sample's own photo, not another one
            shown_any += 1
    assert shown_any >= 8
    # scores: the filters' thresholds are listed under the histograms
    assert 'class="plot"' in page
    assert "caption_chars &gt;= 36" in page and "width min_width 256" in page
    # duplicates: both dedup steps, with counts equal to the results, and the semantic eps line
    assert f"Duplicates: {int(df.is_duplicate.sum())} of {len(df)} samples flagged ('is_duplicate')" in page
    assert f"Duplicates: {int(df.exact_duplicate.sum())} of {len(df)} samples flagged ('exact_duplicate')" in page
    assert page.count('<div class="dedup">') == 2
    groups = df[df.is_duplicate].groupby("duplicate_of").size()
    for target, size in groups.items():
        assert f"{size} duplicate(s) of {target}</h3>" in page


def test_the_report_command_rebuilds_the_same_page_from_the_run_directory(finished_run, tmp_path, sample_dir, capsys):
    run_dir, _, _ = finished_run
    written = (run_dir / "report.html").read_text(encoding="utf-8")
    assert main(["report", str(run_dir), "--output", str(tmp_path / "again.html")]) == 0
    again = (tmp_path / "again.html").read_text(encoding="utf-8")
    assert _without_timestamp(again) == _without_timestamp(written)
    capsys.readouterr()
    assert main(["report", str(run_dir), "--output", "-"]) == 0  # on stdout, as config writes a config
    assert _without_timestamp(capsys.readouterr().out) == _without_timestamp(written) and not os.path.exists("-")
    # the default place is the run directory; from another working directory too (run.json names the input in full)
    os.remove(run_dir / "report.html")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "out")
        assert main(["report", str(run_dir)]) == 0
    finally:
        os.chdir(cwd)
    assert _without_timestamp((run_dir / "report.html").read_text(encoding="utf-8")) == _without_timestamp(written)
    # an input changed since the run is an error, not a report of the wrong rows
    tar = sorted(sample_dir.glob("*.tar"))[0]
    os.utime(tar, (1_000_000_000, 1_000_000_000))
    with pytest.raises(ConfigError, match="changed since this run"):
        report_run_dir(str(run_dir))
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 2
    assert "changed since this run" in capsys.readouterr().err


def test_a_folder_that_is_not_a_finished_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.run")]) == 2
    assert f"{tmp_path / 'nope.run'}: no such folder" in capsys.readouterr().err
    from imgcurate import ImageTextPairDataset

    with pytest.raises(ValueError, match="the path is empty"):  # not the current folder
        ImageTextPairDataset.from_webdataset("")
    (tmp_path / "half.run" / "steps").mkdir(parents=True)
    (tmp_path / "half.run" / "run.json").write_text("{}")
    assert main(["report", str(tmp_path / "half.run")]) == 2
    assert "no summary.json; not a finished run" in capsys.readouterr().err
    for run, summary in (("{}", "{}"), ('{"input": "x"}', '{"steps": [{"step": "A"}]}'), ("[1]", "{}")):
        (tmp_path / "half.run" / "run.json").write_text(run)  # another version's, or hand-written
        (tmp_path / "half.run" / "summary.json").write_text(summary)
        assert main(["report", str(tmp_path / "half.run")]) == 2
        assert "half.run: its run.json or summary.json is not what this version" in capsys.readouterr().err


def test_examples_and_histograms_are_bounded_reductions_equal_to_the_table(finished_run):
    _, result, df = finished_run
    rows = collect_examples(result, [("drop_reason", "reason"), ("error", "error")], k=2)
    reasons = df.drop_reason.dropna().str.split(";").explode()
    assert rows.groupby("_group").size().to_dict() == {r: min(2, n) for r, n in reasons.value_counts().items()}
    for reason, got in rows.groupby("_group"):
        assert got.key.tolist() == _first_dropped(df, reason, 2)
    (h,) = collect_scores(result, ["caption_language_confidence"], "keep", bins=10)
    values = df.caption_language_confidence.astype("float64")
    keep = df.keep.to_numpy(dtype=bool)
    assert np.array_equal(h.kept, np.histogram(values[keep].dropna(), h.edges)[0])
    assert np.array_equal(h.dropped, np.histogram(values[~keep].dropna(), h.edges)[0])
    assert h.nulls == int(values.isna().sum()) and h.count == int(values.notna().sum())


def test_infinite_scores_are_counted_apart_and_do_not_empty_the_histogram(tmp_path):
    from matplotlib.figure import Figure

    from imgcurate.reports.scores import draw_scores

    ds = score_dataset(tmp_path / "s", [0.1, 0.3, np.inf, 0.4, None, 0.5, -np.inf, 0.6], column="score")
    (h,) = collect_scores(ds, ["score"], bins=5)
    assert (h.count, h.nulls, h.non_finite) == (5, 1, 2)
    assert h.edges[0] == 0.1 and h.edges[-1] == 0.6  # the finite values' range
    assert np.array_equal(h.kept, np.histogram([0.1, 0.3, 0.4, 0.5, 0.6], h.edges)[0])
    ax = Figure().subplots()
    draw_scores([h], {}, [ax])
    assert ax.get_title() == "score (n=5, null=1, non-finite=2)"


def test_report_false_writes_no_report(sample_dir, tmp_path):
    config = _config(sample_dir, tmp_path, report=False)
    assert main(["run", config]) == 0
    assert (tmp_path / "out.run" / "summary.json").exists()
    assert not (tmp_path / "out.run" / "report.html").exists()


def test_a_run_without_filters_or_dedup_says_so(sample_dir, tmp_path):
    config = {"input": str(sample_dir), "run_dir": str(tmp_path / "r.run"), "backend": "pandas",
              "steps": [{"CaptionFeatures": {"language": False}}]}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    page = (tmp_path / "r.run" / "report.html").read_text(encoding="utf-8")
    assert "No filter step ran." in page and "No dedup step ran." in page
    assert "No step added a numeric score." in page  # word and character counts are integers, not scores


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-default-apps", "--disable-extensions", "--no-first-run",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]  # fmt: skip

#: Appended to a copy of the page: after every image has loaded, lists the sections and the images that failed.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const bad = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt || i.src.slice(0, 40));
  const sections = [...document.querySelectorAll('h2[id]')].filter(h => h.offsetHeight > 0).map(h => h.id);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({images: images.length, bad: bad, sections: sections,
                                    height: document.body.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_report_renders_in_headless_chromium(finished_run, tmp_path):
    run_dir, _, _ = finished_run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    home = tmp_path / "chromium-home"  # a profile of its own, so nothing is read from or left in the real home
    env = {**os.environ, "HOME": str(home)}
    command = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={home}", "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run([*command, probe.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found is not None, dom.stderr[-2000:]
    facts = json.loads(found.group(1).replace("&quot;", '"'))
    assert facts["sections"] == ["counts", "steps", "drops", "errors", "scores", "duplicates"]
    assert facts["bad"] == [] and facts["images"] >= 20
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={home}", "--window-size=1280,2400",
                    f"--screenshot={shot}", (run_dir / "report.html").as_uri()], capture_output=True, timeout=120,
                   env=env, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 20  # thumbnails and plots drew, not a blank page


def test_clip_scores_and_their_thresholds_are_drawn_also_when_every_shard_is_reused(sample_dir, tmp_path):
    from imgcurate.embedders.clip import write_random_clip

    tiny = write_random_clip(tmp_path / "tiny-clip", seed=1)
    rules = {"min_clip_score": -0.5, "clip_top_fraction": 0.5, "min_side": 10}
    config = {"input": str(sample_dir), "run_dir": str(tmp_path / "clip.run"), "backend": "pandas",
              "steps": [{"ClipEmbedder": {"model_name": tiny, "device": "cpu", "batch_size": 8}},
                        {"ClipTextFilter": rules}]}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    for _ in range(2):  # the second run reuses every shard: the top fraction's quantile comes from the run dir
        assert main(["run", str(tmp_path / "p.yaml")]) == 0
        summary = json.loads((tmp_path / "clip.run" / "summary.json").read_text())
        page = (tmp_path / "clip.run" / "report.html").read_text(encoding="utf-8")
        marks = dict(summary["steps"][1]["thresholds"]["clip_score"])
        assert marks["min_clip_score"] == -0.5 and -1 <= marks["top 50%"] <= 1
        assert f"clip_score top 50% {marks['top 50%']:g}" in page and "clip_score min_clip_score -0.5" in page
        assert "not in top 50%" in page  # the drop reason, with its thumbnails
        # the smaller side is at least min_side exactly when both sides are: drawn on both histograms
        assert summary["steps"][1]["thresholds"]["width"] == summary["steps"][1]["thresholds"]["height"]
        assert summary["steps"][1]["thresholds"]["width"] == [["min_side", 10.0]]
        assert "width min_side 10" in page and "height min_side 10" in page
    assert [s["shards_reused"] for s in summary["steps"]] == [4, 4]
    # a run killed after the filter's last shard, before its thresholds.json: the rerun computes the quantile again
    (marks_file,) = (tmp_path / "clip.run" / "steps").glob("01-*/thresholds.json")
    wanted = json.loads(marks_file.read_text())
    marks_file.unlink()
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    assert json.loads(marks_file.read_text()) == wanted
    summary = json.loads((tmp_path / "clip.run" / "summary.json").read_text())
    assert dict(summary["steps"][1]["thresholds"]["clip_score"]) == marks
