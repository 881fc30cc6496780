"""Interop with the real consumers and producers: exports read back by the ``webdataset`` package and by DALI's
webdataset reader, and NeMo Curator's shard layout opened as is."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgcurate import ImageTextPairDataset
from imgcurate.dedup import ExactDuplicates
from imgcurate.embedders import TimmImageEmbedder
from imgcurate.io.tar import IMAGE_EXTENSIONS, iter_samples
from imgcurate.testing import sample_records


def _source_samples(ds):
    return {s.key: s.members for tar in ds.tar_files for s in iter_samples(tar)}


@pytest.fixture
def exported(sample_ds, tmp_path):
    df = sample_ds.metadata
    ds = sample_ds.with_metadata(df.assign(keep=df["variant"] != "resized"))
    out = ds.to_webdataset(str(tmp_path / "out"), filter_column="keep", samples_per_shard=7, old_id_col="old_key",
                           index_files=True)  # fmt: skip
    return sample_ds, out


def test_export_read_back_by_the_webdataset_package(exported):
    import webdataset as wds

    source, out = exported
    originals = _source_samples(source)
    meta = out.metadata.compute()
    got = list(wds.WebDataset(out.tar_files, shardshuffle=False))
    assert [s["__key__"] for s in got] == meta["key"].tolist()
    assert [s["txt"].decode() for s in got] == meta["caption"].tolist()
    for sample, old in zip(got, meta["old_key"], strict=True):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert members == originals[old]  # every member, byte for byte


def test_export_read_back_by_dalis_webdataset_reader(exported):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    from nvidia.dali import fn, pipeline_def

    source, out = exported
    originals = _source_samples(source)
    meta = out.metadata.compute()
    expected = [(originals[old], caption) for old, caption in zip(meta["old_key"], meta["caption"], strict=True)]
    for index in (False, True):

        @pipeline_def(batch_size=len(meta), num_threads=1, device_id=None)
        def pipe(index=index):
            image, text = fn.readers.webdataset(
                paths=out.tar_files,
                index_paths=[t[: -len(".tar")] + ".idx" for t in out.tar_files] if index else None,
                ext=[";".join(IMAGE_EXTENSIONS), "txt"],
                missing_component_behavior="error",
                random_shuffle=False,
            )
            return image, text

        p = pipe()
        p.build()
        images, texts = p.run()
        got = [(bytes(np.asarray(images.at(i))), bytes(np.asarray(texts.at(i))).decode()) for i in range(len(meta))]
        assert [g[1] for g in got] == [c for _, c in expected]
        for (data, _), (members, _) in zip(got, expected, strict=True):
            assert data in [members[e] for e in members if e in IMAGE_EXTENSIONS]


def test_nemo_curator_layout_opens_with_image_id(sample_dir, tmp_path):
    """NeMo Curator's image writer: ``images-<hex>-NNNNNN.tar`` shards, rows keyed by ``image_id``, members holding
    only the image (no ``.txt``/``.json``), and its parquet beside each tar."""
    nemo = tmp_path / "nemo"
    nemo.mkdir()
    for n, tar in enumerate(sorted(sample_dir.glob("*.tar"))):
        name = f"images-3f9a1c27e4b0-{n:06d}"
        ids, widths = [], []
        with tarfile.open(nemo / f"{name}.tar", "w") as out:
            for s in iter_samples(str(tar)):
                image_id = f"{name}-{s.key}"
                data = s.image
                info = tarfile.TarInfo(f"{image_id}.{s.image_ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
                ids.append(image_id)
                widths.append(len(data))
        pq.write_table(pa.table({"image_id": ids, "num_bytes": widths}), nemo / f"{name}.parquet")
    ds = ImageTextPairDataset.from_webdataset(str(nemo), id_col="image_id")
    assert ds.num_shards == 4 and len(ds.metadata) == 36
    ds = ExactDuplicates()(TimmImageEmbedder("test_resnet", batch_size=8, device="cpu")(ds))
    df = ds.metadata.compute()
    assert df["image_embedding"].notna().all()
    assert df["exact_duplicate"].sum() == 2  # the sample's two byte-identical copies
    assert df["exact_duplicate_of"].dropna().str.startswith("images-3f9a1c27e4b0-").all()
    ds = ds.with_metadata(ds.metadata.assign(keep=~ds.metadata["exact_duplicate"]))
    out = ds.to_webdataset(str(tmp_path / "out"), filter_column="keep", old_id_col="nemo_id")
    assert ImageTextPairDataset.from_webdataset(out.path, id_col="image_id").metadata["nemo_id"].compute().tolist() == (
        df.loc[~df["exact_duplicate"], "image_id"].tolist()
    )


@pytest.mark.skipif(shutil.which("wds2idx") is None, reason="DALI's wds2idx is not installed")
def test_index_of_a_macos_tar_with_upper_case_extensions_matches_wds2idx(tmp_path):
    from imgcurate.io.index import write_index

    jpeg = next(r.members["jpg"] for r in sample_records() if "jpg" in r.members)
    members = [
        ("._a.jpg", b"\0\5\26\7"),
        ("a.JPG", jpeg),
        ("a.txt", b"x"),
        ("dir/._b.jpg", b"\0\5\26\7"),
        ("dir/b.Jpeg", jpeg),
    ]
    with tarfile.open(tmp_path / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = write_index(str(tmp_path / "00000.tar"))
    subprocess.run([shutil.which("wds2idx"), str(tmp_path / "00000.tar"), str(tmp_path / "ref.idx")], check=True)
    assert open(ours).read() == (tmp_path / "ref.idx").read_text()
    assert ImageTextPairDataset.from_webdataset(str(tmp_path)).metadata["key"].compute().tolist() == ["a", "dir/b"]
