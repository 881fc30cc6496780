"""The one device rule, with the driver, torch and cuDF probes stubbed: runs on any machine."""

from __future__ import annotations

import sys
import types

import pytest

from imgcurate import device


@pytest.fixture
def fresh(monkeypatch):
    """The cached answers forgotten before and after the test."""

    def clear():
        for fn in (device.torch_cuda_problem, device.torch_cuda_usable, device.cudf_problem, device.cudf_usable):
            fn.cache_clear()

    clear()
    yield monkeypatch
    clear()


def _fake_torch(available: bool, fails: bool = False, cuda: str = "13.0"):
    torch = types.ModuleType("torch")
    torch.__version__ = "2.14.1"
    torch.version = types.SimpleNamespace(cuda=cuda)
    torch.cuda = types.SimpleNamespace(is_available=lambda: available)

    class _T:
        def sum(self):
            return self

        def item(self):
            return 2

    def ones(n, device):
        if fails:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return _T()

    torch.ones = ones
    return torch


def test_no_driver_means_cpu_without_importing_anything(fresh):
    fresh.setattr(device, "driver_visible", lambda: False)
    fresh.delitem(sys.modules, "cudf", raising=False)
    assert device.resolve_device("auto") == "cpu"
    assert device.resolve_device("cuda:1") == "cuda:1"  # an explicit choice is kept
    assert device.torch_cuda_problem() == "no NVIDIA driver is visible"
    assert not device.cudf_usable()
    assert "cudf" not in sys.modules


def test_cuda_visible_devices_empty_hides_the_driver(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not device.driver_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not device.driver_visible()


def test_a_working_gpu_means_cuda(fresh):
    fresh.setattr(device, "driver_visible", lambda: True)
    fresh.setitem(sys.modules, "torch", _fake_torch(available=True))
    fresh.setattr(device.importlib.util, "find_spec", lambda name: object())
    assert device.torch_cuda_problem() is None
    assert device.resolve_device("auto") == "cuda"


def test_a_visible_driver_too_old_for_the_build_means_cpu_with_the_reason(fresh, tmp_path):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    fresh.setattr(device, "_DRIVER_FILE", str(version))
    fresh.setattr(device, "driver_visible", lambda: True)
    fresh.setitem(sys.modules, "torch", _fake_torch(available=False))
    fresh.setattr(device.importlib.util, "find_spec", lambda name: object())
    assert device.driver_version() == "535.104.05"
    with pytest.warns(UserWarning, match=r"driver 535\.104\.05 is older than CUDA 13\.0 needs \(driver >= 580\)"):
        assert device.resolve_device("auto") == "cpu"
    assert "CUDA 12 builds" in device.torch_cuda_problem()


def test_an_operation_that_fails_means_cpu(fresh):
    fresh.setattr(device, "driver_visible", lambda: True)
    fresh.setitem(sys.modules, "torch", _fake_torch(available=True, fails=True))
    fresh.setattr(device.importlib.util, "find_spec", lambda name: object())
    with pytest.warns(UserWarning, match="no kernel image"):
        assert not device.gpu_available()


def test_cudf_that_cannot_run_means_pandas(fresh):
    from imgcurate.backends import resolve_backend_name

    cudf = types.ModuleType("cudf")

    def series(values):
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime")

    cudf.Series = series
    fresh.setattr(device, "driver_visible", lambda: True)
    fresh.setattr(device.importlib.util, "find_spec", lambda name: object())
    fresh.setitem(sys.modules, "cudf", cudf)
    with pytest.warns(UserWarning, match="cudf cannot use the GPU .*InsufficientDriver.*; using the pandas backend"):
        assert resolve_backend_name("auto") == "pandas"


class _Client:
    def __init__(self, answers):
        self.answers = answers

    def run(self, func):
        assert func is device.worker_gpu  # a module-level function: it pickles by name to the workers
        if isinstance(self.answers, Exception):
            raise self.answers
        return self.answers


@pytest.mark.parametrize(
    "answers, distinct",
    [
        ({"tcp://a": "GPU-0", "tcp://b": "GPU-1"}, True),  # dask-cuda: one GPU each
        ({"tcp://a": "GPU-0"}, True),  # one worker, one GPU
        ({"tcp://a": "GPU-0", "tcp://b": "GPU-0"}, False),  # a LocalCluster of two workers on one GPU
        ({"tcp://a": "GPU-0", "tcp://b": None}, False),  # a worker without a GPU
        ({}, False),  # no workers
        (OSError("timed out"), False),
    ],
)
def test_workers_have_distinct_gpus(answers, distinct, recwarn):
    assert device.workers_have_distinct_gpus(_Client(answers)) is distinct
    if isinstance(answers, Exception):
        assert "could not ask the Dask workers" in str(recwarn.pop(UserWarning).message)


def test_no_client_has_no_distinct_gpus():
    assert device.workers_have_distinct_gpus(None) is False


def test_worker_gpu_is_the_first_visible_device(monkeypatch):
    monkeypatch.setattr(device, "driver_visible", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: the entry itself names the device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,0,1")
    assert device.worker_gpu() == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3e,GPU-11aa")
    assert device.worker_gpu() == "GPU-8f3e"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert device.worker_gpu() == "0"
    monkeypatch.setattr(device, "driver_visible", lambda: False)
    assert device.worker_gpu() is None


def test_kmeans_backend_follows_the_workers_gpus(monkeypatch):
    """On cuDF, cuml-dask only when the workers hold distinct GPUs; otherwise single-GPU cuML."""
    from imgcurate.dedup import semantic
    from imgcurate.dedup.semantic import SemanticDeduplicator

    monkeypatch.setattr(semantic, "on_gpu", lambda meta: True)
    monkeypatch.setattr(semantic, "_check_kmeans_backend", lambda name: None)
    step = SemanticDeduplicator(n_clusters=2)
    for answers, expected in (({"a": "GPU-0", "b": "GPU-1"}, "cuml-dask"), ({"a": "GPU-0", "b": "GPU-0"}, "cuml")):
        monkeypatch.setattr(semantic.progress, "distributed_client", lambda answers=answers: _Client(answers))
        assert step.kmeans_backend_for(None) == expected
    monkeypatch.setattr(semantic.progress, "distributed_client", lambda: None)
    assert step.kmeans_backend_for(None) == "cuml"
    monkeypatch.setattr(semantic, "on_gpu", lambda meta: False)
    assert step.kmeans_backend_for(None) == "faiss"


def test_a_cuda_clusters_env_reaches_every_worker_beside_the_gpu_dask_cuda_gives_it():
    from imgcurate.pipeline import with_worker_env

    # the shape of dask-cuda's LocalCUDACluster.new_worker_spec: its env holds only the worker's GPU list
    specs = {0: {"cls": "Nanny", "options": {"env": {"CUDA_VISIBLE_DEVICES": "0,1"}, "nthreads": 1}},
             1: {"cls": "Nanny", "options": {"env": {"CUDA_VISIBLE_DEVICES": "1,0"}, "nthreads": 1}}}  # fmt: skip
    out = with_worker_env(specs, {"OMP_NUM_THREADS": 4, "CUDA_VISIBLE_DEVICES": "7"})
    assert out[0]["options"] == {"env": {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, "nthreads": 1}
    assert out[1]["options"]["env"] == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "1,0"}
    assert specs[0]["options"]["env"] == {"CUDA_VISIBLE_DEVICES": "0,1"}  # the specs given are left as they were
    assert with_worker_env({0: {"cls": "Nanny", "options": {}}}, {"A": "b"})[0]["options"] == {"env": {"A": "b"}}


def test_a_cuda_cluster_shares_one_rmm_pool_with_torch_and_cupy(monkeypatch):
    from imgcurate import pipeline

    monkeypatch.setattr(pipeline.importlib.util, "find_spec", lambda name: object() if name == "torch" else None)
    assert pipeline.cuda_cluster_options({"n_workers": 2}) == {
        "n_workers": 2,
        "rmm_async": True,
        "rmm_allocator_external_lib_list": ["torch"],  # CuPy only where installed (dask-cuda imports it)
    }
    own = {"rmm_pool_size": "10GB"}  # the config's own RMM setup is kept (a pool cannot be combined with async)
    assert pipeline.cuda_cluster_options(own) == {**own, "rmm_allocator_external_lib_list": ["torch"]}
    assert pipeline.cuda_cluster_options({"rmm_async": False}) == {"rmm_async": False}
    asked = {"rmm_allocator_external_lib_list": ["cupy"]}
    assert pipeline.cuda_cluster_options(asked)["rmm_allocator_external_lib_list"] == ["cupy"]
