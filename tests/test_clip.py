"""ClipEmbedder: both towers of a tiny open_clip model with seeded random weights, against open_clip's own
encode_image / encode_text on the same images and captions (offline)."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from imgcurate._models import clear
from imgcurate.embedders.clip import ClipEmbedder, write_random_clip
from imgcurate.io import iter_samples


@pytest.fixture(autouse=True)
def _fresh_models():
    clear()
    yield
    clear()


@pytest.fixture
def tiny(tmp_path):
    return write_random_clip(tmp_path / "tiny-clip", seed=1)


def _reference(name, ds, df):
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    images = {s.key: s.image for tar in ds.tar_files for s in iter_samples(tar)}
    x = torch.stack([preprocess(Image.open(io.BytesIO(images[k])).convert("RGB")) for k in df["key"]])
    with torch.no_grad():
        return model, model.encode_image(x).numpy(), model.encode_text(tokenizer(df["caption"].tolist())).numpy()


def test_columns_equal_open_clip_encode_image_and_text(sample_ds, tiny):
    """With ``decoder="pil"`` the image tower sees open_clip's own preprocessing; the CPU default (``cpu``: the same
    pixels, torch's port of Pillow's resize) stays within cosine 0.99999 of it."""
    emb = ClipEmbedder(tiny, batch_size=5, normalize_embeddings=False, device="cpu", decoder="pil")
    df = emb(sample_ds).metadata.compute()
    model, image, text = _reference(tiny, sample_ds, df)
    np.testing.assert_allclose(np.stack(df["image_embedding"]), image, rtol=1e-4, atol=1e-5)
    default = ClipEmbedder(tiny, batch_size=5, normalize_embeddings=False, device="cpu")
    assert type(default.loader("cpu")).__name__ == "CpuLoader"
    fast = np.stack(default(sample_ds).metadata.compute()["image_embedding"])
    cos = (fast * image).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(image, axis=1)
    assert cos.min() >= 0.99999, cos.min()
    np.testing.assert_allclose(np.stack(df["text_embedding"]), text, rtol=1e-4, atol=1e-5)
    cosine = (image * text).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    np.testing.assert_allclose(df["clip_score"], cosine, rtol=1e-4, atol=1e-5)
    assert df["clip_score"].dtype == np.float32
    assert df["image_embedding_error"].isna().all()
    scaled = ClipEmbedder(tiny, scale_score=True, device="cpu", decoder="pil")(sample_ds).metadata.compute()
    scale = float(model.logit_scale.detach().exp())
    np.testing.assert_allclose(scaled["clip_score"], cosine * scale, rtol=1e-4, atol=1e-4)


def test_normalised_embeddings_and_batch_size_independence(sample_ds, tiny):
    a = ClipEmbedder(tiny, batch_size=1, text_batch_size=3, device="cpu")(sample_ds).metadata.compute()
    b = ClipEmbedder(tiny, batch_size=16, device="cpu")(sample_ds).metadata.compute()
    for col in ("image_embedding", "text_embedding"):
        np.testing.assert_allclose(np.linalg.norm(np.stack(a[col]), axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.stack(a[col]), np.stack(b[col]), atol=1e-5)
    np.testing.assert_allclose(a["clip_score"], b["clip_score"], atol=1e-5)


def test_captions_from_txt_members_and_missing_captions(sample_ds, tiny):
    from_meta = ClipEmbedder(tiny, device="cpu")(sample_ds).metadata.compute()
    from_tar = ClipEmbedder(tiny, caption_column=None, device="cpu")(sample_ds).metadata.compute()
    np.testing.assert_allclose(from_tar["clip_score"], from_meta["clip_score"], atol=1e-6)
    meta = sample_ds.metadata
    ds = sample_ds.with_metadata(meta.assign(caption=meta["caption"].where(meta["key"] != "000003")))
    df = ClipEmbedder(tiny, device="cpu")(ds).metadata.compute().set_index("key")
    assert np.isnan(df.loc["000003", "clip_score"]) and df["text_embedding"].isna().sum() == 1
    assert df["clip_score"].notna().sum() == len(df) - 1
    # a caption of white space only is no caption either, not the score of an empty prompt
    blank = meta["caption"].mask(meta["key"].isin(["000004", "000005"]), "")
    blank = blank.mask(meta["key"] == "000005", " \n\t")
    df = ClipEmbedder(tiny, device="cpu")(sample_ds.with_metadata(meta.assign(caption=blank))).metadata.compute()
    df = df.set_index("key")
    assert df.loc[["000004", "000005"], "clip_score"].isna().all() and df["clip_score"].notna().sum() == len(df) - 2


def test_declares_columns_before_work_and_checks_its_input(sample_ds, tiny):
    emb = ClipEmbedder(tiny, caption_column="alt_text", device="cpu")
    types = emb.output_columns()
    assert [str(types[c]) for c in ("image_embedding", "text_embedding", "clip_score")] == [
        "fixed_size_list<item: float>[64]",
        "fixed_size_list<item: float>[64]",
        "float",
    ]
    with pytest.raises(ValueError, match="reads column.*'alt_text'"):
        emb(sample_ds)


def test_checkpoint_file_and_clear_errors(tmp_path, sample_ds, tiny, monkeypatch):
    from safetensors.torch import save_file

    folder = tiny.removeprefix("local-dir:")
    emb = ClipEmbedder(tiny, checkpoint_path=f"{folder}/open_clip_model.safetensors", device="cpu")
    assert emb.embedding_dim() == 64
    reference = ClipEmbedder(tiny, device="cpu")(sample_ds).metadata.compute()
    np.testing.assert_allclose(emb(sample_ds).metadata.compute()["clip_score"], reference["clip_score"], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        ClipEmbedder("ViT-B-32", checkpoint_path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for ViT-B-32: choose one of .*openai"):
        ClipEmbedder("ViT-B-32", pretrained="nope")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        ClipEmbedder("ViT-Q-99")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    emb = ClipEmbedder("RN50", pretrained="openai", device="cpu")
    assert emb.embedding_dim() == 1024
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set.*checkpoint_path="):
        emb.load_model("cpu")
    import huggingface_hub.constants as hc

    from imgcurate.errors import MissingWeightsError

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hf" / "hub"))
    with pytest.raises(MissingWeightsError, match="are not available offline.*checkpoint_path="):
        emb.check_resources()  # what a pipeline runs before any work
    ClipEmbedder(tiny, device="cpu").check_resources()  # no pretrained tag: nothing to find
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a checkpoint of this open_clip model") as raised:
        ClipEmbedder(tiny, checkpoint_path=str(tmp_path / "bad.safetensors")).load_model("cpu")
    assert 'Unexpected key(s) in state_dict: "x"' in str(raised.value)  # which tensors, not just that some
    assert "Missing key(s)" in str(raised.value) and "\n" not in str(raised.value)


def test_a_tag_keeps_its_quick_gelu_when_a_local_checkpoint_brings_the_weights(tmp_path, tiny, monkeypatch):
    """OpenAI's CLIP weights were trained with QuickGELU (their tag says so): a local copy given as
    ``checkpoint_path`` beside ``pretrained="openai"`` (the way to use them offline) must get that architecture too,
    not plain GELU. A tiny architecture registered with open_clip under a tag of its own stands in for ViT-B-32."""
    import json
    import shutil

    import open_clip.pretrained as registry
    from safetensors.torch import save_file

    folder = tiny.removeprefix("local-dir:")
    shutil.copy(f"{folder}/open_clip_config.json", tmp_path / "tiny-quickgelu-clip.json")
    config = json.loads((tmp_path / "tiny-quickgelu-clip.json").read_text())
    (tmp_path / "tiny-quickgelu-clip.json").write_text(json.dumps(config.get("model_cfg", config)))
    open_clip.add_model_config(str(tmp_path / "tiny-quickgelu-clip.json"))
    tag = {**registry._PRETRAINED["ViT-B-32"]["openai"], "url": "", "hf_hub": "nobody/tiny-quickgelu-clip/"}
    monkeypatch.setitem(registry._PRETRAINED, "tiny-quickgelu-clip", {"openai": tag})
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-quickgelu-clip", pretrained=None, force_quick_gelu=True).eval()
    weights = str(tmp_path / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
    emb = ClipEmbedder("tiny-quickgelu-clip", pretrained="openai", checkpoint_path=weights, device="cpu")
    model = emb.load_model("cpu").clip
    assert {type(m).__name__ for m in model.modules()} >= {"QuickGELU"}
    x = torch.randn(2, 3, *model.visual.image_size)
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_image(x).numpy(), reference.encode_image(x).numpy(), atol=1e-6)


def test_local_dir_without_weights_or_with_a_broken_config_is_a_file_error(tmp_path, tiny):
    import shutil

    from imgcurate.errors import FileError

    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny.removeprefix("local-dir:") + "/open_clip_config.json", folder)
    emb = ClipEmbedder(f"local-dir:{folder}", device="cpu")
    with pytest.raises(FileError, match=f"^{folder}: holds no weights file"):
        emb.check_resources()  # before any work, not random weights on every worker
    with pytest.raises(FileError, match=f"^{folder}: holds no weights file"):
        emb.load_model("cpu")
    # with checkpoint_path the folder needs only its config
    checkpoint = tiny.removeprefix("local-dir:") + "/open_clip_model.safetensors"
    ClipEmbedder(f"local-dir:{folder}", checkpoint_path=checkpoint, device="cpu").check_resources()
    (folder / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 64,')
    with pytest.raises(FileError, match="open_clip_config.json: not valid JSON"):
        ClipEmbedder(f"local-dir:{folder}")
    (folder / "open_clip_config.json").write_text('{"model_cfg": {}}')
    with pytest.raises(FileError, match="open_clip_config.json: not an open_clip model config"):
        ClipEmbedder(f"local-dir:{folder}")


def test_damaged_weight_files_are_errors_naming_the_file_before_any_work(tmp_path, tiny):
    import shutil

    from imgcurate.errors import WeightFileError

    source = tiny.removeprefix("local-dir:")
    data = open(f"{source}/open_clip_model.safetensors", "rb").read()
    folder = tmp_path / "damaged"
    folder.mkdir()
    shutil.copy(f"{source}/open_clip_config.json", folder)
    (folder / "open_clip_model.safetensors").write_bytes(data[: len(data) // 2])
    weights = folder / "open_clip_model.safetensors"
    emb = ClipEmbedder(f"local-dir:{folder}", device="cpu")
    for call in (emb.check_resources, lambda: emb.load_model("cpu")):
        with pytest.raises(WeightFileError, match=f"^{weights}: a truncated safetensors file"):
            call()
    emb = ClipEmbedder(tiny, checkpoint_path=str(weights), device="cpu")
    for call in (emb.check_resources, lambda: emb.load_model("cpu")):
        with pytest.raises(WeightFileError, match=f"^{weights}: a truncated safetensors file"):
            call()
    named = tmp_path / "weights.pth"
    shutil.copy(f"{source}/open_clip_model.safetensors", named)
    with pytest.raises(WeightFileError, match=f"^{named}: a safetensors file without the .safetensors suffix"):
        ClipEmbedder(tiny, checkpoint_path=str(named)).check_resources()
    torch.save({"visual.nope": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightFileError, match="other.pth: not a checkpoint of this open_clip model"):
        ClipEmbedder(tiny, checkpoint_path=str(tmp_path / "other.pth")).load_model("cpu")
