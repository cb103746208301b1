"""Generate the Python code and mypy stubs for proto/ into <out>/sia/api (default: src).

`make proto` runs it on src/; tests run it on a temporary directory and compare,
so committed code that is stale against the proto fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
#: Our protos. proto/google/ holds googleapis' status and error-detail protos for clients
#: of other languages; Python has them from googleapis-common-protos, so none is generated.
PROTOS = sorted(
    str(p.relative_to(ROOT / "proto"))
    for p in (ROOT / "proto").rglob("*.proto")
    if p.relative_to(ROOT / "proto").parts[0] != "google"
)


def generate(out: Path) -> None:
    """Write *_pb2.py, *_pb2_grpc.py and their .pyi stubs under out/sia/api/."""
    well_known = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"-Isia/api={ROOT / 'proto'}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(f"{ROOT / 'proto' / p}" for p in PROTOS),
    ]
    for proto in PROTOS:
        (out / "sia" / "api" / Path(proto).parent).mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src")
