"""Shards on object storage: open, embed and export ``s3://`` shards through fsspec (s3fs) against a local S3 API
(moto's server on 127.0.0.1), with ``storage_options`` pointing at it."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e .[test])")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")

from imgcurate import ImageTextPairDataset, ShardError  # noqa: E402
from imgcurate.embedders import TimmImageEmbedder  # noqa: E402
from imgcurate.io.tar import iter_samples  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """storage_options for a fresh moto S3 server on a free loopback port, with a bucket ``data``."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never look for instance credentials on the network
    }.items():
        monkeypatch.setenv(name, value)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    import boto3

    boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"]).create_bucket(Bucket="data")
    yield options
    server.stop()


def test_open_embed_and_export_on_s3(sample_dir, s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    for path in sorted(sample_dir.glob("*.tar")):  # tars only: the parquets are scanned and written on S3
        fs.put(str(path), f"data/shards/{path.name}")
    local = ImageTextPairDataset.from_webdataset(str(sample_dir)).metadata.compute()

    ds = ImageTextPairDataset.from_webdataset("s3://data/shards", storage_options=s3)
    assert ds.tar_files == [f"s3://data/shards/0000{i}.tar" for i in range(4)]
    assert sorted(fs.glob("data/shards/*.parquet")) == [f"data/shards/0000{i}.parquet" for i in range(4)]
    assert ds.metadata.compute()["key"].tolist() == local["key"].tolist()

    ds = TimmImageEmbedder("test_resnet", batch_size=8, device="cpu")(ds).persist()
    df = ds.metadata.compute()
    assert df["image_embedding"].notna().all() and df["image_embedding_error"].isna().all()
    ds = ds.with_metadata(ds.metadata.assign(keep=ds.metadata["variant"] != "resized"))
    out = ds.to_webdataset("s3://data/out", filter_column="keep", samples_per_shard=10, old_id_col="old")
    again = ImageTextPairDataset.from_webdataset("s3://data/out", storage_options=s3)  # validated
    meta = again.metadata.compute()
    assert meta["old"].tolist() == df.loc[df["variant"] != "resized", "key"].tolist()
    assert [list(v) for v in meta["image_embedding"]] == [
        list(v) for v in df.loc[df["variant"] != "resized", "image_embedding"]
    ]
    source = {s.key: s.members for t in sorted(sample_dir.glob("*.tar")) for s in iter_samples(str(t))}
    exported = [s for t in out.tar_files for s in iter_samples(t, storage_options=s3)]
    assert [source[old] for old in meta["old"]] == [s.members for s in exported]


def test_damaged_shard_on_s3_is_named(sample_dir, s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    data = (sample_dir / "00001.tar").read_bytes()
    fs.pipe("data/bad/00000.tar", data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"s3://data/bad/00000\.tar: truncated"):
        ImageTextPairDataset.from_webdataset("s3://data/bad", storage_options=s3)


def test_an_export_under_a_key_of_the_same_name_is_accepted(sample_dir, s3):
    """On S3 ``exports`` (an object) and ``exports/v2/...`` (objects under a prefix) live side by side, so a pipeline
    may export there; ``exports`` itself is an object, not a folder."""
    import s3fs

    from imgcurate.errors import ConfigError
    from imgcurate.pipeline import Pipeline

    fs = s3fs.S3FileSystem(**s3)
    fs.pipe("data/exports", b"an object")
    fs.pipe("data/exports/v1/00000.tar", b"")
    assert fs.isfile("data/exports") and fs.isfile("data/exports/v1/00000.tar")

    def check(path):
        Pipeline(steps=[], input=str(sample_dir), export={"path": path}, storage_options=s3).check_config(None)

    check("s3://data/exports/v2")
    with pytest.raises(ConfigError, match="^export.path: s3://data/exports is a file, not a folder$"):
        check("s3://data/exports")


def test_nothing_to_write_on_s3_is_the_same_clear_error_and_leaves_nothing(sample_dir, s3):
    import s3fs

    from imgcurate.io.make import write_shards

    fs = s3fs.S3FileSystem(**s3)
    for path in sorted(sample_dir.glob("*")):
        fs.put(str(path), f"data/shards/{path.name}")
    ds = ImageTextPairDataset.from_webdataset("s3://data/shards", storage_options=s3)
    df = ds.metadata
    with pytest.raises(ValueError, match="no sample is selected"):
        ds.with_metadata(df.assign(k=df.width < 0)).to_webdataset("s3://data/none", filter_column="k")
    with pytest.raises(ValueError, match="no samples to write"):
        write_shards([], "s3://data/none-made", storage_options=s3)
    assert not fs.find("data/none") and not fs.find("data/none-made")


def test_imgcurate_shard_publishes_on_s3(tmp_path, s3):
    """make_shards moves every staged file out before removing the staging folder, which then no longer exists on an
    object store."""
    import s3fs

    from imgcurate.io.make import make_shards
    from imgcurate.testing import encode_image

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(encode_image(Image.new("RGB", (9, 7), (1, 2, 3)), "png"))
    make_shards(str(tmp_path / "photos"), "s3://data/made", storage_options=s3)
    fs = s3fs.S3FileSystem(**s3)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find("data/made")) == [
        "00000.parquet", "00000.tar", "_imgcurate_export.json"
    ]  # fmt: skip
    meta = ImageTextPairDataset.from_webdataset("s3://data/made", storage_options=s3).metadata.compute()
    assert meta["width"].tolist() == [9] and meta["error"].isna().all()


def test_the_input_fingerprint_sees_a_same_size_rewrite_on_s3(s3):
    """An object store's modification times have whole seconds: a shard rewritten with other bytes of the same size
    within that second is told apart by its ETag."""
    import time

    import s3fs

    from imgcurate.rundir import input_fingerprint

    fs = s3fs.S3FileSystem(**s3)
    time.sleep(1.05 - time.time() % 1)  # the start of a second: both writes fall in it
    fs.pipe("data/fp/00000.tar", b"a" * 1024)
    before = input_fingerprint("s3://data/fp", s3)
    fs.pipe("data/fp/00000.tar", b"b" * 1024)
    fs.invalidate_cache()
    assert fs.info("data/fp/00000.tar")["size"] == 1024
    assert input_fingerprint("s3://data/fp", s3) != before


def test_an_input_tar_missing_while_an_export_selects_on_s3_is_not_a_concurrent_export(sample_dir, s3):
    """On an object store the staging folder has no object before the first selected parquet: a tar that a lazy step
    finds gone in the select pass is named as missing, not taken for another export removing the staging folder."""
    import s3fs

    from imgcurate import ConcurrentExportError
    from imgcurate.dedup import ExactDuplicates

    fs = s3fs.S3FileSystem(**s3)
    for path in sorted(sample_dir.glob("*.tar")):
        fs.put(str(path), f"data/missing-tar/{path.name}")
    ds = ExactDuplicates()(ImageTextPairDataset.from_webdataset("s3://data/missing-tar", storage_options=s3))
    fs.rm("data/missing-tar/00001.tar")
    with pytest.raises(Exception) as raised:
        ds.to_webdataset("s3://data/out-of-a-missing-tar")  # moto's buckets outlive each test's server
    assert not isinstance(raised.value, ConcurrentExportError) and "00001.tar" in str(raised.value)


def test_local_input_exports_to_s3_with_the_exports_own_storage_options(sample_dir, s3):
    """The dataset reads a local folder (no storage options); ``to_webdataset(..., storage_options=...)`` writes the
    export to S3 with options of its own, and the dataset it returns reads the export with them."""
    import s3fs

    ds = ImageTextPairDataset.from_webdataset(str(sample_dir))
    df = ds.metadata.compute()
    ds = ds.with_metadata(ds.metadata.assign(keep=ds.metadata["variant"] != "resized"))
    out = ds.to_webdataset("s3://data/from-local", filter_column="keep", samples_per_shard=8, old_id_col="old",
                           storage_options=s3)  # fmt: skip
    assert out.storage_options == s3 and ds.storage_options == {}
    fs = s3fs.S3FileSystem(**s3)
    assert not fs.exists("data/from-local/.imgcurate-staging")
    meta = ImageTextPairDataset.from_webdataset("s3://data/from-local", storage_options=s3).metadata.compute()
    assert meta["old"].tolist() == df.loc[df["variant"] != "resized", "key"].tolist()
    source = {s.key: s.members for t in sorted(sample_dir.glob("*.tar")) for s in iter_samples(str(t))}
    exported = [s for t in out.tar_files for s in iter_samples(t, storage_options=s3)]
    assert [source[old] for old in meta["old"]] == [s.members for s in exported]
    local = ds.to_webdataset(str(sample_dir.parent / "local-out"), filter_column="keep", samples_per_shard=8,
                             old_id_col="old")  # fmt: skip
    for tar in local.tar_files:  # the same bytes as the same export into a local folder
        name = tar.rsplit("/", 1)[1]
        for ext in ("tar", "parquet"):
            local_file = tar[: -len("tar")] + ext
            assert fs.cat(f"data/from-local/{name[:-3]}{ext}") == open(local_file, "rb").read()


def test_a_pipeline_exports_to_s3_with_the_export_sections_storage_options(sample_dir, s3):
    """``export: {storage_options: ...}`` reaches the export folder and the default run directory beside it; the
    options (which may hold credentials) are not recorded in ``run.json``; a rerun reuses the published export."""
    import json

    import s3fs

    from imgcurate.dedup import ExactDuplicates
    from imgcurate.pipeline import Pipeline

    def pipeline():
        return Pipeline(steps=[ExactDuplicates()], input=str(sample_dir),
                        export={"path": "s3://data/piped", "storage_options": s3})  # fmt: skip

    summaries = []
    out = pipeline().run(summary=summaries.append)
    fs = s3fs.S3FileSystem(**s3)
    assert out.storage_options == s3 and out.num_shards >= 1
    described = json.loads(fs.cat("data/piped.run/run.json"))
    assert "storage_options" not in json.dumps(described) and "endpoint_url" not in json.dumps(described)
    assert fs.exists("data/piped.run/summary.json") and fs.exists("data/piped/_imgcurate_export.json")
    assert fs.cat("data/piped.run/report.html").startswith(b"<!doctype html")  # the run report, with those options
    from imgcurate.reports.run import report_run_dir

    report_run_dir("s3://data/piped.run", str(sample_dir.parent / "again.html"), storage_options=s3,
                   input_storage_options={})  # fmt: skip
    assert (sample_dir.parent / "again.html").read_bytes().startswith(b"<!doctype html")
    kept = ImageTextPairDataset.from_webdataset("s3://data/piped", storage_options=s3).metadata.compute()
    assert len(kept) == summaries[0]["samples_in"] > 0
    pipeline().run(summary=summaries.append)
    assert summaries[1]["exported"]["reused"] is True
    # a run directory given on the export's object store gets the export's options (not the local input's, none)
    given = Pipeline(steps=[ExactDuplicates()], input=str(sample_dir), run_dir="s3://data/elsewhere.run",
                     export={"path": "s3://data/piped2", "storage_options": s3})  # fmt: skip
    given.run()
    assert fs.exists("data/elsewhere.run/summary.json") and not fs.exists("data/piped2.run")


def test_an_object_store_that_does_not_answer_is_one_line_from_the_cli(sample_dir, tmp_path, capsys, monkeypatch):
    """botocore's errors (no endpoint, no credentials, access denied) are the store's answer, not a fault of the
    program: one line naming the error and what to check, exit 2, no traceback."""
    import yaml

    from imgcurate.cli import main

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"key": "a", "secret": "b", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_free_port()}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}  # fmt: skip
    config = {"input": str(sample_dir), "steps": [{"ExactDuplicates": {}}],
              "export": {"path": "s3://nobucket/out", "storage_options": options}}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgcurate: error: the object store: EndpointConnectionError: ") and "storage_options" in err
    assert len(err.strip().splitlines()) == 1


def test_doctor_checks_the_rest_when_the_inputs_object_store_does_not_answer_here(tmp_path, capsys, monkeypatch):
    """A config for the cluster is often checked on a machine without the bucket's credentials: the column flow is
    not checked (a note says why), the rest is."""
    import yaml

    from imgcurate.cli import main

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"key": "a", "secret": "b", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_free_port()}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}  # fmt: skip
    config = {"input": "s3://nobucket/in", "storage_options": options, "steps": [{"ExactDuplicates": {}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert main(["doctor", "--config", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert "column flow not checked: the input cannot be read here (EndpointConnectionError: " in out
