"""Decoding fidelity: EXIF orientation on every decoder, and JPEG draft decoding against timm's exact path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from conftest import write_tar
from PIL import Image

from imgcurate.embedders import TimmImageEmbedder
from imgcurate.embedders.decode import DRAFT_FACTOR, decode_rgb
from imgcurate.testing import sample_records

ROTATE_90_CW = 6  # EXIF Orientation: the stored pixels must be turned 90 degrees clockwise to display


def _quadrants(width=96, height=64) -> Image.Image:
    """An image whose every rotation and flip looks different: four coloured quadrants."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2] = (230, 20, 20)
    a[: height // 2, width // 2 :] = (20, 220, 20)
    a[height // 2 :, : width // 2] = (20, 20, 230)
    a[height // 2 :, width // 2 :] = (240, 240, 240)
    return Image.fromarray(a)


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _rows(loader, tar, keys):
    out = {}
    for batch in loader.batches(tar, keys, None):
        assert not batch.errors
        out.update({row: image.float() for row, image in zip(batch.rows, batch.images, strict=True)})
    return [out[i] for i in range(len(keys))]


@pytest.mark.parametrize("decoder", ["pil", "torchvision", "dali"])
def test_exif_orientation_is_applied_only_when_asked_and_alike_on_every_decoder(tmp_path, decoder):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    stored = _quadrants()
    rotated = _jpeg(stored, ROTATE_90_CW)
    upright = _jpeg(stored.transpose(Image.Transpose.ROTATE_270))  # what a viewer shows for the rotated one
    assert decode_rgb(rotated, exif_transpose=True).size == (64, 96)
    write_tar(tmp_path / "00000.tar", [("rot.jpg", rotated), ("up.jpg", upright), ("raw.jpg", _jpeg(stored))])
    tar, keys = str(tmp_path / "00000.tar"), ["rot", "up", "raw"]
    for exif in (True, False):
        emb = TimmImageEmbedder("test_vit", batch_size=3, decoder=decoder, device="cpu", exif_transpose=exif)
        rot, up, raw = _rows(emb.loader("cpu"), tar, keys)
        same, other = (up, raw) if exif else (raw, up)
        assert (rot - same).abs().mean().item() < 0.02, (decoder, exif)
        assert (rot - other).abs().mean().item() > 0.3, (decoder, exif)


def _sample_jpegs() -> list[tuple[str, bytes]]:
    return [
        (f"{r.fields['source']}/{r.fields['variant']}", r.members["jpg"])
        for r in sample_records()
        if "jpg" in r.members
    ]


@pytest.mark.parametrize("name", ["test_resnet", "vit_base_patch32_clip_224.openai"])
def test_draft_decoding_keeps_the_model_input_close_to_timms_exact_path(name):
    """Stated tolerance: cosine similarity >= 0.9995 and mean absolute difference <= 0.01 (normalised units) of the
    model input, on every JPEG of the sample photos; draft mode must actually be used on some of them."""
    emb = TimmImageEmbedder(name, device="cpu")
    transform = timm.data.create_transform(**emb.data_config, is_training=False)
    drafted = 0
    for label, data in _sample_jpegs():
        exact = transform(Image.open(io.BytesIO(data)).convert("RGB"))
        image = decode_rgb(data, emb.draft_size())
        drafted += image.size != Image.open(io.BytesIO(data)).size
        assert min(image.size) >= min(DRAFT_FACTOR * emb.draft_size(), *Image.open(io.BytesIO(data)).size)
        got = transform(image)
        cosine = torch.nn.functional.cosine_similarity(exact.flatten(), got.flatten(), dim=0).item()
        assert cosine >= 0.9995, (label, cosine)
        assert (exact - got).abs().mean().item() <= 0.01, label
    assert drafted >= (2 if name == "test_resnet" else 1)  # retina and hubble_deep_field are large enough


def test_draft_decoding_before_the_fix_was_outside_the_tolerance():
    """The tolerance is not vacuous: drafting down to just above the target (the old rule) breaks it."""
    emb = TimmImageEmbedder("test_resnet", device="cpu")
    transform = timm.data.create_transform(**emb.data_config, is_training=False)
    worst = 1.0
    for _, data in _sample_jpegs():
        exact = transform(Image.open(io.BytesIO(data)).convert("RGB"))
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (emb.draft_size(), emb.draft_size()))
        got = transform(image.convert("RGB"))
        worst = min(worst, torch.nn.functional.cosine_similarity(exact.flatten(), got.flatten(), dim=0).item())
    assert worst < 0.9995
