"""Append-only storage of one layer's compressed keys (or values), in the shared storage format.

Per (batch row b, KV head h), with D = head_dim, C = chunk length (= residual_length), N = compressed tokens:
- codes uint8 [B, H, N, D*bits/8]; scale/zero fp16 [B, H, N/G, D] for keys, [B, H, N, D/G] for values;
- outliers: values fp16 and flat in-chunk positions (t*D + d, int16) [B, H, n_chunks, k];
- low-rank: runs of chunks that share a rank r ("segments"; the prompt's chunks may use another rank than the
  decode chunks), each with A fp16 [B, H, tokens, r] and Bf fp16 [B, H, chunks, D, r].
Chunks are only ever appended (or dropped from the end by `crop`); old chunks are never re-compressed. Every update
builds new tensors rather than writing in place, so a shallow copy (`snapshot`) is a consistent view of the past."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .gear_math import as_packed, compress_chunks
from .kernel_api import KEY_AXIS, unpack_dequantize


@dataclass
class LowRankSegment:
    first_chunk: int
    a: torch.Tensor    # [B, H, chunks*C, r]
    b: torch.Tensor    # [B, H, chunks, D, r]

    @property
    def num_chunks(self) -> int:
        return self.b.shape[2]


def _cat(old: torch.Tensor | None, new: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    if new is None:
        return old
    return new if old is None else torch.cat([old, new], dim=dim)


class CompressedStore:
    """One layer's compressed keys (axis "token": groups along tokens) or values ("channel": along channels)."""

    def __init__(self, *, axis: str, bits: int, group_size: int, chunk_len: int, outlier_ratio: float,
                 power_iters: int):
        self.axis, self.bits, self.group_size, self.chunk_len = axis, bits, group_size, chunk_len
        self.outlier_ratio, self.power_iters = outlier_ratio, power_iters
        self.codes = self.scale = self.zero = None
        self.outlier_values = self.outlier_positions = None
        self.segments: list[LowRankSegment] = []

    # ---- size -------------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return 0 if self.codes is None else self.codes.shape[2]

    @property
    def num_chunks(self) -> int:
        return self.num_tokens // self.chunk_len

    def tensors_by_kind(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor held, by the byte-accounting item it belongs to."""
        return {
            "codes": [t for t in (self.codes,) if t is not None],
            "scales_zeros": [t for t in (self.scale, self.zero) if t is not None],
            "lowrank": [t for s in self.segments for t in (s.a, s.b)],
            "outlier_values": [t for t in (self.outlier_values,) if t is not None],
            "outlier_indices": [t for t in (self.outlier_positions,) if t is not None],
        }

    # ---- writing ----------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor, rank: int) -> None:
        """Compress x [B, H, n*C, D] (n whole chunks) with low-rank `rank`, and append it."""
        b, h, t, d = x.shape
        n = t // self.chunk_len
        chunks = compress_chunks(x.reshape(b, h, n, self.chunk_len, d), bits=self.bits, group_size=self.group_size,
                                 axis=self.axis, outlier_ratio=self.outlier_ratio, rank=rank, power_iters=self.power_iters)
        first = self.num_chunks
        self.codes = _cat(self.codes, chunks.codes, 2)
        self.scale = _cat(self.scale, chunks.scale, 2)
        self.zero = _cat(self.zero, chunks.zero, 2)
        self.outlier_values = _cat(self.outlier_values, chunks.outlier_values, 2)
        self.outlier_positions = _cat(self.outlier_positions, chunks.outlier_positions, 2)
        if rank:
            last = self.segments[-1] if self.segments else None
            if last is not None and last.a.shape[-1] == rank and last.first_chunk + last.num_chunks == first:
                self.segments[-1] = LowRankSegment(last.first_chunk, torch.cat([last.a, chunks.lowrank_a], 2),
                                                   torch.cat([last.b, chunks.lowrank_b], 2))
            else:
                self.segments.append(LowRankSegment(first, chunks.lowrank_a, chunks.lowrank_b))

    # ---- reading ----------------------------------------------------------------------------------------------
    def snapshot(self) -> "CompressedStore":
        """A view of the current contents that later appends do not change (tensors are never written in place)."""
        view = copy.copy(self)
        view.segments = list(self.segments)
        return view

    def dequantize(self) -> torch.Tensor:
        """Dense reconstruction [B, H, N, D] (float32): dequant(codes) + outliers + low-rank."""
        c = self.chunk_len
        x = unpack_dequantize(self._packed()).reshape(*self.codes.shape[:3], -1)
        for s in self.segments:
            b, h, _, d, r = s.b.shape
            a = s.a.float().reshape(b, h, s.num_chunks, c, r)
            lr = (a @ s.b.float().transpose(-1, -2)).reshape(b, h, s.num_chunks * c, d)
            x[:, :, s.first_chunk * c:(s.first_chunk + s.num_chunks) * c] += lr
        return x

    def _packed(self, with_outliers: bool = True):
        return as_packed(self.codes, self.scale, self.zero, self.outlier_values if with_outliers else None,
                         self.outlier_positions if with_outliers else None, bits=self.bits,
                         group_size=self.group_size, axis=self.axis, chunk_len=self.chunk_len)

    def quantized_only(self) -> torch.Tensor:
        """dequant(codes) alone [B, H, N, D], without outliers or low-rank (for tests and diagnostics)."""
        return unpack_dequantize(self._packed(False)).reshape(*self.codes.shape[:3], -1)

    # ---- editing (beam search, assisted decoding) -------------------------------------------------------------
    def _map(self, fn) -> None:
        for name in ("codes", "scale", "zero", "outlier_values", "outlier_positions"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.segments = [LowRankSegment(s.first_chunk, fn(s.a), fn(s.b)) for s in self.segments]

    def index_batch(self, index: torch.Tensor) -> None:
        if self.codes is not None:
            self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_batch(self, repeats: int) -> None:
        if self.codes is not None:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def pop_chunks(self, n: int) -> torch.Tensor:
        """Remove the last n chunks and return their reconstruction [B, H, n*C, D] (float32)."""
        c, g = self.chunk_len, self.group_size
        keep_chunks = self.num_chunks - n
        tail = self.dequantize()[:, :, keep_chunks * c:]
        keep = keep_chunks * c
        if keep == 0:
            self.codes = self.scale = self.zero = self.outlier_values = self.outlier_positions = None
            self.segments = []
            return tail
        # .clone() releases the dropped part's memory (a slice would keep the whole storage alive)
        self.codes = self.codes[:, :, :keep].clone()
        scale_len = keep // g if self.axis == KEY_AXIS else keep
        self.scale, self.zero = self.scale[:, :, :scale_len].clone(), self.zero[:, :, :scale_len].clone()
        if self.outlier_values is not None:
            self.outlier_values = self.outlier_values[:, :, :keep_chunks].clone()
            self.outlier_positions = self.outlier_positions[:, :, :keep_chunks].clone()
        segments = []
        for s in self.segments:
            n_keep = min(s.num_chunks, keep_chunks - s.first_chunk)
            if n_keep > 0:
                segments.append(LowRankSegment(s.first_chunk, s.a[:, :, :n_keep * c].clone(), s.b[:, :, :n_keep].clone()))
        self.segments = segments
        return tail
