"""Regenerate flaxserve_pb2.py and flaxserve_pb2_grpc.py from flaxserve.proto.

`python -m serving.proto.build`. The generated grpc module imports its pb2 sibling as a
top-level module; we rewrite that one line into a package-relative import so that
`import serving.proto.flaxserve_pb2_grpc` works without touching sys.path. A test checks
that regenerating gives byte-identical files, so the checked-in code never drifts.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "flaxserve.proto"
OUTPUTS = ("flaxserve_pb2.py", "flaxserve_pb2_grpc.py")


def generate(out_dir: str) -> list[str]:
    """Write the generated modules into out_dir; returns their paths."""
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"-I{include}",
                      f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      os.path.join(HERE, PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    grpc_path = os.path.join(out_dir, OUTPUTS[1])
    with open(grpc_path) as f:
        text = f.read()
    text = text.replace("import flaxserve_pb2 as flaxserve__pb2",
                        "from . import flaxserve_pb2 as flaxserve__pb2")
    with open(grpc_path, "w") as f:
        f.write(text)
    return [os.path.join(out_dir, name) for name in OUTPUTS]


def generated_text() -> dict[str, str]:
    """The generated files' contents, produced in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for path in generate(tmp):
            with open(path) as f:
                out[os.path.basename(path)] = f.read()
        return out


def main() -> int:
    for name, text in generated_text().items():
        with open(os.path.join(HERE, name), "w") as f:
            f.write(text)
        print(f"wrote {os.path.join(HERE, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
