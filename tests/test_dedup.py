from __future__ import annotations

import numpy as np
import pytest
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
    from imgcurate.dedup.semantic import _group_representatives

    assert _group_representatives(3, pairs.earlier, pairs.later).tolist() == [0, 0, 0]
    assert labels.sum() == 0


def test_cache_dir_resumes(tmp_path, monkeypatch):
    x, _, _ = _planted(seed=2)
    dd = SemanticDeduplicator(n_clusters=4, cache_dir=str(tmp_path / "cache"))
    first = dd.find(x)
    assert (tmp_path / "cache" / "kmeans.npz").exists()
    import imgcurate.dedup.semantic as sem

    def boom(*a, **k):
        raise AssertionError("recomputed instead of resuming")

    monkeypatch.setattr(sem, "kmeans", boom)
    monkeypatch.setattr(sem, "in_cluster_duplicates", boom)
    again = dd.find(x)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])


def test_clear_errors():
    with pytest.raises(ValueError, match="fewer than n_clusters"):
        SemanticDeduplicator(n_clusters=10).find(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="which_to_keep"):
        SemanticDeduplicator(n_clusters=2, which_to_keep="best")


def test_exact_duplicates_on_the_sample(sample_ds):
    df = ExactDuplicates()(sample_ds).metadata.compute()
    marked = df[df.exact_duplicate]
    assert sorted(marked["source"]) == ["chelsea", "hubble_deep_field"]
    assert (marked["variant"] == "exact_copy").all() or len(marked) == 2
    firsts = df.set_index("key").loc[marked["exact_duplicate_of"]]
    assert (firsts["source"].to_numpy() == marked["source"].to_numpy()).all()
    assert df["image_sha256"].notna().all()


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
    with pytest.warns(UserWarning, match="no embedding"):
        out = SemanticDeduplicator(n_clusters=3)(ds)
    got = out.metadata.compute().reset_index(drop=True)
    assert got["cluster"].isna().sum() == 4 and not got.loc[got.cluster.isna(), "is_duplicate"].any()
    assert got["is_duplicate"].sum() >= 4


def test_assign_nearest_centroid():
    x = np.eye(3, dtype=np.float32)
    labels, dist = _assign(x, np.eye(3, dtype=np.float32) * 2)
    assert labels.tolist() == [0, 1, 2] and np.allclose(dist, 0)


@pytest.mark.parametrize("mode", ["greedy", "connected"])
def test_end_to_end_on_real_photos_finds_the_reencoded_and_resized_copies(sample_ds, mode):
    import dask
    import torch

    from imgcurate.embedders import TimmImageEmbedder

    torch.manual_seed(0)  # the random-weight model is built in this thread by the synchronous scheduler
    with dask.config.set(scheduler="sync"):
        ds = TimmImageEmbedder("test_resnet", batch_size=8)(sample_ds)
        # random weights squeeze all similarities towards 1; copies of one photo still sit above 0.9999, others below
        out = SemanticDeduplicator(n_clusters=4, eps=1e-4, mode=mode)(ds)
        df = out.metadata.compute().reset_index(drop=True)
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
def test_a_pipeline_embeds_each_shard_once(sample_ds, tmp_path, monkeypatch, scheduler):
    """Dedup steps read the whole frame before the export reads it again: the embedder must not run twice."""
    import contextlib

    from imgcurate.embedders import TimmImageEmbedder
    from imgcurate.embedders.base import ImageEmbedder

    embedded: list[str] = []
    original = ImageEmbedder.embed_shard

    def counting(self, tar, *args, **kwargs):
        embedded.append(tar)
        return original(self, tar, *args, **kwargs)

    monkeypatch.setattr(ImageEmbedder, "embed_shard", counting)
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
