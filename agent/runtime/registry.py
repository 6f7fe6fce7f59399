"""The registry of live models: which loaded version of each model serves requests.

Invariants:
- ``ModelRegistry`` maps a model name to exactly one live ``LoadedModel``
  (``agent.runtime.models``). Making a version live is one reference swap under a lock;
  readers never take the lock.
- A request takes its reference to a ``LoadedModel`` once, at its start, and finishes on
  it. The registry keeps no other reference to a replaced model, so the old session is
  freed when the last in-flight request drops it: zero failed requests across a swap.
- Beside the live versions it holds, per model, at most one candidate in shadow
  (``agent.runtime.shadow.ShadowRunner``): it answers no request, the server only offers
  it copies. Setting or clearing one never changes what serves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from types import MappingProxyType

from agent.runtime.models import LoadedModel
from agent.runtime.shadow import ShadowRunner

logger = logging.getLogger(__name__)


class ModelRegistry:
    """The live version of each model. Thread-safe.

    Writers replace the whole mapping under a lock (copy on write); readers take one
    reference to the current mapping and never block. Only ``activate`` and ``remove``
    change what serves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: Mapping[str, LoadedModel] = MappingProxyType({})
        self._shadows: Mapping[str, ShadowRunner] = MappingProxyType({})

    def get(self, name: str) -> LoadedModel | None:
        """The live version of ``name``, or None. Hold the result for the whole request."""
        return self._models.get(name)

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` the live version of its name; return the one it replaced."""
        with self._lock:
            models = dict(self._models)
            previous = models.get(model.name)
            models[model.name] = model
            self._models = MappingProxyType(models)
        logger.info(
            "activated %s %s (was %s)",
            model.name,
            model.version,
            previous.version if previous else "nothing",
        )
        return previous

    def remove(self, name: str) -> LoadedModel | None:
        """Stop serving ``name``; return the version that was live, or None."""
        with self._lock:
            models = dict(self._models)
            previous = models.pop(name, None)
            self._models = MappingProxyType(models)
        if previous is not None:
            logger.info("removed %s %s", name, previous.version)
        return previous

    def shadow(self, name: str) -> ShadowRunner | None:
        """The candidate of ``name`` in shadow, or None (the common case: one dict lookup)."""
        return self._shadows.get(name)

    def set_shadow(self, name: str, runner: ShadowRunner | None) -> ShadowRunner | None:
        """Put ``runner`` in shadow for ``name`` (None: none); return the one it replaced
        (the caller closes it)."""
        with self._lock:
            shadows = dict(self._shadows)
            previous = shadows.pop(name, None)
            if runner is not None:
                shadows[name] = runner
            self._shadows = MappingProxyType(shadows)
        return previous

    def snapshot(self) -> dict[str, LoadedModel]:
        """A copy of the live mapping, name → model."""
        return dict(self._models)

    def __len__(self) -> int:
        return len(self._models)
