"""Generate the Python gRPC code for ``proto/peer/v1/peer.proto``.

Run from the repository root::

    python -m peer.transport.codegen            # writes peer/transport/gen/
    python -m peer.transport.codegen --check    # exit 1 if the checked-in code is stale

grpc's generator writes ``from peer.v1 import peer_pb2``, an absolute import of the proto
package; the generated modules live inside ``peer.transport.gen`` (only the transport layer
imports them), so that one import is rewritten to a relative one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_FILE = "peer/v1/peer.proto"
OUT_DIR = Path(__file__).resolve().parent / "gen"
GENERATED = ("peer_pb2.py", "peer_pb2.pyi", "peer_pb2_grpc.py")


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc into ``out_dir`` and return {file name: text} of the fixed-up modules."""
    from grpc_tools import protoc  # dev dependency, imported only here

    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_DIR / PROTO_FILE),
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed for {PROTO_FILE}")
        produced = Path(tmp) / "peer" / "v1"
        texts = {}
        for name in GENERATED:
            text = (produced / name).read_text()
            text = text.replace("from peer.v1 import peer_pb2", "from . import peer_pb2")
            texts[name] = text
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if peer/transport/gen is stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(OUT_DIR)
        print(f"generated {', '.join(GENERATED)} in {OUT_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    stale = [n for n, t in fresh.items() if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != t]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python -m peer.transport.codegen", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
