"""Pictures of results: score histograms with the filter thresholds, and drop counts by reason."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgcurate.dataset import ImageTextPairDataset
from imgcurate.io.shards import atomic_open

__all__ = ["score_histograms"]


def score_histograms(
    dataset: ImageTextPairDataset,
    path: str,
    columns: Sequence[str] = ("aesthetic_score", "nsfw_score"),
    thresholds: dict[str, float] | None = None,
    reason_column: str = "drop_reason",
) -> str:
    """Writes a PNG: one histogram per score column (with its threshold drawn), plus drops by reason if filtered.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = dataset.metadata
    present = [c for c in columns if c in df.columns]
    has_reasons = reason_column in df.columns
    if not present and not has_reasons:
        raise ValueError(f"none of the columns {', '.join(columns)} (nor {reason_column!r}) is in the metadata")
    wanted = present + ([reason_column] if has_reasons else [])
    frame = df[wanted].compute()
    frame = frame.to_pandas() if hasattr(frame, "to_pandas") else frame
    panels = len(present) + int(has_reasons)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    for ax, column in zip(axes[0], present, strict=False):
        values = frame[column].dropna().to_numpy(dtype=np.float64)
        ax.hist(values, bins=40, color="#4c72b0")
        ax.set_title(f"{column} (n={len(values)}, null={frame[column].isna().sum()})")
        if thresholds and column in thresholds:
            ax.axvline(thresholds[column], color="#c44e52", linestyle="--", label=f"threshold {thresholds[column]}")
            ax.legend()
    if has_reasons:
        ax = axes[0][len(present)]
        counts = frame[reason_column].dropna().str.split(";").explode().value_counts()
        ax.barh(counts.index.astype(str), counts.to_numpy(), color="#dd8452")
        ax.set_title(f"dropped {int(frame[reason_column].notna().sum())} of {len(frame)}, by reason")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return path
