"""Decoding image bytes to RGB PIL images on the CPU (PIL with libjpeg-turbo), with JPEG draft mode."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decodes image bytes to an RGB image.

    Args:
        data: encoded bytes (JPEG, PNG, WebP, BMP, TIFF, ...).
        draft_size: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as both sides stay at least this
            large (much faster for big photos when the model needs only ~224 px). None decodes at full size.

    Raises:
        Exception: whatever PIL raises for bytes it cannot decode (callers record it per sample).
    """
    image = Image.open(io.BytesIO(data))
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return to_rgb(image)
