"""Write the helper ONNX graphs that ship with the package (``model/graphs/``): graphs that are not a model's,
so they are not part of any bundle. Run it after changing one; ``tests/model/test_cast.py`` checks the files
are what this script writes.

    python scripts/make_graphs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

GRAPHS = Path(__file__).resolve().parents[1] / "model" / "graphs"


def cast_f16_f32() -> onnx.ModelProto:
    """float16 tensor of any shape -> the same values in float32 (exact: every float16 is a float32)."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "cast_f16_f32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="albef-search"
    )
    model.ir_version = 7  # what every ONNX Runtime we support reads
    # no onnx.checker: it wants a fixed rank, and this graph takes any (ONNX Runtime reads an absent shape
    # as unknown rank)
    return model


BUILDERS = {"cast_f16_f32.onnx": cast_f16_f32}


def main() -> int:
    GRAPHS.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        (GRAPHS / name).write_bytes(build().SerializeToString())
        sys.stdout.write(f"wrote {GRAPHS / name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
