from __future__ import annotations

import json

import pandas as pd
from conftest import tar_members

from imgcurate import ImageTextPairDataset, make_shards
from imgcurate.testing import SAMPLE_PHOTOS, encode_image, sample_records


def _photo_folder(tmp_path, n=5):
    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    files = {}
    for i in range(n):
        img = Image.new("RGB", (40 + i, 30), (i * 40, 100, 200))
        fmt = ["jpg", "png", "webp"][i % 3]
        path = folder / ("sub" if i % 2 else "") / f"img{i}.{fmt}"
        path.write_bytes(encode_image(img, fmt))
        files[str(path.relative_to(folder))] = path.read_bytes()
        if i != 2:
            path.with_suffix(".txt").write_text(f"caption {i}")
        if i == 3:
            path.with_suffix(".json").write_text(json.dumps({"url": "http://example.invalid/3", "license": "cc0"}))
    (folder / "notes.md").write_text("ignored")
    return folder, files


def test_shards_from_a_folder(tmp_path):
    folder, files = _photo_folder(tmp_path)
    tars = make_shards(str(folder), str(tmp_path / "shards"), samples_per_shard=2)
    assert len(tars) == 3
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute().set_index("source_path")
    assert sorted(df.index) == sorted(files)
    row = df.loc["sub/img3.jpg"]
    assert row["caption"] == "caption 3" and row["license"] == "cc0" and row["width"] == 43
    assert pd.isna(df.loc["img2.webp", "caption"])
    # image bytes copied unchanged
    members = {}
    for tar in tars:
        members.update(tar_members(tar))
    for source, key in zip(df.index, df["key"], strict=True):
        ext = source.rpartition(".")[2]
        assert members[f"{key}.{ext}"] == files[source]


def test_hidden_files_and_folders_are_not_images(tmp_path):
    """macOS leaves ``._name.jpg`` AppleDouble files beside copied photos, and ``.thumbnails`` folders hold images of
    their own: neither is a sample (the tar reader skips such names too)."""
    folder, files = _photo_folder(tmp_path)
    first = next(name for name in files if "/" not in name)
    (folder / f"._{first}").write_bytes(b"\x00\x05\x16\x07 AppleDouble header")
    (folder / ".thumbnails").mkdir()
    (folder / ".thumbnails" / first).write_bytes(files[first])
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    make_shards(str(folder), str(tmp_path / "shards"), samples_per_shard=10)
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute()
    assert sorted(df["source_path"]) == sorted(files) and df["error"].isna().all()


def test_shards_from_a_csv_with_a_missing_file(tmp_path):
    folder, files = _photo_folder(tmp_path, n=3)
    listing = pd.DataFrame(
        {"path": ["img0.jpg", "sub/img1.png", "missing.jpg"], "text": ["a", "b", "c"], "score": [1.5, 2.5, None]}
    )
    listing.to_csv(folder / "list.csv", index=False)
    make_shards(str(folder / "list.csv"), str(tmp_path / "shards"))
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute()
    assert df["caption"].tolist() == ["a", "b", "c"]
    assert df["score"].tolist()[:2] == [1.5, 2.5]
    assert df["error"].isna().tolist() == [True, True, False]
    assert "missing.jpg" in df["error"].iloc[2]


def test_bundled_sample_has_formats_and_duplicates(sample_ds):
    df = sample_ds.metadata.compute()
    assert len(df) == len(sample_records())
    assert set(df["source"]) == {p.file.rpartition(".")[0] for p in SAMPLE_PHOTOS}
    assert {"original", "reencoded", "resized", "exact_copy"} == set(df["variant"])
    exts = set()
    for tar in sample_ds.tar_files:
        exts |= {name.partition(".")[2] for name in tar_members(tar)}
    assert {"jpg", "png", "webp", "bmp", "tiff", "txt", "json"} <= exts


def test_a_shard_whose_sizes_are_all_unknown_still_opens_with_the_others(tmp_path):
    """A field that is null in every row of one shard must not give that shard a type the others cannot share."""
    from PIL import Image

    from imgcurate.io.make import Record, write_shards

    photo = encode_image(Image.new("RGB", (40, 30), (200, 30, 30)), "jpg")
    broken = b"\xff\xd8 not a jpeg"
    write_shards([Record({"jpg": photo}), Record({"jpg": broken}), Record({"jpg": broken})], str(tmp_path / "in"),
                 samples_per_shard=2)  # fmt: skip
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "in"))
    df = ds.metadata.compute()
    assert df.width.dtype == pd.Int64Dtype() and df.width.tolist()[0] == 40 and df.width.isna().tolist()[1:] == [1, 1]
    out = ds.to_webdataset(str(tmp_path / "out"), samples_per_shard=1).metadata.compute()  # one shard per sample
    assert out.width.dtype == pd.Int64Dtype() and out.width.isna().sum() == 2


def test_sidecar_fields_named_like_the_columns_are_kept_beside_them(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = encode_image(Image.new("RGB", (40, 30), (200, 30, 30)), "jpg")
    (folder / "a.jpg").write_bytes(photo)
    (folder / "a.txt").write_text("the txt caption")
    (folder / "a.json").write_text(json.dumps({"key": "0042", "caption": "the json caption", "error": None}))
    (folder / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "b.json").write_text(json.dumps({"caption": "only in the json", "error": "upstream said so"}))
    make_shards(str(folder), str(tmp_path / "shards"))
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute().set_index("source_path")
    a, b = df.loc["a.jpg"], df.loc["b.jpg"]
    assert a["key"] == "000000000" and a["source_key"] == "0042"
    assert a["caption"] == "the txt caption" and a["source_caption"] == "the json caption" and pd.isna(a["error"])
    assert b["caption"] == "only in the json"  # no txt beside it: the json's caption is the caption
    assert b["error"] == "image header is unreadable" and b["source_error"] == "upstream said so"


def test_unreadable_image_files_are_error_samples(tmp_path):
    folder, files = _photo_folder(tmp_path, n=3)
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")  # a broken link: listed, not readable
    make_shards(str(folder), str(tmp_path / "shards"))
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute().set_index("source_path")
    assert sorted(df.index) == sorted([*files, "gone.jpg"])
    assert df.loc["gone.jpg", "error"] == "cannot read image file 'gone.jpg' (No such file or directory)"
    assert df.drop(index="gone.jpg")["error"].isna().all()


def test_every_problem_of_a_sample_is_recorded_not_only_the_first(tmp_path):
    folder, _ = _photo_folder(tmp_path, n=1)
    (folder / "fake.png").write_bytes(b"this is text, not a png")
    (folder / "fake.json").write_text("[1]")
    (folder / "fake.txt").write_bytes(b"\xff\xfe not utf-8")
    make_shards(str(folder), str(tmp_path / "shards"))
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute().set_index("source_path")
    assert df.loc["fake.png", "error"] == (
        "caption is not valid UTF-8; sidecar json is not an object; image header is unreadable"
    )
    assert df.drop(index="fake.png")["error"].isna().all()


def test_making_shards_never_mixes_old_and_new_ones(tmp_path):
    from imgcurate.io.make import Record, write_shards

    folder, _ = _photo_folder(tmp_path, n=5)
    out = tmp_path / "shards"
    make_shards(str(folder), str(out), samples_per_shard=1)  # 5 shards
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    try:
        make_shards(str(folder), str(out), samples_per_shard=2)
    except FileExistsError as err:
        assert str(err) == f"{out}: already holds shards; pass overwrite=True (--overwrite) to replace them"
    else:
        raise AssertionError("shards were written over older ones without overwrite")

    def stopped():  # a run that stops after two samples: the folder keeps its shards as they were
        photo = next(iter(sorted(folder.glob("*.jpg")))).read_bytes()
        yield Record({"jpg": photo})
        yield Record({"jpg": photo})
        raise KeyboardInterrupt

    try:
        write_shards(stopped(), str(out), samples_per_shard=1, overwrite=True)
    except KeyboardInterrupt:
        pass
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()} == before
    assert len(ImageTextPairDataset.from_webdataset(str(out)).metadata) == 5
    make_shards(str(folder), str(out), samples_per_shard=2, overwrite=True)  # 3 shards, and only those
    assert sorted(p.name for p in out.iterdir()) == [
        *[f"0000{i}.{ext}" for i in range(3) for ext in ("parquet", "tar")], "_imgcurate_export.json"
    ]  # fmt: skip
    assert len(ImageTextPairDataset.from_webdataset(str(out)).metadata) == 5


def test_a_member_with_an_empty_extension_stays_with_its_sample(tmp_path):
    from PIL import Image

    from imgcurate.io.make import Record, write_shards

    photo = encode_image(Image.new("RGB", (40, 30), (200, 30, 30)), "jpg")
    write_shards([Record({"jpg": photo, "": b"no extension"})], str(tmp_path / "in"))
    assert tar_members(str(tmp_path / "in" / "00000.tar"))["000000000."] == b"no extension"
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "in"))
    out = ds.to_webdataset(str(tmp_path / "out"))
    assert tar_members(out.tar_files[0])["000000000."] == b"no extension"


def test_an_empty_source_is_an_error_that_leaves_the_output_as_it_was(tmp_path):
    import pytest

    from imgcurate.cli import main

    folder, _ = _photo_folder(tmp_path, n=2)
    make_shards(str(folder), str(tmp_path / "shards"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir() if p.is_file()}
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("no image here")
    with pytest.raises(FileNotFoundError, match=r"empty: no images \(jpg"):
        make_shards(str(tmp_path / "empty"), str(tmp_path / "shards"), overwrite=True)
    assert main(["shard", str(tmp_path / "empty"), str(tmp_path / "shards"), "--overwrite"]) == 2
    pd.DataFrame({"path": []}).to_csv(tmp_path / "list.csv", index=False)
    with pytest.raises(ValueError, match=r"list\.csv: the list has no rows"):
        make_shards(str(tmp_path / "list.csv"), str(tmp_path / "shards"), overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir() if p.is_file()} == before
    assert not (tmp_path / "shards" / ".imgcurate-staging").exists()
    with pytest.raises(ValueError, match="no samples to write"):  # the writer's own guard
        from imgcurate.io.make import write_shards

        write_shards([], str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # a folder it made is not left behind


def test_a_list_on_another_filesystem_takes_relative_paths_from_its_folder(tmp_path):
    import fsspec

    folder, files = _photo_folder(tmp_path, n=2)
    fs = fsspec.filesystem("memory")
    fs.pipe("/lists-of-make-test/img0.jpg", files["img0.jpg"])
    fs.pipe("/lists-of-make-test/list.csv", b"path,caption\nimg0.jpg,a\n")
    try:
        make_shards("memory://lists-of-make-test/list.csv", str(tmp_path / "shards"))
    finally:
        fs.rm("/lists-of-make-test", recursive=True)
    df = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute()
    assert df["error"].isna().all() and df["width"].tolist() == [40]


def test_a_records_own_size_and_source_path_are_kept_beside_the_measured_ones(tmp_path):
    folder, _ = _photo_folder(tmp_path, n=1)
    (folder / "img0.json").write_text(json.dumps({"width": 9999, "source_path": "s3://elsewhere/img0.jpg"}))
    make_shards(str(folder), str(tmp_path / "shards"))
    row = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute().iloc[0]
    assert (row["width"], row["height"], row["source_path"]) == (40, 30, "img0.jpg")
    assert (row["source_width"], row["source_source_path"]) == (9999, "s3://elsewhere/img0.jpg")


def test_a_decompression_bomb_is_named_as_such_when_sharded(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a PNG header that declares 30000 x 30000 pixels (PIL refuses to decode it), with a few bytes of data
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "big.png").write_bytes(bomb)
    make_shards(str(tmp_path / "photos"), str(tmp_path / "shards"))
    row = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")).metadata.compute().iloc[0]
    assert row["error"].startswith("image is a decompression bomb (Image size (900000000 pixels) exceeds limit")
