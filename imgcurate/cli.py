"""The ``imgcurate`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

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

    paths = make_sample_shards(args.out, samples_per_shard=args.samples_per_shard)
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
    )
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    import posixpath

    import fsspec

    from imgcurate.io.index import write_indexes

    fs, root = fsspec.core.url_to_fs(args.folder)
    tars = sorted(fs.glob(posixpath.join(root, "*.tar")))
    if not tars:
        raise FileNotFoundError(f"{args.folder}: no .tar shards")
    tars = [t if "://" not in args.folder else fs.unstrip_protocol(t) for t in tars]
    written = write_indexes(tars, overwrite=args.overwrite)
    print(f"wrote {len(written)} DALI index files ({len(tars) - len(written)} shards skipped: indexed or empty)")
    return 0


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
        print(f"run directory: {pipeline.resolved_run_dir()} (summary.json)")
    for kwargs in pipeline.reports.values():
        print(f"wrote {kwargs['path']}")
    if pipeline.export:
        print(f"exported {len(out.metadata)} samples in {out.num_shards} shards to {out.path}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from imgcurate.estimate import estimate_config

    print(estimate_config(args.config, measure=args.measure).to_text())
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


def _cmd_init_config(args: argparse.Namespace) -> int:
    if args.out == "-":
        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    import os

    if os.path.exists(args.out) and not args.force:
        print(f"{args.out} exists; pass --force to overwrite", file=sys.stderr)
        return 1
    with open(args.out, "w") as f:
        f.write(EXAMPLE_CONFIG)
    print(f"wrote {args.out}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from imgcurate.doctor import main as doctor

    return doctor(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcurate", description="Curate image-text datasets in WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write the bundled sample shards (real photos shipped by scikit-image)")
    p.add_argument("out")
    p.add_argument("--samples-per-shard", type=int, default=10)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("shard", help="turn a folder of images (or a CSV/parquet list) into shards")
    p.add_argument("src", help="folder of images with optional .txt/.json sidecars, or a .csv/.parquet list")
    p.add_argument("out")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--path-col", default=None)
    p.add_argument("--caption-col", default=None)
    p.add_argument("--index-files", action="store_true", help="also write each shard's DALI index (.idx)")
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("index", help="write the DALI index (.idx) of each shard in a folder that lacks one")
    p.add_argument("folder")
    p.add_argument("--overwrite", action="store_true", help="rewrite indexes that exist")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("run", help="run a YAML pipeline")
    p.add_argument("config")
    p.add_argument("--output", default=None, help="override the export folder")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the export folder")
    p.add_argument("--run-dir", default=None, help="where step results go, shard by shard (default: <output>.run)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("estimate", help="estimate a pipeline's samples, bytes, memory and (with --measure) time")
    p.add_argument("config")
    p.add_argument("--measure", action="store_true", help="time the model and matrix products on this machine")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("stages", help="list the steps a pipeline can use")
    p.add_argument("--verbose", "-v", action="store_true", help="also parameters, GPU use and optional packages")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_stages)

    p = sub.add_parser("doctor", help="check the GPU stack (torch CUDA, cuDF, cuML, CuPy, DALI, dask-cuda) here")
    p.add_argument("--config", default=None, help="a pipeline YAML: exit 1 when something it asks for would not work")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("init-config", help="write an example pipeline config")
    p.add_argument("out", nargs="?", default="-", help="file to write ('-' for stdout)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_init_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # the CLI shows the message, not a traceback, for our own errors
        from imgcurate.errors import ImgcurateError

        if isinstance(err, ImgcurateError | FileNotFoundError | FileExistsError | ValueError):
            print(f"imgcurate: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
