"""One error hierarchy for the daemon.

Library code raises these; only ``peer.transport`` maps them to gRPC status codes, and only
``peer.cli`` turns them into exit statuses.
"""

from __future__ import annotations


class PeerError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(PeerError):
    """Bad configuration: an unknown key, a value of the wrong type, a missing required value."""


class CodecError(PeerError):
    """An encoded payload that cannot be decoded: wrong size, unknown codec, non-finite scales."""


class TaskError(PeerError):
    """A task that cannot be loaded or whose data is missing."""


class HandshakeRefused(PeerError):
    """A peer refused us (or we refused it): different run, model schema or protocol version.

    ``reason`` is a short, bounded label (used as a metric label); the message says what differs.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RoundError(PeerError):
    """A round that could not complete for this peer (a missing shard, a vanished owner, ...).

    ``reason`` is a short, bounded label used as a metric label; ``culprits`` the peers this peer
    itself proved at fault (an owner whose answer failed a check computed here).
    """

    def __init__(self, reason: str, message: str, culprits: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.culprits = culprits


class StateError(PeerError):
    """A state blob or checkpoint that is torn, corrupt or does not fit the model."""


class PeerUnavailable(PeerError):
    """A remote peer did not answer (connection refused, deadline exceeded, stream broken).

    ``code`` is the gRPC status name when there was one ("UNAVAILABLE" means nothing listens:
    the peer is gone, not slow).
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
