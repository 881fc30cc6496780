"""The ``imgcurate`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

EXAMPLE_CONFIG = """\
# imgcurate pipeline: steps run in order over the input shards, then the kept samples are exported.
input: sample_data/shards
output: sample_data/curated
id_col: key
backend: auto            # auto | pandas | cudf
# cluster: {n_workers: 2, threads_per_worker: 1}   # or {address: tcp://host:8786}, or {type: cuda}
steps:
  - ExactDuplicates: {}    # sha256 of each image; marks every copy after the first (exact_duplicate)
  - SampleFilter:
      min_width: 256       # pixels
      max_aspect_ratio: 3.0
      drop_errors: true    # drop samples whose error column is set
      drop_duplicates: [exact_duplicate]
reports:                   # written after the steps, before the export
  duplicates: sample_data/duplicates.html
export:
  filter_column: keep
  samples_per_shard: 10000
  old_id_col: old_key
  index_files: false       # true also writes each shard's DALI index (.idx) for GPU reading
"""


def _cmd_sample(args: argparse.Namespace) -> int:
    from imgcurate.testing import make_sample_shards

    paths = make_sample_shards(args.out, samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
    print(f"wrote {len(paths)} sample shards to {args.out}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from imgcurate.io.make import make_shards

    paths = make_shards(
        args.src,
        args.out,
        samples_per_shard=args.samples_per_shard,
        path_col=args.path_col,
        caption_col=args.caption_col,
        index_files=args.index_files,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    import fsspec

    from imgcurate.io._fs import files_in, task_url
    from imgcurate.io.index import write_indexes

    fs, root = fsspec.core.url_to_fs(args.folder)
    tars = files_in(fs, root, "*.tar")
    if not tars:
        if fs.isfile(root):
            raise NotADirectoryError(f"{args.folder}: a file, not a folder of .tar shards")
        raise FileNotFoundError(f"{args.folder}: no .tar shards")
    tars = [task_url(fs, t) for t in tars]
    errors: list = []
    written = write_indexes(tars, overwrite=args.overwrite, errors=errors)
    skipped = len(tars) - len(written) - len(errors)
    print(f"wrote {len(written)} DALI index files ({skipped} shards skipped: indexed or empty)")
    for err in errors:  # every shard that cannot be indexed, after the others have been
        print(f"imgcurate: error: {err}", file=sys.stderr)
    if errors:
        print(f"imgcurate: error: {len(errors)} shards could not be indexed", file=sys.stderr)
    return 1 if errors else 0


def _print_summary(facts: dict) -> None:
    print(
        f"samples in: {facts['samples_in']}" + (f", kept: {facts['samples_kept']}" if "samples_kept" in facts else "")
    )
    for reason, count in facts.get("drops_by_reason", {}).items():
        print(f"  dropped for {reason}: {count}")
    for kind, count in facts.get("duplicates", {}).items():
        print(f"  {kind} duplicates: {count}")
    for step in facts.get("steps", []):
        print(f"  {step['step']}: {step['shards_computed']} shards computed, {step['shards_reused']} reused, "
              f"{step['seconds']:.1f} s")  # fmt: skip


def _cmd_run(args: argparse.Namespace) -> int:
    from imgcurate.pipeline import Pipeline

    pipeline = Pipeline.from_yaml(args.config)
    if args.output:
        pipeline.export = {**(pipeline.export or {}), "path": args.output}
    if args.overwrite and pipeline.export:
        pipeline.export["overwrite"] = True
    if args.run_dir:
        pipeline.run_dir = args.run_dir

    out = pipeline.run(summary=_print_summary)
    if pipeline.resolved_run_dir():
        report = "; report.html, the run report" if pipeline.report else ""
        print(f"run directory: {pipeline.resolved_run_dir()} (summary.json{report})")
    for kwargs in pipeline.reports.values():
        print(f"wrote {kwargs['path']}")
    if pipeline.export:
        print(f"exported {len(out.metadata)} samples in {out.num_shards} shards to {out.path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from imgcurate.reports import report_run_dir

    if args.output == "-":  # the page on stdout, as config and init-config write theirs
        import tempfile

        with tempfile.TemporaryDirectory(prefix="imgcurate-report-") as folder:
            page = report_run_dir(args.run_dir, f"{folder}/report.html")
            with open(page, encoding="utf-8") as f:
                sys.stdout.write(f.read())
        return 0
    if args.output:
        _check_folder_of("--output", args.output)
    print(f"wrote {report_run_dir(args.run_dir, args.output)}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from imgcurate.estimate import estimate_config, estimate_input

    if args.config and args.config_file:
        raise ValueError("give the config once: as an argument or as --config")
    config = args.config or args.config_file
    if config:
        print(estimate_config(config, measure=args.measure, input_path=args.input_path).to_text())
    elif args.input_path:
        if args.measure:  # what it would time is the config's model and dedup
            raise ValueError("estimate: --measure times a pipeline's steps: give its config too (--config FILE)")
        print(estimate_input(args.input_path).to_text())
    else:
        raise ValueError("estimate: give --input-path DIR, a config (--config FILE), or both")
    return 0


def _cmd_stages(args: argparse.Namespace) -> int:
    from imgcurate.pipeline import STAGES, stage_info, stage_summary

    if not args.verbose and not args.json:
        width = max(map(len, STAGES))
        for name in sorted(STAGES):
            print(f"{name:<{width}}  {stage_summary(name)}")
        return 0
    infos = [stage_info(name) for name in sorted(STAGES)]
    if args.json:
        import json

        if not args.verbose:
            infos = [{k: info[k] for k in ("name", "summary", "available")} for info in infos]
        print(json.dumps(infos, indent=2))
        return 0
    for info in infos:
        print(f"{info['name']}: {info['summary'] or '(no summary)'}")
        if "error" in info:
            print(f"  unavailable here: {info['error']}")
            continue
        print(
            f"  GPU: {info['gpu']}"
            + ("" if info["available"] else "; unavailable here: an optional package is missing")
        )
        for r in info["requires"]:
            how = f"pip install 'imgcurate[{r['extra']}]'" if r["extra"] else f"pip install {r['package']}"
            print(f"  needs {r['package']}: {'installed' if r['installed'] else 'not installed (' + how + ')'}")
        for p in info["parameters"]:
            default = "required" if p["required"] else f"default {p['default']!r}"
            print(f"    {p['name']}: {p['type'] or '?'} ({default})")
    return 0


#: The production image tower: CLIP ViT-L/14 (OpenAI weights), whose 768-d embeddings feed LAION's aesthetic and
#: NSFW heads.
DEFAULT_MODEL = "vit_large_patch14_clip_quickgelu_224.openai"


def make_config(
    input_path: str,
    output_path: str,
    aesthetic_threshold: float | None = 5.0,
    nsfw_threshold: float | None = 0.5,
    dedup: bool = True,
    batch_size: int | None = None,
    images_per_tar: int = 10000,
    model: str = DEFAULT_MODEL,
    pretrained: bool = True,
    n_clusters: int | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = "openai",
    min_clip_score: float | None = None,
    clip_top_fraction: float | None = None,
    filter_preset: str | None = None,
    languages: Sequence[str] = (),
    min_caption_words: int | None = None,
) -> dict:
    """A pipeline config (the mapping ``imgcurate run`` reads): exact and semantic dedup, the CLIP image tower with the
    aesthetic and NSFW heads fused, a filter on their scores and on the duplicates, and the export.

    ``aesthetic_threshold`` / ``nsfw_threshold`` None leave out that head and its rule; the embedder is left out when
    neither head nor semantic dedup needs it. ``n_clusters`` None: one cluster per 1,000 samples of the input (the
    ratio of benchmarks/dedup.py), counted from its parquet footers when it exists, else 1,000.

    ``clip_model`` (an open_clip architecture such as ``ViT-L-14``, with ``clip_pretrained`` its weights' tag) makes
    the embedder :class:`~imgcurate.embedders.ClipEmbedder`: both towers, so each sample also gets its caption's
    embedding and ``clip_score``; the heads are fused on its image tower. ``min_clip_score``, ``clip_top_fraction``
    (of the whole dataset) and ``filter_preset`` (:data:`imgcurate.text.PRESETS`) filter on that score; ``languages``
    and ``min_caption_words`` add :class:`~imgcurate.text.CaptionFeatures`. Any of those makes the filter
    :class:`~imgcurate.text.ClipTextFilter` (SampleFilter's rules plus these). ``min_caption_words`` 0 sets no minimum,
    as None does: no rule and no CaptionFeatures for it (as ``aesthetic_threshold`` None leaves out head and rule).

    Raises:
        ValueError: a threshold outside its scale (aesthetic 0-10, NSFW 0-1, CLIP score -1-1, fraction 0-1], a size
            below 1, a negative ``min_caption_words``, ``min_caption_words`` 0 with a preset that sets a minimum (the
            config would keep the preset's), or a CLIP rule without ``clip_model``.
    """
    if aesthetic_threshold is not None and not 0 <= aesthetic_threshold <= 10:
        raise ValueError(f"--aesthetic-threshold: the aesthetic score is 0-10, got {aesthetic_threshold}")
    if nsfw_threshold is not None and not 0 < nsfw_threshold <= 1:
        raise ValueError(f"--nsfw-threshold: the NSFW score is a probability (0-1], got {nsfw_threshold}")
    if min_clip_score is not None and not -1 <= min_clip_score <= 1:
        raise ValueError(f"--min-clip-score: the CLIP score is a cosine (-1 to 1), got {min_clip_score}")
    if clip_top_fraction is not None and not 0 < clip_top_fraction <= 1:
        raise ValueError(f"--clip-top-fraction: a fraction of the dataset (0-1], got {clip_top_fraction}")
    from imgcurate.text import PRESETS

    if filter_preset is not None and filter_preset not in PRESETS:
        raise ValueError(f"--filter-preset: unknown preset {filter_preset!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS.get(filter_preset or "", {})
    clip_rules = {"min_clip_score": min_clip_score, "clip_top_fraction": clip_top_fraction, "preset": filter_preset}
    needs_clip = [
        f"--{k.replace('_', '-')}" for k in ("min_clip_score", "clip_top_fraction") if clip_rules[k] is not None
    ]
    if any(k in preset for k in ("min_clip_score", "clip_top_fraction")):
        needs_clip.append(f"--filter-preset {filter_preset}")
    if clip_model is None and needs_clip:
        raise ValueError(f"{', '.join(needs_clip)}: a CLIP-score rule needs the CLIP embedder (--clip-model, e.g. "
                         "ViT-L-14)")  # fmt: skip
    for flag, value in (
        ("--batch-size", batch_size),
        ("--images-per-tar", images_per_tar),
        ("--n-clusters", n_clusters),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")
    if min_caption_words is not None and min_caption_words < 0:
        raise ValueError(f"--min-caption-words: {_NO_MINIMUM}, got {min_caption_words}")
    if min_caption_words == 0 and "min_words" in preset:
        raise ValueError(f"--min-caption-words 0 has no effect with --filter-preset {filter_preset} (it sets min_words "
                         f"{preset['min_words']}): leave one of them out")  # fmt: skip
    min_caption_words = min_caption_words or None  # 0: no minimum-words rule
    steps: list[dict] = []
    duplicates: list[str] = []
    if dedup:
        steps.append({"ExactDuplicates": {}})
        duplicates.append("exact_duplicate")
    classifiers = []
    if aesthetic_threshold is not None:
        classifiers.append({"AestheticClassifier": {}})
    if nsfw_threshold is not None:
        classifiers.append({"NsfwClassifier": {}})
    if clip_model is not None:
        embedder: dict = {"model_name": clip_model, "pretrained": clip_pretrained}
        if batch_size is not None:
            embedder["batch_size"] = batch_size
        if classifiers:
            embedder["classifiers"] = classifiers
        steps.append({"ClipEmbedder": embedder})
    elif classifiers or dedup:
        embedder = {"model_name": model, "pretrained": pretrained}
        if batch_size is not None:
            embedder["batch_size"] = batch_size
        if classifiers:
            embedder["classifiers"] = classifiers
        steps.append({"TimmImageEmbedder": embedder})
    if languages or min_caption_words is not None or any(k in preset for k in ("languages", "min_words", "min_chars")):
        steps.append({"CaptionFeatures": {"language": bool(languages) or "languages" in preset}})
    if dedup:
        if n_clusters is None:
            n_clusters = _clusters_for(input_path)
        steps.append({"SemanticDeduplicator": {"n_clusters": n_clusters, "eps": 0.01}})
        duplicates.append("is_duplicate")
    rules: dict = {}
    if aesthetic_threshold is not None:
        rules["min_aesthetic"] = float(aesthetic_threshold)
    if nsfw_threshold is not None:
        rules["max_nsfw"] = float(nsfw_threshold)
    rules["drop_errors"] = True
    if duplicates:
        rules["drop_duplicates"] = duplicates
    text_rules = {k: v for k, v in clip_rules.items() if v is not None}
    if languages:
        text_rules["languages"] = list(languages)
    if min_caption_words is not None:
        text_rules["min_words"] = min_caption_words
    steps.append({"ClipTextFilter": {**text_rules, **rules}} if text_rules else {"SampleFilter": rules})
    return {
        "input": input_path,
        "output": output_path,
        "id_col": "key",
        "backend": "auto",
        "steps": steps,
        "export": {"filter_column": "keep", "samples_per_shard": images_per_tar, "old_id_col": "old_key"},
    }


def _clusters_for(input_path: str) -> int:
    try:
        from imgcurate.estimate import _count_input

        _, samples, _ = _count_input(input_path, None)
    except (OSError, ValueError) as err:  # the input is not there yet, or not readable here
        import warnings

        warnings.warn(f"n_clusters: 1000, as the input cannot be counted here ({err}); set --n-clusters to about "
                      "one per 1,000 input samples", stacklevel=2)  # fmt: skip
        return 1000
    return max(1, round(samples / 1000))


def _has_shards(path: str) -> bool:
    import os

    return "://" not in path and os.path.isdir(path) and any(name.endswith(".tar") for name in os.listdir(path))


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    _check_folder_of("--output-file", args.output_file)
    for flag, value, off in (
        ("--aesthetic-threshold", args.aesthetic_threshold, args.no_aesthetic and "--no-aesthetic"),
        ("--nsfw-threshold", args.nsfw_threshold, args.no_nsfw and "--no-nsfw"),
        ("--n-clusters", args.n_clusters, not args.dedup and "--no-dedup"),
        ("--clip-pretrained", args.clip_pretrained, args.clip_model is None and "no --clip-model"),
    ):
        if value is not None and off:
            raise ValueError(f"{flag} has no effect with {off}: leave one of them out")  # fmt: skip
    if args.aesthetic_threshold is not None and args.aesthetic_threshold < 1 and not args.no_aesthetic:
        print(f"imgcurate: warning: --aesthetic-threshold {args.aesthetic_threshold} keeps nearly everything: the "
              "aesthetic score is on a 0-10 scale (thresholds of 0.5 or 0.9 are for 0-1 scores); 5.0 is a common "
              "choice", file=sys.stderr)  # fmt: skip
    config = make_config(
        args.input_path,
        args.output_path,
        aesthetic_threshold=None if args.no_aesthetic else _or(args.aesthetic_threshold, 5.0),
        nsfw_threshold=None if args.no_nsfw else _or(args.nsfw_threshold, 0.5),
        dedup=args.dedup,
        batch_size=args.batch_size,
        images_per_tar=args.images_per_tar,
        model=args.model,
        pretrained=args.pretrained,
        n_clusters=args.n_clusters,
        clip_model=args.clip_model,
        clip_pretrained=_or(args.clip_pretrained, "openai"),
        min_clip_score=args.min_clip_score,
        clip_top_fraction=args.clip_top_fraction,
        filter_preset=args.filter_preset,
        languages=[x for x in (args.languages or "").split(",") if x],
        min_caption_words=args.min_caption_words,
    )
    from imgcurate.pipeline import Pipeline

    pipeline = Pipeline.from_config(config)  # every step and argument checked before the file is written
    # and the places it writes, and the column flow (a head that cannot read the model's embeddings) when there are
    # shards to open
    pipeline.check_config(pipeline.open_input() if _has_shards(args.input_path) else None)
    text = "# written by imgcurate config; run it with: imgcurate run FILE\n" + yaml.safe_dump(config, sort_keys=False)
    return _write_text(args.output_file, text, args.force)


def _or(value: object, default: object) -> object:
    return default if value is None else value


def _check_folder_of(option: str, path: str) -> None:
    """Before any work: the folder that ``option``'s file goes into exists (local files; '-' is stdout).

    Raises:
        FileNotFoundError: naming the option and the missing folder (which is not created: a typo in a path would
            otherwise make folders far from where the user meant).
    """
    from imgcurate.io._fs import missing_folder

    folder = None if path == "-" else missing_folder(path)
    if folder is not None:
        raise FileNotFoundError(f"{option}: the folder {folder} does not exist (create it first)")


def _write_text(path: str, text: str, force: bool) -> int:
    """Writes a generated config to ``path`` ('-' is stdout); an existing file is kept unless ``force``."""
    import os

    if path == "-":
        sys.stdout.write(text)
        return 0
    where = os.path.expanduser(path)  # '~' as the folder check (fsspec) reads it
    if os.path.isdir(where):
        raise IsADirectoryError(f"{path}: is a folder: give the config the name of a file")
    if os.path.exists(where) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite")
    with open(where, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


def _cmd_init_config(args: argparse.Namespace) -> int:
    _check_folder_of("OUT", args.out)
    return _write_text(args.out, EXAMPLE_CONFIG, args.force)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from imgcurate.doctor import main as doctor

    return doctor(args.config)


_NO_MINIMUM = "expected a non-negative integer (0: no minimum)"


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, so that a smaller one (or a non-integer) is refused
    at parsing with ``expected`` in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


#: A count or a size: 0 and -1 are refused.
_positive_int = _int_at_least(1, "expected a positive integer")
#: A minimum that 0 switches off: -1 is refused.
_non_negative_int = _int_at_least(0, _NO_MINIMUM)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcurate", description="Curate image-text datasets in WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write the bundled sample shards (real photos shipped by scikit-image)")
    p.add_argument("out", help="the folder to write the shards to")
    p.add_argument("--samples-per-shard", type=_positive_int, default=10, help="samples per shard (default: 10)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("shard", help="turn a folder of images (or a CSV/parquet list) into shards")
    p.add_argument("src", help="folder of images with optional .txt/.json sidecars, or a .csv/.parquet list")
    p.add_argument("out", help="the folder to write the shards to")
    p.add_argument("--samples-per-shard", type=_positive_int, default=10000, help="samples per shard (default: 10000)")
    p.add_argument("--path-col", default=None, help="a list's column of image paths (default: the first of path, "
                   "image_path, filepath, file and image that it has)")  # fmt: skip
    p.add_argument("--caption-col", default=None, help="a list's column of captions (default: the first of caption, "
                   "text and txt that it has; none: no captions)")  # fmt: skip
    p.add_argument("--index-files", action="store_true", help="also write each shard's DALI index (.idx)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("index", help="write the DALI index (.idx) of each shard in a folder that lacks one")
    p.add_argument("folder", help="a folder of .tar shards (local or an fsspec URL)")
    p.add_argument("--overwrite", action="store_true", help="rewrite indexes that exist")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("run", help="run a YAML pipeline")
    p.add_argument("config", help="the pipeline's YAML file")
    p.add_argument("--output", default=None, help="override the export folder")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the export folder")
    p.add_argument("--run-dir", default=None, help="where step results go, shard by shard (default: <output>.run)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="write the HTML run report of a finished run from its run directory")
    p.add_argument("run_dir", help="the run directory (by default <output>.run)")
    p.add_argument("--output", default=None, help="the HTML file to write ('-' for stdout; default: report.html in "
                   "the run directory)")  # fmt: skip
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("estimate", help="estimate a pipeline's samples, bytes, memory and (with --measure) time")
    p.add_argument("config", nargs="?", default=None, help="a pipeline config (same as --config)")
    p.add_argument("--config", dest="config_file", default=None, help="a pipeline config: per-step estimates")
    p.add_argument("--input-path", default=None, help="the input shards (instead of the config's input)")
    p.add_argument("--measure", action="store_true", help="time the model and matrix products on this machine")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("stages", help="list the steps a pipeline can use")
    p.add_argument("--verbose", "-v", action="store_true", help="also parameters, GPU use and optional packages")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_stages)

    p = sub.add_parser("doctor", help="check the GPU stack (torch CUDA, cuDF, cuML, CuPy, DALI, dask-cuda) here")
    p.add_argument("--config", default=None, help="a pipeline YAML: exit 1 when something it asks for would not work")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("config", help="write a production pipeline config from a few choices")
    p.add_argument("--input-path", required=True, help="folder of input shards")
    p.add_argument("--output-path", required=True, help="folder the kept samples are exported to")
    p.add_argument("--output-file", required=True, help="config file to write ('-' for stdout)")
    p.add_argument("--aesthetic-threshold", type=float, default=None, help="keep aesthetic_score >= this (0-10; 5)")
    p.add_argument("--nsfw-threshold", type=float, default=None, help="drop nsfw_score >= this (0-1; 0.5)")
    p.add_argument("--no-aesthetic", action="store_true", help="no aesthetic head and no aesthetic rule")
    p.add_argument("--no-nsfw", action="store_true", help="no NSFW head and no NSFW rule")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="exact and semantic dedup (default: on)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive_int, default=None, help="embedder batch size (default: per device)")
    p.add_argument("--images-per-tar", type=_positive_int, default=10000,
                   help="samples per exported shard (default: 10000)")  # fmt: skip
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm image tower (default: CLIP ViT-L/14)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="load its weights")
    p.add_argument(
        "--n-clusters", type=_positive_int, default=None, help="semantic dedup clusters (default: samples / 1000)"
    )
    p.add_argument("--clip-model", default=None, help="open_clip model (e.g. ViT-L-14): both towers and clip_score, "
                   "instead of the timm image tower")  # fmt: skip
    p.add_argument("--clip-pretrained", default=None, help="the open_clip weights' tag (default: openai)")
    p.add_argument("--min-clip-score", type=float, default=None, help="keep clip_score >= this (cosine; B/32: 0.25)")
    p.add_argument("--clip-top-fraction", type=float, default=None, help="keep this best-scored fraction of the data")
    p.add_argument("--filter-preset", default=None, help="a published filter: datacomp_clip_l14_top30, "
                   "datacomp_clip_b32, laion2b (these need --clip-model), datacomp_basic")  # fmt: skip
    p.add_argument("--languages", default=None, help="keep captions in these languages (comma-separated ISO 639-1)")
    p.add_argument("--min-caption-words", type=_non_negative_int, default=None,
                   help="drop captions with fewer words (0: no minimum)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("init-config", help="write an example pipeline config")
    p.add_argument("out", nargs="?", default="-", help="file to write ('-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite the file")
    p.set_defaults(func=_cmd_init_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: what finished is kept (a rerun of ``run`` resumes), no traceback
        print("imgcurate: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI shows the message, not a traceback, for our own errors
        from imgcurate.errors import ImgcurateError, from_an_object_store, one_line

        mistakes = (ImgcurateError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                    PermissionError, ValueError)  # fmt: skip
        if isinstance(err, mistakes):
            print(f"imgcurate: error: {err}", file=sys.stderr)
            return 2
        if type(err).__module__.split(".")[0] == "distributed":  # KilledWorker, a scheduler gone (cancelled)
            print(f"imgcurate: error: the cluster: {type(err).__name__}: {one_line(err)} (workers that died again and "
                  "again ran out of memory, see cluster.memory_limit, or were killed; a scheduler that went away "
                  "cancels the run); run again to go on: what finished is kept", file=sys.stderr)  # fmt: skip
            return 2
        if from_an_object_store(err):  # no credentials, an endpoint that does not answer, access denied
            print(f"imgcurate: error: the object store: {type(err).__name__}: {err} (check the storage_options: "
                  "credentials, endpoint, bucket)", file=sys.stderr)  # fmt: skip
            return 2
        raise


def _show_warning(shown: Callable, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:  # fmt: skip
    """Shows imgcurate's own warnings on the command line as ``imgcurate: warning: ...`` (the message names the
    step, file or option), and others with ``shown``, Python's way (their source line says where they come from)."""
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(ours):
        from tqdm import tqdm

        tqdm.write(f"imgcurate: warning: {message}", file=sys.stderr if file is None else file)  # under any bar
    else:
        shown(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    sys.exit(main())
