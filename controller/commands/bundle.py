"""``edgectl bundle build``: shrink, measure and pack a model into a bundle file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from controller.build.provenance import describe as describe_source
from controller.build.reference import describe as describe_reference
from controller.commands.common import RAW, print_json

if TYPE_CHECKING:
    from agent.contracts import Manifest
    from controller.build.builder import BuildResult
    from controller.commands.common import Subparsers


def _cmd_bundle_build(args: argparse.Namespace) -> int:
    from controller.build.builder import BuildOptions, build_bundle
    from controller.build.evaluate import parse_gate
    from controller.build.provenance import parse_source_options
    from controller.commands.progress import progress_display  # rich: only when building

    options = BuildOptions(
        quantize=args.quantize,
        calibration=Path(args.calibration) if args.calibration else None,
        prune=args.prune,
        eval_data=Path(args.eval) if args.eval else None,
        gate=parse_gate(args.max_drift) if args.max_drift is not None else None,
        fallback=args.fallback,
        latency_runs=args.latency_runs,
        max_latency_ratio=args.max_latency_ratio,
        bundle_format=args.format,
        source=parse_source_options(args.source or []),
    )
    quiet, verbose = args.json, getattr(args, "verbose", False)
    with progress_display("bundle build", quiet=quiet, verbose=verbose) as progress:
        result = build_bundle(
            Path(args.model),
            args.name,
            args.version,
            Path(args.output),
            golden_cases=args.golden_cases,
            seed=args.seed,
            options=options,
            progress=progress,
        )
    m = result.manifest
    if args.json:
        print_json(_build_json(result))
        return 0
    print(result.table)
    print(f"built {m.name} {m.version} -> {result.path}")
    print(f"  sha256 {result.sha256}, {result.length:,} bytes shipped ({_format_name(m)})")
    print(f"  recipe: {m.build.get('recipe')} ({result.reason})")
    pruning = m.build.get("pruning")
    if isinstance(pruning, dict):
        print(f"  pruning: sparsity reached {pruning.get('sparsity_reached')}")
    print(
        "  sizes: "
        + ", ".join(f"{k.removesuffix('_bytes')} {v:,} bytes" for k, v in m.sizes.items())
    )
    print(
        f"  golden: {m.golden.cases} cases from {m.build.get('golden_source')}, "
        f"rtol {m.golden.rtol:g}, atol {m.golden.atol:g}"
    )
    print(f"  {describe_reference(m.reference)}")
    source = describe_source(m.source)
    print("  source:" if source else "  source: not recorded")
    for line in [*source, *(f"({note})" for note in result.source_notes)]:
        print(f"    {line}")
    return 0


def _format_name(m: Manifest) -> str:
    return f"format 2, {m.schema}, zstd" if m.compressed else f"format 1, {m.schema}, uncompressed"


def _build_json(result: BuildResult) -> dict[str, object]:
    m = result.manifest
    return {
        "name": m.name,
        "version": m.version,
        "path": str(result.path),
        "sha256": result.sha256,
        "length": result.length,
        "schema": m.schema,
        "recipe": m.build.get("recipe"),
        "reason": result.reason,
        "sizes": dict(m.sizes),
        "golden": {
            "cases": m.golden.cases,
            "source": m.build.get("golden_source"),
            "rtol": m.golden.rtol,
            "atol": m.golden.atol,
        },
        "build": m.build,
        "reference": None if m.reference is None else m.reference.to_json(),
        "source": None if m.source is None else dict(m.source),
        "source_notes": list(result.source_notes),
        "candidates": [
            {
                "recipe": c.recipe,
                "size": c.size,
                "shipped": c.shipped,
                "latency_ms": c.latency_ms,
                "worst": c.worst,
                "verdict": c.verdict,
                "failures": c.failures,
                "error": c.error,
            }
            for c in result.candidates
        ],
    }


def add_parser(sub: Subparsers) -> None:
    bundle = sub.add_parser(
        "bundle",
        help="work with bundle files",
        description="Work with bundle files.",
        epilog="example:\n  edgectl bundle build model.onnx --name m --version 1.0.0 -o m.bundle",
        formatter_class=RAW,
    )
    bsub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    b = bsub.add_parser(
        "build",
        help="shrink a model, measure it and pack it with golden vectors into a bundle",
        description="Check the model, optionally prune it, quantize it (one recipe, or "
        "'auto': try them all and keep the one with the fewest shipped (compressed) bytes "
        "that passes the quality gate and is "
        "at most 10% slower), measure every candidate against the original on the eval "
        "data (size, median latency, top-1 agreement, cosine, max abs diff, accuracy "
        "with labels), record golden vectors and pack a bundle. DATA.npz holds one array "
        "per model input (samples on the first axis) and optional integer 'labels'. "
        "Set SOURCE_DATE_EPOCH and --latency-runs 0 for byte-identical bundles. "
        "Progress goes to stderr: a live display on a terminal, one line per phase "
        "otherwise, none with --json.",
        epilog="examples:\n  edgectl bundle build model.onnx --name resnet --version 1.2.0 "
        "-o resnet-1.2.0.bundle\n  edgectl bundle build model.onnx --name resnet --version "
        "1.3.0 -o r.bundle --quantize auto --calibration calib.npz --eval eval.npz "
        "--max-drift 0.01 --fallback fp32",
        formatter_class=RAW,
    )
    b.add_argument("model", metavar="MODEL.onnx")
    b.add_argument("--name", required=True, help="model name (letters, digits, . _ -)")
    b.add_argument("--version", required=True, help="semantic version, e.g. 1.2.0")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="bundle file to write")
    b.add_argument("--golden-cases", type=int, default=8, metavar="N", help="default 8")
    b.add_argument("--seed", type=int, default=0, help="generated input seed (default 0)")
    b.add_argument(
        "--quantize",
        choices=("none", "dynamic", "dynamic-matmul", "static", "static-mixed", "fp16", "auto"),
        help="recipe (default: dynamic-matmul or none, whichever is smaller; the output says "
        "which it kept and why); static-mixed keeps the blocks most sensitive "
        "to int8 in float (searched on the calibration data); auto tries them all under "
        "the gate",
    )
    b.add_argument(
        "--calibration",
        metavar="DATA.npz",
        help="calibration inputs for static and static-mixed (and auto)",
    )
    b.add_argument(
        "--prune",
        type=float,
        metavar="SPARSITY",
        help="prune weights to this share of zeros (0-1) by W <- W - a*sign(W)",
    )
    b.add_argument(
        "--eval",
        metavar="DATA.npz",
        help="inputs (and optional labels) to measure quality on and draw golden vectors "
        "from (default: 64 random inputs from the input signature)",
    )
    b.add_argument(
        "--max-drift",
        metavar="GATE",
        help="quality gate: a share of top-1 decisions allowed to change (0.01) or "
        "agreement=,cosine=,abs=,accuracy= limits (auto's default: agreement=0.99,"
        "cosine=0.99; explicit recipes: no gate)",
    )
    b.add_argument(
        "--fallback",
        choices=("fp32",),
        help="when nothing passes the gate, keep the original model instead of failing",
    )
    b.add_argument(
        "--latency-runs",
        type=int,
        default=20,
        metavar="N",
        help="timed runs per candidate, interleaved (default 20; 0 skips timing)",
    )
    b.add_argument(
        "--max-latency-ratio",
        type=float,
        default=1.1,
        metavar="R",
        help="auto keeps only candidates at most R times the original's latency (default 1.1)",
    )
    b.add_argument(
        "--format",
        type=int,
        choices=(1, 2),
        default=2,
        help="bundle format: 2 (default; manifest schema /2, members zstd-compressed) or 1 "
        "(uncompressed, schema /1, for agents that predate /2)",
    )
    b.add_argument(
        "--source",
        action="append",
        metavar="KEY=VALUE",
        help="record where the model came from beyond Git, e.g. svn_revision=r1234, "
        "dataset_sha256=..., training_run=...; repeatable (key: a-z 0-9 . _ -, not git_*; "
        "value: printable, at most 1024 characters). When the model lies in a Git work "
        "tree, its remote (without credentials), commit, branch, tags and whether it was "
        "dirty are recorded too",
    )
    b.add_argument("--json", action="store_true", help="print the summary as JSON, no table")
    b.set_defaults(func=_cmd_bundle_build)
