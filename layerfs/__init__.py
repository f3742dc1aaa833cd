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

_LAZY = {"Container", "Layer", "LayerStore", "open_store"}


def __getattr__(name: str):
    # Why lazy: the graph pulls in the drivers, archive code and zstandard;
    # a FUSE daemon or a CLI call that never opens a store should not pay for it.
    if name in _LAZY:
        from . import graph

        return getattr(graph, name)
    raise AttributeError(f"module 'layerfs' has no attribute {name!r}")

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
