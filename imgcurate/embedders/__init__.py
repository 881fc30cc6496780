"""Embedders: ImageEmbedder (base), TimmImageEmbedder (any timm model, CLIP included) and ClipEmbedder (open_clip,
image and text towers; imported from :mod:`imgcurate.embedders.clip`, it needs ``open-clip-torch``)."""

from imgcurate.embedders.base import ImageEmbedder
from imgcurate.embedders.timm import TimmImageEmbedder, load_state_dict_file

__all__ = ["ImageEmbedder", "TimmImageEmbedder", "load_state_dict_file"]
