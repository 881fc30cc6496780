"""Small real shards for tests, notebooks and the README's first command.

The photos are the sample images that scikit-image ships inside its package (no download). Each is stored once in
an assigned format (JPEG, PNG, WebP, BMP, TIFF; RGB, grayscale and RGBA), and a few are stored again as
near-duplicates (re-encoded at low JPEG quality, resized to half size) or as exact byte copies, so that the dedup
steps have something to find. Every sample's json records its ``source`` photo and its ``variant``; samples that
share a ``source`` are copies of one photo.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass

from PIL import Image

from imgcurate.io.make import Record, write_shards

__all__ = ["SAMPLE_PHOTOS", "make_sample_shards", "sample_records", "encode_image"]


@dataclass(frozen=True)
class _Photo:
    file: str
    caption: str
    fmt: str  # the format the original is stored in


SAMPLE_PHOTOS: tuple[_Photo, ...] = (
    _Photo("astronaut.png", "portrait of an astronaut in a spacesuit in front of a flag", "jpg"),
    _Photo("chelsea.png", "a tabby cat looking to the side", "jpg"),
    _Photo("coffee.png", "a cup of coffee on a saucer seen from above", "jpg"),
    _Photo("rocket.jpg", "a rocket standing on its launch pad", "jpg"),
    _Photo("retina.jpg", "a fundus photograph of a human retina", "jpg"),
    _Photo("hubble_deep_field.jpg", "the hubble deep field, thousands of distant galaxies", "jpg"),
    _Photo("motorcycle_left.png", "a red motorcycle parked in a garage", "png"),
    _Photo("ihc.png", "tissue stained for immunohistochemistry under a microscope", "webp"),
    _Photo("logo.png", "the scikit-image logo on a transparent background", "png"),
    _Photo("horse.png", "the silhouette of a horse", "png"),
    _Photo("camera.png", "a photographer standing behind a camera on a tripod", "jpg"),
    _Photo("moon.png", "craters on the surface of the moon", "bmp"),
    _Photo("coins.png", "ancient greek coins on a dark background", "jpg"),
    _Photo("page.png", "a scanned page of printed text", "png"),
    _Photo("brick.png", "a brick wall", "jpg"),
    _Photo("grass.png", "a close-up of grass", "tiff"),
    _Photo("gravel.png", "a close-up of gravel", "jpg"),
    _Photo("cell.png", "a cell seen under a microscope", "jpg"),
    _Photo("clock_motion.png", "a wall clock blurred by motion", "webp"),
    _Photo("chessboard_RGB.png", "a black and white chessboard pattern", "png"),
    _Photo("color.png", "a chart of colour gradients", "jpg"),
    _Photo("phantom.png", "the shepp-logan phantom used in tomography", "png"),
)

#: The photos that also get near-duplicate copies, and those stored twice with identical bytes.
_NEAR_DUPLICATED = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")
_EXACT_COPIES = ("chelsea.png", "hubble_deep_field.jpg")

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}


def encode_image(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """Encodes a PIL image as ``fmt`` (jpg, png, webp, bmp, tiff), converting modes that the format cannot hold."""
    if fmt == "jpg" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("jpg", "webp") else {}
    image.save(buf, format=_PIL_FORMAT[fmt], **kwargs)
    return buf.getvalue()


def _photo_dir() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def sample_records(seed: int = 0) -> list[Record]:
    """The sample's records (originals, near-duplicates and exact copies), shuffled with ``seed``."""
    records: list[Record] = []
    for photo in SAMPLE_PHOTOS:
        with Image.open(os.path.join(_photo_dir(), photo.file)) as img:
            img.load()
        name = photo.file.rpartition(".")[0]
        original = encode_image(img, photo.fmt)

        def record(data: bytes, fmt: str, variant: str, name: str = name, caption: str = photo.caption) -> Record:
            return Record({fmt: data}, {"source": name, "variant": variant}, caption)

        records.append(record(original, photo.fmt, "original"))
        if photo.file in _NEAR_DUPLICATED:
            records.append(record(encode_image(img, "jpg", quality=35), "jpg", "reencoded"))
            half = img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)
            records.append(record(encode_image(half, "jpg", quality=85), "jpg", "resized"))
        if photo.file in _EXACT_COPIES:
            records.append(record(original, photo.fmt, "exact_copy"))
    random.Random(seed).shuffle(records)
    return records


def make_sample_shards(out: str, samples_per_shard: int = 10, seed: int = 0, overwrite: bool = False) -> list[str]:
    """Writes the bundled sample as shards into ``out`` (4 shards of 10 samples by default); ``overwrite`` replaces
    shards already there (otherwise they are an error).

    Example:
        >>> from imgcurate import ImageTextPairDataset
        >>> from imgcurate.testing import make_sample_shards
        >>> paths = make_sample_shards("/tmp/imgcurate-sample")  # doctest: +SKIP
        >>> ImageTextPairDataset.from_webdataset("/tmp/imgcurate-sample").metadata.compute()  # doctest: +SKIP
    """
    records = sample_records(seed)
    return write_shards(records, out, samples_per_shard=samples_per_shard, total=len(records), overwrite=overwrite)
