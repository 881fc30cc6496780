"""DALI's version floor and error policy, on the CPU: a pipeline that cannot be built is an error (the same on every
shard), a bad image falls back for the rest of its shard only."""

from __future__ import annotations

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
    from imgcurate.embedders.dali import DaliLoader

    def unbuildable(self, tar):
        raise TypeError("Got an unexpected argument 'adjust_orientation'")

    monkeypatch.setattr(DaliLoader, "_pipeline", unbuildable)
    loader = TimmImageEmbedder("test_vit", decoder="dali", device="cpu").loader("cpu")
    tar = str(sample_dir / "00000.tar")
    from imgcurate.io.tar import read_keys

    with pytest.raises(RuntimeError, match=r"00000\.tar: cannot build the DALI pipeline on cpu: TypeError: .*adjust"):
        list(loader.batches(tar, read_keys(tar), None))
    assert not [w for w in recwarn if "DALI failed" in str(w.message)]  # no fallback was taken


def test_a_bad_image_still_falls_back_for_its_shard(tmp_path, sample_dir):
    jpeg = next(s.image for s in iter_samples(str(sample_dir / "00000.tar")) if s.image_ext == "jpg")
    write_tar(tmp_path / "00000.tar", [(f"{i}.jpg", jpeg if i != 3 else jpeg[:400]) for i in range(6)])
    loader = TimmImageEmbedder("test_vit", batch_size=2, decoder="dali", device="cpu").loader("cpu")
    rows, errors = [], {}
    with pytest.warns(UserWarning, match="DALI failed"):
        for batch in loader.batches(str(tmp_path / "00000.tar"), [str(i) for i in range(6)], None):
            rows += batch.rows
            errors.update(batch.errors)
    assert sorted(rows) == [0, 1, 2, 4, 5] and list(errors) == [3]
