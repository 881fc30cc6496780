from __future__ import annotations

import os
import subprocess
import sys

import dask.dataframe as dd
import pandas as pd
import pyarrow.parquet as pq
import pytest

from imgcurate import AlignmentError, ImageTextPairDataset, ShardError
from imgcurate.backends import get_backend, resolve_backend_name
from imgcurate.io import read_keys


def test_one_partition_per_shard_in_order(sample_ds):
    assert sample_ds.metadata.npartitions == len(sample_ds.tar_files) == 4
    assert [os.path.basename(t) for t in sample_ds.tar_files] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    for i, tar in enumerate(sample_ds.tar_files):
        part = sample_ds.metadata.partitions[i].compute()
        assert part["key"].tolist() == read_keys(tar)
    df = sample_ds.metadata.compute()
    assert len(df) == 36
    assert {"key", "caption", "error", "width", "height", "source", "variant"} <= set(df.columns)
    assert df["error"].isna().all()
    assert (df["width"] > 0).all()


def test_meta_matches_partitions(sample_ds):
    meta = sample_ds.metadata._meta
    part = sample_ds.metadata.partitions[2].compute()
    assert list(meta.columns) == list(part.columns)
    assert list(meta.dtypes) == list(part.dtypes)


def test_missing_parquet_is_built_from_the_tar(sample_dir):
    original = pq.read_table(sample_dir / "00001.parquet").to_pandas()
    os.remove(sample_dir / "00001.parquet")
    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    assert (sample_dir / "00001.parquet").exists()
    rebuilt = ds.metadata.partitions[1].compute()
    for col in ["key", "caption", "width", "height", "source", "variant"]:
        assert rebuilt[col].tolist() == original[col].tolist(), col


def test_parquet_key_mismatch_names_shard_and_key(sample_dir):
    table = pq.read_table(sample_dir / "00002.parquet").to_pandas()
    table.loc[3, "key"] = "not-a-key"
    table.to_parquet(sample_dir / "00002.parquet", index=False)
    with pytest.raises(ShardError) as err:
        ImageTextPairDataset.from_webdataset(str(sample_dir))
    assert "00002.tar" in str(err.value) and "not-a-key" in str(err.value)


def test_parquet_missing_rows_is_an_error(sample_dir):
    table = pq.read_table(sample_dir / "00000.parquet").to_pandas().iloc[:-1]
    table.to_parquet(sample_dir / "00000.parquet", index=False)
    with pytest.raises(ShardError, match="00000.tar.*first key missing from parquet"):
        ImageTextPairDataset.from_webdataset(str(sample_dir))


def test_no_shards_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards in this folder$"):
        ImageTextPairDataset.from_webdataset(str(tmp_path))
    # img2dataset's other output formats: parquet files, or folders of image files
    (tmp_path / "00000.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards in this folder \(it holds \.parquet files but no "
                                                r"tars: imgcurate reads WebDataset shards, img2dataset's output_format "
                                                r"webdataset\)$"):  # fmt: skip
        ImageTextPairDataset.from_webdataset(str(tmp_path))
    (tmp_path / "00000.parquet").unlink()
    (tmp_path / "00000").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\(it holds folders: `imgcurate shard FOLDER OUT` turns a folder"):
        ImageTextPairDataset.from_webdataset(str(tmp_path))


def test_with_metadata_checks_partitions(sample_ds):
    df = sample_ds.metadata
    with pytest.raises(AlignmentError, match="3 partitions for 4 tar shards"):
        sample_ds.with_metadata(df.partitions[[0, 1, 3]])
    with pytest.raises(AlignmentError, match="1 partitions for 4"):
        sample_ds.with_metadata(df.repartition(npartitions=1))
    with pytest.raises(AlignmentError, match="no 'key' column"):
        sample_ds.with_metadata(df.drop(columns=["key"]))
    ok = sample_ds.with_metadata(df.assign(big=df.width > 500))
    assert "big" in ok.metadata.columns and ok.tar_files == sample_ds.tar_files


def test_heterogeneous_json_fields_are_unified(sample_dir):
    # a shard whose parquet has an extra column and lacks another: the frame has the union, nulls elsewhere
    t = pq.read_table(sample_dir / "00003.parquet").to_pandas()
    t = t.drop(columns=["variant"]).assign(license="cc-by")
    t.to_parquet(sample_dir / "00003.parquet", index=False)
    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    df = ds.metadata.compute()
    assert df["license"].notna().sum() == len(t)
    assert df["variant"].isna().sum() == len(t)


def test_save_metadata_round_trip(sample_ds, tmp_path):
    df = sample_ds.metadata
    ds = sample_ds.with_metadata(df.assign(area=df.width * df.height))
    written = ds.save_metadata(str(tmp_path / "meta"), columns=["area"])
    assert [os.path.basename(p) for p in written] == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
        "00003.parquet",
    ]
    back = pd.concat([pq.read_table(p).to_pandas() for p in written], ignore_index=True)
    assert list(back.columns) == ["key", "area"]
    expected = ds.metadata.compute()
    assert back["area"].tolist() == (expected["width"] * expected["height"]).tolist()
    # in place: the dataset re-opens with the new column
    ds.save_metadata()
    again = ImageTextPairDataset.from_webdataset(sample_ds.path)
    assert again.metadata["area"].compute().tolist() == back["area"].tolist()


def test_save_metadata_in_place_refuses_what_would_no_longer_describe_the_tars(sample_ds):
    """A row filter, or leaving out the status that excuses a failed download, would make the folder fail to open
    (and lose those rows): the shard's parquet is left as it was, and the error names it."""
    import glob

    import pyarrow as pa

    parquets = sorted(glob.glob(os.path.join(sample_ds.path, "*.parquet")))
    keys = {p: pq.read_table(p).column("key").to_pylist() for p in parquets}
    df = sample_ds.metadata
    with pytest.raises(ShardError, match=r"0000\d\.parquet: cannot be replaced by metadata with other rows"):
        sample_ds.with_metadata(df[df["variant"] != "resized"]).save_metadata()
    assert {p: pq.read_table(p).column("key").to_pylist() for p in parquets} == keys
    assert len(ImageTextPairDataset.from_webdataset(sample_ds.path).metadata) == sum(map(len, keys.values()))

    first = parquets[0]
    statuses = ["success"] * (len(keys[first]) - 1) + ["failed_to_resize"]
    pq.write_table(pq.read_table(first).append_column("status", pa.array(statuses)), first)
    ds = ImageTextPairDataset.from_webdataset(sample_ds.path)
    with pytest.raises(ShardError, match=r"00000\.parquet: cannot be replaced by metadata without its column 'status'"):
        ds.save_metadata(columns=["caption"])
    assert "status" in pq.read_schema(first).names
    ds.save_metadata(columns=["caption", "status"])  # kept: accepted; the error column holds no failure here
    again = ImageTextPairDataset.from_webdataset(sample_ds.path).metadata.compute()
    assert again["status"].tolist()[: len(statuses)] == statuses and again["caption"].notna().all()


def test_backend_choice():
    assert resolve_backend_name("pandas") == "pandas"
    assert get_backend("pandas").name == "pandas"
    with pytest.raises(ValueError, match="auto, pandas, cudf"):
        resolve_backend_name("polars")


def test_cpu_path_never_imports_gpu_libraries(sample_dir, tmp_path):
    # in a fresh interpreter: other test modules may import DALI for their own tests
    code = f"""
import sys, dask
dask.config.set({{"imgcurate.progress": False}})
from imgcurate import ImageTextPairDataset
from imgcurate.dedup import SemanticDeduplicator
from imgcurate.embedders import TimmImageEmbedder
ds = ImageTextPairDataset.from_webdataset({str(sample_dir)!r})
ds = SemanticDeduplicator(n_clusters=2)(TimmImageEmbedder("test_resnet", device="cpu")(ds))
ds = ds.with_metadata(ds.metadata.assign(keep=~ds.metadata.is_duplicate))
ds.to_webdataset({str(tmp_path / "out")!r}, filter_column="keep")
gpu = [m for m in sys.modules if m.split(".")[0] in ("cudf", "dask_cudf", "cuml", "cupy")]
gpu += [m for m in sys.modules if m.startswith("nvidia.dali")]
print(gpu)
sys.exit(1 if gpu else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_metadata_is_a_plain_dask_frame(sample_ds):
    assert isinstance(sample_ds.metadata, dd.DataFrame)
    assert "shards=4" in repr(sample_ds)


def _shards_with_columns(folder, columns_per_shard):
    """One 1-sample shard per entry of ``columns_per_shard`` ({column: arrow array of length 1}), a parquet beside."""
    import pyarrow as pa
    from conftest import write_tar

    folder.mkdir()
    for s, columns in enumerate(columns_per_shard):
        write_tar(folder / f"{s:05d}.tar", [(f"k{s}.jpg", b"jpeg bytes")])
        pq.write_table(pa.table({"key": [f"k{s}"], **columns}), folder / f"{s:05d}.parquet")
    return str(folder)


def test_column_types_that_other_shards_or_nulls_make_awkward_compute_and_export(tmp_path):
    import warnings

    import pyarrow as pa

    big = 0xF0E1D2C3B4A59687  # a 64-bit hash, above 2**63 - 1
    shards = [
        {
            "phash": pa.array([big], pa.uint64()),
            "mixed": pa.array([big], pa.uint64()),
            "n": pa.array([2**53 + 1], pa.int64()),
            "lang": pa.array(["en"]).dictionary_encode(),
            "only_here": pa.array(["x"]).dictionary_encode(),
            "source": pa.array(["camera"]).dictionary_encode(),
        },
        {
            "phash": pa.array([7], pa.uint64()),
            "mixed": pa.array([-3], pa.int8()),
            "n": pa.array([0.5], pa.float64()),
            "lang": pa.array([None], pa.string()).dictionary_encode(),  # a categorical column all null here
            "source": pa.array(["scan"]),  # plain text here, a categorical in the other shard
        },
    ]
    path = _shards_with_columns(tmp_path / "in", shards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageTextPairDataset.from_webdataset(path)
    assert any("'mixed' is uint64" in str(w.message) and "text" in str(w.message) for w in caught)
    got = ds.metadata.compute()
    assert got["phash"].tolist() == [big, 7]
    assert got["mixed"].tolist() == [str(big), "-3"]  # no integer type holds both: text, every digit kept
    assert got["n"].tolist() == [float(2**53), 0.5]  # read as floating point, as pandas would
    assert got["lang"].astype(object).tolist()[0] == "en" and pd.isna(got["lang"].iloc[1])
    assert got["only_here"].astype(object).tolist()[0] == "x" and pd.isna(got["only_here"].iloc[1])
    assert got["source"].tolist() == ["camera", "scan"]

    ds.to_webdataset(str(tmp_path / "out"))
    exported = pq.read_table(str(tmp_path / "out" / "00000.parquet"))
    assert exported.schema.field("phash").type == pa.uint64() and exported.column("phash").to_pylist() == [big, 7]
    assert ImageTextPairDataset.from_webdataset(str(tmp_path / "out")).metadata.compute()["phash"].tolist() == [big, 7]


def test_shards_past_99999_open_in_numeric_order(tmp_path):
    import pyarrow as pa
    from conftest import write_tar

    names = ["09999", "10000", "99999", "100000", "100001"]
    (tmp_path / "in").mkdir()
    for name in names:
        write_tar(tmp_path / "in" / f"{name}.tar", [(f"k{name}.jpg", b"jpeg bytes")])
        pq.write_table(pa.table({"key": [f"k{name}"]}), tmp_path / "in" / f"{name}.parquet")
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "in"))
    assert [os.path.basename(t)[:-4] for t in ds.tar_files] == names
    assert ds.metadata.compute()["key"].tolist() == [f"k{n}" for n in names]


def test_shard_files_sort_one_way_and_the_input_fingerprint_follows_that_order(tmp_path):
    import hashlib

    import fsspec

    from imgcurate.io._fs import files_in
    from imgcurate.rundir import input_fingerprint

    for name in ("s-10", "s-2", "1", "01"):
        (tmp_path / f"{name}.tar").write_bytes(b"")
    assert [os.path.basename(p) for p in files_in(fsspec.filesystem("file"), str(tmp_path), "*.tar")] == [
        "01.tar", "1.tar", "s-2.tar", "s-10.tar"
    ]  # fmt: skip
    # the fingerprint of a run directory's input hashes the names in that order (the step results of shard i belong
    # to the i-th tar): a run directory made when shards sorted as text is not reused for s-2 and s-10
    digest = hashlib.sha256()
    for name in ("01.tar", "1.tar", "s-2.tar", "s-10.tar"):
        info = os.stat(tmp_path / name)
        digest.update(f"{name}\0{info.st_size}\0{info.st_mtime}\n".encode())
    assert input_fingerprint(str(tmp_path)) == digest.hexdigest()
