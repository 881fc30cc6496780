"""The step contract (:mod:`imgcurate.steps.base`); the steps themselves live in ``embedders``, ``classifiers``,
``dedup`` and ``filters``."""

from imgcurate.steps.base import ColumnError, Requirement, ShardIO, ShardStep, Step

__all__ = ["ColumnError", "Requirement", "ShardIO", "ShardStep", "Step"]
