"""Decoding image bytes to RGB PIL images on the CPU (PIL with libjpeg-turbo), with JPEG draft mode.

Draft mode lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients, which is much faster for
large photos but is not an antialiased resize: decoded just above the target size, the model input differs visibly
from a full decode (cosine similarity down to 0.990 on the sample photos, 0.968 on 1600-px photos). So draft
decoding keeps at least :data:`DRAFT_FACTOR` times the target size and the antialiased resize of the transform does
the rest: the model input then stays within cosine similarity 0.9995 (mean absolute difference under 0.01 in
normalised units) of the exact path on the sample photos, 0.999 (0.02) on 1600-px photos, where it decodes 2.6x
faster (``benchmarks/draft.py``, ``benchmarks/RESULTS.md``).

EXIF orientation: timm's loader (``Image.open(...).convert("RGB")``) ignores it, so by default so do we, on every
decoder; ``exif_transpose=True`` applies it (PIL's ``ImageOps.exif_transpose``, torchvision's
``apply_exif_orientation``, DALI's ``adjust_orientation``).
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps

#: JPEG draft decoding keeps the decoded image's sides at least this many times the size the model input is resized
#: to, so that the antialiased resize after it sees enough pixels.
DRAFT_FACTOR = 2


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def error_text(err: BaseException) -> str:
    """``"<type>: <message>"`` without the values that change from run to run (object addresses, as in PIL's
    ``cannot identify image file <_io.BytesIO object at 0x7f...>``), so error rows are reproducible."""
    message = _OBJECT_REPR.sub(
        lambda m: "(image bytes)" if m.group(1).endswith("BytesIO") else f"<{m.group(1)}>", str(err)
    )
    return f"{type(err).__name__}: {_ADDRESS.sub('0x…', message)}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale, palette, CMYK, alpha (dropped, as timm does) and 16/32-bit (scaled to 8)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_rgb(data: bytes, draft_size: int | None = None, exif_transpose: bool = False) -> Image.Image:
    """Decodes image bytes to an RGB image.

    Args:
        data: encoded bytes (JPEG, PNG, WebP, BMP, TIFF, ...).
        draft_size: the size the image is then resized to (its shorter side). For JPEGs, libjpeg may decode at 1/2,
            1/4 or 1/8 scale as long as both sides stay at least :data:`DRAFT_FACTOR` times this (much faster for
            big photos when the model needs only ~224 px). None decodes at full size.
        exif_transpose: rotate/flip the image as its EXIF orientation says (timm's loader does not).

    Raises:
        Exception: whatever PIL raises for bytes it cannot decode (callers record it per sample).
    """
    image = Image.open(io.BytesIO(data))
    if draft_size is not None and image.format == "JPEG":
        side = DRAFT_FACTOR * draft_size
        image.draft("RGB", (side, side))
    image.load()
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)
