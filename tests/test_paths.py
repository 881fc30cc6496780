"""Paths as every process and filesystem sees them: weights named relatively or with ``~`` are the same file (and
the same cache key) on a worker in another folder; missing weights are found before work; object stores, broken
links and unwritable places give one-line answers naming the path."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import yaml

from imgcurate.classifiers import AestheticClassifier
from imgcurate.cli import main
from imgcurate.embedders import TimmImageEmbedder
from imgcurate.errors import ConfigError, FileError
from imgcurate.io._fs import atomic_open
from imgcurate.pipeline import Pipeline


def _aesthetic_weights(path, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [("layers.0", 1024, 768), ("layers.2", 128, 1024), ("layers.4", 64, 128), ("layers.6", 16, 64),
              ("layers.7", 1, 16)]  # fmt: skip
    state = {}
    for name, out, inp in shapes:
        state[f"{name}.weight"] = torch.randn(out, inp, generator=g)
        state[f"{name}.bias"] = torch.randn(out, generator=g)
    torch.save(state, path)


@pytest.mark.parametrize("given", ["relative", "home"])
def test_a_steps_weights_and_cache_key_are_the_same_from_another_working_directory(tmp_path, monkeypatch, given):
    """A worker unpickles the step in its own folder: its model cache key must still follow the file's content, so
    new weights at the same path are a new model there too, and the run directory's fingerprint sees them."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _aesthetic_weights(tmp_path / "w.pth", seed=0)
    name = "w.pth" if given == "relative" else "~/w.pth"
    step = AestheticClassifier(model_path=name, device="cpu")
    assert step.model_path == str(tmp_path / "w.pth")
    shipped = pickle.dumps(step)
    before = (step.fingerprint(), pickle.loads(shipped).cache_key())
    assert step.describe()["files"]["model_path"]  # the content is part of what defines the step
    _aesthetic_weights(tmp_path / "w.pth", seed=1)  # new weights, same name
    again = AestheticClassifier(model_path=name, device="cpu")  # as a rerun builds it on the client
    monkeypatch.chdir("/")  # a worker's folder
    worker = pickle.loads(pickle.dumps(again))
    assert worker.cache_key() != before[1] and again.fingerprint() != before[0]
    assert worker.cache_key() == pickle.loads(pickle.dumps(again)).cache_key()


def test_a_checkpoint_under_home_is_found(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HOME", str(tmp_path))
    save_file(timm.create_model("test_resnet").state_dict(), str(tmp_path / "ck.safetensors"))
    step = TimmImageEmbedder("test_resnet", checkpoint_path="~/ck.safetensors")
    assert step.checkpoint_path == str(tmp_path / "ck.safetensors") and step.describe()["files"]["checkpoint_path"]


def test_missing_weight_files_are_found_by_the_resource_check(tmp_path):
    """What a pipeline (and each worker of a running scheduler) checks before any work: the step's own files and
    those of the classifiers fused into an embedder."""
    _aesthetic_weights(tmp_path / "w.pth", seed=0)
    head = AestheticClassifier(model_path=str(tmp_path / "w.pth"), device="cpu")
    embedder = TimmImageEmbedder("test_resnet", classifiers=[head])
    head.check_resources()
    embedder.check_resources()
    os.remove(tmp_path / "w.pth")
    message = f"{tmp_path / 'w.pth'}: not found (AestheticClassifier's model_path)"
    for step in (head, embedder):
        with pytest.raises(FileError) as err:
            step.check_resources()
        assert str(err.value) == message


def test_a_broken_symbolic_link_as_the_export_folder_is_named(sample_dir, tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ConfigError, match=f"^export.path: {tmp_path / 'out'} is a broken symbolic link, not a folder"):
        Pipeline(steps=[], input=str(sample_dir), export={"path": str(tmp_path / "out")}).check_config(None)
    with pytest.raises(ConfigError, match="cannot be made: .*/out is a broken symbolic link, not a folder$"):
        Pipeline(steps=[], input=str(sample_dir), export={"path": str(tmp_path / "out" / "x")}).check_config(None)


def test_a_run_that_changes_only_its_export_starts_without_the_earlier_summary(sample_dir, tmp_path):
    config = {
        "input": str(sample_dir),
        "output": str(tmp_path / "out"),
        "steps": [{"ExactDuplicates": {}}, {"SampleFilter": {"drop_duplicates": ["exact_duplicate"]}}],
        "export": {"filter_column": "keep", "samples_per_shard": 100},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    summary = tmp_path / "out.run" / "summary.json"
    assert json.loads(summary.read_text())["exported"]["shards"] == 1
    same = Pipeline.from_yaml(str(tmp_path / "p.yaml"))
    same.compute_steps(same.open_input())  # the same run again: its summary still describes it
    assert summary.exists()
    config["export"]["samples_per_shard"] = 5
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    changed = Pipeline.from_yaml(str(tmp_path / "p.yaml"))
    changed.compute_steps(changed.open_input())  # the steps again, as a run that then stops before its export
    assert not summary.exists()


def test_a_write_that_cannot_start_names_the_file_and_why(tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    cases = {
        str(tmp_path / "a-file" / "x.json"): (NotADirectoryError, f"{tmp_path / 'a-file'} is a file, not a folder"),
        str(tmp_path / "no" / "x.json"): (FileNotFoundError, f"the folder {tmp_path / 'no'} does not exist"),
    }
    for path, (kind, problem) in cases.items():
        with pytest.raises(kind) as err, atomic_open(path) as f:
            f.write(b"{}")
        assert str(err.value) == f"{path}: cannot write it: {problem}"
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_generated_configs_go_where_a_home_path_says(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["init-config", "~/pipeline.yaml"]) == 0
    assert yaml.safe_load((tmp_path / "pipeline.yaml").read_text())["steps"]


def test_shards_that_are_symbolic_links_are_read_as_their_files(sample_dir, tmp_path):
    import pandas as pd

    from imgcurate import ImageTextPairDataset

    linked = tmp_path / "linked"
    linked.mkdir()
    for path in sorted(sample_dir.iterdir()):  # every tar, and all but one parquet, a link to the original
        if path.suffix == ".tar" or (path.suffix == ".parquet" and path.name != "00000.parquet"):
            os.symlink(path, linked / path.name)
    (linked / "00000.parquet").write_bytes((sample_dir / "00000.parquet").read_bytes())
    original = ImageTextPairDataset.from_webdataset(str(sample_dir)).metadata.compute()
    ds = ImageTextPairDataset.from_webdataset(str(linked))
    assert [os.path.basename(t) for t in ds.tar_files] == sorted(p.name for p in sample_dir.glob("*.tar"))
    pd.testing.assert_frame_equal(ds.metadata.compute(), original)
    assert all(os.path.islink(linked / p.name) for p in sample_dir.glob("*.tar"))  # nothing replaced by a copy

    os.symlink(tmp_path / "nowhere.tar", linked / "00099.tar")  # a broken link is named, not left out
    with pytest.raises(FileError, match="00099.tar: a broken symbolic link"):
        ImageTextPairDataset.from_webdataset(str(linked))


def test_the_run_directory_sees_a_linked_shard_change(sample_dir, tmp_path):
    """A link is read as its target, so the input fingerprint stamps it with the target's size and time: a target
    rewritten in place (same size) is another input, whose step results are not reused."""
    from imgcurate.rundir import input_fingerprint

    linked = tmp_path / "linked"
    linked.mkdir()
    for path in sorted(sample_dir.iterdir()):
        if path.suffix in (".tar", ".parquet"):
            os.symlink(path, linked / path.name)
    before = input_fingerprint(str(linked))
    tar = sorted(sample_dir.glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[-2000] ^= 0xFF  # a byte of the last member, size unchanged
    stat = tar.stat()
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert input_fingerprint(str(linked)) != before
