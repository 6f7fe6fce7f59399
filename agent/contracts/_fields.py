"""Field checks shared by the contract parsers (private to ``agent.contracts``).

``_require`` raises ``BundleError``; the desired-state and message parsers turn it into
their own error so every parser names the field, what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.base.errors import BundleError


def _require(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise BundleError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BundleError(
            f"{where}: field {key!r} expected {_type_name(kind)}, got {type(value).__name__}"
        )
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
