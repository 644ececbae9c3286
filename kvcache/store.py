"""Append-only storage of one layer's compressed keys (or values), in the shared storage format.

Per (batch row b, KV head h), with D = head_dim, C = chunk length (= residual_length), N = compressed tokens:
- codes uint8 [B, H, N, D*bits/8]; scale/zero fp16 [B, H, N/G, D] for keys, [B, H, N, D/G] for values;
- outliers: values fp16 and flat in-chunk positions (t*D + d, int16) [B, H, n_chunks, k];
- low-rank: runs of chunks that share a rank r ("segments"; the prompt's chunks may use another rank than the
  decode chunks), each with A fp16 [B, H, tokens, r] and Bf fp16 [B, H, chunks, D, r].
Chunks are only ever appended (or dropped from the end by `crop`); old chunks are never re-compressed.

Growth: every tensor lives in a buffer with spare capacity along its token (or chunk) axis (dim 2); an append writes
into the free region, and a full buffer is replaced by one of twice the length (amortized O(1) per appended token,
where re-concatenating would cost O(N) per chunk). The attributes (`codes`, ..., each segment's `a`/`b`) are the
filled prefixes `buffer[:, :, :length]` (views: strided along dim 2, not contiguous when B*H > 1). The first append
allocates exactly what it writes (no spare capacity after a prompt), each growth max(needed, 2 x the length held).
Spare capacity is memory held, so the byte accounting counts it: `tensors_by_kind` returns the views, whose
storage is the whole buffer (`pass_api.storage_bytes`).

Snapshots: an append only writes past the store's current length, so a snapshot (prefix views, taken earlier, of
at most that length) never sees it; a growth allocates a new buffer and the snapshot keeps the old one alive. A
snapshot holds no buffer of its own, so appending to a snapshot copies instead of writing into the shared buffer;
`pop_chunks`, `index_batch`, `repeat_batch` build new compact tensors (no buffer shared with an older snapshot, which
a later append could otherwise overwrite in the region the crop freed)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .gear_math import as_packed, compress_chunks
from .kernel_api import KEY_AXIS, unpack_dequantize


@dataclass
class LowRankSegment:
    """Never changed once built: extending a segment replaces it by a new one (so a snapshot's list stays valid)."""
    first_chunk: int
    a: torch.Tensor    # [B, H, chunks*C, r]  (filled prefix of a_buf)
    b: torch.Tensor    # [B, H, chunks, D, r] (filled prefix of b_buf)
    a_buf: torch.Tensor | None = field(default=None, repr=False, compare=False)  # None: no spare capacity owned
    b_buf: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_chunks(self) -> int:
        return self.b.shape[2]


def _owns(buf: torch.Tensor | None, view: torch.Tensor) -> bool:
    """Whether `view` is the dim-2 prefix of `buf` (so data past the view's length may be written into buf)."""
    return (buf is not None and buf.data_ptr() == view.data_ptr() and buf.dtype == view.dtype
            and buf.device == view.device and buf.stride() == view.stride()
            and buf.shape[:2] == view.shape[:2] and buf.shape[3:] == view.shape[3:])


def _append(view: torch.Tensor | None, buf: torch.Tensor | None, new: torch.Tensor | None):
    """Append `new` along dim 2 to `view` (the filled prefix of `buf`): (new view, buffer). Writes in place into
    buf's spare capacity when it fits; else allocates a buffer of max(needed, 2 x length) and copies the view."""
    if new is None:
        return view, buf
    if view is None:
        return new, new  # the first append keeps the computed tensor: exact size, no spare capacity
    n, m = view.shape[2], new.shape[2]
    if not (_owns(buf, view) and buf.shape[2] >= n + m):
        buf = view.new_empty(*view.shape[:2], max(n + m, 2 * n), *view.shape[3:])
        buf[:, :, :n] = view
    buf[:, :, n:n + m] = new
    return buf[:, :, :n + m], buf


_FLAT = ("codes", "scale", "zero", "outlier_values", "outlier_positions")


class CompressedStore:
    """One layer's compressed keys (axis "token": groups along tokens) or values ("channel": along channels)."""

    def __init__(self, *, axis: str, bits: int, group_size: int, chunk_len: int, outlier_ratio: float,
                 power_iters: int):
        self.axis, self.bits, self.group_size, self.chunk_len = axis, bits, group_size, chunk_len
        self.outlier_ratio, self.power_iters = outlier_ratio, power_iters
        self.codes = self.scale = self.zero = None
        self.outlier_values = self.outlier_positions = None
        self.segments: list[LowRankSegment] = []
        self._bufs: dict[str, torch.Tensor] = {}  # name in _FLAT -> buffer whose dim-2 prefix is that attribute

    # ---- size -------------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return 0 if self.codes is None else self.codes.shape[2]

    @property
    def num_chunks(self) -> int:
        return self.num_tokens // self.chunk_len

    def tensors_by_kind(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor held, by the byte-accounting item it belongs to: the filled-prefix views, whose storages are
        the whole buffers, so the bytes counted from them (`storage_bytes`) include the spare capacity held."""
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
        for name in _FLAT:
            view, buf = _append(getattr(self, name), self._bufs.get(name), getattr(chunks, name))
            setattr(self, name, view)
            if buf is not None:
                self._bufs[name] = buf
        if rank:
            last = self.segments[-1] if self.segments else None
            if last is not None and last.a.shape[-1] == rank and last.first_chunk + last.num_chunks == first:
                a, a_buf = _append(last.a, last.a_buf, chunks.lowrank_a)
                b_, b_buf = _append(last.b, last.b_buf, chunks.lowrank_b)
                self.segments[-1] = LowRankSegment(last.first_chunk, a, b_, a_buf, b_buf)
            else:
                self.segments.append(LowRankSegment(first, chunks.lowrank_a, chunks.lowrank_b,
                                                    chunks.lowrank_a, chunks.lowrank_b))

    # ---- reading ----------------------------------------------------------------------------------------------
    def snapshot(self) -> "CompressedStore":
        """A view of the current contents that later appends do not change (they only write past its length, or into
        a new buffer). It owns no buffer: appending to it copies rather than writing into the store's buffers."""
        view = copy.copy(self)
        view._bufs = {}
        view.segments = [LowRankSegment(s.first_chunk, s.a, s.b) for s in self.segments]
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
        """Replace every tensor by fn(filled prefix), a new compact tensor; the buffers (spare capacity) are released."""
        for name in _FLAT:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.segments = [LowRankSegment(s.first_chunk, fn(s.a), fn(s.b)) for s in self.segments]
        self._bufs = {}

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
        self._bufs = {}  # never write again into the freed region: an older snapshot may still see it
        if keep == 0:
            self.codes = self.scale = self.zero = self.outlier_values = self.outlier_positions = None
            self.segments = []
            return tail
        # .clone() releases the dropped part's memory and the spare capacity (a slice would keep the whole buffer)
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
