from __future__ import annotations

import io
import os
import shutil
import tarfile

import dask
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DASK_IMGCURATE__PROGRESS", "false")

import imgcurate  # noqa: E402  (after the environment is set)

dask.config.set({"imgcurate.progress": False})


@pytest.fixture(autouse=True)
def _backend_pinned(request):
    """Every test runs on a pinned backend, whatever ``auto`` would pick on this machine: pandas, or for a test marked
    ``@pytest.mark.gpu(..., backend="cudf")`` the backend it names."""
    marker = request.node.get_closest_marker("gpu")
    backend = marker.kwargs.get("backend", "pandas") if marker is not None else "pandas"
    with dask.config.set({"imgcurate.backend": backend}):
        yield


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package is missing ("nvidia" of nvidia.dali)
        return True


def pytest_runtest_setup(item):
    """``@pytest.mark.gpu("cudf", ...)``: skipped where no NVIDIA driver is visible at all; FAILS where a driver is
    visible but torch cannot run on it, or a module the test names is missing or cannot run (a broken GPU stack must
    not pass as skipped)."""
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return
    from imgcurate import device

    if not device.driver_visible():
        pytest.skip("no NVIDIA GPU driver visible")
    problems = [device.torch_cuda_problem()]
    if "cudf" in marker.args or marker.kwargs.get("backend") == "cudf":
        problems.append(device.cudf_problem())
    problems += [f"{name} is not installed" for name in marker.args if _missing(name)]
    problems = [p for p in problems if p]
    if problems:
        pytest.fail("a GPU driver is visible but the GPU stack cannot run: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def _sample_master(tmp_path_factory):
    from imgcurate.testing import make_sample_shards

    path = tmp_path_factory.mktemp("sample") / "shards"
    make_sample_shards(str(path))
    return path


@pytest.fixture
def sample_dir(_sample_master, tmp_path):
    """A private copy of the bundled sample shards (4 shards, 36 real photos with near-duplicates)."""
    dst = tmp_path / "shards"
    shutil.copytree(_sample_master, dst)
    return dst


@pytest.fixture
def sample_ds(sample_dir):
    return imgcurate.ImageTextPairDataset.from_webdataset(str(sample_dir))


def write_tar(path, members):
    """Writes a raw tar from (name, bytes) pairs, for bad-input tests."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def tar_members(path):
    """{name: bytes} of a tar, in order."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def score_dataset(folder, scores, samples_per_shard: int = 3, column: str = "clip_score"):
    """Shards of 8x8 images whose ``column`` holds ``scores`` in order (None: null); infinite scores, which JSON cannot
    hold, are put in after reading."""
    import math

    import numpy as np
    from PIL import Image

    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import encode_image

    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg")
    finite = [s is None or math.isfinite(s) for s in scores]
    fields = [{column: s if ok else 0.0, "sign": 0 if ok else int(math.copysign(1, s))}
              for s, ok in zip(scores, finite, strict=True)]  # fmt: skip
    write_shards([Record({"jpg": jpg}, f) for f in fields], str(folder), samples_per_shard=samples_per_shard)
    ds = imgcurate.ImageTextPairDataset.from_webdataset(str(folder))
    df = ds.metadata
    values = df[column].astype("float64").mask(df["sign"] == 1, np.inf).mask(df["sign"] == -1, -np.inf)
    return ds.with_metadata(df.assign(**{column: values}).drop(columns="sign"))


def seeded_checkpoint(folder, name: str, seed: int = 0) -> str:
    """A safetensors file of timm model ``name`` with seeded random weights: the same model in every process."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    path = str(folder / f"{name}-seed{seed}.safetensors")
    save_file(timm.create_model(name).state_dict(), path)
    return path


@pytest.fixture
def embedded_shards(monkeypatch):
    """The tar paths that ImageEmbedder.embed_shard is called on during the test, in call order (in-process
    schedulers and in-process workers only)."""
    from imgcurate.embedders.base import ImageEmbedder

    calls: list[str] = []
    original = ImageEmbedder.embed_shard

    def counting(self, tar, *args, **kwargs):
        calls.append(tar)
        return original(self, tar, *args, **kwargs)

    monkeypatch.setattr(ImageEmbedder, "embed_shard", counting)
    return calls


@pytest.fixture
def fresh_models(tmp_path, monkeypatch):
    """An empty model cache and a private IMGCURATE_HOME (weight files, converted models) for the test."""
    from imgcurate._models import clear

    clear()
    monkeypatch.setenv("IMGCURATE_HOME", str(tmp_path / "home"))
    yield
    clear()
