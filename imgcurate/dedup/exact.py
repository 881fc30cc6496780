"""Exact duplicates: the same image bytes (or, optionally, the same decoded pixels) stored more than once."""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING, Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate._dask import Shard
from imgcurate.backends import backend_of, from_arrow
from imgcurate.io.tar import aligned_images
from imgcurate.steps.base import ShardIO, Step
from imgcurate.steps.grouped import (
    GROUP,
    ROW,
    SHARD,
    group_count,
    group_of,
    grouped,
    host,
    per_shard,
    positions,
    text_column,
)

if TYPE_CHECKING:
    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["ExactDuplicates"]

_BY = ("bytes", "pixels")


def _pixel_digest(data: bytes) -> str:
    """The sha256 of the image's decoded pixels, without losing any: 8-bit images as RGB (grayscale, palette and RGB
    copies of one picture agree), with their alpha where it is not opaque everywhere (a transparent copy is another
    image); images of more than 8 bits (16-bit PNG, grayscale or colour; 32-bit integer or float TIFF) as their own
    values; CMYK and other colour spaces as their own bytes (converting them to RGB loses bits); and every frame of
    an animation or page of a multi-page file, in order (two animations that share a first frame differ)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    frames = getattr(image, "n_frames", 1)
    if frames == 1:
        return _frame_digest(image, data).hexdigest()
    digest = hashlib.sha256(f"{frames} frames".encode())
    for i in range(frames):
        image.seek(i)
        digest.update(_frame_digest(image, None).digest())
    return digest.hexdigest()


def _frame_digest(image: Any, data: bytes | None) -> Any:
    """The sha256 (a hashlib object) of one frame's pixels (see :func:`_pixel_digest`); ``data`` (the file, for a
    single-frame image) lets a 16-bit colour PNG be read at full depth."""
    from imgcurate.embedders.decode import to_rgb

    wide = _png_colour_16(image, data) if data is not None else None
    if wide is not None:
        if wide.shape[-1] == 4 and (wide[..., 3] == 65535).all():
            wide = wide[..., :3]  # opaque everywhere: the RGB copy's digest
        digest = hashlib.sha256(f"{image.size} {'RGBA' if wide.shape[-1] == 4 else 'RGB'} 16".encode())
        digest.update(np.ascontiguousarray(wide.astype(">u2")))
        return digest
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image)
        digest = hashlib.sha256(f"{image.size} {values.dtype.kind}".encode())
        digest.update(np.ascontiguousarray(values.astype(np.float64 if values.dtype.kind == "f" else np.int64)))
        return digest
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # not opaque everywhere: the alpha is part of the picture
            digest = hashlib.sha256(f"{image.size} RGBA".encode())
            digest.update(rgba.tobytes())
            return digest
        image = rgba.convert("RGB")
    if image.mode not in ("1", "L", "P", "RGB"):  # CMYK, YCbCr, LAB, HSV: their own values, not a lossy RGB
        digest = hashlib.sha256(f"{image.size} {image.mode}".encode())
        digest.update(image.tobytes())
        return digest
    image = to_rgb(image)
    digest = hashlib.sha256(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest


def _png_colour_16(image: Any, data: bytes) -> np.ndarray | None:
    """A 16-bit RGB or RGBA PNG's samples as uint16 (height, width, bands); None for any other image. Pillow reads
    such a PNG as 8-bit RGB(A), keeping each sample's high byte; decoding the same data a second time with the
    little-endian raw mode keeps the low bytes instead (the unfiltering, which depends only on the 6 or 8 bytes of
    a pixel, is the same), and the two make the full samples."""
    from PIL import Image

    # a tile is (codec, extents, offset, raw mode): a plain tuple before Pillow 11, a named one since
    tile = tuple(image.tile[0]) if image.format == "PNG" and len(image.tile) == 1 else None
    if tile is None or len(tile) != 4 or tile[3] not in ("RGB;16B", "RGBA;16B"):
        return None
    image.load()
    low = Image.open(io.BytesIO(data))
    low.tile = [tile[:3] + (tile[3].replace(";16B", ";16L"),)]
    low.load()
    return (np.asarray(image).astype(np.uint16) << 8) | np.asarray(low).astype(np.uint16)


def _hash_shard(part: Any, shard: Shard, io: ShardIO, by: str, groups: int) -> pd.DataFrame:
    """Each row's position, key, digest (None without a readable image, with the reason in ``error``) and group
    partition, read from its tar."""
    frame = host(part, [io.id_col])
    keys = frame[io.id_col].tolist()
    digests: list[str | None] = []
    errors: list[str | None] = []
    for data, error in aligned_images(shard.tar, keys, io.storage_options):
        digest = None
        if data is None:
            error = error or "no image"
        elif by == "bytes":
            digest = hashlib.sha256(data).hexdigest()
        else:
            try:
                digest = _pixel_digest(data)
            except Exception as err:  # noqa: BLE001 - undecodable: no pixel hash; the reason is the row's error
                from imgcurate.embedders.decode import error_text

                error = f"cannot decode image: {error_text(err)}"  # as the embedders word it
        digests.append(digest)
        errors.append(None if digest is not None else error)
    out = positions(frame, shard.index)
    out["key"] = pd.array(keys, dtype=object)
    out["digest"] = pd.array(digests, dtype=object)
    out["error"] = text_column(errors)  # mostly null: one arrow string type in every shard, through the shuffle
    # the digest's leading 60 bits pick its group; rows without one stay with their shard's group
    codes = [shard.index if d is None else int(d[:15], 16) for d in digests]
    out[GROUP] = group_of(np.asarray(codes, dtype=np.int64), groups)
    return out


_HASH_META = pd.DataFrame(
    {
        SHARD: pd.Series([], dtype="int64"),
        ROW: pd.Series([], dtype="int64"),
        "key": pd.Series([], dtype=object),
        "digest": pd.Series([], dtype=object),
        "error": pd.Series(text_column([])),
        GROUP: pd.Series([], dtype="int64"),
    }
)
_MARK_META = pd.DataFrame(
    {
        SHARD: pd.Series([], dtype="int64"),
        ROW: pd.Series([], dtype="int64"),
        "digest": pd.Series([], dtype=object),
        "error": pd.Series(text_column([])),
        "of": pd.Series([], dtype=object),
    }
)


def _mark_copies(part: pd.DataFrame) -> pd.DataFrame:
    """Within whole hash groups: every row after the first (in shard, row order) is a copy of the first; rows
    without a digest are nobody's copy."""
    part = part.sort_values([SHARD, ROW], kind="stable")
    hashed = part["digest"].notna().to_numpy()
    groups = part[hashed].groupby("digest", sort=False)
    of = np.full(len(part), None, dtype=object)
    copies = groups.cumcount().to_numpy() > 0
    of[np.flatnonzero(hashed)[copies]] = groups["key"].transform("first").to_numpy()[copies]
    return pd.DataFrame({SHARD: part[SHARD].to_numpy(), ROW: part[ROW].to_numpy(),
                         "digest": part["digest"].to_numpy(dtype=object),
                         "error": part["error"].array, "of": of})  # fmt: skip


class ExactDuplicates(Step):
    """Marks every copy of an image but the first (in shard order) and says which sample it duplicates.

    The hashes are computed shard by shard; the first copy of each hash is found with a Dask shuffle on the hash
    (each hash's rows meet in one task on a worker), and the answers are shuffled back to their shards, so nothing
    that grows with the dataset is held by the client or carried by a task.

    Args:
        by: ``bytes`` hashes the stored image bytes (cheap); ``pixels`` hashes the decoded pixels, which also
            catches the same image saved twice with different metadata (EXIF, PNG chunks) or format (PNG, lossless
            WebP) but costs a decode: 8-bit images as RGB (a grayscale or palette copy of an RGB image is the same
            image), with their alpha where it is not opaque everywhere, deeper images (16-bit, 32-bit) as their own
            values, so that no two images whose pixels differ share a hash.
        hash_column: output column with the sha256 hex digest (null when the sample has no readable image).
        duplicate_column: output bool column, true for every copy after the first.
        duplicate_of_column: output column with the id of the first copy (null for firsts and uniques).
        error_column: output column with why a sample could not be hashed (no sample or no image in the tar, or
            with ``by="pixels"`` an image that does not decode); null for hashed samples. Default
            ``<hash_column>_error``. Such a sample is compared with no other (its ``duplicate_column`` is false, as
            a null there would fail a filter's duplicate rule and name the wrong reason); a
            :class:`~imgcurate.filters.SampleFilter` with ``drop_errors`` drops it for this error.

    Example:
        >>> ds = ExactDuplicates()(ds)  # doctest: +SKIP
        >>> ds.to_webdataset("out/", filter_column=...)  # keep ~exact_duplicate
    """

    #: 2: pixels of 16-bit colour PNGs, CMYK and animations hashed whole; a sample's image is its first member in
    #: IMAGE_EXTENSIONS' order
    results_version = 2

    def __init__(
        self,
        by: str = "bytes",
        hash_column: str = "image_sha256",
        duplicate_column: str = "exact_duplicate",
        duplicate_of_column: str = "exact_duplicate_of",
        error_column: str | None = None,
    ):
        if by not in _BY:
            raise ValueError(f"by must be one of {', '.join(_BY)}, got {by!r}")
        self.by = by
        self.hash_column = hash_column
        self.duplicate_column = duplicate_column
        self.duplicate_of_column = duplicate_of_column
        self.error_column = error_column or f"{hash_column}_error"
        names = {"hash_column": hash_column, "duplicate_column": duplicate_column,
                 "duplicate_of_column": duplicate_of_column, "error_column": self.error_column}  # fmt: skip
        for i, (arg, name) in enumerate(names.items()):
            other = next((a for a, n in list(names.items())[:i] if n == name), None)
            if other is not None:
                raise ValueError(f"{other} and {arg} are both {name!r}: give the output columns different names")

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.hash_column: pa.string(), self.duplicate_column: pa.bool_(), self.duplicate_of_column: pa.string(),
                self.error_column: pa.string()}  # fmt: skip

    def summary_columns(self) -> dict[str, str]:
        return {"duplicates:exact": self.duplicate_column, "duplicate_of:exact": self.duplicate_of_column}

    def added(self, dataset: ImageTextPairDataset) -> dd.DataFrame:
        df = dataset.metadata
        io = ShardIO(dataset.id_col, dataset.storage_options)
        groups = group_count(dataset.num_shards)
        hashes = dataset.map_shards(_hash_shard, io, self.by, groups, meta=_HASH_META, frame=df[[dataset.id_col]])
        marked = grouped(hashes, _mark_copies, meta=_MARK_META, groups=groups)
        return per_shard(_columns, marked, self, backend_of(df._meta).name, meta=self.output_meta(df._meta))


def _columns(found: pd.DataFrame, shard: int, step: ExactDuplicates, backend: str) -> Any:
    """The step's columns for one shard's rows (in row order), in the dataset's backend."""
    of = found["of"]
    types = step.output_columns()
    values = {
        step.hash_column: pa.array(found["digest"].tolist(), pa.string(), from_pandas=True),
        step.duplicate_column: pa.array(of.notna().to_numpy(dtype=bool), pa.bool_()),
        step.duplicate_of_column: pa.array(of.tolist(), pa.string(), from_pandas=True),
        step.error_column: pa.array(found["error"].tolist(), pa.string(), from_pandas=True),
    }
    return from_arrow(pa.table(values, schema=pa.schema(list(types.items()))), backend)
