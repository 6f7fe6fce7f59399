"""A model in memory: one version loaded in ONNX Runtime, and running it.

This module owns ``LoadedModel`` (a version's session and what it was loaded from) and its
two ways to run: plainly, numpy arrays in and out (``infer``, ``run``), and through ONNX
Runtime's I/O binding (``bind``: ``Bound`` tensors, ``BoundRun``), reading inputs from and
writing outputs to memory at fixed addresses. ``agent.runtime.loading`` makes a
``LoadedModel`` from an unpacked bundle and checks it; ``agent.runtime.registry`` says which
one serves.

Invariants:
- A ``LoadedModel`` is immutable. Its session's signature matches its manifest's (names,
  datatypes, ranks, fixed dimensions); ``agent.runtime.loading.load_model`` refuses any other.
- ``LoadedModel.infer`` checks every input's presence and shape itself, whoever calls it
  (cheap: rules computed once per model), then calls ONNX Runtime's binding directly. A
  run cancelled through its ``RunOptions`` raises ``RunTerminatedError``, never a plain
  ``InferenceError``.
- A model owns its bindings (each holds its session): whoever asked for one keeps only its
  key, so a replaced version's session is freed with the model.
- Nothing here touches the network; ``LoadedModel.infer`` and ``BoundRun.run`` block, and
  are meant to run in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.base.errors import InferenceError, InvalidRequestError
from agent.contracts import Manifest, TensorSpec
from agent.runtime.drift import DriftSketch

if TYPE_CHECKING:  # numpy comes with the first model loaded (agent.runtime.loading)
    import numpy as np
    import onnxruntime as ort

logger = logging.getLogger(__name__)

_BIND_REFUSED: set[tuple[str, str]] = set()  # versions whose binding was refused (logged)


class RunTerminatedError(InferenceError):
    """A run was cancelled at its deadline through its ``RunOptions.terminate`` flag.

    The model did not fail on the input: the caller that set the flag decides how to
    answer and count it.
    """


@dataclass(frozen=True)
class LoadedModel:
    """One version of a model, loaded in its own ONNX Runtime session and ready to run.

    ``infer`` is thread-safe (ONNX Runtime sessions allow concurrent ``run`` calls).
    """

    name: str
    version: str
    manifest: Manifest
    directory: Path
    session: ort.InferenceSession = field(repr=False, compare=False)
    # What it serves against its bundle's drift reference (None: the bundle has none).
    drift: DriftSketch | None = field(default=None, repr=False, compare=False)

    @cached_property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        """The manifest's inputs by name, in manifest order."""
        return MappingProxyType({t.name: t for t in self.manifest.inputs})

    @cached_property
    def output_specs(self) -> Mapping[str, TensorSpec]:
        """The manifest's outputs by name, in manifest order."""
        return MappingProxyType({t.name: t for t in self.manifest.outputs})

    @cached_property
    def _output_names(self) -> list[str]:
        """Every output, in manifest order: what a run without ``output_names`` returns."""
        return [t.name for t in self.manifest.outputs]

    @cached_property
    def _binding(self) -> Any:
        """ONNX Runtime's C++ session binding, for a real ``InferenceSession`` (None for
        anything else, such as a test double)."""
        import onnxruntime as ort  # imported already: it made the session

        binding = getattr(self.session, "_sess", None)
        if type(self.session) is ort.InferenceSession and callable(getattr(binding, "run", None)):
            return binding
        return None

    @cached_property
    def _run(self) -> Callable[[list[str], dict[str, Any], ort.RunOptions | None], list[Any]]:
        """ONNX Runtime's run for this session.

        For a real ``InferenceSession``, its C++ binding's: the Python wrapper re-checks
        the feed on every call (missing inputs, OrtValue ownership, WebGPU graph
        capture), ~2 µs measured, a fifth of a tiny model's run. ``_check_inputs`` makes
        the check that matters for CPU sessions fed numpy arrays (every input present:
        a loaded model has no optional inputs, since ``load_model`` maps each to an OIP
        datatype); the binding itself refuses unknown names, dtypes and shapes.
        """
        if self._binding is not None:
            return self._binding.run  # type: ignore[no-any-return]
        return self.session.run  # type: ignore[no-any-return]

    @cached_property
    def _shape_rules(self) -> tuple[tuple[str, int, tuple[tuple[int, int], ...]], ...]:
        """Per input: its name, its rank and its fixed dimensions as (axis, size)."""
        return tuple(
            (t.name, len(t.shape), tuple((axis, d) for axis, d in enumerate(t.shape) if d >= 0))
            for t in self.manifest.inputs
        )

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        *,
        run_options: ort.RunOptions | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model once; return the requested outputs (all of them by default).

        ``inputs`` should already match the signature (``agent.oip.request`` checks requests);
        every input's presence and shape are checked again here, cheaply, for callers
        that do not go through it. No or empty ``output_names``: every output, in manifest
        order. ``run_options`` is passed to ONNX Runtime: setting its ``terminate`` flag
        from another thread cancels the run.

        Raises InvalidRequestError for an unknown output name, a missing input, a shape
        that does not fit or inputs ONNX Runtime refuses before running;
        RunTerminatedError when the run was cancelled through ``run_options``;
        InferenceError when the run itself fails. An INVALID_ARGUMENT
        from a kernel (an index out of range, a reshape that does not fit) is the model
        failing on an input its signature accepts: an InferenceError, which counts
        against the version on probation, not a client error.
        """
        names = self._output_names if not output_names else self._known(output_names)
        self._check_inputs(inputs)
        return dict(zip(names, self.run(names, inputs, run_options), strict=True))

    def run(
        self,
        names: list[str],
        inputs: Mapping[str, np.ndarray],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        """The outputs ``names`` (known to the model) of one run on ``inputs``, which the
        caller has checked against the signature (``infer`` does, as does a request plan).
        Raises as ``infer``."""
        try:
            results = self._run(
                names, inputs if type(inputs) is dict else dict(inputs), run_options
            )
        except Exception as exc:  # ORT's own: InvalidArgument, Fail, RuntimeException, ...
            raise run_error(self.name, self.version, exc, run_options) from None
        # Every output is a tensor (load_model refuses other types), so ONNX Runtime gives
        # numpy arrays: no conversion.
        return results

    def bind(self, key: int, inputs: Sequence[Bound], outputs: Sequence[Bound]) -> BoundRun | None:
        """Runs reading each input from, and writing each output to, memory at a fixed
        address (ONNX Runtime's I/O binding), kept under ``key`` until ``unbind``: the
        model owns its bindings (each holds its session), so whoever asked for one keeps
        only the key, and a replaced version's session is freed with it. None when the
        session cannot bind (not a plain ``InferenceSession``) or ONNX Runtime refuses
        the binding (logged once per model): the caller then runs unbound, as before
        binding existed. See ``BoundRun`` for what the caller guarantees."""
        if self._binding is None:
            return None
        try:
            bound = BoundRun(self, inputs, outputs)
        except Exception as exc:  # its Python API, or a private attribute it moved
            if (self.name, self.version) not in _BIND_REFUSED:
                _BIND_REFUSED.add((self.name, self.version))
                logger.warning("%s %s: runs stay unbound (%r)", self.name, self.version, exc)
            return None
        self.bound_runs[key] = bound
        return bound

    def unbind(self, key: int) -> None:
        """Drop the binding kept under ``key`` (none: nothing to do)."""
        self.bound_runs.pop(key, None)

    @cached_property
    def bound_runs(self) -> dict[int, BoundRun]:
        """The bindings ``bind`` made, by key."""
        return {}

    def _known(self, output_names: Sequence[str]) -> list[str]:
        """``output_names`` as a list; InvalidRequestError naming one the model lacks."""
        specs = self.output_specs
        for name in output_names:
            if name not in specs:
                raise InvalidRequestError(
                    f"unknown output {name!r}: model {self.name!r} has outputs {list(specs)}"
                )
        return list(output_names)

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """InvalidRequestError when an input is missing or its shape does not fit the
        manifest's."""
        for name, rank, fixed in self._shape_rules:
            given = inputs.get(name)
            if given is None:
                raise InvalidRequestError(
                    f"model {self.name!r} {self.version} rejected the input: input {name!r} "
                    f"is missing (given {list(inputs)})"
                )
            shape = given.shape
            fits = len(shape) == rank
            for axis, size in fixed if fits else ():
                if shape[axis] != size:
                    fits = False
                    break
            if not fits:
                raise InvalidRequestError(
                    f"input {name!r}: expected shape {list(self.input_specs[name].shape)} "
                    f"(-1: any), got {list(shape)}"
                )


def run_error(
    name: str, version: str, exc: Exception, run_options: ort.RunOptions | None
) -> InferenceError:
    """What a failed run of ``name`` ``version`` raises: a ``ValueError`` is the binding
    refusing the inputs, a run whose ``terminate`` flag is set was cancelled at its
    deadline, anything else is the model failing."""
    if isinstance(exc, ValueError):
        return InvalidRequestError(f"model {name!r} {version} rejected the input: {exc}")
    if run_options is not None and run_options.terminate:
        return RunTerminatedError(
            f"model {name!r} {version}: the run was cancelled at its deadline ({exc})"
        )
    return InferenceError(f"model {name!r} {version} failed to run: {exc}")


class Bound(NamedTuple):
    """One tensor of a ``BoundRun``: its name, dtype and shape, and the address of its
    first byte."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    address: int


class BoundRun:
    """Runs of one model that read every input from, and write every output to, memory
    at fixed addresses (ONNX Runtime's I/O binding): no numpy array is made or converted
    on either side of the run. After a model run has flushed the caches, that
    conversion is the costliest Python of a request: ~60-90 µs measured on a 2-core VM
    for the CNN of ``bench/infer_overhead.py``, against the plain run.

    The caller guarantees that the memory at every address is there, readable (inputs)
    and writable (outputs), for the whole of each ``run`` (holding a buffer export of
    it), that outputs overlap no input, and that inputs and outputs have the bound
    dtypes and shapes (a request plan checked them). An output whose shape differs from
    the bound one on some run (a data-dependent shape) fails that run: the caller then
    runs the request without a binding.
    """

    __slots__ = ("_binding", "_label", "_run")

    def __init__(self, model: LoadedModel, inputs: Sequence[Bound], outputs: Sequence[Bound]):
        import onnxruntime as ort  # imported already: it made the session

        binding = ort.IOBinding(model.session)
        for tensor in inputs:
            binding.bind_input(
                tensor.name, "cpu", 0, tensor.dtype.type, list(tensor.shape), tensor.address
            )
        for tensor in outputs:
            binding.bind_output(
                tensor.name, "cpu", 0, tensor.dtype.type, list(tensor.shape), tensor.address
            )
        # The C++ objects: the Python wrapper's run re-checks WebGPU graph capture.
        self._binding = binding._iobinding
        self._run = model._binding.run_with_iobinding
        self._label = (model.name, model.version)  # not the model: it owns this

    def run(self, run_options: ort.RunOptions | None) -> None:
        """One run: inputs read and outputs written where they were bound. Raises as
        ``LoadedModel.run``."""
        try:
            self._run(self._binding, run_options)
        except Exception as exc:
            raise run_error(*self._label, exc, run_options) from None
