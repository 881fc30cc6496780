"""``imgcurate doctor`` on a machine without a GPU: it must say what is missing or unusable, and fail a GPU config."""

from __future__ import annotations

import pytest

from imgcurate import device, doctor
from imgcurate.cli import main

GPU_CONFIG = """\
input: shards
backend: cudf
cluster: {type: cuda, n_workers: 2}
steps:
  - TimmImageEmbedder: {model_name: test_vit, decoder: dali, device: cuda}
  - SemanticDeduplicator: {n_clusters: 4, kmeans_backend: cuml-dask}
"""

CPU_CONFIG = """\
input: shards
backend: pandas
cluster: {n_workers: 2}
steps:
  - TimmImageEmbedder: {model_name: test_vit, decoder: pil, device: cpu}
  - SemanticDeduplicator: {n_clusters: 4, kmeans_backend: faiss}
"""


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(device, "driver_visible", lambda: False)
    for fn in (device.torch_cuda_problem, device.cudf_problem):
        fn.cache_clear()
    yield
    for fn in (device.torch_cuda_problem, device.cudf_problem):
        fn.cache_clear()


def test_doctor_reports_every_component_as_missing_or_not_run(no_gpu, capsys):
    assert main(["doctor"]) == 0  # nothing asked for, nothing failed
    out = capsys.readouterr().out
    assert "NVIDIA driver: none visible" in out
    for name in doctor.COMPONENTS:
        assert name in out
    report = doctor.diagnose()
    assert report.checks["torch CUDA"].installed and not report.checks["torch CUDA"].ran
    assert "no NVIDIA driver" in report.checks["torch CUDA"].detail
    assert not any(c.ran for c in report.checks.values())


def test_doctor_fails_a_gpu_config_and_passes_a_cpu_one(no_gpu, tmp_path, capsys):
    gpu, cpu = tmp_path / "gpu.yaml", tmp_path / "cpu.yaml"
    gpu.write_text(GPU_CONFIG)
    cpu.write_text(CPU_CONFIG)
    assert main(["doctor", "--config", str(gpu)]) == 1
    out = capsys.readouterr().out
    assert "cuDF" in out and "WOULD NOT WORK  (backend: cudf)" in out
    assert "steps[1].SemanticDeduplicator.kmeans_backend: cuml-dask" in out
    assert "steps[0].TimmImageEmbedder.decoder: dali" in out
    assert main(["doctor", "--config", str(cpu)]) == 0
    assert "the config needs" not in capsys.readouterr().out


def test_requirements_read_from_the_config_as_written():
    import yaml

    needs = doctor.requirements(yaml.safe_load(GPU_CONFIG))
    assert set(needs) == {"cuDF", "dask_cudf", "dask-cuda", "torch CUDA", "DALI", "cuML", "raft-dask"}
    assert needs["dask-cuda"] == ["cluster.type: cuda", "steps[1].SemanticDeduplicator.kmeans_backend: cuml-dask"]
    assert doctor.requirements({"steps": [{"SemanticDeduplicator": {"n_clusters": 2, "device": "cuda"}}]}) == {
        "torch CUDA": ["steps[0].SemanticDeduplicator.device: cuda"],
        "CuPy": ["steps[0].SemanticDeduplicator.device: cuda"],
    }
    assert doctor.requirements(yaml.safe_load(CPU_CONFIG)) == {}


def test_a_component_that_is_installed_but_fails_is_reported_with_its_reason(monkeypatch):
    monkeypatch.setattr(device, "driver_visible", lambda: True)

    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient\nmore lines")

    monkeypatch.setitem(doctor.COMPONENTS, "torch CUDA", doctor.Component("torch", ("torch",), broken, "a sum"))
    c = doctor.check("torch CUDA")
    assert c.installed and not c.ran
    assert c.detail == "a sum failed: cudaErrorInsufficientDriver: CUDA driver version is insufficient"
    report = doctor.Report({"torch CUDA": c}, {"torch CUDA": ["cluster.type: cuda"]})
    assert report.exit_code == 1 and "FAIL torch CUDA" in doctor.render(report)


def test_dali_probe_decodes_on_the_cpu_and_checks_the_floor(monkeypatch):
    pytest.importorskip("nvidia.dali")
    import nvidia.dali

    doctor.dali_probe("cpu")  # the same pipeline as on the GPU, with the CPU decoder
    monkeypatch.setattr(nvidia.dali, "__version__", "1.40.0")
    with pytest.raises(ImportError, match=r"nvidia-dali 1\.40\.0 is installed; .*adjust_orientation from 2\.2"):
        doctor.dali_probe("cpu")


def test_doctor_imports_no_gpu_library_without_a_driver(no_gpu):
    import sys

    doctor.diagnose({"backend": "cudf"})
    assert not {"cudf", "cuml", "cupy", "dask_cuda", "raft_dask"} & set(sys.modules)


def test_doctor_lists_every_missing_weights_file_of_a_step_and_of_its_fused_heads(no_gpu, sample_dir, tmp_path,
                                                                                     capsys, fresh_models):  # fmt: skip
    """A run stops at the first missing file; the doctor lists them all: the tower's and each head's."""
    from imgcurate.embedders.timm import pretrained_weights_cached

    model = "vit_base_patch32_clip_224.openai"
    if pretrained_weights_cached(model):
        pytest.skip("this machine's cache holds the tower's weights")
    config = tmp_path / "p.yaml"
    config.write_text(f"""\
input: {sample_dir}
steps:
  - TimmImageEmbedder: {{model_name: {model}, pretrained: true, device: cpu,
                        classifiers: [AestheticClassifier: {{}}, NsfwClassifier: {{}}]}}
""")  # fmt: skip
    assert main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    missing = [line for line in out.splitlines() if "would not work" in line]
    assert len(missing) == 3, out
    assert model in missing[0]
    assert "sa_0_4_vit_b_32_linear.pth" in missing[1] and "clip_autokeras_nsfw_b32.zip" in missing[2]
