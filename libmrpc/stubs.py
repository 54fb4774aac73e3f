"""gRPC-shaped stub and servicer classes built from a generated schema module.

(Placeholder: filled in by the channel/server work. Generated modules call
``install_services(globals())`` as their last statement.)
"""

from __future__ import annotations

from typing import Any


def install_services(namespace: dict[str, Any]) -> None:
    """Add ``<Service>Stub``, ``<Service>Servicer`` and ``add_<Service>Servicer_to_server``."""
