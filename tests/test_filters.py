"""SampleFilter's rules: a null fails every operator, reasons stay whole in the drop counts, and column types are
checked on ``meta`` before any work."""

from __future__ import annotations

import operator

import numpy as np
import pandas as pd
import pytest
from conftest import score_dataset

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
