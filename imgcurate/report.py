"""Pictures of results: score histograms with the filter thresholds, drop counts by reason, and an HTML page of
duplicate groups with their thumbnails."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import pandas as pd

from imgcurate import progress
from imgcurate.dataset import ImageTextPairDataset, partition_number
from imgcurate.io.shards import atomic_open
from imgcurate.io.tar import aligned_images

__all__ = ["score_histograms", "duplicate_groups"]

# (flag column, duplicate-of column, similarity column or None) of the dedup steps, looked up in this order
_DEDUP_COLUMNS = (
    ("is_duplicate", "duplicate_of", "max_similarity"),
    ("exact_duplicate", "exact_duplicate_of", None),
)


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


def duplicate_groups(
    dataset: ImageTextPairDataset,
    path: str,
    *,
    columns: tuple[str, str, str | None] | None = None,
    max_groups: int = 50,
    max_per_group: int = 8,
    borderline: int = 20,
    thumb_size: int = 128,
    caption_column: str = "caption",
) -> str:
    """Writes a self-contained HTML page that shows what a dedup step found, with thumbnails read from the shards.

    The page has the counts, a histogram of the similarity to the nearest earlier sample (flagged and kept samples
    stacked, so the threshold shows), the largest duplicate groups (the sample the duplicates point at, then the
    duplicates with their similarity), and the ``borderline`` most similar pairs that were *not* flagged, which is
    where to look when choosing ``eps``. Only the shards that hold a shown sample are read, and from those only the
    shown images. Persist the dataset first (dedup steps return it lazily on a persisted frame).

    Args:
        dataset: a dataset with the columns of ``SemanticDeduplicator`` or ``ExactDuplicates``.
        path: the HTML file to write (atomically).
        columns: (flag, duplicate-of, similarity or None) columns; None finds the semantic ones, else the exact ones.
        max_groups: groups shown, largest first.
        max_per_group: duplicates shown per group (the count says how many there are).
        borderline: unflagged pairs shown, most similar first (needs a similarity column).
        thumb_size: the longer side of each thumbnail, in pixels.
        caption_column: shown under each thumbnail when present.

    Returns:
        ``path``.

    Raises:
        ValueError: the dataset has no dedup columns (naming the ones looked for).

    Example:
        >>> ds = SemanticDeduplicator(n_clusters=100)(ds)  # doctest: +SKIP
        >>> duplicate_groups(ds, "duplicates.html")  # doctest: +SKIP
    """
    df = dataset.metadata
    flag_col, of_col, sim_col = columns or _find_dedup_columns(df.columns)
    id_col = dataset.id_col
    wanted = [id_col, flag_col, of_col] + [c for c in (sim_col, caption_column) if c and c in df.columns]

    def rows(part: Any, partition_info=None) -> pd.DataFrame:
        frame = part[wanted] if isinstance(part, pd.DataFrame) else part[wanted].to_pandas()
        return frame.assign(_shard=partition_number(partition_info), _row=np.arange(len(frame)))

    meta = df._meta[wanted]
    meta = (meta if isinstance(meta, pd.DataFrame) else meta.to_pandas()).assign(_shard=0, _row=0)
    table = progress.compute([df.map_partitions(rows, meta=meta, enforce_metadata=False)], desc="duplicate report")[0]
    table = table.reset_index(drop=True)
    flagged = table[table[flag_col].fillna(False).astype(bool) & table[of_col].notna()]
    groups = sorted(flagged.groupby(of_col, sort=False), key=lambda g: (-len(g[1]), str(g[0])))[:max_groups]
    by_id = table.drop_duplicates(id_col).set_index(id_col, drop=False)
    near = pd.DataFrame()
    if sim_col and sim_col in table.columns and borderline:
        kept = table[~table[flag_col].fillna(False).astype(bool) & table[of_col].notna() & table[sim_col].notna()]
        near = kept.nlargest(borderline, sim_col)

    shown: list[pd.DataFrame] = [near, by_id.loc[near[of_col]] if len(near) else near]
    for target, members in groups:
        shown += [by_id.loc[[target]], members.head(max_per_group)]
    shown_rows = pd.concat([f for f in shown if len(f)]) if any(len(f) for f in shown) else table.iloc[:0]
    thumbs = _thumbnails(dataset, shown_rows.drop_duplicates(id_col), id_col, thumb_size)

    def card(row: pd.Series, note: str) -> str:
        caption = row.get(caption_column) if caption_column in row.index else None
        caption = "" if caption is None or (isinstance(caption, float) and np.isnan(caption)) else str(caption)
        image = thumbs.get(row[id_col])
        picture = (
            f'<img src="data:image/jpeg;base64,{image}" alt="{html.escape(str(row[id_col]))}">'
            if image
            else '<div class="missing">no image</div>'
        )
        return (
            f"<figure>{picture}<figcaption><b>{html.escape(str(row[id_col]))}</b> {html.escape(note)}"
            f"<br>{html.escape(caption[:80])}</figcaption></figure>"
        )

    def similarity(row: pd.Series) -> str:
        return f"similarity {row[sim_col]:.6g}" if sim_col and sim_col in row.index and pd.notna(row[sim_col]) else ""

    parts = [
        f"<h1>Duplicates: {len(flagged)} of {len(table)} samples flagged ({flag_col!r})</h1>",
        f"<p>{flagged[of_col].nunique()} samples have duplicates pointing at them; the {len(groups)} largest groups "
        f"are shown, up to {max_per_group} duplicates each.</p>",
    ]
    if sim_col and sim_col in table.columns:
        parts.append(f'<img class="plot" src="data:image/png;base64,{_similarity_plot(table, flag_col, sim_col)}">')
    parts.append("<h2>Largest groups</h2>")
    for target, members in groups:
        head = by_id.loc[target]
        status = f"also flagged, duplicate of {head[of_col]}" if bool(head[flag_col]) else "kept"
        cards = [card(head, f"({status})")] + [
            card(m, similarity(m)) for _, m in members.head(max_per_group).iterrows()
        ]
        more = f"<p>and {len(members) - max_per_group} more</p>" if len(members) > max_per_group else ""
        parts.append(f'<section><h3>{len(members)} duplicate(s) of {html.escape(str(target))}</h3>'
                     f'<div class="row">{"".join(cards)}</div>{more}</section>')  # fmt: skip
    if len(near):
        parts.append(f"<h2>Most similar pairs that were not flagged ({len(near)})</h2>")
        for _, row in near.iterrows():
            other = by_id.loc[row[of_col]]
            parts.append(f'<div class="row">{card(other, "")}{card(row, similarity(row))}</div>')
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>imgcurate duplicates</title><style>"
        "body{font-family:sans-serif;margin:1.5em}.row{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}"
        f"figure{{margin:0;width:{thumb_size + 16}px;font-size:11px}}figure img{{max-width:{thumb_size}px}}"
        ".missing{width:96px;height:96px;background:#eee;color:#900;display:flex;align-items:center;"
        "justify-content:center}section{border-top:1px solid #ddd}.plot{max-width:720px}"
        "</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    with atomic_open(path, "wb", dataset.storage_options) as f:
        f.write(page.encode("utf-8"))
    return path


def _find_dedup_columns(present: Sequence[str]) -> tuple[str, str, str | None]:
    for flag, of, sim in _DEDUP_COLUMNS:
        if flag in present and of in present:
            return flag, of, (sim if sim in present else None)
    looked = "; ".join(f"{flag} + {of}" for flag, of, _ in _DEDUP_COLUMNS)
    raise ValueError(f"the metadata has no dedup columns (looked for {looked}); run a dedup step first")


def _thumbnails(dataset: ImageTextPairDataset, rows: pd.DataFrame, id_col: str, size: int) -> dict[str, str]:
    """Base64 JPEG thumbnails of ``rows`` (with ``_shard`` and ``_row``), read from their shards in tar order."""
    from imgcurate.embedders.decode import decode_rgb

    def shard(tar: str, keys: list[str]) -> dict[str, str]:
        out = {}
        for key, (data, _) in zip(keys, aligned_images(tar, keys, dataset.storage_options), strict=True):
            try:
                image = decode_rgb(data, draft_size=size)
            except Exception:  # an undecodable image is shown as missing
                continue
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            out[key] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return out

    tasks = [
        dask.delayed(shard)(dataset.tar_files[int(i)], group.sort_values("_row")[id_col].tolist())
        for i, group in rows.groupby("_shard")
    ]
    found: dict[str, str] = {}
    for part in progress.compute(tasks, desc="duplicate report: thumbnails"):
        found.update(part)
    return found


def _similarity_plot(table: pd.DataFrame, flag_col: str, sim_col: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags = table[flag_col].fillna(False).astype(bool)
    sims = table[sim_col].astype("float64")
    kept, dropped = sims[~flags].dropna().to_numpy(), sims[flags].dropna().to_numpy()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist([kept, dropped], bins=50, stacked=True, color=["#4c72b0", "#c44e52"], label=["kept", "flagged"])
    ax.set_xlabel(f"{sim_col} (cosine similarity to the most similar earlier sample in its cluster)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
