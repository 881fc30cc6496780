"""Pieces of the HTML reports: thumbnails read from the shards, figures as inline PNGs, sample cards, the page."""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

import dask
import numpy as np
import pandas as pd

from imgcurate import progress
from imgcurate.dataset import ImageTextPairDataset
from imgcurate.io._fs import atomic_open
from imgcurate.io.tar import aligned_images

STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1200px}.row{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}"
    "figure{margin:0;width:var(--thumb);font-size:11px;overflow-wrap:anywhere}figure img{max-width:100%}"
    ".missing{width:96px;height:96px;background:#eee;color:#900;display:flex;align-items:center;"
    "justify-content:center}section{border-top:1px solid #ddd}.plot{max-width:100%}"
    "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}"
)


def thumbnails(dataset: ImageTextPairDataset, rows: pd.DataFrame, id_col: str, size: int, desc: str) -> dict[str, str]:
    """Base64 JPEG thumbnails of ``rows`` (with ``_shard`` and ``_row``), read from their shards in tar order.

    Only the shards that hold a row are read, one task per shard, and from those only the rows' images; an image
    that cannot be decoded gets no thumbnail (the page shows a placeholder)."""
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

    if rows.empty:
        return {}
    tasks = [
        dask.delayed(shard)(dataset.tar_files[int(i)], group.sort_values("_row")[id_col].drop_duplicates().tolist())
        for i, group in rows.groupby("_shard")
    ]
    found: dict[str, str] = {}
    for part in progress.compute(tasks, desc=desc, unit="shard"):
        found.update(part)
    return found


def png(fig: Any) -> str:
    """A matplotlib ``Figure`` as an inline ``<img>`` (base64 PNG)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return f'<img class="plot" alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def card(key: Any, thumbs: dict[str, str], note: str = "", caption: Any = None) -> str:
    """One sample: its thumbnail (or a placeholder), its key, a note and the start of its caption."""
    caption = "" if caption is None or (isinstance(caption, float) and np.isnan(caption)) else str(caption)
    image = thumbs.get(key)
    picture = (
        f'<img src="data:image/jpeg;base64,{image}" alt="{html.escape(str(key))}">'
        if image
        else '<div class="missing">no image</div>'
    )
    return (
        f"<figure>{picture}<figcaption><b>{html.escape(str(key))}</b> {html.escape(note)}"
        f"<br>{html.escape(caption[:80])}</figcaption></figure>"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A small HTML table (values escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


#: How the files that reports write begin: an HTML page, a PNG image.
REPORT_STARTS = (b"<!doctype html", b"\x89PNG")


def check_replaceable(path: str, storage_options: dict | None, starts: bytes | tuple[bytes, ...], kind: str) -> None:
    """Raises :class:`FileExistsError` when ``path`` holds a non-empty file that does not begin with ``starts`` (what
    the report writes): a report replaces an earlier report or an empty file, never a file of another kind (a shard
    named by mistake)."""
    import fsspec

    fs, where = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.isfile(where):
        if fs.isdir(where):
            raise FileExistsError(f"{path}: is a folder: give the report the name of a file")
        return
    starts = (starts,) if isinstance(starts, bytes) else starts
    with fs.open(where, "rb") as f:
        head = f.read(max(map(len, starts)))
    if head and not any(head[: len(s)].lower() == s.lower() for s in starts):
        raise FileExistsError(f"{path}: holds a file that is not {kind}; a report does not replace it")


#: Characters HTML does not allow in a page (C0 controls but tab, newline and carriage return; DEL; C1 controls),
#: and Unicode's bidirectional controls (embeddings, overrides, isolates), with which a caption or key could reorder
#: the text shown around it.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def write_page(path: str, title: str, body: list[str], thumb_size: int, storage_options: dict | None) -> str:
    """Writes a self-contained page (styles inline, images as data URLs) atomically; returns ``path``. An existing
    file there must be an HTML page (:func:`check_replaceable`). Control characters (a caption's NUL or BEL, which
    HTML does not allow) and bidirectional controls are written as U+FFFD, the replacement character."""
    check_replaceable(path, storage_options, b"<!doctype html", "an HTML page")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>:root{{--thumb:{thumb_size + 16}px}}{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>"
    )
    page = _CONTROL.sub("\ufffd", page)
    with atomic_open(path, "wb", storage_options) as f:
        f.write(page.encode("utf-8"))
    return path
