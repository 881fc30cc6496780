"""Deduplication: exact (content hash) and semantic (KMeans + in-cluster cosine similarity)."""

from imgcurate.dedup.exact import ExactDuplicates
from imgcurate.dedup.semantic import SemanticDeduplicator

__all__ = ["ExactDuplicates", "SemanticDeduplicator"]
