"""gRPC transport: the only package that imports grpc and the generated protobuf code."""

from peer.transport.client import GrpcPeerClient
from peer.transport.server import Handler, PeerServer

__all__ = ["GrpcPeerClient", "Handler", "PeerServer"]
