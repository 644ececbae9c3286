"""bitsandbytes layers (NF4 / FP4 4-bit, LLM.int8 8-bit) held in the tensors transformers' bitsandbytes integration
saves and reads, so a checkpoint of them loads with `AutoModelForCausalLM.from_pretrained` and no code of ours.

Quantization and the matmul are bitsandbytes' own calls (`quantize_4bit` / `matmul_4bit`, `int8_vectorwise_quant`
/ `matmul`), so results equal bitsandbytes' `Linear4bit` / `Linear8bitLt` bit for bit. The modules keep the
quantized tensors as plain buffers (no Params4bit subclass), so they move, copy and load like any module.

State-dict names (those of transformers' `save_pretrained` on a bitsandbytes model):
- 4-bit: `weight` (uint8 [ceil(out*in/2), 1]), `weight.absmax`, `weight.quant_map`, with double quantization also
  `weight.nested_absmax`, `weight.nested_quant_map`, and `weight.quant_state.bitsandbytes__nf4` (or `__fp4`: the
  packed JSON of shapes and block sizes); the float ones stay float32 in the checkpoint;
- 8-bit: `weight` (int8 [out, in]), `SCB` (float32 row scales [out]), `weight_format` (uint8 0 = row-major)."""
from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import CompressError

BNB_4BIT_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # + the packed quant-state blob
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double quantization of absmax


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise CompressError("the nf4 / fp4 / int8 methods need bitsandbytes: pip install 'compress[bnb]' "
                            "(or pip install bitsandbytes)") from None
    return bitsandbytes


def _quant_state_problem(blob: torch.Tensor, quant_type: str, shape: tuple[int, int]) -> str | None:
    """What is wrong with a stored 4-bit quant-state blob (bitsandbytes' packed JSON), or None."""
    try:
        state = json.loads(bytes(blob.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "not a bitsandbytes quant state (its bytes are no JSON): the checkpoint is damaged"
    if not isinstance(state, dict) or state.get("quant_type") != quant_type or list(state.get("shape", ())) != list(shape):
        return (f"a bitsandbytes quant state for {state.get('quant_type') if isinstance(state, dict) else state!r} "
                f"{state.get('shape') if isinstance(state, dict) else ''}, but the layer is {quant_type} {list(shape)}")
    return None


def _apply_keeping_float32(module: nn.Module, apply, fn, recurse: bool, names: tuple[str, ...]) -> nn.Module:
    """`module._apply(fn)` (what .to(), .half(), .cuda() run) with the float32 buffers `names` moved but never cast:
    bitsandbytes keeps its quantization state in float32 and its kernels read it so (after `.to(torch.bfloat16)` a
    bf16 nested absmax dequantized NF4 weights to 1e30 and the logits to NaN, silently; LLM.int8 refused bf16 row
    scales). `compress.load(dtype=...)` already kept them float32."""
    kept = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None
            and module._buffers[n].dtype == torch.float32}
    for n in kept:
        module._buffers[n] = None  # out of the cast
    try:
        apply(fn, recurse)
    finally:
        for n, t in kept.items():
            module._buffers[n] = t
    for n, t in kept.items():
        moved = fn(t)  # its device (and pinning...), not its dtype
        module._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
    return module


class Bnb4bitLinear(nn.Module):
    """A Linear layer quantized by bitsandbytes to NF4 or FP4 (blockwise absmax, optional double quantization)."""

    transformers_reads = True  # its state dict is transformers' bitsandbytes layout
    kept_float32 = BNB_4BIT_STATE  # stored float32 whatever the checkpoint's dtype (inspection counts them so)

    def __init__(self, in_features: int, out_features: int, *, quant_type: str, blocksize: int, double_quant: bool,
                 compute_dtype: torch.dtype | None, state_bytes: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        numel = in_features * out_features
        blocks = -(-numel // blocksize)
        f32, u8 = dict(dtype=torch.float32, device=device), dict(dtype=torch.uint8, device=device)
        self.register_buffer("weight", torch.zeros((numel + 1) // 2, 1, **u8))
        self.register_buffer("absmax", torch.zeros(blocks, **(u8 if double_quant else f32)))
        self.register_buffer("quant_map", torch.zeros(16, **f32))
        self.register_buffer("nested_absmax", torch.zeros(-(-blocks // NESTED_BLOCKSIZE), **f32) if double_quant else None)
        self.register_buffer("nested_quant_map", torch.zeros(256, **f32) if double_quant else None)
        self.register_buffer("quant_state", torch.zeros(state_bytes, **u8))  # the packed JSON blob
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._cached_state = None

    def _state_key(self, name: str) -> str:
        return f"weight.quant_state.bitsandbytes__{self.quant_type}" if name == "quant_state" else f"weight.{name}"

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, quant_type: str, blocksize: int, double_quant: bool,
                    compute_dtype: torch.dtype | None) -> "Bnb4bitLinear":
        bnb = require_bitsandbytes()
        w = linear.weight.detach()
        packed, qs = bnb.functional.quantize_4bit(w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                                  quant_type=quant_type, quant_storage=torch.uint8)
        state = qs.as_dict(packed=True)
        blob = state[f"quant_state.bitsandbytes__{quant_type}"]
        layer = cls(linear.in_features, linear.out_features, quant_type=quant_type, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype, state_bytes=blob.numel(),
                    bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        layer.weight.copy_(packed)
        for name in BNB_4BIT_STATE:
            if name in state:
                getattr(layer, name).copy_(state[name])
        layer.quant_state.copy_(blob)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    # The state dict uses transformers' names (weight.absmax, ...); buffer names cannot hold dots.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self._buffers.items():
            if t is not None:
                key = prefix + ("weight" if name == "weight" else self._state_key(name))
                destination[key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {("weight" if n == "weight" else self._state_key(n)): t for n, t in self._buffers.items() if t is not None}
        if self.bias is not None:
            own["bias"] = self.bias
        for key, target in own.items():
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict[full]
            if key.startswith("weight.quant_state."):
                problem = _quant_state_problem(value, self.quant_type, (self.out_features, self.in_features))
                if problem:  # else bitsandbytes fails at the first forward, in a JSON traceback
                    error_msgs.append(f"{full}: {problem}")
                    continue
            if key.startswith("weight.quant_state.") and value.shape != target.shape:
                self._buffers["quant_state"] = value.detach().to(device=target.device, dtype=torch.uint8).clone()
                continue  # the blob's length varies with the JSON it holds
            if value.shape != target.shape:
                error_msgs.append(f"size mismatch for {full}: checkpoint {tuple(value.shape)}, model {tuple(target.shape)}")
                continue
            with torch.no_grad():
                target.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own
                                   and "." not in k[len(prefix):].replace("weight.", "", 1))
        self._cached_state = None

    def _apply(self, fn, recurse=True):
        self._cached_state = None
        return _apply_keeping_float32(self, super()._apply, fn, recurse, self.kept_float32)

    def after_storage_rounding(self) -> None:
        """`round_to_storage` may have rounded the quant-state tensors: build the QuantState from them again."""
        self._cached_state = None

    def bnb_quant_state(self):
        """bitsandbytes' QuantState, built from the stored tensors (as transformers' loader builds it)."""
        if self._cached_state is None:
            bnb = require_bitsandbytes()
            qs = {self._state_key(n)[len("weight."):]: t for n, t in self._buffers.items()
                  if t is not None and n != "weight"}
            self._cached_state = bnb.functional.QuantState.from_dict(qs, device=self.weight.device)
        return self._cached_state

    def dequantized_weight(self) -> torch.Tensor:
        bnb = require_bitsandbytes()
        return bnb.functional.dequantize_4bit(self.weight, self.bnb_quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as bitsandbytes' Linear4bit.forward: compute in compute_dtype (default: the input's), return x's dtype
        bnb = require_bitsandbytes()
        inp_dtype = x.dtype
        compute = self.compute_dtype or (x.dtype if x.dtype in (torch.float32, torch.bfloat16) else None)
        if compute is not None:
            x = x.to(compute)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=self.bnb_quant_state()).to(inp_dtype)

    def restore_spec(self) -> dict:
        return {"kind": "4bit", "state_bytes": int(self.quant_state.numel())}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, bias={self.bias is not None}")


class Bnb8bitLinear(nn.Module):
    """A Linear layer in bitsandbytes' LLM.int8 form: int8 rows with absmax scales; at run time, input columns with
    an entry above `threshold` are multiplied in 16-bit (the outlier decomposition), the rest in int8."""

    transformers_reads = True
    kept_float32 = ("SCB",)  # stored float32 whatever the checkpoint's dtype (inspection counts them so)

    def __init__(self, in_features: int, out_features: int, *, threshold: float, bias: bool,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_format", torch.zeros((), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, threshold: float) -> "Bnb8bitLinear":
        bnb = require_bitsandbytes()
        w = linear.weight.detach()
        # as bitsandbytes' Int8Params._quantize: the weight in fp16, rows scaled by their absmax
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.contiguous().to(torch.float16))
        layer = cls(linear.in_features, linear.out_features, threshold=threshold, bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        layer.weight.copy_(cb)
        layer.SCB.copy_(scb)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * (self.SCB.float() / 127.0).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = require_bitsandbytes()
        state = bnb.MatmulLtState()
        state.threshold, state.has_fp16_weights, state.is_training = self.threshold, False, self.training
        state.use_pool = self.threshold > 0.0
        state.CB, state.SCB = self.weight, self.SCB
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return bnb.matmul(x, self.weight, bias=bias, state=state)

    def _apply(self, fn, recurse=True):
        return _apply_keeping_float32(self, super()._apply, fn, recurse, self.kept_float32)

    def restore_spec(self) -> dict:
        return {"kind": "int8"}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, LLM.int8 threshold="
                f"{self.threshold}, bias={self.bias is not None}")
