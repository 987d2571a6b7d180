"""Typed errors of `pipeline.models`: each message says what failed and how to fix it."""

from __future__ import annotations

__all__ = [
    "EntrypointRefusedError",
    "ModelError",
    "ModelFileError",
    "ModelInterfaceError",
    "ModelNotFoundError",
    "WeightsMismatchError",
]


class ModelError(Exception):
    """Base class of every error raised by `pipeline.models`."""


class ModelNotFoundError(ModelError, LookupError):
    """A timm model name or a ``"package.module:function"`` entrypoint does not resolve."""


class ModelInterfaceError(ModelError, TypeError):
    """A user module or entrypoint lacks part of the interface `ImageClassifier` needs."""


class WeightsMismatchError(ModelError, ValueError):
    """A weights file does not fit the model it is loaded into.

    The key lists are kept for callers that want to act on them.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        shape_mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.shape_mismatched = list(shape_mismatched or [])


class ModelFileError(ModelError, ValueError):
    """A file is not a readable weights file or not a model file written by `save_model`."""


class EntrypointRefusedError(ModelFileError):
    """A model file's spec names an entrypoint that cifd does not import on a file's word."""
