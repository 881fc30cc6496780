"""The Keras SavedModel reader against TensorFlow itself.

The fixtures in tests/data were written by TensorFlow 2.15.1 / Keras 2.15 (tests/data/make_keras_nsfw_fixture.py):
small models shaped like LAION's autokeras NSFW detector, saved as SavedModels, zipped like the published file, and
TensorFlow's predictions of the reloaded models on fixed inputs. TensorFlow is not needed to run these tests.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch

from imgcurate.classifiers import keras_savedmodel as ks
from imgcurate.classifiers.keras_savedmodel import KerasLayer, KerasModel, keras_to_torch, read_keras_savedmodel
from imgcurate.errors import WeightFileError

DATA = pathlib.Path(__file__).parent / "data"


def _tf_predictions():
    with np.load(DATA / "keras_predictions.npz") as saved:
        return {name: saved[name] for name in saved.files}


def _run(module, x):
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def _unzipped(stem, tmp_path) -> pathlib.Path:
    with zipfile.ZipFile(DATA / f"{stem}.zip") as archive:
        archive.extractall(tmp_path)
    return tmp_path / stem


@pytest.mark.parametrize("stem", ["keras_nsfw_b32", "keras_sequential"])
def test_matches_tensorflow_from_zip_and_folder(stem, tmp_path, monkeypatch):
    for name in ("tensorflow", "keras", "autokeras"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now fails: the reader must not need them
    saved = _tf_predictions()
    for source in (DATA / f"{stem}.zip", _unzipped(stem, tmp_path)):
        module = keras_to_torch(source)
        assert (module.input_size, module.output_size) == (512, 1)
        np.testing.assert_allclose(_run(module, saved["inputs"]), saved[stem], rtol=1e-5, atol=1e-5)


def test_layers_and_weights_as_saved():
    model = read_keras_savedmodel(DATA / "keras_nsfw_b32.zip")
    assert model.class_name == "Functional"
    kinds = [(layer.name, layer.class_name) for layer in model.layers]
    assert kinds == [
        ("input_1", "InputLayer"),
        ("normalization", "Normalization"),
        ("dense", "Dense"),
        ("re_lu", "ReLU"),
        ("dropout", "Dropout"),
        ("dense_1", "Dense"),
        ("dropout_1", "Dropout"),
        ("dense_2", "Dense"),
        ("classification_head_1", "Activation"),
    ]
    shapes = {layer.name: {k: v.shape for k, v in layer.weights.items()} for layer in model.layers if layer.weights}
    assert shapes["dense"] == {"kernel": (512, 32), "bias": (32,)}
    assert shapes["dense_2"] == {"kernel": (16, 1), "bias": (1,)}
    norm = model.layers[1].weights
    assert norm["mean"].shape == norm["variance"].shape == (512,) and (norm["variance"] > 0).all()
    assert float(norm["count"]) == 256  # the fixture adapted its Normalization on 256 rows
    sequential = read_keras_savedmodel(DATA / "keras_sequential.zip")
    assert sequential.class_name == "Sequential"
    norm = next(layer for layer in sequential.layers if layer.class_name == "Normalization")
    assert not norm.weights and len(norm.config["mean"]) == 512  # given to the layer: in its configuration instead


def test_unsupported_layer_is_named():
    with pytest.raises(WeightFileError, match=r"keras_unsupported\.zip.*layer 'layer_norm' \(LayerNormalization\)"):
        keras_to_torch(DATA / "keras_unsupported.zip")


def test_damaged_files_fail_their_checksums(tmp_path):
    folder = _unzipped("keras_nsfw_b32", tmp_path)
    data = folder / "variables" / "variables.data-00000-of-00001"
    original = data.read_bytes()
    damaged = bytearray(original)
    damaged[-3] ^= 0x40  # inside the last tensor written
    data.write_bytes(bytes(damaged))
    with pytest.raises(WeightFileError, match="fails its crc32c check"):
        read_keras_savedmodel(folder)
    data.write_bytes(original)
    index = folder / "variables" / "variables.index"
    damaged = bytearray(index.read_bytes())
    damaged[20] ^= 0x01  # inside the first data block
    index.write_bytes(bytes(damaged))
    with pytest.raises(WeightFileError, match=r"variables\.index: block at 0 fails its crc32c check"):
        read_keras_savedmodel(folder)


def test_missing_parts_are_named(tmp_path):
    folder = _unzipped("keras_nsfw_b32", tmp_path)
    shutil.rmtree(folder / "variables")
    with pytest.raises(WeightFileError, match=r"variables\.index: missing: the checkpoint index"):
        read_keras_savedmodel(folder)
    (folder / "keras_metadata.pb").unlink()
    with pytest.raises(WeightFileError, match=r"keras_metadata\.pb: missing: the layer configuration"):
        read_keras_savedmodel(folder)
    (tmp_path / "not_a_model.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    with pytest.raises(WeightFileError, match="holds 0 saved_model.pb files"):
        read_keras_savedmodel(tmp_path / "not_a_model.zip")
    assert not ks.is_keras_savedmodel(tmp_path / "not_a_model.zip")
    assert ks.is_keras_savedmodel(DATA / "keras_nsfw_b32.zip")


def _dense(name, units_in, units_out, activation="linear"):
    weights = {"kernel": np.ones((units_in, units_out), np.float32), "bias": np.zeros(units_out, np.float32)}
    return KerasLayer(name, "Dense", {"units": units_out, "activation": activation}, weights)


def test_builder_refuses_what_it_does_not_know():
    with pytest.raises(WeightFileError, match=r"m\.zip: layer 'd' \(Dense\): activation 'selu' is not supported"):
        keras_to_torch(KerasModel("m.zip", "Sequential", [_dense("d", 4, 1, "selu")]))
    relu6 = KerasLayer("r", "ReLU", {"max_value": 6.0})
    with pytest.raises(WeightFileError, match=r"layer 'r' \(ReLU\): only a plain ReLU"):
        keras_to_torch(KerasModel("m.zip", "Sequential", [_dense("d", 4, 2), relu6]))
    with pytest.raises(WeightFileError, match=r"layer 'd2' \(Dense\): kernel of shape \(3, 1\) does not take 2-d"):
        keras_to_torch(KerasModel("m.zip", "Sequential", [_dense("d", 4, 2), _dense("d2", 3, 1)]))
    bare = KerasLayer("d", "Dense", {"units": 1})
    with pytest.raises(WeightFileError, match=r"layer 'd' \(Dense\): no weight 'kernel'"):
        keras_to_torch(KerasModel("m.zip", "Sequential", [bare]))


def test_autokeras_numerical_encoding_is_nan_to_zero_and_categorical_columns_are_refused():
    import torch

    encode = KerasLayer("multi_category_encoding", "MultiCategoryEncoding", {"encoding": ["none"] * 4})
    model = keras_to_torch(KerasModel("m.zip", "Functional", [encode, _dense("d", 4, 1, "linear")]))
    dense = model(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    with_nan = model(torch.tensor([[1.0, float("nan"), 3.0, 4.0]]))
    zero = model(torch.tensor([[1.0, 0.0, 3.0, 4.0]]))
    assert torch.equal(with_nan, zero) and not torch.equal(dense, zero)
    mixed = KerasLayer("multi_category_encoding", "MultiCategoryEncoding", {"encoding": ["none", "int", "none"]})
    with pytest.raises(WeightFileError, match=r"\(MultiCategoryEncoding\): 1 of 3 columns use a categorical"):
        keras_to_torch(KerasModel("m.zip", "Functional", [mixed, _dense("d", 3, 1)]))
    with pytest.raises(WeightFileError, match=r"encodes 4 columns, not the 3-d input"):
        keras_to_torch(KerasModel("m.zip", "Functional", [_dense("d0", 3, 3), encode]))


def test_only_a_chain_of_layers_is_read():
    def layer(name, *sources):
        nodes = [[[source, 0, 0, {}] for source in sources]]
        return {"class_name": "Dense", "name": name, "config": {"name": name}, "inbound_nodes": nodes}

    inp = {"class_name": "InputLayer", "name": "in", "config": {"name": "in"}, "inbound_nodes": []}
    branch = {"layers": [inp, layer("a", "in"), layer("b", "in")], "input_layers": [["in", 0, 0]],
              "output_layers": [["b", 0, 0]]}  # fmt: skip
    with pytest.raises(WeightFileError, match="branches after layer 'in'"):
        ks._chain("Functional", branch, "m.zip")
    merge = {"layers": [inp, layer("a", "in", "in")], "input_layers": [["in", 0, 0]], "output_layers": [["a", 0, 0]]}
    with pytest.raises(WeightFileError, match="layer 'a' is called more than once or on several tensors"):
        ks._chain("Functional", merge, "m.zip")
    chain = {"layers": [layer("b", "a"), inp, layer("a", "in")], "input_layers": [["in", 0, 0]],
             "output_layers": [["b", 0, 0]]}  # fmt: skip
    assert [spec["name"] for spec in ks._chain("Functional", chain, "m.zip")] == ["in", "a", "b"]
