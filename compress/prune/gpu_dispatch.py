"""How a packed `SparseLinear` runs on CUDA: the fastest path for its shape, measured once per device.

Paths:
- `packed_gemv`: Triton GEMV over the packed values + position bits (kernels/sparse_gemv.py), 1-16 tokens;
- `semi_structured`: the tensor cores' 2:4 path, cuSPARSELt through torch (`torch._cslt_compress` once, at the first
  call, from the packed weight; the algorithm id searched once per shape with `torch._cslt_sparse_mm_search`);
  2:4 only, fp16/bf16, compute capability >= 8.0;
- `expand_cublas`: the Triton expand kernel (N:M or bitmask) decodes the packed weight into a scratch buffer shared
  by all layers (sized by the largest), then one dense cuBLAS GEMM: ~dense cost plus one write of the weight,
  packed memory kept.

The first call of a (device, layout, shape, dtype, token bucket) times every applicable path on that input and
records the fastest in a table cached per device (~/.cache/compress/sparse_dispatch_<device>.json), so the choice
is measured once and reused by every later process. `COMPRESS_SPARSE_PATH=<path>` forces one (benchmarks)."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..environment import sparse_path
from ..errors import CompressError
from ..kernels.sparse_gemv import MAX_GEMV_TOKENS, bitmask_expand, bitmask_gemv, gemv_supports_nm, nm_expand, nm_gemv

PATHS = ("packed_gemv", "semi_structured", "expand_cublas")
_lock = threading.Lock()
_tables: dict[str, dict[str, str]] = {}
_scratch: dict[tuple, torch.Tensor] = {}


def token_bucket(tokens: int) -> int:
    return 1 << max(0, (tokens - 1).bit_length())


def semi_structured_available(device: torch.device | None = None) -> bool:
    """cuSPARSELt through torch on a GPU of compute capability >= 8.0."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    backend = getattr(torch.backends, "cusparselt", None)
    return major >= 8 and backend is not None and backend.is_available()


def candidates(module, tokens: int, dtype: torch.dtype) -> list[str]:
    out = []
    if tokens <= MAX_GEMV_TOKENS and (module.format == "bitmask" or gemv_supports_nm(module.m)):
        out.append("packed_gemv")
    if (module.format == "nm" and (module.n, module.m) == (2, 4) and dtype in (torch.float16, torch.bfloat16)
            and module.out_features % 32 == 0 and module.in_features % 64 == 0
            and semi_structured_available(module.values.device)):
        out.append("semi_structured")
    out.append("expand_cublas")
    return out


def describe_path(module, tokens: int | None) -> str:
    """What `compress inspect` prints for a packed layer on CUDA (per token count when given)."""
    if tokens is None:
        few = "packed GEMV" if module.format == "bitmask" or gemv_supports_nm(module.m) else "measured"
        many = "cuSPARSELt or expand + cuBLAS, measured per shape" if (module.format, module.n, module.m) == \
            ("nm", 2, 4) else "expand + cuBLAS"
        return f"packed: {few} at <= {MAX_GEMV_TOKENS} tokens; above: {many}"
    return choose(module, tokens, module.values.dtype, measure=False)


# ------------------------------------------------------------------------------------------------ the paths
def _scratch_view(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (device, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = _scratch[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)


def _expand_cublas(module, x, bias):
    w = _scratch_view(module.out_features, module.in_features, x.dtype, x.device)
    if module.format == "nm":
        nm_expand(module.values, module.indices, module.n, module.m, module.in_features, w)
    else:
        bitmask_expand(module.values, module.bitmask, module.row_offsets, module.in_features, w)
    return F.linear(x, w, bias)


def _semi_structured(module, x, bias):
    state = module.gpu_state = module.gpu_state or {}
    if "cslt" not in state:  # once: packed -> dense (temporary, on the GPU) -> cuSPARSELt's compressed layout
        state["cslt"] = torch._cslt_compress(module.dense_weight(x.dtype))
        state["alg"] = {}
    x2 = x.reshape(-1, module.in_features)
    t = x2.shape[0]
    pad = (-t) % 16  # cuSPARSELt wants the dense operand's rows a multiple of 16
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    bucket = token_bucket(t)
    if bucket not in state["alg"]:
        state["alg"][bucket] = torch._cslt_sparse_mm_search(state["cslt"], x2.t())
    y = torch._cslt_sparse_mm(state["cslt"], x2.t(), bias, alg_id=state["alg"][bucket]).t()
    return y[:t].reshape(*x.shape[:-1], module.out_features)


def _packed_gemv(module, x, bias):
    if module.format == "nm":
        return nm_gemv(x, module.values, module.indices, module.n, module.m, module.in_features, bias)
    return bitmask_gemv(x, module.values, module.bitmask, module.row_offsets, module.in_features, bias)


RUN = {"packed_gemv": _packed_gemv, "semi_structured": _semi_structured, "expand_cublas": _expand_cublas}


# ------------------------------------------------------------------------------------------------ the table
def _table_file(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "compress" / f"sparse_dispatch_{name}.json"


def dispatch_table(device: torch.device) -> dict[str, str]:
    key = str(device)
    if key not in _tables:
        f = _table_file(device)
        try:
            _tables[key] = json.loads(f.read_text()) if f.exists() else {}
        except (OSError, ValueError):
            _tables[key] = {}
    return _tables[key]


def _save_table(device: torch.device) -> None:
    f = _table_file(device)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dispatch_table(device), indent=1, sort_keys=True))
        os.replace(tmp, f)
    except OSError:  # a read-only home: the choice stays in memory for this process
        pass


def _table_key(module, tokens: int, dtype: torch.dtype) -> str:
    layout = f"{module.n}:{module.m}" if module.format == "nm" else "bitmask"
    return f"{layout}|{module.out_features}x{module.in_features}|{str(dtype).removeprefix('torch.')}|" \
           f"{token_bucket(tokens)}"


def _time_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def choose(module, tokens: int, dtype: torch.dtype, x: torch.Tensor | None = None, bias=None,
           measure: bool = True) -> str:
    forced = sparse_path()
    options = candidates(module, tokens, dtype)
    if forced:
        if forced not in options:
            raise CompressError(f"COMPRESS_SPARSE_PATH={forced} does not apply to this layer at {tokens} tokens; "
                                f"applicable here: {', '.join(options)} (or leave it unset)")
        return forced
    if len(options) == 1:
        return options[0]
    device = module.values.device
    table, key = dispatch_table(device), _table_key(module, tokens, dtype)
    if key in table and table[key] in options:
        return table[key]
    if not measure or x is None:
        return options[0]
    with _lock:
        times = {p: _time_ms(lambda p=p: RUN[p](module, x, bias)) for p in options}
        table[key] = min(times, key=times.get)
        _save_table(device)
    return table[key]


def sparse_linear_cuda(module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    tokens = x.numel() // module.in_features
    return RUN[choose(module, tokens, x.dtype, x, bias)](module, x, bias)
