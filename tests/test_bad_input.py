"""Every kind of bad input gets a clear error naming the file, or an error row; no sample is lost."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pandas as pd
import pytest
from conftest import tar_members, write_tar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgcurate import AlignmentError, ImageTextPairDataset, ShardError
from imgcurate.io.tar import NO_SAMPLE, aligned_images, aligned_samples, iter_samples
from imgcurate.testing import encode_image


@pytest.fixture
def jpeg():
    from PIL import Image

    return encode_image(Image.new("RGB", (32, 24), (200, 30, 30)), "jpg")


def _open(folder):
    return ImageTextPairDataset.from_webdataset(str(folder))


def test_a_sample_with_two_images_uses_the_same_one_whatever_their_order_and_a_gif_is_named(tmp_path, jpeg):
    """Of two image members the first in IMAGE_EXTENSIONS' order is the sample's image (jpg before png), so a
    step's answer does not depend on the order the tar lists them in; a sample whose only picture is a gif gets an
    error that lists the extensions read."""
    from PIL import Image

    from imgcurate.dedup import ExactDuplicates
    from imgcurate.io.tar import NO_IMAGE

    png = encode_image(Image.new("RGB", (8, 8), (1, 2, 3)), "png")
    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, "GIF")
    gif = gif.getvalue()
    write_tar(tmp_path / "00000.tar", [("a.png", png), ("a.jpg", jpeg), ("b.jpg", jpeg), ("b.png", png),
                                       ("c.gif", gif)])  # fmt: skip
    df = ExactDuplicates()(_open(tmp_path)).metadata.compute().set_index("key")
    assert df.loc["b", "exact_duplicate_of"] == "a"  # both are the jpg
    assert df.loc["c", "error"] == NO_IMAGE and "gif" not in NO_IMAGE and "jpg" in NO_IMAGE


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
    assert df.loc["b", "error"] == "sample has no image member (jpg, jpeg, png, webp, bmp, tif or tiff)"
    assert df.loc["b", "caption"] == "caption only"
    assert "not valid JSON" in df.loc["c", "error"]


def test_a_member_over_the_size_limit_is_not_read_and_the_export_refuses_it(tmp_path, jpeg, monkeypatch):
    """A member whose header declares more than imgcurate reads of one member (a hostile or damaged tar: 12 GiB of
    caption) is not read into memory: a per-sample error, and an export that names it instead of dropping it."""
    from imgcurate.dedup import ExactDuplicates
    from imgcurate.io import tar as tar_module

    big = bytes(2000)
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar",
              [("a.jpg", jpeg), ("b.txt", big), ("b.jpg", jpeg), ("c.jpg", big), ("d.jpg", jpeg)])  # fmt: skip
    monkeypatch.setattr(tar_module, "MAX_MEMBER_BYTES", 1000)
    ds = _open(tmp_path / "in")
    df = ds.metadata.compute().set_index("key")
    over = "member {!r} holds 2000 bytes, over the 1000-byte limit: not read"
    assert df.loc["b", "error"] == over.format("b.txt") and df["caption"].isna().all()
    out = ExactDuplicates()(ds).metadata.compute().set_index("key")
    assert out.loc["c", "image_sha256_error"] == over.format("c.jpg")
    assert out["image_sha256_error"].isna().tolist() == [True, True, False, True]
    assert out["exact_duplicate"].tolist() == [False, True, False, True]  # b's image is read: a copy of a's
    with pytest.raises(ShardError, match=r"00000\.tar: sample 'b': member 'b\.txt' holds 2000 bytes, over the "
                                         r"1000-byte limit: not read, so the export cannot copy it"):  # fmt: skip
        ds.to_webdataset(str(tmp_path / "out"))
    df = ds.metadata
    keep = ~df["key"].isin(["b", "c"])
    kept = ds.with_metadata(df.assign(keep=keep)).to_webdataset(str(tmp_path / "out"), "keep", overwrite=True)
    assert len(kept.metadata) == 2


def test_json_nested_too_deeply_is_an_error_row_not_the_end_of_the_job(tmp_path, jpeg):
    """A json member nested thousands of levels deep stopped the whole open with a RecursionError; one nested a
    few dozen levels, kept as nested columns by ``imgcurate shard``, made a parquet that cannot be read back."""
    from imgcurate.io.make import make_shards

    deep = lambda levels: ('{"x": ' + "[" * levels + "1" + "]" * levels + "}").encode()  # noqa: E731
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("a.json", deep(5000)), ("b.jpg", jpeg),
                                       ("b.json", deep(40)), ("c.jpg", jpeg), ("c.json", deep(20))])  # fmt: skip
    df = _open(tmp_path).metadata.compute().set_index("key")
    assert df.loc["a", "error"] == df.loc["b", "error"] == "json member is nested deeper than 32 levels"
    assert pd.isna(df.loc["c", "error"]) and df.loc["c", "x"] == "[" * 20 + "1" + "]" * 20  # kept as JSON text
    src = tmp_path / "src"
    src.mkdir()
    for name, levels in (("p", 40), ("q", 20)):
        (src / f"{name}.jpg").write_bytes(jpeg)
        (src / f"{name}.json").write_bytes(deep(levels))
    make_shards(str(src), str(tmp_path / "made"))
    made = _open(tmp_path / "made").metadata.compute()
    assert made["error"].tolist()[0] == "sidecar json is nested deeper than 32 levels" and pd.isna(made["error"][1])


def test_empty_shard_is_an_empty_partition(sample_dir):
    write_tar(sample_dir / "00004.tar", [])
    ds = _open(sample_dir)
    assert ds.metadata.npartitions == 5
    assert len(ds.metadata.partitions[4].compute()) == 0
    assert len(_open(sample_dir).metadata.partitions[4].compute()) == 0  # again, from the parquet written beside it
    out = ds.to_webdataset(str(sample_dir.parent / "out"), samples_per_shard=100)
    assert len(out.metadata) == 36


def test_non_tar_files_are_ignored_and_fake_tars_named(sample_dir):
    (sample_dir / "README.txt").write_text("not a shard")
    (sample_dir / "00000.idx").write_text("0 1 2")
    assert _open(sample_dir).metadata.npartitions == 4
    (sample_dir / "00009.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match=r"00009\.tar.*not a readable tar"):
        _open(sample_dir)


@pytest.mark.parametrize("how", ["deleted", "a folder", "a broken link"])
def test_a_shard_whose_tar_is_gone_is_named_not_left_out(sample_dir, how):
    """A parquet whose tar is missing (deleted, not copied yet, or not a regular file) fails at open: its rows would
    otherwise be left out of every count and output without a word; so does a tar that the folder's export manifest
    lists and the folder lacks. A parquet not named like a shard is only warned about."""
    tar = sample_dir / "00001.tar"
    tar.unlink()
    if how == "a folder":
        tar.mkdir()
    elif how == "a broken link":
        tar.symlink_to(sample_dir / "nowhere.tar")
    if how == "a broken link":  # named as what it is
        with pytest.raises(ShardError, match=r"00001\.tar: a broken symbolic link"):
            _open(sample_dir)
        tar.unlink()
    with pytest.raises(ShardError, match=r"00001\.parquet: has no 00001\.tar beside it .+ remove the parquet to leave"):
        _open(sample_dir)
    (sample_dir / "00001.parquet").unlink()
    assert (sample_dir / "_imgcurate_export.json").exists()
    with pytest.raises(ShardError, match=r"00001\.tar: missing: the export manifest _imgcurate_export\.json lists it"):
        _open(sample_dir)
    (sample_dir / "_imgcurate_export.json").unlink()  # the shard left out on purpose: the rest opens
    assert _open(sample_dir).metadata.npartitions == 3
    (sample_dir / "stats.parquet").write_bytes(b"a table of the user's, not named like a shard")
    with pytest.warns(UserWarning, match=r"stats\.parquet: no stats\.tar beside it; not read as a shard"):
        assert _open(sample_dir).metadata.npartitions == 3


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


@pytest.mark.parametrize(
    ("column", "values", "problem"),
    [
        ("key", [1, 2], r"column 'key' holds int64, not text"),
        ("key", [b"a", b"b"], r"column 'key' holds binary, not text"),
        ("key", [["a"], ["b"]], r"column 'key' holds list<element: string>, not text"),
        ("status", [["success"], ["success"]], r"column 'status' holds list<element: string>, not text"),
    ],
)
@pytest.mark.parametrize("validate", [True, False])
def test_parquet_columns_that_cannot_describe_the_tar_are_named(tmp_path, jpeg, column, values, problem, validate):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "00000.tar", [("1.jpg", jpeg), ("2.jpg", jpeg)])
    table = pa.table({"key": ["1", "2"], "caption": ["x", "y"]})
    table = table.append_column(column, pa.array(values)) if column != "key" else table.set_column(0, "key", [values])
    pq.write_table(table, tmp_path / "00000.parquet")
    with pytest.raises(ShardError, match=r"00000\.parquet: " + problem):
        ImageTextPairDataset.from_webdataset(str(tmp_path), validate=validate)


def test_parquet_with_a_column_twice_is_named(tmp_path, jpeg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg)])
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])], ["key", "caption", "caption"])
    pq.write_table(table, tmp_path / "00000.parquet")
    with pytest.raises(ShardError, match=r"00000\.parquet: has two columns named 'caption'"):
        _open(tmp_path)


def test_parquet_listing_a_key_twice_fails_at_open(tmp_path, jpeg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("b.jpg", jpeg), ("c.jpg", jpeg)])
    # the second 'b' records a failure, so that the key comparison alone would let it through
    table = pa.table({"key": ["a", "b", "b", "c"], "error": [None, None, "failed", None]})
    pq.write_table(table, tmp_path / "00000.parquet")
    with pytest.raises(ShardError, match=r"00000\.parquet: lists the key 'b' twice"):
        _open(tmp_path)


def test_folder_names_with_glob_characters_are_taken_literally(tmp_path, jpeg):
    for name in ("data[2024]", "data?x", "data*x", "dataAx"):
        (tmp_path / name).mkdir()
    write_tar(tmp_path / "data[2024]" / "00000.tar", [("a.jpg", jpeg)])
    write_tar(tmp_path / "data?x" / "00000.tar", [("b.jpg", jpeg)])
    write_tar(tmp_path / "data*x" / "00000.tar", [("c.jpg", jpeg)])
    write_tar(tmp_path / "dataAx" / "00000.tar", [("d.jpg", jpeg)])
    assert _open(tmp_path / "data[2024]").metadata.compute()["key"].tolist() == ["a"]
    assert _open(tmp_path / "data?x").metadata.compute()["key"].tolist() == ["b"]
    assert _open(tmp_path / "data*x").metadata.compute()["key"].tolist() == ["c"]


def test_a_wrong_path_says_what_it_is(tmp_path, jpeg):
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg)])
    with pytest.raises(FileNotFoundError, match=r"missing: no such folder"):
        _open(tmp_path / "missing")
    with pytest.raises(NotADirectoryError, match=r"00000\.tar: a file, not a folder of \.tar shards"):
        _open(tmp_path / "00000.tar")


# ---------------------------------------------------------------------------------------------- damaged archives
def _four_sample_tar(path, jpeg):
    write_tar(path, [(f"s{i}.{ext}", jpeg if ext == "jpg" else b"cap") for i in range(4) for ext in ("jpg", "txt")])
    return path.read_bytes()


def _header_offsets(path):
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def test_tar_cut_inside_a_header_is_named_not_read_short(tmp_path, jpeg):
    data = _four_sample_tar(tmp_path / "00000.tar", jpeg)
    cut = _header_offsets(tmp_path / "00000.tar")[4] + 200  # inside the header of s2.jpg
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    with tarfile.open(tmp_path / "00000.tar") as tar:  # what python's tarfile makes of it: 2 samples, no error
        assert [m.name for m in tar.getmembers()] == ["s0.jpg", "s0.txt", "s1.jpg", "s1.txt"]
    with pytest.raises(
        ShardError, match=r"00000\.tar: truncated or corrupt tar: unreadable header at byte \d+ after 2"
    ):
        _open(tmp_path)


def test_corrupt_header_checksum_in_the_middle_is_named(tmp_path, jpeg):
    data = bytearray(_four_sample_tar(tmp_path / "00000.tar", jpeg))
    at = _header_offsets(tmp_path / "00000.tar")[4]
    data[at + 1] ^= 0x20  # the name "s2.jpg" -> "S2.jpg", so the stored checksum no longer matches
    (tmp_path / "00000.tar").write_bytes(bytes(data))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert len(tar.getmembers()) == 4  # tarfile stops there as if the archive ended
    with pytest.raises(ShardError, match=r"00000\.tar: .*corrupt.*after 2 samples"):
        _open(tmp_path)


def test_tar_cut_between_members_or_in_data_is_named(tmp_path, jpeg):
    data = _four_sample_tar(tmp_path / "00000.tar", jpeg)
    offsets = _header_offsets(tmp_path / "00000.tar")
    for cut in (offsets[6], offsets[6] + 512 + 10):  # right before s3.jpg's header; inside s3.jpg's data
        (tmp_path / "00000.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match=r"00000\.tar: truncated"):
            _open(tmp_path)
        for leftover in tmp_path.glob("*.parquet"):
            leftover.unlink()


def test_tar_ending_in_zero_padding_or_garbage_after_the_end_blocks_opens(tmp_path, jpeg):
    data = _four_sample_tar(tmp_path / "00000.tar", jpeg)
    end = len(data.rstrip(b"\0"))
    end += -end % 512
    for tail in (b"\0" * 512, b"\0" * 1024 + b"trailing bytes after the archive"):
        (tmp_path / "00000.tar").write_bytes(data[:end] + tail)
        for leftover in tmp_path.glob("*.parquet"):
            leftover.unlink()
        assert len(_open(tmp_path).metadata) == 4


def test_tar_members_after_a_zeroed_stretch_or_a_second_tar_are_named(tmp_path, jpeg):
    data = bytearray(_four_sample_tar(tmp_path / "00000.tar", jpeg))
    at = _header_offsets(tmp_path / "00000.tar")[2]  # s1.jpg's header and its first data block zeroed, as a crash can
    data[at : at + 1024] = bytes(1024)
    (tmp_path / "00000.tar").write_bytes(bytes(data))
    with tarfile.open(tmp_path / "00000.tar") as tar:  # what python's tarfile makes of it: one sample, no error
        assert [m.name for m in tar.getmembers()] == ["s0.jpg", "s0.txt"]
    with pytest.raises(ShardError, match=r"00000\.tar: corrupt tar: zeros end the archive after 1 samples, but a"):
        _open(tmp_path)
    # two tars joined end to end: the second one's samples would be lost the same way
    first = _four_sample_tar(tmp_path / "a.tar", jpeg)
    write_tar(tmp_path / "b.tar", [("t0.jpg", jpeg)])
    (tmp_path / "00000.tar").write_bytes(first + (tmp_path / "b.tar").read_bytes())
    for other in ("a.tar", "b.tar"):
        (tmp_path / other).unlink()
    with pytest.raises(ShardError, match=rf"00000\.tar: .*a member header follows at byte {len(first)} "):
        _open(tmp_path)


def test_member_name_not_utf8_is_a_shard_error(tmp_path, jpeg):
    with tarfile.open(tmp_path / "00000.tar", "w", encoding="utf-8", errors="surrogateescape") as tar:
        for name in ("ok.jpg", b"caf\xe9.jpg".decode("utf-8", "surrogateescape")):
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            tar.addfile(info, io.BytesIO(jpeg))
    with pytest.raises(ShardError, match=r"00000\.tar: member name 'caf\\udce9\.jpg' is not UTF-8"):
        _open(tmp_path)


def _corrupt_column_chunk(path, column):
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset
    data[start : start + 64] = b"\xff" * 64  # the page header of that column chunk
    path.write_bytes(bytes(data))


def test_parquet_with_a_corrupt_non_key_column_fails_at_open(sample_dir):
    import pyarrow.parquet as pq

    _corrupt_column_chunk(sample_dir / "00002.parquet", "caption")
    assert len(pq.read_table(sample_dir / "00002.parquet", columns=["key"])) == 10  # the key column is intact
    with pytest.raises(ShardError, match=r"00002\.parquet: column 'caption' of row group 0 cannot be read"):
        _open(sample_dir)


# ---------------------------------------------------------------------------------------------- webdataset naming
def test_samples_are_what_the_webdataset_package_reads(tmp_path, jpeg):
    import webdataset as wds

    members = [
        ("._a.jpg", b"\0\5\26\7 AppleDouble"),  # macOS resource forks: no key, skipped
        ("a.jpg", jpeg),
        ("a.TXT", b"upper-case extension"),
        ("dir/", b""),
        ("dir/._b.jpg", b"\0\5\26\7"),
        ("dir/b.seg.PNG", b"mask"),
        ("dir/b.jpg", jpeg),
        ("dir/._c.jpg", b"\0\5\26\7"),  # macOS puts each one before its file: webdataset's key would be "dir/"
        ("dir/c.jpg", jpeg),
        ("README", b"no dot: no key"),
        (".hidden", b"nothing before the dot"),
        ("__meta__", b"webdataset metadata"),
        ("d.e.f/c.json", b'{"x": 1}'),
        ("d.e.f/c.jpeg", jpeg),
    ]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    ours = {s.key: s.members for s in iter_samples(str(tmp_path / "00000.tar"))}
    theirs = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)
    ]
    # the one documented difference: webdataset makes samples keyed "dir/" of the folder's AppleDouble files
    assert [(k, list(m)) for k, m in theirs if k.endswith("/")] == [("dir/", ["_b.jpg"]), ("dir/", ["_c.jpg"])]
    assert ours == {k: m for k, m in theirs if not k.endswith("/")}
    assert list(ours) == ["a", "dir/b", "dir/c", "d.e.f/c"]
    assert list(ours["dir/b"]) == ["seg.png", "jpg"]
    df = _open(tmp_path).metadata.compute()
    assert df["key"].tolist() == ["a", "dir/b", "dir/c", "d.e.f/c"]
    assert df["caption"].isna().tolist() == [False, True, True, True]
    assert df["caption"][0] == "upper-case extension"
    assert df["error"].isna().all()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_tar_format_reads_as_the_webdataset_package_reads_it(tmp_path, jpeg, fmt):
    """Plain headers are parsed without tarfile; long names (ustar prefix, GNU long-name blocks, pax records), links,
    directories and pax global headers in the middle of a shard read as tarfile and webdataset read them."""
    import webdataset as wds

    deep = "/".join(["folder"] * 12)  # 83 characters: with the file name over 100, split or extended by format
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w", format=fmt, encoding="utf-8") as tar:

        def add(name, data=b"", kind=tarfile.REGTYPE, **fields):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
            for field, value in fields.items():
                setattr(info, field, value)
            tar.addfile(info, io.BytesIO(data) if info.size else None)

        add("a.jpg", jpeg)
        add("a.txt", b"")  # empty member
        add("b.jpg", b"x" * 512)  # exactly one block
        add("b.txt", b"y" * 513)
        add("folder", kind=tarfile.DIRTYPE)
        add("c.jpg", kind=tarfile.SYMTYPE, linkname="a.jpg")  # not a regular file: skipped
        add(f"{deep}/{'long' * 10}.jpg", jpeg)
        add(f"{deep}/{'long' * 10}.json", b'{"long": true}')
        add("café.jpg", jpeg, mtime=1.5)  # pax: a utf-8 name and a fractional mtime in an extended header
        add("d.jpg", b"after the long names", uname="u" * 40)  # pax: a user name too long for the field
        add("e.jpg", b"z" * 2000)
    ours = [(s.key, s.members, s.sizes) for s in iter_samples(str(tar_path))]
    theirs = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.WebDataset(str(tar_path), shardshuffle=False)
    ]
    assert [(k, m) for k, m, _ in ours] == theirs
    assert [k for k, _, _ in ours] == ["a", "b", f"{deep}/{'long' * 10}", "café", "d", "e"]
    assert all(sizes == {e: len(d) for e, d in members.items()} for _, members, sizes in ours)
    skipped = [(s.key, s.members, s.sizes) for s in iter_samples(str(tar_path), wanted={"b", "café"}, exts={"jpg"})]
    assert [(k, m) for k, m, _ in skipped if m] == [("b", {"jpg": b"x" * 512}), ("café", {"jpg": jpeg})]
    assert [s for _, _, s in skipped] == [s for _, _, s in ours]


# ---------------------------------------------------------------------------------------------- across shards
def test_same_key_in_two_shards_names_both(sample_dir):
    import pyarrow.parquet as pq

    keys = pq.read_table(sample_dir / "00001.parquet").column("key").to_pylist()
    with tarfile.open(sample_dir / "00003.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    old = members[0][0].partition(".")[0]
    write_tar(
        sample_dir / "00003.tar", [(keys[4] + n[len(old) :] if n.startswith(old + ".") else n, d) for n, d in members]
    )
    (sample_dir / "00003.parquet").unlink()
    with pytest.raises(ShardError, match=rf"00001\.tar: sample key '{keys[4]}' is also in .*00003\.tar"):
        _open(sample_dir)
    assert len(ImageTextPairDataset.from_webdataset(str(sample_dir), validate=False).metadata) == 36


def test_json_fields_named_like_our_columns_are_kept_when_a_tar_is_scanned(tmp_path, jpeg):
    """A json member's ``key``, ``caption`` and ``error`` do not replace the sample's own values and are not lost:
    they become ``source_*`` columns, as ``imgcurate shard`` keeps them, unless they say what the sample's own value
    says (img2dataset's json repeats the key and caption); without a txt member the json's caption is the caption."""
    fields = {"key": "orig-17", "caption": "from the json", "error": "upstream: blurry", "url": "http://x"}
    members = json.dumps(fields).encode()
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("a.json", members),
                                       ("b.jpg", jpeg), ("b.txt", b"from the txt"), ("b.json", members)])  # fmt: skip
    df = _open(tmp_path).metadata.compute().set_index("key")
    assert df["caption"].tolist() == ["from the json", "from the txt"]
    assert df["error"].isna().all()  # the json's error is the source's word, not a problem of this sample
    for column, value in [("source_key", "orig-17"), ("source_error", "upstream: blurry"), ("url", "http://x")]:
        assert df[column].tolist() == [value, value], column
    assert df["source_caption"].isna().tolist() == [True, False] and df.loc["b", "source_caption"] == "from the json"
    repeated = {"key": "c", "caption": "the same caption", "url": "http://y"}  # as img2dataset writes its json
    write_tar(tmp_path / "00001.tar", [("c.jpg", jpeg), ("c.txt", b"the same caption"),
                                       ("c.json", json.dumps(repeated).encode())])  # fmt: skip
    df = _open(tmp_path).metadata.compute().set_index("key")
    assert pd.isna(df.loc["c", "source_key"]) and pd.isna(df.loc["c", "source_caption"])
    # img2dataset's sample without a caption: an empty txt and a json caption of null, as its parquet has it (null),
    # and no column of nulls for the json's caption
    none = {"key": "d", "caption": None, "url": "http://z"}
    (tmp_path / "more").mkdir()
    write_tar(tmp_path / "more" / "00000.tar", [("d.jpg", jpeg), ("d.txt", b""), ("d.json", json.dumps(none).encode()),
                                                ("e.jpg", jpeg), ("e.txt", b"")])  # fmt: skip
    df = _open(tmp_path / "more").metadata.compute().set_index("key")
    assert pd.isna(df.loc["d", "caption"]) and df.loc["e", "caption"] == ""  # an empty txt alone is an empty caption
    assert "source_caption" not in df.columns and "source_key" not in df.columns


def test_json_field_int_in_some_shards_and_text_in_one_becomes_text(tmp_path, jpeg):
    for shard, value in enumerate([1, 2, "three", 4]):
        write_tar(
            tmp_path / f"{shard:05d}.tar",
            [(f"k{shard}.jpg", jpeg), (f"k{shard}.json", json.dumps({"n": value}).encode())],
        )
    with pytest.warns(UserWarning, match=r"column 'n' is int64 in .*00000\.tar but string in .*00002\.tar"):
        ds = _open(tmp_path)
    assert ds.metadata.compute()["n"].tolist() == ["1", "2", "three", "4"]


def test_column_types_that_cannot_be_unified_name_the_odd_shard(tmp_path, jpeg):
    for shard, value in enumerate([1, 2, 3.5, [1, 2]]):
        write_tar(tmp_path / f"{shard:05d}.tar", [(f"k{shard}.jpg", jpeg), (f"k{shard}.json", b"{}")])
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pa.array([value]) if not isinstance(value, list) else pa.array([value], pa.list_(pa.int64()))
        pq.write_table(pa.table({"key": [f"k{shard}"], "n": column}), tmp_path / f"{shard:05d}.parquet")
    with pytest.raises(ShardError, match=r"00003\.tar: column 'n' is list<.*int64> here but int64 in .*00000"):
        _open(tmp_path)


# ---------------------------------------------------------------------------------------------- rows without samples
def test_parquet_rows_without_a_sample_need_a_recorded_failure(tmp_path, jpeg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("c.jpg", jpeg)])
    table = pa.table({"key": ["a", "b", "c"], "status": ["success", "failed_to_download", "success"]})
    pq.write_table(
        table.append_column("error_message", pa.array([None, "HTTP Error 404: Not Found", None])),
        tmp_path / "00000.parquet",
    )
    df = _open(tmp_path).metadata.compute()
    assert df["key"].tolist() == ["a", "b", "c"]
    assert df["error"].tolist()[1] == "failed_to_download: HTTP Error 404: Not Found"
    assert df["error"].isna().tolist() == [True, False, True]
    assert [e for _, e in aligned_images(str(tmp_path / "00000.tar"), ["a", "b", "c"])] == [None, NO_SAMPLE, None]
    with pytest.raises(AlignmentError, match=r"00000\.tar: .*key 'a'.*no longer describes this tar in order"):
        list(aligned_images(str(tmp_path / "00000.tar"), ["c", "b", "a"]))
    pq.write_table(table.set_column(1, "status", pa.array(["success"] * 3)), tmp_path / "00000.parquet")
    with pytest.raises(ShardError, match=r"00000\.tar: keys differ from its parquet: row 1: parquet has key 'b'"):
        _open(tmp_path)


def test_img2dataset_stats_must_agree_with_the_shard(tmp_path, jpeg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg)])
    pq.write_table(pa.table({"key": ["a", "b"], "status": ["success", "failed_to_resize"]}), tmp_path / "00000.parquet")
    stats = {"count": 2, "successes": 1, "failed_to_download": 0, "failed_to_resize": 1}
    (tmp_path / "00000_stats.json").write_text(json.dumps(stats))
    assert len(_open(tmp_path).metadata) == 2
    (tmp_path / "00000_stats.json").write_text(json.dumps({**stats, "successes": 2}))
    with pytest.raises(ShardError, match=r"00000_stats\.json: says 2 samples were written, the tar has 1"):
        _open(tmp_path)


def test_img2dataset_shard_without_its_parquet_opens_again_and_says_what_was_lost(tmp_path, jpeg):
    """The metadata of a shard whose parquet is missing is rebuilt from the tar, which has no row for a failed
    download: the first open says how many img2dataset recorded, and the folder opens again (the rebuilt parquet has
    a row per sample written, which the statistics file also counts)."""
    members = []
    for key in ("000000", "000001"):  # row 000002 failed to download: only in the lost parquet
        members += [(f"{key}.jpg", jpeg), (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())]
    write_tar(tmp_path / "00000.tar", members)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2, "failed_to_download": 1}))
    with pytest.warns(UserWarning, match=r"^1 shard\(s\) had no parquet: .* no row for the 1 failed downloads .*"
                                         r"00000_stats\.json\)$"):  # fmt: skip
        assert len(_open(tmp_path).metadata) == 2
    assert (tmp_path / "00000.parquet").exists()
    assert _open(tmp_path).metadata.compute()["key"].tolist() == ["000000", "000001"]
    (tmp_path / "00000.parquet").unlink()  # a tar that lost samples is still an error, scanned or not
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3, "failed_to_download": 0}))
    with pytest.raises(ShardError, match=r"00000_stats\.json: says 3 samples were written, the tar has 2"):
        _open(tmp_path)


def test_img2dataset_statistics_of_a_missing_shard_are_an_error(tmp_path, jpeg):
    for shard in ("00000", "00002"):
        write_tar(tmp_path / f"{shard}.tar", [("a.jpg", jpeg)] if shard == "00000" else [("b.jpg", jpeg)])
    for shard in ("00000", "00001", "00002"):
        (tmp_path / f"{shard}_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))
    with pytest.raises(ShardError, match=r"00001_stats\.json: img2dataset's statistics of a shard whose 00001\.tar "
                                         r"is missing"):  # fmt: skip
        _open(tmp_path)
    (tmp_path / "00001_stats.json").unlink()
    assert _open(tmp_path).metadata.compute()["key"].tolist() == ["a", "b"]


def test_a_parquet_folder_beside_a_tar_is_an_error_and_is_not_written_into(tmp_path, jpeg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg)])
    (tmp_path / "00000.parquet").mkdir()  # a dataset folder, as Spark or Dask write one
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "00000.parquet" / "part-0.parquet")
    with pytest.raises(ShardError, match=r"00000\.parquet: is a folder, not a parquet file"):
        _open(tmp_path)
    assert sorted(p.name for p in (tmp_path / "00000.parquet").iterdir()) == ["part-0.parquet"]


@pytest.mark.parametrize("kind", ["large_string", "dictionary"])
def test_img2dataset_status_fills_an_error_column_of_any_text_type(tmp_path, jpeg, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg)])
    error = pa.array([None, None], pa.string())
    error = error.cast(pa.large_string()) if kind == "large_string" else error.dictionary_encode()
    table = pa.table({"key": ["a", "b"], "status": ["success", "failed_to_download"], "error_message": [None, "404"],
                      "error": error})  # fmt: skip
    pq.write_table(table, tmp_path / "00000.parquet")
    error = _open(tmp_path).metadata.compute()["error"]
    assert error.isna().tolist() == [True, False] and error[1] == "failed_to_download: 404"


def test_decode_errors_carry_no_per_run_values(tmp_path, jpeg):
    from imgcurate.embedders import TimmImageEmbedder

    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("b.jpg", b"not an image at all")])
    messages = {
        TimmImageEmbedder("test_resnet", batch_size=2)(_open(tmp_path)).metadata.compute()["image_embedding_error"][1]
        for _ in range(2)
    }
    (message,) = messages
    assert message.startswith("cannot decode image: UnidentifiedImageError: cannot identify image file")
    assert "0x" not in message and "BytesIO" not in message


@pytest.mark.parametrize("decoder", ["pil", "torchvision", "dali"])
def test_every_decoder_gives_rows_without_a_sample_an_error_row(tmp_path, jpeg, decoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgcurate.embedders import TimmImageEmbedder

    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("c.jpg", jpeg), ("e.jpg", jpeg)])
    status = ["success", "failed_to_download", "success", "failed_to_resize", "success"]
    table = pa.table({"key": list("abcde"), "status": status, "error_message": [None, "404", None, "bad", None]})
    pq.write_table(table, tmp_path / "00000.parquet")
    ds = _open(tmp_path)
    emb = TimmImageEmbedder("test_resnet", batch_size=2, decoder=decoder, device="cpu")
    df = emb(ds).metadata.compute()
    assert df["image_embedding_error"].tolist()[1::2] == [NO_SAMPLE, NO_SAMPLE]
    assert df["image_embedding"].notna().tolist() == [True, False, True, False, True]
    df = ds.metadata
    reordered = ds.with_metadata(df.map_partitions(lambda p: p.iloc[::-1], meta=df._meta))
    with pytest.raises(AlignmentError, match=r"00000\.tar: .*no longer describes this tar in order"):
        emb(reordered).metadata.compute()


@pytest.mark.parametrize("decoder", ["cpu", "pil", "torchvision", "dali"])
def test_a_header_declaring_too_many_pixels_is_an_error_row_on_every_decoder(tmp_path, jpeg, decoder):
    """A 600-byte JPEG whose header declares 20000 x 20000 pixels (1.2 GB decoded) is PIL's decompression bomb on
    every decoder (torchvision and DALI would otherwise allocate what the header says), and a header no decoder can
    read an error row too. The other samples are embedded as usual."""
    from imgcurate.embedders import TimmImageEmbedder

    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    bomb = bytearray(jpeg)
    at = bomb.index(b"\xff\xc0")  # the baseline frame header: length, precision, then height and width
    bomb[at + 5 : at + 9] = (20000).to_bytes(2, "big") * 2
    write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg), ("b.jpg", bytes(bomb)), ("c.jpg", b"\xff\xd8\xff" + b"?" * 64),
                                       ("d.jpg", jpeg)])  # fmt: skip
    df = TimmImageEmbedder("test_resnet", batch_size=4, decoder=decoder, device="cpu")(
        _open(tmp_path)
    ).metadata.compute()
    errors = df["image_embedding_error"].tolist()
    assert df["image_embedding_error"].isna().tolist() == [True, False, False, True]
    assert "DecompressionBombError: Image size (400000000 pixels) exceeds limit" in errors[1]
    assert "UnidentifiedImageError: cannot identify image file" in errors[2]  # PIL's word, after the decoder's
    assert df["image_embedding"].notna().tolist() == [True, False, False, True]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    present=st.lists(st.booleans(), min_size=1, max_size=12),
    absent_at=st.lists(st.integers(0, 12), max_size=4),
    swap=st.booleans(),
)
def test_aligned_samples_tells_missing_rows_from_reordered_ones(tmp_path, present, absent_at, swap):
    tar_keys = [f"k{i:02d}" for i in range(len(present))]
    write_tar(tmp_path / "00000.tar", [(f"{k}.txt", k.encode()) for k in tar_keys])
    rows = [k for k, keep in zip(tar_keys, present, strict=True) if keep]  # a row-filtered partition
    for n, at in enumerate(absent_at):  # img2dataset's failures: rows whose key the tar does not have
        rows.insert(min(at, len(rows)), f"failed{n}")
    tar = str(tmp_path / "00000.tar")
    in_tar = [i for i, k in enumerate(rows) if k in tar_keys]
    if swap and len(in_tar) >= 2:
        i, j = in_tar[0], in_tar[-1]
        rows[i], rows[j] = rows[j], rows[i]
        with pytest.raises(AlignmentError, match="no longer describes this tar in order"):
            list(aligned_samples(tar, rows))
        return
    got = list(aligned_samples(tar, rows))
    assert [None if s is None else s.key for s in got] == [k if k in tar_keys else None for k in rows]
    assert [s.members["txt"] for s in got if s is not None] == [k.encode() for k in rows if k in tar_keys]


def test_half_an_emoji_in_json_or_a_caption_becomes_the_replacement_character(tmp_path):
    """JSON may escape a lone UTF-16 surrogate (an emoji cut in half); UTF-8 cannot hold it. Opening such a shard,
    making shards from such a sidecar, or writing such a caption keeps the row, with U+FFFD in its place; an escaped
    pair stays the emoji."""
    from PIL import Image

    from imgcurate.io.make import Record, make_shards, write_shards

    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg")
    (tmp_path / "in").mkdir()
    half, pair = b'{"title": "cat \\ud83d", "ok": "\\ud83d\\ude00"}', b'{"title": "dog"}'
    write_tar(tmp_path / "in" / "00000.tar", [("a.jpg", jpg), ("a.json", half), ("b.jpg", jpg), ("b.json", pair)])
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "in")).metadata.compute()
    assert df["title"].tolist() == ["cat \ufffd", "dog"]
    assert df["ok"].iloc[0] == "\U0001f600" and df["ok"].isna().iloc[1]
    assert df["error"].isna().all()

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(jpg)
    (tmp_path / "src" / "a.json").write_bytes(b'{"caption": "cat \\ud83d"}')
    make_shards(str(tmp_path / "src"), str(tmp_path / "made"))
    write_shards([Record({"jpg": jpg}, caption="half \ud83d")], str(tmp_path / "written"))
    for folder, caption in (("made", "cat \ufffd"), ("written", "half \ufffd")):
        (sample,) = iter_samples(str(tmp_path / folder / "00000.tar"))
        assert sample.members["txt"].decode("utf-8") == caption
        meta = ImageTextPairDataset.from_webdataset(str(tmp_path / folder)).metadata.compute()
        assert meta["caption"].tolist() == [caption]


def test_json_integers_beyond_int64_are_kept_in_scanned_tars_and_made_shards(tmp_path, jpeg):
    from imgcurate.cli import main

    big = 17357386176853808775  # a 64-bit unsigned hash: no int64 holds it
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "00000.tar", [
        ("a.jpg", jpeg), ("a.json", json.dumps({"hash": big, "huge": 2**70}).encode()),
        ("b.jpg", jpeg), ("b.json", json.dumps({"hash": 5, "huge": 1}).encode()),
    ])  # fmt: skip
    got = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute()
    assert got["hash"].tolist() == [big, 5]
    assert got["huge"].tolist() == [str(2**70), "1"]  # beyond 64 bits: the JSON text of each value

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.jpg").write_bytes(jpeg)
    (tmp_path / "photos" / "p.json").write_text(json.dumps({"hash": big}))
    assert main(["shard", str(tmp_path / "photos"), str(tmp_path / "made")]) == 0
    made = ImageTextPairDataset.from_webdataset(str(tmp_path / "made")).metadata.compute()
    assert made["hash"].tolist() == [big]


def test_a_compressed_tar_named_tar_is_named_as_such(tmp_path, jpeg):
    import gzip

    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "plain.tar", [("a.jpg", jpeg)])
    (tmp_path / "shards" / "00000.tar").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    with pytest.raises(ShardError, match=r"00000\.tar: a gzip-compressed file, not an uncompressed tar"):
        ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
