"""Semantic deduplication (SemDeDup): KMeans on embeddings, then cosine similarity inside each cluster.

Within each cluster samples are ranked by their cosine distance to the centroid: ``hard`` puts the farthest first,
``easy`` the nearest first, ``random`` a seeded shuffle. Each sample gets its maximum cosine similarity to any sample
ranked before it in its cluster, and that sample's id. With ``mode="greedy"`` (the reference rule) a sample is a
duplicate when that similarity is at least ``1 - eps``, even if the earlier sample is itself a duplicate; so in a
chain a~b~c where a and c are not similar, both b and c are dropped. With ``mode="connected"`` samples linked by
similarities >= ``1 - eps`` form groups and exactly one sample per group is kept (the first ranked); the others
point at it in ``duplicate_of``.

``which_to_keep`` may also name metadata columns: the sample with the highest values (compared column by column)
is ranked first in its cluster and kept, e.g. ``["aesthetic_score"]`` keeps the best-looking copy.

Similarities are computed blockwise (``block_size`` x ``block_size`` tiles), so memory stays bounded whatever the
cluster size: connected mode merges each tile's links into its groups and lets them go (a cluster of ``m``
near-copies links ``m^2 / 2`` pairs), and the assignment to centroids holds at most 2^24 similarities at a time
whatever ``n_clusters``.

On a dataset everything runs on the workers, as Dask work, and the client holds the centroids and nothing of size N:

1. each shard counts its non-null embeddings; a running sum gives every shard the global index of its first one
   (the order :meth:`SemanticDeduplicator.find` uses), and a seeded per-shard draw picks a bounded sample
   (``fit_sample``) for KMeans;
2. KMeans is fitted on that sample in one task (faiss, scikit-learn or single-GPU cuML); on the cuDF backend with
   workers that hold distinct GPUs (dask-cuda), cuML's Dask KMeans fits it across them instead;
3. each shard assigns its rows to the nearest centroid;
4. the rows are shuffled by cluster, so each cluster is compared inside one task (CuPy tiles where a GPU is usable);
5. the answers are shuffled back to their shards by position.

In one graph (:meth:`SemanticDeduplicator.added`) the workers hold every shard's input from step 1 to step 3, since
KMeans needs a sample from every shard first; that spares computing a lazy input (an embedder's output) twice. For
stored input, as in a pipeline with a run directory, :meth:`SemanticDeduplicator.fit` runs steps 1-2 in passes of
their own and the input is read again for step 3, so a worker holds only the shards it is working on.

Given the same centroids the result is exactly that of :meth:`SemanticDeduplicator.find` on the gathered array.
:meth:`find` keeps ``cache_dir`` to resume an array run; a pipeline resumes dataset runs from its run directory.

Where it runs: KMeans on faiss or scikit-learn (CPU), cuML on one GPU, or cuML's Dask KMeans on the GPU workers of a
distributed client (the ``_KMEANS`` table); the tiles on NumPy, or on CuPy running the same code (``device``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import numbers
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate import progress
from imgcurate._dask import Shard, map_with_shard
from imgcurate.backends import (
    backend_of,
    embedding_matrix,
    from_arrow,
    not_embeddings,
    on_gpu,
    to_pandas,
)
from imgcurate.cpu import reuse_freed_memory
from imgcurate.errors import ShardError
from imgcurate.steps.base import ColumnError, Requirement, ShardIO, Step
from imgcurate.steps.grouped import (
    GROUP,
    ROW,
    SHARD,
    arrow_column,
    group_count,
    group_of,
    grouped,
    host,
    per_shard,
    positions,
    rows_column,
    rows_matrix,
    take_text,
    text_column,
)

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


def _cuml_batch(n_clusters: int) -> int:
    """cuML's ``max_samples_per_batch``: its distance batch holds this many rows times ``n_clusters`` floats, so at
    most 2^24 values (64 MiB), not its default of 32,768 rows (13 GB at 10^5 clusters)."""
    return max(1, min(1 << 15, (1 << 24) // max(int(n_clusters), 1)))


def _fit_cuml(x, n_clusters, max_iter, seed, tol, sample_per_cluster):
    from cuml.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, max_iter=max_iter, tol=tol, random_state=seed, output_type="numpy", n_init=1,
                max_samples_per_batch=_cuml_batch(n_clusters)).fit(x)  # fmt: skip
    return np.asarray(km.cluster_centers_, dtype=np.float32), int(km.n_iter_)


def _fit_cuml_dask(x, n_clusters, max_iter, seed, tol, sample_per_cluster):
    from cuml.dask.cluster import KMeans

    _require_client()
    km = KMeans(n_clusters=n_clusters, max_iter=max_iter, tol=tol, random_state=seed, n_init=1,
                max_samples_per_batch=_cuml_batch(n_clusters)).fit(x)  # fmt: skip
    centroids = km.cluster_centers_
    centroids = centroids.get() if hasattr(centroids, "get") else np.asarray(centroids)  # CuPy -> host
    return np.asarray(centroids, dtype=np.float32), int(km.n_iter_)


class _KMeansBackend(NamedTuple):
    fit: Any
    modules: tuple[str, ...]  # imported by fit; checked when a deduplicator is built
    package: str
    extra: str | None


_KMEANS: dict[str, _KMeansBackend] = {
    "faiss": _KMeansBackend(_fit_faiss, ("faiss",), "faiss-cpu", None),
    "sklearn": _KMeansBackend(_fit_sklearn, ("sklearn",), "scikit-learn", None),
    "cuml": _KMeansBackend(_fit_cuml, ("cuml",), "cuml-cu13", "gpu"),
    # cuml.dask imports raft_dask and dask_cudf, which only cuML's dask extra installs
    "cuml-dask": _KMeansBackend(_fit_cuml_dask, ("cuml", "raft_dask", "dask_cudf"), "cuml-cu13[dask]", "gpu"),
}


def _check_kmeans_backend(name: str) -> None:
    """Raises at once for an unknown backend name or a backend whose library is not installed."""
    if name not in _KMEANS:
        raise ValueError(f"unknown kmeans_backend {name!r}: choose one of {', '.join(_KMEANS)}, or None")
    if any(importlib.util.find_spec(module) is None for module in _KMEANS[name].modules):
        from imgcurate.errors import MissingDependencyError

        raise MissingDependencyError(f"kmeans_backend {name!r}", _KMEANS[name].package, extra=_KMEANS[name].extra)


#: The most similarities (float32) one block of the assignment holds: 64 MiB, whatever the number of clusters.
_ASSIGN_BLOCK_VALUES = 2**24


def _assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine similarity, and the cosine distance to it.

    Rows go in blocks whose similarity matrix (rows x clusters) holds at most :data:`_ASSIGN_BLOCK_VALUES` values, so
    memory does not grow with the number of clusters (at 10^5 clusters a fixed 65,536-row block would be 26 GB).
    """
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    block = max(256, _ASSIGN_BLOCK_VALUES // max(len(unit), 1))
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), block):
        rows = np.asarray(x[start : start + block])
        nearest = _nearest(rows, unit)
        labels[start : start + block] = nearest
        # the distance again, row by row: a matrix product's value for a row can differ in its last bit with the
        # number of rows it is computed with (BLAS blocks by the matrix's shape), and the hard and easy rules order
        # exact copies by it, so one shard at a time must give what the whole array gives; the nearest centroids
        # are gathered 4,096 rows at a time (8 MB at 512-d)
        for at in range(0, len(rows), 4096):
            part = slice(at, at + 4096)
            dist[start + at : start + at + len(rows[part])] = 1.0 - _pair_dots(rows[part], unit[nearest[part]])
    return labels, dist


def _nearest(rows: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """The nearest unit centroid of each row, the same whatever rows it is computed with.

    The matrix product's similarities can differ in their last bits with the number of rows (BLAS blocks by shape),
    which alone would move a row whose two nearest centroids tie within rounding (identical centroids, which KMeans
    gives data with repeated points) to the other one when its shard holds only it: its copies in other shards would
    then sit in another cluster and never be compared. So where centroids come within ``dim * 2**-22`` of a unit
    row's best (twice the most two float32 sums of ``dim`` products of unit vectors can differ by), their
    similarities are computed again one pair at a time, which gives the same bits whatever else is in the block,
    and the best of them wins, the lowest centroid index on a tie.
    """
    sims = rows @ unit.T
    nearest = sims.argmax(axis=1) if sims.shape[1] else np.zeros(len(rows), dtype=np.int64)
    if len(rows) == 0 or sims.shape[1] < 2:
        return nearest
    at = np.arange(len(rows))
    least = sims[at, nearest] - rows.shape[1] * 2.0**-22  # the rows are unit vectors (or zero)
    sims[at, nearest] = -np.inf  # the runner-up next: a max, as fast as the argmax (a count of the near ones is not)
    tied = np.flatnonzero(sims.max(axis=1) >= least)
    tied = tied[rows[tied].any(axis=1)]  # a zero row's similarities are all exactly 0: the argmax's 0 stands
    # tied rows a few at a time, so that their (row, centroid) pairs stay bounded when many centroids tie
    step = max(1, _PAIRS_AT_ONCE // unit.shape[0])
    for start in range(0, tied.size, step):
        some = tied[start : start + step]
        near = sims[some] >= least[some, None]
        near[np.arange(some.size), nearest[some]] = True
        r, c = np.nonzero(near)
        which = some[r]
        again = np.empty(len(which), dtype=np.float32)
        for at in range(0, len(which), _PAIRS_AT_ONCE):  # the rows gathered: at most 32 MB at 512-d
            pairs = slice(at, at + _PAIRS_AT_ONCE)
            again[pairs] = _pair_dots(rows[which[pairs]], unit[c[pairs]])
        order = np.lexsort((c, -again, which))  # per row: the best similarity first, then the lowest index
        first = order[np.r_[True, which[order][1:] != which[order][:-1]]]
        nearest[which[first]] = c[first]
    return nearest


#: How many (row, centroid) pairs :func:`_nearest` computes again at once.
_PAIRS_AT_ONCE = 1 << 14


def _pair_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The dot product of each row of ``a`` with the same row of ``b``, each the same bits whatever the other rows
    (NumPy's einsum sums a row alone in another order than rows of a block when a row is longer than its buffer,
    8,192 values, so a single row is computed beside a copy of itself)."""
    if len(a) == 1:
        return np.einsum("ij,ij->i", np.concatenate([a, a]), np.concatenate([b, b]))[:1]
    return np.einsum("ij,ij->i", a, b)


def similarity_rounding(dim: int) -> float:
    """How far below 1 the float32 similarity of a normalised ``dim``-d embedding with an exact copy of itself can
    come out (the rounding of its normalisation and of the dot product): ``2**-22 * (1 + sqrt(dim))``, about 4x what
    was measured (5e-7 below 1 at 512-d, 1.4e-6 at 4096-d): 5.6e-6 at 512-d, 6.8e-6 at 768-d, 1.1e-5 at 2048-d. An
    ``eps`` below it is taken as this much, so that ``eps=0`` flags exact copies."""
    return 2.0**-22 * (1.0 + float(np.sqrt(max(int(dim), 0))))


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
    >= threshold; these are every linked pair of the rows, up to ``m * (m - 1) / 2`` for rows that are all near-copies
    (the step itself merges them into groups tile by tile instead). Memory otherwise: one ``block_size`` x
    ``block_size`` tile at a time; only tiles on or below the diagonal are computed. ``x`` may be a NumPy array or a
    CuPy array on the GPU: the same lines run on either (CuPy mirrors NumPy's API), and the results are arrays of the
    same kind.
    """
    if threshold is None:
        return (*_scan(x, block_size), None)
    xp = _array_module(x)
    found: list[tuple[Any, Any, Any]] = []

    def collect(a: int, b: int, tile: Any) -> None:
        r, c = xp.nonzero(tile >= threshold)
        found.append((b + c, a + r, tile[r, c]))

    best, arg = _scan(x, block_size, collect)
    if not found:
        empty = xp.zeros(0, dtype=np.int64)
        return best, arg, Pairs(empty, empty, xp.zeros(0, dtype=np.float32))
    return best, arg, Pairs(*(xp.concatenate(parts) for parts in zip(*found, strict=True)))


def _scan(x: Any, block_size: int, on_tile: Callable[[int, int, Any], None] | None = None) -> tuple[Any, Any]:
    """Each row's best similarity to an earlier row and that row's index, over the tiles on or below the diagonal;
    ``on_tile(a, b, tile)`` sees every tile (rows ``a..`` against columns ``b..``; on the diagonal the entries of a
    row against itself and later rows are ``-inf``)."""
    xp = _array_module(x)
    m = len(x)
    best = xp.full(m, -np.inf, dtype=np.float32)
    arg = xp.full(m, -1, dtype=np.int64)
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
            if on_tile is not None:
                on_tile(a, b, tile)
    return best, arg


class _Groups:
    """Connected groups of ranked rows, linked by similarities >= each threshold, merged tile by tile.

    ``first[i][r]`` is the first-ranked (smallest) row of row ``r``'s group under ``thresholds[i]``. Each tile's links
    are merged and let go, so memory is one tile's links and one label per row and threshold: never every linked pair
    of a cluster, which for a cluster of near-copies (a meme seen 10^4 times) is ``m^2 / 2`` pairs.
    """

    def __init__(self, m: int, thresholds: Sequence[float]):
        self.thresholds = list(thresholds)
        self.low = min(self.thresholds)
        self.first = [np.arange(m, dtype=np.int64) for _ in self.thresholds]

    def add(self, a: int, b: int, tile: Any) -> None:
        xp = _array_module(tile)
        r, c = xp.nonzero(tile >= self.low)
        if not len(r):
            return
        similarity = _to_host(tile[r, c])
        later, earlier = _to_host(r) + a, _to_host(c) + b
        for threshold, first in zip(self.thresholds, self.first, strict=True):
            keep = similarity >= threshold
            if keep.any():
                _merge_groups(first, earlier[keep], later[keep])


def _merge_groups(first: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merges the groups linked by the pairs ``(u, v)`` in ``first`` (each row's group label: the group's smallest
    row), in place."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    fu, fv = first[u], first[v]
    linked = fu != fv
    if not linked.any():
        return
    fu, fv = fu[linked], fv[linked]
    labels, index = np.unique(np.concatenate([fu, fv]), return_inverse=True)  # the groups involved, ascending
    k = len(fu)
    graph = coo_matrix((np.ones(k, dtype=np.int8), (index[:k], index[k:])), shape=(len(labels), len(labels)))
    _, component = connected_components(graph, directed=False)
    _, lowest = np.unique(component, return_index=True)  # labels ascend: a component's first label is its smallest
    at = np.searchsorted(labels, first)
    hit = at < len(labels)
    hit[hit] = labels[at[hit]] == first[hit]
    first[hit] = labels[lowest[component[at[hit]]]]


def _array_module(x: Any) -> Any:
    """NumPy, or CuPy for a CuPy array (never imported here otherwise)."""
    return sys.modules["cupy"] if type(x).__module__.startswith("cupy") else np


def _to_host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else a  # CuPy arrays copy to the host with get()


@functools.lru_cache(maxsize=4)
def _upper_triangle(n: int, module: str) -> Any:
    xp = importlib.import_module(module)
    return xp.triu(xp.ones((n, n), dtype=bool))


class _ClusterResult(NamedTuple):
    """One cluster's answers, by rank: the best earlier similarity and its rank (-1 for none), the flags per eps, and
    (connected mode) the rank of the sample kept for each sample's group under the first eps."""

    best: np.ndarray
    partner: np.ndarray
    flags: dict[float, np.ndarray]
    representative: np.ndarray | None


class SemanticDeduplicator(Step):
    """Finds semantic duplicates among embeddings (SemDeDup, as NeMo Curator does it). See the module docs.

    Args:
        n_clusters: KMeans clusters.
        max_iter: KMeans iterations.
        random_state: seed for KMeans, the fit sample and ``which_to_keep="random"``.
        eps: similarity margin: a duplicate has similarity >= 1 - eps. A list evaluates several in one run
            (one ``is_duplicate_eps<eps>`` column each; ``is_duplicate`` uses the first). An eps below the float32
            rounding of a similarity (:func:`similarity_rounding`, 6e-6 at 512-d) counts as that much, so that
            ``eps=0`` flags exact copies.
        which_to_keep: ``hard`` (keep the farthest from the centroid first), ``easy`` (nearest first), ``random``,
            or a list of metadata columns to rank by, highest first (e.g. ``["aesthetic_score"]``; nulls rank last,
            ties go to the earlier sample).
        mode: ``greedy`` (the reference rule) or ``connected`` (exactly one sample kept per connected group).
        embedding_column: the input embedding column.
        id_column: the id column (default: the dataset's); ids are reported in ``duplicate_of``.
        cache_dir: for :meth:`find` on arrays: a folder for centroids, assignments and per-cluster results, to resume.
        kmeans_backend: ``faiss`` (the CPU default), ``sklearn``, ``cuml`` (one GPU) or ``cuml-dask`` (cuML's
            multi-GPU KMeans on the workers of a distributed client). None picks by the dataset's backend: faiss on
            pandas; on cuDF, cuml-dask when the client's workers hold distinct GPUs (dask-cuda), else cuml.
        block_size: tile size of the blockwise similarity computation.
        tol: KMeans stops early below this change in one iteration. Its meaning is each backend's own: faiss, the
            objective's relative improvement; scikit-learn, the centroids' shift relative to the data's variance;
            cuML, the squared shift of the centroids; a negative ``tol`` runs every iteration. Each backend runs one
            initialisation (cuML's k-means||, the others k-means++ or faiss's random rows), so centroids differ
            between backends; ``find`` equals the dataset path for one backend and the same centroids.
        device: where the in-cluster similarity tiles are computed: ``cpu`` (NumPy), ``cuda`` (CuPy, the same
            code) or ``auto`` (cuda when a GPU is usable and CuPy installed). Each cluster's embeddings are copied
            to the GPU in turn, so its memory holds one cluster at a time.
        fit_sample: how many samples KMeans is fitted on: an int (about that many), a float in (0, 1] (about that
            fraction), or None for ``256 * n_clusters`` (what faiss itself would draw). The sample is drawn on the
            workers, shard by shard, each row with the same seeded chance; the chance is raised where needed so that
            the draw does not come short of ``n_clusters`` (a margin of a few times its square root).
        error_column: output column with why a sample was left out although it has an embedding: one that holds NaN
            or infinite values (a model overflow, say) is neither clustered nor compared, and gets
            :data:`NOT_FINITE` here; null for every other sample.

    Output columns: ``cluster``, ``distance_to_centroid`` (cosine distance), ``max_similarity``, ``duplicate_of``,
    ``is_duplicate`` (and per-eps columns for a list). In greedy mode ``duplicate_of`` is the id of the most similar
    earlier-ranked sample, set for every sample but the first of its cluster (duplicate or not: it is the partner of
    ``max_similarity``); in connected mode a duplicate's ``duplicate_of`` is the sample kept for its group instead.
    Samples with a null embedding are skipped; their outputs are null and ``is_duplicate`` is false. So are samples
    whose embedding holds NaN or infinite values, with the reason in ``error_column`` (which a
    :class:`~imgcurate.filters.SampleFilter` with ``drop_errors`` drops). :meth:`find`, on an array, refuses them.

    Example:
        >>> ds = TimmImageEmbedder("vit_base_patch32_clip_224.openai", pretrained=True)(ds)  # doctest: +SKIP
        >>> ds = SemanticDeduplicator(n_clusters=1000, eps=[0.01, 0.05])(ds)  # doctest: +SKIP
        >>> ds.metadata.is_duplicate.sum().compute()  # doctest: +SKIP
    """

    gpu = "optional"
    #: 2: a row whose nearest centroids tie within rounding gets the same one whatever else its shard holds
    results_version = 2

    def __init__(
        self,
        n_clusters: int,
        max_iter: int = 100,
        random_state: int = 1234,
        eps: float | Sequence[float] = 0.01,
        which_to_keep: str | Sequence[str] = "hard",
        mode: str = "greedy",
        embedding_column: str = "image_embedding",
        id_column: str | None = None,
        cache_dir: str | None = None,
        kmeans_backend: str | None = None,
        block_size: int = 2048,
        tol: float = 1e-4,
        device: str = "auto",
        fit_sample: int | float | None = None,
        error_column: str = "semantic_dedup_error",
    ):
        if isinstance(which_to_keep, str):
            if which_to_keep not in _KEEP:
                raise ValueError(
                    f"which_to_keep must be one of {', '.join(_KEEP)}, or a list of metadata columns to rank by, got "
                    f"{which_to_keep!r}"
                )
            self.keep_by: list[str] = []
        else:
            self.keep_by = [str(c) for c in which_to_keep]
            if not self.keep_by:
                raise ValueError("which_to_keep: give hard, easy, random or a non-empty list of column names")
            twice = next((c for i, c in enumerate(self.keep_by) if c in self.keep_by[:i]), None)
            if twice is not None:
                raise ValueError(f"which_to_keep names the column {twice!r} twice")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if isinstance(eps, numbers.Real) or not isinstance(eps, Sequence | np.ndarray) or isinstance(eps, str):
            values = [eps]
        else:
            values = list(np.ravel(eps)) if isinstance(eps, np.ndarray) else list(eps)
        if any(isinstance(e, bool) or not isinstance(e, numbers.Real) for e in values):
            raise ValueError(f"eps: expected a number in [0, 2) or a list of them, got {eps!r}")
        self.eps = [float(e) for e in values]
        if not self.eps or any(not 0 <= e < 2 for e in self.eps):
            raise ValueError(f"eps must be in [0, 2), got {eps!r}")
        twice = next((e for i, e in enumerate(self.eps) if e in self.eps[:i]), None)
        if twice is not None:
            raise ValueError(f"eps gives {twice!r} twice (each eps has a column of its own)")
        for name, value, least in (("n_clusters", n_clusters, 1), ("max_iter", max_iter, 1),
                                   ("block_size", block_size, 1), ("random_state", random_state, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or tol != tol:
            raise ValueError(f"tol must be a number (a negative one never stops early), got {tol!r}")
        n_clusters = int(n_clusters)
        if kmeans_backend is not None:
            _check_kmeans_backend(kmeans_backend)
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        if device == "cuda" and importlib.util.find_spec("cupy") is None:
            from imgcurate.errors import MissingDependencyError

            raise MissingDependencyError("SemanticDeduplicator(device='cuda')", "cupy-cuda13x", extra="gpu")
        if isinstance(fit_sample, np.integer | np.floating):
            fit_sample = fit_sample.item()
        if fit_sample is not None and not (
            (isinstance(fit_sample, int) and not isinstance(fit_sample, bool) and fit_sample >= n_clusters)
            or (isinstance(fit_sample, float) and 0 < fit_sample <= 1)
        ):
            raise ValueError(
                f"fit_sample must be an int >= n_clusters, a fraction in (0, 1] or None, got {fit_sample!r}"
            )
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.random_state = random_state
        self.which_to_keep = which_to_keep if isinstance(which_to_keep, str) else "metadata"
        self.mode = mode
        self.embedding_column = embedding_column
        self.id_column = id_column
        self.cache_dir = cache_dir
        self.kmeans_backend = kmeans_backend
        self.block_size = block_size
        self.tol = tol
        self.device = device
        self.fit_sample = fit_sample
        self.error_column = error_column
        self.stats_: dict[str, Any] = {}
        if error_column in self._answer_columns():
            raise ValueError(f"error_column: {error_column!r} is one of the step's other output columns")

    # ------------------------------------------------------------------ core, on arrays
    def _cache(self, name: str) -> str | None:
        return None if self.cache_dir is None else os.path.join(self.cache_dir, name)

    def _rank(
        self, members: np.ndarray, dist: np.ndarray, values: np.ndarray | None = None, first: int | None = None
    ) -> np.ndarray:
        """``members`` (indices into ``dist`` and ``values``, in global order) in rank order: the first is kept.

        ``first`` is the global index of ``members[0]`` (the seed of ``random``); None when ``members`` are global.
        """
        if self.keep_by:
            keys = values[members]  # (m, columns): highest first, column by column, NaN last, then index order
            order = np.lexsort((np.arange(len(members)), *[-keys[:, j] for j in reversed(range(keys.shape[1]))]))
            return members[order]
        if self.which_to_keep == "hard":
            return members[np.argsort(-dist[members], kind="stable")]
        if self.which_to_keep == "easy":
            return members[np.argsort(dist[members], kind="stable")]
        start = (int(members[0]) if first is None else first) if len(members) else 0
        rng = np.random.default_rng(self.random_state + start)
        return members[rng.permutation(len(members))]

    def find(
        self,
        x: np.ndarray,
        copy: bool = True,
        centroids: np.ndarray | None = None,
        rank_values: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs the whole method on a (N, D) array; returns per-row arrays (cluster, distance, max_similarity,
        duplicate_of as a row index or -1, and is_duplicate per eps).

        Args:
            x: the embeddings, one row per sample.
            copy: False L2-normalises a C-ordered float32 ``x`` in place instead of copying it (saves N x D x 4 bytes).
            centroids: use these instead of fitting KMeans.
            rank_values: ``(N, columns)`` values to rank by when ``which_to_keep`` names metadata columns.

        Afterwards ``stats_`` holds the KMeans backend, the seconds spent in each phase, the KMeans iterations run
        and the largest cluster's size.
        """
        backend = self.kmeans_backend or "faiss"
        if self.keep_by and (rank_values is None or len(rank_values) != len(x)):
            raise ValueError(f"which_to_keep={self.keep_by!r} ranks by metadata: give rank_values, one row per sample")
        if centroids is not None:
            fixed = self._given_centroids(centroids)
            return self._find(x, copy, backend, lambda unit: (fixed, 0), rank_values)
        return self._find(x, copy, backend, lambda unit: self._kmeans(unit, backend), rank_values)

    def _given_centroids(self, centroids: Any) -> np.ndarray:
        """Centroids given by the caller as float32, one row per cluster: rows beyond ``n_clusters`` would hold rows
        that are never compared (``find`` walks clusters ``0..n_clusters-1``)."""
        fixed = np.asarray(centroids, dtype=np.float32)
        if fixed.ndim != 2 or len(fixed) != self.n_clusters:
            raise ValueError(f"centroids: expected an array of n_clusters={self.n_clusters} rows, got shape "
                             f"{fixed.shape}")  # fmt: skip
        if not np.isfinite(fixed).all():
            raise ValueError("centroids: the array holds NaN or infinite values")
        return fixed

    def _kmeans(self, data: Any, backend: str) -> tuple[np.ndarray, int]:
        return kmeans(data, self.n_clusters, self.max_iter, self.random_state, backend, self.tol)

    def _find(
        self,
        x: np.ndarray,
        copy: bool,
        backend: str,
        fit: Callable[[np.ndarray], tuple[np.ndarray, int]],
        rank_values: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`find`, with ``fit`` giving (centroids, iterations) for the normalised rows unless cached."""
        x = np.array(x, dtype=np.float32, order="C", copy=True if copy else None)
        n = len(x)
        bad = np.flatnonzero(~_finite_rows(x))
        if len(bad):
            raise ValueError(f"x has {len(bad)} rows with NaN or infinite values (the first is row {bad[0]}): drop "
                             "them, or run on a dataset, which records them as errors")  # fmt: skip
        if n < self.n_clusters:
            raise ValueError(f"{n} samples with embeddings is fewer than n_clusters={self.n_clusters}")
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"x: expected a (N, D) array of D >= 1, got shape {x.shape}")
        _normalize(x)
        values = None if rank_values is None else np.asarray(rank_values, dtype=np.float64).reshape(n, -1)
        fingerprint = self._fingerprint(x, values) if self.cache_dir is not None else ""  # keys the cache only
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
                    members = self._rank(order[bounds[c] : bounds[c + 1]], dist, values)
                    if len(members):
                        touched.append(members)
                        found = self._cluster_result(x[members], device)
                        best[members] = found.best
                        dup_of[members] = self._partners(found, members, -1)
                        for e in self.eps:
                            flags[e][members] = found.flags[e]
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

    def _cluster_result(self, rows: Any, device: str) -> _ClusterResult:
        """The answers for one cluster whose normalised embeddings ``rows`` are in rank order."""
        connected = self.mode == "connected"
        thresholds = [1.0 - max(e, similarity_rounding(rows.shape[1])) for e in self.eps]
        if device == "cuda":
            import cupy

            rows = cupy.asarray(rows)
        groups = _Groups(len(rows), thresholds) if connected else None
        sims, arg = _scan(rows, self.block_size, None if groups is None else groups.add)
        sims, arg = _to_host(sims), _to_host(arg)
        rank = np.arange(len(sims))
        flags: dict[float, np.ndarray] = {}
        representative = None
        for i, (e, t) in enumerate(zip(self.eps, thresholds, strict=True)):
            if groups is None:
                flags[e] = sims >= t
                continue
            rep = groups.first[i]
            flags[e] = rep != rank
            if e == self.eps[0]:
                representative = rep
        return _ClusterResult(sims, arg, flags, representative)

    @staticmethod
    def _partners(found: _ClusterResult, members: np.ndarray, none: Any) -> np.ndarray:
        """Each member's ``duplicate_of`` (an entry of ``members``, or ``none``): its most similar earlier sample; in
        connected mode a duplicate points at the sample kept for its group instead."""
        out = np.where(found.partner >= 0, members[np.maximum(found.partner, 0)], none)
        if found.representative is not None:
            rank = np.arange(len(members))
            out = np.where(found.representative != rank, members[found.representative], out)
        return out

    def _resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        from imgcurate.device import gpu_available

        return "cuda" if gpu_available() and importlib.util.find_spec("cupy") is not None else "cpu"

    def _fingerprint(self, x: np.ndarray, values: np.ndarray | None = None) -> str:
        params = [self.n_clusters, self.max_iter, self.tol, self.random_state, self.which_to_keep, self.mode, self.eps,
                  self.keep_by]  # fmt: skip
        digest = hashlib.sha256(json.dumps(params).encode())
        digest.update(np.ascontiguousarray(x).data)  # the whole input (a sample could miss a changed row), no copy
        if values is not None:
            digest.update(np.ascontiguousarray(values).data)
        return digest.hexdigest()

    # ------------------------------------------------------------------ the step contract
    def _id(self, id_col: str) -> str:
        return self.id_column or id_col

    def input_columns(self, id_col: str) -> list[str]:
        return list(dict.fromkeys([self.embedding_column, self._id(id_col), *self.keep_by]))

    def output_columns(self) -> dict[str, pa.DataType]:
        return {**self._answer_columns(), self.error_column: pa.string()}

    def _answer_columns(self) -> dict[str, pa.DataType]:
        types = {
            "cluster": pa.int64(),
            "distance_to_centroid": pa.float32(),
            "max_similarity": pa.float32(),
            "duplicate_of": pa.string(),
            "is_duplicate": pa.bool_(),
        }
        if len(self.eps) > 1:
            types.update({f"is_duplicate_eps{e}": pa.bool_() for e in self.eps})
        return types

    def check(self, meta: Any, id_col: str) -> None:
        super().check(meta, id_col)
        reason = not_embeddings(meta[self.embedding_column].dtype, self.embedding_column)
        if reason is not None:
            raise ColumnError(f"{self.name}: {reason}")
        sample = to_pandas(meta[self.keep_by]) if self.keep_by else None
        for column in self.keep_by:
            kind = sample[column].dtype
            if not (pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_bool_dtype(kind)):
                raise ColumnError(f"{self.name}: which_to_keep ranks by {column!r}, which holds {kind}, not numbers "
                                  "(rank by a score, a size or a boolean column)")  # fmt: skip

    def check_rows(self, rows: int) -> None:
        """KMeans needs a sample per cluster: fewer input rows than ``n_clusters`` is an error before any work (the
        fit would fail after the embedding pass otherwise; rows without a usable embedding can still make it fail
        there)."""
        if rows < self.n_clusters:
            raise ValueError(f"{self.name}: the input has {rows} rows, fewer than n_clusters={self.n_clusters} "
                             "(KMeans needs a sample per cluster): lower n_clusters")  # fmt: skip

    def summary_columns(self) -> dict[str, str]:
        return {"duplicates:semantic": "is_duplicate", "duplicate_of:semantic": "duplicate_of",
                "similarity:semantic": "max_similarity"}  # fmt: skip

    def thresholds(self) -> dict[str, list[tuple[str, float]]]:
        """The similarity above which a sample is a duplicate (``1 - eps``), drawn on the report's histogram."""
        return {"max_similarity": [(f"1 - eps {e:g}", 1.0 - e) for e in self.eps]}

    def worker_requirements(self, backend: str) -> list[Requirement]:
        """As :meth:`Step.worker_requirements`: the KMeans backend's package (faiss by default on pandas; on cuDF
        cuML, with its Dask extra where the client's workers hold distinct GPUs, as :meth:`kmeans_backend_for`
        chooses), which the fit imports on the workers."""
        name = self.kmeans_backend
        if name is None and backend == "cudf":
            from imgcurate.device import workers_have_distinct_gpus

            name = "cuml-dask" if workers_have_distinct_gpus(progress.distributed_client()) else "cuml"
        kmeans = _KMEANS[name or "faiss"]
        own = [Requirement(module, kmeans.package, kmeans.extra) for module in kmeans.modules]
        return [*super().worker_requirements(backend), *own]

    def kmeans_backend_for(self, meta: Any) -> str:
        """The KMeans backend for a metadata frame: the one asked for, else chosen by the frame's backend and by
        whether the distributed client's workers hold distinct GPUs (checked when the step runs)."""
        if self.kmeans_backend is not None:
            return self.kmeans_backend
        if not on_gpu(meta):
            name = "faiss"
        else:
            from imgcurate.device import workers_have_distinct_gpus

            name = "cuml-dask" if workers_have_distinct_gpus(progress.distributed_client()) else "cuml"
        _check_kmeans_backend(name)
        return name

    def added(self, dataset: ImageTextPairDataset, centroids: np.ndarray | None = None) -> dd.DataFrame:
        """The output columns, computed lazily on the workers (see the module docs); ``centroids`` skips the fit.

        Without ``centroids`` the fit is part of the same graph, which holds every shard's input on the workers from
        its sample draw until its assignment (KMeans needs a sample from every shard first): the right choice when
        the input is expensive to compute again, such as an embedder's lazy output. See :meth:`fit` for input that
        is cheap to read again. With ``kmeans_backend='cuml-dask'`` the fit cannot be part of the graph (cuML's Dask
        estimators run from the client): the input is persisted on the workers first and held until the returned
        columns are computed, so that it is still computed once.
        """
        df = dataset.metadata
        self.check(df._meta, dataset.id_col)  # as a call of the step does: added() is also called on its own
        id_col = self._id(dataset.id_col)
        backend = self.kmeans_backend_for(df._meta)
        frame = df[self.input_columns(dataset.id_col)]
        io = ShardIO(id_col, dataset.storage_options)
        # Only the random rule seeds each cluster's shuffle with its first member's global index (as find does),
        # which needs a running count over the shards; the other rules order rows by shard and row alone. So with
        # centroids given and another rule nothing is counted: one task per shard fewer.
        random = self.which_to_keep == "random"
        counts = None
        if centroids is None and backend == "cuml-dask":
            # cuML's Dask fit runs now, before the rest of the graph: the input is held on the workers (as the
            # in-graph fit holds it until each shard's assignment) so that the embedder behind it runs once
            _require_client()
            frame = progress.persist(frame, desc="semantic dedup: input for the cuML fit")
        if centroids is None or random:
            counts = dataset.map_shards(_count_valid, self.embedding_column, meta=_COUNT_META, frame=frame)
        if centroids is not None:
            fitted: Any = self._given_centroids(centroids)
        elif backend == "cuml-dask":
            fitted = self._fit_on_workers(dataset, frame, _total(counts))
        else:
            # a tree reduction inside the same graph: the embedder's output is shared, not computed again
            fitted = self._fit_in_graph(frame, counts, _total(counts), backend)
        if isinstance(fitted, np.ndarray):
            # one key of the graph, so each worker fetches the centroids once: as a plain argument every task's spec
            # would carry its own copy to the workers, which hold the specs of the tasks queued on them (measured:
            # 263 copies, 368 MB, of 2,000 x 512 centroids on one worker; at 10^5 clusters one copy is 200 MB)
            fitted = dask.delayed(fitted, pure=True)
        # Several clusters share a group partition (about 8), and every 16 shards at least one.
        groups = group_count(dataset.num_shards, -(-self.n_clusters // 8))
        meta = _rows_meta(self.keep_by)
        if counts is None:
            rows = dataset.map_shards(_assign_shard, None, fitted, self, io, groups, meta=meta, frame=frame)
        else:  # the count pass carries each partition's shard too: no shard frame of its own
            offsets = (counts["n"].cumsum() - counts["n"]).to_frame("offset") if random else None
            rows = dd.map_partitions(
                _assign_counted_shard, frame, counts, offsets, fitted, self, io, groups, meta=meta,
                align_dataframes=False, enforce_metadata=False,
            )  # fmt: skip
        found = grouped(rows, _dedup_clusters, self, meta=_found_meta(self.eps), groups=groups)
        return per_shard(_output_columns, found, self, backend_of(df._meta).name, meta=self.output_meta(df._meta))

    def fit(self, dataset: ImageTextPairDataset) -> np.ndarray:
        """The KMeans centroids for ``dataset``, computed now, on the workers; the client receives the centroids only.

        Two passes of their own: one counts each shard's embeddings, one draws the sample and fits. Each task reads
        its shard and lets it go, so the workers never hold the whole input, where :meth:`added` without centroids
        holds it from the sample draw to the assignment. ``added(dataset, centroids=step.fit(dataset))`` reads the
        input three times instead of once: the better trade when it is stored (what :meth:`added_from_storage`
        does, and so a pipeline with a run directory), not when it is an embedder's lazy output.

        Example:
            >>> ds = ImageTextPairDataset.from_webdataset("shards/")  # doctest: +SKIP
            >>> dedup = SemanticDeduplicator(n_clusters=1000)  # doctest: +SKIP
            >>> ds = ds.with_columns(dedup.added(ds, centroids=dedup.fit(ds)))  # doctest: +SKIP
        """
        if dataset.input_rows is not None:
            self.check_rows(dataset.input_rows)  # before the count pass, which may run the embedder
        df = dataset.metadata
        self.check(df._meta, dataset.id_col)
        backend = self.kmeans_backend_for(df._meta)
        frame = df[self.input_columns(dataset.id_col)]
        counts = dataset.map_shards(_count_valid, self.embedding_column, meta=_COUNT_META, frame=frame)
        total = int(progress.compute([_total(counts)], desc="semantic dedup: counting embeddings")[0])
        if backend == "cuml-dask":
            return self._fit_on_workers(dataset, frame, total)
        # the count pass again, as the shard frame of the sample pass: fused with it, one read per shard
        fitted = self._fit_in_graph(frame, counts, total, backend)
        return np.asarray(progress.compute([fitted], desc="semantic dedup: KMeans")[0], dtype=np.float32)

    def added_from_storage(self, dataset: ImageTextPairDataset) -> dd.DataFrame:
        """The output columns with the centroids fitted first (:meth:`fit`), for input that is cheap to read again."""
        return self.added(dataset, centroids=self.fit(dataset))

    def _fit_in_graph(self, frame: Any, counts: dd.DataFrame, total: Any, backend: str) -> Any:
        """The centroids as a lazy Dask scalar: a seeded draw per shard, then KMeans at the root of a tree reduction.
        ``total`` (the embeddings counted) may be lazy too."""
        sample = map_with_shard(_sample_shard, frame, counts, self, total, meta=_SAMPLE_META)
        return sample.reduction(
            chunk=_identity, combine=_identity, aggregate=_fit_sample, split_every=16, meta=object,
            aggregate_kwargs={"step": self, "backend": backend},
        )  # fmt: skip

    def _fit_on_workers(self, dataset: ImageTextPairDataset, frame: Any, total: Any) -> np.ndarray:
        """cuML's Dask KMeans across the workers' GPUs, fitted on a sample that stays on the workers (one block per
        shard: CuPy on the cuDF backend). Eager, since cuML's Dask estimators need the client; only the centroids
        come back."""
        import dask.array as da

        _require_client()
        gpu = on_gpu(frame._meta)
        if not isinstance(total, int | np.integer):  # added(): a lazy count over the input the caller persisted
            total = progress.compute([total], desc="semantic dedup: counting embeddings")[0]
        total = int(total)
        sample = dataset.map_shards(_sample_shard, self, total, meta=_SAMPLE_META, frame=frame)
        sample = progress.persist(sample, desc="semantic dedup: KMeans sample")
        shapes = sample[["n", "dim", "tar"]].compute()
        _check_dims(shapes, self.embedding_column)
        _check_sample_size(int(shapes["n"].sum()), total, self)
        dim = int(shapes["dim"].max())
        empty = _device_block(pd.DataFrame({"embedding": [b""], "n": [0], "dim": [dim]}), gpu)
        blocks = [
            da.from_delayed(
                dask.delayed(_device_block)(part, gpu), shape=(int(n), dim), dtype=np.float32, meta=empty
            )  # fmt: skip
            for part, n in zip(sample.to_delayed(), shapes["n"], strict=True)
            if n
        ]
        centroids, iterations = self._kmeans(da.concatenate(blocks), "cuml-dask")
        self.stats_.update(kmeans_iterations=iterations, kmeans_backend="cuml-dask")
        return centroids


def _require_client() -> None:
    if progress.distributed_client() is None:
        raise RuntimeError(
            "kmeans backend 'cuml-dask' runs on the GPU workers of a Dask distributed client: start one (e.g. "
            "dask_cuda.LocalCUDACluster, or 'cluster: {type: cuda}' in a pipeline) or choose kmeans_backend='cuml'"
        )


# ---------------------------------------------------------------------------------------------------- on the workers
_COUNT_META = pd.DataFrame(
    {"n": pd.Series([], dtype="int64"), "shard": pd.Series([], dtype="int64"), "tar": pd.Series([], dtype=object)}
)
_SAMPLE_META = pd.DataFrame(
    {
        "embedding": pd.Series([], dtype=object),  # the shard's drawn rows, normalised, as float32 bytes
        "n": pd.Series([], dtype="int64"),
        "dim": pd.Series([], dtype="int64"),
        "tar": pd.Series([], dtype=object),
        "usable": pd.Series([], dtype="int64"),  # the shard's usable embeddings, drawn or not
    }
)


def _identity(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


def _normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalises the rows of a float32 matrix in place (and returns it); a zero row stays zero."""
    if len(x):  # the squared norms without an N x D temporary (np.linalg.norm makes one): ~20x faster
        squares = np.einsum("ij,ij->i", x, x)
        norms = np.sqrt(squares)
        # finite values whose squares overflow float32 (above ~1.8e19) or underflow it (below ~1e-19): these rows
        # are divided in float64, where neither happens (their norm itself may not fit in float32)
        odd = np.flatnonzero(~(squares >= _SMALLEST_SQUARE) | np.isinf(squares))
        if len(odd):
            wide = x[odd].astype(np.float64)
            wide /= np.maximum(np.linalg.norm(wide, axis=1), np.finfo(np.float64).tiny)[:, None]
            norms[odd] = 1.0
        x /= np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
        if len(odd):
            x[odd] = wide
    return x


#: Squared norms below this may have lost digits in float32 (subnormal squares).
_SMALLEST_SQUARE = np.float32(np.finfo(np.float32).tiny)


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Which rows of a float32 matrix hold only finite values, in one pass without an N x D temporary (the squared
    norm; rows whose square overflows are looked at value by value)."""
    if not len(x):
        return np.zeros(0, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(np.einsum("ij,ij->i", x, x))
    overflow = np.flatnonzero(~finite)
    if len(overflow):
        finite[overflow] = np.isfinite(x[overflow]).all(axis=1)
    return finite


def _valid_matrix(part: Any, column: str, shard: Shard | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(valid, x, unusable)``: the rows with a usable embedding, their float32 matrix, and the rows whose embedding
    holds NaN or infinite values (neither clustered nor compared: they get :data:`NOT_FINITE` as their error)."""
    try:
        valid, x = embedding_matrix(part[column], column)
    except ValueError as err:
        raise ShardError(shard.tar if shard else column, str(err)) from None
    if len(x) and x.shape[1] == 0:
        raise ShardError(shard.tar if shard else column, f"column {column!r} holds empty (0-d) embeddings")
    finite = _finite_rows(x)
    unusable = np.zeros(len(valid), dtype=bool)
    if not finite.all():
        rows = np.flatnonzero(valid)
        unusable[rows[~finite]] = True
        valid = valid & ~unusable
        x = x[finite]
    return valid, x, unusable


def _count_valid(part: Any, shard: Shard, column: str) -> pd.DataFrame:
    """The shard's non-null embeddings, and the shard itself (so that later passes need no shard frame of their
    own: one pass reading the shard frame has it fused into its tasks)."""
    # counted as the sample and the assignment count them (finite rows only), so that the random rule's seeds (a
    # cluster's first global index) are those of a dataset where those rows are null; ~5 ms per 10,000 x 512 shard
    n = int(_valid_matrix(part, column, shard)[0].sum())
    return pd.DataFrame({"n": pd.Series([n], dtype="int64"), "shard": pd.Series([shard.index], dtype="int64"),
                         "tar": pd.Series([shard.tar], dtype=object)})  # fmt: skip


def _total(counts: dd.DataFrame) -> Any:
    """The embeddings counted over all shards, as a lazy Dask scalar (a tree reduction)."""
    return counts.reduction(chunk=_count_total, combine=_sum_all, aggregate=_sum_all, split_every=16, meta=int)


def _count_total(counts: pd.DataFrame) -> int:
    """A shard's count, as a reduction's chunk: one plain task per shard (a projection first would be fused with it,
    which costs more to build at 10^5 shards)."""
    return int(counts["n"].sum())


def _sum_all(values: Any) -> int:
    return int(np.sum(np.asarray(values, dtype=np.int64)))


def _sample_size(step: SemanticDeduplicator, total: int) -> int:
    if isinstance(step.fit_sample, float):
        return max(step.n_clusters, int(round(step.fit_sample * total)))
    return step.fit_sample if step.fit_sample is not None else 256 * step.n_clusters


def _draw_chance(step: SemanticDeduplicator, total: int) -> float:
    """The chance of each usable row to be drawn into the KMeans sample. Each row is drawn on its own (a shard needs
    only the total), so the sample's size varies around its expected value by about its square root: the expected
    size is at least ``n_clusters`` plus 8 such deviations (and 8), so that the draw never comes short of
    ``n_clusters`` unless the data does."""
    wanted = max(_sample_size(step, total), step.n_clusters + int(np.ceil(8 * np.sqrt(step.n_clusters))) + 8)
    return min(1.0, wanted / max(int(total), 1))


def _sample_shard(part: Any, shard: Shard, step: SemanticDeduplicator, total: int) -> pd.DataFrame:
    """A seeded draw of this shard's normalised embeddings, each row kept with probability sample / total."""
    _, x, _ = _valid_matrix(part, step.embedding_column, shard)
    usable = len(x)
    p = _draw_chance(step, int(total))
    if p < 1.0:
        x = x[np.random.default_rng([step.random_state, shard.index]).random(len(x)) < p]
    x = _normalize(np.array(x, dtype=np.float32))
    dim = x.shape[1] if x.ndim == 2 and len(x) else 0
    return pd.DataFrame({"embedding": [x.tobytes()], "n": [len(x)], "dim": [dim], "tar": [shard.tar],
                         "usable": [usable]})  # fmt: skip


def _block(row: pd.Series) -> np.ndarray:
    return np.frombuffer(row["embedding"], dtype=np.float32).reshape(int(row["n"]), int(row["dim"]))


def _check_dims(shapes: pd.DataFrame, column: str) -> None:
    """Every shard's embeddings have one length; else a ShardError naming the first shard that differs."""
    filled = shapes[shapes["n"] > 0]
    if filled["dim"].nunique() > 1:
        first = filled.iloc[0]
        odd = filled[filled["dim"] != first["dim"]].iloc[0]
        raise ShardError(odd["tar"], f"column {column!r} holds {odd['dim']}-d embeddings, {first['tar']} holds "
                                     f"{first['dim']}-d")  # fmt: skip


def _device_block(part: pd.DataFrame, on_gpu: bool) -> Any:
    block = _block(part.iloc[0])
    if on_gpu:
        import cupy

        return cupy.asarray(block)
    return block


def _check_sample_size(drawn: int, total: int, step: SemanticDeduplicator) -> None:
    """KMeans needs at least ``n_clusters`` rows: a ValueError saying whether the data or the sample is too small.
    ``total`` is the count of usable embeddings."""
    if drawn >= step.n_clusters:
        return
    if total < step.n_clusters:
        raise ValueError(f"{total} samples with embeddings is fewer than n_clusters={step.n_clusters}")
    raise ValueError(f"the KMeans sample holds {drawn} rows, fewer than n_clusters={step.n_clusters}: raise "
                     "fit_sample")  # fmt: skip


def _fit_sample(sample: pd.DataFrame, step: SemanticDeduplicator, backend: str) -> np.ndarray:
    """KMeans on the gathered sample (the root of a tree reduction, on a worker); returns the centroids."""
    _check_dims(sample, step.embedding_column)
    blocks = [_block(row) for _, row in sample.iterrows() if row["n"]]
    x = np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)
    _check_sample_size(len(x), int(sample["usable"].sum()), step)
    from threadpoolctl import threadpool_limits

    from imgcurate.cpu import cpu_count

    # Every later task of the graph waits for these centroids, so nothing else can run while the fit does: it uses
    # the cores of its machine, as find does in one process, not the one thread that distributed's nanny gives each
    # worker (OMP_NUM_THREADS=1), which left the other workers idle for the longest task of the step. threadpoolctl
    # changes only the thread pools of libraries already loaded: faiss's OpenMP runtime is loaded by importing it.
    for module in _KMEANS[backend].modules if backend in _KMEANS else ():
        importlib.import_module(module)
    with threadpool_limits(cpu_count()):
        centroids, _ = step._kmeans(x, backend)
    return np.asarray(centroids, dtype=np.float32)


def _rows_meta(keep_by: list[str]) -> pd.DataFrame:
    columns = {
        SHARD: pd.Series([], dtype="int64"),
        ROW: pd.Series([], dtype="int64"),
        "_gidx": pd.Series([], dtype="int64"),
        "key": pd.Series(text_column(pa.array([], pa.string()))),
        "cluster": pd.Series([], dtype="int64"),
        "distance": pd.Series([], dtype="float32"),
        "embedding": pd.Series(rows_column(np.zeros((0, 0), dtype=np.float32))),  # normalised, as float32 bytes
    }
    columns.update({f"_rank{i}": pd.Series([], dtype="float64") for i in range(len(keep_by))})
    columns[GROUP] = pd.Series([], dtype="int64")
    return pd.DataFrame(columns)


def _assign_counted_shard(
    part: Any, shard_part: pd.DataFrame, offset: pd.DataFrame | None, centroids: np.ndarray,
    step: SemanticDeduplicator, io: ShardIO, groups: int,
) -> pd.DataFrame:  # fmt: skip
    """:func:`_assign_shard`, the shard taken from its count pass partition, ``offset`` from the running count."""
    reuse_freed_memory()  # as every shard-wise task does (:func:`imgcurate._dask.map_with_shard`)
    shard = Shard(int(shard_part["shard"].iloc[0]), str(shard_part["tar"].iloc[0]))
    first = None if offset is None else int(offset["offset"].iloc[0])
    return _assign_shard(part, shard, first, centroids, step, io, groups)


def _assign_shard(
    part: Any,
    shard: Shard,
    offset: int | None,
    centroids: np.ndarray,
    step: SemanticDeduplicator,
    io: ShardIO,
    groups: int,
) -> pd.DataFrame:
    """Every row of this shard with its position, global order, nearest centroid (-1 without an embedding),
    distance, embedding and group partition.

    ``_gidx`` orders rows as :meth:`SemanticDeduplicator.find` does: the global index of the row among the non-null
    ones when ``offset`` (this shard's first such index) is given, else the row id (the same order)."""
    valid, x, unusable = _valid_matrix(part, step.embedding_column, shard)
    x = _normalize(np.array(x, dtype=np.float32))
    if len(x) and x.shape[1] != centroids.shape[1]:
        raise ShardError(shard.tar, f"column {step.embedding_column!r} holds {x.shape[1]}-d embeddings, the KMeans "
                                    f"centroids are {centroids.shape[1]}-d")  # fmt: skip
    labels, dist = _assign(x, centroids) if len(x) else (np.zeros(0, np.int64), np.zeros(0, np.float32))
    n = len(valid)
    rows = np.flatnonzero(valid)
    meta = host(part, list(dict.fromkeys([io.id_col, *step.keep_by])))  # the id column may be a rank column too
    out = positions(valid, shard.index)
    if offset is None:
        out["_gidx"] = (np.int64(shard.index) << 40) + np.arange(n, dtype=np.int64)
    else:
        out["_gidx"] = offset + np.cumsum(valid, dtype=np.int64) - 1
    out["key"] = text_column(meta[io.id_col])
    cluster = np.full(n, -1, dtype=np.int64)
    cluster[rows] = labels
    cluster[unusable] = _UNUSABLE  # travels with the row: its shard's columns record the error
    out["cluster"] = cluster
    distance = np.full(n, np.nan, dtype=np.float32)
    distance[rows] = dist
    out["distance"] = distance
    out["embedding"] = rows_column(x, valid)
    for i, column in enumerate(step.keep_by):
        ranks = pd.to_numeric(meta[column], errors="coerce")
        out[f"_rank{i}"] = ranks.to_numpy(dtype=np.float64, na_value=np.nan)
    # a cluster's rows meet in one group partition; rows without an embedding stay with their shard's group
    out[GROUP] = group_of(np.where(cluster >= 0, cluster, shard.index), groups)
    return out


#: The cluster label that a row whose embedding holds NaN or infinite values carries through the shuffles (a row
#: without an embedding carries -1).
_UNUSABLE = -2
#: The error recorded for such a row.
NOT_FINITE = "embedding holds NaN or infinite values"


def _found_meta(eps: list[float]) -> pd.DataFrame:
    columns = {
        SHARD: pd.Series([], dtype="int64"),
        ROW: pd.Series([], dtype="int64"),
        "cluster": pd.Series([], dtype="int64"),
        "distance": pd.Series([], dtype="float32"),
        "similarity": pd.Series([], dtype="float32"),
        "of": pd.Series(text_column(pa.array([], pa.string()))),
    }
    columns.update({f"flag{i}": pd.Series([], dtype=bool) for i in range(len(eps))})
    return pd.DataFrame(columns)


def _dedup_clusters(part: pd.DataFrame, step: SemanticDeduplicator) -> pd.DataFrame:
    """The answers for every row in this partition: each cluster is whole here, after the shuffle; rows without an
    embedding (cluster -1) get the empty answer."""
    out = part[[SHARD, ROW, "cluster", "distance"]].copy()
    similarity = np.full(len(part), np.nan, dtype=np.float32)
    of = np.full(len(part), -1, dtype=np.int64)  # the position in ``part`` of each row's duplicate_of
    flags = [np.zeros(len(part), dtype=bool) for _ in step.eps]
    labels = part["cluster"].to_numpy()
    inside = np.flatnonzero(labels >= 0)
    if len(inside):
        inside = inside[np.argsort(part["_gidx"].to_numpy()[inside], kind="stable")]  # global order
        labels = labels[inside]
        dist = part["distance"].to_numpy(dtype=np.float32)[inside]
        gidx = part["_gidx"].to_numpy()[inside]
        values = (part[[f"_rank{i}" for i in range(len(step.keep_by))]].to_numpy(dtype=np.float64)[inside]
                  if step.keep_by else None)  # fmt: skip
        device = step._resolved_device()
        order = np.argsort(labels, kind="stable")  # within a cluster: global order
        starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
        bounds = list(zip(starts, np.r_[starts[1:], len(order)], strict=True))
        ranked = [step._rank(order[begin:end], dist, values, first=int(gidx[order[begin]])) for begin, end in bounds]
        # every cluster's embeddings in rank order, one cluster after the other: one gather from the shuffled rows
        x = rows_matrix(part["embedding"], inside[np.concatenate(ranked)])
        for (begin, end), members in zip(bounds, ranked, strict=True):
            found = step._cluster_result(x[begin:end], device)
            at = inside[members]
            similarity[at] = np.where(np.isinf(found.best), np.nan, found.best)
            of[at] = step._partners(found, at, -1)
            for i, e in enumerate(step.eps):
                flags[i][at] = found.flags[e]
    out["similarity"] = similarity
    out["of"] = take_text(part["key"], of)
    for i, flag in enumerate(flags):
        out[f"flag{i}"] = flag
    return out


def _output_columns(found: pd.DataFrame, shard: int, step: SemanticDeduplicator, backend: str) -> Any:
    """The step's columns for one shard's rows (in row order), in the dataset's backend."""
    cluster = found["cluster"].to_numpy(dtype=np.int64)
    unusable = cluster == _UNUSABLE
    values: dict[str, Any] = {
        "cluster": pa.array(cluster, pa.int64(), mask=cluster < 0),
        "distance_to_centroid": pa.array(found["distance"].to_numpy(dtype=np.float32)),
        "max_similarity": pa.array(found["similarity"].to_numpy(dtype=np.float32)),
        "duplicate_of": arrow_column(found["of"]).combine_chunks().cast(pa.string()),
        "is_duplicate": pa.array(found["flag0"].to_numpy(dtype=bool)),
    }
    if len(step.eps) > 1:
        values.update({f"is_duplicate_eps{e}": pa.array(found[f"flag{i}"].to_numpy(dtype=bool))
                       for i, e in enumerate(step.eps)})  # fmt: skip
    values[step.error_column] = pa.array(np.where(unusable, NOT_FINITE, None), pa.string())
    types = step.output_columns()
    return from_arrow(pa.table(values, schema=pa.schema(list(types.items()))), backend)


def _save_npz(path: str, **arrays: Any) -> None:
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
