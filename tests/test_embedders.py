from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from conftest import write_tar
from PIL import Image

from imgcurate import AlignmentError, ImageTextPairDataset
from imgcurate._models import clear
from imgcurate.embedders import TimmImageEmbedder
from imgcurate.embedders.decode import decode_rgb, to_rgb
from imgcurate.io import iter_samples


@pytest.fixture(autouse=True)
def _fresh_models():
    clear()
    yield
    clear()


def _checkpoint(tmp_path, name, fmt="safetensors", with_head=True, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    state = model.state_dict()
    if not with_head:
        head = {n for n, _ in model.get_classifier().named_parameters(prefix="head")}
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}
        assert head
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return model, str(path)


def _images(ds):
    out = {}
    for tar in ds.tar_files:
        for s in iter_samples(tar):
            out[s.key] = s.image
    return out


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("decoder", ["pil", "auto"])
def test_equals_timm_reference_path(sample_ds, tmp_path, name, decoder):
    """``pil`` is timm's own path, to float rounding. ``auto`` on the CPU (the ``cpu`` decoder: the same pixels,
    torch's port of Pillow's resize) stays within cosine 0.99999 of it on every image of the sample."""
    model, ckpt = _checkpoint(tmp_path, name)
    emb = TimmImageEmbedder(
        name,
        checkpoint_path=ckpt,
        normalize_embeddings=False,
        use_jpeg_draft=False,
        batch_size=5,
        engine="torch",
        decoder=decoder,
    )
    assert type(emb.loader("cpu")).__name__ == ("PilLoader" if decoder == "pil" else "CpuLoader")
    df = emb(sample_ds).metadata.compute()
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    images = _images(sample_ds)
    for key, got in zip(df["key"], df["image_embedding"], strict=True):
        x = transform(Image.open(io.BytesIO(images[key])).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            want = model.forward_head(model.forward_features(x), pre_logits=True)[0].numpy()
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == want.shape
        if decoder == "pil":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:
            cosine = float(np.dot(got, want) / np.linalg.norm(got) / np.linalg.norm(want))
            assert cosine >= 0.99999, (key, cosine)
            np.testing.assert_allclose(got, want, atol=2e-3)


def test_a_model_built_for_another_image_size_gets_images_of_that_size(sample_ds, tmp_path):
    """``model_kwargs={"img_size": ...}`` builds the model for that input size; the preprocessing must resize to it
    too (timm's pretrained config still says 160 for test_vit, which a ViT built for 96 refuses or, with dynamic
    sizes, embeds at the wrong scale)."""
    model, ckpt = _checkpoint(tmp_path, "test_vit", img_size=96)
    emb = TimmImageEmbedder("test_vit", checkpoint_path=ckpt, model_kwargs={"img_size": 96}, normalize_embeddings=False,
                            decoder="pil", use_jpeg_draft=False, engine="torch")  # fmt: skip
    assert emb.data_config["input_size"] == (3, 96, 96)
    df = emb(sample_ds).metadata.compute()
    config = timm.data.resolve_model_data_config(model, args={"input_size": (3, 96, 96)})
    transform = timm.data.create_transform(**config, is_training=False)
    images = _images(sample_ds)
    for key, got in zip(df["key"][:6], df["image_embedding"][:6], strict=True):
        x = transform(Image.open(io.BytesIO(images[key])).convert("RGB")).unsqueeze(0)
        assert x.shape[-2:] == (96, 96)
        with torch.no_grad():
            want = model.forward_head(model.forward_features(x), pre_logits=True)[0].numpy()
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=1e-4, atol=1e-4)
    strict = TimmImageEmbedder("vit_tiny_patch16_224", model_kwargs={"img_size": (64, 96)}, device="cpu")
    assert strict.data_config["input_size"] == (3, 64, 96) and strict.embedding_dim() == 192


def test_normalised_and_independent_of_batch_size(sample_ds):
    a = TimmImageEmbedder("test_vit", batch_size=1)(sample_ds).metadata.compute()
    b = TimmImageEmbedder("test_vit", batch_size=16, num_threads_per_worker=1)(sample_ds).metadata.compute()
    norms = np.linalg.norm(np.stack(a["image_embedding"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    np.testing.assert_allclose(np.stack(a["image_embedding"]), np.stack(b["image_embedding"]), atol=1e-5)
    assert a["key"].tolist() == b["key"].tolist() == sample_ds.metadata["key"].compute().tolist()


def test_independent_of_the_number_of_workers(sample_ds, tmp_path):
    _, ckpt = _checkpoint(tmp_path, "test_resnet")
    step = TimmImageEmbedder("test_resnet", checkpoint_path=ckpt, batch_size=4)
    import dask

    with dask.config.set(scheduler="sync"):
        one = step(sample_ds).metadata.compute()
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster):
            two = step(sample_ds).metadata.compute()
    assert one["key"].tolist() == two["key"].tolist()
    np.testing.assert_allclose(np.stack(one["image_embedding"]), np.stack(two["image_embedding"]), atol=1e-5)


def test_corrupt_image_gives_a_null_embedding_and_an_error(tmp_path, sample_dir):
    good = (sample_dir / "00000.tar").read_bytes()  # any real jpeg from the sample
    jpeg = next(s.image for s in iter_samples(str(sample_dir / "00000.tar")) if s.image_ext == "jpg")
    assert good
    write_tar(
        tmp_path / "00000.tar",
        [
            ("a.jpg", jpeg),
            ("b.jpg", jpeg[: len(jpeg) // 3]),
            ("c.png", b"\x89PNG not really"),
            ("d.txt", b"no image"),
            ("e.jpg", jpeg),
        ],
    )
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path))
    df = TimmImageEmbedder("test_vit", batch_size=2)(ds).metadata.compute().set_index("key")
    assert df["image_embedding"].notna().tolist() == [True, False, False, False, True]
    assert "cannot decode image" in df.loc["b", "image_embedding_error"]
    assert "cannot decode image" in df.loc["c", "image_embedding_error"]
    assert df.loc["d", "image_embedding_error"] == "sample has no image member (jpg, jpeg, png, webp, bmp, tif or tiff)"
    np.testing.assert_allclose(df.loc["a", "image_embedding"], df.loc["e", "image_embedding"], atol=1e-6)


def test_row_filtered_metadata_and_broken_alignment(sample_ds):
    df = sample_ds.metadata
    small = sample_ds.with_metadata(df[df.width < 450])
    out = TimmImageEmbedder("test_vit")(small).metadata.compute()
    assert out["key"].tolist() == df[df.width < 450]["key"].compute().tolist()
    assert out["image_embedding"].notna().all()
    flipped = sample_ds.with_metadata(df.map_partitions(lambda p: p.iloc[::-1], meta=df._meta))
    with pytest.raises(AlignmentError, match=r"0000\d\.tar: .*no longer describes"):
        TimmImageEmbedder("test_vit")(flipped).metadata.compute()


def test_embeddings_survive_export(sample_ds, tmp_path):
    ds = TimmImageEmbedder("test_vit")(sample_ds)
    expected = ds.metadata.compute()
    out = ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=16, old_id_col="old")
    table = pq.read_table(out.tar_files[0][:-4] + ".parquet")
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32(), 64)
    got = out.metadata.compute()
    assert got["old"].tolist() == expected["key"].tolist()
    np.testing.assert_array_equal(np.stack(got["image_embedding"]), np.stack(expected["image_embedding"]))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("with_head", [True, False])
def test_checkpoint_formats_with_and_without_head(sample_ds, tmp_path, fmt, with_head):
    model, ckpt = _checkpoint(tmp_path, "test_resnet", fmt=fmt, with_head=with_head)
    emb = TimmImageEmbedder("test_resnet", checkpoint_path=ckpt, normalize_embeddings=False, engine="torch")
    loaded = emb.model("cpu")
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(loaded(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_checkpoint_missing_body_weights_is_an_error(tmp_path):
    _, ckpt = _checkpoint(tmp_path, "test_vit")
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt)
    state.pop("patch_embed.proj.weight")
    save_file(state, ckpt)
    with pytest.raises(ValueError, match="missing weights.*patch_embed.proj.weight"):
        TimmImageEmbedder("test_vit", checkpoint_path=ckpt).model("cpu")


def test_pretrained_from_the_hf_cache_offline(tmp_path, monkeypatch):
    torch.manual_seed(1)
    source = timm.create_model("test_vit").eval()
    repo = source.pretrained_cfg["hf_hub_id"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="not in the Hugging Face cache.*checkpoint_path"):
        TimmImageEmbedder("test_vit", pretrained=True).model("cpu")
    # the step's resource check (a pipeline runs it before any work) finds it too, without building the model
    from imgcurate.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="not available offline.*checkpoint_path"):
        TimmImageEmbedder("test_vit", pretrained=True).check_resources()
    TimmImageEmbedder("test_vit", pretrained="if-available").check_resources()  # falls back: no error
    # lay the weights out as the hub cache does: refs/main -> snapshots/<commit>/model.safetensors
    from safetensors.torch import save_file

    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    # an open_clip checkpoint in the same repository (as ClipEmbedder's OpenAI tags cache) is a file timm never reads
    save_file(source.state_dict(), str(folder / "snapshots" / commit / "open_clip_model.safetensors"))
    with pytest.raises(MissingWeightsError, match="not available offline.*checkpoint_path"):
        TimmImageEmbedder("test_vit", pretrained=True).check_resources()
    with pytest.warns(UserWarning, match="random"):
        TimmImageEmbedder("test_vit", pretrained="if-available", engine="torch").model("cpu")  # falls back
    save_file(source.state_dict(), str(folder / "snapshots" / commit / "model.safetensors"))
    clear()
    TimmImageEmbedder("test_vit", pretrained=True).check_resources()  # found in the cache now
    loaded = TimmImageEmbedder("test_vit", pretrained=True, output="head", engine="torch").model("cpu")
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), source(x).numpy(), rtol=1e-5, atol=1e-5)


def test_clip_towers_give_the_projected_embedding():
    emb = TimmImageEmbedder("vit_base_patch32_clip_224.openai", device="cpu", engine="torch")  # heads, not engines
    assert emb.output == "head"
    with torch.no_grad():
        out = emb.model("cpu")(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 512)
    assert TimmImageEmbedder("test_resnet").output == "pre_logits"
    # untagged, timm resolves this name to an ImageNet fine-tune whose head is a 1000-class classifier
    tuned = TimmImageEmbedder("vit_base_patch32_clip_224", device="cpu", engine="torch")
    assert tuned.output == "pre_logits"
    with torch.no_grad():
        assert tuned.model("cpu")(torch.randn(1, 3, 224, 224)).shape == (1, 768)
    with pytest.raises(ValueError, match="unknown timm model"):
        TimmImageEmbedder("no_such_model_xyz")


def test_every_mode_becomes_rgb():
    for mode in ("L", "RGBA", "CMYK", "P", "I;16", "LA", "1"):
        img = Image.new(mode, (8, 6))
        assert to_rgb(img).mode == "RGB", mode
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen)).min() == 255


def test_jpeg_draft_decodes_big_photos_smaller_but_embeds_alike(sample_ds):
    images = _images(sample_ds)
    meta = sample_ds.metadata.compute()
    big = meta[(meta.width >= 1000)]["key"].tolist()
    data = images[big[0]]
    assert decode_rgb(data, draft_size=200).size[0] < decode_rgb(data).size[0]
    fast = TimmImageEmbedder("test_vit", use_jpeg_draft=True)(sample_ds).metadata.compute().set_index("key")
    full = TimmImageEmbedder("test_vit", use_jpeg_draft=False)(sample_ds).metadata.compute().set_index("key")
    for key in big:
        cos = float(np.dot(fast.loc[key, "image_embedding"], full.loc[key, "image_embedding"]))
        assert cos > 0.99, key


def test_random_weights_are_the_same_in_every_process_and_leave_the_callers_seed_alone():
    """Without pretrained weights each Dask worker builds its own model: seeded, they are all the same model."""
    torch.manual_seed(123)
    first = TimmImageEmbedder("test_vit").model("cpu")
    after_first = torch.rand(3)
    clear()  # as a new worker process would: nothing cached
    torch.manual_seed(123)
    torch.rand(7)  # whatever the process drew before
    second = TimmImageEmbedder("test_vit").model("cpu")
    assert first is not second
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    torch.manual_seed(123)
    TimmImageEmbedder("test_resnet").model("cpu")
    assert torch.equal(torch.rand(3), after_first)  # building a model drew nothing from the caller's generator


@pytest.mark.parametrize("output", ["pre_logits", "head"])
def test_checkpoint_of_a_fine_tuned_model_with_another_head_size(tmp_path, output):
    model, ckpt = _checkpoint(tmp_path, "test_resnet", num_classes=10)  # a fine-tuned model's head: 10 classes
    emb = TimmImageEmbedder("test_resnet", checkpoint_path=ckpt, output=output, normalize_embeddings=False)
    emb.check_resources()
    assert emb.embedding_dim() == (10 if output == "head" else 96)  # the head's size follows the file
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        want = model(x) if output == "head" else model.forward_head(model.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(emb.load_model("cpu")(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_damaged_or_mismatched_checkpoints_are_errors_naming_the_file_before_any_work(tmp_path):
    from safetensors.torch import load_file, save_file

    from imgcurate.errors import WeightFileError

    _, ckpt = _checkpoint(tmp_path, "test_resnet")
    data = open(ckpt, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    emb = TimmImageEmbedder("test_resnet", checkpoint_path=str(truncated))
    with pytest.raises(WeightFileError, match=f"^{truncated}: a truncated safetensors file"):
        emb.check_resources()
    with pytest.raises(WeightFileError, match=f"^{truncated}: a truncated safetensors file"):
        emb.load_model("cpu")
    state = load_file(ckpt)
    state["conv1.0.weight"] = torch.zeros(4, 3, 3, 3)
    other = tmp_path / "other.pth"
    torch.save(state, other)
    emb = TimmImageEmbedder("test_resnet", checkpoint_path=str(other))
    with pytest.raises(
        WeightFileError, match=r"^.*other.pth: weights of other shapes than test_resnet's: conv1.0.weight"
    ):
        emb.check_resources()
    with pytest.raises(
        WeightFileError, match=r"^.*other.pth: weights of other shapes than test_resnet's: conv1.0.weight"
    ):
        emb.load_model("cpu")
    save_file(load_file(ckpt), str(tmp_path / "named.pth"))  # safetensors under a torch name: told by its bytes
    TimmImageEmbedder("test_resnet", checkpoint_path=str(tmp_path / "named.pth")).check_resources()
    # BatchNorm's step counters left out (many checkpoints do): the model keeps its own
    counted = {k: v for k, v in load_file(ckpt).items() if not k.endswith("num_batches_tracked")}
    assert len(counted) < len(load_file(ckpt))
    save_file(counted, str(tmp_path / "no-counters.safetensors"))
    emb = TimmImageEmbedder("test_resnet", checkpoint_path=str(tmp_path / "no-counters.safetensors"))
    emb.check_resources()
    emb.load_model("cpu")
    # a safetensors header whose offsets are not integers is a damaged file, not a TypeError
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}).encode()
    (tmp_path / "text-offsets.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    emb = TimmImageEmbedder("test_resnet", checkpoint_path=str(tmp_path / "text-offsets.safetensors"))
    with pytest.raises(WeightFileError, match="a damaged safetensors file"):
        emb.check_resources()


def test_unknown_pretrained_tag_and_other_channel_counts_are_refused_when_built():
    with pytest.raises(
        ValueError, match="unknown pretrained tag 'r160_in1kk' for timm model 'test_resnet': .*r160_in1k"
    ):
        TimmImageEmbedder("test_resnet.r160_in1kk")
    TimmImageEmbedder("test_resnet.r160_in1k")
    TimmImageEmbedder("botnet50ts_256.untrained", pretrained=False)  # a tag timm builds without published weights
    with pytest.raises(ValueError, match="in_chans=1: the decoders give the model RGB images"):
        TimmImageEmbedder("test_resnet", model_kwargs={"in_chans": 1})


def test_if_available_is_settled_where_the_run_starts_and_travels_to_the_workers(sample_ds, monkeypatch):
    """``pretrained="if-available"`` decides once, when the step is checked: a worker whose cache differs builds the
    model settled there (random weights without trying its cache; pretrained weights or an error, never random)."""
    import pickle

    import timm

    import imgcurate.embedders.timm as timm_module
    from imgcurate.errors import MissingWeightsError

    asked = []
    create = timm.create_model

    def recorded(name, pretrained=False, **kwargs):
        asked.append(pretrained)
        if pretrained:
            raise RuntimeError("no weights in this cache")
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", recorded)
    meta = sample_ds.metadata._meta
    monkeypatch.setattr(timm_module, "hf_offline", lambda: True)
    for here, settled in ((False, False), (True, True)):
        monkeypatch.setattr(timm_module, "pretrained_weights_cached", lambda name, here=here: here)
        emb = TimmImageEmbedder("test_resnet", pretrained="if-available")
        emb.check(meta, sample_ds.id_col)
        worker = pickle.loads(pickle.dumps(emb))
        monkeypatch.setattr(timm_module, "pretrained_weights_cached", lambda name, here=here: not here)
        assert worker._if_available_cached() is settled and worker.fingerprint() == emb.fingerprint()
        asked.clear()
        if settled:
            with pytest.raises(MissingWeightsError, match="not here, though they were in the cache where the run"):
                worker.check_resources()
            with pytest.raises(MissingWeightsError, match="could not be loaded"):
                worker._create()
        else:
            worker.check_resources()
            with pytest.warns(UserWarning, match="not in the Hugging Face cache where the run started"):
                worker._create()
            assert asked == [False]  # the worker's own cache is not tried


def test_if_available_downloads_the_weights_where_the_run_starts_when_online(sample_ds, monkeypatch):
    """Online, weights not in the cache yet are fetched where the run starts (once, not by every worker) and then
    settled as used; where the download fails, seeded random weights are settled."""
    import imgcurate.embedders.timm as timm_module

    fetched = []
    monkeypatch.setattr(timm_module, "hf_offline", lambda: False)
    monkeypatch.setattr(timm_module, "pretrained_weights_cached", lambda name: False)
    for reachable in (True, False):
        fetch = lambda name, ok=reachable: fetched.append(name) or ok  # noqa: E731
        monkeypatch.setattr(timm_module, "fetch_pretrained_weights", fetch)
        emb = TimmImageEmbedder("test_resnet", pretrained="if-available")
        emb.check(sample_ds.metadata._meta, sample_ds.id_col)  # what checking a config does: nothing is fetched
        assert emb._if_available_cached() is False and len(fetched) == (0 if reachable else 1)
        emb(sample_ds)  # a run: fetched where it starts, before the graph is built
        assert emb._if_available_cached() is reachable
    assert fetched == ["test_resnet", "test_resnet"]
    offline = TimmImageEmbedder("test_resnet", pretrained="if-available")
    monkeypatch.setattr(timm_module, "hf_offline", lambda: True)
    offline(sample_ds)
    assert offline._if_available_cached() is False and len(fetched) == 2  # offline: nothing is fetched
