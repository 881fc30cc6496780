"""Semantic deduplication (SemDeDup): KMeans on embeddings, then cosine similarity inside each cluster.

Within each cluster samples are ranked by their cosine distance to the centroid: ``hard`` puts the farthest first,
``easy`` the nearest first, ``random`` a seeded shuffle. Each sample gets its maximum cosine similarity to any sample
ranked before it in its cluster, and that sample's id. With ``mode="greedy"`` (the reference rule) a sample is a
duplicate when that similarity is at least ``1 - eps``, even if the earlier sample is itself a duplicate; so in a
chain a~b~c where a and c are not similar, both b and c are dropped. With ``mode="connected"`` samples linked by
similarities >= ``1 - eps`` form groups and exactly one sample per group is kept (the first ranked); the others
point at it in ``duplicate_of``.

Similarities are computed blockwise (``block_size`` x ``block_size`` tiles), so memory stays bounded whatever the
cluster size. KMeans, assignments and per-cluster results are written to ``cache_dir`` when given, and a rerun with
the same inputs and parameters resumes from them.

Where it runs: KMeans on faiss or scikit-learn (CPU), cuML on one GPU, or cuML's Dask KMeans on the GPU workers of a
distributed client (the ``_KMEANS`` table); the tiles on NumPy, or on CuPy running the same code (``device``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import dask
import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate import progress
from imgcurate.backends import with_columns
from imgcurate.dataset import partition_number
from imgcurate.errors import ShardError

if TYPE_CHECKING:
    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["SemanticDeduplicator", "kmeans", "in_cluster_duplicates"]

_KEEP = ("hard", "easy", "random")
_MODES = ("greedy", "connected")


def kmeans(
    x: np.ndarray,
    n_clusters: int,
    max_iter: int,
    seed: int,
    backend: str = "faiss",
    tol: float = 1e-4,
    sample_per_cluster: int | None = 256,
) -> tuple[np.ndarray, int]:
    """Centroids of ``x`` (float32, rows L2-normalised) and the iterations run.

    ``faiss`` (CPU default): Lloyd iterations on a seeded sample of ``sample_per_cluster`` points per cluster (all
    points when None), stopped early when the objective improves by less than ``tol`` (relative) from one iteration
    to the next. ``sklearn`` and ``cuml`` (one GPU) use all points and their own ``tol``. ``x`` may also be a Dask
    array for ``cuml-dask`` (cuML's multi-GPU KMeans on the workers of the active distributed client, CuPy blocks).
    """
    if backend not in _KMEANS:
        raise ValueError(f"unknown kmeans backend {backend!r}: choose one of {', '.join(_KMEANS)}")
    return _KMEANS[backend].fit(x, n_clusters, max_iter, seed, tol, sample_per_cluster)


def _fit_faiss(x, n_clusters, max_iter, seed, tol, sample_per_cluster):
    import faiss

    cap = len(x) if sample_per_cluster is None else sample_per_cluster * n_clusters
    if len(x) > cap:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), cap, replace=False))]
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids, done, step = None, 0, 5
    with progress.bar(desc="kmeans", total=max_iter, unit="iter") as iters:
        while done < max_iter:
            n = min(step, max_iter - done)
            km = faiss.Kmeans(
                x.shape[1], n_clusters, niter=n, seed=seed + done, verbose=False,
                max_points_per_centroid=len(x), min_points_per_centroid=1,
            )  # fmt: skip
            km.train(x, init_centroids=centroids)
            centroids, done = km.centroids, done + n
            iters.update(n)
            obj = km.obj
            if len(obj) > 1 and abs(obj[-2] - obj[-1]) <= tol * abs(obj[-1]):
                break
    return centroids, done


def _fit_sklearn(x, n_clusters, max_iter, seed, tol, sample_per_cluster):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters, max_iter=max_iter, tol=tol, random_state=seed, n_init=1).fit(x)
    return km.cluster_centers_.astype(np.float32), int(km.n_iter_)


def _fit_cuml(x, n_clusters, max_iter, seed, tol, sample_per_cluster):
    from cuml.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, max_iter=max_iter, tol=tol, random_state=seed, output_type="numpy").fit(x)
    return np.asarray(km.cluster_centers_, dtype=np.float32), int(km.n_iter_)


def _fit_cuml_dask(x, n_clusters, max_iter, seed, tol, sample_per_cluster):
    from cuml.dask.cluster import KMeans

    if progress.distributed_client() is None:
        raise RuntimeError(
            "kmeans backend 'cuml-dask' runs on the GPU workers of a Dask distributed client: start one (e.g. "
            "dask_cuda.LocalCUDACluster, or 'cluster: {type: cuda}' in a pipeline) or choose kmeans_backend='cuml'"
        )
    km = KMeans(n_clusters=n_clusters, max_iter=max_iter, tol=tol, random_state=seed).fit(x)
    centroids = km.cluster_centers_
    centroids = centroids.get() if hasattr(centroids, "get") else np.asarray(centroids)  # CuPy -> host
    return np.asarray(centroids, dtype=np.float32), int(km.n_iter_)


class _KMeansBackend(NamedTuple):
    fit: Any
    module: str  # imported by fit; checked when a deduplicator is built
    package: str
    extra: str | None


_KMEANS: dict[str, _KMeansBackend] = {
    "faiss": _KMeansBackend(_fit_faiss, "faiss", "faiss-cpu", None),
    "sklearn": _KMeansBackend(_fit_sklearn, "sklearn", "scikit-learn", None),
    "cuml": _KMeansBackend(_fit_cuml, "cuml", "cuml-cu12", "gpu"),
    "cuml-dask": _KMeansBackend(_fit_cuml_dask, "cuml", "cuml-cu12", "gpu"),
}


def _check_kmeans_backend(name: str) -> None:
    """Raises at once for an unknown backend name or a backend whose library is not installed."""
    if name not in _KMEANS:
        raise ValueError(f"unknown kmeans_backend {name!r}: choose one of {', '.join(_KMEANS)}, or None")
    if importlib.util.find_spec(_KMEANS[name].module) is None:
        from imgcurate.errors import MissingDependencyError

        raise MissingDependencyError(f"kmeans_backend {name!r}", _KMEANS[name].package, extra=_KMEANS[name].extra)


def _assign(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine similarity, and the cosine distance to it."""
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ unit.T
        labels[start : start + block] = sims.argmax(axis=1)
        dist[start : start + block] = 1.0 - sims[np.arange(len(sims)), labels[start : start + block]]
    return labels, dist


class Pairs(NamedTuple):
    """Pairs of rows (``earlier`` ranked before ``later``) with their cosine ``similarity``."""

    earlier: np.ndarray
    later: np.ndarray
    similarity: np.ndarray


def in_cluster_duplicates(
    x: np.ndarray, threshold: float | None = None, block_size: int = 2048
) -> tuple[np.ndarray, np.ndarray, Pairs | None]:
    """For rows of ``x`` in rank order: each row's maximum cosine similarity to an earlier row and that row's index.

    Row 0 gets similarity ``-inf`` and index -1. With ``threshold``, also returns the pairs whose similarity is
    >= threshold (for grouping). Memory: one ``block_size`` x ``block_size`` tile at a time; only tiles on or below
    the diagonal are computed. ``x`` may be a NumPy array or a CuPy array on the GPU: the same lines run on either
    (CuPy mirrors NumPy's API), and the results are arrays of the same kind.
    """
    xp = _array_module(x)
    m = len(x)
    best = xp.full(m, -np.inf, dtype=np.float32)
    arg = xp.full(m, -1, dtype=np.int64)
    found: list[tuple[Any, Any, Any]] = []
    for a in range(0, m, block_size):
        rows = x[a : a + block_size]
        here = slice(a, a + len(rows))
        for b in range(0, a + len(rows), block_size):
            tile = rows @ x[b : b + block_size].T  # rows a.. against the earlier-or-equal columns b..
            if b == a:  # the diagonal tile: a row only looks at rows ranked before it
                xp.putmask(tile, _upper_triangle(block_size, xp.__name__)[: len(rows), : len(rows)], -np.inf)
            j = tile.argmax(axis=1)
            value = tile[xp.arange(len(rows)), j]
            better = value > best[here]
            best[here] = xp.where(better, value, best[here])
            arg[here] = xp.where(better, b + j, arg[here])
            if threshold is not None:
                r, c = xp.nonzero(tile >= threshold)
                found.append((b + c, a + r, tile[r, c]))
    if threshold is None:
        return best, arg, None
    if not found:
        empty = xp.zeros(0, dtype=np.int64)
        return best, arg, Pairs(empty, empty, xp.zeros(0, dtype=np.float32))
    return best, arg, Pairs(*(xp.concatenate(parts) for parts in zip(*found, strict=True)))


def _array_module(x: Any) -> Any:
    """NumPy, or CuPy for a CuPy array (never imported here otherwise)."""
    return sys.modules["cupy"] if type(x).__module__.startswith("cupy") else np


def _to_host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else a  # CuPy arrays copy to the host with get()


@functools.lru_cache(maxsize=4)
def _upper_triangle(n: int, module: str) -> Any:
    xp = importlib.import_module(module)
    return xp.triu(xp.ones((n, n), dtype=bool))


def _group_representatives(m: int, earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """For each of ``m`` ranked rows, the first-ranked row of its connected group (itself when alone)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(earlier), dtype=np.int8), (earlier, later)), shape=(m, m))
    _, group = connected_components(graph, directed=False)
    _, first = np.unique(group, return_index=True)  # rows are in rank order, so the first row is the smallest rank
    return first[group]


class SemanticDeduplicator:
    """Finds semantic duplicates among embeddings (SemDeDup, as NeMo Curator does it). See the module docs.

    Args:
        n_clusters: KMeans clusters.
        max_iter: KMeans iterations.
        random_state: seed for KMeans and for ``which_to_keep="random"``.
        eps: similarity margin: a duplicate has similarity >= 1 - eps. A list evaluates several in one run
            (one ``is_duplicate_eps<eps>`` column each; ``is_duplicate`` uses the first).
        which_to_keep: ``hard`` (keep the farthest from the centroid first), ``easy`` (nearest first) or ``random``.
        mode: ``greedy`` (the reference rule) or ``connected`` (exactly one sample kept per connected group).
        embedding_column: the input embedding column.
        id_column: the id column (default: the dataset's); ids are reported in ``duplicate_of``.
        cache_dir: folder for centroids, assignments and per-cluster results, to resume after a crash.
        kmeans_backend: ``faiss`` (the CPU default), ``sklearn``, ``cuml`` (one GPU) or ``cuml-dask`` (cuML's
            multi-GPU KMeans on the workers of a distributed client). None picks by the dataset's backend: faiss on
            pandas; on cuDF, cuml-dask under a distributed client (the embeddings stay on the workers' GPUs for
            KMeans), else cuml.
        block_size: tile size of the blockwise similarity computation.
        tol: KMeans stops early when its objective improves by less than this (relative) in one iteration.
        device: where the in-cluster similarity tiles are computed: ``cpu`` (NumPy), ``cuda`` (CuPy, the same
            code) or ``auto`` (cuda when a GPU and CuPy are present). Each cluster's embeddings are copied to the GPU
            in turn, so its memory holds one cluster at a time.

    Output columns: ``cluster``, ``distance_to_centroid`` (cosine distance), ``max_similarity``, ``duplicate_of``,
    ``is_duplicate`` (and per-eps columns for a list). In greedy mode ``duplicate_of`` is the id of the most similar
    earlier-ranked sample, set for every sample but the first of its cluster (duplicate or not: it is the partner of
    ``max_similarity``); in connected mode a duplicate's ``duplicate_of`` is the sample kept for its group instead.
    Samples with a null embedding are skipped and reported; their outputs are null and ``is_duplicate`` is false.

    Example:
        >>> ds = TimmImageEmbedder("vit_base_patch32_clip_224.openai", pretrained=True)(ds)  # doctest: +SKIP
        >>> ds = SemanticDeduplicator(n_clusters=1000, eps=[0.01, 0.05])(ds)  # doctest: +SKIP
        >>> ds.metadata.is_duplicate.sum().compute()  # doctest: +SKIP
    """

    def __init__(
        self,
        n_clusters: int,
        max_iter: int = 100,
        random_state: int = 1234,
        eps: float | Sequence[float] = 0.01,
        which_to_keep: str = "hard",
        mode: str = "greedy",
        embedding_column: str = "image_embedding",
        id_column: str | None = None,
        cache_dir: str | None = None,
        kmeans_backend: str | None = None,
        block_size: int = 2048,
        tol: float = 1e-4,
        device: str = "auto",
    ):
        if which_to_keep not in _KEEP:
            raise ValueError(f"which_to_keep must be one of {', '.join(_KEEP)}, got {which_to_keep!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        self.eps = [float(eps)] if isinstance(eps, int | float) else [float(e) for e in eps]
        if not self.eps or any(not 0 <= e < 2 for e in self.eps):
            raise ValueError(f"eps must be in [0, 2), got {eps!r}")
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
        if kmeans_backend is not None:
            _check_kmeans_backend(kmeans_backend)
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        if device == "cuda" and importlib.util.find_spec("cupy") is None:
            from imgcurate.errors import MissingDependencyError

            raise MissingDependencyError("SemanticDeduplicator(device='cuda')", "cupy-cuda12x", extra="gpu")
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.random_state = random_state
        self.which_to_keep = which_to_keep
        self.mode = mode
        self.embedding_column = embedding_column
        self.id_column = id_column
        self.cache_dir = cache_dir
        self.kmeans_backend = kmeans_backend
        self.block_size = block_size
        self.tol = tol
        self.device = device
        self.stats_: dict[str, Any] = {}

    # ------------------------------------------------------------------ core, on arrays
    def _cache(self, name: str) -> str | None:
        return None if self.cache_dir is None else os.path.join(self.cache_dir, name)

    def _rank(self, members: np.ndarray, dist: np.ndarray) -> np.ndarray:
        if self.which_to_keep == "hard":
            return members[np.argsort(-dist[members], kind="stable")]
        if self.which_to_keep == "easy":
            return members[np.argsort(dist[members], kind="stable")]
        rng = np.random.default_rng(self.random_state + int(members[0]) if len(members) else self.random_state)
        return members[rng.permutation(len(members))]

    def find(self, x: np.ndarray, copy: bool = True) -> dict[str, np.ndarray]:
        """Runs the whole method on a (N, D) array; returns per-row arrays (cluster, distance, max_similarity,
        duplicate_of as a row index or -1, and is_duplicate per eps). With ``copy=False`` a C-ordered float32 ``x``
        is L2-normalised in place instead of copied (saves N x D x 4 bytes).

        Afterwards ``stats_`` holds the KMeans backend, the seconds spent in each phase, the KMeans iterations run
        and the largest cluster's size.
        """
        backend = self.kmeans_backend or "faiss"
        return self._find(x, copy, backend, lambda unit: self._kmeans(unit, backend))

    def _kmeans(self, data: Any, backend: str) -> tuple[np.ndarray, int]:
        return kmeans(data, self.n_clusters, self.max_iter, self.random_state, backend, self.tol)

    def _find(
        self, x: np.ndarray, copy: bool, backend: str, fit: Callable[[np.ndarray], tuple[np.ndarray, int]]
    ) -> dict[str, np.ndarray]:
        """:meth:`find`, with ``fit`` giving (centroids, iterations) for the normalised rows unless cached."""
        x = np.array(x, dtype=np.float32, order="C", copy=True if copy else None)
        n = len(x)
        if n < self.n_clusters:
            raise ValueError(f"{n} samples with embeddings is fewer than n_clusters={self.n_clusters}")
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        fingerprint = self._fingerprint(x)
        device = self._resolved_device()
        stats: dict[str, Any] = {"kmeans_backend": backend, "device": device, "kmeans_iterations": 0, "kmeans_s": 0.0}
        stats["assign_s"] = 0.0
        km_path = self._cache("kmeans.npz")
        if km_path and os.path.exists(km_path) and str(np.load(km_path)["fingerprint"]) == fingerprint:
            saved = np.load(km_path)
            labels, dist = saved["labels"], saved["distance"]
        else:
            started = time.perf_counter()
            centroids, stats["kmeans_iterations"] = fit(x)
            stats["kmeans_s"] = time.perf_counter() - started
            labels, dist = _assign(x, centroids)
            stats["assign_s"] = time.perf_counter() - started - stats["kmeans_s"]
            if km_path:
                os.makedirs(self.cache_dir, exist_ok=True)
                _save_npz(km_path, centroids=centroids, labels=labels, distance=dist, fingerprint=fingerprint)
        started = time.perf_counter()
        best = np.full(n, -np.inf, dtype=np.float32)
        dup_of = np.full(n, -1, dtype=np.int64)
        thresholds = [1.0 - e for e in self.eps]
        flags = {e: np.zeros(n, dtype=bool) for e in self.eps}
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.n_clusters + 1))
        stats["largest_cluster"] = int(np.diff(bounds).max())
        chunk = 256
        with progress.bar(desc="semantic dedup: clusters", total=self.n_clusters, unit="cluster") as done:
            for first in range(0, self.n_clusters, chunk):
                last = min(first + chunk, self.n_clusters)
                path = self._cache(f"clusters_{first:07d}.npz")
                if path and os.path.exists(path) and str(np.load(path)["fingerprint"]) == fingerprint:
                    saved = np.load(path)
                    idx = saved["index"]
                    best[idx], dup_of[idx] = saved["best"], saved["dup_of"]
                    for e in self.eps:
                        flags[e][idx] = saved[f"flag_{e}"]
                    done.update(last - first)
                    continue
                touched = []
                for c in range(first, last):
                    members = self._rank(order[bounds[c] : bounds[c + 1]], dist)
                    if len(members):
                        touched.append(members)
                        self._cluster(x, members, thresholds, best, dup_of, flags, device)
                    done.update(1)
                if path:
                    idx = np.concatenate(touched) if touched else np.zeros(0, dtype=np.int64)
                    extra = {f"flag_{e}": flags[e][idx] for e in self.eps}
                    _save_npz(path, index=idx, best=best[idx], dup_of=dup_of[idx], fingerprint=fingerprint, **extra)
        stats["clusters_s"] = time.perf_counter() - started
        self.stats_ = stats
        result = {"cluster": labels, "distance": dist, "max_similarity": best, "duplicate_of": dup_of}
        result.update({f"is_duplicate_{e}": flags[e] for e in self.eps})
        return result

    def _cluster(
        self,
        x: np.ndarray,
        members: np.ndarray,
        thresholds: list[float],
        best: np.ndarray,
        dup_of: np.ndarray,
        flags: dict[float, np.ndarray],
        device: str,
    ) -> None:
        """Fills the outputs for one cluster's ``members`` (row indices in rank order)."""
        connected = self.mode == "connected"
        rows = x[members]
        if device == "cuda":
            import cupy

            rows = cupy.asarray(rows)
        sims, arg, pairs = in_cluster_duplicates(rows, min(thresholds) if connected else None, self.block_size)
        sims, arg = _to_host(sims), _to_host(arg)
        pairs = None if pairs is None else Pairs(*(_to_host(p) for p in pairs))
        best[members] = sims
        dup_of[members] = np.where(arg >= 0, members[np.maximum(arg, 0)], -1)
        rank = np.arange(len(members))
        for e, t in zip(self.eps, thresholds, strict=True):
            if not connected:
                flags[e][members] = sims >= t
                continue
            keep = pairs.similarity >= t
            rep = _group_representatives(len(members), pairs.earlier[keep], pairs.later[keep])
            flags[e][members] = rep != rank
            if e == self.eps[0]:  # a duplicate points at the sample kept for its group; a kept one keeps its partner
                dup_of[members] = np.where(rep != rank, members[rep], dup_of[members])

    def _resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        from imgcurate.backends import gpu_available

        return "cuda" if gpu_available() and importlib.util.find_spec("cupy") is not None else "cpu"

    def _fingerprint(self, x: np.ndarray) -> str:
        params = [self.n_clusters, self.max_iter, self.tol, self.random_state, self.which_to_keep, self.mode, self.eps]
        digest = hashlib.sha256(json.dumps(params).encode())
        digest.update(np.ascontiguousarray(x[:: max(1, len(x) // 4096)]).tobytes())
        digest.update(str(x.shape).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ on a dataset
    def _backend_for(self, df: Any) -> str:
        """The KMeans backend for a metadata frame: the one asked for, else by the frame's backend."""
        if self.kmeans_backend is not None:
            return self.kmeans_backend
        if isinstance(df._meta, pd.DataFrame):
            name = "faiss"
        else:
            name = "cuml-dask" if progress.distributed_client() is not None else "cuml"
        _check_kmeans_backend(name)
        return name

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """Computes the embeddings' duplicates now (with progress) and adds the output columns lazily.

        The input is persisted first, so the embedder (and any step before this one) runs once, not again at export.
        """
        id_col = self.id_column or dataset.id_col
        for column in (self.embedding_column, id_col):
            if column not in dataset.metadata.columns:
                raise ValueError(f"SemanticDeduplicator needs the column {column!r}; run an embedder first")
        dataset = dataset.persist()
        df = dataset.metadata

        backend = self._backend_for(df)
        column = self.embedding_column

        def collect(part: Any, tar: str) -> tuple[list[str], np.ndarray, np.ndarray]:
            frame = part if isinstance(part, pd.DataFrame) else part.to_pandas()
            valid, rows = _host_rows(frame[column], tar, column)
            return frame[id_col].tolist(), valid, rows

        tasks = [dask.delayed(collect)(p, t) for p, t in zip(df.to_delayed(), dataset.tar_files, strict=True)]
        parts = progress.compute(tasks, desc="reading embeddings")
        ids = [k for keys, _, _ in parts for k in keys]
        valid = np.concatenate([v for _, v, _ in parts]) if parts else np.zeros(0, dtype=bool)
        x = _stack_rows([r for _, _, r in parts], dataset.tar_files, column)
        if not valid.all():
            warnings.warn(
                f"SemanticDeduplicator: {int((~valid).sum())} of {len(valid)} samples have no embedding "
                f"({column!r} is null); they are skipped and marked as not duplicate",
                stacklevel=2,
            )
        if backend == "cuml-dask":  # KMeans runs where the embeddings are: on the workers' GPUs
            on_workers = _unit_row_array(df, column, [len(r) for _, _, r in parts], x.shape[1])
            found = self._find(x, False, backend, lambda _: self._kmeans(on_workers, backend))
        else:
            found = self._find(x, False, backend, lambda unit: self._kmeans(unit, backend))
        valid_ids = np.array(ids, dtype=object)[valid]
        n = len(ids)
        columns: dict[str, Any] = {
            "cluster": _spread(found["cluster"], valid, n, pd.Int64Dtype()),
            "distance_to_centroid": _spread(found["distance"], valid, n, np.float32),
            "max_similarity": _spread(
                np.where(np.isinf(found["max_similarity"]), np.nan, found["max_similarity"]), valid, n, np.float32
            ),
            "duplicate_of": _spread_ids(found["duplicate_of"], valid_ids, valid, n),
        }
        for i, e in enumerate(self.eps):
            flag = np.zeros(n, dtype=bool)
            flag[valid] = found[f"is_duplicate_{e}"]
            if len(self.eps) > 1:
                columns[f"is_duplicate_eps{e}"] = flag
            if i == 0:
                columns["is_duplicate"] = flag
        sizes = np.cumsum([0] + [len(k) for k, _, _ in parts])

        types = {
            "cluster": pa.int64(),
            "distance_to_centroid": pa.float32(),
            "max_similarity": pa.float32(),
            "duplicate_of": pa.string(),
            **{name: pa.bool_() for name in columns if name.startswith("is_duplicate")},
        }

        def add(part: Any, partition_info=None) -> Any:
            i = partition_number(partition_info)
            return with_columns(part, {name: col[sizes[i] : sizes[i + 1]] for name, col in columns.items()}, types)

        meta = with_columns(df._meta, {name: col[:0] for name, col in columns.items()}, types)
        out = df.map_partitions(add, meta=meta, enforce_metadata=False)
        return dataset.with_metadata(out, arrow_types=types)


def _spread(values: np.ndarray, valid: np.ndarray, n: int, dtype: Any) -> pd.Series:
    out = pd.Series(pd.array([pd.NA] * n, dtype=pd.Float64Dtype() if dtype is np.float32 else dtype))
    out[valid] = values
    return out.astype(np.float32) if dtype is np.float32 else out


def _spread_ids(dup_rows: np.ndarray, valid_ids: np.ndarray, valid: np.ndarray, n: int) -> pd.Series:
    ids = np.full(n, None, dtype=object)
    ids[valid] = [valid_ids[r] if r >= 0 else None for r in dup_rows]
    return pd.Series(pd.array(ids, dtype=pd.StringDtype("pyarrow", na_value=np.nan)))


def _save_npz(path: str, **arrays: Any) -> None:
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _host_rows(values: pd.Series, tar: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A partition's embedding column as (row has an embedding, float32 array of those embeddings)."""
    valid = values.notna().to_numpy(dtype=bool)
    if not valid.any():
        return valid, np.zeros((0, 0), dtype=np.float32)
    try:
        return valid, np.stack([np.asarray(v, dtype=np.float32) for v in values[valid]])
    except ValueError as err:
        raise ShardError(tar, f"column {column!r} holds embeddings of different lengths ({err})") from None


def _stack_rows(blocks: list[np.ndarray], tars: Sequence[str], column: str) -> np.ndarray:
    """One (N, D) array from the partitions' blocks; embeddings of another length are an error naming the shard."""
    filled = [(b, t) for b, t in zip(blocks, tars, strict=True) if len(b)]
    if not filled:
        return np.zeros((0, 0), dtype=np.float32)
    dim, first = filled[0][0].shape[1], filled[0][1]
    for block, tar in filled:
        if block.shape[1] != dim:
            raise ShardError(tar, f"column {column!r} holds {block.shape[1]}-d embeddings, {first} holds {dim}-d")
    return np.concatenate([b for b, _ in filled])


def _unit_rows(part: Any, column: str, dim: int) -> Any:
    """A partition's non-null embeddings, L2-normalised, as a NumPy array (pandas) or a CuPy array (cuDF)."""
    if isinstance(part, pd.DataFrame):
        rows = _host_rows(part[column], "", column)[1].reshape(-1, dim)
    else:  # a cuDF list column: its leaves are one flat device array, row after row
        values = part[column]
        values = values[values.notna()]
        rows = values.list.leaves.values.reshape(len(values), dim).astype(np.float32)
    return rows / ((rows * rows).sum(axis=1, keepdims=True) ** 0.5).clip(1e-12, None)


def _unit_row_array(df: Any, column: str, counts: Sequence[int], dim: int) -> Any:
    """A Dask array of the frame's normalised non-null embeddings, one block per non-empty partition, computed
    where the partitions live (CuPy blocks on a cuDF frame), in the same row order as :func:`_stack_rows`."""
    import dask.array as da

    meta = _unit_rows(df._meta, column, dim)
    blocks = [
        da.from_delayed(dask.delayed(_unit_rows)(part, column, dim), shape=(n, dim), dtype=np.float32, meta=meta)
        for part, n in zip(df.to_delayed(), counts, strict=True)
        if n
    ]
    return da.concatenate(blocks)
