from __future__ import annotations

import urllib.error
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from imgcurate.classifiers import AestheticClassifier, NsfwClassifier
from imgcurate.classifiers import weights as weights_mod
from imgcurate.classifiers.weights import WeightFile, cached_weights
from imgcurate.embedders import TimmImageEmbedder
from imgcurate.filters import SampleFilter, drop_report


@pytest.fixture(autouse=True)
def _fresh(fresh_models):
    """Every test here starts from an empty model cache and its own weight folder (see conftest)."""


def _aesthetic_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "layers.0": (1024, 768),
        "layers.2": (128, 1024),
        "layers.4": (64, 128),
        "layers.6": (16, 64),
        "layers.7": (1, 16),
    }
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"{name}.weight"] = torch.randn(out, inp, generator=g) / inp**0.5
        state[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def _aesthetic_numpy(state, x):
    for name in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):
        x = x @ state[f"{name}.weight"].numpy().T.astype(np.float64) + state[f"{name}.bias"].numpy()
    return x[:, 0]


def _nsfw_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"norm.mean": torch.randn(768, generator=g) * 0.01, "norm.variance": torch.rand(768, generator=g) + 0.5}
    for i, (out, inp) in enumerate([(64, 768), (512, 64), (256, 512), (1, 256)], start=1):
        state[f"linear_{i}.weight"] = torch.randn(out, inp, generator=g) / inp**0.5
        state[f"linear_{i}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def _nsfw_numpy(state, x):
    s = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    x = (x - s["norm.mean"]) / np.sqrt(s["norm.variance"])
    for i in (1, 2, 3):
        x = np.maximum(x @ s[f"linear_{i}.weight"].T + s[f"linear_{i}.bias"], 0)
    return 1 / (1 + np.exp(-(x @ s["linear_4.weight"].T + s["linear_4.bias"])[:, 0]))


def _embeddings(n=20, seed=3):
    x = np.random.default_rng(seed).standard_normal((n, 768)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_loads_published_formats_and_matches_numpy(tmp_path, fmt):
    state = _aesthetic_state()
    path = tmp_path / f"aesthetic.{fmt}"
    torch.save(state, path) if fmt == "pth" else save_file(state, str(path))
    x = _embeddings()
    got = AestheticClassifier(model_path=str(path), device="cpu").predict(x)
    np.testing.assert_allclose(got, _aesthetic_numpy(state, x.astype(np.float64)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "zip"])
def test_nsfw_loads_published_formats_and_matches_numpy(tmp_path, fmt):
    state = _nsfw_state()
    if fmt == "zip":
        torch.save(state, tmp_path / "clip_autokeras_binary_nsfw.pth")
        path = tmp_path / "published.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.write(tmp_path / "clip_autokeras_binary_nsfw.pth", "clip_autokeras_binary_nsfw.pth")
    else:
        path = tmp_path / f"nsfw.{fmt}"
        torch.save(state, path) if fmt == "pth" else save_file(state, str(path))
    x = _embeddings()
    got = NsfwClassifier(model_path=str(path), device="cpu").predict(x)
    assert ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got, _nsfw_numpy(state, x.astype(np.float64)), rtol=1e-4, atol=1e-5)


def test_wrong_weights_and_dimension_mismatch(tmp_path):
    torch.save(_nsfw_state(), tmp_path / "nsfw.pth")
    with pytest.raises(ValueError, match="not the aesthetic predictor"):
        AestheticClassifier(model_path=str(tmp_path / "nsfw.pth")).predict(_embeddings())
    col = pd.Series([np.zeros(512, np.float32)] * 3)
    with pytest.raises(ValueError, match=r"expects 768-d .*TimmImageEmbedder embeddings .* 512-d"):
        clf = NsfwClassifier(model_path=str(tmp_path / "nsfw.pth"), head="ViT-L-14")
        clf.predict_column(col, source="TimmImageEmbedder")


def test_null_embeddings_give_null_scores(tmp_path):
    save_file(_aesthetic_state(), str(tmp_path / "a.safetensors"))
    x = _embeddings(3)
    col = pd.Series([x[0], None, x[2]])
    scores = AestheticClassifier(model_path=str(tmp_path / "a.safetensors")).predict_column(col)
    assert scores.isna().tolist() == [False, True, False]
    assert scores.dtype == np.float32


def test_scores_do_not_depend_on_the_embeddings_scale_and_non_finite_rows_get_null(tmp_path):
    """The LAION heads were trained on L2-normalised CLIP embeddings: an embedder run with
    ``normalize_embeddings=False`` (norms of 10-20 for CLIP) must not change the score. A row holding NaN or infinite
    values is scored null, even by a head whose first layer turns NaN into a number (the Keras NSFW head's does)."""
    save_file(_aesthetic_state(), str(tmp_path / "a.safetensors"))
    torch.save(_nsfw_state(), tmp_path / "nsfw.pth")
    x = _embeddings(6)
    scale = np.array([1.0, 14.0, 0.03, 1e30, 2.0, 5.0], dtype=np.float32)[:, None]
    for clf in (AestheticClassifier(model_path=str(tmp_path / "a.safetensors"), device="cpu"),
                NsfwClassifier(model_path=str(tmp_path / "nsfw.pth"), device="cpu")):  # fmt: skip
        np.testing.assert_allclose(clf.predict(x * scale), clf.predict(x), rtol=1e-5, atol=1e-6)

    class NanToZero(AestheticClassifier):
        def load_model(self, device):
            head = super().load_model(device)
            return _NanToZeroFirst(head)

    bad = x.copy()
    bad[1, 5], bad[4, 0] = np.nan, np.inf
    scores = NanToZero(model_path=str(tmp_path / "a.safetensors"), device="cpu").predict(bad)
    assert np.isnan(scores).tolist() == [False, True, False, False, True, False]
    np.testing.assert_allclose(scores[[0, 2, 3, 5]], AestheticClassifier(
        model_path=str(tmp_path / "a.safetensors"), device="cpu").predict(x[[0, 2, 3, 5]]), rtol=1e-6)  # fmt: skip


def test_a_head_of_ones_own_gets_its_embeddings_as_they_are():
    """Only the LAION heads normalise their input: a classifier of one's own trained on raw embeddings keeps them."""
    from imgcurate.classifiers.base import ImageClassifier

    class Norm(ImageClassifier):
        def __init__(self):
            super().__init__("image_embedding", "norm", "float32", 16, 4, "cpu")

        def load_model(self, device):
            return _Norm()

    x = np.array([[3.0, 4.0, 0.0, 0.0], [np.nan, 0.0, 0.0, 0.0]], dtype=np.float32)
    scores = Norm().predict(x)
    assert scores[0] == pytest.approx(5.0) and np.isnan(scores[1])


class _Norm(torch.nn.Module):
    def forward(self, x):
        return x.norm(dim=1, keepdim=True)


class _NanToZeroFirst(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(torch.nan_to_num(x, nan=0.0, posinf=0.0))


def test_fused_into_the_embedder_pass_equals_standalone(sample_ds, tmp_path):
    save_file(_aesthetic_state(), str(tmp_path / "a.safetensors"))
    torch.save(_nsfw_state(), tmp_path / "n.pth")

    def heads():
        return [AestheticClassifier(str(tmp_path / "a.safetensors")), NsfwClassifier(str(tmp_path / "n.pth"))]

    kwargs = dict(output="head", model_kwargs={"num_classes": 768})
    fused = TimmImageEmbedder("test_vit", classifiers=heads(), **kwargs)(sample_ds).metadata.compute()
    ds = TimmImageEmbedder("test_vit", **kwargs)(sample_ds)
    for clf in heads():
        ds = clf(ds)
    alone = ds.metadata.compute()
    for col in ("aesthetic_score", "nsfw_score"):
        assert fused[col].dtype == np.float32
        np.testing.assert_allclose(fused[col], alone[col], rtol=1e-5)
    assert fused["nsfw_score"].between(0, 1).all()


def test_classifier_needs_its_column(sample_ds, tmp_path):
    with pytest.raises(ValueError, match="reads column.*image_embedding.*add the step that makes them"):
        AestheticClassifier(model_path="x")(sample_ds)


def test_weights_download_once_then_reuse_offline(tmp_path, monkeypatch):
    published = tmp_path / "published.pth"
    torch.save(_aesthetic_state(), published)
    wf = WeightFile("aesthetic-test.pth", published.as_uri())
    path = cached_weights(wf)
    assert path.read_bytes() == published.read_bytes()
    assert (path.parent / "aesthetic-test.pth.sha256").exists()

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights_mod.urllib.request, "urlopen", offline)
    assert cached_weights(wf) == path  # reused without the network
    path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="does not match"):
        cached_weights(wf)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"put it at .*aesthetic-test.pth"):
        cached_weights(wf)
    pinned = WeightFile("pinned.pth", published.as_uri(), sha256="0" * 64)
    monkeypatch.undo()
    monkeypatch.setenv("IMGCURATE_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="expected 0000"):
        cached_weights(pinned)
    assert not (tmp_path / "home" / "weights" / "pinned.pth").exists()  # a mismatching download is not kept
    good = WeightFile("good.pth", published.as_uri(), sha256=weights_mod.sha256_of(published))
    assert cached_weights(good).read_bytes() == published.read_bytes()


def test_default_weights_without_network_say_where_to_put_them(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights_mod.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE.pth.*IMGCURATE_HOME"):
        AestheticClassifier(device="cpu").predict(_embeddings(2))


def test_default_weights_are_fetched_where_the_run_starts_and_checked_offline(sample_ds, tmp_path, monkeypatch):
    """Without model_path the published file is downloaded once when the step is applied (a fused classifier's too),
    before any shard is embedded: a file that cannot be fetched stops the run there, saying where to put it. Offline
    (HF_HUB_OFFLINE) the resource check a pipeline runs first refuses a file that is not cached."""
    from imgcurate.classifiers import aesthetic
    from imgcurate.errors import MissingWeightsError

    calls = []
    real_urlopen = weights_mod.urllib.request.urlopen

    def offline(*a, **k):
        calls.append(a)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights_mod.urllib.request, "urlopen", offline)
    embedder = TimmImageEmbedder("test_vit", output="head", model_kwargs={"num_classes": 768},
                                 classifiers=[AestheticClassifier(device="cpu")])  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE.pth.*IMGCURATE_HOME"):
        embedder(sample_ds)  # lazy: nothing is computed, yet the missing file is found now
    assert len(calls) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"sac\+logos\+ava1-l14-linearMSE.pth.*downloads are off"):
        AestheticClassifier(head="ViT-L-14").check_resources()
    AestheticClassifier(head="auto").check_resources()  # the head (and so its file) is not known yet: nothing to check
    assert len(calls) == 1  # the checks download nothing
    import dask

    from imgcurate.pipeline import Pipeline

    assert not Pipeline(steps=[], cluster={"address": "tcp://127.0.0.1:1"})._tasks_here()
    with dask.config.set({"imgcurate.tasks-elsewhere": True}):  # what a run on a cluster given by its address sets
        AestheticClassifier(head="ViT-L-14").prepare_all()  # each worker fetches its own copy: nothing here
    assert len(calls) == 1

    monkeypatch.setattr(weights_mod.urllib.request, "urlopen", real_urlopen)  # a file:// URL needs no network
    published = tmp_path / "published.pth"
    torch.save(_aesthetic_state(), published)
    head = aesthetic.HEADS["ViT-L-14"]
    monkeypatch.setitem(aesthetic.HEADS, "ViT-L-14", (*head[:2], WeightFile("test.pth", published.as_uri())))
    clf = AestheticClassifier(head="ViT-L-14", device="cpu")
    clf.prepare_all()
    assert (tmp_path / "home" / "weights" / "test.pth").read_bytes() == published.read_bytes()
    np.testing.assert_allclose(clf.predict(_embeddings()), _aesthetic_numpy(_aesthetic_state(), _embeddings()),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_score_filters_and_reasons(sample_ds):
    df = sample_ds.metadata

    def scores(part):
        n = len(part)
        aesthetic = np.linspace(3, 8, n).astype(np.float32)
        if n:
            aesthetic[0] = np.nan  # a failed decode
        return part.assign(aesthetic_score=aesthetic, nsfw_score=np.linspace(0, 1, n).astype(np.float32))

    meta = {**df.dtypes.to_dict(), "aesthetic_score": np.float32, "nsfw_score": np.float32}
    ds = sample_ds.with_metadata(df.map_partitions(scores, meta=meta))
    out = SampleFilter(min_aesthetic=5.0, max_nsfw=0.5, min_width=300)(ds).metadata.compute()
    ok = (out.aesthetic_score >= 5.0) & (out.nsfw_score < 0.5) & (out.width >= 300)
    assert out["keep"].tolist() == ok.tolist()
    assert out.loc[out.keep, "drop_reason"].isna().all()
    assert out.loc[~out.keep, "drop_reason"].notna().all()
    row = out[out.aesthetic_score.isna()].iloc[0]
    assert "aesthetic_score unknown" in row["drop_reason"] and "aesthetic_score <" not in row["drop_reason"]
    assert not row["keep"]
    report = drop_report(SampleFilter(min_aesthetic=5.0, max_nsfw=0.5, min_width=300)(ds))
    assert report["total"] == len(out) and report["kept"] == ok.sum()
    assert report["nsfw_score >= 0.5"] == (~(out.nsfw_score < 0.5)).sum()


def test_score_histogram_png(sample_ds, tmp_path):
    from PIL import Image

    from imgcurate.report import score_histograms

    df = sample_ds.metadata
    meta = {**df.dtypes.to_dict(), "aesthetic_score": np.float32}
    ds = sample_ds.with_metadata(df.map_partitions(lambda p: p.assign(aesthetic_score=np.float32(5.5)), meta=meta))
    ds = SampleFilter(min_aesthetic=6.0)(ds)
    path = score_histograms(ds, str(tmp_path / "scores.png"), thresholds={"aesthetic_score": 6.0})
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 500


def _zip_of(state, path):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("clip_autokeras_binary_nsfw.pth", buf.getvalue())


def test_nsfw_zip_is_read_in_memory_so_a_replaced_zip_gives_its_new_weights(tmp_path):
    from imgcurate._models import clear

    path = tmp_path / "nsfw.zip"
    x = _embeddings()
    for seed in (0, 1):  # the same path with other weights: a new step, never a stale copy beside the zip
        clear()
        _zip_of(_nsfw_state(seed), path)
        got = NsfwClassifier(model_path=str(path), device="cpu").predict(x)
        np.testing.assert_allclose(got, _nsfw_numpy(_nsfw_state(seed), x.astype(np.float64)), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nsfw.zip"]  # nothing extracted for workers to race on


def _damaged(tmp_path, name):
    state = _aesthetic_state()
    save_file(state, str(tmp_path / "good.safetensors"))
    torch.save(state, tmp_path / "good.pth")
    st, pth = (tmp_path / "good.safetensors").read_bytes(), (tmp_path / "good.pth").read_bytes()
    data = {
        "trunc.safetensors": st[: len(st) // 2],
        "trunc.pth": pth[: len(pth) // 2],
        "empty.pth": b"",
        "bad.zip": b"PK\x03\x04 not really a zip",
        "text.pth": b"hello, not weights",
        "zip-without-pth.zip": None,
    }[name]
    path = tmp_path / name
    if data is None:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "no weights here")
    else:
        path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("trunc.safetensors", "a truncated safetensors file"),
        ("trunc.pth", "damaged or truncated: its zip directory cannot be read"),
        ("empty.pth", "empty file"),
        ("bad.zip", "damaged or truncated: its zip directory cannot be read"),
        ("text.pth", "not a weight file"),
        ("zip-without-pth.zip", "a zip holding no .pth file"),
    ],
)
@pytest.mark.parametrize("cls", [AestheticClassifier, NsfwClassifier])
def test_damaged_weight_files_are_errors_naming_the_file_at_check_time_and_at_load(tmp_path, cls, name, problem):
    from imgcurate.errors import WeightFileError

    path = _damaged(tmp_path, name)
    clf = cls(model_path=path, device="cpu")
    with pytest.raises(WeightFileError, match=f"^{path}: {problem}"):
        clf.check_resources()  # what a pipeline runs before any work
    with pytest.raises(WeightFileError, match=f"^{path}: {problem}"):
        clf.predict(_embeddings())


def test_a_zip_whose_pth_is_not_weights_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """A small zip can hold gigabytes of zeros: the member's first bytes are read, not the whole of it."""
    from imgcurate.embedders.state_dict import read_state_dict
    from imgcurate.errors import WeightFileError

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.pth", bytes(20 << 20))
    assert path.stat().st_size < 100_000

    def inflate(self, name, pwd=None):
        raise AssertionError(f"{name} inflated whole")

    monkeypatch.setattr(zipfile.ZipFile, "read", inflate)
    with pytest.raises(WeightFileError, match=r"bomb\.zip!model\.pth: not a weight file"):
        read_state_dict(str(path))


@pytest.mark.parametrize("name", ["aesthetic.pth", "AESTHETIC.SAFETENSORS", "aesthetic.bin"])
def test_the_format_is_told_by_the_first_bytes_not_the_suffix(tmp_path, name):
    state = _aesthetic_state()
    path = tmp_path / name
    save_file(state, str(path))  # safetensors under any name
    x = _embeddings()
    clf = AestheticClassifier(model_path=str(path), device="cpu")
    clf.check_resources()
    np.testing.assert_allclose(clf.predict(x), _aesthetic_numpy(state, x.astype(np.float64)), rtol=1e-4, atol=1e-4)


def test_another_heads_file_is_an_error_at_check_time_naming_both_sizes(tmp_path):
    from imgcurate.errors import WeightFileError

    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_aesthetic_state(), path)  # the 768-d L/14 head
    clf = AestheticClassifier(model_path=str(path), device="cpu")
    clf.check_dimension(512, source="TimmImageEmbedder")  # what a pipeline's column check does: auto picks B/32
    message = (
        f"^{path}: the aesthetic predictor's ViT-L-14 head, for 768-d embeddings, but the embeddings here are 512-d"
    )
    with pytest.raises(WeightFileError, match=message.replace("+", r"\+")):
        clf.check_resources()
    with pytest.raises(WeightFileError, match=message.replace("+", r"\+")):
        clf.predict(np.zeros((2, 512), np.float32))
    # before the column check (imgcurate doctor without the input) head="auto" knows no size yet: any head's file passes
    AestheticClassifier(model_path=str(path), device="cpu").check_resources()
    torch.save({"weight": torch.zeros(1, 640), "bias": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(WeightFileError, match="not the aesthetic predictor's weights"):
        AestheticClassifier(model_path=str(tmp_path / "odd.pth")).check_resources()  # a file of no head does not
    clf = AestheticClassifier(model_path=str(tmp_path / "odd.pth"), head="ViT-B-32")
    with pytest.raises(
        WeightFileError, match=r"not the aesthetic predictor's weights .*weight \[1, 640\] \(expected \[1, 512\]\)"
    ):
        clf.check_resources()
