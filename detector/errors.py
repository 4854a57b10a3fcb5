"""Errors that say whose fault a failure is (light: the service imports this without torch)."""
from __future__ import annotations


class InputError(ValueError):
    """The caller's input is wrong (shape, dtype, range, NaN, an undecodable file): the caller can fix it.

    Any other exception from the guard, ValueError included (a BundleError, a shape mismatch between
    the bundle's parts), is the server's fault; the service answers INVALID_ARGUMENT only for this one.
    """
