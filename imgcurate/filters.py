"""Selecting samples: a boolean ``keep`` column built from thresholds, with the reasons for every drop.

Scales, so that thresholds mean what they say:

- ``aesthetic_score`` (:class:`~imgcurate.classifiers.AestheticClassifier`) is roughly 0-10, as in the LAION
  improved aesthetic predictor: about 4.5-5 is an average web photo; LAION-Aesthetics used >= 5, 6 and 6.5 for its
  subsets. ``min_aesthetic=5.0`` is a mild filter, ``6.5`` a strict one. It is not a 0-1 probability.
- ``nsfw_score`` (:class:`~imgcurate.classifiers.NsfwClassifier`) is a probability 0-1; ``max_nsfw=0.5`` drops
  samples the detector thinks more likely unsafe than not, lower values are stricter.
- Width, height and aspect ratio are read from the metadata (``width``/``height`` columns).

A sample whose value is null or NaN for a rule (a failed decode gives null scores) fails that rule, whatever its
operator (``!=`` too). For the size and score options (``min_width``, ``max_aspect_ratio``, ``min_aesthetic``, ...)
its reason is ``<column> unknown`` (img2dataset run with ``disable_all_reencoding`` records no width or height), not
the option's comparison. Reasons are joined with ``;`` in ``drop_reason``, so a reason may not contain one.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate import progress
from imgcurate._dask import Shard
from imgcurate.backends import to_pandas
from imgcurate.io.schema import is_error_column
from imgcurate.steps.base import ColumnError, ShardIO, ShardStep

if TYPE_CHECKING:
    from imgcurate.dataset import ImageTextPairDataset

__all__ = ["ImageSize", "Rule", "SampleFilter", "drop_report"]

_OPS = {
    ">=": lambda s, v: s >= v,
    ">": lambda s, v: s > v,
    "<=": lambda s, v: s <= v,
    "<": lambda s, v: s < v,
    "==": lambda s, v: s == v,
    "!=": lambda s, v: s != v,
}
_ORDERING = (">=", ">", "<=", "<")
_SEPARATOR = ";"  # between the reasons of one sample in drop_reason; drop_report splits on it
_SPLITS = f"contains {_SEPARATOR!r}, which separates the reasons in drop_reason"


#: The totals of :func:`drop_report`, which no reason may be called.
_TOTALS = ("total", "kept", "dropped")


def _check_reason(reason: str, what: str) -> None:
    if _SEPARATOR in reason:
        raise ValueError(f"{what}: its reason {reason!r} {_SPLITS}: give a reason without it")
    if reason in _TOTALS:
        raise ValueError(f"{what}: its reason {reason!r} is the name of a total of the drop report: give another")


def _check_name(column: str, what: str, error: type[ValueError] = ValueError) -> None:
    """A column whose name goes into a rule's reason (and so into the drop counts) may not contain the separator."""
    if _SEPARATOR in column:
        raise error(f"{what} {column!r}: its name goes into its rule's reason, and {_SPLITS}: rename the column")


def _is_text(dtype: Any) -> bool:
    if isinstance(dtype, pd.CategoricalDtype):
        return pd.api.types.is_string_dtype(dtype.categories.dtype)
    return pd.api.types.is_string_dtype(dtype)


#: The kinds of values a filter option's column may be asked to hold (the words used in errors): a test on its dtype.
_KINDS = {
    "numbers": pd.api.types.is_numeric_dtype,  # booleans too: the rules compare them as 0 and 1
    "booleans": pd.api.types.is_bool_dtype,
    "text": _is_text,
}


def _held(kind: Any) -> str:
    """A column's dtype as an error message gives it: text may also be a column with no value in any shard, which
    the dataset reads as text (it has no other type to give it)."""
    return f"{kind} (text, or no value in any shard)" if _is_text(kind) else str(kind)


class OptionColumn(NamedTuple):
    """A column that a filter option reads, the kind of values it must hold (a key of ``_KINDS``), and a hint."""

    option: str
    column: str
    kind: str
    hint: str = ""


def _text_dtype(kind: Any) -> bool:
    """A pandas dtype of text (pandas' string dtype, or arrow's string types); not object, which may hold anything."""
    if isinstance(kind, pd.StringDtype):
        return True
    arrow = getattr(kind, "pyarrow_dtype", None)
    return arrow is not None and (pa.types.is_string(arrow) or pa.types.is_large_string(arrow))


@dataclass(frozen=True)
class Rule:
    """Keep a sample when ``column <op> value`` holds; otherwise it is dropped for ``reason``.

    ``op`` is one of ``>= > <= < == !=``, or ``isnull``/``notnull`` (``value`` unused). A null or NaN value fails
    every operator but ``isnull``. ``reason`` (by default ``"<column> <op> <value>"``) may not contain ``;``.

    Raises:
        ValueError: an unknown ``op``, or a reason with a ``;`` (naming the rule).

    Example:
        >>> Rule("clip_score", ">=", 0.28, reason="low CLIP score").name
        'low CLIP score'
    """

    column: str
    op: str
    value: Any = None
    reason: str | None = None

    def __post_init__(self):
        if self.op not in _OPS and self.op not in ("isnull", "notnull"):
            raise ValueError(f"unknown op {self.op!r}: choose one of {', '.join([*_OPS, 'isnull', 'notnull'])}")
        if isinstance(self.value, numbers.Real) and not isinstance(self.value, bool) and self.value != self.value:
            raise ValueError(f"rule {self.column} {self.op} nan: NaN compares false with every value (every sample "
                             "would be dropped); test for missing values with op isnull or notnull")  # fmt: skip
        _check_reason(self.name, f"rule {self.column} {self.op}" + ("" if self.value is None else f" {self.value!r}"))

    @property
    def name(self) -> str:
        if self.reason:
            return self.reason
        return f"{self.column} {self.op}" + ("" if self.op in ("isnull", "notnull") else f" {self.value}")

    def passes(self, df: pd.DataFrame) -> pd.Series:
        column = df[self.column]
        if self.op == "isnull":
            return column.isnull()
        if self.op == "notnull":
            return column.notnull()
        return (_OPS[self.op](column, self.value) & column.notna()).fillna(False).astype(bool)


def _known_and(reason: str, passes: Any, *columns: str) -> list[tuple[str, Any]]:
    """An option's rule as two: ``<column> unknown`` for each of ``columns`` that is null or NaN, and ``reason`` for
    a known value that fails ``passes``."""

    def known(column: str) -> Any:
        return lambda df: pd.to_numeric(df[column], errors="coerce").notna()

    def passes_or_unknown(df: pd.DataFrame) -> pd.Series:
        unknown = ~np.logical_and.reduce([known(c)(df).to_numpy(dtype=bool) for c in columns])
        return pd.Series(passes(df).to_numpy(dtype=bool, na_value=False) | unknown, index=df.index)

    return [(reason, passes_or_unknown)] + [(f"{c} unknown", known(c)) for c in columns]


@dataclass(repr=False)
class SampleFilter(ShardStep):
    """Adds ``keep`` (bool) and ``drop_reason`` (the failed rules, ``;``-separated; null when kept) columns.

    Args:
        min_width: drop images narrower than this (``width`` column).
        min_height: drop images lower than this (``height`` column).
        max_aspect_ratio: drop images whose longer side exceeds ``max_aspect_ratio`` times the shorter one.
        min_aesthetic: drop samples whose ``aesthetic_column`` is below this (0-10 scale).
        max_nsfw: drop samples whose ``nsfw_column`` is at or above this (0-1 probability).
        drop_errors: drop samples whose ``error`` column (or any ``*_error`` column) is set.
        drop_duplicates: boolean columns that mark duplicates (e.g. ``is_duplicate``); marked samples are dropped,
            and so are those with a null mark (a null fails its rule).
        rules: further :class:`Rule` objects.
        keep_column: the name of the boolean output column.
        reason_column: the name of the reason column.

    Example:
        >>> step = SampleFilter(min_width=256, min_aesthetic=5.0, max_nsfw=0.5)
        >>> ds = step(ds)  # doctest: +SKIP
        >>> ds.to_webdataset("out/", filter_column="keep")  # doctest: +SKIP
    """

    #: 2: a numeric ``*_error`` column is not an error column; a reason given by two rules is written once
    #: 3: a null size or score is dropped for ``<column> unknown``, not for the option's comparison
    results_version: ClassVar[int] = 3

    min_width: int | None = None
    min_height: int | None = None
    max_aspect_ratio: float | None = None
    min_aesthetic: float | None = None
    max_nsfw: float | None = None
    drop_errors: bool = True
    drop_duplicates: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    aesthetic_column: str = "aesthetic_score"
    nsfw_column: str = "nsfw_score"
    keep_column: str = "keep"
    reason_column: str = "drop_reason"

    def __post_init__(self):
        if isinstance(self.drop_duplicates, str):
            self.drop_duplicates = (self.drop_duplicates,)
        for option, column, _, _ in self._columns():
            _check_name(column, f"{self.name}'s {option} column")
        if self.keep_column == self.reason_column:
            raise ValueError(f"keep_column and reason_column are both {self.keep_column!r}: give them different names")
        bounds = {o: getattr(self, o) for o in ("min_width", "min_height", "max_aspect_ratio", "min_aesthetic",
                                                "max_nsfw")}  # fmt: skip
        bounds = {o: v for o, v in bounds.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        for option, value in bounds.items():
            if value != value:
                raise ValueError(f"{option}: NaN compares false with every value: give a number or None")
        for option in ("min_width", "min_height"):
            if bounds.get(option, 0) < 0:
                raise ValueError(f"{option}: a size of at least 0 pixels, got {bounds[option]!r}")
        ratio = bounds.get("max_aspect_ratio")
        if ratio is not None and ratio < 1:
            raise ValueError(f"max_aspect_ratio: the longer side over the shorter one, so at least 1 (1 keeps only "
                             f"square images), got {ratio!r}")  # fmt: skip
        rules = []
        for i, rule in enumerate(self.rules):
            if isinstance(rule, dict):
                unknown = sorted(set(rule) - {f.name for f in dataclasses.fields(Rule)})
                if unknown:
                    raise ValueError(f"rules[{i}]: unknown key {unknown[0]!r} (a rule has column, op, value, reason)")
                try:
                    rule = Rule(**rule)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"rules[{i}]: {err}") from None
            rules.append(rule)
        self.rules = tuple(rules)

    def _columns(self) -> list[OptionColumn]:
        """The columns that this filter's options read, with the kind of values each must hold. Their names go into
        the rules' reasons, so construction refuses a name with ``;``; :meth:`check` checks their types. Filters
        with options of their own add theirs."""
        columns = []
        if self.min_width is not None:
            columns.append(OptionColumn("min_width", "width", "numbers"))
        if self.min_height is not None:
            columns.append(OptionColumn("min_height", "height", "numbers"))
        if self.max_aspect_ratio is not None:
            columns += [OptionColumn("max_aspect_ratio", c, "numbers") for c in ("width", "height")]
        if self.min_aesthetic is not None:
            columns.append(OptionColumn("min_aesthetic", self.aesthetic_column, "numbers"))
        if self.max_nsfw is not None:
            columns.append(OptionColumn("max_nsfw", self.nsfw_column, "numbers"))
        hint = ": give a column that marks duplicates, such as 'exact_duplicate'"
        columns += [OptionColumn("drop_duplicates", str(c), "booleans", hint) for c in self.drop_duplicates]
        return columns

    def check(self, meta: Any, id_col: str) -> None:
        """As :meth:`Step.check`; also the columns' types, on ``meta`` before any work: each option's column holds
        what its rule compares (``drop_duplicates`` columns booleans, score and size columns numbers, and so on:
        :meth:`_columns`), each ``>= > <= <`` rule's column numbers (or booleans), and a numeric column's rules
        compare it with a number (``==`` and ``!=`` compare a column of any other type with any value). With
        ``drop_errors``, the error columns' names go into reasons, so none may contain ``;``.

        Raises:
            ColumnError: naming the step, the rule or option, the column and its type (or the error column whose
                name contains ``;``).
        """
        super().check(meta, id_col)
        present = set(map(str, meta.columns))

        def dtype(column: str) -> Any:
            return to_pandas(meta[[column]])[column].dtype

        for option, column, wanted, hint in self._columns():
            if column in present and not _KINDS[wanted](kind := dtype(column)):
                raise ColumnError(f"{self.name}'s {option} column {column!r} holds {_held(kind)}, not {wanted}{hint}")
        if self.drop_errors:
            for column in [c for c in present if is_error_column(c, dtype(c))]:
                _check_name(column, f"{self.name} (drop_errors) reads the error column", ColumnError)
        for i, rule in enumerate(self.rules):
            if rule.op in ("isnull", "notnull") or rule.column not in present:
                continue
            kind = dtype(rule.column)
            boolean = pd.api.types.is_bool_dtype(kind)
            numeric = pd.api.types.is_numeric_dtype(kind) and not boolean
            where = f"{self.name}'s rules[{i}] ({rule.column} {rule.op} {rule.value!r}): column {rule.column!r}"
            if rule.op in _ORDERING and not (numeric or boolean):
                raise ColumnError(f"{where} holds {_held(kind)}, not numbers, so {rule.op} cannot order it (== and != "
                                  "compare any type)")  # fmt: skip
            value = rule.value
            number = isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)
            if numeric and not number:
                raise ColumnError(f"{where} holds {kind}, which cannot be compared with {value!r} ({rule.op})")
            if boolean and not isinstance(value, bool | np.bool_ | int | float | np.number):
                raise ColumnError(f"{where} holds booleans, which cannot be compared with {value!r} ({rule.op})")
            if _text_dtype(kind) and number:  # a json field written as text in some shards is read as text
                raise ColumnError(f"{where} holds text, which never equals the number {value!r}: give the value as "
                                  f"text ({str(value)!r})")  # fmt: skip

    def _rules(self, columns: list[str]) -> list[tuple[str, Any]]:
        """(reason, predicate on the frame) pairs; predicates return True where the sample passes."""
        rules: list[tuple[str, Any]] = []
        if self.min_width is not None:
            rules += _known_and(f"width < {self.min_width}", Rule("width", ">=", self.min_width).passes, "width")
        if self.min_height is not None:
            rules += _known_and(f"height < {self.min_height}", Rule("height", ">=", self.min_height).passes, "height")
        if self.max_aspect_ratio is not None:
            limit = self.max_aspect_ratio

            def aspect(df):
                w, h = df["width"].astype("float64"), df["height"].astype("float64")
                ratio = w.where(w >= h, h) / w.where(w < h, h)
                return (ratio <= limit).fillna(False).astype(bool)

            rules += _known_and(f"aspect ratio > {limit}", aspect, "width", "height")
        if self.min_aesthetic is not None:
            reason = f"{self.aesthetic_column} < {self.min_aesthetic}"
            passes = Rule(self.aesthetic_column, ">=", self.min_aesthetic).passes
            rules += _known_and(reason, passes, self.aesthetic_column)
        if self.max_nsfw is not None:
            reason = f"{self.nsfw_column} >= {self.max_nsfw}"
            rules += _known_and(reason, Rule(self.nsfw_column, "<", self.max_nsfw).passes, self.nsfw_column)
        if self.drop_errors:
            for column in [c for c in columns if is_error_column(str(c))]:
                rules.append((f"{column} set", Rule(column, "isnull").passes))
        for column in self.drop_duplicates:
            rules.append((f"{column}", Rule(column, "!=", True).passes))
        rules.extend((r.name if r.reason else f"not {r.name}", r.passes) for r in self.rules)
        return rules

    def thresholds(self) -> dict[str, list[tuple[str, float]]]:
        found: dict[str, list[tuple[str, float]]] = {}
        for column, label, value in [("width", "min_width", self.min_width), ("height", "min_height", self.min_height),
                                     (self.aesthetic_column, "min_aesthetic", self.min_aesthetic),
                                     (self.nsfw_column, "max_nsfw", self.max_nsfw)]:  # fmt: skip
            if value is not None:
                found.setdefault(column, []).append((label, float(value)))
        for rule in self.rules:
            if rule.op in _OPS and isinstance(rule.value, int | float) and not isinstance(rule.value, bool):
                found.setdefault(rule.column, []).append((f"{rule.op}", float(rule.value)))
        return found

    def input_columns(self, id_col: str) -> list[str]:
        """The columns of the options (:meth:`_columns`) and of the rules."""
        return list(dict.fromkeys([*(c.column for c in self._columns()), *(r.column for r in self.rules)]))

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.keep_column: pa.bool_(), self.reason_column: pa.string()}

    def summary_columns(self) -> dict[str, str]:
        return {"keep": self.keep_column, "drop_reason": self.reason_column}

    def read_columns(self, meta: Any, id_col: str) -> list[str]:
        """The rule columns, plus every error column present when ``drop_errors`` is set."""
        errors = [c for c in map(str, meta.columns) if is_error_column(c, meta[c].dtype)] if self.drop_errors else []
        return list(dict.fromkeys([*self.input_columns(id_col), *errors]))

    def process(self, part: Any, shard: Shard, io: ShardIO) -> dict[str, Any]:
        frame = to_pandas(part)
        keep = np.ones(len(frame), dtype=bool)
        reasons = [[] for _ in range(len(frame))]
        columns = [c for c in map(str, frame.columns)
                   if c != io.id_col and (not is_error_column(c) or is_error_column(c, frame[c].dtype))]  # fmt: skip
        for name, passes in self._rules(columns):
            ok = passes(frame).to_numpy(dtype=bool, na_value=False)
            keep &= ok
            for row in np.flatnonzero(~ok):
                reasons[row].append(name)
        # a reason given by two rules (the same rule twice) is one reason of the sample, counted once
        text = [_SEPARATOR.join(dict.fromkeys(r)) if r else None for r in reasons]
        return {self.keep_column: keep, self.reason_column: pa.array(text, pa.string())}


def drop_report(dataset: ImageTextPairDataset, reason_column: str = "drop_reason") -> pd.Series:
    """How many samples each reason dropped (a sample dropped for two reasons counts under both), plus totals."""

    df = dataset.metadata
    column = df[reason_column]
    counts = column.dropna().str.split(_SEPARATOR).explode().value_counts()
    reasons, total, dropped = progress.compute([counts, column.size, column.notnull().sum()], desc="drop report")
    reasons, total, dropped = to_pandas(reasons), int(total), int(dropped)
    summary = pd.Series(dict(zip(_TOTALS, (total, total - dropped, dropped), strict=True)))
    return pd.concat([summary, reasons.astype("int64")])


class ImageSize(ShardStep):
    """Adds each image's width and height, read from its header (no pixels are decoded).

    For metadata that has none, as img2dataset writes with ``disable_all_reencoding`` (null ``width`` and
    ``height``), so that the size options of :class:`SampleFilter` and :class:`~imgcurate.text.ClipTextFilter` work.

    Args:
        width_column: the output column of widths; by default ``width``, the one the filters read (an input column of
            that name is replaced: a pipeline warns that it is).
        height_column: the output column of heights (``height``).
        error_column: why an image's size could not be read (no image, an unreadable header, a header declaring
            more pixels than PIL decodes); its width and height are null.

    Example:
        >>> ds = SampleFilter(min_width=256)(ImageSize()(ds))  # doctest: +SKIP
    """

    def __init__(self, width_column: str = "width", height_column: str = "height",
                 error_column: str = "image_size_error"):  # fmt: skip
        if len({width_column, height_column, error_column}) < 3:
            raise ValueError("width_column, height_column and error_column must be three different names")
        self.width_column = width_column
        self.height_column = height_column
        self.error_column = error_column

    def input_columns(self, id_col: str) -> list[str]:
        return [id_col]

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.width_column: pa.int32(), self.height_column: pa.int32(), self.error_column: pa.string()}

    def process(self, part: Any, shard: Shard, io: ShardIO) -> dict[str, Any]:
        from imgcurate.io.make import image_size
        from imgcurate.io.tar import aligned_images

        keys = to_pandas(part[[io.id_col]])[io.id_col].tolist()
        widths: list[int | None] = []
        heights: list[int | None] = []
        errors: list[str | None] = []
        for data, error in aligned_images(shard.tar, keys, io.storage_options):
            size = image_size(data) if data is not None else error
            known = isinstance(size, tuple)
            widths.append(size[0] if known else None)
            heights.append(size[1] if known else None)
            errors.append(None if known else size)
        return {self.width_column: pa.array(widths, pa.int32()), self.height_column: pa.array(heights, pa.int32()),
                self.error_column: pa.array(errors, pa.string())}  # fmt: skip
