"""How the pipeline's graphs and dedup scale: metadata only, synthetic shards (nothing read from disk).

Three parts, each configuration in a fresh process so that peak RSS means that configuration alone:

``graph``: for N synthetic shards, build each step's lazy frame (embedder, classifier, exact dedup, semantic dedup,
filter) the way a pipeline with a run directory does (each step over the results read back from the step before),
optimise and materialise its task graph (what the scheduler runs), and pickle a sample of the tasks. Prints the
seconds of each phase summed over the steps (and the graph phase's CPU seconds, steadier than wall seconds on a
shared machine), the task counts, the largest pickled task (leaving out Dask's shuffle barriers, one per shuffle,
which list every input partition's key by design), and the client's peak RSS.

``dedup``: semantic dedup plus the selection pass of an export over synthetic embeddings (N rows x D) on a
2-worker LocalCluster (exact dedup hashes image bytes, which synthetic shards do not have; its shuffles are the
same machinery and its graph is in the ``graph`` part), against :meth:`SemanticDeduplicator.find` on the same
array in one process. Two dataset paths: ``cluster`` generates the input and persists it on the workers first
(``input_s``), as ``find`` gets its array in memory, so both timings cover the same work; ``stored`` writes the input
as one parquet file per shard first and runs the step as a pipeline with a run directory does (input read lazily,
shard by shard; centroids fitted first; results written per shard), the case that bounds worker memory. Prints the
seconds and CPU seconds (client and workers together) of each, the load average at the start, the peak RSS of the
client and of the workers during the dedup, the workers' RSS before it, the megabytes that tasks fetched from the
other worker (``fetched_mb``: input partitions of a pass placed away from them, small results; the shuffles move
their rows on their own) and the largest cluster's size.

``shuffle``: ``find`` on N x D in one process, then only the shuffle that the dataset path runs (the same rows:
positions, key, cluster, the packed float32 embedding) on a 2-worker LocalCluster with Dask's p2p and tasks methods,
each timed after a warm-up run: what moving the rows to their clusters costs by itself, as a ratio to ``find``.

The dedup part runs a small warm-up through the same path first (``--cold`` leaves it out; ``--warm-full`` runs the
timed configuration itself once more before the timing, another seed so that nothing is reused, on both sides: the
steady state of workers whose heaps an earlier step has grown, as the embedder's in a pipeline). ``--threads`` runs the
two workers as threads of the benchmark's own process instead of processes (as ``LocalCluster(processes=False)`` in
a notebook): the rows then move between workers without leaving the process, and the client's and the workers'
peak RSS are one figure.
``--clusters`` fixes the cluster count (default one per 1,000 rows), ``--fit-sample`` the KMeans sample and
``--rows-per-shard`` the shard size (default: ``--dedup-shards`` shards whatever the rows).

    python benchmarks/scale.py graph --shards 1000 10000 100000
    python benchmarks/scale.py dedup --rows 100000 1000000 --dim 512 [--modes find cluster stored]
    python benchmarks/scale.py shuffle --rows 100000 1000000 --rows-per-shard 10000
    python benchmarks/scale.py dedup --rows 100000 1000000 2000000 --modes stored --rows-per-shard 10000 \\
        --fit-sample 100000   # worker memory as the rows grow, the sample fixed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

os.environ.setdefault("DASK_IMGCURATE__PROGRESS", "false")


def _cpu_s() -> float:
    """CPU seconds of this process so far, all its threads."""
    return time.process_time()


def _reset_peak_rss() -> None:
    """Resets this process's peak RSS to its current RSS (Linux: ``/proc/self/clear_refs``), so that a later
    :func:`_peak_rss_since_reset_mb` covers what ran in between."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_since_reset_mb() -> float:
    """The peak RSS since :func:`_reset_peak_rss` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _clear_fetch_log(dask_worker) -> None:
    dask_worker.transfer_incoming_log.clear()


def _fetched(dask_worker) -> tuple[int, int]:
    """Bytes this worker fetched from other workers (task inputs, not the shuffles' own transfers) since the log was
    cleared, and the log's length (it keeps the last 1,000 fetches: a full log means at least that many bytes)."""
    log = dask_worker.transfer_incoming_log
    return sum(entry["total"] for entry in log), len(log)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def graph_one(shards: int) -> dict:
    """Each step's graph over ``shards`` synthetic shards, as a pipeline with a run directory computes it: on the
    dataset read back from the steps before (so each step's graph starts from one read per shard)."""
    from distributed.protocol.pickle import dumps

    from imgcurate.classifiers import AestheticClassifier
    from imgcurate.dedup import ExactDuplicates, SemanticDeduplicator
    from imgcurate.embedders import TimmImageEmbedder
    from imgcurate.filters import SampleFilter
    from imgcurate.progress import GraphGC
    from imgcurate.synthetic import synthetic_dataset

    embedder = TimmImageEmbedder("vit_large_patch14_clip_224.openai")
    embedder.embedding_dim()  # the model's shape probe: once per pipeline, whatever the shard count
    steps = {
        "embedder": embedder,
        "classifier": AestheticClassifier(),
        "exact dedup": ExactDuplicates(),
        "semantic dedup": SemanticDeduplicator(n_clusters=1000),
        "filter": SampleFilter(min_aesthetic=5.0, drop_duplicates=("exact_duplicate",)),
    }
    out: dict = {"shards": shards}
    total_build = total_graph = total_graph_cpu = 0.0
    tasks = largest = 0
    for name, step in steps.items():
        ds = synthetic_dataset(shards, rows_per_shard=1000, dim=768)
        df = ds.metadata
        ds = ds.with_metadata(df.assign(aesthetic_score=df["width"].astype("float32") / 100.0,
                                        exact_duplicate=df["width"] < 70))  # fmt: skip
        started = time.perf_counter()
        frame = step.added(ds)
        total_build += time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        with GraphGC():  # as imgcurate's compute and persist build a graph
            graph = dict(frame.optimize().__dask_graph__())  # what compute() hands the scheduler
        total_graph += time.perf_counter() - started
        total_graph_cpu += time.process_time() - cpu
        keys = [k for k in graph if "barrier-" not in str(k)]  # Dask's shuffle barriers (disk and p2p)
        sample = random.Random(0).sample(keys, min(1000, len(keys)))
        step_largest = max(len(dumps(graph[k])) for k in sample)
        out[f"{name}: tasks"] = len(graph)
        out[f"{name}: largest task bytes"] = step_largest
        tasks += len(graph)
        largest = max(largest, step_largest)
    out.update({"build_s": round(total_build, 2), "graph_s": round(total_graph, 2),
                "graph_cpu_s": round(total_graph_cpu, 2), "tasks": tasks,
                "largest_task_bytes": largest, "client_peak_rss_mb": round(_peak_rss_mb())})  # fmt: skip
    return out


def _write_input(shard: int, rows: int, dim: int, folder: str) -> int:
    """Shard ``shard``'s synthetic metadata as a parquet file (on a worker)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgcurate.synthetic import synthetic_partition

    table = pa.Table.from_pandas(synthetic_partition(shard, rows, dim), preserve_index=False)
    pq.write_table(table, os.path.join(folder, f"{shard:06d}.parquet"))
    return table.num_rows


def _read_input(shard: int, folder: str, meta):
    """Shard ``shard``'s metadata read back, with the row ids as its index (what a dataset's reader gives)."""
    import pyarrow.parquet as pq

    from imgcurate._dask import row_ids
    from imgcurate.backends import from_arrow

    frame = from_arrow(pq.read_table(os.path.join(folder, f"{shard:06d}.parquet")), "pandas")[list(meta.columns)]
    frame.index = row_ids(shard, len(frame))
    return frame


def _nbytes(part) -> int:
    return int(part.memory_usage(deep=False).sum())


def _stored_dataset(folder: str, shards: int, dim: int):
    """A dataset over per-shard parquet files, read lazily, one task per shard (as a pipeline reads its input and
    the results of earlier steps back from disk)."""
    import dask
    import dask.dataframe as dd

    from imgcurate._dask import shard_divisions
    from imgcurate.dataset import ImageTextPairDataset
    from imgcurate.synthetic import synthetic_partition

    meta = synthetic_partition(0, 0, dim)
    with dask.config.set({"dataframe.convert-string": False}):
        metadata = dd.from_map(
            _read_input, list(range(shards)), args=[folder, meta], meta=meta, divisions=shard_divisions(shards),
            label="stored-input", enforce_metadata=False,
        )  # fmt: skip
    return ImageTextPairDataset(folder, metadata, [f"{folder}/{i:06d}.tar" for i in range(shards)])


#: The warm-up run's size: 2 shards of 2,000 rows, 10 clusters (a few tenths of a second).
_WARM_SHARDS, _WARM_ROWS, _WARM_CLUSTERS = 2, 2000, 10


def _run_stored(ds, step, folder: str):
    """The step run the way a pipeline with a run directory runs it (fit first, results written per shard); returns
    the step's columns, read back lazily."""
    from imgcurate.rundir import RunDir

    columns, _ = RunDir(folder).compute_step(ds, step, 0, "bench")
    return columns


def _warm_up(mode: str, dim: int, client=None, folder: str | None = None) -> None:
    """One small run of the same path before the timed one, so that neither side's timing holds first-use costs:
    Dask's shuffle extension starting on the workers, the first faiss and BLAS calls, the first large allocations
    (the workers have imported the library already, persisting or writing the input)."""
    import numpy as np

    from imgcurate.dedup import SemanticDeduplicator
    from imgcurate.synthetic import synthetic_dataset, synthetic_partition

    step = SemanticDeduplicator(n_clusters=_WARM_CLUSTERS, max_iter=10, tol=-1.0, random_state=1)
    if mode == "find":
        parts = [synthetic_partition(i, _WARM_ROWS, dim, seed=1) for i in range(_WARM_SHARDS)]
        step.find(np.concatenate([np.stack(p["image_embedding"]) for p in parts]).astype(np.float32))
        return
    if mode == "stored":
        os.makedirs(os.path.join(folder, "input"))
        client.gather(client.map(_write_input, range(_WARM_SHARDS), rows=_WARM_ROWS, dim=dim,
                                 folder=os.path.join(folder, "input")))  # fmt: skip
        ds = _stored_dataset(os.path.join(folder, "input"), _WARM_SHARDS, dim)
        columns = _run_stored(ds, step, os.path.join(folder, "run"))
    else:
        columns = step(synthetic_dataset(_WARM_SHARDS, rows_per_shard=_WARM_ROWS, dim=dim, seed=1)).metadata
    columns[["is_duplicate"]].persist()["is_duplicate"].sum().compute()
    # The run above fitted KMeans on one worker; the timed fit may land on the other, where faiss's first fit costs
    # about 0.1-0.25 s more than later ones (measured in one process: 0.33-0.48 s against 0.25 s for 25,600 x 512
    # into 100 clusters, and nothing extra after one fit of 2,000 rows). find's warm-up fits in its own process.
    client.run(_warm_kmeans, dim)


def _warm_kmeans(dim: int) -> None:
    """One small KMeans fit in this process, on its cores, as the step's fit task runs it."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from imgcurate.cpu import cpu_count
    from imgcurate.dedup.semantic import kmeans

    x = np.random.default_rng(1).standard_normal((_WARM_ROWS, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with threadpool_limits(cpu_count()):
        kmeans(x, _WARM_CLUSTERS, 10, 1, "faiss", -1.0)


def dedup_one(
    rows: int, dim: int, shards: int, mode: str, clusters: int | None = None, fit_sample: int | None = None,
    warm_up: bool = True, threads: bool = False, warm_full: bool = False,
) -> dict:  # fmt: skip
    """One process: ``find`` on the gathered array, or the dataset path on a 2-worker LocalCluster, its input held in
    the workers' memory (``cluster``) or stored as parquet and run the way a pipeline with a run directory runs a
    step (``stored``). With ``warm_up``, a small run of the same path comes first (:func:`_warm_up`); with
    ``warm_full`` also a full run of the timed configuration, another seed (``cluster`` and ``find`` only)."""
    import numpy as np

    from imgcurate.dedup import SemanticDeduplicator
    from imgcurate.synthetic import synthetic_dataset, synthetic_partition

    n_clusters = clusters or max(10, rows // 1000)
    per_shard = rows // shards
    out: dict = {"mode": mode, "rows": rows, "dim": dim, "shards": shards, "n_clusters": n_clusters,
                 "fit_sample": fit_sample, "warm_up": "full" if warm_full else warm_up,
                 "load_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
    if warm_full and mode == "stored":
        raise ValueError("--warm-full runs the find and cluster modes")
    step = SemanticDeduplicator(n_clusters=n_clusters, max_iter=10, tol=-1.0, fit_sample=fit_sample)
    if mode == "find":
        out["fit_sample"] = None  # find fits on faiss's own sample (256 rows per cluster)
        x = np.concatenate([np.stack(synthetic_partition(i, per_shard, dim)["image_embedding"]) for i in range(shards)])
        x = x.astype(np.float32)
        if warm_up:
            _warm_up(mode, dim)
        if warm_full:
            SemanticDeduplicator(n_clusters=n_clusters, max_iter=10, tol=-1.0, random_state=1).find(x, copy=True)
        started, cpu = time.perf_counter(), time.process_time()
        found = step.find(x, copy=False)
        out["seconds"] = round(time.perf_counter() - started, 2)
        out["cpu_s"] = round(time.process_time() - cpu, 2)
        out["flagged"] = int(found["is_duplicate_0.01"].sum())
        out["largest_cluster"] = step.stats_["largest_cluster"]
        out["client_peak_rss_mb"] = round(_peak_rss_mb())
        return out
    import tempfile

    import psutil
    from distributed import Client, LocalCluster

    from imgcurate.io.export import selection

    def rss_mb() -> float:
        return psutil.Process().memory_info().rss / 2**20

    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp, LocalCluster(
        n_workers=2, threads_per_worker=1, processes=not threads,
        dashboard_address=None, memory_limit=0
    ) as cluster, Client(cluster) as client:  # fmt: skip
        if warm_up:
            os.makedirs(os.path.join(tmp, "warm-up"))
            _warm_up(mode, dim, client, os.path.join(tmp, "warm-up"))
        started = time.perf_counter()
        if mode == "stored":
            # the input on disk, one parquet per shard; every pass reads it shard by shard
            os.makedirs(os.path.join(tmp, "input"))
            client.gather(client.map(_write_input, range(shards), rows=per_shard, dim=dim,
                                     folder=os.path.join(tmp, "input")))  # fmt: skip
            ds = _stored_dataset(os.path.join(tmp, "input"), shards, dim)
            out["input_s"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            ds.metadata.map_partitions(_nbytes, meta=(None, "int64")).sum().compute()  # one read of every shard
            out["read_s"] = round(time.perf_counter() - started, 2)
        else:
            # the input in the workers' memory first, as find gets its array in memory: the timings compare the same
            # work
            ds = synthetic_dataset(shards, rows_per_shard=per_shard, dim=dim).persist()
            out["input_s"] = round(time.perf_counter() - started, 2)
            if warm_full:
                again = SemanticDeduplicator(n_clusters=n_clusters, max_iter=10, tol=-1.0, fit_sample=fit_sample,
                                             random_state=1)  # fmt: skip
                again(ds).metadata["is_duplicate"].sum().compute()
        out["worker_rss_before_mb"] = round(max(client.run(rss_mb).values()))
        client.run(_reset_peak_rss)
        client.run(_clear_fetch_log)
        started, cpu, workers_cpu = time.perf_counter(), time.process_time(), client.run(_cpu_s)
        if mode == "stored":  # as a pipeline with a run directory runs the step: fit first, results written per shard
            columns = _run_stored(ds, step, os.path.join(tmp, "run"))
            deduped = ds.with_columns(columns)
        else:
            deduped = step(ds)
            columns = deduped.metadata
        # two of the step's columns held on the workers (no embeddings: 9 bytes a row), so that the largest cluster,
        # counted after the timing, does not run the lazy cluster path again
        answers = columns[["is_duplicate", "cluster"]].persist()
        out["flagged"] = int(answers["is_duplicate"].sum().compute())
        out["seconds"] = round(time.perf_counter() - started, 2)
        # CPU seconds of the client and the worker processes together (steadier than wall seconds on a shared box)
        spent = 0.0 if threads else sum(client.run(_cpu_s).values()) - sum(workers_cpu.values())
        out["cpu_s"] = round(time.process_time() - cpu + spent, 2)
        out["workers"] = "threads" if threads else "processes"
        out["worker_peak_rss_mb"] = round(max(client.run(_peak_rss_since_reset_mb).values()))
        # partitions (and small results) that a task fetched from another worker: a pass placed away from its input
        fetched = client.run(_fetched).values()
        out["fetched_mb"] = round(sum(size for size, _ in fetched) / 1e6)
        out["fetch_log_full"] = any(length >= 1000 for _, length in fetched)
        out["largest_cluster"] = int(answers["cluster"].value_counts().max().compute())
        started = time.perf_counter()
        select = selection(deduped.metadata, ds.shards, "memory://scale-bench/stage", "is_duplicate", {})
        select["count"].sum().compute()
        out["export_select_s"] = round(time.perf_counter() - started, 2)
    out["client_peak_rss_mb"] = round(_peak_rss_mb())
    return out


def _shuffle_rows(shard: int, rows: int, dim: int, clusters: int, groups: int):
    """Shard ``shard``'s rows as semantic dedup's assignment sends them to the shuffle: position, order, key,
    cluster, distance, the packed float32 embedding and the group partition (a cluster's rows share one)."""
    import numpy as np

    from imgcurate.steps.grouped import GROUP, arrow_column, group_of, positions, rows_column, text_column
    from imgcurate.synthetic import synthetic_partition

    part = synthetic_partition(shard, rows, dim)
    cluster = np.random.default_rng([1, shard]).integers(0, clusters, rows)
    out = positions(part, shard)
    out["_gidx"] = (np.int64(shard) << 40) + np.arange(rows, dtype=np.int64)
    out["key"] = text_column(arrow_column(part["key"]))
    out["cluster"] = cluster
    out["distance"] = np.zeros(rows, dtype=np.float32)
    x = np.stack(part["image_embedding"]) if rows else np.zeros((0, dim))
    out["embedding"] = rows_column(x.astype(np.float32))
    out[GROUP] = group_of(cluster, groups)
    return out


def shuffle_one(rows: int, dim: int, shards: int) -> dict:
    """``find`` on N x D in this process, then the rows that semantic dedup shuffles (N rows of D float32 and a few
    columns) moved to their group partitions alone on a 2-worker LocalCluster, with Dask's p2p and tasks methods:
    the part of the dataset path's time that the shuffle the issue asks for costs by itself. Each timing follows a
    warm-up run of the same thing."""
    import dask
    import dask.dataframe as dd
    import numpy as np
    from distributed import Client, LocalCluster, wait

    from imgcurate._dask import to_partitions
    from imgcurate.dedup import SemanticDeduplicator
    from imgcurate.steps.grouped import group_count
    from imgcurate.synthetic import synthetic_partition

    n_clusters = max(10, rows // 1000)
    groups = group_count(shards, -(-n_clusters // 8))  # as the step chooses them
    per_shard = rows // shards
    out: dict = {"rows": rows, "dim": dim, "shards": shards, "groups": groups,
                 "load_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
    x = np.concatenate([np.stack(synthetic_partition(i, per_shard, dim)["image_embedding"]) for i in range(shards)])
    x = x.astype(np.float32)
    _warm_up("find", dim)
    started = time.perf_counter()
    SemanticDeduplicator(n_clusters=n_clusters, max_iter=10, tol=-1.0).find(x, copy=False)
    out["find_s"] = round(time.perf_counter() - started, 2)
    meta = _shuffle_rows(0, 0, dim, n_clusters, groups)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=0
    ) as cluster, Client(cluster):  # fmt: skip
        for method in ("p2p", "tasks"):
            for timed in (False, True):
                first = 0 if timed else shards  # the warm-up moves other rows: nothing is reused
                source = dd.from_map(_shuffle_rows, list(range(first, first + shards)), rows=per_shard, dim=dim,
                                     clusters=n_clusters, groups=groups, meta=meta, enforce_metadata=False)  # fmt: skip
                source = source.persist()
                wait(source)
                with dask.config.set({"dataframe.shuffle.method": method}):
                    started = time.perf_counter()
                    moved = to_partitions(source, groups).map_partitions(len, meta=(None, "int64")).sum().compute()
                    seconds = time.perf_counter() - started
                if moved != rows:  # pragma: no cover - a broken shuffle
                    raise RuntimeError(f"the {method} shuffle moved {moved} of {rows} rows")
                del source
            out[f"{method}_s"] = round(seconds, 2)
            out[f"{method}_over_find"] = round(seconds / out["find_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["graph", "dedup", "shuffle", "_graph_one", "_dedup_one", "_shuffle_one"])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rows", type=int, nargs="+", default=[100000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dedup-shards", type=int, default=100)
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=None,
        help="the dedup part's shard size (then the shard count grows with the rows)",
    )
    parser.add_argument("--mode", default="find")
    parser.add_argument("--modes", nargs="+", default=["find", "cluster", "stored"], help="the dedup part's paths")
    parser.add_argument("--clusters", type=int, default=None, help="KMeans clusters (default: one per 1,000 rows)")
    parser.add_argument("--fit-sample", type=int, default=None, help="fit_sample (default: 256 rows per cluster)")
    parser.add_argument("--shuffle", default=None, help="dask's shuffle method for the graph part (p2p on a cluster)")
    parser.add_argument("--cold", action="store_true", help="the dedup part without its warm-up run")
    parser.add_argument("--warm-full", action="store_true", help="the dedup part's warm-up also runs the timed size")
    parser.add_argument("--threads", action="store_true", help="the dedup part's workers as threads, not processes")
    args = parser.parse_args()
    if args.part == "_graph_one":
        import dask

        with dask.config.set({"dataframe.shuffle.method": args.shuffle} if args.shuffle else {}):
            result = graph_one(args.shards[0])
        print(json.dumps({"shuffle": args.shuffle or "default", **result}))
        return
    if args.part == "_dedup_one":
        found = dedup_one(
            args.rows[0],
            args.dim,
            args.dedup_shards,
            args.mode,
            args.clusters,
            args.fit_sample,
            warm_up=not args.cold,
            threads=args.threads,
            warm_full=args.warm_full,
        )
        print(json.dumps(found))
        return
    if args.part == "_shuffle_one":
        print(json.dumps(shuffle_one(args.rows[0], args.dim, args.dedup_shards)))
        return
    if args.part == "shuffle":
        runs = [["_shuffle_one", "--rows", str(n), "--dim", str(args.dim), "--dedup-shards",
                 str(-(-n // args.rows_per_shard) if args.rows_per_shard else args.dedup_shards)]
                for n in args.rows]  # fmt: skip
    elif args.part == "graph":
        runs = [["_graph_one", "--shards", str(n), *(["--shuffle", args.shuffle] if args.shuffle else [])]
                for n in args.shards]  # fmt: skip
    else:
        runs = [["_dedup_one", "--rows", str(n), "--dim", str(args.dim), "--dedup-shards",
                 str(-(-n // args.rows_per_shard) if args.rows_per_shard else args.dedup_shards),
                 "--mode", mode, *(["--clusters", str(args.clusters)] if args.clusters else []),
                 *(["--fit-sample", str(args.fit_sample)] if args.fit_sample else []),
                 *(["--cold"] if args.cold else []), *(["--threads"] if args.threads else []),
                 *(["--warm-full"] if args.warm_full else [])]
                for n in args.rows for mode in args.modes]  # fmt: skip
    for run in runs:
        done = subprocess.run([sys.executable, __file__, *run], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            continue
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
