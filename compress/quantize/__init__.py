"""Weight quantization: calibrated int4/int8 (GPTQ) and round-to-nearest in `QuantizedLinear`; bitsandbytes NF4 /
FP4 / LLM.int8 in the layout transformers' bitsandbytes integration reads."""
from .quantized_linear import QuantizedLinear

__all__ = ["QuantizedLinear"]
