from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import seeded_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from imgcurate.dedup import ExactDuplicates, SemanticDeduplicator
from imgcurate.dedup.semantic import _assign, in_cluster_duplicates


def _planted(n=300, d=32, copies=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sources = rng.choice(n, copies, replace=False)
    dups = x[sources] + 0.001 * rng.standard_normal((copies, d)).astype(np.float32)
    return np.vstack([x, dups]), sources, np.arange(n, n + copies)


@pytest.mark.parametrize("keep", ["hard", "easy", "random"])
@pytest.mark.parametrize("mode", ["greedy", "connected"])
def test_exactly_the_planted_pairs_are_found(keep, mode):
    x, sources, copies = _planted()
    found = SemanticDeduplicator(n_clusters=8, eps=0.01, which_to_keep=keep, mode=mode).find(x)
    flagged = set(np.nonzero(found["is_duplicate_0.01"])[0])
    assert len(flagged) == len(copies)
    for s, c in zip(sources, copies, strict=True):
        assert (s in flagged) != (c in flagged)  # one of each pair, never both, never neither
        dropped, kept = (s, c) if s in flagged else (c, s)
        assert found["duplicate_of"][dropped] == kept


def _brute(x, labels, dist, keep):
    n = len(x)
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        members = members[np.argsort(-dist[members] if keep == "hard" else dist[members], kind="stable")]
        for r, j in enumerate(members):
            for i in members[:r]:
                s = float(x[i] @ x[j])
                if s > best[j]:
                    best[j], arg[j] = s, i
    return best, arg


@settings(max_examples=30, deadline=None)
@given(st.integers(5, 60), st.integers(2, 8), st.integers(1, 4), st.sampled_from(["hard", "easy"]), st.integers(0, 99))
def test_agrees_with_brute_force(n, d, k, keep, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[rng.integers(0, n, 3)] = x[0]  # some exact repeats, the hard case for tie-breaking
    k = min(k, n)
    dedup = SemanticDeduplicator(n_clusters=k, which_to_keep=keep, block_size=7, eps=[0.01, 0.2])
    found = dedup.find(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    best, arg = _brute(unit, found["cluster"], found["distance"], keep)
    np.testing.assert_allclose(found["max_similarity"], best, atol=1e-5)
    ties = np.isclose(found["max_similarity"], best, atol=1e-5)
    same = found["duplicate_of"] == arg
    # where two earlier samples tie for the maximum, either id is right
    tied = [abs(float(unit[found["duplicate_of"][j]] @ unit[j]) - best[j]) < 1e-5 for j in np.nonzero(~same)[0]]
    assert ties.all() and all(tied)
    assert (found["is_duplicate_0.01"] == (best >= 0.99)).all()

    connected = SemanticDeduplicator(n_clusters=k, which_to_keep=keep, block_size=7, eps=[0.01, 0.2], mode="connected")
    grouped = connected.find(x)
    for eps in (0.01, 0.2):
        kept = _brute_groups(unit, grouped["cluster"], grouped["distance"], keep, 1 - eps)
        assert (grouped[f"is_duplicate_{eps}"] == ~kept).all()
    # a sample kept by the first eps still names its most similar earlier sample, as in greedy mode
    kept = ~grouped["is_duplicate_0.01"]
    assert (grouped["duplicate_of"][kept] == found["duplicate_of"][kept]).all()


def _brute_groups(x, labels, dist, keep, threshold):
    """Keeps the first-ranked sample of each group linked by similarity >= threshold, by a plain graph search."""
    kept = np.zeros(len(x), dtype=bool)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        members = list(members[np.argsort(-dist[members] if keep == "hard" else dist[members], kind="stable")])
        seen = set()
        for start in members:  # rank order: the first unseen sample starts (and is kept for) a new group
            if start in seen:
                continue
            kept[start] = True
            stack = [start]
            seen.add(start)
            while stack:
                i = stack.pop()
                for j in members:
                    if j not in seen and float(x[i] @ x[j]) >= threshold:
                        seen.add(j)
                        stack.append(j)
    return kept


def test_blockwise_matches_one_block():
    x = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32)
    a = in_cluster_duplicates(x, block_size=7)
    b = in_cluster_duplicates(x, block_size=1000)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


def test_greedy_vs_connected_on_a_chain():
    # a ~ b ~ c but a !~ c: greedy drops b and c, connected keeps only a and points both at it
    a = np.array([1.0, 0.0], np.float32)
    b = np.array([np.cos(0.1), np.sin(0.1)], np.float32)
    c = np.array([np.cos(0.2), np.sin(0.2)], np.float32)
    x = np.vstack([a, b, c])
    eps = 1 - np.cos(0.15)  # a~b and b~c similar enough, a~c not
    labels = np.zeros(3, dtype=int)
    dist = np.array([0.3, 0.2, 0.1], np.float32)  # "hard": a, b, c in that order
    dd = SemanticDeduplicator(n_clusters=1, eps=eps, mode="greedy")
    ranked = dd._rank(np.arange(3), dist)
    assert ranked.tolist() == [0, 1, 2]
    sims, arg, pairs = in_cluster_duplicates(x, threshold=1 - eps)
    assert (sims >= 1 - eps).tolist() == [False, True, True]
    assert _all_pairs_groups(3, pairs.earlier, pairs.later).tolist() == [0, 0, 0]
    found = SemanticDeduplicator(n_clusters=1, eps=eps, mode="connected")._cluster_result(x, "cpu")
    assert found.representative.tolist() == [0, 0, 0] and found.flags[eps].tolist() == [False, True, True]
    assert labels.sum() == 0


def _all_pairs_groups(m, earlier, later):
    """Reference: each row's group's first row, from every linked pair at once."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(earlier), dtype=np.int8), (earlier, later)), shape=(m, m))
    _, group = connected_components(graph, directed=False)
    _, first = np.unique(group, return_index=True)
    return first[group]


@pytest.mark.parametrize("block_size", [16, 64, 4096])
def test_connected_groups_merged_tile_by_tile_equal_all_pairs(block_size):
    """Groups merged tile by tile (one tile's links held at a time) equal the components of every linked pair, for
    each eps, with chains that cross tiles."""
    from imgcurate.dedup.semantic import _Groups, _scan

    rng = np.random.default_rng(3)
    base = rng.standard_normal((60, 24)).astype(np.float32)
    rows = [base[rng.integers(0, 60)] + rng.normal(0, s, 24).astype(np.float32)
            for s in rng.choice([0.01, 0.05, 0.2, 1.0], 300)]  # fmt: skip
    x = np.stack(rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    thresholds = [0.999, 0.99, 0.95]
    groups = _Groups(len(x), thresholds)
    best, _ = _scan(x, block_size, groups.add)
    for i, t in enumerate(thresholds):
        _, _, pairs = in_cluster_duplicates(x, threshold=t, block_size=block_size)
        expected = _all_pairs_groups(len(x), pairs.earlier, pairs.later)
        np.testing.assert_array_equal(groups.first[i], expected)
        assert (expected != np.arange(len(x))).sum() > 20  # linked rows exist at every threshold
    np.testing.assert_array_equal(best, in_cluster_duplicates(x, block_size=block_size)[0])


def test_connected_mode_memory_is_one_tile_not_every_pair():
    """4,000 copies of one embedding link 8 million pairs (160 MB as index and similarity arrays); the connected
    rule holds one 256 x 256 tile's links at a time."""
    import tracemalloc

    x = np.tile(np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32), (4000, 1))
    step = SemanticDeduplicator(n_clusters=1, eps=[0.01, 0.001], mode="connected", block_size=256)
    tracemalloc.start()
    try:
        found = step._cluster_result(x, "cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (found.representative == 0).all() and found.flags[0.01].sum() == 3999
    assert peak < 20 * 2**20, peak


def test_cache_dir_resumes(tmp_path, monkeypatch):
    x, _, _ = _planted(seed=2)
    dd = SemanticDeduplicator(n_clusters=4, cache_dir=str(tmp_path / "cache"))
    first = dd.find(x)
    assert (tmp_path / "cache" / "kmeans.npz").exists()
    import imgcurate.dedup.semantic as sem

    def boom(*a, **k):
        raise AssertionError("recomputed instead of resuming")

    monkeypatch.setattr(sem, "kmeans", boom)
    monkeypatch.setattr(sem, "_scan", boom)
    again = dd.find(x)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])


def test_clear_errors():
    with pytest.raises(ValueError, match="fewer than n_clusters"):
        SemanticDeduplicator(n_clusters=10).find(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="which_to_keep must be one of hard, easy, random, or a list of metadata"):
        SemanticDeduplicator(n_clusters=2, which_to_keep="best")
    for kwargs, message in (
        ({"n_clusters": 2.5}, r"n_clusters must be an integer of at least 1, got 2\.5"),
        ({"n_clusters": True}, r"n_clusters must be an integer of at least 1, got True"),
        ({"n_clusters": "3"}, r"n_clusters must be an integer of at least 1, got '3'"),
        ({"n_clusters": 2, "eps": "0.01"}, r"eps: expected a number in \[0, 2\) or a list of them, got '0\.01'"),
        ({"n_clusters": 2, "eps": None}, r"eps: expected a number in \[0, 2\) or a list of them, got None"),
        ({"n_clusters": 2, "eps": [0.01, 0.01]}, r"eps gives 0\.01 twice"),
        ({"n_clusters": 2, "tol": float("nan")}, r"tol must be a number \(a negative one never stops early\), got nan"),
        ({"n_clusters": 2, "error_column": "cluster"}, r"error_column: 'cluster' is one of the step's other output"),
    ):
        with pytest.raises(ValueError, match=f"^{message}"):
            SemanticDeduplicator(**kwargs)
    # NumPy's numbers are numbers
    step = SemanticDeduplicator(n_clusters=np.int64(2), eps=np.float32(0.5), fit_sample=np.int64(100))
    assert (step.n_clusters, step.eps, step.fit_sample) == (2, [0.5], 100) and type(step.fit_sample) is int
    assert SemanticDeduplicator(n_clusters=2, eps=np.array([0.1, 0.2])).eps == [0.1, 0.2]


def test_a_step_that_would_write_the_key_column_is_refused(sample_ds):
    from imgcurate.dedup import ExactDuplicates
    from imgcurate.steps.base import ColumnError

    for step in (SemanticDeduplicator(n_clusters=2, error_column="key"), ExactDuplicates(hash_column="key")):
        with pytest.raises(ColumnError, match=r"writes the key column 'key': give its output another name"):
            step(sample_ds)


def test_text_of_several_python_types_keeps_its_nulls():
    from imgcurate.steps.grouped import text_column

    values = pd.Series([7, "a7", pd.NA, None, float("nan")], dtype=object)
    assert (
        text_column(values).tolist()[:2] == ["7", "a7"]
        and text_column(values).isna().tolist() == [False] * 2 + [True] * 3
    )


def test_ids_of_several_python_types_name_the_kept_copy_as_text():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x[20:] = x[:20]  # every row of the second shard copies one of the first
    ds = _embedded([x[:20], x[20:]])
    df = ds.metadata
    ids = df["key"].map_partitions(lambda s, partition_info=None: pd.Series(
        [i if i % 2 else f"s{i}" for i in range(partition_info["number"] * 20, partition_info["number"] * 20 + len(s))],
        index=s.index, dtype=object), meta=("key", object))  # fmt: skip
    ds = ds.with_metadata(df.assign(key=ids))
    out = SemanticDeduplicator(n_clusters=2, eps=1e-3)(ds).metadata.compute()
    assert out["is_duplicate"].tolist() == [False] * 20 + [True] * 20
    assert out["duplicate_of"].tolist()[20:] == [str(i) if i % 2 else f"s{i}" for i in range(20)]


def test_more_clusters_than_input_rows_fail_when_the_step_is_applied_before_any_embedding(sample_ds, monkeypatch):
    """The input's row count comes from the parquet footers at open, so the step refuses n_clusters above it at once,
    not after the embedding pass that its input needs."""
    from imgcurate.embedders import TimmImageEmbedder
    from imgcurate.embedders.base import ImageEmbedder

    rows = len(sample_ds.metadata.compute())
    assert sample_ds.input_rows == rows
    assert sample_ds.with_metadata(sample_ds.metadata).input_rows == rows  # the input's: kept as columns are added

    def never(*args, **kwargs):
        raise AssertionError("an image was embedded before the check")

    monkeypatch.setattr(ImageEmbedder, "embed_shard", never)
    embedded = TimmImageEmbedder("test_resnet", batch_size=8)(sample_ds)
    with pytest.raises(ValueError, match=f"the input has {rows} rows, fewer than n_clusters={rows + 1}"):
        SemanticDeduplicator(n_clusters=rows + 1)(embedded)
    with pytest.raises(ValueError, match=f"the input has {rows} rows, fewer than n_clusters={rows + 1}"):
        SemanticDeduplicator(n_clusters=rows + 1).fit(embedded)  # the fit-first path, before its count pass
    SemanticDeduplicator(n_clusters=rows)(embedded)  # enough rows: lazily accepted, nothing computed


def test_exact_duplicates_on_the_sample(sample_ds):
    df = ExactDuplicates()(sample_ds).metadata.compute()
    marked = df[df.exact_duplicate]
    assert sorted(marked["source"]) == ["chelsea", "hubble_deep_field"]
    assert (marked["variant"] == "exact_copy").all() or len(marked) == 2
    firsts = df.set_index("key").loc[marked["exact_duplicate_of"]]
    assert (firsts["source"].to_numpy() == marked["source"].to_numpy()).all()
    assert df["image_sha256"].notna().all()


def test_exact_duplicates_over_more_shards_than_one_task_merges(sample_ds, tmp_path):
    """One sample per shard: the hashing merges shards in groups before its shuffle; the answers are the same."""
    from imgcurate import ImageTextPairDataset
    from imgcurate.steps.grouped import MERGE
    from imgcurate.testing import make_sample_shards

    make_sample_shards(str(tmp_path / "one-each"), samples_per_shard=1)
    many = ImageTextPairDataset.from_webdataset(str(tmp_path / "one-each"))
    assert many.num_shards > 2 * MERGE
    want = ExactDuplicates()(sample_ds).metadata.compute()
    got = ExactDuplicates()(many).metadata.compute()  # the same samples in the same order, under other keys
    assert got["image_sha256"].tolist() == want["image_sha256"].tolist()
    assert got["exact_duplicate"].tolist() == want["exact_duplicate"].tolist() and want["exact_duplicate"].any()

    def positions_of(df):
        where = {key: i for i, key in enumerate(df["key"])}
        return [where.get(key) for key in df["exact_duplicate_of"]]

    assert positions_of(got) == positions_of(want)


def test_semantic_on_a_dataset_with_a_null_embedding(sample_ds):
    df = sample_ds.metadata

    def emb(part):
        rng = np.random.default_rng(len(part))
        vecs = [rng.standard_normal(16).astype(np.float32) for _ in range(len(part))]
        if len(part) > 3:
            vecs[3] = vecs[1] + 1e-4
            vecs[2] = None
        return part.assign(image_embedding=vecs)

    ds = sample_ds.with_metadata(df.map_partitions(emb, meta={**df.dtypes.to_dict(), "image_embedding": object}))
    out = SemanticDeduplicator(n_clusters=3)(ds)
    got = out.metadata.compute().reset_index(drop=True)
    assert got["cluster"].isna().sum() == 4 and not got.loc[got.cluster.isna(), "is_duplicate"].any()
    assert got["is_duplicate"].sum() >= 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_embedding_with_nan_or_inf_is_an_error_row_and_the_others_are_as_if_it_were_null(sample_ds, bad):
    """A non-finite value in one embedding (a model overflow) used to crash faiss's KMeans or, with centroids
    given, win every comparison in its cluster. Now that row is skipped like a null embedding, with its reason, and
    every other row gets what it gets when that embedding is null; ``find`` refuses such an array."""
    from imgcurate.dedup.semantic import NOT_FINITE
    from imgcurate.filters import SampleFilter

    df = sample_ds.metadata

    def emb(part, partition_info=None, value=None):
        rng = np.random.default_rng(partition_info["number"])
        x = rng.standard_normal((len(part), 16)).astype(np.float32)
        x[1::3] = x[0::3][: len(x[1::3])] + 1e-4  # near copies to find
        vecs = list(x)
        if partition_info["number"] == 0:  # the first row: every later row's global index depends on its count
            vecs[0] = None if value is None else np.where(np.arange(16) == 5, value, vecs[0]).astype(np.float32)
        return part.assign(image_embedding=vecs)

    meta = {**df.dtypes.to_dict(), "image_embedding": object}
    broken = sample_ds.with_metadata(df.map_partitions(emb, value=bad, meta=meta))
    null = sample_ds.with_metadata(df.map_partitions(emb, meta=meta))
    # 12 clusters for 36 rows: some start after the first shard, where a miscounted row would shift their seeds
    step = SemanticDeduplicator(n_clusters=12, eps=0.01, which_to_keep="random")
    got = step(broken).metadata.compute().reset_index(drop=True)
    want = step(null).metadata.compute().reset_index(drop=True)
    row = got.index[got["key"] == null.metadata.partitions[0].compute()["key"].iloc[0]][0]
    assert got.loc[row, "semantic_dedup_error"] == NOT_FINITE and pd.isna(got.loc[row, "cluster"])
    assert not got.loc[row, "is_duplicate"] and got["semantic_dedup_error"].notna().sum() == 1
    columns = ["cluster", "distance_to_centroid", "max_similarity", "duplicate_of", "is_duplicate"]
    pd.testing.assert_frame_equal(got[columns], want[columns])
    assert want["is_duplicate"].sum() > 0
    kept = SampleFilter(drop_duplicates=["is_duplicate"])(step(broken)).metadata.compute()
    assert kept.loc[kept["semantic_dedup_error"].notna(), "drop_reason"].tolist() == ["semantic_dedup_error set"]
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    x[7, 3] = bad
    with pytest.raises(ValueError, match=r"^x has 1 rows with NaN or infinite values \(the first is row 7\)"):
        step.find(x)


def test_ranking_by_a_column_that_is_not_numbers_is_refused_before_work(sample_ds):
    from imgcurate.steps.base import ColumnError

    with pytest.raises(ColumnError, match="which_to_keep ranks by 'variant', which holds"):
        step = SemanticDeduplicator(n_clusters=3, which_to_keep=["variant"])
        step.check(_with_embeddings(sample_ds).metadata._meta, "key")  # the embedding column's check comes first


def _with_embeddings(ds, dims=(16,), null_rows=(2,)):
    """Random embeddings (one length per partition, cycling through ``dims``), null at ``null_rows`` of each."""
    df = ds.metadata

    def emb(part, partition_info=None):
        i = partition_info["number"]
        rng = np.random.default_rng(i)
        vecs = [rng.standard_normal(dims[i % len(dims)]).astype(np.float32) for _ in range(len(part))]
        for r in null_rows:
            if r < len(vecs):
                vecs[r] = None
        return part.assign(image_embedding=vecs)

    return ds.with_metadata(df.map_partitions(emb, meta={**df.dtypes.to_dict(), "image_embedding": object}))


def test_embeddings_of_different_lengths_name_the_shard(sample_ds):
    from imgcurate.errors import ShardError

    ds = _with_embeddings(sample_ds, dims=(16, 8), null_rows=())
    with pytest.raises(ShardError, match=r"00001\.tar: column 'image_embedding' holds 8-d embeddings"):
        SemanticDeduplicator(n_clusters=2)(ds).metadata.compute()


def test_kmeans_backend_is_chosen_in_one_table_and_checked_when_built(sample_ds):
    import importlib.util

    from imgcurate.errors import MissingDependencyError

    with pytest.raises(ValueError, match="choose one of faiss, sklearn, cuml, cuml-dask"):
        SemanticDeduplicator(n_clusters=2, kmeans_backend="kmeans++")
    if importlib.util.find_spec("cuml") is None:
        with pytest.raises(MissingDependencyError, match=r"imgcurate\[gpu\]"):
            SemanticDeduplicator(n_clusters=2, kmeans_backend="cuml-dask")
    ds = _with_embeddings(sample_ds, null_rows=())
    for asked, used in ((None, "faiss"), ("sklearn", "sklearn")):
        dedup = SemanticDeduplicator(n_clusters=3, kmeans_backend=asked)
        assert dedup.kmeans_backend_for(ds.metadata._meta) == used
        assert dedup(ds).metadata["cluster"].compute().between(0, 2).all()


class _DaskKMeansStandIn:
    """Follows cuML's documented ``cuml.dask.cluster.KMeans``: keyword parameters, ``fit`` on a Dask array with
    known chunks, ``cluster_centers_`` on the device (CuPy: ``.get()`` copies to the host), ``n_iter_``."""

    fitted: list = []

    def __init__(self, *, n_clusters, max_iter, tol, random_state, n_init="auto", max_samples_per_batch=1 << 15,
                 client=None):  # fmt: skip
        assert n_init == 1 and 1 <= max_samples_per_batch * n_clusters <= max(1 << 24, n_clusters)
        self.params = dict(n_clusters=n_clusters, max_iter=max_iter, tol=tol, random_state=random_state)

    def fit(self, x):
        import dask.array as da
        from sklearn.cluster import KMeans

        assert isinstance(x, da.Array) and not any(np.isnan(c) for c in x.chunks[0])
        p = self.params
        km = KMeans(p["n_clusters"], max_iter=p["max_iter"], tol=p["tol"], random_state=p["random_state"], n_init=1)
        km.fit(x.compute())
        self.fitted.append(x.compute())
        self.cluster_centers_ = type("OnDevice", (), {"get": lambda _: km.cluster_centers_})()
        self.n_iter_ = km.n_iter_
        return self


def test_cuml_dask_glue_with_a_stand_in_for_cuml(sample_ds, monkeypatch):
    """The cuml-dask code path on CPU: the worker-side array, the client check, centroids copied back. cuML itself
    runs only in the GPU test below."""
    from distributed import Client, LocalCluster

    _cuml_stand_in(monkeypatch)
    ds = _with_embeddings(sample_ds)
    dedup = SemanticDeduplicator(n_clusters=3, kmeans_backend="cuml-dask")
    with pytest.raises(RuntimeError, match="distributed client"):
        dedup(ds)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster):
            got = dedup(ds).metadata.compute()
    assert dedup.stats_["kmeans_iterations"] >= 1 and dedup.stats_["kmeans_backend"] == "cuml-dask"
    fitted = _DaskKMeansStandIn.fitted[-1]  # the whole sample (36 rows < 256 per cluster), normalised, in order
    assert len(fitted) == got.cluster.notna().sum() and np.allclose(np.linalg.norm(fitted, axis=1), 1, atol=1e-6)
    reference = SemanticDeduplicator(n_clusters=3, kmeans_backend="sklearn")
    expected = reference(ds).metadata.compute()
    assert got.cluster.equals(expected.cluster)  # same seed, same rows: the same clustering as sklearn on the host


def _cuml_stand_in(monkeypatch):
    import importlib.machinery
    import sys
    import types

    for name in ("cuml", "cuml.dask", "cuml.dask.cluster", "raft_dask", "dask_cudf"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["cuml.dask.cluster"].KMeans = _DaskKMeansStandIn
    _DaskKMeansStandIn.fitted = []


def test_cuml_dask_computes_its_input_once_and_names_an_empty_sample(sample_ds, monkeypatch):
    """cuML's Dask fit runs from the client before the rest of the graph; the input (an embedder's lazy output, say)
    is still computed once per shard, not once for the fit and again for the assignment."""
    from distributed import Client, LocalCluster

    _cuml_stand_in(monkeypatch)
    ds = _with_embeddings(sample_ds)
    computed = []

    def counted(part, partition_info=None):
        computed.append(partition_info["number"])
        return part

    df = ds.metadata
    ds = ds.with_metadata(df.map_partitions(counted, meta=df._meta))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster):
            got = SemanticDeduplicator(n_clusters=3, kmeans_backend="cuml-dask").added(ds).compute()
            assert sorted(computed) == list(range(ds.num_shards))
            assert got.cluster.notna().sum() == len(got) - ds.num_shards  # row 2 of each shard has no embedding
            nothing = _with_embeddings(sample_ds, null_rows=range(100))
            with pytest.raises(ValueError, match="0 samples with embeddings is fewer than n_clusters=3"):
                SemanticDeduplicator(n_clusters=3, kmeans_backend="cuml-dask")(nothing).metadata.compute()


def test_similarity_device_is_checked_when_built_and_reported():
    import importlib.util

    from imgcurate.errors import MissingDependencyError

    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        SemanticDeduplicator(n_clusters=2, device="gpu0")
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(MissingDependencyError, match="cupy"):
            SemanticDeduplicator(n_clusters=2, device="cuda")
    x, _, _ = _planted(n=200, d=8)
    dedup = SemanticDeduplicator(n_clusters=4, device="cpu")
    dedup.find(x)
    assert dedup.stats_["device"] == "cpu"


@pytest.mark.gpu("cupy")
@pytest.mark.parametrize("mode", ["greedy", "connected"])
def test_in_cluster_tiles_on_the_gpu_match_the_cpu(mode):
    x, sources, copies = _planted(n=3000, d=64, copies=200)
    cpu = SemanticDeduplicator(n_clusters=4, mode=mode, block_size=512, device="cpu", kmeans_backend="sklearn")
    gpu = SemanticDeduplicator(n_clusters=4, mode=mode, block_size=512, device="cuda", kmeans_backend="sklearn")
    a, b = cpu.find(x), gpu.find(x)
    assert gpu.stats_["device"] == "cuda"
    np.testing.assert_array_equal(a["cluster"], b["cluster"])
    np.testing.assert_allclose(a["max_similarity"], b["max_similarity"], atol=1e-5)
    np.testing.assert_array_equal(a["is_duplicate_0.01"], b["is_duplicate_0.01"])
    assert b["is_duplicate_0.01"].sum() == len(copies)


@pytest.mark.gpu("cudf", "dask_cudf", "cuml", "raft_dask", "dask_cuda")
def test_cuml_dask_kmeans_on_a_cudf_dataset_finds_the_copies(sample_dir, tmp_path):
    """The GPU backend end to end: cuDF frame, embeddings on the GPU, cuML's Dask KMeans on a LocalCUDACluster.
    Same weights and eps as the CPU test above."""
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    from imgcurate import ImageTextPairDataset
    from imgcurate.embedders import TimmImageEmbedder

    def full_float32():  # TF32 convolutions would blur the 1e-4 margin between copies and other photos
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    weights = seeded_checkpoint(tmp_path, "test_resnet")
    with LocalCUDACluster(n_workers=1, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(full_float32)
        ds = ImageTextPairDataset.from_webdataset(str(sample_dir), backend="cudf")
        ds = TimmImageEmbedder("test_resnet", checkpoint_path=weights, device="cuda", autocast=False)(ds)
        dedup = SemanticDeduplicator(n_clusters=4, eps=1e-4)
        out = dedup(ds)
        df = out.metadata.compute().to_pandas().reset_index(drop=True)
    assert dedup.stats_["kmeans_backend"] == "cuml-dask"
    _assert_one_survivor_per_photo(df)


def test_rows_and_text_travel_as_arrow_columns_through_the_shuffles():
    """Embeddings and ids cross the shuffles as arrow columns (no Python object per row) and come back as they were,
    whatever chunks the shuffle leaves them in; rows without an embedding are empty entries, missing ids nulls."""
    import pandas as pd
    import pyarrow as pa
    from distributed.shuffle._arrow import convert_shards

    from imgcurate.steps.grouped import rows_column, rows_matrix, take_text, text_column

    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    valid = np.array([True, False, True, True, False, True, True])
    frame = pd.DataFrame({"embedding": rows_column(x, valid), "key": text_column(pa.array(list("abcdefg"))),
                          "_partitions": np.arange(7) % 2})  # fmt: skip
    assert frame["embedding"].dtype == pd.ArrowDtype(pa.large_binary())
    # p2p's own way back from arrow, from two pieces: the columns keep their types
    table = pa.Table.from_pandas(frame, preserve_index=True)
    table = table.append_column("__input_partition_id__", pa.array(np.zeros(7, np.uint32)))
    back = convert_shards([table.slice(0, 3), table.slice(3)], frame.iloc[:0], "_partitions", False)
    assert back.dtypes.to_dict() == frame.dtypes.to_dict()
    np.testing.assert_array_equal(rows_matrix(back["embedding"], np.array([6, 0, 3])), x[[4, 0, 2]])
    assert rows_matrix(back["embedding"], np.array([], dtype=np.int64)).shape == (0, 0)
    assert take_text(back["key"], np.array([2, -1, 0])).tolist() == ["c", pd.NA, "a"]


def test_rows_matrix_gathers_from_the_pieces_a_shuffle_concatenates():
    """A cluster's rows come from many shards' pieces (a chunked column, some chunks sliced, rows without an
    embedding between them): the gather returns exactly the requested rows, in the requested order."""
    import pandas as pd

    from imgcurate.steps.grouped import rows_column, rows_matrix

    rng = np.random.default_rng(3)
    pieces, matrices = [], []
    for n in [0, 5, 40, 1, 17]:
        valid = rng.random(n) < 0.7
        x = rng.standard_normal((int(valid.sum()), 8)).astype(np.float32)
        full = np.zeros((n, 8), dtype=np.float32)
        full[valid] = x
        pieces.append(pd.DataFrame({"embedding": rows_column(x, valid), "valid": valid}).iloc[n // 3 :])
        matrices.append(full[n // 3 :])
    column = pd.concat(pieces, ignore_index=True)
    expected = np.concatenate(matrices)
    rows = rng.permutation(np.flatnonzero(column["valid"].to_numpy()))
    np.testing.assert_array_equal(rows_matrix(column["embedding"], rows), expected[rows])
    np.testing.assert_array_equal(rows_matrix(column["embedding"], rows[:1]), expected[rows[:1]])
    empty = np.flatnonzero(~column["valid"].to_numpy())[0]  # a row without an embedding is not a row of zeros
    with pytest.raises(ValueError, match="every requested row must hold an embedding"):
        rows_matrix(column["embedding"], np.array([rows[0], empty]))
    with pytest.raises(IndexError, match="outside the column"):
        rows_matrix(column["embedding"], np.array([len(column)]))


def test_assign_nearest_centroid():
    x = np.eye(3, dtype=np.float32)
    labels, dist = _assign(x, np.eye(3, dtype=np.float32) * 2)
    assert labels.tolist() == [0, 1, 2] and np.allclose(dist, 0)


def test_assign_blocks_are_bounded_by_values_not_rows(monkeypatch):
    """Each block's similarity matrix holds a bounded number of values whatever the cluster count (but at least 256
    rows), and the blocks together give the answer of one full product."""
    import imgcurate.dedup.semantic as semantic

    class Rows(np.ndarray):  # records the row count of every slice _assign takes
        taken: list[int] = []

        def __getitem__(self, item):
            out = super().__getitem__(item)
            if isinstance(item, slice):
                Rows.taken.append(len(out))
            return out

    rng = np.random.default_rng(0)
    x = semantic._normalize(rng.standard_normal((1000, 16)).astype(np.float32))
    centroids = rng.standard_normal((40, 16)).astype(np.float32)
    sims = x @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T
    for values, rows in [(300 * 40, 300), (10 * 40, 256)]:  # the floor of 256 rows per block
        monkeypatch.setattr(semantic, "_ASSIGN_BLOCK_VALUES", values)
        Rows.taken = []
        labels, dist = semantic._assign(x.view(Rows), centroids)
        assert Rows.taken == [rows] * (1000 // rows) + ([1000 % rows] if 1000 % rows else [])
        np.testing.assert_array_equal(np.asarray(labels), sims.argmax(axis=1))
        np.testing.assert_allclose(np.asarray(dist), 1 - sims.max(axis=1), atol=1e-6)


@pytest.mark.parametrize("mode", ["greedy", "connected"])
def test_end_to_end_on_real_photos_finds_the_reencoded_and_resized_copies(sample_ds, tmp_path, mode):
    from imgcurate.embedders import TimmImageEmbedder

    weights = seeded_checkpoint(tmp_path, "test_resnet")  # the GPU test below uses the same weights
    ds = TimmImageEmbedder("test_resnet", checkpoint_path=weights, batch_size=8)(sample_ds)
    # random weights squeeze all similarities towards 1; copies of one photo still sit above 0.9999, others below
    out = SemanticDeduplicator(n_clusters=4, eps=1e-4, mode=mode)(ds)
    df = out.metadata.compute().reset_index(drop=True)
    _assert_one_survivor_per_photo(df)


def _assert_one_survivor_per_photo(df):
    by_key = df.set_index("key")
    for source, group in df.groupby("source"):
        kept = group[~group.is_duplicate]
        assert len(kept) == 1, f"{source}: expected one survivor, got {kept.variant.tolist()}"
        dropped = group[group.is_duplicate]
        assert len(dropped) == len(group) - 1
        # every copy points at a sample of the same photo
        assert (by_key.loc[dropped.duplicate_of, "source"] == source).all()
    assert df.is_duplicate.sum() == len(df) - df.source.nunique()


def test_kmeans_stops_early_at_tol_and_reports_its_phases():
    x, _, _ = _planted(n=2000, d=16, seed=3)
    early = SemanticDeduplicator(n_clusters=8, max_iter=100, tol=1e-2)
    early.find(x)
    assert 5 <= early.stats_["kmeans_iterations"] < 100
    assert early.stats_["largest_cluster"] >= len(x) // 8
    assert all(early.stats_[k] >= 0 for k in ("kmeans_s", "assign_s", "clusters_s"))
    never = SemanticDeduplicator(n_clusters=8, max_iter=12, tol=-1.0)  # a negative tol never stops early
    never.find(x)
    assert never.stats_["kmeans_iterations"] == 12


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_a_pipeline_embeds_each_shard_once(sample_ds, tmp_path, embedded_shards, scheduler):
    """Dedup steps read the whole frame before the export reads it again: the embedder must not run twice."""
    import contextlib

    from imgcurate.embedders import TimmImageEmbedder

    embedded = embedded_shards
    with contextlib.ExitStack() as stack:
        if scheduler == "distributed":
            from distributed import Client, LocalCluster

            cluster = stack.enter_context(
                LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
            )
            stack.enter_context(Client(cluster))
        ds = TimmImageEmbedder("test_resnet", batch_size=8)(sample_ds)
        ds = ExactDuplicates()(ds)
        ds = SemanticDeduplicator(n_clusters=4, eps=1e-4)(ds)
        out = ds.to_webdataset(str(tmp_path / "out"), filter_column="is_duplicate", overwrite=True)
        assert sorted(embedded) == sorted(sample_ds.tar_files)
        exported = out.metadata.compute()
        flagged = ds.metadata.compute()  # persisted on the cluster's workers, so read it while they are up
    assert len(exported) == int(flagged.is_duplicate.sum()) > 0
    assert exported.image_embedding.map(len).eq(flagged.image_embedding.map(len).iloc[0]).all()


_FIT_THREADS_PROBE = """
import sys
import numpy as np
import pandas as pd
from imgcurate.dedup import semantic
assert "faiss" not in sys.modules  # as in a fresh worker process: faiss is imported by the fit itself
seen = []
def recording(self, x, backend):
    import faiss
    seen.append(faiss.omp_get_max_threads())
    return np.asarray(x[: self.n_clusters]), 0
semantic.SemanticDeduplicator._kmeans = recording
x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
sample = pd.DataFrame({"embedding": [x.tobytes()], "n": [40], "dim": [8], "tar": ["s.tar"], "usable": [40]})
semantic._fit_sample(sample, semantic.SemanticDeduplicator(n_clusters=4), "faiss")
print(seen[0])
"""


def test_the_kmeans_fit_uses_every_core_in_a_worker_that_limits_openmp_to_one_thread():
    """Distributed's nanny starts workers with OMP_NUM_THREADS=1; the fit is a barrier, so it takes all the cores:
    faiss's OpenMP runtime too, which is loaded only when the fit imports faiss (threadpoolctl changes only the
    pools of libraries already loaded)."""
    import os
    import subprocess
    import sys

    from imgcurate.cpu import cpu_count

    if cpu_count() < 2:
        pytest.skip("needs 2 or more cores to tell one thread from all")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _FIT_THREADS_PROBE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == cpu_count()


def _embedded(shards, *, score=None):
    """A synthetic dataset whose partition ``i`` holds the float32 rows ``shards[i]`` as its embeddings (and
    ``score[i]`` as a column ``score``)."""
    from imgcurate.synthetic import synthetic_dataset

    ds = synthetic_dataset(len(shards), rows_per_shard=max(len(s) for s in shards), dim=shards[0].shape[1], seed=2)
    df = ds.metadata

    def put(part, partition_info=None):
        i = partition_info["number"]
        part = part.iloc[: len(shards[i])].copy()
        part["image_embedding"] = pd.Series(list(shards[i]), index=part.index, dtype=object)
        if score is not None:
            part["score"] = score[i]
        return part

    meta = {**df.dtypes.to_dict(), "image_embedding": object, **({"score": "float64"} if score is not None else {})}
    return ds.with_metadata(df.map_partitions(put, meta=meta))


def test_assign_gives_a_row_the_same_distance_whatever_rows_it_is_computed_with():
    """A matrix product's value for a row can change in its last bit with the rows beside it; the hard and easy rules
    order exact copies by the distance, so one shard at a time must give what the whole array gives."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        x = rng.standard_normal((int(rng.integers(20, 400)), 64)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        centroids = rng.standard_normal((2, 64)).astype(np.float32)
        cut = int(rng.integers(1, len(x)))
        labels, dist = _assign(x, centroids)
        for part in (slice(0, cut), slice(cut, None)):
            got_labels, got_dist = _assign(x[part].copy(), centroids)
            np.testing.assert_array_equal(got_labels, labels[part])
            np.testing.assert_array_equal(got_dist, dist[part])  # bit for bit


def test_a_row_whose_nearest_centroids_tie_gets_the_same_one_alone_as_in_the_whole_array():
    """Identical centroids (KMeans gives them for data with repeated points) and ones a rounding apart: the matrix
    product's last bits change with the rows beside a row, which moved a row alone in its shard to the other one."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = rng.standard_normal((7, 16)).astype(np.float32)
    centroids[5] = centroids[3]
    centroids[6] = np.nextafter(centroids[1], np.float32(np.inf))  # one float step from centroid 1
    labels, dist = _assign(x, centroids)
    assert not np.isin(labels, [5]).any()  # an exact tie goes to the lower index
    for i in range(len(x)):
        alone, alone_dist = _assign(x[i : i + 1].copy(), centroids)
        assert (alone[0], alone_dist[0]) == (labels[i], dist[i]), i


def test_copies_in_one_row_shards_meet_in_one_cluster_when_centroids_tie():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x[280:] = x[:20] + 1e-5  # near-copies, in the large shard, of the rows that are each alone in a shard
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = rng.standard_normal((7, 16)).astype(np.float32)
    centroids[5] = centroids[3]
    ds = _embedded([x[i : i + 1] for i in range(20)] + [x[20:]])
    step = SemanticDeduplicator(n_clusters=7, eps=0.01)
    got = ds.with_columns(step.added(ds, centroids=centroids)).metadata.compute()
    want = step.find(x, centroids=centroids)
    flags = want["is_duplicate_0.01"]
    assert (flags[:20] != flags[280:]).all()  # one of each pair, whichever the keep rule keeps
    np.testing.assert_array_equal(got["cluster"].to_numpy(), want["cluster"])
    np.testing.assert_array_equal(got["is_duplicate"].to_numpy(), want["is_duplicate_0.01"])


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_exact_copies_in_other_shards_keep_the_copy_find_keeps(keep):
    rng = np.random.default_rng(3)
    first = rng.standard_normal((120, 32)).astype(np.float32)
    second = np.concatenate([first[rng.choice(120, 40, replace=False)], rng.standard_normal((5, 32))]).astype(
        np.float32
    )
    ds = _embedded([first, second])
    x = np.concatenate([first, second])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = x[:3].copy()
    step = SemanticDeduplicator(n_clusters=3, eps=1e-3, which_to_keep=keep)
    got = ds.with_columns(step.added(ds, centroids=centroids)).metadata.compute()
    want = step.find(x, centroids=centroids)
    assert want["is_duplicate_0.001"].sum() == 40
    np.testing.assert_array_equal(got["is_duplicate"].to_numpy(), want["is_duplicate_0.001"])
    keys = got["key"].to_numpy(dtype=object)
    assert [None if v is None or v != v else v for v in got["duplicate_of"]] == [
        keys[r] if r >= 0 else None for r in want["duplicate_of"]
    ]


def test_eps_zero_flags_exact_copies():
    """The float32 similarity of a normalised row with its exact copy can come out below 1: eps below that rounding
    counts as it."""
    from imgcurate.dedup.semantic import similarity_rounding

    rng = np.random.default_rng(0)
    for dim in (8, 512):
        x = rng.standard_normal((300, dim)).astype(np.float32) * rng.lognormal(0, 2, (300, 1)).astype(np.float32)
        x = np.concatenate([x, x[:200]])
        found = SemanticDeduplicator(n_clusters=1, eps=[0.0, 1e-9]).find(x)
        assert found["is_duplicate_0.0"][300:].all() and not found["is_duplicate_0.0"][:300].any()
        assert (found["is_duplicate_1e-09"] == found["is_duplicate_0.0"]).all()
        assert similarity_rounding(dim) < 1e-5


def test_given_centroids_must_be_one_row_per_cluster(sample_ds):
    step = SemanticDeduplicator(n_clusters=2)
    x = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    for centroids in (x[:4], x[:1], x[0], np.full((2, 16), np.nan, np.float32)):
        with pytest.raises(ValueError, match="centroids: "):
            step.find(x, centroids=centroids)
    with pytest.raises(ValueError, match=r"centroids: expected an array of n_clusters=2 rows, got shape \(4, 16\)"):
        step.added(_with_embeddings(sample_ds), centroids=x[:4])


def test_the_id_column_can_be_a_rank_column():
    rng = np.random.default_rng(1)
    first = rng.standard_normal((30, 8)).astype(np.float32)
    ds = _embedded([first, first[:10].copy()], score=[np.arange(30.0), np.arange(30.0, 40.0)])
    step = SemanticDeduplicator(n_clusters=2, eps=1e-3, which_to_keep=["score"], id_column="score")
    x = np.concatenate([first, first[:10]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = ds.with_columns(step.added(ds, centroids=x[:2].copy())).metadata.compute()
    want = step.find(x, centroids=x[:2].copy(), rank_values=np.arange(40.0)[:, None])
    np.testing.assert_array_equal(got["is_duplicate"].to_numpy(), want["is_duplicate_0.001"])
    assert got["is_duplicate"].to_numpy()[:10].all() and got["duplicate_of"].iloc[0] == "30"  # kept: the higher score


def test_added_and_fit_check_the_step_as_a_call_does(sample_ds):
    from imgcurate.steps.base import ColumnError

    ds = _with_embeddings(sample_ds)
    step = SemanticDeduplicator(n_clusters=2, which_to_keep=["variant"])
    for call in (step.fit, step.added, lambda d: step.added(d, centroids=np.ones((2, 16), np.float32))):
        with pytest.raises(ColumnError, match="which_to_keep ranks by 'variant', which holds"):
            call(ds)


def test_a_fit_sample_as_small_as_n_clusters_is_never_drawn_short():
    """Each row is drawn with the same chance, so the sample's size varies: the chance keeps a margin above
    n_clusters, for every seed."""
    rng = np.random.default_rng(0)
    ds = _embedded([rng.standard_normal((250, 8)).astype(np.float32) for _ in range(4)])
    for seed in range(20):
        for fit_sample in (10, 0.01):
            centroids = SemanticDeduplicator(n_clusters=10, fit_sample=fit_sample, random_state=seed,
                                             max_iter=2).fit(ds)  # fmt: skip
            assert centroids.shape == (10, 8)


def test_empty_embeddings_are_an_error_not_a_crash(sample_ds):
    from imgcurate.errors import ShardError

    ds = _with_embeddings(sample_ds, dims=(0,), null_rows=())
    with pytest.raises(ShardError, match=r"0000\d\.tar: column 'image_embedding' holds empty \(0-d\) embeddings"):
        SemanticDeduplicator(n_clusters=2)(ds).metadata.compute()
    with pytest.raises(ValueError, match=r"expected a \(N, D\) array of D >= 1"):
        SemanticDeduplicator(n_clusters=2).find(np.zeros((5, 0), np.float32))


def test_finite_embeddings_of_extreme_magnitude_are_normalised():
    """Squares of values above ~1.8e19 overflow float32 and those below ~1e-19 underflow it: the rows are finite and
    their exact copies duplicates all the same."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    x[:5] *= np.float32(1e20)
    x[5:10] = np.float32(1e38) * np.sign(x[5:10])  # the norm itself does not fit in float32
    x[10:20] *= np.float32(1e-25)
    x = np.concatenate([x, x[:20]])
    found = SemanticDeduplicator(n_clusters=1, eps=1e-4).find(x)
    assert found["is_duplicate_0.0001"][40:].all() and not found["is_duplicate_0.0001"][:40].any()


def test_pixels_hash_every_bit_of_the_decoded_pixels(tmp_path):
    """by="pixels" finds the same picture in another format or mode (a lossless WebP of a PNG, the RGB copy of a
    grayscale image, an opaque RGBA copy of an RGB one), and no two images whose pixels differ: 16-bit values
    beyond their top 8 bits, 32-bit values, and alpha."""
    import io

    from conftest import write_tar
    from PIL import Image

    from imgcurate import ImageTextPairDataset

    def encoded(image, fmt, **kwargs):
        out = io.BytesIO()
        image.save(out, fmt, **kwargs)
        return out.getvalue()

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8))
    deep = (rng.integers(0, 255, (16, 16)) * 257).astype(np.uint16)
    wide = rng.integers(0, 100, (16, 16)).astype(np.int32)
    clear = rgb.convert("RGBA")
    clear.putalpha(0)
    members = {
        "rgb": encoded(rgb, "PNG"), "rgb-webp": encoded(rgb, "WEBP", lossless=True),
        "rgb-opaque": encoded(rgb.convert("RGBA"), "PNG"), "rgb-clear": encoded(clear, "PNG"),
        "gray": encoded(gray, "PNG"), "gray-rgb": encoded(gray.convert("RGB"), "PNG"),
        "deep": encoded(Image.fromarray(deep), "PNG"), "deeper": encoded(Image.fromarray(deep + 7), "PNG"),
        "wide": encoded(Image.fromarray(wide), "TIFF"), "wider": encoded(Image.fromarray(wide * 3), "TIFF"),
    }  # fmt: skip
    ext = {"rgb-webp": "webp", "wide": "tif", "wider": "tif"}
    write_tar(tmp_path / "00000.tar", [(f"{k}.{ext.get(k, 'png')}", v) for k, v in members.items()])
    df = ExactDuplicates(by="pixels")(ImageTextPairDataset.from_webdataset(str(tmp_path))).metadata.compute()
    of = {k: (v if dup else None) for k, v, dup in zip(df["key"], df["exact_duplicate_of"], df["exact_duplicate"],
                                                         strict=True)}  # fmt: skip
    assert of == {"rgb": None, "rgb-webp": "rgb", "rgb-opaque": "rgb", "rgb-clear": None, "gray": None,
                  "gray-rgb": "gray", "deep": None, "deeper": None, "wide": None, "wider": None}  # fmt: skip
    assert df["image_sha256_error"].isna().all()


def test_pixels_of_16_bit_colour_pngs_animations_and_cmyk_are_hashed_whole(tmp_path):
    """Pillow reads a 16-bit RGB(A) PNG as 8-bit (its high bytes), converts CMYK to RGB with a loss, and shows the
    first frame of an animation: none of those may make two different images one. Each such image still equals its
    own re-encoding (an opaque 16-bit RGBA copy of a 16-bit RGB image; the same animation as GIF frames in WebP)."""
    import io

    from conftest import write_tar
    from PIL import Image

    from imgcurate import ImageTextPairDataset

    try:
        import cv2  # opencv-python-headless (the test extra) writes 16-bit colour PNGs; Pillow cannot
    except ImportError:
        cv2 = None

    def encoded(image, fmt, **kwargs):
        out = io.BytesIO()
        image.save(out, fmt, **kwargs)
        return out.getvalue()

    def png16(rgb):  # OpenCV writes 16-bit colour PNGs (Pillow cannot), in BGR(A) order
        order = [2, 1, 0, 3][: rgb.shape[-1]]
        return cv2.imencode(".png", np.ascontiguousarray(rgb[..., order]))[1].tobytes()

    rng = np.random.default_rng(2)
    deep = rng.integers(0, 65536, (12, 10, 3)).astype(np.uint16)
    low = deep.copy()
    low[..., 0] ^= 1  # the same high bytes: Pillow's 8-bit view is identical
    opaque = np.concatenate([deep, np.full((12, 10, 1), 65535, np.uint16)], axis=-1)
    frames = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    other = [frames[0], frames[2], frames[1]]  # the same first frame
    cmyk = rng.integers(0, 255, (8, 8, 4), dtype=np.uint8)
    cmyk[..., :3] = 255  # full cyan, magenta and yellow: black in RGB whatever the black ink
    cmyk_other = cmyk.copy()
    cmyk_other[..., 3] //= 2  # other black ink
    members = {
        "anim": encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50),
        "anim-other": encoded(other[0], "WEBP", save_all=True, append_images=other[1:], lossless=True, duration=50),
        "anim-again": encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=90),
        "cmyk": encoded(Image.fromarray(cmyk, "CMYK"), "TIFF"),
        "cmyk-other": encoded(Image.fromarray(cmyk_other, "CMYK"), "TIFF"),
    }  # fmt: skip
    expected = {"anim": None, "anim-other": None, "anim-again": "anim", "cmyk": None, "cmyk-other": None}
    if cv2 is not None:
        members.update({"deep": png16(deep), "deep-low": png16(low), "deep-opaque": png16(opaque)})
        expected.update({"deep": None, "deep-low": None, "deep-opaque": "deep"})
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(members["deep"]))),
                              np.asarray(Image.open(io.BytesIO(members["deep-low"]))))  # fmt: skip
    ext = {"cmyk": "tif", "cmyk-other": "tif"}
    ext.update({k: "webp" for k in members if k.startswith("anim")})
    write_tar(tmp_path / "00000.tar", [(f"{k}.{ext.get(k, 'png')}", v) for k, v in members.items()])
    df = ExactDuplicates(by="pixels")(ImageTextPairDataset.from_webdataset(str(tmp_path))).metadata.compute()
    of = {k: (v if dup else None) for k, v, dup in zip(df["key"], df["exact_duplicate_of"], df["exact_duplicate"],
                                                         strict=True)}  # fmt: skip
    assert of == expected
    assert df["image_sha256_error"].isna().all()


def test_exact_duplicates_output_columns_must_have_different_names():
    with pytest.raises(ValueError, match="duplicate_of_column and error_column are both 'exact_duplicate_of': give"):
        ExactDuplicates(error_column="exact_duplicate_of")
    with pytest.raises(ValueError, match="hash_column and duplicate_column are both 'image_sha256'"):
        ExactDuplicates(duplicate_column="image_sha256")
