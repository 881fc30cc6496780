"""The image loaders (PIL, torchvision tensor decoding, DALI) on real shards, run on the CPU.

The GPU decoders run here with ``device="cpu"``: torchvision's decode_jpeg and DALI's CPU pipeline
(``device_id=None``) execute the same code as on CUDA, only the device string differs.
"""

from __future__ import annotations

import subprocess
import warnings

import dask
import numpy as np
import pytest
from conftest import seeded_checkpoint, write_tar

from imgcurate import ImageTextPairDataset
from imgcurate.embedders import TimmImageEmbedder
from imgcurate.embedders.loaders import choose_decoder
from imgcurate.errors import AlignmentError, ShardError
from imgcurate.io.tar import iter_samples, read_keys

dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")


def _rows(loader, tar, keys):
    """{row: tensor} and {row: error} from a loader over one shard; each row must come back exactly once."""
    images, errors = {}, {}
    for batch in loader.batches(tar, keys, None):
        assert not set(batch.rows) & set(batch.errors)
        for row, image in zip(batch.rows, batch.images if batch.rows else [], strict=True):
            assert row not in images and row not in errors
            images[row] = image.float()
        for row, error in batch.errors.items():
            assert row not in images and row not in errors
            errors[row] = error
    assert sorted([*images, *errors]) == list(range(len(keys)))
    return images, errors


@pytest.mark.parametrize("decoder", ["torchvision", "dali"])
def test_tensor_decoders_match_the_pil_path(sample_dir, decoder):
    emb = TimmImageEmbedder("test_vit", batch_size=4, decoder=decoder, device="cpu")
    tar = str(sample_dir / "00001.tar")
    keys = read_keys(tar)
    reference, none = _rows(_pil(emb), tar, keys)
    assert not none
    got, errors = _rows(emb.loader("cpu"), tar, keys)
    assert not errors
    assert _rows(emb.loader("cpu"), tar, []) == ({}, {})  # a shard whose rows were all filtered out
    size = emb.data_config["input_size"]
    for row in range(len(keys)):
        assert got[row].shape == reference[row].shape == size
        diff = (got[row] - reference[row]).abs().mean().item()
        # same sizes and crop window as timm's transform; only the resampling kernels differ, slightly
        assert diff < 0.01, (keys[row], diff)
        other = reference[(row + 1) % len(keys)]
        assert (got[row] - other).abs().mean().item() > 5 * diff


def _pil(emb):
    from imgcurate.embedders.loaders import make_loader

    return make_loader("pil", preprocess=emb.preprocess, batch_size=4, num_threads=2, draft_size=None)


@pytest.mark.parametrize("decoder", ["torchvision", "dali"])
def test_bad_images_fail_only_their_own_rows(tmp_path, sample_dir, decoder):
    jpeg = next(s.image for s in iter_samples(str(sample_dir / "00000.tar")) if s.image_ext == "jpg")
    members = [("a.jpg", jpeg), ("b.jpg", jpeg[: len(jpeg) // 3]), ("c.png", b"\x89PNG not really")]
    members += [("d.txt", b"no image"), ("e.jpg", jpeg), ("f.jpg", jpeg)]
    write_tar(tmp_path / "00000.tar", members)
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path))
    emb = TimmImageEmbedder("test_vit", batch_size=2, decoder=decoder, device="cpu")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        df = emb(ds).metadata.compute().set_index("key")
    assert df["image_embedding"].notna().tolist() == [True, False, False, False, True, True]
    assert "cannot decode image" in df.loc["b", "image_embedding_error"]
    assert "cannot decode image" in df.loc["c", "image_embedding_error"]
    assert df.loc["d", "image_embedding_error"] == "sample has no image member (jpg, jpeg, png, webp, bmp, tif or tiff)"
    np.testing.assert_allclose(df.loc["a", "image_embedding"], df.loc["f", "image_embedding"], atol=1e-5)


def test_dali_falls_back_for_the_rest_of_a_shard_and_says_so(tmp_path, sample_dir):
    jpeg = next(s.image for s in iter_samples(str(sample_dir / "00000.tar")) if s.image_ext == "jpg")
    # cut in its scan data: the header reads, so the image reaches DALI (a bad header is an error row before it)
    write_tar(tmp_path / "00000.tar", [(f"{i}.jpg", jpeg if i != 5 else jpeg[: len(jpeg) // 2]) for i in range(8)])
    emb = TimmImageEmbedder("test_vit", batch_size=2, decoder="dali", device="cpu")
    with pytest.warns(UserWarning, match=r"00000\.tar: DALI failed.*remaining .* samples with TorchvisionLoader"):
        images, errors = _rows(emb.loader("cpu"), str(tmp_path / "00000.tar"), [str(i) for i in range(8)])
    assert list(errors) == [5] and sorted(images) == [0, 1, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("decoder", ["torchvision", "dali"])
def test_row_filtered_metadata_and_broken_alignment(sample_ds, decoder):
    df = sample_ds.metadata
    small = sample_ds.with_metadata(df[df.width < 450])
    emb = TimmImageEmbedder("test_vit", decoder=decoder, device="cpu")
    out = emb(small).metadata.compute()
    full = emb(sample_ds).metadata.compute().set_index("key")
    assert out["key"].tolist() == df[df.width < 450]["key"].compute().tolist()
    np.testing.assert_allclose(
        np.stack(out["image_embedding"]), np.stack(full.loc[out["key"], "image_embedding"]), atol=1e-5
    )
    flipped = sample_ds.with_metadata(df.map_partitions(lambda p: p.iloc[::-1], meta=df._meta))
    with pytest.raises(AlignmentError, match=r"0000\d\.tar: .*no longer describes"):
        emb(flipped).metadata.compute()


@pytest.mark.parametrize("indexer", ["imgcurate", "wds2idx"])
def test_dali_reads_through_index_files(sample_ds, sample_dir, indexer):
    from imgcurate.cli import main

    emb = TimmImageEmbedder("test_vit", decoder="dali", device="cpu", use_index_files=True)
    with pytest.raises(ShardError, match=r"0000\d\.idx: DALI index file not found .*imgcurate index .*wds2idx"):
        emb(sample_ds).metadata.compute()
    if indexer == "imgcurate":
        assert main(["index", str(sample_dir)]) == 0
    for tar in sorted(sample_dir.glob("*.tar")):
        if indexer == "wds2idx":
            subprocess.run(["wds2idx", str(tar), str(tar.with_suffix(".idx"))], check=True, capture_output=True)
        assert tar.with_suffix(".idx").exists()
    indexed = emb(sample_ds).metadata.compute()
    scanned = TimmImageEmbedder("test_vit", decoder="dali", device="cpu")(sample_ds).metadata.compute()
    np.testing.assert_allclose(np.stack(indexed["image_embedding"]), np.stack(scanned["image_embedding"]), atol=1e-6)


def test_decoder_choice():
    assert choose_decoder("auto", "cpu", True, "bicubic") == choose_decoder("auto", "cpu", True, "bilinear") == "cpu"
    assert choose_decoder("auto", "cpu", True, "nearest") == "pil"  # torch's nearest picks other pixels than PIL's
    assert choose_decoder("auto", "cpu", False) == "pil"  # no ResizeCrop: the embedder's own preprocess
    assert choose_decoder("auto", "cuda", True) == "dali"  # DALI is installed in this test run
    assert choose_decoder("auto", "cuda", False) == "pil"
    with pytest.raises(ValueError, match="decoder must be auto or one of pil, cpu, torchvision, dali"):
        choose_decoder("nvjpeg", "cpu", True)
    with pytest.raises(ValueError, match="needs the preprocessing as a ResizeCrop"):
        choose_decoder("torchvision", "cpu", False)


@pytest.mark.gpu("nvidia.dali")
def test_gpu_decoders_on_cuda(sample_ds, tmp_path):
    weights = seeded_checkpoint(tmp_path, "test_vit")  # the same model on both devices
    cpu = TimmImageEmbedder("test_vit", checkpoint_path=weights, device="cpu")(sample_ds).metadata.compute()
    for decoder in ("torchvision", "dali"):
        step = TimmImageEmbedder("test_vit", checkpoint_path=weights, device="cuda", decoder=decoder)
        gpu = step(sample_ds).metadata.compute()
        cos = (np.stack(gpu["image_embedding"]) * np.stack(cpu["image_embedding"])).sum(axis=1)
        assert cos.min() > 0.99, decoder


def test_dali_reads_long_member_names_through_our_index(tmp_path):
    """Keys past tar's 100-character names: the index must point past the long-name headers, or DALI fails."""
    import pyarrow as pa

    from imgcurate.io.shards import ShardWriter
    from imgcurate.testing import sample_records

    photos = [r for r in sample_records() if r.fields["variant"] == "original" and "jpg" in r.members][:6]
    keys = [f"{'x' * 120}/{i:03d}" for i in range(len(photos))]
    dst = tmp_path / "long"
    dst.mkdir()
    with ShardWriter(str(dst / "00000.tar"), index=True) as writer:
        for key, photo in zip(keys, photos, strict=True):
            writer.write(key, photo.members)
        writer.set_metadata(pa.table({"key": keys}))
    ds = ImageTextPairDataset.from_webdataset(str(dst))
    pil = TimmImageEmbedder("test_vit", decoder="pil", device="cpu")(ds).metadata.compute()
    via_index = TimmImageEmbedder("test_vit", decoder="dali", device="cpu", use_index_files=True)(ds)
    with dask.config.set(scheduler="sync"), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*DALI failed")  # no fallback: DALI itself read every sample
        got = via_index.metadata.compute()
    assert got["image_embedding_error"].isna().all()
    cos = (np.stack(got["image_embedding"]) * np.stack(pil["image_embedding"])).sum(axis=1)
    assert cos.min() > 0.99


def test_a_decompression_bomb_is_the_same_error_row_on_every_decoder(tmp_path, sample_dir):
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    bomb = bytearray(buf.getvalue())
    struct.pack_into(">HH", bomb, bomb.find(b"\xff\xc0") + 5, 30000, 30000)  # the header declares 30000 x 30000
    write_tar(tmp_path / "00000.tar", [("a.jpg", buf.getvalue()), ("b.jpg", bytes(bomb))])
    tar = str(tmp_path / "00000.tar")
    texts = set()
    for decoder in ("pil", "cpu", "torchvision", "dali"):
        emb = TimmImageEmbedder("test_vit", batch_size=2, decoder=decoder, device="cpu")
        images, errors = _rows(emb.loader("cpu"), tar, ["a", "b"])
        assert list(images) == [0] and list(errors) == [1], decoder
        texts.add(errors[1])
    assert len(texts) == 1 and texts.pop().startswith("cannot decode image: "), texts
