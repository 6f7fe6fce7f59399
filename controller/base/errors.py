"""Errors of the controller, one tree, by cause.

::

    ControllerError
    ├── UsageError         the operator asked for something impossible (exit code 2):
    │                      a missing file, a bad name or version, a bad flag or config
    ├── RepositoryError    the signed repository is missing, damaged or refuses a change
    │   └── ConflictError  a release would change what was already published
    ├── BundleFileError    a bundle file is malformed (bad tar, members, hashes)
    └── BuildError         a model could not be turned into a bundle

The CLI (``controller.cli``) maps them to exit codes once: 2 for ``UsageError``, 1 for
the others, and prints ``edgectl: error: <message>``.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Root of every error the controller raises on purpose."""


class UsageError(ControllerError):
    """The operator's input is wrong: fix the command line or the config and retry."""


class RepositoryError(ControllerError):
    """The signed repository is missing, damaged or cannot take the change."""


class ConflictError(RepositoryError):
    """A change would rewrite something already published (e.g. a version's bytes)."""


class BundleFileError(ControllerError):
    """A bundle file is malformed: not a tar, wrong members, sizes or hashes."""


class BuildError(ControllerError):
    """A model could not be built into a bundle (not ONNX, invalid graph, runtime failure)."""
