"""The GPU suite, and the rule that runs it.

Tests marked ``gpu`` skip only where no NVIDIA driver is visible; where one is, a stack that cannot run FAILS them
(see ``pytest_runtest_setup`` in conftest.py). They are pinned to a backend like every other test. The CPU tests at
the top check that rule itself; the rest need a GPU (also: test_loaders.py::test_gpu_decoders_on_cuda and the
``gpu`` tests of test_dedup.py).
"""

from __future__ import annotations

import os
import types

import dask
import numpy as np
import pytest
from conftest import pytest_runtest_setup, seeded_checkpoint

from imgcurate import device


def _item(*args, **kwargs):
    marker = types.SimpleNamespace(args=args, kwargs=kwargs)
    return types.SimpleNamespace(get_closest_marker=lambda name: marker if name == "gpu" else None)


def test_gpu_tests_skip_without_a_driver_and_fail_with_a_broken_stack(monkeypatch):
    monkeypatch.setattr(device, "driver_visible", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="no NVIDIA GPU driver visible"):
        pytest_runtest_setup(_item("cudf"))
    monkeypatch.setattr(device, "driver_visible", lambda: True)
    monkeypatch.setattr(device, "torch_cuda_problem", lambda: "torch 2.14.1 cannot use the GPU (driver too old)")
    monkeypatch.setattr(device, "cudf_problem", lambda: None)
    with pytest.raises(pytest.fail.Exception, match="GPU stack cannot run: torch 2.14.1 cannot use the GPU"):
        pytest_runtest_setup(_item())
    monkeypatch.setattr(device, "torch_cuda_problem", lambda: None)
    with pytest.raises(pytest.fail.Exception, match="no_such_gpu_module is not installed"):
        pytest_runtest_setup(_item("no_such_gpu_module"))
    monkeypatch.setattr(device, "cudf_problem", lambda: "cudf is not installed")
    with pytest.raises(pytest.fail.Exception, match="cudf is not installed"):
        pytest_runtest_setup(_item(backend="cudf"))
    pytest_runtest_setup(_item())  # a working stack: the test runs


def test_unmarked_tests_run_on_pandas():
    assert dask.config.get("imgcurate.backend") == "pandas"


@pytest.mark.gpu("cudf", backend="cudf")
def test_gpu_tests_are_pinned_to_the_backend_they_name():
    assert dask.config.get("imgcurate.backend") == "cudf"


# ---------------------------------------------------------------------------------------------------- on a GPU
def _full_float32():
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.gpu("cudf", "dask_cudf", backend="cudf")
def test_the_same_pipeline_on_pandas_and_cudf_keeps_the_same_ids(sample_dir, tmp_path):
    from imgcurate import ImageTextPairDataset
    from imgcurate.dedup import ExactDuplicates, SemanticDeduplicator
    from imgcurate.embedders import TimmImageEmbedder

    _full_float32()
    weights = seeded_checkpoint(tmp_path, "test_resnet")
    results = {}
    for backend in ("pandas", "cudf"):
        ds = ImageTextPairDataset.from_webdataset(str(sample_dir), backend=backend)
        ds = ExactDuplicates()(ds)
        ds = TimmImageEmbedder("test_resnet", checkpoint_path=weights, device="cuda", autocast=False)(ds)
        ds = SemanticDeduplicator(n_clusters=4, eps=1e-4, kmeans_backend="sklearn", device="cpu")(ds)
        frame = ds.metadata.compute()
        results[backend] = (frame if backend == "pandas" else frame.to_pandas()).reset_index(drop=True)
    cpu, gpu = results["pandas"], results["cudf"]
    assert gpu["key"].tolist() == cpu["key"].tolist()
    assert gpu["exact_duplicate"].tolist() == cpu["exact_duplicate"].tolist()
    a, b = np.stack(cpu["image_embedding"]), np.stack(gpu["image_embedding"])
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(cpu["max_similarity"], gpu["max_similarity"], atol=1e-5)
    assert gpu["is_duplicate"].tolist() == cpu["is_duplicate"].tolist()


@pytest.mark.gpu("cuml")
def test_cuml_kmeans_finds_the_planted_clusters_like_sklearn():
    from test_dedup import _planted

    from imgcurate.dedup.semantic import _assign, kmeans

    x, _, _ = _planted(n=3000, d=32, seed=1)
    labels = {}
    for backend in ("sklearn", "cuml"):
        centroids, iterations = kmeans(x, 4, 100, 0, backend=backend)
        assert centroids.shape == (4, 32) and centroids.dtype == np.float32 and iterations >= 1
        labels[backend] = _assign(x, centroids)[0]
    # the same partition up to the numbering of the clusters
    pairs = set(zip(labels["sklearn"].tolist(), labels["cuml"].tolist(), strict=True))
    assert len(pairs) == len(set(labels["sklearn"].tolist()))


@pytest.mark.gpu("dask_cuda")
def test_workers_have_distinct_gpus_on_a_local_cuda_cluster_only():
    from dask_cuda import LocalCUDACluster
    from distributed import Client, LocalCluster

    with LocalCUDACluster(n_workers=1, dashboard_address=None) as cluster, Client(cluster) as client:
        assert device.workers_have_distinct_gpus(client)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        assert not device.workers_have_distinct_gpus(client)  # two workers on the same (first) GPU


@pytest.mark.gpu("dask_cuda")
def test_a_pipelines_cuda_cluster_gives_its_workers_the_configs_env_and_one_gpu_each():
    from imgcurate.pipeline import _cluster, check_cluster

    spec = check_cluster({"type": "cuda", "dashboard_address": ":0", "env": {"IMGCURATE_TEST_ENV": "set"}})
    with _cluster(spec) as client:
        seen = client.run(lambda: (os.environ.get("IMGCURATE_TEST_ENV"), os.environ["CUDA_VISIBLE_DEVICES"]))
        assert seen and all(value == "set" for value, _ in seen.values())
        assert len({gpus.split(",")[0] for _, gpus in seen.values()}) == len(seen)


@pytest.mark.gpu()
def test_bf16_autocast_embeddings_stay_within_the_dedup_eps_of_fp32(sample_ds, tmp_path):
    from imgcurate.dedup import SemanticDeduplicator
    from imgcurate.embedders import TimmImageEmbedder

    _full_float32()
    weights = seeded_checkpoint(tmp_path, "test_vit")
    eps = SemanticDeduplicator(n_clusters=2).eps[0]
    out = {}
    for autocast in (False, True):
        step = TimmImageEmbedder("test_vit", checkpoint_path=weights, device="cuda", autocast=autocast)
        out[autocast] = np.stack(step(sample_ds).metadata.compute()["image_embedding"])
    cos = (out[False] * out[True]).sum(axis=1)  # both normalised
    assert (1 - cos).max() < eps
