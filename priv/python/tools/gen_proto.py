"""Generate the protobuf/gRPC modules for snakepit_telemetry from the shared proto.

The generated files are committed so the package imports without grpcio-tools;
``--check`` lets CI catch a proto change that was not followed by regeneration.

Two edits follow protoc, both checked to apply exactly once:

* the gRPC stub imports its ``snakepit_bridge_pb2`` package-relatively, and
* ``snakepit_bridge_pb2`` registers ``snakepit_bridge.proto`` in a descriptor pool
  of its own instead of protobuf's default pool. Snakepit's Python package ships a
  different ``snakepit_bridge.proto`` (same file name, same ``snakepit.bridge``
  proto package, other messages) in the default pool, and the pool rejects a
  second file of that name, or a second definition of a symbol, with a
  ``TypeError`` at import. With a private pool both import in one process; the
  wire format and the gRPC method paths (``/snakepit.bridge.BridgeService/...``)
  do not depend on the pool.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY_ROOT = HERE.parent
PACKAGE_DIR = PY_ROOT / "snakepit_telemetry"
PROTO_FILE = (PY_ROOT / ".." / ".." / "proto" / "snakepit_bridge.proto").resolve()
GENERATED = (
    "snakepit_bridge_pb2.py",
    "snakepit_bridge_pb2.pyi",
    "snakepit_bridge_pb2_grpc.py",
)
_ABS_IMPORT = re.compile(r"^import snakepit_bridge_pb2 as ", re.MULTILINE)
_DEFAULT_POOL = re.compile(
    r"^DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(", re.MULTILINE
)
_PRIVATE_POOL = (
    "# snakepit_telemetry: a private pool, so that Snakepit's own snakepit_bridge.proto\n"
    "# (same file name, other content) can be in the default pool of the same process.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def generate(out_dir: Path) -> None:
    """Run protoc into ``out_dir``, then apply the two edits of the module docstring."""
    from grpc_tools import protoc  # imported lazily: only needed for (re)generation

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_FILE.parent}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed for {PROTO_FILE}")
    stub = out_dir / "snakepit_bridge_pb2_grpc.py"
    text, count = _ABS_IMPORT.subn("from . import snakepit_bridge_pb2 as ", stub.read_text())
    if count != 1:
        raise SystemExit(f"expected one 'import snakepit_bridge_pb2' in {stub.name}, got {count}")
    stub.write_text(text)
    messages = out_dir / "snakepit_bridge_pb2.py"
    text = messages.read_text()
    if "\nimport " in text.split("DESCRIPTOR =", 1)[0].split("_sym_db", 1)[1]:
        # A private pool holds only what is added to it: an imported .proto
        # (google/protobuf/*.proto) would have to be added first.
        raise SystemExit(
            f"{messages.name} imports other proto modules; the private pool needs them"
        )
    text, count = _DEFAULT_POOL.subn(_PRIVATE_POOL, text)
    if count != 1:
        raise SystemExit(
            f"expected one default-pool AddSerializedFile in {messages.name}, got {count}"
        )
    messages.write_text(text)


def check() -> int:
    """Return 0 when the committed files match a fresh generation, else print a diff."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        stale: list[str] = []
        for name in GENERATED:
            fresh = (tmp_dir / name).read_text()
            committed_path = PACKAGE_DIR / name
            committed = committed_path.read_text() if committed_path.exists() else ""
            if fresh != committed:
                stale.append(name)
                diff = difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    f"committed/{name}",
                    f"generated/{name}",
                    n=1,
                )
                sys.stderr.writelines(list(diff)[:40])
    if stale:
        print(
            f"generated protobuf files are out of date: {', '.join(stale)}\n"
            "fix: run `python tools/gen_proto.py` in priv/python and commit the result",
            file=sys.stderr,
        )
        return 1
    print("generated protobuf files are up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed generated files are stale"
    )
    opts = parser.parse_args(argv)
    if opts.check:
        return check()
    generate(PACKAGE_DIR)
    print(f"wrote {', '.join(GENERATED)} to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
