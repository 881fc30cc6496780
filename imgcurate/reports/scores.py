"""Score histograms with the filter thresholds drawn, computed with Dask reductions (nothing gathered)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from imgcurate import progress
from imgcurate.backends import to_pandas
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.io._fs import atomic_open
from imgcurate.reports._html import check_replaceable

__all__ = ["ScoreHistogram", "collect_scores", "draw_scores", "score_histograms", "drop_counts"]


@dataclass
class ScoreHistogram:
    """One column's histogram of its finite values: bin edges, counts of kept and of dropped samples (all in ``kept``
    without a keep column), how many values are null (or NaN), and how many are infinite (``non_finite``), which
    no bin holds."""

    column: str
    edges: np.ndarray
    kept: np.ndarray
    dropped: np.ndarray
    nulls: int
    non_finite: int = 0

    @property
    def count(self) -> int:
        return int(self.kept.sum() + self.dropped.sum())


def _counts(part: Any, columns: list[str], edges: list[np.ndarray], keep_column: str | None) -> pd.DataFrame:
    """One partition's counts as one row: for each column, kept samples' bins then dropped samples' bins."""
    frame = to_pandas(part)
    keep = frame[keep_column].fillna(False).astype(bool).to_numpy() if keep_column else np.ones(len(frame), dtype=bool)
    out = []
    for column, bins in zip(columns, edges, strict=True):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        for mask in (keep, ~keep):
            chosen = values[mask]
            out.append(np.histogram(chosen[np.isfinite(chosen)], bins)[0])
    return _row(np.concatenate(out).astype(np.int64))


def _row(values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(values[None, :], columns=[f"c{i}" for i in range(len(values))])


def collect_scores(
    dataset: ImageTextPairDataset, columns: Sequence[str], keep_column: str | None = None, bins: int = 40
) -> list[ScoreHistogram]:
    """Histograms of ``columns`` in two Dask passes (the range of the finite values, then per-partition counts
    summed). Infinite values are counted apart (``non_finite``), as nulls and NaN are (``nulls``).

    Args:
        dataset: the dataset.
        columns: numeric columns; those absent from the metadata are left out.
        keep_column: a boolean column; when given, kept and dropped samples are counted apart.
        bins: bins per histogram.
    """
    df = dataset.metadata
    present = [c for c in columns if c in df.columns]
    if keep_column is not None and keep_column not in df.columns:
        keep_column = None
    if not present:
        return []
    numbers = {c: df[c].astype("float64") for c in present}
    stats = []
    for v in numbers.values():
        finite, infinite = v.where(v.abs() < np.inf), v.abs() == np.inf
        stats += [finite.min(), finite.max(), v.isna().sum(), infinite.sum()]
    flat = progress.compute(stats, desc="score histograms: ranges")
    ranges = [flat[i : i + 4] for i in range(0, len(flat), 4)]
    edges = []
    for lo, hi, _, _ in ranges:
        lo = float(lo) if pd.notna(lo) else 0.0
        hi = float(hi) if pd.notna(hi) else 1.0
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges.append(np.linspace(lo, hi, bins + 1))
    wanted = present + ([keep_column] if keep_column else [])
    meta = _row(np.zeros(len(present) * 2 * bins, dtype=np.int64)).iloc[:0]
    counts = df[wanted].map_partitions(_counts, present, edges, keep_column, meta=meta, enforce_metadata=False)
    (total,) = progress.compute([counts.sum()], desc="score histograms: counts")
    total = to_pandas(total).to_numpy(dtype=np.int64).reshape(len(present), 2, bins)
    return [
        ScoreHistogram(c, e, total[i, 0], total[i, 1], int(r[2]), int(r[3]))
        for i, (c, e, r) in enumerate(zip(present, edges, ranges, strict=True))
    ]


def _plain(text: str) -> str:
    """Text that matplotlib draws as it is: a ``$`` would start its math mode ("between $5 and $10")."""
    return text.replace("$", r"\$")


def draw_scores(histograms: Sequence[ScoreHistogram], thresholds: Mapping[str, Sequence[tuple[str, float]]],
                axes: Sequence[Any]) -> None:  # fmt: skip
    """Draws each histogram on its axes, kept and dropped stacked, with its thresholds as dashed lines."""
    for ax, h in zip(axes, histograms, strict=False):
        left = h.edges[:-1]
        stacked = h.dropped.sum() > 0
        ax.hist(
            [left, left] if stacked else left, bins=h.edges, weights=[h.kept, h.dropped] if stacked else h.kept,
            stacked=stacked, color=["#4c72b0", "#c44e52"] if stacked else "#4c72b0",
            label=["kept", "dropped"] if stacked else None,
        )  # fmt: skip
        infinite = f", non-finite={h.non_finite}" if h.non_finite else ""
        ax.set_title(_plain(f"{h.column} (n={h.count}, null={h.nulls}{infinite})"))
        for label, value in thresholds.get(h.column, ()):
            ax.axvline(value, color="#222222", linestyle="--", label=_plain(f"{label} {value:g}"))
        if stacked or thresholds.get(h.column):
            ax.legend(fontsize=8, loc="upper right")


def drop_counts(dataset: ImageTextPairDataset, reason_column: str = "drop_reason") -> tuple[pd.Series, int, int]:
    """Drops per reason (a sample dropped for two reasons counts under both), samples dropped, samples in all."""
    column = dataset.metadata[reason_column]
    reasons, dropped, total = progress.compute(
        [column.dropna().str.split(";").explode().value_counts(), column.notnull().sum(), column.size],
        desc="drops by reason",
    )
    return to_pandas(reasons).astype("int64").sort_values(ascending=False, kind="stable"), int(dropped), int(total)


def score_histograms(
    dataset: ImageTextPairDataset,
    path: str,
    columns: Sequence[str] = ("aesthetic_score", "nsfw_score"),
    thresholds: dict[str, float] | None = None,
    reason_column: str = "drop_reason",
) -> str:
    """Writes a PNG: one histogram per score column (with its threshold drawn), plus drops by reason if filtered.

    The counts are Dask reductions: the metadata is never gathered on the client.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    df = dataset.metadata
    present = [c for c in columns if c in df.columns]
    has_reasons = reason_column in df.columns
    if not present and not has_reasons:
        raise ValueError(f"none of the columns {', '.join(columns)} (nor {reason_column!r}) is in the metadata")
    histograms = collect_scores(dataset, present)
    panels = len(present) + int(has_reasons)
    fig = Figure(figsize=(5 * panels, 3.6))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    draw_scores(histograms, {c: [("threshold", v)] for c, v in (thresholds or {}).items()}, axes)
    if has_reasons:
        reasons, dropped, total = drop_counts(dataset, reason_column)
        ax = axes[len(present)]
        ax.barh([_plain(r) for r in reasons.index.astype(str)], reasons.to_numpy(), color="#dd8452")
        ax.set_title(f"dropped {dropped} of {total}, by reason")
    fig.tight_layout()
    check_replaceable(path, dataset.storage_options, b"\x89PNG", "a PNG image")
    with atomic_open(path, "wb", dataset.storage_options) as f:
        fig.savefig(f, format="png", dpi=90)
    return path
