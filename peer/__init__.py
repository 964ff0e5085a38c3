"""peer: a peer-to-peer DiLoCo training daemon for PyTorch.

``peer run`` (``peer.cli``) runs a peer as a process; ``peer.Swarm`` (``peer.swarm``) runs one
inside your own training script. ``Swarm`` is imported on first use, so that ``import peer``
(and the CLI) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Swarm", "SwarmStopped"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from peer import swarm

        return getattr(swarm, name)
    raise AttributeError(f"module 'peer' has no attribute {name!r}")
