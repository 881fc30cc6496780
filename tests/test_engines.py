"""CPU inference engines: each candidate against torch fp32 on real photos, the fallback, the disk cache."""

from __future__ import annotations

import importlib.util
import os
import sys

import dask
import numpy as np
import pytest
import torch
from conftest import seeded_checkpoint

from imgcurate import cpu
from imgcurate._models import clear
from imgcurate.embedders import TimmImageEmbedder, engines
from imgcurate.errors import MissingDependencyError

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="openvino is not installed (pip install 'imgcurate[cpu]'; .ci/run installs it)",
)


@pytest.fixture(autouse=True)
def _fresh(fresh_models):
    """A private cache of converted models and an empty model cache per test (see conftest)."""


def _embed(ds, name="test_resnet", **kwargs) -> np.ndarray:
    return np.stack(TimmImageEmbedder(name, device="cpu", **kwargs)(ds).metadata.compute()["image_embedding"])


def _cached(tmp_path) -> list[str]:
    folder = tmp_path / "home" / "engines"
    return sorted(f for f in os.listdir(folder) if f.endswith(".xml")) if folder.exists() else []


@needs_openvino
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_openvino_embeddings_match_torch_fp32_on_every_photo(sample_ds, name, precision):
    want = _embed(sample_ds, name, engine="torch", precision="fp32")
    got = _embed(sample_ds, name, engine="openvino", precision=precision)
    assert (got * want).sum(axis=1).min() >= engines.MIN_COSINE  # both L2-normalised: a dot product is the cosine


def test_auto_keeps_an_engine_that_matches_torch(sample_ds):
    want = _embed(sample_ds, engine="torch", precision="fp32")
    got = _embed(sample_ds, engine="auto")
    assert (got * want).sum(axis=1).min() >= engines.MIN_COSINE


def test_channels_last_gives_the_same_embeddings(sample_ds):
    emb = TimmImageEmbedder("test_resnet", device="cpu", engine="torch")
    assert "channels-last" in emb.model("cpu").name
    module = TimmImageEmbedder("test_resnet").load_model("cpu")
    assert not engines.is_convolutional(TimmImageEmbedder("test_vit").load_model("cpu"))
    x = engines.probe_batch(emb.preprocess)
    with torch.no_grad():
        np.testing.assert_allclose(emb.model("cpu")(x).numpy(), module(x).numpy(), rtol=1e-4, atol=1e-5)


def test_auto_drops_a_candidate_that_differs_from_torch(sample_ds, monkeypatch):
    def bad(req):
        def run(x):
            with torch.no_grad():
                out = req.module(x.contiguous())
            return out + torch.randn_like(out) * out.abs().mean()  # fast but wrong

        return [engines.EngineModel("bad fp32", run)]

    monkeypatch.setitem(engines.BUILDERS, "bad", (lambda: True, bad))
    emb = TimmImageEmbedder("test_resnet", device="cpu", engine="auto")
    with pytest.warns(UserWarning, match="engine bad fp32 is not used.*min cosine"):
        chosen = emb.model("cpu")
    assert not chosen.name.startswith("bad")
    np.testing.assert_allclose(_embed(sample_ds), _embed(sample_ds, engine="torch"), atol=1e-2)


def test_auto_records_its_choice_so_every_later_process_uses_the_same_engine(tmp_path, monkeypatch):
    def twin(name):
        def build(req):
            def run(x):
                with torch.no_grad():
                    return req.module(x.contiguous())

            return [engines.EngineModel(f"{name} fp32", run)]

        return build

    monkeypatch.setattr(engines, "BUILDERS", {"a": (lambda: True, twin("a")), "b": (lambda: True, twin("b"))})
    timed = []

    def rates(favour):
        def fake(candidates, batch, rounds):
            timed.append([c.name for c in candidates])
            return [2.0 if c.name.startswith(favour) else 1.0 for c in candidates]

        return fake

    module = TimmImageEmbedder("test_resnet").load_model("cpu")
    probe = engines.probe_batch(TimmImageEmbedder("test_resnet").preprocess)
    kwargs = {"engine": "auto", "precision": "fp32", "batch_size": 4, "probe": probe, "threads": 1, "streams": 1,
              "key": "test_resnet", "cache_dir": str(tmp_path / "engines")}  # fmt: skip
    monkeypatch.setattr(engines, "_time", rates("b"))
    assert engines.prepare(module, **kwargs).name == "b fp32" and len(timed) == 1
    monkeypatch.setattr(engines, "_time", rates("a"))  # the machine got busy: a would win a new race
    assert engines.prepare(module, **kwargs).name == "b fp32" and len(timed) == 1  # the record decides, no timing
    other = dict(kwargs, batch_size=8)  # another thread layout or batch is another decision
    assert engines.prepare(module, **other).name == "a fp32" and len(timed) == 2
    # two processes racing: the one that records first wins, the other adopts its choice
    record = engines.choice_path(engines.Request(module, tuple(probe.shape[1:]), ("fp32",), 1, 1, "test_resnet",
                                                 kwargs["cache_dir"]), ["a fp32", "b fp32"], 16)  # fmt: skip
    os.makedirs(os.path.dirname(record), exist_ok=True)
    monkeypatch.setattr(engines, "_read_choice", lambda path, real=engines._read_choice: None if path == record
                        and len(timed) == 2 else real(path))  # fmt: skip
    with open(record, "w") as f:
        f.write("b fp32")
    assert engines.prepare(module, **dict(kwargs, batch_size=16)).name == "b fp32" and len(timed) == 3


def test_a_failing_explicit_engine_falls_back_to_torch(monkeypatch):
    def bad(req):
        return [engines.EngineModel("openvino fp32", lambda x: torch.zeros(len(x), 8) + torch.arange(8.0))]

    monkeypatch.setitem(engines.BUILDERS, "openvino", (lambda: True, bad))
    with pytest.warns(UserWarning, match="not used"):
        chosen = TimmImageEmbedder("test_resnet", engine="openvino", precision="fp32").model("cpu")
    assert chosen.name.startswith("torch fp32")


def test_without_openvino_auto_is_torch_and_openvino_is_an_error(monkeypatch):
    monkeypatch.setitem(engines.BUILDERS, "openvino", (lambda: False, engines.BUILDERS["openvino"][1]))
    assert TimmImageEmbedder("test_resnet", engine="auto").model("cpu").name.startswith("torch fp32")
    with pytest.raises(MissingDependencyError, match="imgcurate\\[cpu\\]"):
        TimmImageEmbedder("test_resnet", engine="openvino")
    with pytest.raises(ValueError, match="engine must be one of"):
        TimmImageEmbedder("test_resnet", engine="onnx")
    with pytest.raises(ValueError, match="precision must be one of"):
        TimmImageEmbedder("test_resnet", precision="fp16")


@needs_openvino
def test_converted_model_is_cached_on_disk_and_keyed_by_weights(tmp_path, monkeypatch):
    import openvino

    a = seeded_checkpoint(tmp_path, "test_resnet", seed=0)
    TimmImageEmbedder("test_resnet", checkpoint_path=a, engine="openvino", precision="fp32").model("cpu")
    assert len(_cached(tmp_path)) == 1

    clear()  # a new worker process: the conversion is read back, not redone

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    TimmImageEmbedder("test_resnet", checkpoint_path=a, engine="openvino", precision="fp32").model("cpu")
    monkeypatch.undo()
    monkeypatch.setenv("IMGCURATE_HOME", str(tmp_path / "home"))
    assert len(_cached(tmp_path)) == 1

    # other weights under the same path and name: a new entry, and embeddings of the new weights
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = seeded_checkpoint(b_dir, "test_resnet", seed=1)
    os.replace(b, a)
    clear()
    model = TimmImageEmbedder("test_resnet", checkpoint_path=a, engine="openvino", precision="fp32").model("cpu")
    assert len(_cached(tmp_path)) == 2
    reference = TimmImageEmbedder("test_resnet", checkpoint_path=a, engine="torch").model("cpu")
    x = engines.probe_batch(TimmImageEmbedder("test_resnet").preprocess)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), reference(x).numpy(), rtol=1e-3, atol=1e-4)


def test_cpu_settings():
    assert cpu.keep_freed_memory() in (True, False)
    assert cpu.keep_freed_memory() == cpu.keep_freed_memory()  # idempotent
    # reuse_freed_memory undoes only the nanny's default; malloc settings a process was started with are its owner's
    assert not cpu._malloc_chosen({}) and not cpu._malloc_chosen({"MALLOC_TRIM_THRESHOLD_": "65536"})
    assert cpu._malloc_chosen(cpu.MALLOC_ENV) and cpu._malloc_chosen({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert cpu._malloc_chosen({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})
    kwargs = cpu.local_cluster_kwargs({"memory_limit": "4GB"})
    assert kwargs["n_workers"] == cpu.cpu_count() and kwargs["threads_per_worker"] == 1
    assert kwargs["env"]["MALLOC_MMAP_MAX_"] == "0" and kwargs["memory_limit"] == "4GB"
    assert cpu.local_cluster_kwargs({"n_workers": 3})["n_workers"] == 3
    assert "env" not in cpu.local_cluster_kwargs({"processes": False})
    assert cpu.model_threads(calls=1) == cpu.cpu_count()
    assert cpu.model_threads(calls=10**6) == 1


def _page_faults_of_large_blocks() -> int:
    """Minor page faults while 20 arrays of 3 MiB (768 pages; from 4 MiB on numpy asks for huge pages) are made,
    filled and freed one after the other."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(3 * 2**18, dtype=np.float32)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tunables")
def test_a_nanny_worker_reuses_freed_large_blocks_once_it_has_run_a_step():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, which keeps glibc from adapting its mmap
    threshold: every 3 MiB array is mapped and zero-filled afresh (768 page faults each). After one of the steps'
    tasks has run there (:func:`imgcurate.cpu.reuse_freed_memory`), freed blocks are reused."""
    from distributed import Client, LocalCluster

    from imgcurate.dedup import SemanticDeduplicator
    from imgcurate.synthetic import synthetic_dataset

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as client:
            (fresh,) = client.run(_page_faults_of_large_blocks).values()
            ds = synthetic_dataset(2, rows_per_shard=20, dim=8, seed=1)
            columns = SemanticDeduplicator(n_clusters=2).added(ds)
            assert len(client.compute(columns).result()) == 40
            (after,) = client.run(_page_faults_of_large_blocks).values()
    if "MALLOC_TRIM_THRESHOLD_" in str(dask.config.get("distributed.nanny.pre-spawn-environ", {})):
        assert fresh >= 10 * 768, fresh  # the nanny's setting: each array faulted in page by page
    assert after < 2 * 768, after


@needs_openvino
def test_openvino_requests_are_shared_by_threads_made_after_the_preparation():
    """The infer requests are pooled (made and run once per stream when the model is prepared): threads that the
    scheduler starts later take one each and get the same embeddings as one call at a time."""
    import concurrent.futures

    emb = TimmImageEmbedder("test_resnet", device="cpu", engine="openvino", precision="fp32")
    model = emb.model("cpu")
    x = engines.probe_batch(emb.preprocess)
    want = model(x)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: model(x), range(16)):
            assert torch.equal(got, want)
