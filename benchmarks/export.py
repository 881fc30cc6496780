"""Re-sharding throughput against a plain tar-to-tar copy of the same bytes, and peak memory at 1k and 10k samples.

    python benchmarks/export.py            # 1k and 10k samples of ~60 KB JPEGs

Each measurement runs in a fresh subprocess (so peak RSS is its own) on Dask's synchronous scheduler (one core, like
the baseline). The baseline reads every member with ``tarfile`` and writes it to a new tar; the export also groups
members into samples, re-keys them, checks alignment and writes the parquet. Ratio = export samples/s over copy
samples/s (goal: >= 0.8). Memory must stay flat from 1k to 10k samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work")


def make_input(n: int, per_shard: int = 1000) -> str:
    import numpy as np
    from PIL import Image

    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import encode_image

    folder = os.path.join(WORK, f"in_{n}")
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(16):  # noisy photos-sized JPEGs, about 60 KB each
        pixels = (rng.random((256, 320, 3)) * 60 + np.linspace(0, 190, 320)[None, :, None]).astype("uint8")
        blobs.append(encode_image(Image.fromarray(pixels), "jpg", quality=80 + i))
    records = (Record({"jpg": blobs[i % 16]}, {"i": i}, f"caption number {i}") for i in range(n))
    write_shards(records, folder, samples_per_shard=per_shard, total=n)
    open(os.path.join(folder, "done"), "w").close()
    return folder


def plain_copy(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(src, name)) as tin, tarfile.open(os.path.join(dst, name), "w") as tout:
            for member in tin:
                tout.addfile(member, tin.extractfile(member))


def child(mode: str, n: int) -> None:
    import dask

    from imgcurate import ImageTextPairDataset

    src = make_input(n)
    dst = os.path.join(WORK, f"out_{mode}_{n}")
    shutil.rmtree(dst, ignore_errors=True)
    dask.config.set({"scheduler": "sync", "imgcurate.progress": False})
    if mode == "export":
        ds = ImageTextPairDataset.from_webdataset(src, validate=False)
        df = ds.metadata
        ds = ds.with_metadata(df.assign(keep=df["i"] % 10 != 9))  # keep 90%, so shards are re-cut
        start = time.perf_counter()
        ds.to_webdataset(dst, filter_column="keep", samples_per_shard=1000)
        copied = n - n // 10
    else:
        start = time.perf_counter()
        plain_copy(src, dst)
        copied = n
    seconds = time.perf_counter() - start
    shutil.rmtree(dst, ignore_errors=True)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "n": n, "seconds": seconds, "per_s": copied / seconds, "peak_rss_mb": rss_mb}))


def run(mode: str, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(n)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--sizes", default="1000,10000")
    args = parser.parse_args()
    import dask

    dask.config.set({"imgcurate.progress": False})
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    for n in map(int, args.sizes.split(",")):
        make_input(n)
        best = {}
        for _ in range(2):  # alternate, keep the best of two (the page cache is warm for both)
            for mode in ("copy", "export"):
                r = run(mode, n)
                if mode not in best or r["per_s"] > best[mode]["per_s"]:
                    best[mode] = r
        ratio = best["export"]["per_s"] / best["copy"]["per_s"]
        print(
            f"n={n:>6}  copy {best['copy']['per_s']:8.0f} samples/s  export {best['export']['per_s']:8.0f} samples/s  "
            f"ratio {ratio:.2f}   peak RSS: copy {best['copy']['peak_rss_mb']:.0f} MB, "
            f"export {best['export']['peak_rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
