from __future__ import annotations

import io
import os
import tarfile

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tar_members

from imgcurate import AlignmentError, ImageTextPairDataset, ShardError, new_key
from imgcurate.io import ShardWriter
from imgcurate.io.tar import iter_samples


def _members_by_key(ds):
    """old key -> {ext: bytes} over all shards of a dataset."""
    out = {}
    for tar in ds.tar_files:
        for name, data in tar_members(tar).items():
            key, _, ext = name.partition(".")
            out.setdefault(key, {})[ext] = data
    return out


def _with_keep(ds, every=3):
    def mark(part):
        return part.assign(keep=[hash(k) % every != 0 for k in part["key"]])

    df = ds.metadata
    keep = df.map_partitions(mark, meta={**df.dtypes.to_dict(), "keep": bool})
    return ds.with_metadata(keep)


def test_export_keeps_exactly_the_true_rows_in_order_bytes_unchanged(sample_ds, tmp_path):
    ds = _with_keep(sample_ds)
    source = ds.metadata.compute()
    out = ds.to_webdataset(str(tmp_path / "out"), filter_column="keep", samples_per_shard=7, old_id_col="old_key")
    exported = out.metadata.compute().reset_index(drop=True)
    kept = source[source["keep"]].reset_index(drop=True)
    assert exported["old_key"].tolist() == kept["key"].tolist()
    assert exported["key"].tolist() == [new_key(i // 7, i % 7, 7) for i in range(len(kept))]
    for col in ["caption", "width", "height", "source", "variant", "keep"]:
        assert exported[col].tolist() == kept[col].tolist(), col
    # every member of every kept sample, byte for byte, renamed to the new key
    old = _members_by_key(sample_ds)
    new = _members_by_key(out)
    assert set(new) == set(exported["key"])
    for new_k, old_k in zip(exported["key"], exported["old_key"], strict=True):
        assert new[new_k] == old[old_k]
    # shard sizes and the parquet beside each tar
    assert [len(tar_members(t)) // 3 for t in out.tar_files][:-1] == [7] * (len(out.tar_files) - 1)
    for tar in out.tar_files:
        assert os.path.exists(tar[:-4] + ".parquet")


def test_export_all_rows_without_filter_and_row_filtered_frames(sample_ds, tmp_path):
    out = sample_ds.to_webdataset(str(tmp_path / "all"), samples_per_shard=100)
    assert len(out.tar_files) == 1 and len(out.metadata) == 36
    # a row-filtered frame keeps its partitioning and exports only its rows
    df = sample_ds.metadata
    small = sample_ds.with_metadata(df[df.width < 450])
    out2 = small.to_webdataset(str(tmp_path / "small"), old_id_col="old")
    assert out2.metadata["old"].compute().tolist() == df[df.width < 450]["key"].compute().tolist()


def test_list_columns_survive_export(sample_ds, tmp_path):
    def embed(part):
        rng = np.random.default_rng(len(part))
        return part.assign(emb=[rng.standard_normal(8).astype(np.float32) for _ in range(len(part))])

    df = sample_ds.metadata
    ds = sample_ds.with_metadata(df.map_partitions(embed, meta={**df.dtypes.to_dict(), "emb": object}))
    expected = ds.metadata.compute()
    out = ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=10)
    table = pq.read_table(out.tar_files[0][:-4] + ".parquet")
    assert table.schema.field("emb").type == pa.list_(pa.float32())
    got = out.metadata.compute()
    for a, b in zip(got["emb"], expected["emb"], strict=True):
        np.testing.assert_array_equal(np.asarray(a, dtype=np.float32), b)


def _typed_shards(folder):
    """Two shards whose parquet has a dictionary<int32> column, an int32 column and a float32 column (types that
    reading maps to dtypes which convert back to other arrow types)."""
    from PIL import Image

    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import encode_image

    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg")
    write_shards([Record({"jpg": jpg}, caption=f"photo {i}") for i in range(5)], str(folder), samples_per_shard=3)
    for parquet in sorted(folder.glob("*.parquet")):
        table = pq.read_table(parquet)
        n = table.num_rows
        source = pa.array(["camera", "scan", "camera"][:n]).dictionary_encode()
        table = table.append_column("source", source.cast(pa.dictionary(pa.int32(), pa.string())))
        table = table.append_column("rank", pa.array(range(n), pa.int32()))
        table = table.append_column("weight", pa.array([0.5] * n, pa.float32()))
        pq.write_table(table, parquet)
    return ImageTextPairDataset.from_webdataset(str(folder))


def test_reexporting_keeps_the_input_parquet_types_and_bytes(tmp_path):
    ds = _typed_shards(tmp_path / "in")
    schema = pq.read_schema(tmp_path / "in" / "00000.parquet").remove_metadata()
    assert schema.field("source").type == pa.dictionary(pa.int32(), pa.string())
    assert schema.field("error").type == pa.null()  # null in every shard: read, and written, as text
    schema = schema.set(schema.get_field_index("error"), pa.field("error", pa.string()))
    first = ds.to_webdataset(str(tmp_path / "first"))
    assert pq.read_schema(tmp_path / "first" / "00000.parquet").remove_metadata() == schema
    values = [d.metadata.compute().drop(columns="key").reset_index(drop=True) for d in (first, ds)]
    pd.testing.assert_frame_equal(*values)
    first.to_webdataset(str(tmp_path / "second"))
    names = sorted(os.listdir(tmp_path / "first"))
    assert names == sorted(os.listdir(tmp_path / "second")) and "00000.parquet" in names
    for name in names:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    # a column whose values no longer fit its input type, in one shard only, is wider in every output shard; one a
    # step gave another dtype keeps that dtype's type
    df = ds.metadata
    changed = ds.with_metadata(df.assign(rank=df["rank"].where(df["rank"] < 2, 2**40), source=df["source"].astype(str)))
    out = changed.to_webdataset(str(tmp_path / "changed"), samples_per_shard=2)
    for parquet in sorted((tmp_path / "changed").glob("*.parquet")):
        types = pq.read_schema(parquet)
        assert (types.field("rank").type, types.field("weight").type) == (pa.int64(), pa.float32()), parquet.name
        assert pa.types.is_string(types.field("source").type) or pa.types.is_large_string(types.field("source").type)
    assert out.metadata["rank"].compute().tolist() == [0, 1, 2**40, 0, 1]


def test_output_is_byte_identical_across_runs_and_schedulers(sample_ds, tmp_path):
    ds = _with_keep(sample_ds)
    with dask.config.set(scheduler="sync"):
        a = ds.to_webdataset(str(tmp_path / "a"), filter_column="keep", samples_per_shard=5)
    with dask.config.set(scheduler="threads", num_workers=4):
        b = ds.to_webdataset(str(tmp_path / "b"), filter_column="keep", samples_per_shard=5)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster):
            c = ds.to_webdataset(str(tmp_path / "c"), filter_column="keep", samples_per_shard=5)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(tmp_path / "c"))
    assert not [n for n in names if "tmp" in n]
    for name in names:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert len(a.tar_files) == len(b.tar_files) == len(c.tar_files)
    with tarfile.open(a.tar_files[0]) as tar:
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o644)}


def test_max_shards_and_existing_output(sample_ds, tmp_path):
    out = sample_ds.to_webdataset(str(tmp_path / "o"), samples_per_shard=4, max_shards=2)
    assert len(out.tar_files) == 2 and len(out.metadata) == 8
    with pytest.raises(FileExistsError):
        sample_ds.to_webdataset(str(tmp_path / "o"))
    again = sample_ds.to_webdataset(str(tmp_path / "o"), samples_per_shard=30, overwrite=True)
    assert sorted(os.listdir(tmp_path / "o")) == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "_imgcurate_export.json"
    ]  # fmt: skip
    assert len(again.metadata) == 36


def test_export_folders_with_glob_characters_touch_only_their_own_files(sample_ds, tmp_path):
    # a sibling whose name the output's would match as a glob pattern: its files must survive an overwrite
    sibling = tmp_path / "outAx"
    sibling.mkdir()
    (sibling / "00007.tar").write_bytes(b"not ours")
    (sibling / "00007.tar.tmp-abc").write_bytes(b"not ours either")
    for name in ("out?x", "out[1]"):
        out = sample_ds.to_webdataset(str(tmp_path / name), samples_per_shard=10)
        assert len(out.metadata) == 36 and len(out.tar_files) == 4
        with pytest.raises(FileExistsError):
            sample_ds.to_webdataset(str(tmp_path / name), samples_per_shard=30)
        again = sample_ds.to_webdataset(str(tmp_path / name), samples_per_shard=30, overwrite=True)
        assert len(again.tar_files) == 2
        assert sorted(os.listdir(tmp_path / name)) == [
            "00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "_imgcurate_export.json"
        ]  # fmt: skip
    assert sorted(os.listdir(sibling)) == ["00007.tar", "00007.tar.tmp-abc"]


def test_overwriting_an_img2dataset_folder_removes_its_statistics(sample_ds, tmp_path):
    out = tmp_path / "o"
    sample_ds.to_webdataset(str(out), samples_per_shard=10)
    for i in range(4):  # what img2dataset leaves beside each shard it downloaded
        (out / f"{i:05d}_stats.json").write_text('{"count": 10, "successes": 10}')
    again = sample_ds.to_webdataset(str(out), samples_per_shard=30, overwrite=True)
    assert len(again.metadata) == 36
    assert not [name for name in os.listdir(out) if name.endswith("_stats.json")]


def test_exporting_onto_the_input_through_a_symlink_is_refused(sample_ds, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(sample_ds.path, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in sorted(alias.iterdir())}
    with pytest.raises(ValueError, match="must differ"):
        sample_ds.to_webdataset(str(alias), samples_per_shard=10, overwrite=True)
    assert {p.name: p.read_bytes() for p in sorted(alias.iterdir())} == before


def test_bad_export_arguments(sample_ds, tmp_path):
    with pytest.raises(ValueError, match="not a metadata column"):
        sample_ds.to_webdataset(str(tmp_path / "o"), filter_column="nope")
    with pytest.raises(ValueError, match="must be boolean"):
        sample_ds.to_webdataset(str(tmp_path / "o"), filter_column="width")
    with pytest.raises(ValueError, match="must differ"):
        sample_ds.to_webdataset(sample_ds.path)
    df = sample_ds.metadata
    none = sample_ds.with_metadata(df.assign(k=df.width < 0))
    with pytest.raises(ValueError, match="no sample is selected"):
        none.to_webdataset(str(tmp_path / "o"), filter_column="k")
    assert not (tmp_path / "o").exists()  # nothing was made: the folder is as it was
    sample_ds.to_webdataset(str(tmp_path / "o"))
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    with pytest.raises(ValueError, match="no sample is selected"):
        none.to_webdataset(str(tmp_path / "o"), filter_column="k", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before  # the earlier export, nothing staged
    for bad in (0, -1, 2.0, True, np.bool_(True), "10"):
        with pytest.raises(ValueError, match="samples_per_shard must be an integer of at least 1"):
            sample_ds.to_webdataset(str(tmp_path / "p"), samples_per_shard=bad)
    # NumPy's integers are integers (a count computed with NumPy)
    out = sample_ds.to_webdataset(str(tmp_path / "p"), samples_per_shard=np.int64(20), max_shards=np.int32(1))
    assert out.num_shards == 1 and len(out.metadata) == 20


def test_a_column_of_numbers_and_text_names_the_shard_it_cannot_write(sample_ds, tmp_path):
    df = sample_ds.metadata

    def mixed(part, partition_info=None):
        values = [1 if partition_info["number"] == 2 and i == 0 else str(i) for i in range(len(part))]
        return part.assign(note=pd.Series(values, index=part.index, dtype=object))

    ds = sample_ds.with_metadata(df.map_partitions(mixed, meta={**df.dtypes.to_dict(), "note": object}))
    with pytest.raises(ShardError, match=r"00002\.tar: its metadata rows cannot be written to parquet "
                                         r"\(.*column note.*\): give each column one type$"):  # fmt: skip
        ds.to_webdataset(str(tmp_path / "o"))


def test_rows_whose_keys_name_no_sample_are_an_error_not_an_empty_export(sample_ds, tmp_path):
    df = sample_ds.metadata
    renamed = sample_ds.with_metadata(df.assign(key="img-" + df.key))
    with pytest.raises(ShardError, match=r"0000\d\.tar: the metadata's row for key 'img-.*' has no sample"):
        renamed.to_webdataset(str(tmp_path / "o"))
    assert not [p for p in (tmp_path / "o").iterdir() if p.suffix in (".tar", ".parquet")]
    # a row that records its failure (img2dataset's failed downloads) is still exported without a sample
    first = df.key.compute().iloc[0]
    failed = sample_ds.with_metadata(df.assign(key=df.key.where(df.key != first, "gone"),
                                               error=df.error.where(df.key != first, "failed: 404")))  # fmt: skip
    failed.to_webdataset(str(tmp_path / "p"))
    got = ImageTextPairDataset.from_webdataset(str(tmp_path / "p")).metadata.compute()
    assert len(got) == len(df) and got["error"].eq("failed: 404").sum() == 1


def test_reordered_partition_is_an_alignment_error(sample_ds, tmp_path):
    df = sample_ds.metadata
    shuffled = sample_ds.with_metadata(df.map_partitions(lambda p: p.iloc[::-1], meta=df._meta))
    with pytest.raises(AlignmentError, match=r"0000\d\.tar: .*no longer describes"):
        shuffled.to_webdataset(str(tmp_path / "o"))
    assert not [p for p in (tmp_path / "o").iterdir() if p.suffix in (".tar", ".parquet")]


def test_a_crash_mid_export_publishes_nothing_and_a_rerun_finishes_from_the_staged_shards(sample_ds, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    calls = {"n": 0}
    original = ShardWriter.write

    def flaky(self, key, members):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError("disk full")
        return original(self, key, members)

    monkeypatch.setattr(ShardWriter, "write", flaky)
    out = tmp_path / "o"
    with dask.config.set(scheduler="sync"), pytest.raises(OSError, match="disk full"):
        sample_ds.to_webdataset(str(out), samples_per_shard=10)
    # nothing is published: the folder holds no shard, only the staging folder with the one finished shard
    assert sorted(os.listdir(out)) == [".imgcurate-staging"]
    staged = sorted(p.name for p in (out / ".imgcurate-staging").iterdir() if p.is_file())
    finished = [n for n in staged if n.endswith((".tar", ".parquet"))]
    assert len(finished) == 2 and finished[1] == finished[0].replace(".parquet", ".tar")
    assert not [n for n in staged if ".tmp-" in n]  # the broken shard left nothing behind
    with pytest.raises(Exception, match="no .tar shards"):
        ImageTextPairDataset.from_webdataset(str(out))
    # the same export again writes only the shards that are missing, and ends as an uninterrupted run does
    monkeypatch.setattr(ShardWriter, "write", original)
    written = []
    monkeypatch.setattr(ShardWriter, "close", _counting_close(ShardWriter.close, written))
    again = sample_ds.to_webdataset(str(out), samples_per_shard=10)
    assert len(written) == again.num_shards - 1
    clean = sample_ds.to_webdataset(str(tmp_path / "clean"), samples_per_shard=10)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "clean"))
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert len(clean.metadata) == 36


def test_a_rerun_after_the_input_changed_does_not_reuse_shards_staged_from_the_old_bytes(sample_dir, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    """An export that failed on its second shard is rerun after an image in the input was replaced (same key, same
    metadata): the shard it staged holds the old bytes and is written again."""
    from conftest import write_tar

    original = ShardWriter.write
    calls = {"n": 0}

    def flaky(self, key, members):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError("disk full")
        return original(self, key, members)

    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    out = tmp_path / "o"
    monkeypatch.setattr(ShardWriter, "write", flaky)
    with dask.config.set(scheduler="sync"), pytest.raises(OSError, match="disk full"):
        ds.to_webdataset(str(out), samples_per_shard=10)
    monkeypatch.setattr(ShardWriter, "write", original)
    assert [p.name for p in (out / ".imgcurate-staging").glob("*.tar")]  # a finished shard is staged
    for tar in sorted(sample_dir.glob("*.tar")):  # every tar's first JPEG gets one byte more after its end
        members = list(tar_members(tar).items())
        first = next(n for n, _ in members if n.endswith(".jpg"))
        write_tar(tar, [(n, d + b"\0" if n == first else d) for n, d in members])
    again = ImageTextPairDataset.from_webdataset(str(sample_dir)).to_webdataset(str(out), samples_per_shard=10)

    def member_bytes(tars):  # every member's extension and bytes, in order over the tars
        return [(n.partition(".")[2], d) for tar in tars for n, d in tar_members(tar).items()]

    assert member_bytes(again.tar_files) == member_bytes(sorted(sample_dir.glob("*.tar")))


def _counting_close(close, written):
    def counting(self):
        written.append(self.tar_path)
        return close(self)

    return counting


def test_a_crash_while_publishing_is_an_error_at_open_and_a_rerun_finishes(sample_ds, tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    out = tmp_path / "o"
    sample_ds.to_webdataset(str(out), samples_per_shard=20)  # an older export, 2 shards
    moves = {"n": 0}
    original = local.LocalFileSystem.mv

    def dies(self, source, target, *args, **kwargs):
        if ".imgcurate-staging" in str(source) and ".imgcurate-staging" not in str(target):  # publishing
            moves["n"] += 1
            if moves["n"] == 3:  # after some of the new files replaced old ones
                raise KeyboardInterrupt("killed")
        return original(self, source, target, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "mv", dies)
    with pytest.raises(KeyboardInterrupt):
        sample_ds.to_webdataset(str(out), samples_per_shard=7, overwrite=True)
    monkeypatch.setattr(local.LocalFileSystem, "mv", original)
    with pytest.raises(ShardError, match="did not finish"):
        ImageTextPairDataset.from_webdataset(str(out))  # a mix of old and new shards is never opened
    again = sample_ds.to_webdataset(str(out), samples_per_shard=7, overwrite=True)
    assert again.num_shards == 6 and len(again.metadata) == 36
    assert not (out / ".imgcurate-staging").exists()


def test_the_shard_writer_writes_the_bytes_tarfile_writes(tmp_path):
    """Headers are built without tarfile but must be tarfile's, byte for byte: long names, non-ASCII names, empty
    members and whole blocks included."""
    samples = [
        ("000000000", {"jpg": b"x" * 513, "txt": b"", "seg.png": b"y" * 512}),
        ("k" * 120, {"json": b"{}"}),  # a GNU long-name block before the header
        ("k" * 96, {"jpg": b"100 bytes", "jpeg": b"101 bytes"}),
        ("clé", {"jpg": b"z" * 1000, "": b"no extension"}),
    ]
    with ShardWriter(str(tmp_path / "ours.tar")) as writer:
        for key, members in samples:
            writer.write(key, members)
    with tarfile.open(tmp_path / "theirs.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data),
                    0,
                    0o644,
                    0,
                    0,
                    "",
                    "",
                )
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "theirs.tar").read_bytes()
    read = [(s.key, s.members) for s in iter_samples(str(tmp_path / "ours.tar"))]
    assert read == samples  # "clé." reads back as the sample's member with an empty extension


def test_an_export_path_that_is_or_passes_through_a_file_is_named(sample_ds, tmp_path):
    (tmp_path / "a-file").write_bytes(b"keep me")
    for path in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
        with pytest.raises(NotADirectoryError, match=rf"^{path}: cannot be made a folder: {tmp_path / 'a-file'} is a "):
            sample_ds.to_webdataset(str(path))
    assert (tmp_path / "a-file").read_bytes() == b"keep me"


def test_an_export_that_another_export_overtook_in_the_same_folder_fails_instead_of_mixing(sample_ds, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    """Export X has staged its shards when export Y (another plan) runs into the same folder from start to end: X
    stops with an error saying so, and the folder holds Y's export alone."""
    import imgcurate.io.export as export
    from imgcurate import ConcurrentExportError

    out = tmp_path / "out"
    check = export._check_own_staging
    calls = []

    def overtaken(*args):
        calls.append(args)
        if len(calls) == 1:  # X, before it publishes: Y runs all the way
            sample_ds.to_webdataset(str(out), samples_per_shard=7, overwrite=True)
        return check(*args)

    monkeypatch.setattr(export, "_check_own_staging", overtaken)
    with pytest.raises(ConcurrentExportError, match=r"the staged shards are not this export's: another export into"):
        sample_ds.to_webdataset(str(out), samples_per_shard=5)
    back = ImageTextPairDataset.from_webdataset(str(out))
    assert back.num_shards == 6 and len(back.metadata) == 36  # Y's: 7 a shard


def test_a_published_shard_of_another_export_leaves_the_folder_marked_unfinished(sample_ds, tmp_path):
    """The last check before the manifest: each published shard holds the samples this export wrote into it."""
    import fsspec

    from imgcurate import ConcurrentExportError
    from imgcurate.io.export import STAGING, publish

    out = tmp_path / "out"
    sample_ds.to_webdataset(str(out), samples_per_shard=10)
    staging = out / STAGING
    staging.mkdir()
    for name in ("00000.tar", "00000.parquet"):
        (staging / name).write_bytes((out / name).read_bytes())
    with pytest.raises(ConcurrentExportError, match=r"00000\.parquet holds 10 samples where this export wrote 9"):
        publish(fsspec.filesystem("file"), str(out), 1, False, [9])
    with pytest.raises(ShardError, match="did not finish"):
        ImageTextPairDataset.from_webdataset(str(out))


def test_overwrite_replaces_the_shards_and_leaves_a_users_other_files(sample_ds, tmp_path):
    """--overwrite replaces the shards of the folder (tars, their parquets and indexes, img2dataset's stats), never a
    file that is no shard's: a user's own table or notes stay, and the folder still opens (with a warning)."""
    out = tmp_path / "out"
    sample_ds.to_webdataset(str(out), samples_per_shard=5)
    for name, data in [
        ("my_analysis.parquet", b"a user's table"),
        ("notes.txt", b"notes"),
        ("00000_stats.json", b"{}"),
    ]:
        (out / name).write_bytes(data)
    back = sample_ds.to_webdataset(str(out), samples_per_shard=20, overwrite=True)
    assert back.num_shards == 2 and len(back.metadata) == 36
    assert (out / "my_analysis.parquet").read_bytes() == b"a user's table" and (out / "notes.txt").exists()
    assert not (out / "00000_stats.json").exists() and not (out / "00002.tar").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "my_analysis.parquet").write_bytes(b"a user's table")
    # temporary-looking names of a user's, even one with our suffix's form: the export's own are its manifest's only
    mine = {"thesis.tex.tmp-v2": b"draft", "notes.txt.tmp-0123456789ab": b"notes", "_imgcurate_export.json.tmp-x": b""}
    for name, data in mine.items():
        (other / name).write_bytes(data)
    (other / "_imgcurate_export.json.tmp-0123456789ab").write_bytes(b"{")  # what a killed export leaves
    sample_ds.to_webdataset(str(other), samples_per_shard=20)  # a folder with no shard: no overwrite needed
    assert all((other / name).read_bytes() == data for name, data in mine.items())
    assert not (other / "_imgcurate_export.json.tmp-0123456789ab").exists()


def test_a_declared_embedding_is_exported_with_its_fixed_size_when_the_frame_holds_plain_lists(sample_ds, tmp_path):
    """cuDF holds a fixed-size list as a plain list; the types steps declare travel with the dataset, so the export
    writes the embedding column with its fixed size on either backend. Here the frame holds plain lists on pandas,
    as a cuDF partition converts."""
    from imgcurate.backends import embedding_type

    df = sample_ds.metadata
    plain = pd.ArrowDtype(pa.list_(pa.float32()))

    def lists(part):
        values = pa.array([[float(i), 1.0, 2.0] for i in range(len(part))], pa.list_(pa.float32()))
        return pd.DataFrame({"emb": pd.Series(values, dtype=plain, index=part.index)})

    columns = df.map_partitions(lists, meta=pd.DataFrame({"emb": pd.Series([], dtype=plain)}))
    declared = sample_ds.with_columns(columns, {"emb": embedding_type(3)})
    assert declared.column_types == {"emb": embedding_type(3)}
    assert declared.with_metadata(declared.metadata.drop(columns=["emb"])).column_types == {}
    declared.to_webdataset(str(tmp_path / "declared"))
    sample_ds.with_columns(columns).to_webdataset(str(tmp_path / "undeclared"))
    for name, expected in (("declared", embedding_type(3)), ("undeclared", pa.list_(pa.float32()))):
        for path in sorted((tmp_path / name).glob("*.parquet")):
            assert pq.read_schema(path).field("emb").type == expected
    back = pq.read_table(sorted((tmp_path / "declared").glob("*.parquet"))[0])
    assert back.column("emb").to_pylist()[:2] == [[0.0, 1.0, 2.0], [1.0, 1.0, 2.0]]
    # a column replaced without a declared type loses the one declared before, as one replaced by other values
    assert declared.with_columns(columns).column_types == {}
    other = declared.metadata.assign(emb=declared.metadata["key"])
    assert declared.with_metadata(other).column_types == {}
    assert declared.with_metadata(declared.metadata.assign(n=1)).column_types == {"emb": embedding_type(3)}


def test_steps_declare_their_column_types_on_the_dataset(sample_ds):
    from imgcurate.dedup import ExactDuplicates

    dedup = ExactDuplicates()
    assert dedup(sample_ds).column_types == dedup.output_columns()


def test_a_staging_folder_removed_by_another_export_while_selecting_is_named_as_such(sample_ds, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """Two exports into one folder at once: one may find the staging folder gone (the other published or cleaned
    up); that is the concurrent-export error, not a missing path of the staging folder."""
    import shutil

    import imgcurate.io.export as export_module
    from imgcurate.errors import ConcurrentExportError

    select = export_module._select

    def other_export_cleans_up(part, shard, stage_dir, *args):
        shutil.rmtree(os.path.dirname(os.path.join(stage_dir, "select")), ignore_errors=True)
        return select(part, shard, stage_dir, *args)

    monkeypatch.setattr(export_module, "_select", other_export_cleans_up)
    with pytest.raises(ConcurrentExportError, match="staging folder was removed while this export wrote into it"):
        sample_ds.to_webdataset(str(tmp_path / "out"))


def test_an_input_tar_missing_at_export_is_not_taken_for_a_concurrent_export(sample_dir, tmp_path):
    from imgcurate import ConcurrentExportError, ImageTextPairDataset

    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    os.remove(ds.tar_files[1])
    with pytest.raises(Exception) as raised:
        ds.to_webdataset(str(tmp_path / "out"))
    assert not isinstance(raised.value, ConcurrentExportError) and "00001.tar" in str(raised.value)
