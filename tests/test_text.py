"""Caption features, language identification, the CLIP-score filter with a global quantile, and the presets."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from imgcurate.text import PRESETS, CaptionFeatures, ClipTextFilter, detect_languages, global_quantile


def test_language_identification_offline():
    languages, confidence = detect_languages(
        ["a red motorcycle parked in a garage", "un chat noir dort sur le canapé", "ein Hund spielt im Park", None, " "]
    )
    assert languages == ["en", "fr", "de", None, None]
    assert (confidence[:3] > 0.5).all() and np.isnan(confidence[3:]).all()


def test_caption_features(sample_ds):
    df = CaptionFeatures()(sample_ds).metadata.compute()
    assert df["caption_words"].tolist() == [len(c.split()) for c in df["caption"]]
    assert df["caption_chars"].tolist() == [len(c) for c in df["caption"]]
    assert (df["caption_language"] == "en").mean() > 0.8
    assert df["caption_language_confidence"].dtype == np.float32


def test_global_quantile_error_is_small():
    values = np.random.default_rng(0).random(100_000)
    df = dd.from_pandas(pd.DataFrame({"s": values}), npartitions=50)
    for q in (0.1, 0.5, 0.7, 0.95):
        got = global_quantile(df, "s", q)
        assert abs(got - np.quantile(values, q)) < 2e-5
        assert abs((values < got).mean() - q) < 1e-4


def test_top_fraction_is_global_not_per_shard(sample_ds):
    meta = sample_ds.metadata

    # scores that differ by shard: a per-shard rule would keep 30% of every shard
    def shard_scores(p):  # continuous, and shifted per shard by an amount the keys fix (no string hashing)
        first = int(p["key"].iloc[0])
        jitter = np.random.default_rng(first).random(len(p))
        return pd.Series(np.arange(len(p)) + 10.0 * (first % 7) + jitter, index=p.index)

    scores = meta.map_partitions(shard_scores, meta=("clip_score", "float64"))
    ds = sample_ds.with_metadata(meta.assign(clip_score=scores.astype("float32")))
    step = ClipTextFilter(clip_top_fraction=0.3, drop_errors=False)
    df = step(ds).metadata.compute()
    assert step.threshold == pytest.approx(np.quantile(df["clip_score"], 0.7), rel=0.05)
    assert (df["keep"] == (df["clip_score"] >= step.threshold)).all()
    assert abs(df["keep"].mean() - 0.3) < 0.1
    assert df.loc[~df["keep"], "drop_reason"].str.contains("clip_score not in top 30%").all()


def test_threshold_and_caption_rules_and_presets(sample_ds):
    meta = sample_ds.metadata
    ds = CaptionFeatures()(sample_ds.with_metadata(meta.assign(clip_score=meta["width"].astype("float32") / 1000)))
    df = ClipTextFilter(preset="laion2b", drop_errors=False)(ds).metadata.compute()
    assert (df["keep"] == ((df["clip_score"] >= 0.28) & (df["caption_language"] == "en"))).all()
    df = ClipTextFilter(preset="datacomp_basic", drop_errors=False)(ds).metadata.compute()
    smaller = np.minimum(df["width"], df["height"])
    ratio = np.maximum(df["width"], df["height"]) / smaller
    want = (df["caption_words"] > 2) & (df["caption_chars"] > 5) & (smaller >= 200) & (ratio <= 3)
    assert (df["keep"] == (want & (df["caption_language"] == "en"))).all()
    strict = ClipTextFilter(preset="datacomp_clip_b32", min_clip_score=0.5)
    assert strict.min_clip_score == 0.5 and not strict.clip_score_inclusive
    assert set(PRESETS) == {"datacomp_clip_l14_top30", "datacomp_clip_b32", "laion2b", "datacomp_basic"}
    with pytest.raises(ValueError, match="unknown preset 'x'"):
        ClipTextFilter(preset="x")
    with pytest.raises(ValueError, match="reads column.*caption_language"):
        ClipTextFilter(languages=("en",))(sample_ds)


def test_yaml_pipeline_with_clip_captions_and_presets(sample_dir, tmp_path):
    from imgcurate.embedders.clip import write_random_clip
    from imgcurate.estimate import estimate_config
    from imgcurate.pipeline import Pipeline

    model = write_random_clip(tmp_path / "tiny")
    config = tmp_path / "p.yaml"
    config.write_text(
        f"""
input: {sample_dir}
steps:
  - ClipEmbedder: {{model_name: "{model}", device: cpu, batch_size: 8}}
  - CaptionFeatures: {{}}
  - ClipTextFilter: {{preset: datacomp_basic, clip_top_fraction: 0.5, languages: [en]}}
"""
    )
    pipeline = Pipeline.from_yaml(str(config))
    assert [type(s).__name__ for s in pipeline.steps] == ["ClipEmbedder", "CaptionFeatures", "ClipTextFilter"]
    report = estimate_config(str(config), measure=True)
    assert [e.step for e in report.steps] == ["ClipEmbedder", "CaptionFeatures", "ClipTextFilter"]
    assert report.steps[0].seconds is not None and "clip_score" in report.steps[0].adds
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("preset: datacomp_basic", "preset: 3"))
    with pytest.raises(ValueError, match="preset"):
        Pipeline.from_yaml(str(bad))
