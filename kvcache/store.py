"""Append-only paged storage of one layer's compressed keys (or values), in the paged format of
compress.kernels.kv_pages (format version 2: pages of `page_chunks` chunks, exact-size tensors, a low-rank span per
page, uint8 outlier offsets).

Memory: full pages are exactly their data; the open page is held at exactly its filled size (an append of a chunk
to it re-allocates it, copying at most page_chunks - 1 chunks, a bounded cost per chunk), so the bytes held are the
data at every length: never a doubling buffer with spare capacity.

Snapshots: pages are never modified in place (an append to the open page replaces it by a new Page), so a snapshot
(a copy of the page list) stays valid whatever the store does later. Crop, batch selection and repetition build
new pages."""
from __future__ import annotations

import copy

import torch

from ..kernels.kv_pages import Page, as_bytes_apply, head_dim, outlier_coordinates
from ..kernels.kv_quant import outliers_per_side
from .gear_math import compress_span
from .kernel_api import KEY_AXIS, PackedQuant, unpack_dequantize


def _cat_pages(old: Page, new: Page) -> Page:
    """The open page with new chunks appended (a new Page; `old` is left untouched for snapshots)."""
    out = []
    for name in ("codes", "scale", "zero", "outlier_values", "outlier_offsets", "a"):
        a, b = getattr(old, name), getattr(new, name)
        out.append(None if a is None else as_bytes_apply(lambda u, v: torch.cat([u, v], dim=2), a, b))
    return Page(*out, basis=old.basis)


class CompressedStore:
    """One layer's compressed keys (axis "token": groups along tokens) or values ("channel": along channels)."""

    def __init__(self, *, axis: str, bits: int, group_size: int, chunk_len: int, outlier_ratio: float,
                 power_iters: int, page_chunks: int = 32, factor_dtype: torch.dtype = torch.float16,
                 scale_format: str = "fp16"):
        self.axis, self.bits, self.group_size, self.chunk_len = axis, bits, group_size, chunk_len
        self.outlier_ratio, self.power_iters, self.page_chunks = outlier_ratio, power_iters, page_chunks
        self.per_group = 2 * outliers_per_side(outlier_ratio, group_size)
        self.factor_dtype, self.scale_format = factor_dtype, scale_format
        self.pages: list[Page] = []

    # ---- size -------------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(p.codes.shape[2] for p in self.pages)

    @property
    def num_chunks(self) -> int:
        return self.num_tokens // self.chunk_len

    def tensors_by_kind(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor held, by the byte-accounting item it belongs to (all compact: bytes held = data)."""
        pick = lambda *names: [getattr(p, n) for p in self.pages for n in names if getattr(p, n) is not None]  # noqa
        return {"codes": pick("codes"), "scales_zeros": pick("scale", "zero"), "lowrank": pick("a", "basis"),
                "outlier_values": pick("outlier_values"), "outlier_indices": pick("outlier_offsets")}

    # ---- writing ----------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor, rank: int) -> None:
        """Compress x [B, H, n*C, D] (n whole chunks) and append it: first into the open page (projected onto its
        low-rank basis, if it has one), then into new pages of up to page_chunks chunks, each with a rank-`rank`
        basis of its own tokens."""
        c, p = self.chunk_len, self.page_chunks
        n = x.shape[2] // c
        done = 0
        if self.pages and self.pages[-1].codes.shape[2] < p * c:
            take = min(n, p - self.pages[-1].codes.shape[2] // c)
            last = self.pages[-1]
            new = self._compress(x[:, :, :take * c], rank=0, basis=last.basis)
            self.pages[-1] = _cat_pages(last, new)
            done = take
        while done < n:
            take = min(n - done, p)
            self.pages.append(self._compress(x[:, :, done * c:(done + take) * c], rank=rank, basis=None))
            done += take

    def _compress(self, x, rank, basis) -> Page:
        return compress_span(x, bits=self.bits, group_size=self.group_size, axis=self.axis,
                             outlier_ratio=self.outlier_ratio, chunk_len=self.chunk_len, rank=rank,
                             power_iters=self.power_iters, basis=basis, factor_dtype=self.factor_dtype,
                             scale_format=self.scale_format)

    # ---- reading ----------------------------------------------------------------------------------------------
    def snapshot(self) -> "CompressedStore":
        """The current contents, unchanged by later appends (pages are replaced, never modified)."""
        view = copy.copy(self)
        view.pages = list(self.pages)
        return view

    def _page_quantized(self, page: Page, with_outliers: bool) -> torch.Tensor:
        b, h, t, _ = page.codes.shape
        d = head_dim(self)
        k, c = t // self.chunk_len, self.chunk_len
        per_chunk = lambda u: u.reshape(b, h, k, -1, u.shape[-1])  # noqa: E731
        packed = PackedQuant(per_chunk(page.codes), per_chunk(page.scale), per_chunk(page.zero), self.bits,
                             self.group_size, self.axis, (b, h, k, c, d))
        x = unpack_dequantize(packed).reshape(b, h, t, d)
        if with_outliers and page.outlier_values is not None:
            tok, ch = outlier_coordinates(self, page)
            x.view(b, h, -1).scatter_add_(-1, tok * d + ch, page.outlier_values.reshape(b, h, -1).float())
        return x

    def dequantize(self) -> torch.Tensor:
        """Dense reconstruction [B, H, N, D] (float32): dequant(codes) + outliers + low-rank."""
        parts = []
        for page in self.pages:
            x = self._page_quantized(page, True)
            if page.a is not None:
                x += page.a.float() @ page.basis.float().transpose(-1, -2)
            parts.append(x)
        return torch.cat(parts, dim=2)

    def quantized_only(self) -> torch.Tensor:
        """dequant(codes) alone [B, H, N, D], without outliers or low-rank (for tests and diagnostics)."""
        return torch.cat([self._page_quantized(p, False) for p in self.pages], dim=2)

    # ---- editing (beam search, assisted decoding) -------------------------------------------------------------
    def index_batch(self, index: torch.Tensor) -> None:
        self.pages = [p.map(lambda t: t.index_select(0, index.to(t.device))) for p in self.pages]

    def repeat_batch(self, repeats: int) -> None:
        self.pages = [p.map(lambda t: t.repeat_interleave(repeats, dim=0)) for p in self.pages]

    def drop_pages_before(self, tokens: int) -> int:
        """Drop the leading whole pages that end at or before token `tokens` (a sliding window's past); returns the
        tokens dropped. Pages are never cut: each keeps its own low-rank basis."""
        dropped = 0
        while self.pages and dropped + self.pages[0].codes.shape[2] <= tokens:
            dropped += self.pages.pop(0).codes.shape[2]
        return dropped

    def pop_chunks(self, n: int) -> torch.Tensor:
        """Remove the last n chunks and return their reconstruction [B, H, n*C, D] (float32)."""
        c, g = self.chunk_len, self.group_size
        keep = (self.num_chunks - n) * c
        tail = self.dequantize()[:, :, keep:]
        pages, start = [], 0
        for page in self.pages:
            t = page.codes.shape[2]
            if start + t <= keep:
                pages.append(page)
            elif start < keep:
                k = keep - start  # tokens of this page that stay; .clone() releases the rest
                cut = lambda u, n_: as_bytes_apply(lambda v: v[:, :, :n_].clone(), u)  # noqa: E731
                scale_len = k // g if self.axis == KEY_AXIS else k
                pages.append(Page(cut(page.codes, k), cut(page.scale, scale_len), cut(page.zero, scale_len),
                                  *[None if u is None else cut(u, k // c) for u in (page.outlier_values,
                                                                                    page.outlier_offsets)],
                                  None if page.a is None else cut(page.a, k), page.basis))
            start += t
        self.pages = pages
        return tail
