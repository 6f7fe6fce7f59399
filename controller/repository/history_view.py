"""Release history rendered: the text and ``--json`` views of ``edgectl release
list|show|diff``.

Pure functions of the values ``controller.repository.history`` reads (``Release``,
``ReleaseDiff``); nothing here opens the repository or the telemetry store.

Invariants: a ``--json`` view holds the same facts as its text view, and a missing
value renders as ``-`` (``?`` for a device count the store could not give).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from controller.build.provenance import describe as describe_source
from controller.build.provenance import short as short_source
from controller.repository.history import (
    Release,
    ReleaseDiff,
    golden_text,
    role_text,
    signature,
)


def release_json(r: Release) -> dict[str, Any]:
    """A release for ``--json``: bundle facts, manifest and deployment."""
    manifest = json.loads(r.manifest.to_json_bytes())
    return {
        "model": r.model,
        "version": r.version,
        "created_at": r.manifest.created_at,
        "target": r.target_path,
        "sha256": r.sha256,
        "bundle_bytes": r.length,
        "deltas": [{"from": old, "bytes": size} for old, size in r.deltas],
        "recipe": r.manifest.build.get("recipe"),
        "quality": dict(r.quality),
        "source": None if r.manifest.source is None else dict(r.manifest.source),
        "fleets": [{"fleet": f.fleet, "role": f.role, "percent": f.percent} for f in r.fleets],
        "devices": r.devices,
        "manifest": manifest,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _percent(value: Any) -> str:
    """A share as the build table prints it (``100.00%``), not ``1``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value * 100:.2f}%"
    return _fmt(value)


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _fleets_text(r: Release) -> str:
    if not r.fleets:
        return "-"
    return ",".join(f.fleet if f.role == "desired" else f"{f.fleet}(prev)" for f in r.fleets)


def render_list(releases: Sequence[Release], store_note: str = "") -> str:
    """The ``release list`` table."""
    header = (
        "MODEL", "VERSION", "DATE", "SIZE", "DELTAS", "RECIPE", "SOURCE", "AGREE", "COSINE",
        "FLEETS", "DEVICES",
    )  # fmt: skip
    rows = [
        (
            r.model,
            r.version,
            r.manifest.created_at or "-",
            _bytes(r.length),
            ",".join(f"{old}:{_bytes(size)}" for old, size in r.deltas) or "-",
            r.recipe,
            short_source(r.manifest.source),
            _percent(r.quality.get("top1_agreement")),
            _fmt(r.quality.get("cosine")),
            _fleets_text(r),
            "?" if r.devices is None else str(r.devices),
        )
        for r in releases
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    if store_note:
        lines.append("")
        lines.append(store_note)
    return "\n".join(lines)


def render_show(r: Release) -> str:
    """``release show``: the manifest in readable form and where it is deployed."""
    m = r.manifest
    lines = [
        f"{r.model} {r.version}  built {m.created_at or '-'}",
        f"  target   {r.target_path}  {_bytes(r.length)}  sha256 {r.sha256}",
        *(
            f"  delta    from {old}: {_bytes(size)} ({size / max(r.length, 1):.1%} of the bundle)"
            for old, size in r.deltas
        ),
        f"  opset {m.opset}, needs onnxruntime >= {m.min_ort_version}",
        "  inputs:",
        *(f"    {t}" for t in signature(m)["inputs"]),
        "  outputs:",
        *(f"    {t}" for t in signature(m)["outputs"]),
        f"  build: recipe {r.recipe}; {m.build.get('selection_reason', '')}".rstrip("; "),
    ]
    for key in ("quantized_ops", "weight_type", "activation_type", "pruning"):
        if key in m.build:
            lines.append(f"    {key}: {_fmt(m.build[key])}")
    lines.append("  sizes: " + ", ".join(f"{k} {v}" for k, v in sorted(m.sizes.items())))
    source = describe_source(m.source)
    lines.append("  source:" if source else "  source: not recorded")
    lines.extend(f"    {line}" for line in source)
    candidates = m.quality.get("candidates")
    if isinstance(candidates, list) and candidates:
        lines.append("  candidates the build tried:")
        cols = (
            "recipe",
            "size_bytes",
            "top1_agreement",
            "cosine",
            "max_abs_diff",
            "latency_ratio",
            "verdict",
        )
        lines.append("    " + "  ".join(c.upper() for c in cols))
        for c in candidates:
            if isinstance(c, Mapping):
                lines.append("    " + "  ".join(_fmt(c.get(k)) for k in cols))
    lines.append(f"  golden vectors: {golden_text(m)}")
    tol = m.quality.get("golden_tolerance")
    if isinstance(tol, Mapping) and tol.get("rule"):
        lines.append(f"    rule: {tol['rule']}")
    lines.append("  deployed:")
    if not r.fleets:
        lines.append("    no fleet's desired state names it")
    for f in r.fleets:
        lines.append(f"    fleet {f.fleet}: {role_text(f)}")
    lines.append(
        "    devices reporting it: "
        + ("unknown (no telemetry store)" if r.devices is None else str(r.devices))
    )
    return "\n".join(lines)


def render_diff(d: ReleaseDiff) -> str:
    """``release diff``: one line per changed field (the CLI prints warnings on stderr)."""
    lines = [f"{d.model} {d.old} -> {d.new}"]
    if not d.changes:
        lines.append("  no differences in signature, opset, recipe, sizes, quality or source")
    for c in d.changes:
        lines.append(f"  {c.field}: {_fmt(c.before)} -> {_fmt(c.after)}")
    return "\n".join(lines)


def diff_json(d: ReleaseDiff) -> dict[str, Any]:
    return {
        "model": d.model,
        "old": d.old,
        "new": d.new,
        "signature_changed": d.signature_changed,
        "warnings": list(d.warnings),
        "changes": [{"field": c.field, "before": c.before, "after": c.after} for c in d.changes],
    }
