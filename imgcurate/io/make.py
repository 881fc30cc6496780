"""Making shards: from a folder of images with sidecar files, from a CSV/parquet list, or from in-memory records."""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from imgcurate import progress
from imgcurate.io._fs import in_the_way, remove_tree, task_url
from imgcurate.io.export import STAGING, existing_shards, publish
from imgcurate.io.shards import (
    CAPTION_COLUMN,
    ERROR_COLUMN,
    KEY_COLUMN,
    JSONTooDeepError,
    ShardWriter,
    caption_or_json,
    columns_to_table,
    encodable,
    load_json,
    new_key,
    own_fields,
)
from imgcurate.io.tar import IMAGE_EXTENSIONS

__all__ = ["Record", "write_shards", "make_shards", "image_size"]

_PATH_COLUMNS = ("path", "image_path", "filepath", "file", "image")
_CAPTION_COLUMNS = ("caption", "text", "txt")


@dataclass
class Record:
    """One sample to write: its members (extension -> bytes) and the fields of its json member.

    ``caption`` becomes the ``txt`` member; ``error`` is recorded in the metadata only.
    """

    members: dict[str, bytes]
    fields: dict[str, Any] = field(default_factory=dict)
    caption: str | None = None
    error: str | None = None


def image_size(data: bytes) -> tuple[int, int] | str:
    """(width, height) read from an image header without decoding the pixels, or what is wrong with the header."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError as err:  # the header is read: it declares too many pixels to decode
        return f"image is a decompression bomb ({' '.join(str(err).split())})"
    except Exception:  # PIL raises many types for bad input
        return "image header is unreadable"


def write_shards(
    records: Iterable[Record],
    out: str,
    *,
    samples_per_shard: int = 10000,
    id_col: str = KEY_COLUMN,
    total: int | None = None,
    storage_options: dict | None = None,
    index_files: bool = False,
    overwrite: bool = False,
) -> list[str]:
    """Writes records into ``out/00000.tar`` (+ ``.parquet``), ... with keys from :func:`new_key`.

    Each record's json member holds its fields (plus width/height read from the image header); the parquet has the
    key, the caption, the error and the same fields. A field named like one of those three is kept as
    ``source_<name>``, and so is a ``width`` or ``height`` that differs from the image's. ``index_files`` also writes
    each shard's DALI index.

    The shards are written into a staging folder inside ``out`` and published when all are done, as an export is
    (:mod:`imgcurate.io.export`): a run that stops leaves ``out`` as it was (or, stopped while publishing, a folder
    that does not open until a rerun finishes), never old and new shards side by side.

    Raises:
        ValueError: ``samples_per_shard`` is not a positive integer, or there is no record (``out`` is left as it
            was).
        FileExistsError: ``out`` already holds shards and ``overwrite`` is false.

    Returns:
        The tar paths written.
    """
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: expected a positive integer, got {samples_per_shard!r}")
    so = storage_options or {}
    fs, root = fsspec.core.url_to_fs(out, **so)
    existing_shards(fs, root, out, overwrite)
    blocked = in_the_way(fs, root)
    if blocked is not None:
        raise NotADirectoryError(f"{out}: cannot be made a folder: {task_url(fs, blocked[0])} is {blocked[1]}")
    made = not fs.exists(root)
    stage_root = posixpath.join(root, STAGING)
    if fs.exists(stage_root):  # what a stopped run staged: it is written again from the records
        fs.rm(stage_root, recursive=True)
    fs.makedirs(stage_root, exist_ok=True)
    stage_dir = posixpath.join(out.rstrip("/"), STAGING)
    reserved = (id_col, CAPTION_COLUMN, ERROR_COLUMN)
    written = 0
    writer: ShardWriter | None = None
    rows: list[dict[str, Any]] = []

    def finish() -> None:
        names: list[str] = [id_col, CAPTION_COLUMN, ERROR_COLUMN]
        for row in rows:
            names.extend(k for k in row if k not in names)
        writer.set_metadata(columns_to_table({n: [r.get(n) for r in rows] for n in names}))
        writer.close()

    try:
        for index, record in enumerate(progress.bar(records, desc="writing shards", total=total, unit="sample")):
            shard, position = divmod(index, samples_per_shard)
            if position == 0:
                if writer is not None:
                    finish()
                tar = posixpath.join(stage_dir, f"{shard:05d}.tar")
                writer = ShardWriter(tar, storage_options=so, index=index_files)
                written, rows = shard + 1, []
            key = new_key(shard, position, samples_per_shard)
            fields = own_fields(record.fields, reserved)
            image = next((data for ext, data in record.members.items() if ext.lower() in IMAGE_EXTENSIONS), None)
            size = image_size(image) if image is not None else None
            error = record.error
            if isinstance(size, str):
                error, size = _also(error, size), None
            if size is not None:  # the image's own size; a record's field that says otherwise is kept as source_*
                fields = own_fields(fields, ("width", "height"), {"width": size[0], "height": size[1]})
                fields["width"], fields["height"] = size
            else:
                fields.setdefault("width", None)
                fields.setdefault("height", None)
            members = dict(record.members)
            caption = encodable(record.caption)  # a lone surrogate (half an emoji) becomes U+FFFD
            fields = encodable(fields)
            if caption is not None:
                members["txt"] = caption.encode("utf-8")
            members["json"] = json.dumps({"key": key, **fields}, sort_keys=True).encode("utf-8")
            writer.write(key, members)
            rows.append({id_col: key, CAPTION_COLUMN: caption, ERROR_COLUMN: error, **fields})
        if writer is not None:
            finish()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    if not written:  # nothing to publish: the output keeps its shards, if it has any
        remove_tree(fs, root if made else stage_root)
        raise ValueError(f"{out}: no samples to write")
    publish(fs, root, written, index_files)
    return [posixpath.join(out.rstrip("/"), f"{s:05d}.tar") for s in range(written)]


def _folder_records(folder: str, fs: fsspec.AbstractFileSystem, files: list[str]) -> Iterator[Record]:
    present = set(files)
    stems = {p.rpartition(".")[0] for p in files if p.rpartition(".")[2].lower() in IMAGE_EXTENSIONS}

    def taken(path: str) -> bool:  # an image, or the caption or json beside one (``cat.gif`` beside ``cat.jpg`` is not)
        stem, _, ext = path.rpartition(".")
        return ext.lower() in IMAGE_EXTENSIONS or (ext in ("txt", "json") and stem in stems)

    left = [p for p in files if not taken(p)]
    if left:
        import warnings

        warnings.warn(f"{folder}: {len(left)} file(s) are neither images ({', '.join(IMAGE_EXTENSIONS)}) nor the "
                      f".txt/.json beside one, and are not in the shards (the first: "
                      f"{posixpath.relpath(left[0], folder)!r})", stacklevel=3)  # fmt: skip
    for path in files:
        stem, _, ext = path.rpartition(".")
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = error = None
        name = posixpath.relpath(path, folder)
        fields: dict[str, Any] = {"source_path": name}
        if f"{stem}.txt" in present:
            try:
                raw = fs.cat_file(f"{stem}.txt")
            except OSError as err:
                raw, error = b"", f"cannot read the caption file of {name!r} ({_reason(err)})"
            try:
                caption = raw.decode("utf-8").strip() if raw else None
            except UnicodeDecodeError:
                caption, error = raw.decode("utf-8", errors="replace").strip(), "caption is not valid UTF-8"
        if f"{stem}.json" in present:
            try:
                extra = load_json(fs.cat_file(f"{stem}.json"))
                if isinstance(extra, dict):  # a field named source_path is kept as source_source_path
                    fields = {**own_fields(extra, ("source_path",), fields), **fields}
                    caption = caption_or_json(caption, extra)
                else:
                    error = _also(error, "sidecar json is not an object")
            except OSError as err:
                error = _also(error, f"cannot read the sidecar json of {name!r} ({_reason(err)})")
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                error = _also(error, f"sidecar json is not valid JSON ({err})")
            except JSONTooDeepError as err:
                error = _also(error, f"sidecar json is {err}")
        try:
            data = fs.cat_file(path)
        except OSError as err:
            yield Record({}, fields, caption, _also(error, f"cannot read image file {name!r} ({_reason(err)})"))
            continue
        yield Record({ext.lower(): data}, fields, caption, error)


def _also(error: str | None, problem: str) -> str:
    """A sample's error text with one more problem: every problem is recorded, ``; ``-separated (as a scanned
    shard's errors are), not only the first."""
    return f"{error}; {problem}" if error else problem


def _reason(err: OSError) -> str:
    """An OS error's reason without the path it names (the message names the file itself)."""
    return err.strerror or type(err).__name__


def _table_columns(table: pd.DataFrame, where: str, path_col: str | None, caption_col: str | None) -> tuple[str, Any]:
    """The list's path and caption columns: those given, else the first of the usual names (no caption column when
    none is there).

    Raises:
        ValueError: naming the list and the column, with the columns it has.
    """
    columns = ", ".join(map(str, table.columns))
    for option, given in (("path_col", path_col), ("caption_col", caption_col)):
        if given is not None and given not in table.columns:
            raise ValueError(f"{where}: no column {given!r} ({option}; the list's columns: {columns})")
    path_col = path_col or next((c for c in _PATH_COLUMNS if c in table.columns), None)
    if path_col is None:
        raise ValueError(f"{where}: no column of image paths (one of {', '.join(_PATH_COLUMNS)}; the list's "
                         f"columns: {columns}): name it with path_col")  # fmt: skip
    return path_col, caption_col or next((c for c in _CAPTION_COLUMNS if c in table.columns), None)


def _table_records(
    table: pd.DataFrame, base: str, path_col: str, caption_col: str | None, storage_options: dict
) -> Iterator[Record]:
    extra_cols = [c for c in table.columns if c not in (path_col, caption_col)]
    for row in table.to_dict("records"):
        caption = _plain(row.get(caption_col)) if caption_col else None
        caption = None if caption is None else str(caption)
        source = _plain(row[path_col])
        # a column named source_path (other than the path column) is kept as source_source_path
        fields = own_fields({c: _plain(row[c]) for c in extra_cols}, ("source_path",),
                            {"source_path": None if source is None else str(source)})  # fmt: skip
        if source is None or not str(source).strip():
            fields["source_path"] = None
            yield Record({}, fields, caption, "the list gives no image path")
            continue
        source = str(source)
        path = source if os.path.isabs(source) or "://" in source else posixpath.join(base, source)
        fields["source_path"] = source
        ext = path.rpartition(".")[2].lower()
        try:
            with fsspec.open(path, "rb", **storage_options) as f:
                data = f.read()
        except OSError as err:
            yield Record({}, fields, caption, f"cannot read image file {source!r} ({_reason(err)})")
            continue
        if ext not in IMAGE_EXTENSIONS:
            yield Record({"bin": data}, fields, caption, f"{source!r} has no image extension")
            continue
        yield Record({ext: data}, fields, caption)


def _plain(value: Any) -> Any:
    """A list cell as a plain Python value for the json member: NaN, None and pandas' missing values as None, numpy
    scalars as numbers, arrays (a parquet list column) as lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def make_shards(
    source: str,
    out: str,
    *,
    samples_per_shard: int = 10000,
    path_col: str | None = None,
    caption_col: str | None = None,
    index_files: bool = False,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> list[str]:
    """Turns images into WebDataset shards with their parquet (and their DALI indexes with ``index_files``).

    Args:
        source: a folder of images (searched recursively; ``photo.jpg`` takes its caption from ``photo.txt`` and
            extra fields from ``photo.json`` beside it), or a ``.csv``/``.parquet`` list with a column of image paths
            (relative paths are taken from the list's folder), an optional caption column and any other columns,
            which go into the json member.
        out: the output folder.
        samples_per_shard: samples per shard.
        path_col: the column of image paths in a list (default: the first of path, image_path, filepath, file, image).
        caption_col: the caption column in a list (default: the first of caption, text, txt).
        index_files: also write each shard's DALI index (``NNNNN.idx``), for ``use_index_files=True`` readers.
        overwrite: replace the shards already in ``out``; otherwise a folder with shards in it is an error.
        storage_options: fsspec options for ``source``, the images it lists and ``out`` (an object store's
            credentials and endpoint).

    Returns:
        The tar paths written. Image bytes are copied unchanged; an unreadable file becomes a sample with an error.

    Raises:
        FileNotFoundError: a folder with no image in it or below (checked before ``out`` is touched).
        ValueError: a list without rows, or a ``source`` that is neither a folder nor a list.

    Example:
        >>> make_shards("photos/", "shards/", samples_per_shard=1000)  # doctest: +SKIP
    """
    so = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(source, **so)
    if fs.isdir(root):
        # hidden files and folders (macOS ``._photo.jpg`` AppleDouble files, ``.DS_Store``, ``.git``) are skipped, as
        # the tar reader skips members whose names start with a dot
        files = sorted(p for p in fs.find(root) if not any(part.startswith(".") for part in
                                                            posixpath.relpath(p, root).split("/")))  # fmt: skip
        total = sum(p.rpartition(".")[2].lower() in IMAGE_EXTENSIONS for p in files)
        if not total:  # checked before the output is touched
            raise FileNotFoundError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
        records: Iterable[Record] = _folder_records(root, fs, files)
    elif root.endswith((".csv", ".parquet")):
        try:
            read = pd.read_csv if root.endswith(".csv") else pd.read_parquet
            table = read(source, storage_options=so or None)
        except (ValueError, OSError, pa.ArrowException) as err:  # empty, not CSV or parquet, unreadable
            raise ValueError(f"{source}: not a readable list of images ({' '.join(str(err).split())})") from None
        path_col, caption_col = _table_columns(table, source, path_col, caption_col)
        if table.empty:
            raise ValueError(f"{source}: the list has no rows")
        # relative paths are taken from the list's folder, on the list's filesystem
        base = task_url(fs, posixpath.dirname(root))
        records = _table_records(table, base, path_col, caption_col, so)
        total = len(table)
    else:
        raise ValueError(f"{source}: expected a folder of images or a .csv/.parquet list of image paths")
    return write_shards(records, out, samples_per_shard=samples_per_shard, total=total, index_files=index_files,
                        overwrite=overwrite, storage_options=so)  # fmt: skip
