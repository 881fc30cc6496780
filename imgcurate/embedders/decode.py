"""Decoding image bytes to RGB PIL images on the CPU (PIL with libjpeg-turbo), with JPEG draft mode.

Draft mode lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale by dropping DCT coefficients, which is much faster for
large photos but is not an antialiased resize: decoded just above the target size, the model input differs visibly
from a full decode (cosine similarity down to 0.990 on the sample photos, 0.968 on 1600-px photos). So draft
decoding keeps at least :data:`DRAFT_FACTOR` times the target size and the antialiased resize of the transform does
the rest: the model input then stays within cosine similarity 0.9995 (mean absolute difference under 0.01 in
normalised units) of the exact path on the sample photos, 0.999 (0.02) on 1600-px photos, where it decodes 2.6x
faster (``benchmarks/draft.py``, ``benchmarks/RESULTS.md``).

Two ways out (see :mod:`imgcurate.embedders.loaders` for the loaders that use them): :func:`decode_rgb` gives a PIL
image, for an embedder's own ``preprocess`` (timm's transform); :func:`decode_tensor` gives a uint8 tensor, choosing
per image the fastest decoder whose pixels equal PIL's (:data:`TENSOR_DECODERS`): torchvision's ``decode_jpeg`` for
baseline and progressive YCbCr/grayscale JPEGs that draft decoding would leave at full size (the same
libjpeg-turbo arithmetic, bit-identical output, without PIL's chunked reads and copies), PIL for the rest
(draft-decoded JPEGs, CMYK, other formats; ``benchmarks/decode.py`` measures both per format and size).

EXIF orientation: timm's loader (``Image.open(...).convert("RGB")``) ignores it, so by default so do we, on every
decoder; ``exif_transpose=True`` applies it (PIL's ``ImageOps.exif_transpose``, torchvision's
``apply_exif_orientation``, DALI's ``adjust_orientation``).
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

if TYPE_CHECKING:
    import torch

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


def _open(data: bytes, draft_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """The image with its header read (no pixels yet), in draft mode when that applies (see :func:`decode_rgb`),
    and its full size."""
    image = Image.open(io.BytesIO(data))
    full_size = image.size
    if draft_size is not None and image.format == "JPEG":
        side = DRAFT_FACTOR * draft_size
        image.draft("RGB", (side, side))
    return image, full_size


def _finish(image: Image.Image, exif_transpose: bool) -> Image.Image:
    image.load()
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


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
    return _finish(_open(data, draft_size)[0], exif_transpose)


def check_header(data: bytes) -> None:
    """Raises PIL's ``DecompressionBombError`` for an image whose header declares more pixels than PIL decodes (twice
    ``Image.MAX_IMAGE_PIXELS``; a 600-byte JPEG may declare 20000 x 20000), as :func:`decode_rgb` does when it opens
    it. Decoders that allocate from the header themselves (torchvision's ``decode_jpeg``, DALI) call it first, so
    such an image is an error row on every decoder instead of gigabytes of pixels on some. A header PIL cannot read
    is left to the decoder, which may read it (libjpeg takes a JPEG with a ``TEM`` marker that PIL does not
    identify) or reports it itself. About 20 us a JPEG."""
    try:
        Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise
    except Exception:  # PIL raises many types for headers it cannot read
        return


def _torchvision_jpeg(header: Image.Image, data: bytes, full_size: tuple[int, int]) -> torch.Tensor | None:
    """torchvision's libjpeg-turbo decode, for the JPEGs on which it gives PIL's exact pixels; None for the others.

    Taken: YCbCr or grayscale JPEGs that PIL would decode at full size (draft mode left the scale at 1).
    Left to PIL: JPEGs draft decoding shrinks (torchvision has no DCT scaling), CMYK/YCCK (PIL and libjpeg convert
    them to RGB differently).
    """
    if header.size != full_size or header.mode not in ("RGB", "L"):
        return None
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # whatever libjpeg refuses, PIL decodes or reports in its own words
        return None


#: PIL's format name -> a faster decoder that gives PIL's own pixels for the images it takes (returns None for the
#: others, which PIL decodes). Measured per format in ``benchmarks/decode.py``: PNG and WebP stay with PIL, where
#: torchvision's gain was small and noisy, and PNG's palette and 16-bit modes would each need checking against
#: :func:`to_rgb`.
TENSOR_DECODERS: dict[str, Callable[[Image.Image, bytes, tuple[int, int]], torch.Tensor | None]] = {
    "JPEG": _torchvision_jpeg,
}


def decode_tensor(data: bytes, draft_size: int | None = None, exif_transpose: bool = False) -> torch.Tensor:
    """Decodes image bytes to a (3, H, W) uint8 RGB tensor; see :func:`decode_tensor_sized`, which also gives the
    image's full size.

    Example:
        >>> from imgcurate.testing import encode_image
        >>> from PIL import Image
        >>> decode_tensor(encode_image(Image.new("RGB", (64, 48)), "jpg")).shape
        torch.Size([3, 48, 64])
    """
    return decode_tensor_sized(data, draft_size, exif_transpose)[0]


def decode_tensor_sized(
    data: bytes, draft_size: int | None = None, exif_transpose: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decodes image bytes to a (3, H, W) uint8 RGB tensor with the same pixels as :func:`decode_rgb`, choosing the
    decoder per image from the header (format, colour mode, size against ``draft_size``, EXIF orientation).

    Args:
        data: encoded bytes.
        draft_size: as in :func:`decode_rgb`.
        exif_transpose: as in :func:`decode_rgb`; an image whose EXIF asks for a rotation or flip is decoded by PIL
            and transposed by ``ImageOps.exif_transpose``, exactly as :func:`decode_rgb` does it.

    Returns:
        The tensor, and the image's (width, height) before any draft scaling (after the EXIF transposition): what
        :func:`~imgcurate.embedders.loaders.resize_crop` sizes the resize from, so that a drafted image is resized
        to exactly the size the full decode would be.

    Raises:
        Exception: whatever PIL raises for bytes it cannot decode (callers record it per sample).
    """
    import torch

    image, full_size = _open(data, draft_size)
    fast = TENSOR_DECODERS.get(image.format or "")
    if fast is not None and not (exif_transpose and _orientation(image) not in (None, 1)):
        tensor = fast(image, data, full_size)
        if tensor is not None:
            return tensor, _oriented(full_size, tensor)
    pixels = np.array(_finish(image, exif_transpose))
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)  # a (3, H, W) view of HWC memory, as decode_jpeg gives
    return tensor, _oriented(full_size, tensor)


def _oriented(full_size: tuple[int, int], tensor: torch.Tensor) -> tuple[int, int]:
    """``full_size`` turned like the decoded tensor (an EXIF rotation by 90 degrees swaps the sides)."""
    w, h = full_size
    th, tw = tensor.shape[-2:]
    if w != h and th != tw and (w > h) != (tw > th):
        return h, w
    return w, h


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation ``ImageOps.exif_transpose`` would act on (PIL reads it from EXIF, or else XMP)."""
    return image.getexif().get(ExifTags.Base.Orientation)


def needs_turn(data: bytes) -> bool:
    """Whether PIL's ``exif_transpose`` would turn or flip the image (an EXIF or XMP orientation other than 1).
    torchvision's CUDA JPEG decoder ignores the orientation, so its loader hands such an image to PIL. Only images
    whose metadata holds EXIF or the word ``Orientation`` are opened."""
    end = _metadata_end(data)
    if data.find(b"Exif", 0, end) < 0 and data.find(b"Orientation", 0, end) < 0:
        return False
    try:
        return _orientation(Image.open(io.BytesIO(data))) not in (None, 1)
    except Exception:  # noqa: BLE001 - an unreadable header: the decoder names the problem
        return False


def orientation_only_in_xmp(data: bytes) -> bool:
    """Whether PIL's ``exif_transpose`` would turn the image by an orientation its EXIF does not carry (PIL reads XMP's
    ``tiff:Orientation`` when EXIF has none); torchvision's and DALI's decoders read EXIF only, so the loaders hand
    such an image to PIL. Only images whose metadata holds the word ``Orientation`` (XMP is text) are opened; in a
    JPEG only the segments before the image data are searched."""
    if data.find(b"Orientation", 0, _metadata_end(data)) < 0:
        return False
    try:
        image = Image.open(io.BytesIO(data))
        orientation = _orientation(image)
        if orientation in (None, 1):
            return False
        exif = Image.Exif()
        if image.info.get("exif"):
            exif.load(image.info["exif"])
        return exif.get(ExifTags.Base.Orientation) != orientation
    except Exception:  # a header PIL cannot read: the decoders report it
        return False


def _metadata_end(data: bytes) -> int:
    """Where a JPEG's image data begins (its first start-of-scan marker), found by walking its segments; the whole
    length for other formats and for a JPEG whose segments cannot be walked."""
    if not data.startswith(b"\xff\xd8"):
        return len(data)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return len(data)
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan: the metadata segments are all before it
            return pos
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return len(data)


@functools.cache
def warm_up_samples() -> tuple[bytes, ...]:
    """A tiny image in each common format (JPEG, PNG, WebP, and BMP or TIFF: the last two make PIL load its
    plugins for every format), for the loaders' ``warm_up``."""
    image = Image.new("RGB", (32, 24), (90, 120, 150))
    out = []
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        buf = io.BytesIO()
        try:
            image.save(buf, fmt)
        except (KeyError, OSError):  # a Pillow built without that format
            continue
        out.append(buf.getvalue())
    return tuple(out)
