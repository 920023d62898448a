"""The export's defaults, torch-free so the CLI can show them without importing torch."""

from __future__ import annotations

DEFAULT_OPSET = 17  # ONNX opset of every exported graph
FP32_TOLERANCE = 1e-4  # max |torch - ONNX Runtime| for the fp32 graphs (embeddings and ITM logits)
