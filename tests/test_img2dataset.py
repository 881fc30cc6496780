"""Real img2dataset output, downloaded from a loopback HTTP server, opened, embedded, deduplicated and exported.

img2dataset writes a parquet row for every URL (``status``, ``error_message``) but puts only the successful
samples in the tar; every URL must still be accounted for at the end.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading

import pandas as pd
import pytest
from conftest import seeded_checkpoint

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for a newer version on import
img2dataset = pytest.importorskip("img2dataset", reason="img2dataset is not installed (pip install -e .[test])")

from imgcurate import ImageTextPairDataset  # noqa: E402
from imgcurate.dedup import ExactDuplicates  # noqa: E402
from imgcurate.embedders import TimmImageEmbedder  # noqa: E402
from imgcurate.io.tar import NO_SAMPLE, iter_samples  # noqa: E402
from imgcurate.testing import _photo_dir  # noqa: E402

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "horse.png", "coins.png"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over a folder of scikit-image's photos and one file that is not an image."""
    root = tmp_path / "www"
    root.mkdir()
    for name in PHOTOS:
        shutil.copy(os.path.join(_photo_dir(), name), root / name)
    (root / "notes.jpg").write_text("this is text, not a JPEG")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


def test_img2dataset_output_opens_embeds_dedups_and_exports_every_url(server, tmp_path):
    urls = [f"{server}/{name}" for name in PHOTOS]
    urls.insert(2, f"{server}/missing.png")  # 404
    urls.insert(5, f"{server}/notes.jpg")  # not an image
    urls.append(f"{server}/chelsea.png")  # the same photo again: an exact duplicate
    urls.append(f"{server}/gone/away.jpg")  # 404
    pd.DataFrame({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}).to_parquet(
        tmp_path / "urls.parquet"
    )
    out = tmp_path / "i2d"
    img2dataset.download(
        url_list=str(tmp_path / "urls.parquet"),
        input_format="parquet",
        caption_col="caption",
        output_folder=str(out),
        output_format="webdataset",
        image_size=64,
        resize_mode="keep_ratio",
        processes_count=1,
        thread_count=4,
        number_sample_per_shard=4,
        timeout=5,
        retries=0,
        enable_wandb=False,
    )
    assert sorted(p.name for p in out.glob("*_stats.json")) == [
        "00000_stats.json",
        "00001_stats.json",
        "00002_stats.json",
    ]
    tar_samples = sum(1 for tar in sorted(out.glob("*.tar")) for _ in iter_samples(str(tar)))
    assert tar_samples == len(PHOTOS) + 1  # failures are rows in the parquet, not samples in the tar

    ds = ImageTextPairDataset.from_webdataset(str(out))  # validate=True: keys, stats, columns
    # img2dataset writes each shard in the order downloads finish; its keys number the input rows
    df = ds.metadata.compute().sort_values("key", ignore_index=True)
    assert df["url"].tolist() == urls
    failed = df["status"] != "success"
    assert failed.tolist() == [u.endswith(("missing.png", "notes.jpg", "away.jpg")) for u in urls]
    assert df.loc[failed, "error"].str.startswith(("failed_to_download: ", "failed_to_resize: ")).all()
    assert df.loc[~failed, "error"].isna().all()
    assert "404" in df.loc[df["url"].str.endswith("missing.png"), "error"].item()

    ckpt = seeded_checkpoint(tmp_path, "test_resnet")
    ds = TimmImageEmbedder("test_resnet", checkpoint_path=ckpt, batch_size=3, device="cpu")(ds)
    ds = ExactDuplicates()(ds)
    df = ds.metadata.compute().sort_values("key", ignore_index=True)
    assert df.loc[failed, "image_embedding_error"].tolist() == [NO_SAMPLE] * 3
    assert df.loc[failed, "image_embedding"].isna().all()
    assert df.loc[~failed, "image_embedding"].map(len).eq(96).all()  # test_resnet's pooled features
    assert df.loc[~failed, "image_embedding_error"].isna().all()
    assert df["exact_duplicate"].tolist() == [u == urls[-2] and i == len(urls) - 2 for i, u in enumerate(urls)]
    first_chelsea = df.loc[df["url"] == urls[-2], "key"].iloc[0]
    assert df["exact_duplicate_of"].iloc[-2] == first_chelsea
    assert df.loc[failed, "image_sha256"].isna().all()

    # export everything: the failures stay rows without samples; then only the good, unique ones
    everything = ds.to_webdataset(str(tmp_path / "all"), samples_per_shard=5, old_id_col="i2d_key")
    again = ImageTextPairDataset.from_webdataset(everything.path).metadata.compute()  # validates the export
    again = again.sort_values("i2d_key", ignore_index=True)
    assert again["url"].tolist() == urls
    assert again["error"].notna().tolist() == failed.tolist()
    exported = sum(1 for tar in everything.tar_files for _ in iter_samples(tar))
    assert exported == tar_samples
    ds = ds.with_metadata(ds.metadata.assign(keep=ds.metadata["error"].isna() & ~ds.metadata["exact_duplicate"]))
    kept = ds.to_webdataset(str(tmp_path / "kept"), filter_column="keep", old_id_col="i2d_key")
    kept_urls = kept.metadata["url"].compute().tolist()
    dropped = df[failed | df["exact_duplicate"]]["url"].tolist()
    assert sorted(kept_urls + dropped) == sorted(urls)  # every URL accounted for
    assert len(kept_urls) == len(PHOTOS)
