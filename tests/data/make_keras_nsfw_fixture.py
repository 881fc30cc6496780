"""Writes the Keras SavedModel fixtures that tests/test_keras_savedmodel.py reads, and TensorFlow's own predictions.

LAION publishes its CLIP ViT-B/32 NSFW detector (``clip_autokeras_nsfw_b32.zip``) only as an autokeras model saved in
TensorFlow's SavedModel format by Keras 2: a zip of one folder holding ``saved_model.pb``, ``keras_metadata.pb`` (the
layer configuration as JSON) and ``variables/`` (the weights, a tensor-bundle checkpoint). imgcurate reads such a
folder without TensorFlow (``imgcurate.classifiers.keras_savedmodel``). This script makes small models of the same
kind with seeded weights, saves and zips them the same way, and records TensorFlow's predictions of the reloaded
models on fixed inputs, so the test compares our reader with TensorFlow itself.

TensorFlow is not a dependency of imgcurate or of its CI: the outputs are committed and the script is only rerun to
change them. It needs Keras 2, the last Keras that writes ``keras_metadata.pb`` (TensorFlow 2.16 and later bundle
Keras 3, whose SavedModel export has no layer configuration); it was run with ``tensorflow-cpu==2.15.1`` (Keras
2.15) on Python 3.11, in a throwaway virtual environment:

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.15.1
    /tmp/tfvenv/bin/python tests/data/make_keras_nsfw_fixture.py

Outputs, in this folder:

- ``keras_nsfw_b32.zip``: a Functional model shaped like autokeras's binary classifier on 512-d embeddings: Input,
  Normalization (adapted: mean and variance are weights), Dense 32, ReLU layer, Dropout, Dense 16 with a ``relu``
  activation, Dropout, Dense 1, and a sigmoid Activation layer named ``classification_head_1`` as autokeras names it.
- ``keras_sequential.zip``: a Sequential model on 512-d embeddings with the Normalization's mean and variance given in
  its configuration (not weights), Dense 8 ``tanh``, Dense 1 ``sigmoid``.
- ``keras_unsupported.zip``: a Sequential model with a LayerNormalization layer, which the reader must refuse.
- ``keras_predictions.npz``: ``inputs`` (8 x 512 float32, unit rows) and ``<zip stem>`` -> TensorFlow's predictions
  (8 x 1) of the model reloaded from its SavedModel folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import tempfile
import zipfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402 - after the log level is set
from tensorflow import keras  # noqa: E402

HERE = pathlib.Path(__file__).parent
DIM = 512


def _seeded(model: keras.Model, rng: np.random.Generator) -> None:
    """Replaces every Dense layer's kernel and bias with seeded values (biases non-zero, so a lost bias shows)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights(
                [
                    (rng.standard_normal(kernel.shape) / np.sqrt(kernel.shape[0])).astype("float32"),
                    (rng.standard_normal(bias.shape) * 0.1).astype("float32"),
                ]
            )


def b32_like(rng: np.random.Generator) -> keras.Model:
    inputs = keras.Input(shape=(DIM,), name="input_1")
    norm = keras.layers.Normalization(name="normalization")
    x = norm(inputs)
    x = keras.layers.Dense(32, name="dense")(x)
    x = keras.layers.ReLU(name="re_lu")(x)
    x = keras.layers.Dropout(0.25, name="dropout")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense_1")(x)
    x = keras.layers.Dropout(0.25, name="dropout_1")(x)
    x = keras.layers.Dense(1, name="dense_2")(x)
    outputs = keras.layers.Activation("sigmoid", name="classification_head_1")(x)
    model = keras.Model(inputs, outputs)
    # CLIP embeddings are small numbers with a per-dimension offset and spread: adapt on such a sample.
    sample = rng.standard_normal((256, DIM)) * rng.uniform(0.005, 0.05, DIM) + rng.normal(0, 0.02, DIM)
    norm.adapt(sample.astype("float32"))
    _seeded(model, rng)
    return model


def sequential(rng: np.random.Generator) -> keras.Model:
    mean = rng.normal(0, 0.02, DIM).astype("float32")
    variance = rng.uniform(0.0001, 0.002, DIM).astype("float32")
    model = keras.Sequential(
        [
            keras.Input(shape=(DIM,)),
            keras.layers.Normalization(mean=mean, variance=variance),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    _seeded(model, rng)
    return model


def unsupported(rng: np.random.Generator) -> keras.Model:
    model = keras.Sequential(
        [keras.Input(shape=(4,)), keras.layers.LayerNormalization(name="layer_norm"), keras.layers.Dense(1)]
    )
    _seeded(model, rng)
    return model


def save_zipped(model: keras.Model, stem: str, inputs: np.ndarray | None) -> np.ndarray | None:
    """Saves ``model`` as a SavedModel folder named ``stem``, zips it like LAION's file (one top folder), and
    returns TensorFlow's predictions of the reloaded model on ``inputs``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / stem
        model.save(str(folder), save_format="tf")
        target = HERE / f"{stem}.zip"
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                archive.write(path, path.relative_to(tmp).as_posix())
        if inputs is None:
            return None
        reloaded = keras.models.load_model(str(folder))
        return reloaded.predict(inputs, verbose=0)


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(14)
    inputs = rng.standard_normal((8, DIM)).astype("float32")
    inputs /= np.linalg.norm(inputs, axis=1, keepdims=True)
    predictions = {
        "keras_nsfw_b32": save_zipped(b32_like(rng), "keras_nsfw_b32", inputs),
        "keras_sequential": save_zipped(sequential(rng), "keras_sequential", inputs),
    }
    save_zipped(unsupported(rng), "keras_unsupported", None)
    np.savez(HERE / "keras_predictions.npz", inputs=inputs, **predictions)
    print(f"TensorFlow {tf.__version__}, Keras {importlib.metadata.version('keras')}")
    shutil.rmtree(HERE / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
