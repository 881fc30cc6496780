"""A NaN inside an embedding is a value, never a null element: through the embedder and its fused classifier, and
through the cuDF backend's conversions (with a stand-in for cuDF that holds arrow tables, as cuDF's own arrow import
and export do)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from imgcurate import backends
from imgcurate.backends import CudfBackend, embedding_array, embedding_matrix, embedding_type


def _nan_matrix():
    m = np.arange(12, dtype=np.float32).reshape(4, 3)
    m[1, 2] = np.nan
    return m


def test_embedding_array_keeps_nan_as_a_value():
    array = embedding_array(_nan_matrix(), valid=np.array([True, True, False, True]))
    assert array.null_count == 1 and array.flatten().null_count == 0
    valid, matrix = embedding_matrix(pd.Series(array, dtype=pd.ArrowDtype(embedding_type(3))))
    assert valid.tolist() == [True, True, False, True]
    assert np.isnan(matrix[1, 2]) and np.isfinite(np.delete(matrix.ravel(), 5)).all()


def test_nan_from_the_model_stays_a_value_through_the_embedder_and_classifier(sample_ds, monkeypatch):
    from imgcurate.embedders import TimmImageEmbedder
    from imgcurate.embedders.base import ImageEmbedder

    original = ImageEmbedder._forward

    def forward(self, model, batch, device):
        out = original(self, model, batch, device)
        out[0, 0] = np.nan  # the first image of every batch: a NaN from the model (e.g. an fp16 overflow)
        return out

    monkeypatch.setattr(ImageEmbedder, "_forward", forward)

    class Scores:  # the fused-classifier protocol, scoring with a sum that NaN propagates through
        pred_column = "score"
        embedding_column = "image_embedding"

        def output_columns(self):
            return {"score": pa.float32()}

        def check_dimension(self, dim, source=None):
            pass

        def predict_rows(self, matrix, valid):
            return np.where(valid, matrix.sum(axis=1), np.nan).astype(np.float32)

    emb = TimmImageEmbedder("test_vit", batch_size=8, device="cpu", normalize_embeddings=False, classifiers=[Scores()])
    df = emb(sample_ds).metadata.compute()
    column = pa.chunked_array(df["image_embedding"].array._pa_array).combine_chunks()
    assert column.null_count == 0 and column.flatten().null_count == 0  # NaN is not null
    valid, matrix = embedding_matrix(df["image_embedding"])
    assert valid.all() and np.isnan(matrix[:, 0]).sum() >= sample_ds.num_shards
    assert df["score"].isna().sum() == np.isnan(matrix[:, 0]).sum()


class _FakeIndex:
    def __init__(self, values):
        self.values = values

    def to_pandas(self):
        return pd.Index(self.values)


class _FakeCudfFrame:
    """What the cuDF backend uses of a cudf.DataFrame: arrow export without the index, the index, the columns."""

    def __init__(self, table, index=None):
        self.table = table
        self.columns = table.column_names
        self.index = _FakeIndex(list(range(len(table))) if index is None else index)

    def to_arrow(self, preserve_index=None):
        assert preserve_index is False
        return self.table


def test_cudf_backend_conversions_keep_nan_and_give_arrow_columns(monkeypatch):
    fake = types.ModuleType("cudf")
    fake.DataFrame = types.SimpleNamespace(from_arrow=lambda table: _FakeCudfFrame(table))
    monkeypatch.setitem(sys.modules, "cudf", fake)
    backend = CudfBackend()
    monkeypatch.setitem(backend.__dict__, "_cudf", fake)
    table = pa.table(
        {"key": ["a", "b", "c", "d"], "n": pa.array([1, None, 3, 4], pa.int64()),
         "emb": embedding_array(_nan_matrix(), valid=np.array([True, True, False, True]))}
    )  # fmt: skip
    frame = backend.from_arrow(table)
    # cuDF gets a plain list (its arrow import maps fixed-size lists to lists) with the NaN as a value
    assert frame.table.schema.field("emb").type == pa.list_(pa.float32())
    assert frame.table.column("emb").combine_chunks().flatten().null_count == 0
    frame.index = _FakeIndex([10, 11, 12, 13])
    out = backend.to_pandas(frame)
    assert list(out.index) == [10, 11, 12, 13]
    assert isinstance(out["emb"].dtype, pd.ArrowDtype)  # one arrow column, not a Python list per row
    assert out["n"].dtype == pd.Int64Dtype()  # the same dtypes as the pandas backend gives
    valid, matrix = embedding_matrix(out["emb"])
    assert valid.tolist() == [True, True, False, True] and np.isnan(matrix[1, 2])
    back = backends.to_arrow(out, {"emb": embedding_type(3)})
    assert (
        back.column("emb").type == embedding_type(3) and back.column("emb").combine_chunks().flatten().null_count == 0
    )


class _FakeCudfSeries:
    """What the cuDF backend uses of a cudf list Series (``notna``, a boolean mask, ``.list.len``, ``.list.leaves``),
    over an arrow list array, as cuDF holds list columns."""

    def __init__(self, array):
        self.array = array
        self.list = self

    def notna(self):
        return _FakeCudfSeries(self.array.is_valid())

    def to_numpy(self):
        return self.array.to_numpy(zero_copy_only=False)

    def __getitem__(self, mask):
        return _FakeCudfSeries(self.array.filter(mask.array))

    def len(self):
        return _FakeCudfSeries(pa.compute.list_value_length(self.array))

    def unique(self):
        return _FakeCudfSeries(self.array.unique())

    @property
    def leaves(self):
        values = self.array.flatten().cast(pa.float32())
        return types.SimpleNamespace(null_count=0, astype=lambda _: _FakeCudfSeries(values))


def test_cudf_backend_refuses_rows_of_different_lengths_and_takes_large_lists(monkeypatch):
    backend = CudfBackend()
    rows = pa.array([[1.0, 2.0, 3.0], None, [4.0, 5.0, 6.0]], pa.list_(pa.float32()))
    valid, matrix = backend.embedding_matrix(_FakeCudfSeries(rows), "emb")
    assert valid.tolist() == [True, False, True] and matrix.tolist() == [[1, 2, 3], [4, 5, 6]]
    uneven = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0], [6.0, 7.0, 8.0]], pa.list_(pa.float32()))  # 8 values, 3 rows
    with pytest.raises(ValueError, match=r"'emb' holds embeddings of different lengths \(2, 3 values\)"):
        backend.embedding_matrix(_FakeCudfSeries(uneven), "emb")
    uneven = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0]], pa.list_(pa.float32()))  # 8 values, 2 rows: 2x4
    with pytest.raises(ValueError, match="different lengths"):
        backend.embedding_matrix(_FakeCudfSeries(uneven), "emb")

    fake = types.ModuleType("cudf")
    fake.DataFrame = types.SimpleNamespace(from_arrow=lambda table: _FakeCudfFrame(table))
    monkeypatch.setitem(backend.__dict__, "_cudf", fake)
    large = pa.table({"emb": pa.array([[1.0, 2.0]], pa.large_list(pa.float32()))})
    assert backend.from_arrow(large).table.schema.field("emb").type == pa.list_(pa.float32())


def test_cudf_backend_gives_an_all_null_list_column_its_type(monkeypatch):
    """cuDF exports an empty or all-null list column (``meta`` itself) as arrow's null type; the backend gives it
    the type its dtype holds, so that ``meta``'s schema matches the partitions'."""

    class ListDtype:  # cuDF's list dtype says its arrow type through to_arrow
        def to_arrow(self):
            return pa.list_(pa.float32())

    frame = _FakeCudfFrame(pa.table({"key": pa.array([], pa.string()), "emb": pa.nulls(0)}))
    frame.__class__ = type("Frame", (_FakeCudfFrame,), {"__getitem__": lambda self, c: types.SimpleNamespace(
        dtype=ListDtype() if c == "emb" else np.dtype(object))})  # fmt: skip
    table = CudfBackend().to_arrow(frame)
    assert table.schema.field("emb").type == pa.list_(pa.float32()) and table.schema.field("key").type == pa.string()
    assert backends.to_arrow(frame, {"emb": embedding_type(4)}).schema.field("emb").type == embedding_type(4)


def test_a_text_column_read_as_embeddings_is_refused_before_any_work(sample_ds):
    """On either backend the dtype says what a column holds: text where a step reads embeddings is a ColumnError
    when the step is checked, with what to do, instead of a failure in every task."""
    from imgcurate.classifiers import AestheticClassifier
    from imgcurate.dedup import SemanticDeduplicator
    from imgcurate.steps.base import ColumnError

    df = sample_ds.metadata
    ds = sample_ds.with_metadata(df.assign(image_embedding=df["key"].astype(pd.StringDtype("pyarrow"))))
    for step in (SemanticDeduplicator(n_clusters=2), AestheticClassifier(model_path="x")):
        with pytest.raises(ColumnError, match=r"'image_embedding' holds text, not embeddings: dask turns"):
            step(ds)
    for dtype, name in ((pd.ArrowDtype(pa.int64()), "int64"), (np.float64, "double"), ("Int32", "int32")):
        ds = sample_ds.with_metadata(df.assign(image_embedding=df["key"].str.len().astype(dtype)))
        with pytest.raises(ColumnError, match=rf"'image_embedding' holds {name}, not embeddings"):
            SemanticDeduplicator(n_clusters=2)(ds)


def test_a_declared_fixed_size_that_the_values_do_not_have_is_left_where_values_need_not_fit():
    plain = pd.DataFrame({"emb": pd.Series(pa.array([[1.0, 2.0]], pa.list_(pa.float32())),
                                           dtype=pd.ArrowDtype(pa.list_(pa.float32())))})  # fmt: skip
    assert backends.to_arrow(plain, {"emb": embedding_type(2)}).schema.field("emb").type == embedding_type(2)
    kept = backends.to_arrow(plain, {"emb": embedding_type(8)}, where_fits=True)
    assert kept.schema.field("emb").type == pa.list_(pa.float32())
    fixed = pd.DataFrame({"emb": pd.Series(embedding_array(np.ones((1, 2), np.float32)),
                                           dtype=pd.ArrowDtype(embedding_type(2)))})  # fmt: skip
    kept = backends.to_arrow(fixed, {"emb": embedding_type(8)}, where_fits=True)  # arrow: a type error, not invalid
    assert kept.schema.field("emb").type == embedding_type(2)


def test_missing_scalar_floats_are_null_on_either_backend_and_nan_inside_embeddings_stays_nan():
    """pandas writes a NaN score as null (``Table.from_pandas``); cuDF's arrow export keeps NaN as a value, so the
    cuDF backend turns the top-level float columns' NaN into null too (not an embedding's NaN elements): an export,
    a saved metadata file or a run directory holds the same parquet on either backend."""
    import pandas as pd
    import pyarrow as pa

    from imgcurate.backends import PandasBackend, nan_as_null

    matrix = _nan_matrix()
    frame = pd.DataFrame({"score": np.array([0.5, np.nan, 1.0, np.nan], dtype=np.float32),
                          "count": np.array([1, 2, 3, 4])})  # fmt: skip
    frame["emb"] = pd.Series(pd.arrays.ArrowExtensionArray(embedding_array(matrix, valid=np.array([True] * 4))))
    from_pandas = PandasBackend().to_arrow(frame)
    as_cudf_exports_it = pa.table(
        {
            "score": pa.array(frame["score"].to_numpy(), from_pandas=False),
            "count": pa.array(frame["count"].to_numpy()),
            "emb": from_pandas.column("emb"),
        }
    )
    assert as_cudf_exports_it.column("score").null_count == 0  # NaN as a value, as cuDF exports it
    got = nan_as_null(as_cudf_exports_it)
    assert got.schema.equals(from_pandas.schema) and got.column("score").equals(from_pandas.column("score"))
    assert got.column("score").null_count == 2 and got.column("count").equals(from_pandas.column("count"))
    np.testing.assert_array_equal(np.stack(got.column("emb").to_pylist()), matrix)  # its NaN stays a value
