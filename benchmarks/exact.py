"""Exact dedup throughput against a plain loop that reads the same tars with ``tarfile`` and hashes each image.

    python benchmarks/exact.py                    # 10k samples of ~36 KB JPEGs, 10% exact copies
    python benchmarks/exact.py --sizes 1000,10000,50000 --rounds 3

Ways, each in a fresh subprocess (its own peak RSS and CPU time), interleaved round by round, best round kept:

- ``loop``: the peer a user would write: ``tarfile.open`` each shard, ``sha256`` of every ``.jpg`` member, one core.
- ``hash``: the per-shard pass of :class:`~imgcurate.dedup.ExactDuplicates` alone (read the tar, hash the images),
  with Dask's default scheduler.
- ``step``: the whole step with the defaults: the hash pass, the shuffle on the hash that finds first copies, the
  shuffle back to the shards; the count of copies found is checked against the copies planted.

With ``--before DIR`` the ways ``hash`` and ``step`` also run from another checkout of imgcurate (``hash@before``,
``step@before``), to compare versions in the same run.

Per core: samples per CPU second of the process (user + system), which is what a loaded 2-core box can compare
fairly (the loop uses one core, Dask's default scheduler as many as it gets). Goal: ``step`` >= 0.9 x ``loop``.
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
WAYS = ("loop", "hash", "step")


def make_input(n: int, per_shard: int = 1000) -> str:
    """``n`` samples: distinct JPEGs (a noisy photo-like base plus a unique trailer), every tenth one a copy."""
    import numpy as np
    from PIL import Image

    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import encode_image

    folder = os.path.join(WORK, f"exact_{n}")
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(16):
        pixels = (rng.random((256, 320, 3)) * 60 + np.linspace(0, 190, 320)[None, :, None]).astype("uint8")
        blobs.append(encode_image(Image.fromarray(pixels), "jpg", quality=80 + i))

    def image(i: int) -> bytes:  # bytes after the JPEG's end marker: a different file, the same picture
        source = i - 1 if i % 10 == 9 else i
        return blobs[source % 16] + source.to_bytes(8, "little")

    records = (Record({"jpg": image(i)}, {"i": i}, f"caption number {i}") for i in range(n))
    write_shards(records, folder, samples_per_shard=per_shard, total=n)
    open(os.path.join(folder, "done"), "w").close()
    return folder


def hash_loop(folder: str) -> int:
    import hashlib

    count = 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(folder, name)) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".jpg"):
                        hashlib.sha256(tar.extractfile(member).read()).hexdigest()
                        count += 1
    return count


def child(way: str, n: int) -> None:
    import dask

    from imgcurate import ImageTextPairDataset
    from imgcurate.dedup import ExactDuplicates
    from imgcurate.dedup.exact import _HASH_META, _hash_shard
    from imgcurate.steps.base import ShardIO
    from imgcurate.steps.grouped import group_count

    src = make_input(n)
    dask.config.set({"imgcurate.progress": False})
    dask.compute(dask.delayed(int)(0))  # Dask's one-time start-up (it imports distributed), paid by any first compute
    ds = ImageTextPairDataset.from_webdataset(src, validate=False)
    cpu0, start = time.process_time(), time.perf_counter()
    if way == "loop":
        assert hash_loop(src) == n
    elif way == "hash":
        io = ShardIO(ds.id_col, ds.storage_options)
        groups = group_count(ds.num_shards)
        hashes = ds.map_shards(_hash_shard, io, "bytes", groups, meta=_HASH_META, frame=ds.metadata[[ds.id_col]])
        assert int(hashes["digest"].notnull().sum().compute()) == n
    else:
        copies = int(ExactDuplicates()(ds).metadata["exact_duplicate"].sum().compute())
        assert copies == n // 10, copies
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"way": way, "n": n, "per_s": n / seconds, "per_cpu_s": n / cpu, "peak_rss_mb": rss_mb}))


def run(way: str, n: int, before: str | None = None) -> dict:
    env = dict(os.environ)
    if way.endswith("@before"):
        env["PYTHONPATH"] = os.pathsep.join([before, env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--child", way.removesuffix("@before"), str(n)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--sizes", default="10000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="another imgcurate checkout, whose hash and step run as well")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    ways = list(WAYS) + (["hash@before", "step@before"] if args.before else [])
    for n in map(int, args.sizes.split(",")):
        make_input(n)
        best: dict[str, dict] = {}
        for _ in range(args.rounds):  # interleaved; the page cache is warm for every way
            for way in ways:
                r = run(way, n, args.before)
                b = best.setdefault(way, {"per_s": 0.0, "per_cpu_s": 0.0, "peak_rss_mb": 0.0})
                for key in b:
                    b[key] = max(b[key], r[key])
        loop = best["loop"]
        for way in ways:
            b = best[way]
            print(
                f"n={n:>6}  {way:11s} {b['per_s']:7.0f} samples/s ({b['per_s'] / loop['per_s']:.2f} x loop)  "
                f"{b['per_cpu_s']:7.0f} per CPU s ({b['per_cpu_s'] / loop['per_cpu_s']:.2f} x loop)  "
                f"peak RSS {b['peak_rss_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
