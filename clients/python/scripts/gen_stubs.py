"""Generates the Python stubs for piivault's Tokenizer API from proto/ at the
repository root into src/piivault/v1/ (grpcio-tools: no system protoc).

    python scripts/gen_stubs.py          # write them
    python scripts/gen_stubs.py --check  # fail if the committed ones differ
"""

import pathlib
import sys
import tempfile

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "piivault/v1/tokenizer.proto"
OUT = HERE / "src"
FILES = ["tokenizer_pb2.py", "tokenizer_pb2.pyi", "tokenizer_pb2_grpc.py"]


def generate(out: pathlib.Path) -> None:
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_ROOT / PROTO),
        ]
    )
    if code != 0:
        sys.exit(f"protoc failed ({code})")


def main() -> None:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(pathlib.Path(tmp))
            stale = [
                name
                for name in FILES
                if (pathlib.Path(tmp) / "piivault/v1" / name).read_bytes()
                != (OUT / "piivault/v1" / name).read_bytes()
            ]
        if stale:
            sys.exit(f"stubs differ from proto/: {', '.join(stale)}; run python scripts/gen_stubs.py")
        print("stubs match proto/")
    else:
        generate(OUT)


if __name__ == "__main__":
    main()
