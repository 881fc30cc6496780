"""What the dedup steps found: the counts, the similarity histogram, the largest duplicate groups and the closest
pairs that were not flagged, with thumbnails read from the shards; as its own page or inside the run report."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from imgcurate import progress
from imgcurate.backends import to_pandas
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.reports._html import card, png, thumbnails, write_page

__all__ = ["duplicate_groups", "DuplicateFacts", "collect_duplicates", "dedup_column_sets", "find_dedup_columns"]

# (flag column, duplicate-of column, similarity column or None) of the dedup steps, looked up in this order
_DEDUP_COLUMNS = (
    ("is_duplicate", "duplicate_of", "max_similarity"),
    ("exact_duplicate", "exact_duplicate_of", None),
)


@dataclass
class DuplicateFacts:
    """What :func:`collect_duplicates` gathered: small, bounded by the numbers of groups and pairs shown."""

    flag_col: str
    of_col: str
    sim_col: str | None
    id_col: str
    caption_column: str
    total: int
    flagged: int
    targets: int
    top: pd.Series  # target -> group size, largest first
    groups: list[tuple[Any, pd.DataFrame]]  # target, its flagged members (shard order)
    near: pd.DataFrame  # closest unflagged pairs
    by_id: pd.DataFrame  # the shown targets and partners, by key
    bins: np.ndarray | None
    counts: np.ndarray | None  # (2, bins) kept, flagged
    thumbs: dict[str, str]
    max_per_group: int


def dedup_column_sets(present: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """Every (flag, duplicate-of, similarity) column set of the dedup steps that ``present`` holds."""
    return [(f, o, s if s in present else None) for f, o, s in _DEDUP_COLUMNS if f in present and o in present]


def collect_duplicates(
    dataset: ImageTextPairDataset,
    columns: tuple[str, str, str | None],
    *,
    max_groups: int = 50,
    max_per_group: int = 8,
    borderline: int = 20,
    thumb_size: int = 128,
    caption_column: str = "caption",
) -> DuplicateFacts:
    """Gathers what a duplicate page shows, in two small Dask passes and one thumbnail pass; the table itself is
    never brought to the client."""
    df = dataset.metadata
    flag_col, of_col, sim_col = columns
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
    counts = flagged[of_col].value_counts()
    # each target's count lies in one partition of the counts: each partition's largest groups, then theirs here
    first.append(counts.map_partitions(_largest_groups, max_groups, meta=counts._meta))
    if sim_col is not None and borderline:
        candidates = small[~small["_flag"] & small[of_col].notnull() & small[sim_col].notnull()]
        first.append(candidates.nlargest(borderline, sim_col))
    if sim_col is not None:
        first += [small[sim_col].min(), small[sim_col].max()]
    got = progress.compute(first, desc=f"{flag_col}: counts")
    total, n_flagged, n_targets, top = int(got[0]), int(got[1]), int(got[2]), _largest_groups(got[3], max_groups)
    near = got[4].sort_values(sim_col, ascending=False) if sim_col is not None and borderline else small._meta
    targets = sorted(top.index, key=lambda t: (-int(top[t]), str(t)))
    top = top.reindex(targets)
    # second pass: the rows to show, and the histogram (its bins start at the lowest similarity)
    second = [flagged[flagged[of_col].isin(targets)], small[small[id_col].isin(targets + near[of_col].tolist())]]
    bins = None
    if sim_col is not None:
        lowest, highest = (float(v) if pd.notna(v) else 1.0 for v in got[-2:])
        bins = np.linspace(min(lowest, 0.999), max(highest, 1.0), 51)  # float32 similarities may pass 1.0
        meta = pd.Series(np.zeros(0, dtype=np.int64))
        second.append(small.map_partitions(_histograms, sim_col, bins, meta=meta, enforce_metadata=False))
    got = progress.compute(second, desc=f"{flag_col}: rows")
    members = got[0].sort_values(["_shard", "_row"])
    by_id = got[1].drop_duplicates(id_col).set_index(id_col, drop=False)
    groups = [(t, members[members[of_col] == t]) for t in targets]
    counts = got[2].groupby(level=0).sum().to_numpy().reshape(2, -1) if bins is not None else None
    shown = [near, got[1]] + [m.head(max_per_group) for _, m in groups]
    shown = pd.concat(shown).drop_duplicates(id_col)
    thumbs = thumbnails(dataset, shown, id_col, thumb_size, f"{flag_col}: thumbnails")
    return DuplicateFacts(flag_col, of_col, sim_col, id_col, caption_column, total, n_flagged, n_targets, top,
                          groups, near, by_id, bins, counts, thumbs, max_per_group)  # fmt: skip


def render_duplicates(facts: DuplicateFacts, heading: str = "h1",
                      marks: Sequence[tuple[str, float]] = ()) -> list[str]:  # fmt: skip
    """The page's parts: a heading with the counts, the histogram (``marks``: (label, similarity) lines drawn on it),
    the largest groups and the closest pairs."""
    f = facts
    sub = "h2" if heading == "h1" else "h3"

    def show(row: pd.Series, note: str) -> str:
        caption = row.get(f.caption_column) if f.caption_column in row.index else None
        return card(row[f.id_col], f.thumbs, note, caption)

    def lookup(key: Any) -> pd.Series:
        """The shown row of ``key``; a sample filtered out of the metadata since the dedup step has none."""
        if key in f.by_id.index:
            return f.by_id.loc[key]
        return pd.Series({f.id_col: key, "_flag": False, f.of_col: None})

    def similarity(row: pd.Series) -> str:
        sim = f.sim_col
        return f"similarity {row[sim]:.6g}" if sim and sim in row.index and pd.notna(row[sim]) else ""

    parts = [
        f"<{heading}>Duplicates: {f.flagged} of {f.total} samples flagged "
        f"({html.escape(repr(f.flag_col), quote=False)})</{heading}>",
        f"<p>{f.targets} samples have duplicates pointing at them; the {len(f.groups)} largest groups are shown, up to "
        f"{f.max_per_group} duplicates each.</p>",
    ]
    if f.bins is not None and f.counts is not None:
        parts.append(_similarity_plot(f.bins, *f.counts, f.sim_col, marks))
        parts.append(
            f"<p>The histogram counts {f.counts[0].sum()} kept and {f.counts[1].sum()} flagged samples; the first "
            "sample of each cluster has no earlier one to compare with.</p>"
        )
    parts.append(f"<{sub}>Largest groups</{sub}>")
    for target, group in f.groups:
        head = lookup(target)
        if target not in f.by_id.index:
            status = "not in the metadata"
        else:
            # "not flagged": the dedup keeps it, though a later filter may drop it for another reason
            status = f"also flagged, duplicate of {head[f.of_col]}" if bool(head["_flag"]) else "not flagged"
        members = group.head(f.max_per_group)
        cards = [show(head, f"({status})")] + [show(m, similarity(m)) for _, m in members.iterrows()]
        size = int(f.top[target])
        more = f"<p>and {size - f.max_per_group} more</p>" if size > f.max_per_group else ""
        parts.append(f'<section><h3>{size} duplicate(s) of {html.escape(str(target))}</h3>'
                     f'<div class="row">{"".join(cards)}</div>{more}</section>')  # fmt: skip
    if len(f.near):
        parts.append(f"<{sub}>Most similar pairs that were not flagged ({len(f.near)})</{sub}>")
        for _, row in f.near.iterrows():
            other = lookup(row[f.of_col])
            parts.append(f'<div class="row">{show(other, "")}{show(row, similarity(row))}</div>')
    return parts


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
    shown images. The run report (:func:`imgcurate.reports.run_report`) holds the same sections for every dedup step.

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
    facts = collect_duplicates(
        dataset, columns or find_dedup_columns(dataset.metadata.columns), max_groups=max_groups,
        max_per_group=max_per_group, borderline=borderline, thumb_size=thumb_size, caption_column=caption_column,
    )  # fmt: skip
    return write_page(path, "imgcurate duplicates", render_duplicates(facts), thumb_size, dataset.storage_options)


def _report_rows(part: Any, shard: Any, wanted: list[str], flag_col: str, of_col: str) -> pd.DataFrame:
    frame = to_pandas(part[wanted])
    flag = frame[flag_col].fillna(False).astype(bool).to_numpy() & frame[of_col].notna().to_numpy()
    return frame.assign(_flag=flag, _shard=shard.index, _row=np.arange(len(frame)))


def find_dedup_columns(present: Sequence[str]) -> tuple[str, str, str | None]:
    for flag, of, sim in _DEDUP_COLUMNS:
        if flag in present and of in present:
            return flag, of, (sim if sim in present else None)
    looked = "; ".join(f"{flag} + {of}" for flag, of, _ in _DEDUP_COLUMNS)
    raise ValueError(f"the metadata has no dedup columns (looked for {looked}); run a dedup step first")


def _largest_groups(counts: pd.Series, k: int) -> pd.Series:
    """The ``k`` largest groups, ties broken by the target's key: the same groups however the rows are sharded
    (``nlargest`` keeps whichever tie it meets first)."""
    if counts.empty:
        return counts
    top = counts.nlargest(k, keep="all")  # every tie at the cut, then the key decides among them
    order = pd.DataFrame({"n": top.to_numpy(), "key": top.index.astype(str)}).sort_values(
        ["n", "key"], ascending=[False, True], kind="stable")  # fmt: skip
    return top.iloc[order.index[:k]]


def _histograms(part: pd.DataFrame, sim_col: str, bins: np.ndarray) -> pd.Series:
    """One partition's counts per bin of the similarity: kept samples' bins, then flagged samples' bins."""
    values = part[sim_col].astype("float64")
    flag = part["_flag"].to_numpy(dtype=bool)
    counts = [np.histogram(values[f].dropna(), bins)[0] for f in (~flag, flag)]
    return pd.Series(np.concatenate(counts).astype(np.int64))


def _similarity_plot(bins: np.ndarray, kept: np.ndarray, flagged: np.ndarray, sim_col: str,
                     marks: Sequence[tuple[str, float]] = ()) -> str:  # fmt: skip
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    left = bins[:-1]
    ax.hist([left, left], bins=bins, weights=[kept, flagged], stacked=True, color=["#4c72b0", "#c44e52"],
            label=["kept", "flagged"])  # fmt: skip
    ax.set_xlabel(f"{sim_col} (cosine similarity to the most similar earlier sample in its cluster)")
    ax.set_ylabel("samples")
    for label, value in marks:
        ax.axvline(value, color="#222222", linestyle="--", label=label)
    ax.legend(loc="upper left")
    return png(fig)
