"""DALI index files written by imgcurate: byte for byte what DALI's own wds2idx writes, for the same tars."""

from __future__ import annotations

import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from imgcurate import ImageTextPairDataset
from imgcurate.errors import ShardError
from imgcurate.io.index import write_index
from imgcurate.io.shards import ShardWriter

wds2idx = shutil.which("wds2idx")
needs_wds2idx = pytest.mark.skipif(wds2idx is None, reason="DALI's wds2idx is not installed")


def _reference(tar, tmp_path) -> str:
    out = tmp_path / "reference.idx"
    subprocess.run([wds2idx, str(tar), str(out)], check=True, capture_output=True)
    return out.read_text()


@needs_wds2idx
def test_index_of_existing_shards_matches_wds2idx(sample_dir, tmp_path):
    for tar in sorted(sample_dir.glob("*.tar")):
        written = write_index(str(tar))
        assert written == str(tar.with_suffix(".idx"))
        assert tar.with_suffix(".idx").read_text() == _reference(tar, tmp_path)


@needs_wds2idx
def test_index_written_with_the_tar_matches_wds2idx(tmp_path):
    tar = tmp_path / "00000.tar"
    with ShardWriter(str(tar), index=True) as writer:
        writer.write("a", {"jpg": b"x" * 700, "txt": b"caption", "json": b"{}"})
        writer.write("b", {"png": b"y" * 513})
        writer.write("c", {"jpg": b""})
    assert tar.with_suffix(".idx").read_text() == _reference(tar, tmp_path)
    assert tar.with_suffix(".idx").read_text().splitlines()[0] == "v1.2 3"


def test_offsets_point_at_the_data_past_long_name_headers(tmp_path):
    """A name past 100 characters takes a GNU long-name header and its own block before the real header; the
    offsets must count them. (DALI's wds2idx reads the offset off `tar --block-num`, which names the first of those
    headers, so its offset for such a member points 1 KiB early.)"""
    import tarfile

    tar = tmp_path / "00000.tar"
    members = {"short": {"jpg": b"x" * 700}, "k" * 150: {"png": b"y" * 513, "txt": b"a caption"}}
    members["z" * 300] = {"jpg": b"z" * 2000}
    with ShardWriter(str(tar), index=True) as writer:
        for key, parts in members.items():
            writer.write(key, parts)
    entries = [line.split() for line in tar.with_suffix(".idx").read_text().splitlines()[1:]]
    by_name = {e[i + 3]: (int(e[i + 1]), int(e[i + 2])) for e in entries for i in range(0, len(e), 4)}
    with tarfile.open(tar) as archive, open(tar, "rb") as f:
        for info in archive:
            assert by_name[info.name] == (info.offset_data, info.size)
            f.seek(by_name[info.name][0])
            key, _, ext = info.name.partition(".")
            assert f.read(info.size) == members[key][ext]
    written_with_the_tar = tar.with_suffix(".idx").read_text()
    write_index(str(tar))  # from the headers of the finished tar: the same index
    assert tar.with_suffix(".idx").read_text() == written_with_the_tar


@needs_wds2idx
def test_export_writes_indexes_and_drops_stale_ones(sample_ds, tmp_path):
    out = tmp_path / "out"
    ds = sample_ds.to_webdataset(str(out), samples_per_shard=8, index_files=True)
    assert ds.num_shards > 1
    for tar in ds.tar_files:
        idx = tar[:-4] + ".idx"
        assert open(idx).read() == _reference(tar, tmp_path)
    ImageTextPairDataset.from_webdataset(str(out)).to_webdataset(str(tmp_path / "again"), samples_per_shard=8)
    sample_ds.to_webdataset(str(out), samples_per_shard=100, overwrite=True)  # one shard now, no index asked for
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "_imgcurate_export.json"]


def test_a_name_with_white_space_cannot_be_indexed_and_leaves_nothing(tmp_path):
    tar = tmp_path / "00000.tar"
    with pytest.raises(ShardError, match="white space"):
        with ShardWriter(str(tar), index=True) as writer:
            writer.write("a b", {"jpg": b"x"})
    assert list(tmp_path.iterdir()) == []


def test_cli_index_skips_indexed_shards_unless_asked(sample_dir, capsys):
    from imgcurate.cli import main

    assert main(["index", str(sample_dir)]) == 0
    assert "wrote 4 DALI index files" in capsys.readouterr().out
    assert main(["index", str(sample_dir)]) == 0
    assert "wrote 0 DALI index files (4 shards skipped" in capsys.readouterr().out
    assert main(["index", str(sample_dir), "--overwrite"]) == 0
    assert "wrote 4 DALI index files" in capsys.readouterr().out
    assert main(["index", str(sample_dir / "nowhere")]) == 2
    assert main(["index", str(sample_dir / "00000.tar")]) == 2
    assert "00000.tar: a file, not a folder of .tar shards" in capsys.readouterr().err


def test_cli_index_indexes_every_readable_shard_and_names_each_broken_one(sample_dir, capsys):
    from imgcurate.cli import main

    tars = sorted(sample_dir.glob("*.tar"))
    tars[1].write_bytes(b"this is not a tar file" * 100)
    with ShardWriter(str(sample_dir / "00009.tar")) as writer:  # a name with white space: no index can hold it
        writer.write("a b", {"jpg": b"x"})
    (sample_dir / "00010.tar").symlink_to(sample_dir / "gone.tar")  # a broken link
    assert main(["index", str(sample_dir)]) == 1
    out, err = capsys.readouterr()
    assert "wrote 3 DALI index files (0 shards skipped" in out
    assert f"{tars[1]}: not a readable tar file" in err
    assert "00009.tar: member 'a b.jpg' has white space" in err
    assert "00010.tar: cannot be read (No such file or directory)" in err
    assert "3 shards could not be indexed" in err
    (sample_dir / "00010.tar").unlink()
    for tar in tars[:1] + tars[2:]:
        assert tar.with_suffix(".idx").read_text().startswith("v1.2 ")
    assert not tars[1].with_suffix(".idx").exists() and not (sample_dir / "00009.idx").exists()
    with pytest.raises(ShardError, match="not a readable tar"):  # the API raises the first error unless it collects
        from imgcurate.io.index import write_indexes

        write_indexes([str(t) for t in tars], overwrite=True)


@pytest.mark.parametrize("damage", ["cut after the first member", "second header overwritten"])
def test_a_damaged_tar_gets_no_index_of_its_first_members(sample_dir, damage):
    tar = sorted(sample_dir.glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as archive:
        members = archive.getmembers()
    second = members[1].offset
    if damage == "cut after the first member":
        data = data[:second]
    else:
        data[second : second + 512] = b"\xff" * 512
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"0000\d\.tar: truncated"):
        write_index(str(tar))
    assert not tar.with_suffix(".idx").exists()


def test_exports_with_odd_member_extensions_stay_readable_by_dali_or_are_refused(tmp_path):
    from conftest import write_tar

    from imgcurate.testing import encode_image

    pytest.importorskip("nvidia.dali")
    from PIL import Image

    jpeg = encode_image(Image.new("RGB", (8, 8), (10, 20, 30)), "jpg")
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar", [("a.jpg", jpeg), ("a.", b"no extension"), ("b.jpg", jpeg)])
    out = ImageTextPairDataset.from_webdataset(str(tmp_path / "in")).to_webdataset(str(tmp_path / "out"),
                                                                                   index_files=True)  # fmt: skip
    index = (tmp_path / "out" / "00000.idx").read_text()
    assert "000000000. " not in index and index.startswith("v1.2 2\n")  # the member without extension left out
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read():
        return fn.readers.webdataset(paths=out.tar_files, index_paths=[t[:-4] + ".idx" for t in out.tar_files],
                                     ext=["jpg"], random_shuffle=False, name="r")  # fmt: skip

    pipe = read()
    pipe.build()
    got = [bytes(np.asarray(pipe.run()[0].at(0))) for _ in range(pipe.reader_meta("r")["epoch_size"])]
    assert got == [jpeg, jpeg]

    (tmp_path / "spaced").mkdir()
    write_tar(tmp_path / "spaced" / "00000.tar", [("a.jpg", jpeg), ("a.my notes.txt", b"x")])
    spaced = ImageTextPairDataset.from_webdataset(str(tmp_path / "spaced"))
    with pytest.raises(ShardError, match=r"spaced/00000\.tar: sample 'a' has a member 'my notes\.txt'.+index_files"):
        spaced.to_webdataset(str(tmp_path / "out2"), index_files=True)
    spaced.to_webdataset(str(tmp_path / "out2"))  # without indexes it exports
