"""Caption features, language identification, the CLIP-score filter with a global quantile, and the presets."""

from __future__ import annotations

import re

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import score_dataset

from imgcurate.text import PRESETS, CaptionFeatures, ClipTextFilter, detect_languages, global_quantile


def test_language_identification_offline():
    languages, confidence = detect_languages(
        ["a red motorcycle parked in a garage", "un chat noir dort sur le canapé", "ein Hund spielt im Park", None, " "]
    )
    assert languages == ["en", "fr", "de", None, None]
    assert (confidence[:3] > 0.5).all() and np.isnan(confidence[3:]).all()
    # text with no feature of any language: the model scores every language alike, which is no answer (it gave
    # Serbian, the one language it counts twice)
    languages, confidence = detect_languages(["ok", "...", "😀", "the", "un chat noir dort sur le canapé"])
    assert languages == [None, None, None, None, "fr"] and np.isnan(confidence[:4]).all()


def test_caption_features(sample_ds):
    df = CaptionFeatures()(sample_ds).metadata.compute()
    assert df["caption_words"].tolist() == [len(c.split()) for c in df["caption"]]
    assert df["caption_chars"].tolist() == [len(c) for c in df["caption"]]
    assert (df["caption_language"] == "en").mean() > 0.8
    assert df["caption_language_confidence"].dtype == np.float32


def test_global_quantile_is_an_exact_order_statistic():
    rng = np.random.default_rng(0)
    values = rng.random(100_000)
    df = dd.from_pandas(pd.DataFrame({"s": values}), npartitions=50)
    ordered = np.sort(values)
    for q, rank in [(0.0, 0), (0.1, 10_000), (0.5, 50_000), (0.7, 70_000), (0.95, 95_000), (1.0, 99_999)]:
        assert global_quantile(df, "s", q) == ordered[rank]
    # 8 bins over 2,000 values with many ties, at most 8 gathered: the quantile's bin is split again until it is
    # small, or one value
    values = np.round(rng.normal(size=2_000), 1)
    df = dd.from_pandas(pd.DataFrame({"s": values}), npartitions=7)
    ordered = np.sort(values)
    for q in (0.0, 0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
        assert global_quantile(df, "s", q, bins=8, gather=8) == ordered[min(int(round(q * 2_000)), 1_999)], q
    with pytest.raises(ValueError, match="no finite values"):
        global_quantile(dd.from_pandas(pd.DataFrame({"s": [np.nan, np.inf]}), npartitions=1), "s", 0.5)


def test_global_quantile_computes_a_lazy_column_once():
    """Its passes (here several: 8 bins, 8 values gathered at most) read values computed once, not a lazily computed
    column's tasks again per pass."""
    calls = []

    def doubled(part: pd.DataFrame) -> pd.Series:
        if len(part):
            calls.append(len(part))
        return part["s"] * 2.0

    values = np.random.default_rng(1).random(1_000)
    df = dd.from_pandas(pd.DataFrame({"s": values}), npartitions=5)
    lazy = df.assign(t=df.map_partitions(doubled, meta=("t", "float64")))
    assert global_quantile(lazy, "t", 0.3, bins=8, gather=8) == np.sort(values * 2.0)[300]
    assert sorted(calls) == [200] * 5


def test_top_fraction_keeps_exactly_the_top_and_every_tie_at_the_cut(tmp_path):
    ds = score_dataset(tmp_path / "a", [0.1, 0.3, 0.4, 0.9, 0.5, 0.6])
    for fraction, threshold, kept in [(1.0, 0.1, 6), (0.5, 0.5, 3), (0.3, 0.6, 2), (0.01, 0.9, 1)]:
        step = ClipTextFilter(clip_top_fraction=fraction)
        df = step(ds).metadata.compute()
        assert (step.threshold, int(df["keep"].sum())) == (threshold, kept), fraction
    ties = score_dataset(tmp_path / "b", [0.2] * 5 + [0.25, 0.3, 0.35, 0.4, 0.45], samples_per_shard=4)
    for fraction, kept in [(1.0, 10), (0.6, 10), (0.5, 5), (0.3, 3)]:  # the 6th best is 0.2: all five 0.2 kept
        df = ClipTextFilter(clip_top_fraction=fraction)(ties).metadata.compute()
        assert int(df["keep"].sum()) == kept, fraction


def test_infinite_and_missing_scores_neither_break_nor_move_the_top_fraction(tmp_path):
    ds = score_dataset(tmp_path / "s", [0.1, 0.3, np.inf, 0.4, None, 0.5, -np.inf, 0.6])
    step = ClipTextFilter(clip_top_fraction=0.4)
    df = step(ds).metadata.compute()
    assert step.threshold == 0.5  # the 2nd best of the 5 finite scores (ceil(0.4 * 5) = 2)
    assert sorted(df.loc[df["keep"], "clip_score"]) == [0.5, 0.6, np.inf]  # +inf is above any cut
    dropped = df.loc[~df["keep"]]  # so are -inf and null, the null one for its unknown score
    assert dropped["drop_reason"].tolist() == ["clip_score not in top 40%"] * 3 + ["clip_score unknown"] + [
        "clip_score not in top 40%"
    ]
    assert dropped["clip_score"].isna().tolist() == [False, False, False, True, False]


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


def test_a_preset_set_on_another_clip_models_scores_is_warned_about(sample_dir, tmp_path, capsys):
    import warnings

    from imgcurate.cli import main
    from imgcurate.pipeline import Pipeline

    def check(model, pretrained, preset):
        steps = [{"ClipEmbedder": {"model_name": model, "pretrained": pretrained}}, {"CaptionFeatures": {}},
                 {"ClipTextFilter": {"preset": preset}}]  # fmt: skip
        pipeline = Pipeline.from_config({"input": str(sample_dir), "steps": steps})
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            pipeline.check(pipeline.open_input(validate=False))
        return [str(w.message) for w in seen if "preset" in str(w.message)]

    assert check("ViT-L-14", "laion2b_s32b_b82k", "laion2b") == [
        "steps[2].ClipTextFilter: preset 'laion2b' was set on scores of CLIP ViT-B-32 (openai), and the scores here "
        "come from ViT-L-14 (laion2b_s32b_b82k): its rule selects other samples on that model's scores"
    ]
    assert check("ViT-B-32", "openai", "datacomp_clip_l14_top30")[0].startswith(
        "steps[2].ClipTextFilter: preset 'datacomp_clip_l14_top30' was set on scores of CLIP ViT-L-14 (openai)"
    )
    assert check("ViT-B-32", "openai", "laion2b") == check("ViT-B-32-quickgelu", "openai", "datacomp_clip_b32") == []
    assert check("ViT-L-14", "laion2b_s32b_b82k", "datacomp_basic") == []  # no score rule
    argv = ["config", "--input-path", str(sample_dir), "--output-path", str(tmp_path / "out"), "--output-file",
            str(tmp_path / "c.yaml"), "--clip-model", "ViT-L-14", "--filter-preset", "laion2b"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert "imgcurate: warning: steps[4].ClipTextFilter: preset 'laion2b' was set on scores of CLIP ViT-B-32 " \
           "(openai), and the scores here come from ViT-L-14 (openai)" in capsys.readouterr().err  # fmt: skip
    (tmp_path / "c.yaml").unlink()
    assert main([*argv[:2], str(tmp_path / "no shards yet"), *argv[3:]]) == 0  # warned without an input too
    assert "imgcurate: warning: steps[4].ClipTextFilter: preset 'laion2b'" in capsys.readouterr().err
    assert main([*argv[:-3], "ViT-B-32", "--filter-preset", "laion2b", "--force"]) == 0
    assert "warning" not in capsys.readouterr().err


def _shards_with(folder, fields):
    """Shards of 8x8 images whose json fields (and so parquet columns) are ``fields``, one dict per sample."""
    from PIL import Image

    from imgcurate import ImageTextPairDataset
    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import encode_image

    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg")
    write_shards([Record({"jpg": jpg}, f) for f in fields], str(folder), samples_per_shard=2)
    return ImageTextPairDataset.from_webdataset(str(folder))


def test_score_and_caption_columns_of_the_wrong_type_are_refused_before_any_work(tmp_path):
    from imgcurate.errors import ConfigError
    from imgcurate.pipeline import Pipeline
    from imgcurate.steps import ColumnError

    fields = [{"clip_score": s, "caption_words": w, "caption_language": lang}
              for s, w, lang in (("high", "three", 7), ("low", "one", 8), ("high", "two", 7))]  # fmt: skip
    ds = _shards_with(tmp_path / "s", fields)
    kinds = {c: str(t) for c, t in ds.metadata.dtypes.items()}
    cases = {
        "min_clip_score": ({"min_clip_score": 0.2}, "clip_score", kinds["clip_score"], "numbers"),
        "clip_top_fraction": ({"clip_top_fraction": 0.5}, "clip_score", kinds["clip_score"], "numbers"),
        "min_words": ({"min_words": 2}, "caption_words", kinds["caption_words"], "numbers"),
        "languages": ({"languages": ["en"]}, "caption_language", kinds["caption_language"], "text"),
    }
    for option, (kwargs, column, kind, wanted) in cases.items():
        held = f"{kind} (text, or no value in any shard)" if kind == "str" else kind
        message = f"ClipTextFilter's {option} column {column!r} holds {held}, not {wanted}"
        with pytest.raises(ColumnError) as err:
            ClipTextFilter(drop_errors=False, **kwargs)(ds)  # lazy: the clip_top_fraction quantile is not computed
        assert str(err.value) == message
        pipeline = Pipeline.from_config({"input": str(tmp_path / "s"), "steps": [{"ClipTextFilter": kwargs}]})
        with pytest.raises(ConfigError, match=f"^steps\\[0\\].ClipTextFilter: {re.escape(message)}$"):
            pipeline.check(ds)
    # the same rules on columns of the right types
    df = ds.metadata
    language = df["clip_score"].map(lambda v: "en" if v == "high" else "fr", meta=("caption_language", str))
    score = df["caption_language"].astype("float64") / 10
    typed = ds.with_metadata(df.assign(clip_score=score, caption_language=language))
    out = ClipTextFilter(min_clip_score=0.75, languages=["en"], drop_errors=False)(typed).metadata.compute()
    assert out["keep"].tolist() == [False, False, False]
    assert out["drop_reason"].tolist() == ["clip_score < 0.75", "caption_language not in en", "clip_score < 0.75"]


def test_a_caption_identified_with_too_little_confidence_is_dropped_for_that_and_not_for_its_language(tmp_path):
    from PIL import Image

    from imgcurate import ImageTextPairDataset
    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import encode_image

    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg")
    captions = ["a dog runs on the beach", "le chien court sur la plage", "ok"]
    write_shards([Record({"jpg": jpg}, caption=c) for c in captions], str(tmp_path), samples_per_shard=2)
    ds = CaptionFeatures()(ImageTextPairDataset.from_webdataset(str(tmp_path)))
    df = ds.metadata.compute()
    assert df["caption_language"].tolist()[:2] == ["en", "fr"] and df["caption_language"].isna().tolist()[2]
    least = float(df["caption_language_confidence"].iloc[0]) + 1e-6  # the English caption is just below it
    out = ClipTextFilter(languages=["en"], min_language_confidence=least, drop_errors=False)(ds).metadata.compute()
    assert out["keep"].tolist() == [False, False, False]
    reasons = out["drop_reason"].tolist()
    assert reasons[0] == f"caption_language_confidence < {least}"
    assert reasons[1] == reasons[2] == "caption_language not in en"  # another language or none: that reason only
    assert ClipTextFilter(languages=["en"], min_language_confidence=least).results_version >= 3


def test_an_argument_given_with_a_preset_wins_even_when_it_equals_the_default():
    from imgcurate.text import ClipTextFilter

    strict = ClipTextFilter(preset="datacomp_clip_b32", clip_score_inclusive=True)
    assert strict.clip_score_inclusive is True and strict.min_clip_score == 0.25
    assert ClipTextFilter(preset="laion2b", languages=()).languages == ()
    assert ClipTextFilter(preset="laion2b").languages == ("en",)
