"""The run report: one self-contained HTML page per pipeline run, written into the run directory at the end of
``imgcurate run`` and again on demand with ``imgcurate report RUN_DIR``.

It shows the counts in and out, the time per step (shards computed and reused), the drops by reason with thumbnails
of a few dropped samples per reason, the score histograms with the filters' thresholds marked, the errors with
examples, and for every dedup step its largest duplicate groups and its closest unflagged pairs.

Everything on the page is gathered with Dask reductions over the results (counts, histograms, the first few rows per
reason, the largest groups) and with one thumbnail task per shard that holds a shown sample: the table itself is
never brought to the client, so the report of a 10^9-sample run costs what the report of the sample costs, plus the
passes over the columns it reads.
"""

from __future__ import annotations

import datetime
import html
import math
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from imgcurate import progress
from imgcurate.backends import to_pandas
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.errors import ConfigError
from imgcurate.io.schema import is_error_column
from imgcurate.reports._html import card, png, table, thumbnails, write_page
from imgcurate.reports.duplicates import collect_duplicates, dedup_column_sets, render_duplicates
from imgcurate.reports.scores import collect_scores, draw_scores

__all__ = ["run_report", "report_run_dir", "REPORT_NAME"]

#: The report's file name inside the run directory.
REPORT_NAME = "report.html"

#: Numeric columns that the duplicates section shows already.
_SHOWN_ELSEWHERE = {"max_similarity"}


def _is_number(column: Any, scores_only: bool) -> bool:
    """A numeric column; with ``scores_only`` a floating one (scores, not ids such as ``cluster``)."""
    dtype = column.dtype
    if scores_only:
        return pd.api.types.is_float_dtype(dtype)
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _first_per_group(part: pd.DataFrame, k: int) -> pd.DataFrame:
    return part.groupby("_group", sort=False).head(k)


def _examples(part: Any, shard: Any, id_col: str, caption: str | None, groups: Sequence[tuple[str, str]],
              k: int) -> pd.DataFrame:  # fmt: skip
    """Up to ``k`` rows of this shard per group: for a reason column every reason it holds (split on ``;``), for an
    error column the column's name; with the text, the key, the caption and the row's position."""
    frame = to_pandas(part)
    pieces = []
    for column, kind in groups:
        values = frame[column]
        mask = values.notna().to_numpy()
        if not mask.any():
            continue
        rows = np.flatnonzero(mask)
        text = values.iloc[rows].astype(str).to_numpy()
        if kind == "reason":
            split = [t.split(";") for t in text]
            rows = np.repeat(rows, [len(s) for s in split])
            group = np.concatenate(split) if split else np.array([], dtype=object)
            text = group
        else:
            group = np.full(len(rows), column, dtype=object)
        piece = pd.DataFrame({
            "_group": group, "_kind": kind, "_text": text, id_col: frame[id_col].iloc[rows].to_numpy(),
            "_caption": frame[caption].iloc[rows].to_numpy() if caption else None,
            "_shard": shard.index, "_row": rows,
        })  # fmt: skip
        pieces.append(_first_per_group(piece, k))
    if not pieces:
        return _examples_meta(id_col)
    return pd.concat(pieces, ignore_index=True).astype(_examples_meta(id_col).dtypes.to_dict())


def _examples_meta(id_col: str) -> pd.DataFrame:
    return pd.DataFrame({
        "_group": pd.Series([], dtype=object), "_kind": pd.Series([], dtype=object),
        "_text": pd.Series([], dtype=object), id_col: pd.Series([], dtype=object),
        "_caption": pd.Series([], dtype=object), "_shard": pd.Series([], dtype="int64"),
        "_row": pd.Series([], dtype="int64"),
    })  # fmt: skip


def collect_examples(dataset: ImageTextPairDataset, groups: Sequence[tuple[str, str]], k: int,
                     caption_column: str = "caption") -> pd.DataFrame:  # fmt: skip
    """The first ``k`` samples (in shard order) of every drop reason and every error column, gathered with a Dask
    tree reduction: each level keeps at most ``k`` rows per group, so the client receives at most ``k`` per group."""
    df = dataset.metadata
    caption = caption_column if caption_column in df.columns else None
    wanted = list(dict.fromkeys([dataset.id_col, *(c for c, _ in groups), *([caption] if caption else [])]))
    meta = _examples_meta(dataset.id_col)
    per_shard = dataset.map_shards(_examples, dataset.id_col, caption, list(groups), k, meta=meta, frame=df[wanted])
    picked = per_shard.reduction(_first_per_group, aggregate=_first_per_group, combine=_first_per_group, meta=meta,
                                 split_every=16, chunk_kwargs={"k": k}, aggregate_kwargs={"k": k},
                                 combine_kwargs={"k": k})  # fmt: skip
    (rows,) = progress.compute([picked], desc="run report: examples")
    return to_pandas(rows).sort_values(["_shard", "_row"], kind="stable")


def _figure_scores(histograms: list, thresholds: Mapping[str, Sequence[tuple[str, float]]]) -> str:
    from matplotlib.figure import Figure

    columns = 3 if len(histograms) > 2 else len(histograms)
    rows = math.ceil(len(histograms) / columns)
    fig = Figure(figsize=(4.6 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    draw_scores(histograms, thresholds, axes)
    for ax in axes[len(histograms) :]:
        ax.set_visible(False)
    return png(fig)


def _merge_thresholds(steps: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[str, float]]]:
    found: dict[str, list[tuple[str, float]]] = {}
    for step in steps:
        for column, marks in (step.get("thresholds") or {}).items():
            found.setdefault(column, []).extend((str(label), float(value)) for label, value in marks)
    return found


def run_report(
    dataset: ImageTextPairDataset,
    path: str,
    summary: Mapping[str, Any],
    *,
    samples_per_reason: int = 6,
    max_groups: int = 12,
    max_per_group: int = 6,
    borderline: int = 8,
    thumb_size: int = 128,
    caption_column: str = "caption",
    title: str | None = None,
    storage_options: dict | None = None,
) -> str:
    """Writes the run report (see the module docs) for a dataset that holds the steps' columns.

    Args:
        dataset: the input with every step's columns (what :meth:`Pipeline.compute_steps` returns).
        path: the HTML file to write (atomically; any fsspec URL).
        summary: the run summary (``summary.json``): counts, drops, per step the time, shards, added columns and
            thresholds, and the export.
        samples_per_reason: thumbnails of dropped samples shown per reason (and error examples per column).
        max_groups: duplicate groups shown per dedup step, largest first.
        max_per_group: duplicates shown per group.
        borderline: closest unflagged pairs shown per similarity-based dedup step.
        thumb_size: the longer side of each thumbnail, in pixels.
        caption_column: shown under each thumbnail when present.
        title: the page's heading (default: the input's path).
        storage_options: fsspec's options for ``path``; None uses the dataset's (the run directory of an export to
            another store has the export's).

    Returns:
        ``path``.
    """
    df = dataset.metadata
    present = list(map(str, df.columns))
    steps = list(summary.get("steps") or [])
    esc = html.escape
    body = [f"<h1>imgcurate run report: {esc(title or str(dataset.path))}</h1>",
            f"<p>Written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}.</p>"]  # fmt: skip

    # ---- counts in and out
    samples_in = int(summary.get("samples_in", 0))
    rows = [["samples in", samples_in]]
    if "samples_kept" in summary:
        kept = int(summary["samples_kept"])
        rows += [["samples kept", kept], ["samples dropped", samples_in - kept]]
    for kind, count in (summary.get("duplicates") or {}).items():
        rows.append([f"{kind} duplicates", count])
    for column, count in (summary.get("errors") or {}).items():
        rows.append([f"rows with {column}", count])
    exported = summary.get("exported")
    if exported:
        note = f"; {exported['error']}" if exported.get("error") else ""
        rows.append(["exported shards", f"{exported.get('shards')} ({exported.get('path')}{note})"])
    body += ['<h2 id="counts">Counts</h2>', table(["", "value"], rows)]

    # ---- time per step
    step_rows = [[s.get("step"), s.get("shards_computed"), s.get("shards_reused"), f"{float(s.get('seconds', 0)):.1f}"]
                 for s in steps]  # fmt: skip
    if exported and "seconds" in exported:
        step_rows.append(["export", "", "", f"{float(exported['seconds']):.1f}"])
    if "seconds" in summary:
        step_rows.append(["whole run", "", "", f"{float(summary['seconds']):.1f}"])
    body += ['<h2 id="steps">Time per step</h2>',
             table(["step", "shards computed", "shards reused", "seconds"], step_rows)]  # fmt: skip

    # ---- drops by reason and errors, with examples
    # the filter's reason column as the summary names it (a summary written before it was named: the default)
    reason_column = summary.get("drop_reason_column", "drop_reason" if "drops_by_reason" in summary else None)
    reason_column = reason_column if reason_column in present else None
    errors = [c for c in present if is_error_column(c, dataset.metadata._meta[c].dtype)]
    groups = ([(reason_column, "reason")] if reason_column else []) + [(c, "error") for c in errors]
    examples = collect_examples(dataset, groups, samples_per_reason, caption_column) if groups else None
    thumbs = {}
    if examples is not None and len(examples):
        shown = examples[examples["_kind"] == "reason"]
        thumbs = thumbnails(dataset, shown, dataset.id_col, thumb_size, "run report: thumbnails")
    drops = summary.get("drops_by_reason") or {}
    body.append('<h2 id="drops">Drops by reason</h2>')
    if reason_column is None:
        body.append("<p>No filter step ran.</p>")
    elif not drops:
        body.append("<p>No sample was dropped.</p>")
    else:
        body.append("<p>A sample dropped for several reasons is counted, and may be shown, under each.</p>")
        ordered = sorted(drops.items(), key=lambda i: -i[1])
        shares = [[r, n, f"{n / max(samples_in, 1):.1%}"] for r, n in ordered]
        body.append(table(["reason", "samples", "share of the input"], shares))
        for reason, count in ordered:
            mine = examples[(examples["_kind"] == "reason") & (examples["_group"] == reason)]
            cards = [card(r[dataset.id_col], thumbs, "", r["_caption"]) for _, r in mine.iterrows()]
            body.append(f'<div class="reason"><h3>{esc(reason)}: {count}</h3><div class="row">{"".join(cards)}</div>'
                        "</div>")  # fmt: skip
    if errors:
        body.append('<h2 id="errors">Errors</h2>')
        for column in errors:
            mine = examples[(examples["_kind"] == "error") & (examples["_group"] == column)]
            count = (summary.get("errors") or {}).get(column, len(mine))
            body.append(f"<h3>{esc(column)}: {count or 'none'}</h3>")
            if len(mine):
                body.append(table([dataset.id_col, "message"], [[r[dataset.id_col], r["_text"]]
                                                                 for _, r in mine.iterrows()]))  # fmt: skip

    # ---- score histograms
    thresholds = _merge_thresholds(steps)
    added = [c for s in steps for c in s.get("columns", [])] + list(thresholds)  # scores, and what filters cut on
    numeric = [c for c in dict.fromkeys(added) if c in present and c not in _SHOWN_ELSEWHERE
               and _is_number(df._meta[c], scores_only=c not in thresholds)]  # fmt: skip
    body.append('<h2 id="scores">Scores</h2>')
    if numeric:
        keep = summary.get("keep_column") if summary.get("keep_column") in present else None
        histograms = collect_scores(dataset, numeric, keep)
        marked = ", ".join(f"{c} {label} {v:g}" for c, ms in thresholds.items() if c in numeric for label, v in ms)
        body.append(_figure_scores(histograms, thresholds))
        body.append(f"<p>Dashed lines: the filters' thresholds ({esc(marked) or 'none on these columns'}). "
                    + ("Kept and dropped samples are stacked.</p>" if keep else "</p>"))  # fmt: skip
    else:
        body.append("<p>No step added a numeric score.</p>")

    # ---- duplicates
    # the dedup steps' columns as the summary names them (a summary written before it named them: the default names)
    named = summary.get("duplicate_columns")
    sets = dedup_column_sets(present) if named is None else [tuple(c) for c in named if c[0] in present]
    body.append('<h2 id="duplicates">Duplicates</h2>')
    if not sets:
        body.append("<p>No dedup step ran.</p>")
    for columns in sets:
        facts = collect_duplicates(
            dataset, columns, max_groups=max_groups, max_per_group=max_per_group, borderline=borderline,
            thumb_size=thumb_size, caption_column=caption_column,
        )  # fmt: skip
        marks = thresholds.get(columns[2], []) if columns[2] else []
        body.append(f'<div class="dedup">{"".join(render_duplicates(facts, heading="h3", marks=marks))}</div>')
    so = dataset.storage_options if storage_options is None else storage_options
    return write_page(path, "imgcurate run report", body, thumb_size, so)


def report_run_dir(
    run_dir: str, path: str | None = None, *, storage_options: dict | None = None, backend: str | None = None,
    input_storage_options: dict | None = None,
    **kwargs: Any,
) -> str:  # fmt: skip
    """Writes the run report of a finished run from its run directory alone: the input named in ``run.json``, the
    steps' columns read back shard by shard, and ``summary.json``.

    Args:
        run_dir: the run directory.
        path: the HTML file to write; default ``report.html`` inside the run directory.
        storage_options: fsspec options for the run directory and the report (and the input, unless
            ``input_storage_options``).
        input_storage_options: fsspec options for the input, where they differ (an export to another store).
        backend: the dataframe backend (default: the configured one).
        **kwargs: passed to :func:`run_report`.

    Raises:
        ConfigError: the folder is not a finished run, or its input changed since the run.
    """
    import pyarrow.parquet as pq

    from imgcurate.backends import backend_of, empty_frame
    from imgcurate.rundir import ROW_ID, RunDir, fingerprint_chain, input_fingerprint

    so = dict(storage_options or {})
    run = RunDir(run_dir, so, create=False)
    hint = "give the run directory of a run: <export path>.run by default"
    if not run.fs.isdir(run.root):
        what = "a file, not a folder" if run.fs.isfile(run.root) else "no such folder"
        raise ConfigError(f"{run_dir}: {what} ({hint})")
    if not run.exists("run.json"):
        raise ConfigError(f"{run_dir}: no run.json, so not a run directory ({hint})")
    if not run.exists("summary.json"):
        raise ConfigError(f"{run_dir}: no summary.json; not a finished run (rerun the pipeline to finish it)")
    info, summary = run.read_json("run.json"), run.read_json("summary.json")
    source = info.get("input_url") or info.get("input") if isinstance(info, dict) else None
    steps = summary.get("steps", []) if isinstance(summary, dict) else None
    if not isinstance(source, str) or not (
        isinstance(steps, list) and all(isinstance(s, dict) and isinstance(s.get("folder"), str) for s in steps)
    ):
        raise ConfigError(f"{run_dir}: its run.json or summary.json is not what this version of imgcurate writes (no "
                          "input, or steps without their folders); rerun the pipeline to report on it")  # fmt: skip
    id_col = info.get("id_col", "key")
    source_so = so if input_storage_options is None else dict(input_storage_options)
    if fingerprint_chain([input_fingerprint(source, source_so), id_col]) != info.get("fingerprint"):
        raise ConfigError(f"{run_dir}: the input {source} changed since this run; rerun the pipeline to report on it")
    dataset = ImageTextPairDataset.from_webdataset(source, id_col, backend=backend, storage_options=source_so)
    for step in steps:
        folder = step["folder"]
        first = run.url("steps", folder, f"{0:06d}.parquet")
        with run.fs.open(first, "rb") as f:
            schema = pq.read_schema(f)
        types = {n: schema.field(n).type for n in schema.names if n not in (ROW_ID, id_col)}
        meta = empty_frame(types, backend_of(dataset.metadata._meta).name)
        dataset = dataset.with_columns(run.read_step(folder, dataset, meta, types), types)
    out = path or posixpath.join(run_dir.rstrip("/"), REPORT_NAME)
    return run_report(dataset, out, summary, title=str(info.get("input") or source), storage_options=so, **kwargs)
