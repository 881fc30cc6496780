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
    monkeypatch.setenv("IMGCURATE_QUICKSTART_MODEL", "test_resnet")
    monkeypatch.setenv("IMGCURATE_QUICKSTART_PRETRAINED", "0")
    namespace: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name} cell {i}", "exec"), namespace)
    out = namespace["out"].metadata.compute()
    flagged = namespace["ds"].metadata.compute()
    assert len(out) == int(flagged["keep"].sum()) > 0
    assert not flagged.loc[flagged["keep"], "exact_duplicate"].any()
    assert os.path.getsize("sample_data/duplicates.html") > 10_000
    assert isinstance(namespace["drop_report"](namespace["ds"]), pd.Series)
