"""Checkpoint formats other tools read, and the marker that keeps plain transformers off native checkpoints.

`native` (compress.save) holds everything this project can express; `compressed-tensors` (compressed_tensors.py)
is what transformers loads without this package, for pruned and int-quantized models (and vLLM, unless the
quantization is asymmetric: `compressed_tensors.int_quantized_note`)."""
FORMATS = ("native", "compressed-tensors")
