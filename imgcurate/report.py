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
from imgcurate.backends import to_pandas
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.io._fs import atomic_open
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
    from matplotlib.figure import Figure

    df = dataset.metadata
    present = [c for c in columns if c in df.columns]
    has_reasons = reason_column in df.columns
    if not present and not has_reasons:
        raise ValueError(f"none of the columns {', '.join(columns)} (nor {reason_column!r}) is in the metadata")
    wanted = present + ([reason_column] if has_reasons else [])
    frame = to_pandas(df[wanted].compute())
    panels = len(present) + int(has_reasons)
    fig = Figure(figsize=(5 * panels, 3.6))
    axes = fig.subplots(1, panels, squeeze=False)
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
    missing = [c for c in (flag_col, of_col, sim_col) if c is not None and c not in df.columns]
    if missing:
        raise ValueError(f"duplicate_groups: no column {', '.join(map(repr, missing))} in the metadata")
    id_col = dataset.id_col
    wanted = [id_col, flag_col, of_col] + [c for c in (sim_col, caption_column) if c and c in df.columns]

    meta = to_pandas(df._meta[wanted]).assign(_flag=False, _shard=0, _row=0)
    small = dataset.map_shards(_report_rows, wanted, flag_col, of_col, meta=meta, frame=df[wanted])  # never gathered
    flagged = small[small["_flag"]]
    # first pass: counts, the largest groups' targets, the closest unflagged pairs, the similarity range
    first = [small["_flag"].count(), small["_flag"].sum(), flagged[of_col].nunique()]
    first.append(flagged[of_col].value_counts().nlargest(max_groups))
    if sim_col is not None and borderline:
        candidates = small[~small["_flag"] & small[of_col].notnull() & small[sim_col].notnull()]
        first.append(candidates.nlargest(borderline, sim_col))
    if sim_col is not None:
        first += [small[sim_col].min(), small[sim_col].max()]
    got = progress.compute(first, desc="duplicate report: counts")
    total, n_flagged, n_targets, top = int(got[0]), int(got[1]), int(got[2]), got[3]
    near = got[4].sort_values(sim_col, ascending=False) if sim_col is not None and borderline else small._meta
    targets = sorted(top.index, key=lambda t: (-int(top[t]), str(t)))
    # second pass: the rows to show, and the histogram (its bins start at the lowest similarity)
    second = [flagged[flagged[of_col].isin(targets)], small[small[id_col].isin(targets + near[of_col].tolist())]]
    bins = None
    if sim_col is not None:
        lowest, highest = (float(v) if pd.notna(v) else 1.0 for v in got[-2:])
        bins = np.linspace(min(lowest, 0.999), max(highest, 1.0), 51)  # float32 similarities may pass 1.0
        meta = pd.Series(np.zeros(0, dtype=np.int64))
        second.append(small.map_partitions(_histograms, sim_col, bins, meta=meta, enforce_metadata=False))
    got = progress.compute(second, desc="duplicate report: rows")
    members = got[0].sort_values(["_shard", "_row"])
    by_id = got[1].drop_duplicates(id_col).set_index(id_col, drop=False)
    groups = [(t, members[members[of_col] == t]) for t in targets]
    shown = [near, got[1]] + [m.head(max_per_group) for _, m in groups]
    thumbs = _thumbnails(dataset, pd.concat(shown).drop_duplicates(id_col), id_col, thumb_size)

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

    def lookup(key: Any) -> pd.Series:
        """The shown row of ``key``; a sample filtered out of the metadata since the dedup step has none."""
        if key in by_id.index:
            return by_id.loc[key]
        return pd.Series({id_col: key, "_flag": False, of_col: None})

    def similarity(row: pd.Series) -> str:
        return f"similarity {row[sim_col]:.6g}" if sim_col and sim_col in row.index and pd.notna(row[sim_col]) else ""

    parts = [
        f"<h1>Duplicates: {n_flagged} of {total} samples flagged ({html.escape(repr(flag_col), quote=False)})</h1>",
        f"<p>{n_targets} samples have duplicates pointing at them; the {len(groups)} largest groups are shown, up to "
        f"{max_per_group} duplicates each.</p>",
    ]
    if bins is not None:
        counts = got[2].groupby(level=0).sum().to_numpy().reshape(2, -1)  # kept, flagged
        parts.append(f'<img class="plot" src="data:image/png;base64,{_similarity_plot(bins, *counts, sim_col)}">')
        parts.append(
            f"<p>The histogram counts {counts[0].sum()} kept and {counts[1].sum()} flagged samples; the first sample "
            "of each cluster has no earlier one to compare with.</p>"
        )
    parts.append("<h2>Largest groups</h2>")
    for target, group in groups:
        head = lookup(target)
        if target not in by_id.index:
            status = "not in the metadata"
        else:
            status = f"also flagged, duplicate of {head[of_col]}" if bool(head["_flag"]) else "kept"
        cards = [card(head, f"({status})")] + [card(m, similarity(m)) for _, m in group.head(max_per_group).iterrows()]
        size = int(top[target])
        more = f"<p>and {size - max_per_group} more</p>" if size > max_per_group else ""
        parts.append(f'<section><h3>{size} duplicate(s) of {html.escape(str(target))}</h3>'
                     f'<div class="row">{"".join(cards)}</div>{more}</section>')  # fmt: skip
    if len(near):
        parts.append(f"<h2>Most similar pairs that were not flagged ({len(near)})</h2>")
        for _, row in near.iterrows():
            other = lookup(row[of_col])
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


def _report_rows(part: Any, shard: Any, wanted: list[str], flag_col: str, of_col: str) -> pd.DataFrame:
    frame = to_pandas(part[wanted])
    flag = frame[flag_col].fillna(False).astype(bool).to_numpy() & frame[of_col].notna().to_numpy()
    return frame.assign(_flag=flag, _shard=shard.index, _row=np.arange(len(frame)))


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


def _histograms(part: pd.DataFrame, sim_col: str, bins: np.ndarray) -> pd.Series:
    """One partition's counts per bin of the similarity: kept samples' bins, then flagged samples' bins."""
    values = part[sim_col].astype("float64")
    flag = part["_flag"].to_numpy(dtype=bool)
    counts = [np.histogram(values[f].dropna(), bins)[0] for f in (~flag, flag)]
    return pd.Series(np.concatenate(counts).astype(np.int64))


def _similarity_plot(bins: np.ndarray, kept: np.ndarray, flagged: np.ndarray, sim_col: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    left = bins[:-1]
    ax.hist([left, left], bins=bins, weights=[kept, flagged], stacked=True, color=["#4c72b0", "#c44e52"],
            label=["kept", "flagged"])  # fmt: skip
    ax.set_xlabel(f"{sim_col} (cosine similarity to the most similar earlier sample in its cluster)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
