"""The quickstart notebook runs from top to bottom (offline: a tiny random-weight model stands in for CLIP)."""

from __future__ import annotations

import json
import os
import pathlib

import pandas as pd

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_exports(tmp_path, monkeypatch):
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGCURATE_NOTEBOOK_MODEL", "test_resnet")
    monkeypatch.setenv("IMGCURATE_NOTEBOOK_PRETRAINED", "0")
    namespace: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name} cell {i}", "exec"), namespace)
    out = namespace["out"].metadata.compute()
    flagged = namespace["ds"].metadata.compute()
    assert len(out) == int(flagged["keep"].sum()) > 0
    assert not flagged.loc[flagged["keep"], "exact_duplicate"].any()
    assert os.path.getsize("sample_data/duplicates.html") > 10_000
    assert isinstance(namespace["drop_report"](namespace["ds"]), pd.Series)


def _run(name, tmp_path, monkeypatch, **env):
    path = NOTEBOOK.parent / name
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    for key, value in {"IMGCURATE_NOTEBOOK_MODEL": "test_resnet", "IMGCURATE_NOTEBOOK_PRETRAINED": "0", **env}.items():
        monkeypatch.setenv(key, value)
    namespace: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{name} cell {i}", "exec"), namespace)
    return namespace


def test_semantic_dedup_notebook_compares_thresholds_then_exports(tmp_path, monkeypatch):
    ns = _run("02_semantic_dedup.ipynb", tmp_path, monkeypatch, IMGCURATE_NOTEBOOK_EPS="0.0001,0.001,0.05")
    flagged = ns["flagged"]
    assert flagged[0.0001] <= flagged[0.001] <= flagged[0.05]  # a looser threshold never flags fewer
    for page in ns["pages"].values():
        assert os.path.getsize(page) > 5_000
    out = ns["out"].metadata.compute()
    assert len(out) == 36 - flagged[0.0001] and not out["source"].duplicated().any()


def test_distributed_notebook_runs_the_pipeline_on_a_local_cluster(tmp_path, monkeypatch):
    ns = _run("03_distributed.ipynb", tmp_path, monkeypatch, IMGCURATE_NOTEBOOK_PROCESSES="0")
    summary = ns["summary"]
    assert summary["samples_in"] == 36 and summary["duplicates"]["semantic"] > 0
    assert [s["shards_computed"] for s in summary["steps"]] == [4, 4, 4, 4]
    assert not ns["out"].metadata.compute()["source"].duplicated().any()
