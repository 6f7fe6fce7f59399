"""``edgectl bundle build``: an ONNX model → a smaller, measured, self-checking bundle file.

Steps: check the model; load eval (and calibration) data and check it against the
model's inputs; optionally prune; build one candidate per quantization recipe (one for
an explicit ``--quantize``, several for ``auto``, the default recipe and ``none`` without
``--quantize``); measure each against the original (size, latency side by side, top-1
agreement, cosine, max abs diff, accuracy); keep the chosen one under the quality gate
(without ``--quantize``: the smaller of the two); record golden vectors with a tolerance
derived from the measured drift; write the manifest; pack the tar (by default, manifest
schema /2: every member but the manifest one zstd frame; ``auto`` ranks candidates by
those shipped bytes, so a pruned model's zeros count).

Invariants:
- The same model, options, name, version, seed, case count and ``created_at`` give the
  same bytes when latency is not measured (``latency_runs=0``): timings are the only
  non-deterministic facts (``created_at`` defaults to ``$SOURCE_DATE_EPOCH`` when set,
  else the current time). The manifest's ``source`` records the model's Git work tree as
  it is (commit, dirty or not), so the same state of the tree is part of "the same".
- Git never fails a build (``controller.build.provenance``): without it, or outside a
  work tree, the manifest has no ``git_*`` keys and ``BuildResult.source_notes`` says why.
- The manifest is an ``agent.contracts.Manifest`` and round-trips ``parse_manifest``.
- Nothing that fails the gate is written: QualityGateError (a BuildError) unless the
  operator asked for ``fallback="fp32"``, which keeps the original model.
- Bad input raises UsageError (missing file, bad name/version/option, data that does not
  match the model's inputs, unwritable output) or BuildError (not ONNX, invalid graph,
  operators the recipe cannot handle, runtime failure); the output is written
  atomically, so a failed build leaves no partial file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort

from agent.contracts import (
    BUNDLE_GOLDEN,
    BUNDLE_MODEL,
    MANIFEST_SCHEMA_V1,
    MANIFEST_SCHEMA_V2,
    ORT_TO_OIP,
    GoldenSpec,
    InvalidNameError,
    Manifest,
    TensorSpec,
    check_name,
    check_version,
)
from agent.contracts.compression import codec_facts, compress_member
from controller.base.errors import BuildError, UsageError
from controller.base.fsio import atomic_write
from controller.base.progress import SILENT, Progress
from controller.build import evaluate, golden, mixed, provenance, quantize
from controller.build import reference as drift_reference
from controller.build.bundle_file import member_digest, pack_bundle, stored_member_digest
from controller.build.evaluate import Candidate, Gate, Samples
from controller.build.prune import check_sparsity, prune

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES: Final = (*quantize.RECIPES, "auto")
FALLBACK_CHOICES: Final = ("fp32",)
# --format: 2 (manifest schema /2, members zstd-compressed) or 1 (uncompressed, /1).
BUNDLE_FORMATS: Final = (1, 2)
# What the manifest records as asked for when no --quantize was given.
DEFAULT_REQUEST: Final = f"default (the smaller of {quantize.DEFAULT_RECIPE} and none)"
# Samples generated from the input signature when no --eval data is given.
GENERATED_EVAL_SAMPLES: Final = 64
# The first ONNX Runtime release that implements each default-domain opset (conservative).
_MIN_ORT_FOR_OPSET: Final = {
    13: "1.7.0", 14: "1.8.0", 15: "1.9.0", 16: "1.11.0", 17: "1.12.0",
    18: "1.14.0", 19: "1.15.0", 20: "1.17.0", 21: "1.20.0",
}  # fmt: skip


class QualityGateError(BuildError):
    """No candidate met the quality gate (and the latency limit for ``auto``)."""


@dataclass(frozen=True)
class BuildOptions:
    """How to shrink and check the model; the defaults are ``edgectl bundle build``'s.

    ``quantize`` None means the default: the smaller of the default recipe's model and the
    model unquantized (a model with nothing to quantize is kept as is, and so is a tiny
    one the recipe makes bigger), and the selection reason says which and why; an explicit
    recipe refuses a model it cannot quantize, and keeps a bigger model with a warning.
    ``gate`` None means the default gate for ``auto`` and no gate otherwise.
    ``latency_threads`` is the intra-op thread count of the latency sessions (1: stable
    on a shared machine).
    ``bundle_format`` 2 writes manifest schema /2 (members zstd-compressed), 1 the
    uncompressed /1 bundle that agents older than /2 read.
    ``source`` is the operator's ``--source`` entries, recorded in the manifest's
    ``source`` beside what Git says of the model's work tree (``controller.build.provenance``).
    """

    quantize: str | None = None
    calibration: Path | None = None
    prune: float | None = None
    eval_data: Path | None = None
    gate: Gate | None = None
    fallback: str | None = None
    latency_runs: int = 20
    latency_threads: int = 1
    max_latency_ratio: float = 1.1
    bundle_format: int = 2
    source: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildResult:
    """What ``build_bundle`` wrote, and the candidate table it measured."""

    path: Path
    manifest: Manifest
    sha256: str
    length: int
    table: str = ""
    reason: str = ""
    candidates: tuple[Candidate, ...] = field(default=())
    # Why the manifest has no Git record, or what was left out of it (credentials).
    source_notes: tuple[str, ...] = ()


def build_bundle(
    model_path: Path,
    name: str,
    version: str,
    output: Path,
    golden_cases: int = 8,
    seed: int = 0,
    created_at: datetime | None = None,
    options: BuildOptions | None = None,
    progress: Progress = SILENT,
) -> BuildResult:
    """Build a bundle from ``model_path`` and write it to ``output``.

    ``progress`` hears of each phase and candidate (nothing by default). Raises
    UsageError, BuildError or QualityGateError (see the module docstring).
    """
    opts = options or BuildOptions()
    _check_request(name, version, golden_cases, model_path, opts)
    _check_writable(output)
    progress.phase(f"reading where {model_path.name} came from (Git, --source)")
    source = provenance.collect(model_path, opts.source)
    progress.phase(f"checking the model {model_path}")
    original = model_path.read_bytes()
    model = _load_checked(model_path, original)
    if opts.quantize not in (None, "auto"):
        quantize.check_quantizable(model, opts.quantize)  # before ORT refuses a custom op
    reference = evaluate.session(original)
    specs = evaluate.input_specs(reference)
    samples = (
        evaluate.load_samples(opts.eval_data, specs, "--eval")
        if opts.eval_data
        else evaluate.generated_samples(specs, GENERATED_EVAL_SAMPLES, seed)
    )
    calibration = (
        evaluate.load_samples(opts.calibration, specs, "--calibration")
        if opts.calibration
        else None
    )
    base_model, base, prune_facts = model, original, None
    if opts.prune is not None:
        progress.phase(f"pruning to sparsity {opts.prune:g}")
        base_model, prune_facts = prune(model, opts.prune)
        base = base_model.SerializeToString()
    progress.phase(_reference_phase(samples, calibration))
    feeds = evaluate.batches(specs, samples)
    expected = evaluate.run(reference, feeds)
    gate = opts.gate or (Gate() if opts.quantize == "auto" else None)
    judge_feeds = evaluate.batches(specs, calibration) if calibration else None
    judge = _calibration_judge(reference, judge_feeds, gate)
    candidates = _candidates(opts, base_model, base, specs, calibration, judge, progress)
    runnable = [c for c in candidates if c.model is not None]
    if opts.bundle_format == 2:
        progress.phase(f"compressing {len(runnable)} candidate model(s) with zstd")
        for c in runnable:
            assert c.model is not None
            c.stored = compress_member(c.model)
    progress.phase(_evaluate_phase(len(runnable), samples), total=len(runnable))
    for c in runnable:
        _measure(c, feeds, expected, samples.labels, gate)
        progress.advance()
    latency = _latencies(original, candidates, specs, feeds[0], opts, progress)
    chosen, reason = _select(candidates, opts, gate, latency, len(base))
    table = evaluate.format_table(candidates, len(original), latency.get("original", 0.0))
    if chosen is None:
        if opts.fallback != "fp32":
            raise QualityGateError(
                f"{reason}; nothing was built.\n{table}\n"
                "Loosen --max-drift, try another --quantize recipe, or keep the original "
                "model with --fallback fp32."
            )
        chosen = Candidate("none", original, {"quantization": "none", "fallback": "fp32"})
        if opts.bundle_format == 2:
            chosen.stored = compress_member(original)
        chosen.outputs = evaluate.compare(expected, expected, samples.labels)
        chosen.worst = evaluate.summary(chosen.outputs)
        reason = f"{reason}; kept the original fp32 model (--fallback fp32)"
        prune_facts = None
    assert chosen.model is not None
    record = _Record(
        opts, gate, samples, calibration, prune_facts, candidates, chosen, reason, latency,
        source.entries,
    )  # fmt: skip
    progress.phase(f"recording {golden_cases} golden vectors and their tolerance")
    manifest, stored_model, stored_golden = _manifest(
        original, chosen, record, name, version, golden_cases, seed, specs,
        created_at or _created_at(),
    )  # fmt: skip
    progress.phase(f"writing the bundle {output}")
    data = pack_bundle(
        manifest.to_json_bytes(), stored_model, stored_golden, compressed=manifest.compressed
    )
    try:
        atomic_write(output, data)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc}") from None
    info = member_digest(data)
    logger.info("built %s %s into %s (%s)", name, version, output, chosen.recipe)
    return BuildResult(
        output, manifest, str(info["sha256"]), len(data), table, reason, tuple(candidates),
        source.notes,
    )  # fmt: skip


def _check_request(
    name: str, version: str, golden_cases: int, model_path: Path, opts: BuildOptions
) -> None:
    try:
        check_name("model", name)
        check_version(version)
    except InvalidNameError as exc:
        raise UsageError(str(exc)) from None
    if golden_cases < 1:
        raise UsageError(f"--golden-cases must be at least 1, got {golden_cases}")
    if opts.quantize is not None and opts.quantize not in QUANTIZE_CHOICES:
        raise UsageError(
            f"--quantize expected one of {', '.join(QUANTIZE_CHOICES)}, got {opts.quantize!r}"
        )
    if opts.fallback is not None and opts.fallback not in FALLBACK_CHOICES:
        raise UsageError(f"--fallback expected fp32, got {opts.fallback!r}")
    calibrated = quantize.CALIBRATED_RECIPES
    if opts.quantize in calibrated and opts.calibration is None:
        raise UsageError(f"--quantize {opts.quantize} needs --calibration DATA.npz")
    if opts.calibration is not None and opts.quantize not in (*calibrated, "auto"):
        raise UsageError(
            f"--calibration is used only by --quantize {', '.join(calibrated)} or auto"
        )
    if opts.prune is not None:
        check_sparsity(opts.prune)
    if opts.bundle_format not in BUNDLE_FORMATS:
        raise UsageError(f"--format expected 1 or 2, got {opts.bundle_format!r}")
    if not opts.max_latency_ratio > 0:
        raise UsageError(f"--max-latency-ratio must be positive, got {opts.max_latency_ratio}")
    if opts.latency_runs < 0:
        raise UsageError(f"--latency-runs must be 0 or more, got {opts.latency_runs}")
    if not model_path.is_file():
        raise UsageError(f"model {model_path} does not exist or is not a file")
    provenance.parse_source_options([f"{k}={v}" for k, v in opts.source.items()])


def _candidates(
    opts: BuildOptions,
    model: Any,
    data: bytes,
    specs: tuple[evaluate.InputSpec, ...],
    calibration: Samples | None,
    judge: mixed.Judge | None,
    progress: Progress = SILENT,
) -> list[Candidate]:
    """One candidate per recipe; ``auto`` notes recipes that cannot apply and goes on."""
    auto = opts.quantize == "auto"
    if auto:
        recipes = list(quantize.AUTO_RECIPES)
        if opts.prune is not None:
            recipes.insert(0, "none")  # pruning alone is a candidate too
    elif opts.quantize is None:  # the default: the default recipe or none, the smaller
        recipes = [quantize.DEFAULT_RECIPE, "none"]
    else:
        recipes = [opts.quantize]
    calib_feeds = evaluate.batches(specs, calibration, rows=1) if calibration else None
    out: list[Candidate] = []
    with tempfile.TemporaryDirectory(prefix="edgectl-calib-") as workdir:
        for number, recipe in enumerate(recipes, 1):
            skip = recipe in quantize.CALIBRATED_RECIPES and calib_feeds is None
            progress.phase(_candidate_phase(recipe, number, len(recipes), opts, skip))
            if skip:
                out.append(Candidate(recipe, error="no --calibration data"))
                continue
            try:
                built, facts = quantize.apply(
                    recipe, model, data, calib_feeds, judge, Path(workdir), progress
                )
            except quantize.UnsupportedOpsError as exc:
                if opts.quantize is not None and not auto:
                    raise
                out.append(Candidate(recipe, error=str(exc)))  # the default keeps none
                continue
            except BuildError as exc:
                if not auto:
                    raise
                out.append(Candidate(recipe, error=str(exc)))
                continue
            out.append(Candidate(recipe, built, facts))
    return out


def _reference_phase(samples: Samples, calibration: Samples | None) -> str:
    where = "generated" if samples.source == "generated" else "eval"
    text = f"running the original on {samples.count} {where} samples"
    return text + (f" and {calibration.count} calibration samples" if calibration else "")


def _candidate_phase(recipe: str, number: int, count: int, opts: BuildOptions, skip: bool) -> str:
    what = quantize.SUMMARY.get(recipe, recipe)
    if recipe == "none" and opts.prune is not None:
        what = "pruned, not quantized"
    which = f"candidate {number}/{count}" if count > 1 else "the model"
    text = f"quantizing {which}: {recipe} ({what})"
    return text + (": skipped, no --calibration data" if skip else "")


def _evaluate_phase(runnable: int, samples: Samples) -> str:
    noun = "candidate" if runnable == 1 else "candidates"
    return f"evaluating {runnable} {noun} against the original on {samples.count} samples"


def _calibration_judge(
    reference: Any, feeds: list[dict[str, Any]] | None, gate: Gate | None
) -> mixed.Judge | None:
    """The judge of ``static-mixed``'s search: ``gate`` (the default gate when none was
    asked) on the calibration data against the original model. Accuracy is left out
    (calibration data has no labels); the error is 1 - cosine, or the max abs diff for
    models without float outputs."""
    if feeds is None:
        return None
    limits = dataclasses.replace(gate or Gate(), max_accuracy_drop=None)
    expected = evaluate.run(reference, feeds)

    def judge(model: bytes) -> mixed.Verdict:
        got = evaluate.run(evaluate.session(model), feeds)
        worst = evaluate.summary(evaluate.compare(expected, got, None))
        cosine, diff = worst.get("cosine"), worst.get("max_abs_diff")
        error = 1.0 - cosine if cosine is not None else (diff or 0.0)
        return mixed.Verdict(not limits.check(worst), error)

    return judge


def _measure(
    c: Candidate,
    feeds: list[dict[str, Any]],
    expected: dict[str, Any],
    labels: Any,
    gate: Gate | None,
) -> None:
    if c.model is None:
        return
    try:
        got = evaluate.run(evaluate.session(c.model), feeds)
    except BuildError as exc:
        c.error = f"{c.recipe} does not run: {exc}"
        return
    c.outputs = evaluate.compare(expected, got, labels)
    c.worst = evaluate.summary(c.outputs)
    c.failures = gate.check(c.worst) if gate is not None else []


def _latencies(
    original: bytes,
    candidates: list[Candidate],
    specs: tuple[evaluate.InputSpec, ...],
    feed: dict[str, Any],
    opts: BuildOptions,
    progress: Progress = SILENT,
) -> dict[str, float]:
    """Median latency (ms) of one batch (one sample, or the model's fixed batch) for the
    original and every candidate, measured side by side; {} when ``latency_runs`` is 0."""
    if opts.latency_runs == 0:
        return {}
    progress.phase(f"timing latency: {opts.latency_runs} runs of each model, interleaved")
    one = {s.name: feed[s.name][: s.batch or 1] for s in specs}
    threads = opts.latency_threads
    sessions = {"original": evaluate.session(original, threads)}
    for i, c in enumerate(candidates):
        if c.model is not None and c.error is None:
            sessions[str(i)] = evaluate.session(c.model, threads)
    result = evaluate.median_latencies_ms(sessions, one, opts.latency_runs)
    for i, c in enumerate(candidates):
        c.latency_ms = result.get(str(i))
    return {"original": result["original"]}


def _select(
    candidates: list[Candidate],
    opts: BuildOptions,
    gate: Gate | None,
    latency: dict[str, float],
    base_size: int,
) -> tuple[Candidate | None, str]:
    """The candidate to pack and why (None: nothing passed). ``base_size`` is the size of
    the model the recipes started from (the original, or the pruned original)."""
    original_ms = latency.get("original")
    if opts.quantize is None:
        return _select_default(candidates, gate, base_size, pruned=opts.prune is not None)
    if opts.quantize == "auto":
        limit = opts.max_latency_ratio if original_ms else float("inf")
        chosen, reason = evaluate.choose(candidates, original_ms or 1.0, limit)
    else:
        (chosen,) = candidates
        if chosen.failures:
            chosen.verdict = "fails gate: " + "; ".join(chosen.failures)
            return None, f"--quantize {chosen.recipe} fails the quality gate"
        chosen.verdict = "chosen" if gate is not None else "chosen (no gate asked)"
        reason = f"{chosen.recipe}: asked for with --quantize"
        reason += ", passes the gate" if gate is not None else ""
    if chosen is not None and chosen.recipe != "none" and (chosen.size or 0) >= base_size:
        note = (
            f"{chosen.recipe} made the model bigger ({_bytes(chosen.size or 0)} against "
            f"{_bytes(base_size)} unquantized); without --quantize the build keeps the smaller"
        )
        logger.warning("%s", note)
        reason += f"; note: {note}"
    return chosen, reason


def _select_default(
    candidates: list[Candidate], gate: Gate | None, base_size: int, *, pruned: bool
) -> tuple[Candidate | None, str]:
    """No --quantize: keep the smaller of the default recipe's model and the model
    unquantized (the default recipe grows a tiny model: int8 weights bring scales, zero
    points and conversion nodes), then judge the one kept by the gate, if one was asked."""
    quantized, plain = candidates
    assert plain.recipe == "none" and plain.size == base_size
    unquantized = "the pruned model unquantized" if pruned else "the original model"
    head = "the default (no --quantize given)"
    if quantized.error is not None:
        quantized.verdict = "skipped: " + quantized.error
        kept = plain
        why = f"{head} kept {unquantized}: {quantized.recipe} does not apply ({quantized.error})"
    elif (quantized.size or 0) >= base_size:
        grew = "bigger" if (quantized.size or 0) > base_size else "no smaller"
        quantized.verdict = f"not kept: {grew} than {unquantized}"
        kept = plain
        why = (
            f"{head} kept {unquantized} ({_bytes(base_size)}): {quantized.recipe} made it "
            f"{grew} ({_bytes(quantized.size or 0)})"
        )
    else:
        plain.verdict = f"not kept: {quantized.recipe} is smaller"
        kept = quantized
        why = (
            f"{head}, smaller than {unquantized} ({_bytes(quantized.size or 0)} against "
            f"{_bytes(base_size)})"
        )
    if kept.error is not None:  # only a pruned model can fail to run: the original did
        kept.verdict = "skipped: " + kept.error
        return None, f"{head}: {kept.error}"
    if kept.failures:
        kept.verdict = "fails gate: " + "; ".join(kept.failures)
        return None, f"{kept.recipe}, the smaller kept by {head}, fails the quality gate"
    kept.verdict = "chosen" if gate is not None else "chosen (no gate asked)"
    return kept, f"{kept.recipe}: {why}" + (", passes the gate" if gate is not None else "")


def _bytes(size: int) -> str:
    return f"{size:,} bytes"


def _created_at() -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), UTC)
        except ValueError:
            raise UsageError(f"SOURCE_DATE_EPOCH must be an integer, got {epoch!r}") from None
    return datetime.now(UTC).replace(microsecond=0)


def _check_writable(output: Path) -> None:
    parent = output.parent
    if output.is_dir():
        raise UsageError(f"output {output} is a directory; give a file name")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {output}: {parent} is not a writable directory")


def _load_checked(path: Path, data: bytes) -> Any:
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BuildError(f"{path} is not an ONNX model: {exc}") from None
    if not model.graph.node and not model.graph.output:
        raise BuildError(f"{path} is not an ONNX model: it has no graph")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"{path} is not a valid ONNX graph: {first}") from None
    return model


def _specs(args: Any) -> tuple[TensorSpec, ...]:
    specs = []
    for a in args:
        if a.type not in ORT_TO_OIP:
            raise BuildError(f"tensor {a.name!r} has unsupported type {a.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape)
        specs.append(TensorSpec(a.name, ORT_TO_OIP[a.type], shape))
    return tuple(specs)


def _opset(model_bytes: bytes) -> int:
    model = onnx.load_from_string(model_bytes)
    return max(
        (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1
    )


def min_ort_version(opset: int) -> str:
    """The oldest ONNX Runtime expected to run this opset (the running one if unknown)."""
    if opset < min(_MIN_ORT_FOR_OPSET):
        return _MIN_ORT_FOR_OPSET[min(_MIN_ORT_FOR_OPSET)]
    return _MIN_ORT_FOR_OPSET.get(opset, str(ort.__version__).split("+")[0])


@dataclass(frozen=True)
class _Record:
    """What the manifest records about how the model was chosen and measured."""

    opts: BuildOptions
    gate: Gate | None
    samples: Samples
    calibration: Samples | None
    prune: dict[str, Any] | None
    candidates: list[Candidate]
    chosen: Candidate
    reason: str
    latency: dict[str, float]
    source: dict[str, str]

    def build_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            **self.chosen.details,
            "requested": self.opts.quantize or DEFAULT_REQUEST,
            "recipe": self.chosen.recipe,
            "selection_reason": self.reason,
            "built_with_onnxruntime": str(ort.__version__),
        }
        if self.prune is not None:
            facts["pruning"] = self.prune
        if self.calibration is not None:
            facts["calibration"] = {
                "file": Path(self.calibration.source).name,
                "sha256": self.calibration.sha256,
                "samples": self.calibration.count,
            }
        return facts

    def quality(self, original_size: int) -> dict[str, Any]:
        original_ms = self.latency.get("original")
        chosen = self.chosen
        doc: dict[str, Any] = {
            "reference": "original model",
            "eval": {
                "source": "generated" if self.samples.source == "generated" else "file",
                "file": None
                if self.samples.source == "generated"
                else Path(self.samples.source).name,
                "sha256": self.samples.sha256 or None,
                "samples": self.samples.count,
                "labelled": 0
                if self.samples.labels is None
                else int(np.count_nonzero(self.samples.labels >= 0)),
            },
            "outputs": chosen.outputs,
            "summary": chosen.worst,
            "gate": None if self.gate is None else self.gate.to_json(),
            "gate_passed": None if self.gate is None else not chosen.failures,
            "latency": None
            if original_ms is None
            else {
                "original_ms": round(original_ms, 4),
                "built_ms": None if chosen.latency_ms is None else round(chosen.latency_ms, 4),
                "runs": self.opts.latency_runs,
                "threads": self.opts.latency_threads,
                "statistic": "median, candidates interleaved",
                "max_ratio_auto": self.opts.max_latency_ratio,
            },
            "candidates": [c.record(original_size, original_ms or 0.0) for c in self.candidates],
        }
        return doc


def _manifest(
    original: bytes,
    chosen: Candidate,
    record: _Record,
    name: str,
    version: str,
    cases: int,
    seed: int,
    specs: tuple[evaluate.InputSpec, ...],
    created_at: datetime,
) -> tuple[Manifest, bytes, bytes]:
    """The manifest, and the model and golden members as the bundle stores them."""
    built = chosen.model
    assert built is not None
    session = evaluate.session(built)
    inputs, golden_facts = _golden_inputs(record.samples, session, specs, cases, seed)
    outputs = golden.run_cases(session, inputs)
    variants = [
        golden.run_cases(evaluate.session(built, threads=1, optimize=False), inputs),
        golden.run_cases(evaluate.session(built, threads=2), inputs),
    ]
    reference = golden.run_cases(evaluate.session(original), inputs)
    rtol, atol, tolerance_facts = golden.derive_tolerance(outputs, variants, reference)
    drift = (
        None
        if record.samples.source == "generated"
        else drift_reference.measure_reference(
            session, evaluate.batches(specs, record.samples), record.samples.inputs
        )
    )
    golden_npz = golden.npz_bytes(inputs, outputs)
    count = len(next(iter(inputs.values())))
    opset = _opset(built)
    quality = record.quality(len(original))
    quality["golden_tolerance"] = tolerance_facts
    sizes = {"original_bytes": len(original), "built_bytes": len(built)}
    build = {**record.build_facts(), **golden_facts}
    if chosen.stored is not None:  # schema /2: both members as zstd frames
        stored_model, stored_golden = chosen.stored, compress_member(golden_npz)
        members = {
            BUNDLE_MODEL: stored_member_digest(built, stored_model),
            BUNDLE_GOLDEN: stored_member_digest(golden_npz, stored_golden),
        }
        sizes["shipped_bytes"] = len(stored_model)
        build["compression"] = codec_facts()
        schema = MANIFEST_SCHEMA_V2
    else:
        stored_model, stored_golden = built, golden_npz
        members = {BUNDLE_MODEL: member_digest(built), BUNDLE_GOLDEN: member_digest(golden_npz)}
        sizes["shipped_bytes"] = len(built)
        schema = MANIFEST_SCHEMA_V1
    manifest = Manifest(
        name=name,
        version=version,
        inputs=_specs(session.get_inputs()),
        outputs=_specs(session.get_outputs()),
        opset=opset,
        min_ort_version=min_ort_version(opset),
        golden=GoldenSpec(count, rtol, atol),
        members=members,
        build=build,
        sizes=sizes,
        quality=quality,
        created_at=created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        schema=schema,
        reference=drift,
        source=record.source or None,
    )
    return manifest, stored_model, stored_golden


def _golden_inputs(
    samples: Samples, session: Any, specs: tuple[evaluate.InputSpec, ...], cases: int, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Golden inputs from the eval data, or generated when there is none, and the facts."""
    if samples.source != "generated":
        batch = next((s.batch for s in specs if s.batch is not None), 1)
        inputs = golden.inputs_from_samples(samples.inputs, batch, cases)
        return inputs, {
            "golden_source": "eval",
            "golden_note": "evenly spaced samples of the --eval data, one batch per case",
        }
    signature = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    return golden.make_inputs(signature, cases, seed), {
        "golden_source": "generated",
        "golden_seed": seed,
        "golden_note": "random inputs from the input signature, dynamic dimensions set to 1",
    }
