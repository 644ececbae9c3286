"""The paged storage format of a compressed KV cache (format version 2), shared by the cache (kvcache/store.py), the
torch reference (kv_attention_reference.py) and the Triton decode kernel (kv_attention_triton.py).

One layer's keys (axis "token") or values (axis "channel"), per (batch row b, KV head h), with D = head_dim,
C = chunk length (the cache's residual_length), G = group size, P = chunks per page:
- the compressed tokens are chunks of C tokens, grouped into pages of P chunks; every page is a set of compact
  tensors [B, H, ...] (one allocation per field and page, no spare capacity); the last ("open") page may hold fewer
  than P chunks and is held at exactly its filled size (an append re-allocates it: a copy of at most P - 1 chunks);
  a full page is never copied again. The page list is the page table: the kernel reads it through one table of
  pointers (`page_table`), as paged attention does.
- codes    uint8 [B, H, k*C, D*bits/8]  (packed as in kv_quant.py)
- scale, zero fp16: keys [B, H, k*C/G, D] (G tokens of one channel), values [B, H, k*C, D/G] (G channels of a token);
  scale_format "log8" stores the scale as one byte u, 2^(u/8 - 17) (kv_scale.py; a store's pages share one format)
- outliers (GEAR): in every group the `per_group` entries set aside by the quantizer (kv_quant.py): correction
  values fp16 and their offsets inside the group as uint8 (token offset for keys, channel offset for values),
  both [B, H, k, n_groups_per_chunk * per_group], group by group in the scale layout's order.
- low-rank (GEAR): one span per page: an orthonormal channel basis `basis` fp16 [B, H, D, r] shared by the page's
  tokens and token factors `a` fp16 (or fp8 e4m3) [B, H, k*C, r] = residual @ basis, so the page's residual ~ a @ basis^T. The
  prompt's pages get their basis from all their tokens (power iteration); a page opened by a decode chunk from that
  chunk, and later chunks of the page are projected onto it. Rank r is per page (0: none).
Per element this costs bits + 32/G (scale, zero; 24/G with log8 scales) + per_group * 24/G (outliers) + 16 r / D (a)
+ 16 r / (P C) (basis)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 2
PAGE_FIELDS = ("codes", "scale", "zero", "outlier_values", "outlier_offsets", "a", "basis")


@dataclass
class Page:
    """Up to P chunks of one store; every tensor compact [B, H, ...]; fields absent in this format are None."""

    codes: torch.Tensor
    scale: torch.Tensor                          # fp16, or uint8 (log8 scales)
    zero: torch.Tensor
    outlier_values: torch.Tensor | None = None   # fp16 [B, H, k, n_out]
    outlier_offsets: torch.Tensor | None = None  # uint8 [B, H, k, n_out]
    a: torch.Tensor | None = None                # fp16 or fp8 e4m3 [B, H, k*C, r]
    basis: torch.Tensor | None = None            # fp16 [B, H, D, r]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f) for f in PAGE_FIELDS) if t is not None]

    @property
    def rank(self) -> int:
        return 0 if self.basis is None else self.basis.shape[-1]

    def map(self, fn) -> "Page":
        """A new Page of fn(tensor) for every field (fp8 factors go through a uint8 view: CPU kernels for
        index_select / cat / repeat may lack fp8)."""
        return Page(*[None if t is None else as_bytes_apply(fn, t) for t in (getattr(self, f) for f in PAGE_FIELDS)])


def as_bytes_apply(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors), through uint8 views for 1-byte float types."""
    if tensors[0].dtype.is_floating_point and tensors[0].element_size() == 1:
        return fn(*[t.view(torch.uint8) for t in tensors]).view(tensors[0].dtype)
    return fn(*tensors)


@dataclass
class PagedKV:
    """A store in the paged format (the cache's CompressedStore has the same attributes)."""

    axis: str
    bits: int
    group_size: int
    chunk_len: int
    page_chunks: int
    pages: list = field(default_factory=list)
    per_group: int = 0  # outliers per quantization group (0: none)

    @property
    def num_tokens(self) -> int:
        return sum(p.codes.shape[2] for p in self.pages)


def num_tokens(store) -> int:
    return 0 if store is None else sum(p.codes.shape[2] for p in store.pages)


def head_dim(store) -> int:
    return store.pages[0].codes.shape[-1] * 8 // store.bits


def outlier_coordinates(store, page: Page) -> tuple[torch.Tensor, torch.Tensor]:
    """Token (within the page) and channel of each outlier of a page: two int64 [B, H, k * n_out] (computed per
    call, not cached: int64 coordinates would outweigh the 3 bytes an outlier is stored in)."""
    off = page.outlier_offsets.long()
    b, h, k, n_out = off.shape
    c, g, d = store.chunk_len, store.group_size, head_dim(store)
    per = n_out // (c * d // g)                                 # outliers per group
    grp = torch.arange(n_out, device=off.device) // per         # group index in the chunk's scale layout
    chunk0 = (torch.arange(k, device=off.device) * c).view(k, 1)
    if store.axis == "token":   # group (tg, ch): tokens tg*G .. tg*G+G-1 of channel ch
        token = chunk0 + (grp // d) * g + off
        channel = (grp % d).expand_as(off)
    else:                       # group (t, gi): channels gi*G .. of token t
        token = (chunk0 + grp // (d // g)).expand_as(off)
        channel = (grp % (d // g)) * g + off
    return token.reshape(b, h, -1), channel.reshape(b, h, -1)


def page_pointers(page: Page) -> list[int]:
    """data_ptr of each field in PAGE_FIELDS order, an absent field pointing at the codes (never read). Cached on the
    page: its tensors never change (an append replaces the open page by a new one)."""
    ptrs = page.__dict__.get("_ptrs")
    if ptrs is None or ptrs[0] != page.codes.data_ptr():  # a deep copy or unpickled page carries the old list
        if any(t.device != page.codes.device for t in page.tensors()):
            raise ValueError("the fields of a KV page are on different devices")
        if not all(t.is_contiguous() for t in page.tensors()):
            raise ValueError("page tensors must be contiguous: the kernels address them from their data_ptr")
        ptrs = [(page.codes if getattr(page, f) is None else getattr(page, f)).data_ptr() for f in PAGE_FIELDS]
        page.__dict__["_ptrs"] = ptrs
    return ptrs


def page_table(stores, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointer table int64 [len(stores), len(PAGE_FIELDS), n_pages] (0 for an absent field) and ranks int32
    [len(stores), n_pages] of stores with the same number of pages; an absent field points at the page's codes (never
    read: its loads are masked off). Cached on each page (pages never change)."""
    cols, ranks = [], []
    for store in stores:
        for p in store.pages:
            if p.codes.device != torch.device(device):  # (page_pointers checks the other fields once)
                raise ValueError(f"the KV store is on {p.codes.device} but attention runs on {device}: move it")
            cols.append(page_pointers(p))
            ranks.append(p.rank)
    n = len(stores[0].pages)
    table = torch.tensor(cols, dtype=torch.int64).view(len(stores), n, len(PAGE_FIELDS)).transpose(1, 2)
    return (table.contiguous().to(device, non_blocking=True),
            torch.tensor(ranks, dtype=torch.int32).view(len(stores), n).to(device, non_blocking=True))
