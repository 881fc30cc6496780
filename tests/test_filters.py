"""SampleFilter's rules: a null fails every operator, reasons stay whole in the drop counts, and column types are
checked on ``meta`` before any work."""

from __future__ import annotations

import operator

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import score_dataset

import imgcurate
from imgcurate.filters import Rule, SampleFilter, drop_report
from imgcurate.steps import ColumnError

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


def test_a_null_or_nan_value_fails_its_rule_whatever_the_operator(tmp_path):
    ds = score_dataset(tmp_path / "s", [0.1, None, 0.5, None, 0.9])
    for op, compare in OPS.items():
        df = SampleFilter(rules=[Rule("clip_score", op, 0.5)])(ds).metadata.compute()
        assert not df.loc[df["clip_score"].isna(), "keep"].any(), op
        present = df["clip_score"].notna()
        assert df.loc[present, "keep"].tolist() == compare(df.loc[present, "clip_score"], 0.5).tolist(), op
    df = SampleFilter(rules=[Rule("caption", "!=", "a cat")])(ds).metadata.compute()
    assert df["caption"].isna().all() and not df["keep"].any()  # no caption at all is not "not 'a cat'"


def test_a_null_duplicate_mark_fails_like_any_null(tmp_path):
    ds = score_dataset(tmp_path / "s", [0.1, None, 0.5])
    df = ds.metadata
    marks = df["clip_score"].gt(0.3).astype("boolean").mask(df["clip_score"].isna(), pd.NA)
    out = SampleFilter(drop_duplicates=["dup"])(ds.with_metadata(df.assign(dup=marks))).metadata.compute()
    assert out["keep"].tolist() == [True, False, False]


def test_a_reason_holding_the_separator_is_refused_and_others_are_counted_whole(tmp_path):
    with pytest.raises(ValueError, match=r"rule clip_score >= 0.45: its reason 'low; below 0.45' contains ';'"):
        Rule("clip_score", ">=", 0.45, reason="low; below 0.45")
    with pytest.raises(ValueError, match=r"rules\[0\]: rule caption == 'a;b': its reason 'caption == a;b' contains"):
        SampleFilter(rules=[{"column": "caption", "op": "==", "value": "a;b"}])
    assert Rule("caption", "==", "a;b", reason="caption is a-or-b").name == "caption is a-or-b"
    ds = score_dataset(tmp_path / "s", [0.1, 0.3, 0.4, 0.9, 0.5, 0.6])
    report = drop_report(SampleFilter(rules=[Rule("clip_score", ">=", 0.45, reason="low score, below 0.45")])(ds))
    assert report.to_dict() == {"total": 6, "kept": 3, "dropped": 3, "low score, below 0.45": 3}


def test_column_types_are_checked_on_meta_before_any_work(tmp_path):
    ds = score_dataset(tmp_path / "s", [0.1, 0.5])
    df = ds.metadata
    ds = ds.with_metadata(df.assign(duplicate_of=df["key"], flag=df["clip_score"] > 0.3))
    with pytest.raises(
        ColumnError, match=r"SampleFilter's drop_duplicates column 'duplicate_of' holds .+, not booleans"
    ):
        SampleFilter(drop_duplicates=["duplicate_of"])(ds)
    with pytest.raises(ColumnError, match=r"SampleFilter's rules\[0\] \(key > '000000'\): column 'key' holds .+, not "):
        SampleFilter(rules=[Rule("key", ">", "000000")])(ds)
    with pytest.raises(ColumnError, match=r"rules\[0\] \(clip_score == 'high'\): column 'clip_score' holds float64"):
        SampleFilter(rules=[Rule("clip_score", "==", "high")])(ds)
    allowed = SampleFilter(drop_duplicates=["flag"], rules=[Rule("key", "!=", "000000"), Rule("flag", "<=", True)])
    assert allowed(ds).metadata["keep"].compute().tolist() == [False, False]
    assert np.array_equal(SampleFilter(rules=[Rule("flag", "<", True)])(ds).metadata["keep"].compute(), [True, False])


def test_a_column_with_no_value_in_any_shard_is_named_as_such_when_a_rule_needs_numbers(tmp_path):
    """A column that every shard holds as nulls only (arrow's null type) has no type to read it as but text: a numeric
    option on it fails at check with a message that says so, not just "holds str"."""
    from PIL import Image

    from imgcurate.io.make import Record, write_shards
    from imgcurate.testing import encode_image

    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg")
    write_shards([Record({"jpg": jpg}, {"aesthetic_score": None}) for _ in range(4)], str(tmp_path / "s"),
                 samples_per_shard=2)  # fmt: skip
    ds = imgcurate.ImageTextPairDataset.from_webdataset(str(tmp_path / "s"))
    with pytest.raises(ColumnError, match=r"min_aesthetic column 'aesthetic_score' holds .+ \(text, or no value in any "
                                          r"shard\), not numbers"):  # fmt: skip
        SampleFilter(min_aesthetic=5.0)(ds)
    with pytest.raises(ColumnError, match=r"rules\[0\] \(aesthetic_score >= 5\): .+ no value in any shard"):
        SampleFilter(rules=[Rule("aesthetic_score", ">=", 5)])(ds)


def test_column_names_with_the_separator_are_refused_where_they_would_become_reasons(tmp_path):
    """A reason is built from the column a rule reads; a name with ``;`` would split into two reasons in the drop
    counts. Names from the config are refused at construction, names from the data (error columns, which
    ``drop_errors`` drops on) by the check on ``meta``, before any work; the error names the column and nothing
    else of the run."""
    from PIL import Image

    from imgcurate import ImageTextPairDataset
    from imgcurate.errors import ConfigError
    from imgcurate.io.make import Record, write_shards
    from imgcurate.pipeline import Pipeline
    from imgcurate.testing import encode_image
    from imgcurate.text import ClipTextFilter

    tail = "its name goes into its rule's reason, and contains ';', which separates the reasons in drop_reason: "
    tail += "rename the column"
    cases = [
        (SampleFilter, {"min_aesthetic": 5.0, "aesthetic_column": "aesthetic;v2"}, "min_aesthetic", "aesthetic;v2"),
        (SampleFilter, {"max_nsfw": 0.5, "nsfw_column": "nsfw;v2"}, "max_nsfw", "nsfw;v2"),
        (SampleFilter, {"drop_duplicates": ["dup;exact"]}, "drop_duplicates", "dup;exact"),
        (ClipTextFilter, {"min_clip_score": 0.2, "clip_score_column": "clip;b32"}, "min_clip_score", "clip;b32"),
        (ClipTextFilter, {"preset": "datacomp_basic", "caption_prefix": "cap;"}, "min_words", "cap;words"),
    ]
    for step, kwargs, option, column in cases:
        with pytest.raises(ValueError) as err:
            step(**kwargs)
        assert str(err.value) == f"{step.__name__}'s {option} column {column!r}: {tail}"
    SampleFilter(aesthetic_column="aesthetic;v2")  # no rule reads it: no reason names it

    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg")
    fields = [{"resize;crop_error": "too small" if i == 1 else None, "ocr_error": "no text" if i == 2 else None}
              for i in range(4)]  # fmt: skip
    write_shards([Record({"jpg": jpg}, f) for f in fields], str(tmp_path / "s"), samples_per_shard=2)
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "s"))
    message = f"SampleFilter (drop_errors) reads the error column 'resize;crop_error': {tail}"
    with pytest.raises(ColumnError) as err:
        SampleFilter()(ds)
    assert str(err.value) == message
    pipeline = Pipeline.from_config({"input": str(tmp_path / "s"), "steps": [{"SampleFilter": {}}]})
    with pytest.raises(ConfigError) as err:
        pipeline.check(ds)
    assert str(err.value) == f"steps[0].SampleFilter: {message}"
    # without the column, the other error column's reason is counted whole
    renamed = ds.with_metadata(ds.metadata.rename(columns={"resize;crop_error": "resize_crop_error"}))
    report = drop_report(SampleFilter()(renamed)).to_dict()
    assert report == {"total": 4, "kept": 2, "dropped": 2, "resize_crop_error set": 1, "ocr_error set": 1}
    assert drop_report(SampleFilter(drop_errors=False)(ds)).to_dict() == {"total": 4, "kept": 4, "dropped": 0}


def test_a_null_side_fails_the_aspect_ratio_and_odd_rule_values_are_refused_before_work(tmp_path):
    ds = score_dataset(tmp_path / "s", [0.1, 0.5, 0.9])
    df = ds.metadata
    width = df["width"].astype("Int64").mask(df["clip_score"] < 0.3, pd.NA)
    height = df["height"].astype("Int64").mask(df["clip_score"] > 0.7, pd.NA)
    ds = ds.with_metadata(df.assign(width=width, height=height, flag=df["clip_score"] > 0.3))
    out = SampleFilter(max_aspect_ratio=10.0, drop_errors=False)(ds).metadata.compute()
    assert out["keep"].tolist() == [False, True, False]  # a null width, as a null height, fails
    # for the size it does not have, not for a comparison (img2dataset with disable_all_reencoding records none)
    reasons = lambda out: [None if pd.isna(r) else r for r in out["drop_reason"]]  # noqa: E731
    assert reasons(out) == ["width unknown", None, "height unknown"]
    out = SampleFilter(min_width=0, min_height=0, drop_errors=False)(ds).metadata.compute()
    assert reasons(out) == ["width unknown", None, "height unknown"]
    scored = ds.with_metadata(df.assign(aesthetic_score=df["clip_score"].mask(df["clip_score"] > 0.7) * 10))
    out = SampleFilter(min_aesthetic=4.0, drop_errors=False)(scored).metadata.compute()
    assert reasons(out) == ["aesthetic_score < 4.0", None, "aesthetic_score unknown"]
    with pytest.raises(ColumnError, match=r"rules\[0\] \(flag >= 'yes'\): column 'flag' holds booleans, which cannot"):
        SampleFilter(rules=[Rule("flag", ">=", "yes")])(ds)
    # NumPy's numbers are numbers
    kept = SampleFilter(rules=[Rule("clip_score", ">=", np.float64(0.4))])(ds).metadata["keep"].compute()
    assert kept.tolist() == [False, True, True]


def test_rules_and_bounds_that_could_never_pass_are_refused_before_work(tmp_path):
    """A NaN bound, a number against a text column (a json field read as text) and a language confidence without
    languages to apply it to would drop every sample, or none, without a word: each is refused."""
    from imgcurate.text import ClipTextFilter

    ds = score_dataset(tmp_path / "s", [0.1, 0.5, 0.9])
    df = ds.metadata
    ds = ds.with_metadata(df.assign(year=df["key"].astype("string[pyarrow]")))
    with pytest.raises(ValueError, match=r"rule clip_score >= nan: NaN compares false with every value"):
        Rule("clip_score", ">=", float("nan"))
    with pytest.raises(ColumnError, match=r"rules\[0\] \(year == 2024\): column 'year' holds text, which never equals "
                                          r"the number 2024: give the value as text \('2024'\)"):  # fmt: skip
        SampleFilter(rules=[Rule("year", "==", 2024)])(ds)
    key = df["key"].compute().iloc[1]
    assert SampleFilter(rules=[Rule("year", "==", key)])(ds).metadata["keep"].compute().tolist() == [False, True, False]
    for option in ("min_clip_score", "min_words", "min_language_confidence"):
        with pytest.raises(ValueError, match=f"^{option}: NaN compares false with every value"):
            ClipTextFilter(**{option: float("nan"), "languages": ["en"]})
    with pytest.raises(ValueError, match="min_language_confidence applies to the languages kept: give languages"):
        ClipTextFilter(min_language_confidence=0.5)


def test_a_number_named_like_an_error_column_is_a_score_not_an_error(tmp_path):
    """``*_error`` columns hold per-sample error text; a numeric field of the input that happens to end so (a
    reconstruction error) is not one, and drop_errors leaves it alone."""
    ds = score_dataset(tmp_path / "s", [0.1, 0.5, 0.9])
    df = ds.metadata
    ds = ds.with_metadata(df.assign(reconstruction_error=df["clip_score"] * 2, ocr_error=df["key"].where(
        df["clip_score"] > 0.7)))  # fmt: skip
    out = SampleFilter()(ds).metadata.compute()
    assert out["keep"].tolist() == [True, True, False] and out["drop_reason"].tolist()[2] == "ocr_error set"
    assert drop_report(SampleFilter()(ds)).to_dict() == {"total": 3, "kept": 2, "dropped": 1, "ocr_error set": 1}


def test_a_reason_is_counted_once_per_sample_and_may_not_be_named_like_a_total(tmp_path):
    ds = score_dataset(tmp_path / "s", [0.1, 0.5, 0.9])
    twice = SampleFilter(rules=[Rule("clip_score", ">=", 0.3), Rule("clip_score", ">=", 0.3)])(ds)
    reasons = twice.metadata.compute()["drop_reason"]
    assert reasons[0] == "not clip_score >= 0.3" and reasons[1:].isna().all()  # not "...;not clip_score >= 0.3"
    assert drop_report(twice).to_dict() == {"total": 3, "kept": 2, "dropped": 1, "not clip_score >= 0.3": 1}
    with pytest.raises(ValueError, match="its reason 'kept' is the name of a total of the drop report"):
        Rule("clip_score", ">=", 0.3, reason="kept")


def test_image_size_reads_the_sizes_img2dataset_left_null_so_the_size_options_work(tmp_path):
    """img2dataset with disable_all_reencoding writes null width and height: every sample then failed min_width.
    ImageSize reads them from the image headers; an image without a readable header gets its reason instead."""
    import warnings

    import pyarrow.parquet as pq
    from PIL import Image

    from imgcurate import ImageTextPairDataset
    from imgcurate.filters import ImageSize
    from imgcurate.io.make import Record, write_shards
    from imgcurate.pipeline import Pipeline
    from imgcurate.testing import encode_image

    sizes = [(300, 200), (120, 400), (640, 480)]
    kinds = ["jpg", "png", "jpg"]
    records = [Record({kind: encode_image(Image.new("RGB", size, (9, 9, 9)), kind)})
               for kind, size in zip(kinds, sizes, strict=True)]  # fmt: skip
    records.append(Record({"jpg": b"\xff\xd8 not a jpeg"}))
    write_shards(records, str(tmp_path / "in"), samples_per_shard=2)
    for path in (tmp_path / "in").glob("*.parquet"):  # as img2dataset leaves them: the sizes null
        table = pq.read_table(path)
        for name in ("width", "height"):
            table = table.set_column(table.column_names.index(name), pa.field(name, pa.int32()),
                                     pa.nulls(table.num_rows, pa.int32()))  # fmt: skip
        pq.write_table(table, path)
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "in"))
    assert ds.metadata["width"].isna().all().compute()
    before = SampleFilter(min_width=100, drop_errors=False)(ds).metadata.compute()
    assert before["drop_reason"].eq("width unknown").all()
    out = SampleFilter(min_width=250, drop_errors=False)(ImageSize()(ds)).metadata.compute()
    assert out["width"].tolist()[:3] == [300, 120, 640] and out["height"].tolist()[:3] == [200, 400, 480]
    assert pd.isna(out["width"].iloc[3]) and out["image_size_error"].iloc[3] == "image header is unreadable"
    assert out["image_size_error"].isna().tolist()[:3] == [True] * 3
    assert [None if pd.isna(r) else r for r in out["drop_reason"]] == [None, "width < 250", None, "width unknown"]
    config = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
              "steps": [{"ImageSize": {}}, {"SampleFilter": {"min_width": 250}}]}  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exported = Pipeline.from_config(config).run()
    assert any("replaces the input's column 'width'" in str(w.message) for w in seen)
    df = exported.metadata.compute()
    assert df["width"].tolist() == [300, 640]
    schema = pq.read_schema(str(tmp_path / "out" / "00000.parquet"))
    assert schema.field("width").type == schema.field("height").type == pa.int32()  # as img2dataset writes them
