"""Classifiers on embeddings: ImageClassifier (base), AestheticClassifier (0-10), NsfwClassifier (0-1)."""

from imgcurate.classifiers.aesthetic import AestheticClassifier
from imgcurate.classifiers.base import ImageClassifier
from imgcurate.classifiers.nsfw import NsfwClassifier

__all__ = ["AestheticClassifier", "ImageClassifier", "NsfwClassifier"]
