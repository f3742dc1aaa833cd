"""Errors a user of layerfs can cause.

Every one is a :class:`LayerfsError`; its message names the object involved and
says what to do, so the CLI can print it on one line without a traceback.
"""


class LayerfsError(Exception):
    """Base class of every error layerfs raises on purpose."""


class NotFound(LayerfsError):
    """A layer, container or image that does not exist."""


class AlreadyExists(LayerfsError):
    """A name that is taken."""


class InUse(LayerfsError):
    """Removing or changing something that is still referenced or mounted."""


class InvalidLayer(LayerfsError):
    """A layer tar that is malformed or hostile; nothing of it was stored."""


class DigestMismatch(LayerfsError):
    """Content whose digest is not the one it was expected to have."""


class DriverUnavailable(LayerfsError):
    """A storage driver that cannot work on this machine or backing filesystem."""


class InvalidOption(LayerfsError):
    """An unknown or malformed storage option or argument."""


class RegistryError(LayerfsError):
    """A registry that cannot be reached, refuses the credentials, or answers with an error."""
