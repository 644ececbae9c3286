"""Checkpoint formats other tools read, and the marker that keeps plain transformers off native checkpoints.

`native` (compress.save) holds everything this project can express; `compressed-tensors` (compressed_tensors.py)
is what transformers and vLLM load without this package, for pruned and int-quantized models."""
FORMATS = ("native", "compressed-tensors")
