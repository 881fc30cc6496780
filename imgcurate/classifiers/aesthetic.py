"""LAION's aesthetic predictors on CLIP image embeddings, scoring roughly 0-10: the improved predictor (an MLP on
ViT-L/14 embeddings) and the first aesthetic predictor's linear head on ViT-B/32 embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgcurate.classifiers.base import ImageClassifier, check_head_file, head_size, pick_head
from imgcurate.classifiers.weights import WeightFile, cached_weights
from imgcurate.steps.base import local_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "AestheticClassifier",
    "AestheticMLP",
    "AestheticLinear",
    "AESTHETIC_WEIGHTS",
    "AESTHETIC_B32_WEIGHTS",
    "HEADS",
]

#: The published state dict (``sac+logos+ava1-l14-linearMSE.pth``, 3,714,759 bytes) at a fixed commit of its
#: repository, and its safetensors copy on the Hugging Face hub. The .pth digest is the one that several independent
#: public projects pin for this file; the safetensors copy is checked against the digest of its first download.
AESTHETIC_WEIGHTS = WeightFile(
    "sac+logos+ava1-l14-linearMSE.pth",
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/"
    "6934dd81792f086e613a121dbce43082cb8be85e/sac%2Blogos%2Bava1-l14-linearMSE.pth",
    sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
)
AESTHETIC_WEIGHTS_SAFETENSORS = WeightFile(
    "sac-logos-ava1-l14-linearMSE.safetensors",
    "https://huggingface.co/ttj/sac-logos-ava1-l14-linearMSE/resolve/main/model.safetensors",
)

#: LAION's first aesthetic predictor for ViT-B/32 (``sa_0_4_vit_b_32_linear.pth``: the state dict of one
#: ``nn.Linear(512, 1)``, keys ``weight`` and ``bias``; 3,435 bytes), trained on SAC ratings of normalised
#: embeddings. LAION publishes no digest: the digest of the first download is recorded and checked on later uses.
AESTHETIC_B32_WEIGHTS = WeightFile(
    "sa_0_4_vit_b_32_linear.pth",
    "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_b_32_linear.pth",
)


def AestheticLinear(input_size: int = 512) -> torch.nn.Module:  # noqa: N802 - a module factory, named like a class
    """The first aesthetic predictor's head: one ``nn.Linear(input_size, 1)``, named as in the published file."""
    from torch import nn

    return nn.Linear(input_size, 1)


def AestheticMLP(input_size: int = 768) -> torch.nn.Module:  # noqa: N802 - a module factory, named like a class
    """The predictor's layers, named as in the published file (``layers.0.weight`` ... ``layers.7.bias``).

    Linear 768->1024, Dropout 0.2, Linear 1024->128, Dropout 0.2, Linear 128->64, Dropout 0.1, Linear 64->16,
    Linear 16->1; no activations.
    """
    from torch import nn

    class _MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return _MLP()


#: How errors name the classifier.
WHAT = "the aesthetic predictor"

#: head name -> (embedding size, layers factory, published weights). ``auto`` picks by the embedding's size.
HEADS = {
    "ViT-L-14": (768, AestheticMLP, AESTHETIC_WEIGHTS),
    "ViT-B-32": (512, AestheticLinear, AESTHETIC_B32_WEIGHTS),
}


class AestheticClassifier(ImageClassifier):
    """LAION's aesthetic predictor on L2-normalised CLIP image embeddings: a score of about 0-10.

    Two published heads (:data:`HEADS`): the improved predictor for ViT-L/14 (768-d, an MLP) and the first
    predictor's linear head for ViT-B/32 (512-d). ``head="auto"`` picks the one whose size matches the embeddings
    (checked when a pipeline checks its columns, or on the first embeddings scored); 768-d until then.

    Args:
        model_path: a local copy of the published file (``.pth`` state dict or a safetensors copy). None downloads
            the chosen head's file into ``$IMGCURATE_HOME/weights`` once and reuses it offline.
        embedding_column: the column of CLIP image embeddings.
        pred_column: the output column.
        batch_size: embeddings per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        head: ``auto``, ``ViT-L-14`` or ``ViT-B-32``.

    Example:
        >>> emb = TimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai", pretrained=True,
        ...                         classifiers=[AestheticClassifier()])  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | None = None,
        embedding_column: str = "image_embedding",
        pred_column: str = "aesthetic_score",
        batch_size: int = 4096,
        device: str = "auto",
        head: str = "auto",
    ):
        size = head_size(HEADS, head, "AestheticClassifier")
        super().__init__(embedding_column, pred_column, "float32", batch_size, size, device)
        self.model_path = local_path(model_path)
        self.head = head
        self._size_known = head != "auto"  # with auto, known once the column check has run

    def check_dimension(self, dim: int, source: str | None = None) -> None:
        self._size_known = True
        self.embedding_size = pick_head(HEADS, self.head, dim, self.embedding_size)
        super().check_dimension(dim, source)

    def cache_key(self) -> tuple:
        return ("aesthetic", self.model_path, self.embedding_size, tuple(self.loaded_files().items()))

    def check_resources(self) -> None:
        """As :meth:`Step.check_resources`; and ``model_path``'s tensors, read from its header, fit the head for the
        embeddings (a damaged file, or another head's, is an error before any work)."""
        from imgcurate.embedders.state_dict import state_dict_shapes

        super().check_resources()
        if self.model_path is not None:
            shapes = {k.removeprefix("model."): v for k, v in state_dict_shapes(self.model_path).items()}
            check_head_file(HEADS, self.embedding_size, self.model_path, shapes, WHAT, any_size=not self._size_known)

    normalizes_input = True  # trained on L2-normalised CLIP embeddings

    def published_weights(self) -> WeightFile:
        return next(h for h in HEADS.values() if h[0] == self.embedding_size)[2]

    def load_model(self, device: str) -> torch.nn.Module:
        from imgcurate.embedders.timm import load_state_dict_file

        _, layers, weights = next(h for h in HEADS.values() if h[0] == self.embedding_size)
        path = str(self.model_path or cached_weights(weights))
        state = load_state_dict_file(path)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        check_head_file(HEADS, self.embedding_size, path, {k: tuple(v.shape) for k, v in state.items()}, WHAT)
        model = layers(self.embedding_size)
        model.load_state_dict(state)
        return model.eval().to(device)
