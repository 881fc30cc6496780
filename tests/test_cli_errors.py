"""Wrong paths, counts and configs are one-line errors (exit 2) before any work, the same from run, estimate and
doctor; a failed rerun leaves no stale summary; a sample that cannot be hashed says why."""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from imgcurate import ImageTextPairDataset
from imgcurate.cli import main
from imgcurate.io.make import Record, write_shards
from imgcurate.reports import report_run_dir
from imgcurate.testing import encode_image


def _config(sample_dir, tmp_path, name="p.yaml", **changes) -> str:
    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "backend": "pandas",
        "steps": [{"ExactDuplicates": {}}, {"SampleFilter": {"drop_duplicates": ["exact_duplicate"]}}],
        "export": {"filter_column": "keep"},
        **changes,
    }
    (tmp_path / name).write_text(yaml.safe_dump(config))
    return str(tmp_path / name)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and ".tmp-" not in err, err
    assert err.startswith("imgcurate: error: "), err
    return err[len("imgcurate: error: ") : -1]


def test_a_run_dir_that_is_a_file_is_refused_before_any_work(sample_dir, tmp_path, capsys):
    config = _config(sample_dir, tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    assert main(["run", config, "--run-dir", str(tmp_path / "afile")]) == 2
    assert _one_error(capsys) == f"run_dir: {tmp_path / 'afile'} is a file, not a folder"
    assert main(["run", config, "--run-dir", str(tmp_path / "afile" / "run")]) == 2
    afile = tmp_path / "afile"
    assert _one_error(capsys) == f"run_dir: {afile / 'run'} cannot be made: {afile} is a file, not a folder"
    assert not (tmp_path / "out").exists() and (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("command", [["run"], ["estimate"], ["doctor", "--config"]])
def test_a_folder_given_as_the_config_is_a_clear_error(tmp_path, capsys, command):
    assert main([*command, str(tmp_path)]) == 2
    assert _one_error(capsys) == f"{tmp_path}: a folder, not a pipeline config file"


COUNTS = {
    "sample 0": ["sample", "{out}", "--samples-per-shard", "0"],
    "sample -1": ["sample", "{out}", "--samples-per-shard", "-1"],
    "shard 0": ["shard", "{src}", "{out}", "--samples-per-shard", "0"],
    "config batch": ["config", "--input-path", "{src}", "--output-path", "{out}", "--output-file", "{out}.yaml",
                     "--batch-size", "0"],
    "config images per tar": ["config", "--input-path", "{src}", "--output-path", "{out}", "--output-file",
                              "{out}.yaml", "--images-per-tar", "-1"],
    "config clusters": ["config", "--input-path", "{src}", "--output-path", "{out}", "--output-file", "{out}.yaml",
                        "--n-clusters", "0"],
    "config words": ["config", "--input-path", "{src}", "--output-path", "{out}", "--output-file", "{out}.yaml",
                     "--min-caption-words", "-1"],
}  # fmt: skip
EXPECTED = {"config words": "expected a non-negative integer (0: no minimum)"}  # a minimum that 0 switches off


@pytest.mark.parametrize("case", list(COUNTS))
def test_counts_and_sizes_must_be_positive_integers_at_parsing(tmp_path, capsys, case):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "a.png")
    argv = [a.format(src=tmp_path / "src", out=tmp_path / "out") for a in COUNTS[case]]
    option, value = argv[-2:]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = EXPECTED.get(case, "expected a positive integer")
    assert err.splitlines()[-1] == f"imgcurate {argv[0]}: error: argument {option}: {expected}, got {value!r}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.yaml").exists()


def test_the_python_api_refuses_a_shard_size_below_one(tmp_path):
    with pytest.raises(ValueError, match="samples_per_shard: expected a positive integer, got 0"):
        write_shards([Record({"txt": b"x"})], str(tmp_path / "out"), samples_per_shard=0)
    assert not (tmp_path / "out").exists()


def test_output_files_into_a_missing_folder_name_the_folder(sample_dir, tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    argv = ["config", "--input-path", str(sample_dir), "--output-path", "o", "--no-dedup", "--no-aesthetic",
            "--no-nsfw"]  # fmt: skip
    assert main([*argv, "--output-file", str(missing / "c.yaml")]) == 2
    assert _one_error(capsys) == f"--output-file: the folder {missing} does not exist (create it first)"
    assert main(["init-config", str(missing / "c.yaml")]) == 2
    assert _one_error(capsys) == f"OUT: the folder {missing} does not exist (create it first)"
    assert main(["run", _config(sample_dir, tmp_path)]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out.run"), "--output", str(missing / "r.html")]) == 2
    assert _one_error(capsys) == f"--output: the folder {missing} does not exist (create it first)"
    assert not (tmp_path / "no").exists()
    for folder in (tmp_path / "out.run", tmp_path / "out"):  # a folder is not a report's file
        before = sorted(os.listdir(folder))
        assert main(["report", str(tmp_path / "out.run"), "--output", str(folder)]) == 2
        assert _one_error(capsys) == f"{folder}: is a folder: give the report the name of a file"
        assert sorted(os.listdir(folder)) == before
    # the library's own error names the file asked for, not the temporary one it writes first
    with pytest.raises(FileNotFoundError) as err:
        report_run_dir(str(tmp_path / "out.run"), str(missing / "r.html"))
    assert str(err.value) == f"{missing / 'r.html'}: cannot write it: the folder {missing} does not exist"
    assert not (tmp_path / "no").exists()


MISTAKES = {
    "a column no step makes": (
        lambda c: c["steps"][1]["SampleFilter"].update(drop_duplicates=["exact_duplicat"]),
        "steps[1].SampleFilter: SampleFilter reads column(s) 'exact_duplicat' that the metadata does not have",
    ),
    "a report into a missing folder": (
        lambda c: c.update(reports={"scores": "/nonexistent-folder/s.png"}),
        "reports.scores.path: the folder /nonexistent-folder does not exist",
    ),
    "a run directory that is a file": (lambda c: c.update(run_dir="{tmp}/afile"), "run_dir: {tmp}/afile is a file"),
    "a filter column that is not boolean": (
        lambda c: c["export"].update(filter_column="drop_reason"),
        "export.filter_column: 'drop_reason' holds",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_estimate_and_doctor_refuse_what_run_refuses_with_its_message(sample_dir, tmp_path, capsys, mistake):
    (tmp_path / "afile").write_text("")
    config = yaml.safe_load(open(_config(sample_dir, tmp_path)))
    change, message = MISTAKES[mistake]
    change(config)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config).replace("{tmp}", str(tmp_path)))
    errors = []
    for command in (["run"], ["estimate"], ["doctor", "--config"]):
        assert main([*command, str(tmp_path / "p.yaml")]) == 2, command
        errors.append(_one_error(capsys))
    assert errors[0] == errors[1] == errors[2] and message.replace("{tmp}", str(tmp_path)) in errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_a_language_filter_takes_language_codes(sample_dir, tmp_path, capsys):
    pytest.importorskip("py3langid")
    steps = [{"CaptionFeatures": {}}, {"ClipTextFilter": {"languages": ["en", "english"]}}]
    assert main(["run", _config(sample_dir, tmp_path, steps=steps)]) == 2
    err = _one_error(capsys)
    assert err.startswith(
        f"{tmp_path / 'p.yaml'}: steps[1].ClipTextFilter: languages: 'english' is not a language "
        "code; give the ISO 639 codes that py3langid identifies, such as 'en' or 'de' (one of "
    )
    assert ", en, " in err and ", zh, " in err
    argv = ["config", "--input-path", str(sample_dir), "--output-path", "o", "--output-file", str(tmp_path / "c.yaml")]
    assert main([*argv, "--no-dedup", "--no-aesthetic", "--no-nsfw", "--languages", "en,German"]) == 2
    assert "languages: 'German' is not a language code" in _one_error(capsys)
    assert not (tmp_path / "c.yaml").exists() and not (tmp_path / "out").exists()
    from imgcurate.text import ClipTextFilter, language_codes

    assert {"en", "de", "zh"} <= language_codes() and ClipTextFilter(languages=["en", "de"]).languages == ("en", "de")


def test_a_failed_rerun_leaves_no_summary_of_the_earlier_run(sample_dir, tmp_path, capsys):
    config = _config(sample_dir, tmp_path)
    run_dir = tmp_path / "out.run"
    assert main(["run", config]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["samples_in"] == 36
    assert main(["report", str(run_dir)]) == 0
    # the input changes, and the rerun stops part way: after it wrote the new run.json
    for name in ("00003.tar", "00003.parquet", "_imgcurate_export.json"):  # the manifest would name the shard gone
        (sample_dir / name).unlink()
    steps = [{"ExactDuplicates": {}}, {"user_steps:Fails": {}}, {"SampleFilter": {}}]
    failing = _config(sample_dir, tmp_path, name="q.yaml", steps=steps)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="this step always fails"):
        main(["run", failing, "--overwrite"])
    assert not (run_dir / "summary.json").exists() and not (run_dir / "report.html").exists()
    assert main(["report", str(run_dir)]) == 2
    assert _one_error(capsys) == f"{run_dir}: no summary.json; not a finished run (rerun the pipeline to finish it)"
    assert main(["run", config, "--overwrite"]) == 0  # a rerun that finishes reports the new input
    assert json.loads((run_dir / "summary.json").read_text())["samples_in"] == 30
    hint = "(give the run directory of a run: <export path>.run by default)"
    assert main(["report", config]) == 2
    assert _one_error(capsys) == f"{config}: a file, not a folder {hint}"
    assert main(["report", str(sample_dir)]) == 2  # the shards, not the run directory
    assert _one_error(capsys) == f"{sample_dir}: no run.json, so not a run directory {hint}"


def test_a_sample_that_cannot_be_hashed_gets_its_reason_and_is_neither_copy_nor_unique(tmp_path, capsys):
    photo = encode_image(Image.new("RGB", (40, 30), (200, 30, 30)), "jpg")
    broken = b"\xff\xd8 not really a jpeg"
    records = [Record({"jpg": photo}, caption="first"), Record({"jpg": photo}, caption="copy"),
               Record({"json": b"{}"}, caption="no image"), Record({"jpg": broken}),
               Record({"jpg": broken})]  # fmt: skip
    write_shards(records, str(tmp_path / "in"), samples_per_shard=2)
    config = {
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / "out"),
        "steps": [{"ExactDuplicates": {"by": "pixels"}},
                  {"SampleFilter": {"drop_errors": True, "drop_duplicates": ["exact_duplicate"]}}],
        "export": {"filter_column": "keep"},
    }  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    summary = json.loads((tmp_path / "out.run" / "summary.json").read_text())
    assert summary["errors"]["image_sha256_error"] == 3 and summary["duplicates"] == {"exact": 1}
    assert summary["drops_by_reason"]["image_sha256_error set"] == 3 and summary["samples_kept"] == 1
    (folder,) = (tmp_path / "out.run" / "steps").glob("00-ExactDuplicates-*")
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]).to_pydict()
    assert rows["image_sha256_error"] == [
        None,
        None,
        "sample has no image member (jpg, jpeg, png, webp, bmp, tif or tiff)",
        "cannot decode image: UnidentifiedImageError: cannot identify image file (image bytes)",
        "cannot decode image: UnidentifiedImageError: cannot identify image file (image bytes)",
    ]
    assert [h is None for h in rows["image_sha256"]] == [False, False, True, True, True]
    assert rows["exact_duplicate"] == [False, True, False, False, False]


def test_a_run_that_drops_every_sample_still_writes_its_summary_and_report(sample_dir, tmp_path, capsys):
    """Nothing to export is an error (exit 2), after the summary and the report that say why were written; an
    earlier export in the output folder is left as it was."""
    config = _config(sample_dir, tmp_path, steps=[{"SampleFilter": {"min_width": 1}}])
    assert main(["run", config]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    config = _config(sample_dir, tmp_path, steps=[{"SampleFilter": {"min_width": 100000}}])
    capsys.readouterr()
    assert main(["run", config, "--overwrite"]) == 2
    assert _one_error(capsys) == (
        f"{tmp_path / 'out'}: no sample is selected for export (filter_column='keep'), so nothing was written there "
        "(what it held is left as it was); the run summary and report give the drops by reason"
    )
    summary = json.loads((tmp_path / "out.run" / "summary.json").read_text())
    assert summary["samples_kept"] == 0 and summary["drops_by_reason"]["width < 100000"] == summary["samples_in"]
    assert summary["exported"]["shards"] == 0
    assert "width &lt; 100000" in (tmp_path / "out.run" / "report.html").read_text()
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_config_flags_that_would_be_ignored_are_refused(sample_dir, tmp_path, capsys):
    base = ["config", "--input-path", str(sample_dir), "--output-path", "o", "--output-file", str(tmp_path / "c.yaml"),
            "--model", "test_resnet"]  # fmt: skip
    cases = {
        ("--no-aesthetic", "--aesthetic-threshold", "6"): "--aesthetic-threshold has no effect with --no-aesthetic",
        ("--no-nsfw", "--nsfw-threshold", "0.2"): "--nsfw-threshold has no effect with --no-nsfw",
        ("--no-dedup", "--n-clusters", "5"): "--n-clusters has no effect with --no-dedup",
        ("--clip-pretrained", "laion2b"): "--clip-pretrained has no effect with no --clip-model",
    }
    for flags, message in cases.items():
        assert main([*base, *flags]) == 2, flags
        assert _one_error(capsys) == f"{message}: leave one of them out"
    assert not (tmp_path / "c.yaml").exists()


def test_a_list_names_its_file_and_columns_and_keeps_list_cells_and_empty_paths(tmp_path, capsys):
    """``imgcurate shard`` on a parquet list: a list column goes into the json as a JSON array, a row without a path
    is an error row (not a file named 'nan'), and a column named but absent is an error naming the list."""
    import pandas as pd

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(encode_image(Image.new("RGB", (9, 7), (1, 2, 3)), "jpg"))
    listing = tmp_path / "list.parquet"
    pd.DataFrame({"url": ["imgs/a.jpg", None], "text": ["a cat", "nothing"], "tags": [["a"], ["b", "c"]]}).to_parquet(
        listing
    )
    for flags, message in (
        (["--path-col", "url", "--caption-col", "nope"], "no column 'nope' (caption_col"),
        (["--path-col", "nope"], "no column 'nope' (path_col"),
        ([], "no column of image paths"),
    ):
        assert main(["shard", str(listing), str(tmp_path / "bad"), *flags]) == 2
        assert _one_error(capsys).startswith(f"{listing}: {message}")
    assert not (tmp_path / "bad").exists()
    assert main(["shard", str(listing), str(tmp_path / "out"), "--path-col", "url"]) == 0
    df = pd.read_parquet(tmp_path / "out" / "00000.parquet")
    assert df["caption"].tolist() == ["a cat", "nothing"] and df["width"].tolist()[0] == 9
    assert df["source_path"].tolist()[0] == "imgs/a.jpg" and df["source_path"].isna().tolist()[1]
    assert df["error"].isna().tolist()[0] and df["error"].tolist()[1] == "the list gives no image path"
    assert [list(t) for t in df["tags"]] == [["a"], ["b", "c"]]


def test_files_that_are_not_images_are_counted_when_a_folder_is_sharded(tmp_path):
    from imgcurate.io.make import make_shards

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(encode_image(Image.new("RGB", (9, 7)), "jpg"))
    (tmp_path / "src" / "a.txt").write_text("a caption")
    (tmp_path / "src" / "notes.md").write_text("not an image")
    (tmp_path / "src" / "a.gif").write_bytes(b"GIF89a: beside an image, but neither it nor its caption")
    (tmp_path / "src" / "a.csv").write_text("x\n1\n")
    with pytest.warns(UserWarning, match=r"3 file\(s\) are neither images .* \(the first: 'a.csv'\)"):
        make_shards(str(tmp_path / "src"), str(tmp_path / "out"))


def test_estimate_of_an_input_folder_names_what_is_wrong_with_it(sample_dir, tmp_path, capsys):
    """``estimate --input-path`` opens the folder as a dataset does: a bad parquet is named, and a location that
    cannot be opened says which and why."""
    (sample_dir / "00001.parquet").write_bytes(b"not a parquet")
    assert main(["estimate", "--input-path", str(sample_dir)]) == 2
    assert _one_error(capsys).startswith(f"{sample_dir / '00001.parquet'}: cannot read parquet (")
    assert main(["estimate", "--input-path", str(sample_dir / "00000.tar")]) == 2
    assert _one_error(capsys) == f"{sample_dir / '00000.tar'}: a file, not a folder of .tar shards"
    assert main(["estimate", "--input-path", "memory://imgcurate-nothing-here"]) == 2
    assert _one_error(capsys) == "memory://imgcurate-nothing-here: no such folder"
    assert main(["estimate", "--input-path", "nosuchprotocol://bucket/shards"]) == 2
    assert _one_error(capsys).startswith("nosuchprotocol://bucket/shards: cannot open this location (ValueError: ")
    with pytest.raises(ValueError, match=r"^nosuchprotocol://bucket/shards: cannot open this location"):
        ImageTextPairDataset.from_webdataset("nosuchprotocol://bucket/shards")
    assert main(["estimate", "--input-path", str(sample_dir), "--measure"]) == 2  # nothing to time without a config
    assert _one_error(capsys) == "estimate: --measure times a pipeline's steps: give its config too (--config FILE)"


def test_a_run_directory_that_cannot_be_written_is_one_line(sample_dir, tmp_path, capsys, monkeypatch):
    """A read-only filesystem (or no permission) where the run directory goes: one line naming it, exit 2."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    makedirs = LocalFileSystem.makedirs

    def read_only(self, path, exist_ok=False):
        if "ro.run" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return makedirs(self, path, exist_ok=exist_ok)

    monkeypatch.setattr(LocalFileSystem, "makedirs", read_only)
    config = _config(sample_dir, tmp_path)
    assert main(["run", config, "--run-dir", str(tmp_path / "ro.run")]) == 2
    assert _one_error(capsys) == (f"run_dir: {tmp_path / 'ro.run'} cannot be written (Read-only file system): give a "
                                  "run directory this process can write")  # fmt: skip


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (".user_steps:CaptionLength", "step '.user_steps:CaptionLength': cannot import it (TypeError"),
        (":CaptionLength", "step ':CaptionLength': cannot import it (ValueError: Empty module name)"),
        ("user_steps:BrokenBuild", "steps[0].user_steps:BrokenBuild: could not be built (RuntimeError: the service"),
        ("SampleFiltr", "unknown step 'SampleFiltr' (did you mean 'SampleFilter'?)"),
    ],
)
def test_steps_that_cannot_be_loaded_or_built_are_one_line(sample_dir, tmp_path, capsys, step, message):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"input": str(sample_dir), "steps": [{step: {}}]}))
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("WrongLength", r"0000\d\.tar: WrongLength\.process returned \d+ values of 'short' for the shard's \d+ rows"),
        ("WrongType", r"0000\d\.tar: WrongType\.process returned values of the wrong type for its declared columns"),
    ],
)
def test_a_users_step_that_returns_the_wrong_values_names_itself_and_the_shard(sample_dir, tmp_path, capsys, step,
                                                                               message):  # fmt: skip
    config = {"input": str(sample_dir), "steps": [{f"user_steps:{step}": {}}], "run_dir": str(tmp_path / "run")}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_mistakes_of_place_and_setting_are_one_line(sample_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty.csv").write_text("")
    not_a_file = "folder: is a folder: give the config the name of a file"
    config = ["config", "--input-path", str(sample_dir), "--output-path", str(tmp_path / "out"), "--output-file"]
    cases = [
        (["init-config", str(tmp_path / "folder"), "--force"], not_a_file),
        ([*config, str(tmp_path / "folder"), "--force"], not_a_file),
        (["sample", str(tmp_path / "a-file")], f"a-file: cannot be made a folder: {tmp_path / 'a-file'} is a file"),
        (["shard", str(tmp_path / "empty.csv"), str(tmp_path / "out")], "empty.csv: not a readable list of images"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setenv("DASK_IMGCURATE__GRAPH_GC_THRESHOLD", "abc")
    import dask

    dask.config.refresh()
    try:
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"input": str(sample_dir), "steps": [],
                                                         "cluster": {"n_workers": 1}}))  # fmt: skip
        assert main(["run", str(tmp_path / "p.yaml")]) == 2
        assert "DASK_IMGCURATE__GRAPH_GC_THRESHOLD): expected an integer, got 'abc'" in capsys.readouterr().err
    finally:
        monkeypatch.delenv("DASK_IMGCURATE__GRAPH_GC_THRESHOLD")
        dask.config.refresh()


def test_ctrl_c_is_exit_130_without_a_traceback(monkeypatch, capsys):
    import imgcurate.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(imgcurate.cli, "_cmd_stages", interrupted)
    assert main(["stages"]) == 130
    assert capsys.readouterr().err == "imgcurate: interrupted\n"


def test_a_cluster_that_killed_its_workers_or_went_away_is_one_line(sample_dir, tmp_path, capsys, monkeypatch):
    """distributed's KilledWorker (a worker that dies on the same task again and again: over its memory limit) and a
    scheduler gone (its futures cancelled) are the cluster's answer: one line with what to check, exit 2."""
    import dask
    from distributed.client import FutureCancelledError

    from imgcurate.pipeline import Pipeline

    # a real one: the step ends its worker process on every try, the nanny restarts it, the scheduler gives up
    config = _config(sample_dir, tmp_path, steps=[{"user_steps:KillsItsWorker": {}}], export=None, output=None,
                     run_dir=str(tmp_path / "r.run"), cluster={"n_workers": 1, "threads_per_worker": 1})  # fmt: skip
    capsys.readouterr()
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        assert main(["run", config]) == 2
    line = _one_error(capsys)
    assert line.startswith("the cluster: KilledWorker: ") and "cluster.memory_limit" in line
    assert line.endswith("run again to go on: what finished is kept")

    # a scheduler that went away cancels the run's futures
    def fail(self, *args, **kwargs):
        raise FutureCancelledError("('embed', 3)", "unknown")

    monkeypatch.setattr(Pipeline, "run", fail)
    assert main(["run", config]) == 2
    assert _one_error(capsys).startswith("the cluster: FutureCancelledError: ")
