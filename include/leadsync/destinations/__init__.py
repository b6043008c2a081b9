"""One module per platform, all of the shape described in :mod:`leadsync.destinations.base`."""

from __future__ import annotations

from importlib import import_module
from typing import cast

from leadsync.destinations.base import Destination

_MODULES = {"meta": "leadsync.destinations.meta"}


def get_destination(type_: str) -> Destination:
    """The module implementing destination type ``type_``."""
    try:
        return cast(Destination, import_module(_MODULES[type_]))
    except KeyError:
        raise ValueError(
            f"unknown destination type {type_!r} (known: {', '.join(sorted(_MODULES))})"
        ) from None
