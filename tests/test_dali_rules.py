"""DALI's version floor, error policy and pipeline reuse, on the CPU: a pipeline that cannot be built is an error (the
same on every shard), a bad image falls back for the rest of its shard only, and a thread builds one pipeline per
configuration for all its shards."""

from __future__ import annotations

import warnings

import pytest
from conftest import write_tar

from imgcurate.embedders import TimmImageEmbedder
from imgcurate.errors import MissingDependencyError
from imgcurate.io.tar import iter_samples

dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")


def test_dali_older_than_2_2_is_refused_when_the_step_is_built(monkeypatch):
    from imgcurate.embedders.dali import version_tuple

    assert version_tuple("2.2.0") == (2, 2, 0) and version_tuple("2.10.0dev") > version_tuple("2.2")
    emb = TimmImageEmbedder("test_vit", decoder="dali", device="cpu")
    assert type(emb.loader("cpu")).__name__ == "DaliLoader"
    monkeypatch.setattr(dali, "__version__", "1.40.0")
    with pytest.raises(MissingDependencyError, match=r"nvidia-dali 1\.40\.0 is installed.*nvidia-dali-cuda130>=2\.2"):
        emb.loader("cpu")


def test_a_pipeline_that_cannot_be_built_is_an_error_not_a_silent_fallback(sample_dir, monkeypatch, recwarn):
    from imgcurate.embedders.dali import DaliLoader, cached_pipelines

    cached_pipelines().clear()  # no pipeline built by an earlier test in this thread

    def unbuildable(self):
        raise TypeError("Got an unexpected argument 'adjust_orientation'")

    monkeypatch.setattr(DaliLoader, "_build", unbuildable)
    loader = TimmImageEmbedder("test_vit", decoder="dali", device="cpu").loader("cpu")
    tar = str(sample_dir / "00000.tar")
    from imgcurate.io.tar import read_keys

    with pytest.raises(RuntimeError, match=r"00000\.tar: cannot build the DALI pipeline on cpu: TypeError: .*adjust"):
        list(loader.batches(tar, read_keys(tar), None))
    assert not [w for w in recwarn if "DALI failed" in str(w.message)]  # no fallback was taken


def test_a_bad_image_still_falls_back_for_its_shard(tmp_path, sample_dir, builds):
    jpeg = next(s.image for s in iter_samples(str(sample_dir / "00000.tar")) if s.image_ext == "jpg")
    # cut in its scan data: the header reads, so the image reaches DALI (a bad header is an error row before it)
    write_tar(tmp_path / "00000.tar", [(f"{i}.jpg", jpeg if i != 3 else jpeg[: len(jpeg) // 2]) for i in range(6)])
    write_tar(tmp_path / "00001.tar", [(f"{i}.jpg", jpeg) for i in range(3)])
    loader = TimmImageEmbedder("test_vit", batch_size=2, decoder="dali", device="cpu").loader("cpu")
    rows, errors = [], {}
    with pytest.warns(UserWarning, match="DALI failed"):
        for batch in loader.batches(str(tmp_path / "00000.tar"), [str(i) for i in range(6)], None):
            rows += batch.rows
            errors.update(batch.errors)
    assert sorted(rows) == [0, 1, 2, 4, 5] and list(errors) == [3]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*DALI failed")
        assert sorted(_decoded(loader, str(tmp_path / "00001.tar"))) == [0, 1, 2]  # DALI again, on a new pipeline
    assert len(builds) == 2  # the pipeline that failed was dropped, not run again


def _decoded(loader, tar):
    from imgcurate.io.tar import read_keys

    out = {}
    for batch in loader.batches(tar, read_keys(tar), None):
        assert not batch.errors
        out.update(zip(batch.rows, batch.images, strict=True))
    return out


@pytest.fixture
def builds(monkeypatch):
    """The pipeline keys DALI pipelines were built for, starting from no cached pipeline in this thread."""
    from imgcurate.embedders import dali as dali_module

    built: list[tuple] = []
    build = dali_module.DaliLoader._build

    def counting(self):
        built.append(self.pipeline_key())
        return build(self)

    monkeypatch.setattr(dali_module.DaliLoader, "_build", counting)
    dali_module.cached_pipelines().clear()
    yield built
    dali_module.cached_pipelines().clear()


def test_one_pipeline_per_thread_and_configuration_decodes_every_shard(sample_dir, sample_ds, builds):
    import threading

    import dask
    import torch

    from imgcurate.embedders.dali import cached_pipelines

    emb = TimmImageEmbedder("test_vit", batch_size=4, decoder="dali", device="cpu")
    tars = [str(t) for t in sorted(sample_dir.glob("*.tar"))]
    reused = [_decoded(emb.loader("cpu"), tar) for tar in tars]  # a new loader per shard, as embed_shard makes them
    assert len(builds) == 1 and len(tars) == 4
    for tar, got in zip(tars, reused, strict=True):  # the same tensors as a pipeline built for that shard alone
        cached_pipelines().clear()
        fresh = _decoded(emb.loader("cpu"), tar)
        assert got.keys() == fresh.keys() and len(got) > 0
        assert all(torch.equal(got[row], fresh[row]) for row in got)
    assert len(builds) == 1 + len(tars)

    other = TimmImageEmbedder("test_vit", batch_size=3, decoder="dali", device="cpu").loader("cpu")
    _decoded(other, tars[0])
    _decoded(other, tars[1])
    assert builds[-1] != builds[0] and len(builds) == 2 + len(tars)  # another batch size: its own pipeline, once

    thread = threading.Thread(target=_decoded, args=(emb.loader("cpu"), tars[0]))
    thread.start()
    thread.join()
    assert builds[-1] == builds[0] and len(builds) == 3 + len(tars)  # another thread: its own pipeline

    cached_pipelines().clear()
    with dask.config.set(scheduler="sync"):  # the whole step, one thread: one pipeline for the 4 shards
        emb(sample_ds).metadata.compute()
    assert len(builds) == 4 + len(tars)
