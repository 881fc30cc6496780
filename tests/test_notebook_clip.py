"""The CLIP-score notebook runs from top to bottom, offline, on a tiny random-weight open_clip model."""

from __future__ import annotations

import json
import pathlib

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "04_clip_score.ipynb"


def test_clip_score_notebook_runs(tmp_path, monkeypatch):
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMGCURATE_CLIP_MODEL", raising=False)
    namespace: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name} cell {i}", "exec"), namespace)
    df, best, worst = namespace["df"], namespace["best"], namespace["worst"]
    assert best["clip_score"].min() >= worst["clip_score"].max()
    assert df.loc[df["keep"], "clip_score"].min() >= namespace["flt"].threshold
    assert 0 < df["keep"].sum() <= 0.3 * len(df) + 1
