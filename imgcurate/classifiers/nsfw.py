"""LAION's CLIP-based NSFW detectors: ViT-L/14 (the PyTorch conversion of its Keras model), ViT-H/14 (published
as a PyTorch state dict, the head clip-retrieval uses for H/14) and ViT-B/32.

The ViT-B/32 detector (``clip_autokeras_nsfw_b32.zip``) is published only as an autokeras model in TensorFlow's
SavedModel format. It is read unchanged, without TensorFlow, by :mod:`imgcurate.classifiers.keras_savedmodel`, which
builds the torch module from the saved layer configuration and checkpoint. Any SavedModel given as ``model_path``
(a folder or a zip of one, such as the original Keras L/14 detector) is read the same way."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from imgcurate.classifiers.base import ImageClassifier, check_head_file, head_size, pick_head
from imgcurate.classifiers.keras_savedmodel import is_keras_savedmodel, keras_to_torch
from imgcurate.classifiers.weights import WeightFile, cached_weights
from imgcurate.steps.base import local_path

if TYPE_CHECKING:
    import torch

__all__ = ["NsfwClassifier", "NsfwMLP", "NsfwH14MLP", "NSFW_WEIGHTS", "NSFW_H14_WEIGHTS", "NSFW_B32_WEIGHTS", "HEADS"]

#: The published PyTorch conversion: a zip holding ``clip_autokeras_binary_nsfw.pth``. No digest is published for it;
#: the digest of the first download is recorded in the cache and checked on every later use.
NSFW_WEIGHTS = WeightFile(
    "clip_autokeras_binary_nsfw.zip",
    "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/clip_autokeras_binary_nsfw.zip",
)

#: The ViT-H/14 detector (``h14_nsfw.pth``, a torch state dict with keys ``layers.{0,3,6,9,12,15,16}.{weight,bias}``)
#: in the detector's repository, where clip-retrieval downloads it from. No digest is published for it either.
NSFW_H14_WEIGHTS = WeightFile(
    "h14_nsfw.pth",
    "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/h14_nsfw.pth",
)

#: The ViT-B/32 detector: a zip of the autokeras SavedModel folder ``clip_autokeras_nsfw_b32`` (``saved_model.pb``,
#: ``keras_metadata.pb``, ``variables/``), where clip-retrieval downloads it from. Its layers are read from the file.
#: No digest is published for it.
NSFW_B32_WEIGHTS = WeightFile(
    "clip_autokeras_nsfw_b32.zip",
    "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/clip_autokeras_nsfw_b32.zip",
)


def NsfwH14MLP(input_size: int = 1024) -> torch.nn.Module:  # noqa: N802 - a module factory, named like a class
    """The H/14 detector's layers, named as in the published file: Linear 1024->1024, ReLU, Dropout, 1024->2048,
    ReLU, Dropout, 2048->1024, ReLU, Dropout, 1024->256, ReLU, Dropout, 256->128, ReLU, Dropout, 128->16, 16->1.

    Its output is used as published (clip-retrieval applies no sigmoid): about 0-1, higher is less safe, but not
    bounded like the L/14 detector's probability.
    """
    from torch import nn

    class _MLP(nn.Module):
        def __init__(self):
            super().__init__()
            sizes = [input_size, 1024, 2048, 1024, 256, 128]
            layers: list[nn.Module] = []
            for a, b in zip(sizes, sizes[1:], strict=False):
                layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.2)]
            self.layers = nn.Sequential(*layers, nn.Linear(128, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    return _MLP()


def NsfwMLP(input_size: int = 768) -> torch.nn.Module:  # noqa: N802 - a module factory, named like a class
    """The detector's layers, named as in the published conversion.

    ``norm`` (buffers ``mean`` and ``variance``: ``(x - mean) / sqrt(variance)``), then ``linear_1`` 768->64, ReLU,
    ``linear_2`` 64->512, ReLU, ``linear_3`` 512->256, ReLU, ``linear_4`` 256->1, sigmoid.
    """
    import torch
    from torch import nn

    class _Normalization(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(input_size))
            self.register_buffer("variance", torch.ones(input_size))

        def forward(self, x):
            return (x - self.mean) / self.variance.sqrt()

    class _MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = _Normalization()
            self.linear_1 = nn.Linear(input_size, 64)
            self.linear_2 = nn.Linear(64, 512)
            self.linear_3 = nn.Linear(512, 256)
            self.linear_4 = nn.Linear(256, 1)

        def forward(self, x):
            x = torch.relu(self.linear_1(self.norm(x)))
            x = torch.relu(self.linear_2(x))
            x = torch.relu(self.linear_3(x))
            return torch.sigmoid(self.linear_4(x))

    return _MLP()


#: How errors name the classifier.
WHAT = "the NSFW detector"

#: head name -> (embedding size, layers factory, published weights). ``auto`` picks by the embedding's size. A factory
#: of None: the head is published as a Keras SavedModel, whose layers are read from the file.
HEADS = {
    "ViT-L-14": (768, NsfwMLP, NSFW_WEIGHTS),
    "ViT-H-14": (1024, NsfwH14MLP, NSFW_H14_WEIGHTS),
    "ViT-B-32": (512, None, NSFW_B32_WEIGHTS),
}


class NsfwClassifier(ImageClassifier):
    """LAION's CLIP-based NSFW detector on CLIP image embeddings: a score 0-1 (1 = unsafe).

    Three published heads (:data:`HEADS`): ViT-L/14 (768-d, a probability), ViT-H/14 (1024-d) and ViT-B/32 (512-d,
    a probability; the Keras SavedModel read without TensorFlow). ``head="auto"`` picks the one whose size matches the
    embeddings (when a pipeline checks its columns, or on the first embeddings scored); 768-d until then.

    Args:
        model_path: a local ``.pth``/``.safetensors`` state dict, the published zip, or a Keras SavedModel (a folder
            or a zip of one). None downloads the chosen head's file into ``$IMGCURATE_HOME/weights`` once and reuses
            it offline.
        embedding_column: the column of CLIP image embeddings.
        pred_column: the output column.
        batch_size: embeddings per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        head: ``auto``, ``ViT-L-14``, ``ViT-H-14`` or ``ViT-B-32``.

    Example:
        >>> clf = NsfwClassifier(head="ViT-B-32")  # reads clip_autokeras_nsfw_b32.zip when it first scores
        >>> clf.embedding_size
        512
    """

    def __init__(
        self,
        model_path: str | None = None,
        embedding_column: str = "image_embedding",
        pred_column: str = "nsfw_score",
        batch_size: int = 4096,
        device: str = "auto",
        head: str = "auto",
    ):
        size = head_size(HEADS, head, "NsfwClassifier")
        super().__init__(embedding_column, pred_column, "float32", batch_size, size, device)
        self.model_path = local_path(model_path)
        self.head = head
        self._size_known = head != "auto"  # with auto, known once the column check has run

    def check_dimension(self, dim: int, source: str | None = None) -> None:
        self._size_known = True
        self.embedding_size = pick_head(HEADS, self.head, dim, self.embedding_size)
        super().check_dimension(dim, source)

    def cache_key(self) -> tuple:
        return ("nsfw", self.model_path, self.embedding_size, tuple(self.loaded_files().items()))

    def check_resources(self) -> None:
        """As :meth:`Step.check_resources`; and a state dict given as ``model_path`` (a file, or the published zip)
        is read from its header and must fit the head for the embeddings: a damaged file, or another head's, is an
        error before any work."""
        from imgcurate.embedders.state_dict import state_dict_shapes

        super().check_resources()
        path = self.model_path
        if path is not None and os.path.isfile(path) and not is_keras_savedmodel(path):
            shapes = state_dict_shapes(path)
            check_head_file(HEADS, self.embedding_size, path, shapes, WHAT, any_size=not self._size_known)

    normalizes_input = True  # trained on L2-normalised CLIP embeddings

    def published_weights(self) -> WeightFile:
        return next(h for h in HEADS.values() if h[0] == self.embedding_size)[2]

    def load_model(self, device: str) -> torch.nn.Module:
        from imgcurate.embedders.timm import load_state_dict_file

        name, (_, layers, weights) = next((n, h) for n, h in HEADS.items() if h[0] == self.embedding_size)
        path = str(self.model_path or cached_weights(weights))
        if is_keras_savedmodel(path):
            model = keras_to_torch(path)
            if model.input_size != self.embedding_size or model.output_size != 1:
                raise ValueError(
                    f"{path}: a Keras model from {model.input_size}-d input to {model.output_size} outputs, not the "
                    f"{name} head ({self.embedding_size}-d input, one score)"
                )
            return model.eval().to(device)
        state = load_state_dict_file(path)
        # a state dict for a head published only as a Keras model (B/32) is refused here too, naming the heads it fits
        check_head_file(HEADS, self.embedding_size, path, {k: tuple(v.shape) for k, v in state.items()}, WHAT)
        model = layers(self.embedding_size)
        model.load_state_dict(state)
        return model.eval().to(device)
