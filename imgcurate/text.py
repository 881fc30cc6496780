"""The text half of image-text pairs: caption features (word and character counts, language and its confidence) and
a filter on them and on the CLIP score, with the published presets.

Language identification is py3langid (``pip install imgcurate[text]``): its model ships inside the wheel, so it works
offline, and it is the fastest of the candidates whose model ships in the package (``benchmarks/language_id.py``;
figures in ``benchmarks/RESULTS.md``).

Presets of :class:`ClipTextFilter` (``preset=``), from their sources:

- ``datacomp_clip_l14_top30``: keep the top 30% of the pool by OpenAI CLIP ViT-L/14 score, DataComp's best single
  filter at small and medium scale (Gadre et al. 2023, "DataComp", arXiv:2304.14108, Table 3; baseline
  ``clip_score_l14_30_percent`` in github.com/mlfoundations/datacomp ``baselines.py``).
- ``datacomp_clip_b32``: OpenAI CLIP ViT-B/32 score above 0.25 (DataComp's B/32 threshold baseline, same sources).
- ``laion2b``: OpenAI ViT-B/32 score of at least 0.28 and an English caption, the rule LAION-2B-en was selected by
  (Schuhmann et al. 2022, "LAION-5B", arXiv:2210.08402, Section 3.2; LAION used CLD3 for the language).
- ``datacomp_basic``: DataComp's basic filter: English caption (fastText there), more than two words and more than
  five characters, smaller image side of at least 200 px and aspect ratio of at most 3 (DataComp, Section 3.4 and
  ``load_uids_with_basic_filter_helper`` in ``baselines/filters.py``).

The language model differs from the one each source used (CLD3, fastText), so ``laion2b`` and ``datacomp_basic``
reproduce their rules, not their exact selections.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa

from imgcurate import progress
from imgcurate._dask import Shard
from imgcurate.backends import to_pandas
from imgcurate.filters import OptionColumn, SampleFilter, _known_and
from imgcurate.steps.base import Requirement, ShardIO, ShardStep

if TYPE_CHECKING:
    import dask.dataframe as dd

    from imgcurate.dataset import ImageTextPairDataset

__all__ = [
    "CaptionFeatures",
    "ClipTextFilter",
    "PRESETS",
    "check_languages",
    "detect_languages",
    "global_quantile",
    "language_codes",
]

_LANGID = Requirement("py3langid", "py3langid", extra="text")


@functools.lru_cache(maxsize=1)
def _identifier() -> Any:
    from py3langid import langid

    return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)


def language_codes() -> frozenset[str] | None:
    """The codes :func:`detect_languages` gives (py3langid's model's languages: ISO 639-1, or 639-3 where a
    language has no two-letter code), or None where py3langid is not installed."""
    return frozenset(map(str, _identifier().nb_classes)) if _LANGID.installed() else None


def check_languages(languages: tuple[str, ...]) -> None:
    """Raises ValueError naming the first entry that is not a code :func:`detect_languages` gives, and the valid
    form (``'en'``, not ``'english'``); without py3langid, entries that are not 2-3 lowercase letters."""
    known = language_codes()
    for language in languages:
        if known is not None and language in known:
            continue
        if known is None and isinstance(language, str) and language.isascii() and language.isalpha() \
                and language.islower() and 2 <= len(language) <= 3:  # fmt: skip
            continue
        hint = f"one of {', '.join(sorted(known))}" if known is not None else "2-3 lowercase letters"
        raise ValueError(f"languages: {language!r} is not a language code; give the ISO 639 codes that py3langid "
                         f"identifies, such as 'en' or 'de' ({hint})")  # fmt: skip


def detect_languages(texts: list[str | None]) -> tuple[list[str | None], np.ndarray]:
    """ISO 639-1 language codes and their probabilities (0-1) for short texts; None and NaN for missing or blank
    texts, and for texts the model finds no feature of any language in (``"ok"``, ``"..."``, an emoji): it then
    scores every language alike, and its top label (``sr``, which it counts twice) is no answer."""
    identifier = _identifier()
    # a probability no higher than a language counted twice gets from uniform scores: the model abstains
    uniform = 2.0 / max(len(identifier.nb_classes), 1) * (1 + 1e-6)
    languages: list[str | None] = []
    confidence = np.full(len(texts), np.nan, dtype=np.float32)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            languages.append(None)
            continue
        language, probability = identifier.classify(text.replace("\n", " "))
        if probability <= uniform:
            languages.append(None)
            continue
        languages.append(str(language))
        confidence[i] = probability
    return languages, confidence


class CaptionFeatures(ShardStep):
    """Adds the caption's word count, character count and (optionally) language with its confidence.

    Words are whitespace-separated tokens (``str.split()``, as DataComp counts them); characters are the caption's
    length in Unicode code points. Missing captions give 0 words, 0 characters and a null language; so do captions
    with no feature of any language (``"ok"``, ``"..."``, an emoji), whose language is null with a NaN confidence.

    Args:
        caption_column: the metadata column of captions.
        language: also identify the language (needs ``py3langid``).
        prefix: prefix of the output columns: ``<prefix>words``, ``<prefix>chars``, ``<prefix>language``,
            ``<prefix>language_confidence``.

    Example:
        >>> ds = CaptionFeatures()(ds)  # caption_words, caption_chars, caption_language, ...  # doctest: +SKIP
    """

    #: 2: no language for a caption the model finds no feature in (it said Serbian)
    results_version = 2

    def __init__(self, caption_column: str = "caption", language: bool = True, prefix: str = "caption_"):
        if language:
            _LANGID.check(type(self).__name__)
        self.caption_column = caption_column
        self.language = language
        self.prefix = prefix

    def input_columns(self, id_col: str) -> list[str]:
        return [self.caption_column]

    def worker_requirements(self, backend: str) -> list[Requirement]:
        return [*super().worker_requirements(backend), *([_LANGID] if self.language else [])]

    def output_columns(self) -> dict[str, pa.DataType]:
        types = {f"{self.prefix}words": pa.int32(), f"{self.prefix}chars": pa.int32()}
        if self.language:
            types[f"{self.prefix}language"] = pa.string()
            types[f"{self.prefix}language_confidence"] = pa.float32()
        return types

    def process(self, part: Any, shard: Shard, io: ShardIO) -> dict[str, Any]:
        captions = to_pandas(part[[self.caption_column]])[self.caption_column]
        texts = [c if isinstance(c, str) else None for c in captions.tolist()]
        out: dict[str, Any] = {
            f"{self.prefix}words": np.array([len(t.split()) if t else 0 for t in texts], dtype=np.int32),
            f"{self.prefix}chars": np.array([len(t) if t else 0 for t in texts], dtype=np.int32),
        }
        if self.language:
            languages, confidence = detect_languages(texts)
            out[f"{self.prefix}language"] = pa.array(languages, pa.string())
            out[f"{self.prefix}language_confidence"] = confidence
        return out


#: preset name -> the ClipTextFilter fields it sets (see the module docs for the sources).
PRESETS: dict[str, dict[str, Any]] = {
    "datacomp_clip_l14_top30": {"clip_top_fraction": 0.3},
    "datacomp_clip_b32": {"min_clip_score": 0.25, "clip_score_inclusive": False},
    "laion2b": {"min_clip_score": 0.28, "languages": ("en",)},
    "datacomp_basic": {
        "languages": ("en",),
        "min_words": 3,
        "min_chars": 6,
        "min_side": 200,
        "max_aspect_ratio": 3.0,
    },
}

#: The CLIP model whose scores each preset's score rule was set on: open_clip's architecture and pretrained tag.
PRESET_MODELS: dict[str, tuple[str, str]] = {
    "datacomp_clip_l14_top30": ("ViT-L-14", "openai"),
    "datacomp_clip_b32": ("ViT-B-32", "openai"),
    "laion2b": ("ViT-B-32", "openai"),
}


def preset_model_problem(preset: str | None, model_name: str | None, pretrained: str | None) -> str | None:
    """Why scores of CLIP ``model_name`` (``pretrained``) do not suit ``preset``'s score rule, or None: a threshold
    or fraction chosen on one model's scores selects other samples on another's."""
    wanted = PRESET_MODELS.get(preset or "")
    if wanted is None or model_name is None:
        return None
    if (model_name.removesuffix("-quickgelu"), pretrained) == wanted:
        return None
    given = f"{model_name} ({pretrained})" if pretrained else f"{model_name} (no pretrained tag)"
    return (f"preset {preset!r} was set on scores of CLIP {wanted[0]} ({wanted[1]}), and the scores here come from "
            f"{given}: its rule selects other samples on that model's scores")  # fmt: skip


#: The most values :func:`global_quantile` gathers on the client (8 MB of float64).
GATHER = 1 << 20


def global_quantile(df: dd.DataFrame, column: str, q: float, bins: int = 1 << 16, gather: int = GATHER) -> float:
    """The ``q`` quantile of a column over the whole dataset, exactly, computed with Dask without gathering the column.

    The answer is a value of the column: with ``n`` finite values sorted ascending, the one at 0-based rank
    ``floor(q * n)`` (the largest at ``q = 1``), so at most ``q * n`` values lie below it and every value at or above
    it (ties included) makes up at least the top ``1 - q``. This is the cut of "keep the top fraction ``f``": the
    ``ceil(f * n)``-th largest value, with ``q = 1 - f``. ``q`` is read as the decimal it prints as (``0.7``, not
    the binary float just below it), so ``floor(q * n)`` does not move by one with the float's rounding.

    Dask passes, each sending only small results to the client: the finite values' min, max and count; a histogram
    of ``bins`` equal bins summed as a tree (``dask.array.histogram``), which finds the bin that holds the rank; then
    the values inside that bin alone, of which the exact one is taken. Where that bin still holds more than
    ``gather`` values (:data:`GATHER`, 2^20, 8 MB), its values' range is split again into ``bins`` bins (one more
    min/max pass and one more histogram) until it holds at most that many or only one distinct value. So at most
    ``gather`` values reach the client, the answer has no error, and up to about ``bins * gather`` (7 x 10^10) values
    it takes three passes over the column. (Dask's own ``Series.quantile`` merges per-partition percentiles: 2% rank
    error at ``q=0.1`` on 50 partitions of uniform values.) The column's finite values are computed once and held
    (persisted: 8 bytes a value, on the workers under a distributed client, else in this process) while the passes
    run, so a lazily computed score runs its model once here; the step that then filters on the quantile computes it
    again, unless it was persisted or comes from a pipeline's run directory.

    Nulls, NaN and infinite values are left out of ``n`` and of the cut. A filter that keeps ``value >= cut``
    (:class:`ClipTextFilter`'s ``clip_top_fraction``) so keeps ``+inf`` (above any cut) and drops ``-inf`` and NaN.

    Args:
        df: the metadata.
        column: a numeric column.
        q: the quantile, 0 to 1.
        bins: bins per histogram.
        gather: the most values brought to the client (the bin holding the quantile is split until it holds no more).

    Returns:
        The quantile, one of the column's finite values.

    Raises:
        ValueError: ``q`` is not in [0, 1], or the column has no finite value.

    Example:
        >>> import dask.dataframe as dd, pandas as pd
        >>> df = dd.from_pandas(pd.DataFrame({"s": [0.1, 0.3, 0.4, 0.9, 0.5, 0.6]}), npartitions=2)
        >>> global_quantile(df, "s", 0.5)  # top half: 0.9, 0.6 and 0.5
        0.5
    """
    import dask.array as da

    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    values = df[column].dropna().astype("float64")
    # the passes below read the finite values again and again: computed once and held until the quantile is known,
    # so that a lazily computed score (a model's output) runs once, not once per pass. Without the rows' ids (a fresh
    # index per partition) they take 8 bytes a value, on the workers under a distributed client (else in this
    # process); let go on return, and on an error too (a traceback keeps this frame, not its deleted locals).
    values = progress.persist(values[values.abs() < np.inf].reset_index(drop=True), desc=f"{column}: values for "
                              "the quantile")  # fmt: skip
    try:
        lo, hi, n = progress.compute([values.min(), values.max(), values.count()], desc=f"{column}: range")
        if not n:
            raise ValueError(f"column {column!r} has no finite values to take a quantile of")
        lo, hi, n = float(lo), float(hi), int(n)
        rank = min(int(Fraction(repr(float(q))) * n), n - 1)  # 0-based, ascending, among the finite values
        while hi > lo:
            edges = np.linspace(lo, hi, bins + 1)
            counts, _ = da.histogram(values.to_dask_array(), bins=edges)
            (counts,) = progress.compute([counts], desc=f"{column}: histogram")
            cumulative = np.cumsum(counts)
            index = int(np.searchsorted(cumulative, rank, side="right"))  # the bin of the rank-th value
            rank -= int(cumulative[index - 1]) if index else 0
            size = int(counts[index])
            # np.histogram's bins: [edge, next edge), the last one closed
            upper = values <= hi if index == bins - 1 else values < edges[index + 1]
            values = values[(values >= edges[index]) & upper]
            if size <= gather:
                (inside,) = progress.compute([values.to_frame()], desc=f"{column}: the quantile's bin")
                inside = to_pandas(inside)[column].to_numpy(dtype=np.float64)
                return float(np.partition(inside, rank)[rank])
            new_lo, new_hi = progress.compute([values.min(), values.max()], desc=f"{column}: the quantile's bin")
            if (float(new_lo), float(new_hi)) == (lo, hi):  # cannot happen: one bin never spans both ends
                raise RuntimeError(f"{column}: the quantile's bin did not narrow from [{lo!r}, {hi!r}]")
            lo, hi = float(new_lo), float(new_hi)
        return lo
    finally:
        del values


@dataclass(repr=False)
class ClipTextFilter(SampleFilter):
    """:class:`~imgcurate.filters.SampleFilter` with CLIP-score and caption rules and published presets.

    Adds ``keep`` and ``drop_reason`` like SampleFilter (every SampleFilter option works here too), with:

    Args:
        preset: ``datacomp_clip_l14_top30``, ``datacomp_clip_b32``, ``laion2b`` or ``datacomp_basic`` (see the module
            docs); fields given explicitly override the preset's.
        min_clip_score: drop samples whose ``clip_score_column`` is below this (cosine, -1 to 1).
        clip_score_inclusive: keep a score equal to ``min_clip_score`` (``>=``); False keeps only ``>``.
        clip_top_fraction: keep the best-scored fraction of the whole dataset: the threshold is the exact
            ``ceil(clip_top_fraction * n)``-th largest of the ``n`` finite scores (the global ``1 - clip_top_fraction``
            quantile, :func:`global_quantile`), computed with Dask when the step is applied; ``threshold`` holds it
            afterwards. Every score at or above it is kept, so ties at the cut are all kept (and more than the
            fraction may be); ``1.0`` keeps every finite score. A ``+inf`` score is kept and does not count in
            ``n``; ``-inf``, NaN and null scores are dropped.
        min_words: drop captions with fewer words (``caption_words`` of :class:`CaptionFeatures`).
        min_chars: drop captions with fewer characters (``caption_chars``).
        languages: keep only captions identified as one of these ISO 639-1 codes (``caption_language``): ``en``,
            not ``english`` (:func:`language_codes` lists them; another value is a ``ValueError`` here).
        min_language_confidence: with ``languages``, also drop identifications less confident than this.
        min_side: drop images whose smaller side is below this (``width``/``height``).

    Example:
        >>> ds = ClipEmbedder("ViT-B-32", pretrained="openai")(ds)  # doctest: +SKIP
        >>> ds = ClipTextFilter(preset="laion2b")(CaptionFeatures()(ds))  # doctest: +SKIP
    """

    preset: str | None = None
    min_clip_score: float | None = None
    clip_score_inclusive: bool = True
    clip_top_fraction: float | None = None
    min_words: int | None = None
    min_chars: int | None = None
    languages: tuple[str, ...] = ()
    min_language_confidence: float | None = None
    min_side: int | None = None
    clip_score_column: str = "clip_score"
    caption_prefix: str = "caption_"

    gpu: ClassVar[str] = "no"
    #: 3: a caption in a kept language identified with too little confidence is dropped for that, not its language
    #: 4: a null size or score is dropped for ``<column> unknown``, not for the option's comparison
    results_version: ClassVar[int] = 4

    def __post_init__(self):
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given = getattr(self, "_given", None)  # the arguments given (see Step.__new__); None: unpickled
            for key, value in PRESETS[self.preset].items():
                if key not in given if given is not None else getattr(self, key) == defaults[key]:
                    setattr(self, key, value)
        if isinstance(self.languages, str):
            self.languages = (self.languages,)
        self.languages = tuple(self.languages)
        super().__post_init__()  # after the preset: it checks the columns of every rule, the preset's too
        check_languages(self.languages)
        for option in ("min_clip_score", "min_words", "min_chars", "min_language_confidence", "min_side",
                       "clip_top_fraction"):  # fmt: skip
            value = getattr(self, option)
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and value != value:
                raise ValueError(f"{option}: NaN compares false with every value: give a number or None")
        if self.clip_top_fraction is not None and not 0 < self.clip_top_fraction <= 1:
            raise ValueError(f"clip_top_fraction must be in (0, 1], got {self.clip_top_fraction}")
        if self.min_language_confidence is not None and not self.languages:
            raise ValueError("min_language_confidence applies to the languages kept: give languages too (e.g. "
                             "languages: [en])")  # fmt: skip
        self.threshold: float | None = None

    def _rules(self, columns: list[str]) -> list[tuple[str, Any]]:
        rules = super()._rules(columns)
        score = self.clip_score_column
        if self.min_clip_score is not None:
            op = ">=" if self.clip_score_inclusive else ">"
            reason = f"{score} {'<' if op == '>=' else '<='} {self.min_clip_score}"
            rules += _known_and(reason, lambda df, v=self.min_clip_score: _cmp(df[score], op, v), score)
        if self.clip_top_fraction is not None:
            if self.threshold is None:
                raise RuntimeError("clip_top_fraction needs the global threshold: apply the step to the dataset")
            reason = f"{score} not in top {self.clip_top_fraction:.0%}"
            rules += _known_and(reason, lambda df, v=self.threshold: _cmp(df[score], ">=", v), score)
        p = self.caption_prefix
        if self.min_words is not None:
            rules.append((f"{p}words < {self.min_words}", lambda df: _cmp(df[f"{p}words"], ">=", self.min_words)))
        if self.min_chars is not None:
            rules.append((f"{p}chars < {self.min_chars}", lambda df: _cmp(df[f"{p}chars"], ">=", self.min_chars)))
        if self.languages:
            wanted = set(self.languages)

            def language(df: pd.DataFrame) -> pd.Series:
                return df[f"{p}language"].isin(wanted).fillna(False).astype(bool)

            rules.append((f"{p}language not in {','.join(self.languages)}", language))
            if self.min_language_confidence is not None:
                least = self.min_language_confidence

                def confident(df: pd.DataFrame) -> pd.Series:
                    # a caption in another language is dropped for its language only, not for this too
                    return ~language(df) | _cmp(df[f"{p}language_confidence"], ">=", least)

                rules.append((f"{p}language_confidence < {least}", confident))
        if self.min_side is not None:

            def side(df: pd.DataFrame) -> pd.Series:
                smaller = np.minimum(df["width"].astype("float64"), df["height"].astype("float64"))
                return (smaller >= self.min_side).fillna(False).astype(bool)

            rules += _known_and(f"smaller side < {self.min_side}", side, "width", "height")
        return rules

    def _columns(self) -> list[OptionColumn]:
        columns = super()._columns()
        p = self.caption_prefix
        for option in ("min_clip_score", "clip_top_fraction"):
            if getattr(self, option) is not None:
                columns.append(OptionColumn(option, self.clip_score_column, "numbers"))
        if self.min_words is not None:
            columns.append(OptionColumn("min_words", f"{p}words", "numbers"))
        if self.min_chars is not None:
            columns.append(OptionColumn("min_chars", f"{p}chars", "numbers"))
        if self.languages:
            columns.append(OptionColumn("languages", f"{p}language", "text"))
            if self.min_language_confidence is not None:
                columns.append(OptionColumn("min_language_confidence", f"{p}language_confidence", "numbers"))
        if self.min_side is not None:
            columns += [OptionColumn("min_side", c, "numbers") for c in ("width", "height")]
        return columns

    def thresholds(self) -> dict[str, list[tuple[str, float]]]:
        found = super().thresholds()
        score, p = self.clip_score_column, self.caption_prefix
        if self.min_clip_score is not None:
            found.setdefault(score, []).append(("min_clip_score", float(self.min_clip_score)))
        if self.clip_top_fraction is not None and self.threshold is not None:
            found.setdefault(score, []).append((f"top {self.clip_top_fraction:.0%}", float(self.threshold)))
        confidence = self.min_language_confidence if self.languages else None
        for column, label, value in [(f"{p}words", "min_words", self.min_words),
                                     (f"{p}chars", "min_chars", self.min_chars),
                                     (f"{p}language_confidence", "min_language_confidence", confidence)]:  # fmt: skip
            if value is not None:
                found.setdefault(column, []).append((label, float(value)))
        if self.min_side is not None:  # the smaller side is at least this exactly when both sides are
            for column in ("width", "height"):
                found.setdefault(column, []).append(("min_side", float(self.min_side)))
        return found

    def upstream_warnings(self, writers: Mapping[str, Any]) -> list[str]:
        writer = writers.get(self.clip_score_column)
        problem = preset_model_problem(self.preset, getattr(writer, "model_name", None),
                                       getattr(writer, "pretrained", None))  # fmt: skip
        return [problem] if problem else []

    def thresholds_for(self, dataset: ImageTextPairDataset) -> dict[str, list[tuple[str, float]]]:
        if self.clip_top_fraction is not None:  # this dataset's, not one the step was applied to before
            self._fit_threshold(dataset)
        return self.thresholds()

    def _fit_threshold(self, dataset: ImageTextPairDataset) -> None:
        q = float(1 - Fraction(repr(float(self.clip_top_fraction))))  # 1 - 0.3 is 0.7, not 0.7000000000000001
        self.threshold = global_quantile(dataset.metadata, self.clip_score_column, q)

    def added(self, dataset: ImageTextPairDataset) -> dd.DataFrame:
        if self.clip_top_fraction is not None:
            self._fit_threshold(dataset)
        return super().added(dataset)


def _cmp(series: pd.Series, op: str, value: Any) -> pd.Series:
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    result = values >= value if op == ">=" else values > value
    return result.fillna(False).astype(bool)
