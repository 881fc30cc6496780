"""Every kind of bad input gets a clear error naming the file, or an error row; no sample is lost."""

from __future__ import annotations

import os

import pytest
from conftest import tar_members, write_tar

from imgcurate import ImageTextPairDataset, ShardError
from imgcurate.testing import encode_image


@pytest.fixture
def jpeg():
    from PIL import Image

    return encode_image(Image.new("RGB", (32, 24), (200, 30, 30)), "jpg")


def _open(folder):
    return ImageTextPairDataset.from_webdataset(str(folder))


def test_truncated_tar_names_the_file(tmp_path, jpeg):
    write_tar(tmp_path / "00000.tar", [(f"s{i}.jpg", jpeg) for i in range(5)])
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"00000\.tar.*truncated"):
        _open(tmp_path)


def test_truncated_tar_with_parquet_fails_at_open_not_mid_job(sample_dir):
    data = (sample_dir / "00001.tar").read_bytes()
    (sample_dir / "00001.tar").write_bytes(data[: len(data) - 40000])
    with pytest.raises(ShardError, match=r"00001\.tar"):
        _open(sample_dir)


def test_unsafe_member_names_are_error_rows_and_never_written_outside(tmp_path, jpeg):
    src = tmp_path / "src"
    src.mkdir()
    write_tar(
        src / "00000.tar",
        [
            ("ok.jpg", jpeg),
            ("ok.txt", b"fine"),
            ("../evil.jpg", jpeg),
            ("../evil.txt", b"x"),
            ("/etc/passwdx.jpg", jpeg),
        ],
    )
    ds = _open(src)
    df = ds.metadata.compute().set_index("key")
    assert df.loc["ok", "error"] is None or df["error"].isna()["ok"]
    assert "unsafe member name" in df.loc["../evil", "error"]
    assert "unsafe member name" in df.loc["/etc/passwdx", "error"]
    out = tmp_path / "deep" / "out"
    exported = ds.to_webdataset(str(out), old_id_col="old")
    assert sorted(os.listdir(tmp_path)) == ["deep", "src"]
    assert sorted(os.listdir(out)) == ["00000.parquet", "00000.tar", "_imgcurate_export.json"]
    names = list(tar_members(exported.tar_files[0]))
    assert all(not n.startswith(("/", "..")) for n in names)
    assert exported.metadata["old"].compute().tolist() == ["ok", "../evil", "/etc/passwdx"]


def test_duplicate_keys_in_one_shard(tmp_path, jpeg):
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("b.jpg", jpeg), ("a.txt", b"late caption")])
    with pytest.raises(ShardError, match=r"00000\.tar.*duplicate sample key 'a'"):
        _open(tmp_path)
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("a.jpg", jpeg)])
    with pytest.raises(ShardError, match=r"duplicate member 'a\.jpg'"):
        _open(tmp_path)


def test_sample_without_image_and_non_utf8_caption_are_error_rows(tmp_path, jpeg):
    write_tar(
        tmp_path / "00000.tar",
        [
            ("a.jpg", jpeg),
            ("a.txt", "café".encode("latin-1")),
            ("b.txt", b"caption only"),
            ("c.jpg", jpeg),
            ("c.json", b"{not json"),
        ],
    )
    df = _open(tmp_path).metadata.compute().set_index("key")
    assert df.index.tolist() == ["a", "b", "c"]
    assert "not valid UTF-8" in df.loc["a", "error"]
    assert df.loc["a", "caption"] == "caf\ufffd"
    assert df.loc["b", "error"] == "sample has no image member"
    assert df.loc["b", "caption"] == "caption only"
    assert "not valid JSON" in df.loc["c", "error"]


def test_empty_shard_is_an_empty_partition(sample_dir):
    write_tar(sample_dir / "00004.tar", [])
    ds = _open(sample_dir)
    assert ds.metadata.npartitions == 5
    assert len(ds.metadata.partitions[4].compute()) == 0
    out = ds.to_webdataset(str(sample_dir.parent / "out"), samples_per_shard=100)
    assert len(out.metadata) == 36


def test_non_tar_files_are_ignored_and_fake_tars_named(sample_dir):
    (sample_dir / "README.txt").write_text("not a shard")
    (sample_dir / "00000.idx").write_text("0 1 2")
    assert _open(sample_dir).metadata.npartitions == 4
    (sample_dir / "00009.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match=r"00009\.tar.*not a readable tar"):
        _open(sample_dir)


def test_unreadable_parquet_is_named(sample_dir):
    (sample_dir / "00002.parquet").write_bytes(b"garbage")
    with pytest.raises(ShardError, match=r"00002\.parquet"):
        _open(sample_dir)


def test_parquet_without_key_column_is_named(sample_dir):
    import pyarrow.parquet as pq

    table = pq.read_table(sample_dir / "00001.parquet").drop(["key"])
    pq.write_table(table, sample_dir / "00001.parquet")
    with pytest.raises(ShardError, match=r"00001\.parquet.*no 'key' column"):
        _open(sample_dir)
