"""More published heads: the aesthetic head for CLIP ViT-B/32 and the NSFW heads for ViT-H/14 and ViT-B/32, in their
published formats with seeded weights (nothing is downloaded), chosen by the embedding's size or by name. The B/32 NSFW
head is a Keras SavedModel: its fixture and TensorFlow's predictions come from tests/data/make_keras_nsfw_fixture.py."""

from __future__ import annotations

import pathlib
import shutil
import zipfile

import numpy as np
import pytest
import torch

from imgcurate.classifiers import AestheticClassifier, NsfwClassifier, aesthetic, nsfw
from imgcurate.embedders.clip import ClipEmbedder, write_random_clip

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _fresh(fresh_models):
    """Every test here starts from an empty model cache and its own weight folder (see conftest)."""


def _unit(n, dim, seed=3):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _b32_aesthetic_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(1, 512, generator=g), "bias": torch.randn(1, generator=g) + 5}


def _h14_nsfw_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(1024, 1024), (2048, 1024), (1024, 2048), (256, 1024), (128, 256), (16, 128), (1, 16)]
    state = {}
    for index, (out, inp) in zip([0, 3, 6, 9, 12, 15, 16], sizes, strict=True):
        state[f"layers.{index}.weight"] = torch.randn(out, inp, generator=g) / inp**0.5
        state[f"layers.{index}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def _h14_numpy(state, x):
    s = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    for index in (0, 3, 6, 9, 12):
        x = np.maximum(x @ s[f"layers.{index}.weight"].T + s[f"layers.{index}.bias"], 0)
    for index in (15, 16):
        x = x @ s[f"layers.{index}.weight"].T + s[f"layers.{index}.bias"]
    return x[:, 0]


def test_b32_aesthetic_linear_head_by_dimension_and_by_name(tmp_path):
    state = _b32_aesthetic_state()
    torch.save(state, tmp_path / "sa_0_4_vit_b_32_linear.pth")  # the published format: nn.Linear's state dict
    x = _unit(12, 512)
    want = x.astype(np.float64) @ state["weight"].numpy()[0] + float(state["bias"])
    auto = AestheticClassifier(str(tmp_path / "sa_0_4_vit_b_32_linear.pth"), device="cpu")
    np.testing.assert_allclose(auto.predict_rows(x), want, rtol=1e-5, atol=1e-5)
    named = AestheticClassifier(str(tmp_path / "sa_0_4_vit_b_32_linear.pth"), head="ViT-B-32")
    assert named.embedding_size == 512
    np.testing.assert_allclose(named.predict(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects 512-d"):
        named.predict_rows(_unit(2, 768))
    with pytest.raises(ValueError, match="unknown head 'ViT-X'.*ViT-B-32 \\(512-d\\)"):
        AestheticClassifier(head="ViT-X")


def test_h14_nsfw_head_by_dimension(tmp_path):
    state = _h14_nsfw_state()
    torch.save(state, tmp_path / "h14_nsfw.pth")
    x = _unit(10, 1024)
    clf = NsfwClassifier(str(tmp_path / "h14_nsfw.pth"), device="cpu")
    got = clf.predict_rows(x)
    assert clf.embedding_size == 1024
    np.testing.assert_allclose(got, _h14_numpy(state, x.astype(np.float64)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown head 'ViT-B-16'.*ViT-B-32 \\(512-d\\)"):
        NsfwClassifier(head="ViT-B-16")


def _tf_predictions():
    with np.load(DATA / "keras_predictions.npz") as saved:
        return saved["inputs"], saved["keras_nsfw_b32"][:, 0]


def test_b32_nsfw_keras_head_by_dimension_and_by_name(tmp_path):
    x, want = _tf_predictions()  # TensorFlow's own predictions of the fixture's SavedModel
    auto = NsfwClassifier(str(DATA / "keras_nsfw_b32.zip"), device="cpu")
    np.testing.assert_allclose(auto.predict_rows(x), want, rtol=1e-5, atol=1e-5)
    assert auto.embedding_size == 512
    with zipfile.ZipFile(DATA / "keras_nsfw_b32.zip") as archive:
        archive.extractall(tmp_path)
    named = NsfwClassifier(str(tmp_path / "keras_nsfw_b32"), head="ViT-B-32")
    assert named.embedding_size == 512
    np.testing.assert_allclose(named.predict(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects 512-d"):
        named.predict_rows(_unit(2, 768))


def test_b32_nsfw_published_file_from_the_cache(tmp_path):
    """With no model_path the head reads the published zip from $IMGCURATE_HOME/weights, unchanged."""
    x, want = _tf_predictions()
    (tmp_path / "home" / "weights").mkdir(parents=True)
    shutil.copy(DATA / "keras_nsfw_b32.zip", tmp_path / "home" / "weights" / nsfw.NSFW_B32_WEIGHTS.name)
    np.testing.assert_allclose(NsfwClassifier(device="cpu").predict_rows(x), want, rtol=1e-5, atol=1e-5)


def test_b32_nsfw_wrong_files_are_clear_errors(tmp_path):
    torch.save(_b32_aesthetic_state(), tmp_path / "b32.pth")
    with pytest.raises(ValueError, match=r"b32.pth: a state dict, but the NSFW detector's ViT-B-32 head \(for 512-d "
                       r"embeddings\) is read from a Keras SavedModel"):  # fmt: skip
        NsfwClassifier(str(tmp_path / "b32.pth")).predict_rows(_unit(2, 512))
    with pytest.raises(ValueError, match=r"from 512-d input to 1 outputs, not the ViT-L-14 head \(768-d input"):
        NsfwClassifier(str(DATA / "keras_nsfw_b32.zip"), head="ViT-L-14").predict_rows(_unit(2, 768))


def test_published_files_are_weight_entries():
    for weights in (aesthetic.AESTHETIC_B32_WEIGHTS, nsfw.NSFW_H14_WEIGHTS, nsfw.NSFW_B32_WEIGHTS):
        assert weights.url.startswith("https://github.com/LAION-AI/")
    assert nsfw.NSFW_B32_WEIGHTS.url.endswith("/clip_autokeras_nsfw_b32.zip")
    assert {name: spec[0] for name, spec in aesthetic.HEADS.items()} == {"ViT-L-14": 768, "ViT-B-32": 512}
    sizes = {name: spec[0] for name, spec in nsfw.HEADS.items()}
    assert sizes == {"ViT-L-14": 768, "ViT-H-14": 1024, "ViT-B-32": 512}


def test_head_fused_into_a_clip_pass_of_matching_size(sample_ds, tmp_path):
    config = {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    name = write_random_clip(tmp_path / "b32ish", config)
    torch.save(_b32_aesthetic_state(), tmp_path / "a.pth")
    clf = AestheticClassifier(str(tmp_path / "a.pth"))
    df = ClipEmbedder(name, classifiers=[clf], device="cpu")(sample_ds).metadata.compute()
    assert clf.embedding_size == 512
    want = AestheticClassifier(str(tmp_path / "a.pth")).predict_rows(np.stack(df["image_embedding"]))
    np.testing.assert_allclose(df["aesthetic_score"], want, rtol=1e-5)
