"""layerfs: container image layers and container filesystems over pluggable drivers.

The public surface is small: open a store, register layers, create and
mount containers, compute and export their changes, commit them.
"""

from . import errors
from .changes import Change
from .errors import (
    AlreadyExists,
    DigestMismatch,
    DriverUnavailable,
    InUse,
    InvalidLayer,
    InvalidOption,
    LayerfsError,
    NotFound,
)
from .graph import Container, Layer, LayerStore, open_store

__all__ = [
    "AlreadyExists",
    "Change",
    "Container",
    "DigestMismatch",
    "DriverUnavailable",
    "InUse",
    "InvalidLayer",
    "InvalidOption",
    "Layer",
    "LayerStore",
    "LayerfsError",
    "NotFound",
    "errors",
    "open_store",
]
__version__ = "0.1.0"
