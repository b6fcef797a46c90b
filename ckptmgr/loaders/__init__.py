"""Scheme loaders: the registry and the built-in schemes it dispatches to."""
from .registry import CheckpointLoader

__all__ = ["CheckpointLoader"]
