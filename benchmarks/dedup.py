"""Semantic dedup at scale on this CPU: time, peak memory and recall of planted duplicates, for growing N.

    python benchmarks/dedup.py [--sizes 100000,300000,1000000] [--dim 512] [--per-cluster 1000]
    python benchmarks/dedup.py --kmeans cuml --device cuda      # on a GPU machine (cuML, CuPy)

Synthetic embeddings: N / 1000 topics (random unit directions), each sample its topic's direction plus Gaussian
noise of norm ``--noise`` (default 1: cosine similarity between two samples of one topic about 0.5; larger
values blur the topics and KMeans needs more iterations), then 2 % of the samples replaced by near-copies
of other samples (cosine similarity to their source >= 0.995, like a re-encoded or resized image). Each size runs in
its own process so its peak RSS is its own. ``n_clusters = N / per_cluster``; eps 0.01, ``which_to_keep="hard"``,
greedy mode, faiss KMeans (max_iter 100, tol 1e-4 unless --tol, 256 sampled points per cluster).

Recall: the share of planted pairs where exactly one of the two samples is marked (a pair that KMeans puts in two
clusters cannot be found: SemDeDup only compares inside a cluster; the script counts those). Extra: samples marked
that are not part of a planted pair (expected 0 on this data). Goal: 1M x 512 in under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def make_embeddings(n: int, dim: int, noise: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((max(n // 1000, 1), dim), dtype=np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= noise / np.sqrt(dim)  # noise of norm ~noise; the topic direction has norm 1
    x += topics[rng.integers(0, len(topics), n)]
    copies = rng.choice(n, n // 50, replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies), replace=False)
    noise = rng.standard_normal((len(copies), dim), dtype=np.float32) * (0.05 / np.sqrt(dim))
    x[copies] = x[sources] / np.linalg.norm(x[sources], axis=1, keepdims=True) + noise
    return x, sources, copies


def run_one(n: int, dim: int, per_cluster: int, tol: float, noise: float, kmeans: str, device: str) -> dict:
    from imgcurate.dedup import SemanticDeduplicator

    started = time.perf_counter()
    x, sources, copies = make_embeddings(n, dim, noise)
    made = time.perf_counter() - started
    dedup = SemanticDeduplicator(
        n_clusters=max(n // per_cluster, 1), eps=0.01, which_to_keep="hard", tol=tol, kmeans_backend=kmeans,
        device=device,
    )  # fmt: skip
    started = time.perf_counter()
    found = dedup.find(x, copy=False)  # as the dataset path does: normalised in place
    seconds = time.perf_counter() - started
    flagged = found["is_duplicate_0.01"]
    one_of_pair = flagged[sources] != flagged[copies]
    split = found["cluster"][sources] != found["cluster"][copies]
    planted = np.zeros(n, dtype=bool)
    planted[sources] = planted[copies] = True
    return {
        "n": n,
        "n_clusters": dedup.n_clusters,
        "seconds": seconds,
        "make_seconds": made,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "input_mb": x.nbytes / 2**20,
        "recall": float(one_of_pair.mean()),
        "extra_marked": int((flagged & ~planted).sum()),
        "missed_split": int((~one_of_pair & split).sum()),
        **dedup.stats_,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-cluster", type=int, default=1000, help="n_clusters = N / this")
    parser.add_argument("--tol", type=float, default=1e-4, help="KMeans tolerance; 0 runs all 100 iterations")
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm around each topic (topic norm 1)")
    parser.add_argument("--kmeans", default="faiss", help="faiss, sklearn or cuml (one GPU)")
    parser.add_argument("--device", default="cpu", help="in-cluster tiles: cpu (NumPy) or cuda (CuPy)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.dim, args.per_cluster, args.tol, args.noise, args.kmeans, args.device)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--dim",
            str(args.dim),
            "--per-cluster",
            str(args.per_cluster),
        ]
        cmd += ["--tol", str(args.tol), "--noise", str(args.noise), "--kmeans", args.kmeans, "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"N={r['n']:>9,}  clusters={r['n_clusters']:>5}  {r['kmeans_backend']}/{r['device']}  "
            f"total {r['seconds']:6.1f} s "
            f"(kmeans {r['kmeans_s']:5.1f} s / {r['kmeans_iterations']} it, assign {r['assign_s']:4.1f} s, "
            f"in-cluster {r['clusters_s']:5.1f} s, largest {r['largest_cluster']})  "
            f"peak RSS {r['peak_rss_mb']:,.0f} MB (input {r['input_mb']:,.0f} MB)  "
            f"recall {r['recall']:.4f} (missed pairs split by KMeans: {r['missed_split']})  extra {r['extra_marked']}",
            flush=True,
        )
    base = rows[0]
    for r in rows[1:]:
        print(
            f"N x{r['n'] / base['n']:.0f}: time x{r['seconds'] / base['seconds']:.1f} "
            f"(kmeans x{r['kmeans_s'] / base['kmeans_s']:.1f}, in-cluster x{r['clusters_s'] / base['clusters_s']:.1f})"
        )


if __name__ == "__main__":
    main()
