"""Every code block in README.md runs here, as written, so that the README cannot rot.

The first two commands (set up and run the main job on the sample; set up and run the tests) are not blocks of this
kind: `tests/test_cli.py` runs the sample pipeline the first one runs, and `.ci/run` is the second.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from imgcurate.cli import main
from imgcurate.testing import make_sample_shards

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    """The fenced blocks of README.md whose info string is ``language`` ("" for none), in order."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(), re.S | re.M)
            if m.group(1) == language]  # fmt: skip


def _commands(block: str) -> list[list[str]]:
    """The command lines of a shell block, comments dropped."""
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [shlex.split(line) for line in lines if line]


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(_blocks("python")) == 3
    assert len(_blocks("")) == 1
    assert {b for b in re.findall(r"^```(\w*)$", README.read_text(), re.M)} <= {"python", ""}  # no other kind


def test_the_python_blocks_run_in_order_on_the_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_sample_shards("sample_data/shards")
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README's examples
    printed = capsys.readouterr().out
    kept, total = map(int, re.search(r"(\d+) kept of (\d+)", printed).groups())
    assert total == 36 and 0 < kept < total
    # the same job as examples/sample_pipeline.yaml: one sample per photo with a copy 256 pixels wide, its widest
    src, out = namespace["ds"].metadata.compute(), namespace["out"].metadata.compute()
    assert not out["source"].duplicated().any() and len(out) == kept
    assert set(out["source"]) == set(src.loc[(src["width"] >= 256) & src["error"].isna(), "source"])
    assert out["width"].tolist() == [src.loc[src["source"] == s, "width"].max() for s in out["source"]]
    assert (tmp_path / "sample_data" / "curated_py").is_dir() and (tmp_path / "sample_data" / "big").is_dir()
    # the step class of "Writing a step" works on a dataset
    from imgcurate import ImageTextPairDataset

    ds = ImageTextPairDataset.from_webdataset("sample_data/shards")
    df = namespace["CaptionLength"]()(ds).metadata.compute()
    assert (df.caption_chars == df.caption.str.len()).all()


def test_the_cli_workflow_block_runs_as_written(tmp_path, monkeypatch, capsys):
    from imgcurate.cli import DEFAULT_MODEL
    from imgcurate.embedders.timm import pretrained_weights_cached

    if pretrained_weights_cached(DEFAULT_MODEL):
        pytest.skip("this machine's cache holds the production model's weights: the run would embed for real")
    monkeypatch.chdir(tmp_path)
    make_sample_shards("shards")
    commands = _commands(_blocks("")[0])
    assert [c[1] for c in commands] == ["stages", "estimate", "config", "estimate", "run", "report"]
    assert {c[0] for c in commands} == {"imgcurate"}
    for command in commands[:4]:
        assert main(command[1:]) == 0, command
    assert (tmp_path / "curate.yaml").exists()
    capsys.readouterr()
    # the production config needs CLIP ViT-L/14's weights, which the test machine's cache does not hold: the run
    # stops before any work with how to get them, as the block's comment says; the report then has no run to show
    assert main(commands[4][1:]) == 2
    err = capsys.readouterr().err
    assert "are not available offline" in err and "checkpoint_path=" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "curated.run").exists() and not (tmp_path / "curated").exists()
    assert main(commands[5][1:]) == 2
    assert "curated.run: no such folder" in capsys.readouterr().err  # the run stopped before it made one


@pytest.mark.parametrize("line", [0, 1])
def test_the_first_two_commands_are_the_ones_the_tests_cover(line):
    text = README.read_text()
    first = [s.strip() for s in re.findall(r"^    (\S.*)$", text, re.M)][line]
    if line == 0:
        assert first.endswith("imgcurate sample sample_data/shards --overwrite && imgcurate run "
                              "examples/sample_pipeline.yaml --overwrite")  # fmt: skip
    else:
        assert first == "bash .ci/run"
