"""`ActivationSparseMLP`: a gated MLP (down(act(gate(x)) * up(x))) whose neurons with |act(gate(x))| below a
calibrated per-layer threshold are zeroed (CATS, Lee et al. 2024), and skipped when decoding.

- few tokens (decoding, <= `max_sparse_tokens`): compute the gate, keep the active neurons (of any token), then
  multiply only their rows of up_proj and their columns of down_proj (kernels/activation_sparse.py: a fused C
  gather kernel on the CPU, Triton on CUDA). down_proj's weight is held column-major (a transposed view of a
  contiguous [intermediate, hidden] tensor), so each neuron's column is one contiguous row; the checkpoint stores
  the usual layout. The masked dense path multiplies that layout at the same speed in float32, 1.2-1.7x slower in
  bf16 (down_proj alone, 4096x14336, 1-64 tokens, one thread; a row-major copy would double its memory).
- many tokens (prefill, training): the dense MLP with the same mask, so every path computes the same function.
- optional neuron scaling (`neuron_scaling`, channel-wise like CHESS): the criterion is |act(gate(x))_i| * s_i with
  s_i = E|up_i(x)| * ||W_down[:, i]|| on the calibration tokens (normalized to mean 1), the neuron's typical share of
  the output per unit of gate, so a neuron with a small up-projection or a small down column is skipped sooner. On
  builtin:small it cuts the MLP's output error at equal sparsity by 10-40% per layer. The scales are saved with the
  weights.
- optional gate predictor (`predictor_rank` > 0, Deja Vu style but with no training): a rank-r factorization of
  gate_proj's weight from its SVD, W_g ~ P_out P_in, predicts the gate; only neurons the prediction puts above
  `predictor_threshold` (the candidates) get their exact gate row computed, so decoding reads r (hidden +
  intermediate) + candidates x hidden weights for the gate instead of all of gate_proj. A neuron is active when it
  is a candidate and its exact gate passes `threshold`, on every path (the masked dense path applies both masks).
- or a quantized gate predictor (`predictor_bits` 8 or 4): gate_proj's int8 / int4 copy (round-to-nearest, one
  scale per 128 columns) predicts the gate, far closer than a low-rank factor, so the candidates are barely more
  than the active neurons; decoding reads a quarter / an eighth of the gate's fp32 bytes for the prediction, then
  the candidates' exact gate rows. The copy adds 25% / 12.5% of gate_proj's fp32 bytes to the model.
- or the quantized copy as the gate itself (`exact_gate=False`, with `predictor_bits`): no fp32 gate row is read
  when decoding, and every path (decode gathers, masked dense prefill, calibration) computes the gate from the
  copy's integer products with x rounded to int8, so the function stays one; its rounding error is part of the
  perplexity the calibration budgets against the original model. Decoding then reads a quarter (int8) of the gate's
  fp32 bytes, plus the active neurons' up rows and down columns; gate_proj's weight holds the copy expanded, which
  prefill multiplies in one GEMM (checkpoints store the codes only: the gate then costs a quarter / an eighth of
  its 16-bit bytes on disk, and the weight is expanded from them on load).

Its children keep the names and tensors of the MLP it replaces (gate_proj, up_proj, down_proj), so the checkpoint's
tensors are those of the dense model (gate_proj's rounded to its copy's grid when that is the gate); the threshold is
recorded in the checkpoint's compression section."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.activation_sparse import (FEW_ROWS, cpu_reads, dequantize_into, gather_axpy, gather_dot,
                                         quantization_group, quantize_groups, quantized_matvec)
from ..kernels.cpu_gather import cpu_select_silu
from ..prune.activation_sparsity import down_weight


class ActivationSparseMLP(nn.Module):
    def __init__(self, mlp: nn.Module, threshold: float = 0.0, max_sparse_tokens: int = 4, predictor_rank: int = 0,
                 predictor_threshold: float = 0.0, neuron_scaling: bool = False, predictor_bits: int = 0,
                 exact_gate: bool = True):
        super().__init__()
        if not exact_gate and not predictor_bits:
            raise ValueError("exact_gate=False computes the gate from its quantized copy: set predictor_bits (8 or 4)")
        if predictor_rank and predictor_bits:
            raise ValueError("one gate predictor: predictor_rank (low rank) or predictor_bits (quantized), not both")
        if predictor_bits not in (0, 4, 8):
            raise ValueError(f"predictor_bits must be 0, 4 or 8, not {predictor_bits}")
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        device = mlp.gate_proj.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        # not in the state dict (which is cast to the checkpoint's bf16): the pass records the exact float in the
        # checkpoint's compression section and restore passes it back. Set into _buffers on a real device: under
        # accelerate's init_empty_weights (max_memory loading) register_buffer and the default device are meta, and
        # the loader fills meta tensors only from the weights, which do not hold these.
        for name, value in (("threshold", threshold), ("predictor_threshold", predictor_threshold)):
            self.register_buffer(name, None, persistent=False)
            self._buffers[name] = torch.tensor(float(value), dtype=torch.float32, device=device)
        self.predictor_rank = predictor_rank
        if predictor_rank:  # saved with the weights (checkpoint dtype); `fit_predictor` fills them
            w = mlp.gate_proj.weight
            self.register_buffer("predictor_in", w.new_zeros(predictor_rank, w.shape[1]))
            self.register_buffer("predictor_out", w.new_zeros(w.shape[0], predictor_rank))
        self.predictor_bits = predictor_bits
        self.exact_gate = exact_gate
        # exact_gate=False: whether gate_proj's weight holds the copy expanded (`adopt_quantized_gate`), and what it
        # was expanded from
        self.gate_adopted = False
        self._expanded_key: tuple | None = None
        if predictor_bits:  # saved with the weights (codes as integers, scales at checkpoint dtype)
            w = mlp.gate_proj.weight
            n, d = w.shape
            shape, dtype = ((n, d), torch.int8) if predictor_bits == 8 else ((n, d // 2), torch.uint8)
            self.register_buffer("predictor_codes", torch.zeros(shape, dtype=dtype, device=w.device))
            self.register_buffer("predictor_scales", w.new_zeros(n, d // quantization_group(d)))
        self.neuron_scaling = neuron_scaling
        if neuron_scaling:  # saved with the weights (checkpoint dtype); `fit_neuron_scale` fills it
            w = mlp.gate_proj.weight
            self.register_buffer("neuron_scale", w.new_ones(w.shape[0]))
        self.max_sparse_tokens = max_sparse_tokens
        if device.type == "cpu" and self._gatherable():
            self.column_major_down()  # now, not on the first decoding step (~0.18 s a layer at Llama-3-8B's shape)
        self.record = False  # when True, forward counts active neurons into `counts` (benchmarks, reports)
        self.counts = [0, 0]  # [active, seen] (token, neuron) pairs

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()`, `.bfloat16()` move the thresholds but keep them float32, as load builds them (a
        bf16 cast rounded 0.33743 to 0.33789: other neurons kept than in the model loaded in bf16, and a save wrote
        the float32 value back)."""
        exact = {name: self._buffers[name] for name in ("threshold", "predictor_threshold")}
        super()._apply(fn, recurse)
        for name, value in exact.items():
            moved = self._buffers[name]  # (to or from meta, e.g. `to_empty`: no value to keep)
            self._buffers[name] = moved.float() if value.is_meta or moved.is_meta else value.to(moved.device)
        return self

    @property
    def has_predictor(self) -> bool:
        return bool(self.predictor_rank or self.predictor_bits)

    def predictor_description(self) -> str:
        """How decoding picks the gate rows it reads ('' without a predictor): runtime_path and `compress inspect`."""
        if not self.has_predictor:
            return ""
        kind = f"rank-{self.predictor_rank}" if self.predictor_rank else f"int{self.predictor_bits}"
        if not self.exact_gate:
            return f"the gate from its {kind} copy, no fp32 gate rows read"
        return f"gate rows of {kind} predicted candidates"

    @torch.no_grad()
    def fit_predictor(self, storage_dtype: torch.dtype | None = None) -> None:
        """P_in = diag(S_r) V_r^T, P_out = U_r from gate_proj's SVD (the best rank-r approximation), or gate_proj's
        quantized copy; rounded to `storage_dtype` (the checkpoint's), so the model in memory predicts exactly what
        its saved copy will."""
        w = self.gate_proj.weight
        if self.predictor_bits:
            codes, scales = quantize_groups(w, self.predictor_bits)
            self.predictor_codes.copy_(codes)
            self.predictor_scales.copy_(scales.to(storage_dtype or w.dtype))
            return
        u, sv, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        r, rounding = self.predictor_rank, storage_dtype or w.dtype
        self.predictor_in.copy_((sv[:r, None] * vh[:r]).to(rounding))
        self.predictor_out.copy_(u[:, :r].to(rounding))

    @torch.no_grad()
    def fit_neuron_scale(self, up_abs_mean: torch.Tensor, storage_dtype: torch.dtype | None = None) -> None:
        """s_i = E|up_i(x)| * ||W_down[:, i]||, normalized to mean 1, rounded to `storage_dtype` (the checkpoint's)."""
        scale = up_abs_mean.float() * down_weight(self.down_proj).norm(dim=0)
        scale = scale / scale.mean().clamp_min(1e-12)
        self.neuron_scale.copy_(scale.to(storage_dtype or self.neuron_scale.dtype))

    def scores(self, g: torch.Tensor, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """What `threshold` compares: |g|, times each neuron's scale with neuron scaling (`neurons`: the indices of
        g's columns when g holds only some neurons). Scaled in float32, as the C gathers scale."""
        s = g.abs()
        if not self.neuron_scaling:
            return s
        scale = self.neuron_scale if neurons is None else self.neuron_scale[neurons]
        return s.float() * scale.float()

    @staticmethod
    def at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """scores >= the float32 threshold, decided as the C gathers decide in float32: in a bf16/fp16 model against
        the threshold rounded up to that dtype, the same decisions without a float32 copy of the scores (rounded to
        nearest, the threshold moved, and the torch path kept other neurons than the C one)."""
        t = threshold.to(scores.dtype)  # (torch.where: no GPU-to-CPU sync, as an `if` on a tensor would make)
        t = torch.where(t.float() < threshold.float(), torch.nextafter(t, torch.full_like(t, float("inf"))), t)
        return scores >= t

    @torch.no_grad()
    def adopt_quantized_gate(self, expand: bool = True) -> None:
        """exact_gate=False, once the calibration accepted the copy as the gate (or a checkpoint that stores it is
        loaded: `expand=False`, the codes are not read yet): gate_proj's weight holds the copy expanded from now on
        (`expanded_gate`). Its original values are not needed again, so no float copy is added; checkpoints store
        the codes only (`derived_tensors`). It is frozen: the gate is its codes, which training would not change."""
        self.gate_adopted = True
        self.gate_proj.weight.requires_grad_(False)
        self._expanded_key = None
        if expand:
            self.expanded_gate()

    def derived_tensors(self) -> tuple[str, ...]:
        """Tensors a checkpoint leaves out (inspection.derived_tensor_names): with the copy adopted as the gate,
        gate_proj's weight is the codes expanded, rebuilt from them on load (`rebuild_derived`); storing it too
        would add the gate's float bytes to its codes'."""
        adopted = self.gate_adopted and not self.exact_gate and type(self.gate_proj) is nn.Linear
        return ("gate_proj.weight",) if adopted else ()

    def rebuild_derived(self) -> None:
        self._expanded_key = None
        self.expanded_gate()

    def unused_children(self) -> dict[str, str]:
        """{child: why} for children nothing calls (passes refuse to compress them: pass_api.unused_modules)."""
        if not (self.gate_adopted and not self.exact_gate):
            return {}
        return {"gate_proj": f"this MLP computes its gate from gate_proj's int{self.predictor_bits} copy "
                             "(activation_sparsity, exact_gate: false), so gate_proj is never called"}

    def after_storage_rounding(self) -> None:
        """`round_to_storage` rounded gate_proj's weight through `.data` (no version bump): expand the codes again
        on next use, so the model keeps computing the copy exactly, as a reloaded one does."""
        self._expanded_key = None

    @torch.no_grad()
    def expanded_gate(self) -> torch.Tensor | None:
        """gate_proj's weight holding the quantized copy expanded (codes x scales at the weight's dtype), which prefill
        multiplies in one GEMM; expanded again whenever the codes, scales or weight changed since (a load, a refit).
        None before `adopt_quantized_gate`, or where gate_proj is no plain Linear beside the codes (a later pass
        replaced it, or its weight is meta / offloaded): then prefill expands the copy into a shared buffer."""
        gate = self.gate_proj
        if not self.gate_adopted or type(gate) is not nn.Linear or gate.weight.device != self.predictor_codes.device \
                or not gate.weight.is_contiguous() or not gate.weight.is_floating_point():
            return None
        tensors = (gate.weight, self.predictor_codes, self.predictor_scales)

        def key():  # inference tensors (loaded under torch.inference_mode) keep no version: their storage only
            return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)

        if self._expanded_key != key():
            dequantize_into(gate.weight, self.predictor_codes, self.predictor_scales, self.predictor_bits)
            self._expanded_key = key()
        return gate.weight

    def predicted_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's estimate of gate(x) [tokens, intermediate] (before the activation): P_out P_in x, or W~ x
        with W~ the gate's quantized copy."""
        if self.predictor_bits:
            # prefill-sized x: one GEMM on the expanded copy (decoding reads the codes: no key check on its path)
            expanded = self.expanded_gate() if x.shape[0] > FEW_ROWS else None
            pre = quantized_matvec(self.predictor_codes, self.predictor_scales, x, self.predictor_bits,
                                   expanded).to(x.dtype)
            return pre + self.gate_proj.bias if self.gate_proj.bias is not None else pre
        return (x @ self.predictor_in.t().to(x.dtype)) @ self.predictor_out.t().to(x.dtype)

    def predicted_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's estimate of `scores(act(gate(x)))` [tokens, intermediate]."""
        return self.scores(self.act_fn(self.predicted_gate(x)))

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        return self.at_least(self.predicted_scores(x), self.predictor_threshold)

    def _count(self, keep: torch.Tensor, seen: int | None = None) -> None:
        """Add kept (token, neuron) pairs and, of all `seen` (default: keep's size), to `counts` when recording."""
        if self.record:
            self.counts[0] += int(keep.sum())
            self.counts[1] += keep.numel() if seen is None else seen

    def gate_pre(self, x: torch.Tensor) -> torch.Tensor:
        """gate(x) before the activation: gate_proj(x), or its quantized copy's product when that is the gate."""
        return self.gate_proj(x) if self.exact_gate else self.predicted_gate(x)

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(act(gate(x)), keep mask: scores(act(gate(x))) >= threshold, and a predicted candidate with a predictor
        that only picks candidates)."""
        g = self.act_fn(self.gate_pre(x))
        keep = self.at_least(self.scores(g), self.threshold)
        if self.has_predictor and self.exact_gate:
            keep &= self.candidates(x)
        self._count(keep)
        return g, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= self.max_sparse_tokens and not self.training and self._gatherable() \
                and not self._needs_grad(x2):
            y = self._sparse(x2)
        else:
            g, keep = self.gate(x2)
            y = self.down_proj(g * self.up_proj(x2) * keep)
        return y.view(*lead, y.shape[-1])

    def _needs_grad(self, x: torch.Tensor) -> bool:
        """A call whose output gradients are asked for (attribution, an adapter trained in eval mode): the masked
        dense path, which autograd follows; the C and Triton gathers return a tensor without a graph, which cut it
        silently."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def small_for_gathers(self) -> bool:
        """A CPU MLP below MIN_GATHER_WEIGHTS, which decodes through the masked dense path (works on meta too)."""
        w = self.up_proj.weight
        return not w.is_cuda and 3 * w.numel() < self.MIN_GATHER_WEIGHTS

    def runtime_path(self, tokens: int = 1) -> str:
        if tokens > self.max_sparse_tokens or self.training or not self._gatherable():
            small = tokens <= self.max_sparse_tokens and not self.training and self.dense_projections() \
                and self.small_for_gathers()
            return "masked dense (a small MLP: gathers would be slower)" if small else "masked dense"
        w = self.up_proj.weight
        in_c = self._select_in_c() or (w.dtype == torch.float32 and cpu_reads(w))  # fp32: the gathers alone too
        gather = "Triton" if w.is_cuda else "C" if in_c else "torch"
        gate = f", {self.predictor_description()}" if self.has_predictor else ""
        if self.predictor_bits and gather == "torch":  # the quantized product: C and Triton kernels
            gate += " (the prediction by the torch reference: slow)"
        return f"active rows only ({gather} gather{gate})"

    def dense_projections(self) -> bool:
        """up_proj and down_proj are plain Linear layers, whose rows the gather kernels read (a quantize pass after
        this one replaces them: then decoding runs the masked dense path)."""
        return all(type(p) is nn.Linear for p in (self.up_proj, self.down_proj))

    # Below this many weights (gate + up + down) the gathers lose to the dense product: the MLP sits in cache and
    # per-call work dominates (one CPU thread, 50% inactive, float32: 0.66x at 256x704, 0.86x at 384x1152, 0.94x at
    # 512x1536, 1.01x at 1024x2816, 1.30x at 2048x5632, 1.35x at 4096x14336), so smaller MLPs take the masked dense
    # path, which computes the same function. On CUDA the Triton gathers run at any size.
    MIN_GATHER_WEIGHTS = 8_000_000

    def _gatherable(self) -> bool:
        return self.dense_projections() and self.up_proj.weight.device.type != "meta" and not self.small_for_gathers()

    @torch.no_grad()
    def column_major_down(self) -> torch.Tensor:
        """down_proj's weight transposed [intermediate, hidden], contiguous: lays it out once, in place."""
        w = self.down_proj.weight
        if w.stride(0) != 1:
            w.data = w.data.t().contiguous().t()
        return w.t()

    def _sparse_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(act(gate(x)) of the neurons any token keeps, zero where a token does not keep one; their indices): with
        a predictor, only the candidates' gate rows are read."""
        if self._select_in_c():
            return self._sparse_gate_c(x)
        if not self.has_predictor or not self.exact_gate or type(self.gate_proj) is not nn.Linear:
            g, keep = self.gate(x)
            idx = keep.any(0).nonzero().squeeze(1)
            return (g * keep)[:, idx], idx
        cand = self.candidates(x)
        idx = cand.any(0).nonzero().squeeze(1)
        pre = gather_dot(self.gate_proj.weight, idx, x).to(x.dtype)
        if self.gate_proj.bias is not None:
            pre = pre + self.gate_proj.bias[idx]
        g = self.act_fn(pre)
        keep = self.at_least(self.scores(g, idx), self.threshold) & cand[:, idx]
        self._count(keep, cand.numel())  # every neuron was seen, only the candidates' gates computed
        used = keep.any(0)
        return (g * keep)[:, used], idx[used]

    def _select_in_c(self) -> bool:
        """The C path applies: SiLU gate, weights the C kernels read (float32, or bfloat16 read as such) on a CPU with
        a compiler. It computes in float32 whatever the weights' dtype (x is widened, the output rounded back)."""
        return type(self.act_fn).__name__ in ("SiLU", "SiLUActivation") and type(self.gate_proj) is nn.Linear \
            and cpu_reads(self.up_proj.weight) and self.up_proj.weight.dtype == self.gate_proj.weight.dtype \
            and self.down_proj.weight.dtype == self.up_proj.weight.dtype

    def _sparse_gate_c(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_sparse_gate` with its selection in C, x float32: the same decisions (up to the rounding of a bf16
        model's masked dense path, which rounds the gate to bf16 before comparing it)."""
        scale = self.neuron_scale.float() if self.neuron_scaling else None
        gate = self.gate_proj
        if not self.has_predictor or not self.exact_gate:
            if not self.exact_gate:  # the quantized copy is the gate: no fp32 gate row is read
                pre = self.predicted_gate(x)
            elif gate.weight.dtype == x.dtype:
                pre = gate(x)
            else:  # a bf16 gate against float32 x: every row through the C gather (no float copy of the weight)
                pre = gather_dot(gate.weight, torch.arange(gate.out_features), x)
                pre = pre if gate.bias is None else pre + gate.bias
            idx, keep, g = cpu_select_silu(pre, float(self.threshold), scale)
            self._count(keep, pre.numel())
            return g, idx
        cand, allowed, _ = cpu_select_silu(self.predicted_gate(x), float(self.predictor_threshold), scale)
        pre = gather_dot(gate.weight, cand, x)
        if gate.bias is not None:
            pre = pre + gate.bias[cand]
        idx, keep, g = cpu_select_silu(pre, float(self.threshold), scale, ids=cand, allow=allowed)
        self._count(keep, x.shape[0] * gate.out_features)
        return g, idx

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self._select_in_c():  # the C kernels compute in float32 from float32 or bf16 weights
            x = x.float()
        g, idx = self._sparse_gate(x)
        h = g * gather_dot(self.up_proj.weight, idx, x).to(g.dtype)
        if self.up_proj.bias is not None:
            h = h + g * self.up_proj.bias[idx]
        y = gather_axpy(self.column_major_down(), idx, h)
        if self.down_proj.bias is not None:
            y = y + self.down_proj.bias
        return y.to(dtype)

    def extra_repr(self) -> str:
        kind = f"predictor_rank={self.predictor_rank}" if self.predictor_rank else \
            f"predictor_bits={self.predictor_bits}"
        extra = f", {kind}, predictor_threshold={float(self.predictor_threshold):.4g}" if self.has_predictor else ""
        extra += "" if self.exact_gate else ", exact_gate=False"
        scaled = ", neuron_scaling=True" if self.neuron_scaling else ""
        return f"threshold={float(self.threshold):.4g}{scaled}, max_sparse_tokens={self.max_sparse_tokens}{extra}"
