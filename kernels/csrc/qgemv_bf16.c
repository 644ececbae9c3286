#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QGEMV_BF16_DOT 1
#endif

#include "bf16.h"
#include "bf16_weights.h"

/* QuantizedLinear's product for bfloat16 x on CPUs with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake and later):
   out[j, r] = sum_c W[r, c] * x[j, c] in float32, W the bf16 weight the torch reference builds
   (`dequantized_weight(torch.bfloat16)`: bf16((u - z) * s), bit for bit), never written to memory.
   Why not qgemv.c's float32 loop: a bf16 model's dense product is oneDNN's vdpbf16ps (32 multiply-adds an
   instruction, and the same time for 1 and 4 tokens, memory-bound), while the float32 loop spends two FMAs and a
   nibble decode per 32 weights and token: from 4 tokens it lost to the dense layer (0.79-1.0x int4, 0.56-0.70x int8
   on a Zen 5). Here 16 bytes of 4-bit codes become 32 bf16 weights in three instructions (widen, shift-and-merge, a
   word permute from the group's 16-entry table of bf16((i - z) * s)) and each token costs one vdpbf16ps per 32
   weights; a tile of nr rows x nt tokens shares each decoded weight vector across nt tokens and each x load across
   nr rows. 8-bit codes go through float32 ((u - z) * s, then one rounding: the same bf16 as the reference).
   Groups must be whole multiples of 32 columns (the usual 64 / 128); the caller keeps qgemv.c for the rest. */

#ifdef QGEMV_BF16_DOT
#define NR 4            /* rows per tile, at most: each x load feeds nr dot products */
#define MAX_NT 8        /* tokens per tile, at most: nr x nt <= 24 accumulators stay in registers (of 32) */

ALWAYS_INLINE float scale_at(const void* scale, int scale_bf16, int64_t i) {
    return scale_bf16 ? bf16_to_f32(((const uint16_t*)scale)[i]) : ((const float*)scale)[i];
}

/* group g's decoding state for rows [r0, r0 + nr): int4 the nibble table, int8 the scale and offset (one kind is
   read; the other zeroed) */
ALWAYS_INLINE void group_state(const void* scale, int scale_bf16, const uint8_t* zero, int bits, int64_t groups,
                               int64_t r0, int nr, int64_t g, __m512i* table, __m512* s, __m512* off) {
    const float symmetric_offset = bits == 4 ? 8.f : 128.f;
    const size_t scale_bytes = scale_bf16 ? 2 : 4;
    for (int i = 0; i < nr; ++i) {
        const void* sr = (const char*)scale + (r0 + i) * groups * scale_bytes;
        float o = zero ? (float)zero[(r0 + i) * groups + g] : symmetric_offset;
        table[i] = _mm512_setzero_si512(), s[i] = off[i] = _mm512_setzero_ps();
        if (bits == 4) table[i] = nibble_table(scale_at(sr, scale_bf16, g), o);
        else s[i] = _mm512_set1_ps(scale_at(sr, scale_bf16, g)), off[i] = _mm512_set1_ps(o);
    }
}

/* rows [r0, r0 + nr) x tokens [j0, j0 + nt): nr <= NR, nt <= MAX_NT, constants where it is called (unrolled) */
ALWAYS_INLINE void tile(const uint8_t* packed, int64_t ldp, const void* scale, int scale_bf16, const uint8_t* zero,
                        int bits, int64_t group, int64_t groups, const uint16_t* x, int64_t ldx, int64_t r0, int nr,
                        int64_t j0, int nt, float* out, int64_t ldo) {
    __m512 acc[NR][MAX_NT];
    for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nt; ++j) acc[i][j] = _mm512_setzero_ps();
    /* each row prefetches its own bytes in the next tile (a fixed distance inside the row gave short rows no
       lookahead: int8 4096-wide rows ran at half the speed of 14336-wide ones at one token) */
    const int64_t ahead = nr * ldp;
    for (int64_t g = 0; g < groups; ++g) {
        __m512i table[NR];
        __m512 s[NR], off[NR];
        group_state(scale, scale_bf16, zero, bits, groups, r0, nr, g, table, s, off);
        for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
            __m512i w[NR];
            for (int i = 0; i < nr; ++i) {
                const uint8_t* row = packed + (r0 + i) * ldp;
                if (bits == 4) {
                    if (c % 128 == 0) __builtin_prefetch(row + ahead + c / 2, 0, 1);
                    w[i] = weights_int4(row + c / 2, table[i]);
                } else {
                    if (c % 64 == 0) __builtin_prefetch(row + ahead + c, 0, 1);
                    w[i] = weights_int8(row + c, s[i], off[i]);
                }
            }
            for (int j = 0; j < nt; ++j) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + (j0 + j) * ldx + c));
                for (int i = 0; i < nr; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i], xv);
            }
        }
    }
    for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nt; ++j) out[(j0 + j) * ldo + r0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}

/* a tile of nr rows against every token (constant nr and nt per call, so each variant unrolls): 4 x t up to 4
   tokens, else 3 x 8 tiles and one 3 x (t % 8) (each decoded weight vector feeding up to 8 tokens; the rows' last
   n % nr go one at a time). Timed at Llama-3-8B's MLP shapes, 8-32 tokens, one Zen 5 core: 3 x 8 (24 accumulators,
   28 of 32 registers) beat 2 x 8, 2 x 12, 4 x 4, 4 x 5, 4 x 6, 5 x 4 and 3 x 6 by 5-40%. */
#define TILE(nr, nt) tile(packed, ldp, scale, scale_bf16, zero, bits, group, groups, x, ldx, r0, nr, j, nt, out, ldo)
#define REST(nr) switch (t - j) { case 7: TILE(nr, 7); break; case 6: TILE(nr, 6); break; \
    case 5: TILE(nr, 5); break; case 4: TILE(nr, 4); break; case 3: TILE(nr, 3); break; \
    case 2: TILE(nr, 2); break; case 1: TILE(nr, 1); break; default: break; }
ALWAYS_INLINE void rows_all_tokens(const uint8_t* packed, int64_t ldp, const void* scale, int scale_bf16,
                                   const uint8_t* zero, int bits, int64_t group, int64_t groups, const uint16_t* x,
                                   int64_t ldx, int64_t t, int64_t r0, int nr, float* out, int64_t ldo) {
    int64_t j = 0;
    if (nr == 4) {
        REST(4)
    } else if (nr == 3) {
        for (; j + 8 <= t; j += 8) TILE(3, 8);
        REST(3)
    } else {
        for (; j + 8 <= t; j += 8) TILE(1, 8);
        REST(1)
    }
}
#undef REST
#undef TILE
#endif

/* 1 where this build has the bf16 dot product (the caller runs qgemv.c's float32 loop otherwise) */
int qgemv_bf16_available(void) {
#ifdef QGEMV_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

/* packed [n, ldp] codes, scale [n, groups] float32 or bf16 (scale_bf16), zero [n, groups] uint8 or NULL (the
   symmetric offset 8 / 128); x [t, ldx] bf16 (d columns); out [t, n] float32. group % 32 == 0 and d % group == 0
   (the caller checks). Returns 0 where this build lacks AVX512-BF16 (nothing written). */
int qgemv_bf16(const uint8_t* packed, int64_t ldp, const void* scale, int scale_bf16, const uint8_t* zero, int bits,
               int64_t n, int64_t d, int64_t group, const uint16_t* x, int64_t ldx, int64_t t, float* out,
               int64_t ldo, int nthreads) {
#ifdef QGEMV_BF16_DOT
    if (t <= 0 || n <= 0) return 1;
    int64_t groups = d / group;
    int nr = t <= 4 ? 4 : 3;
    int64_t tiles = n / nr;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t k = 0; k < tiles; ++k) {
        if (nr == 4) rows_all_tokens(packed, ldp, scale, scale_bf16, zero, bits, group, groups, x, ldx, t, k * 4, 4,
                                     out, ldo);
        else rows_all_tokens(packed, ldp, scale, scale_bf16, zero, bits, group, groups, x, ldx, t, k * 3, 3, out,
                             ldo);
    }
    for (int64_t r = tiles * nr; r < n; ++r)
        rows_all_tokens(packed, ldp, scale, scale_bf16, zero, bits, group, groups, x, ldx, t, r, 1, out, ldo);
    return 1;
#else
    (void)packed, (void)ldp, (void)scale, (void)scale_bf16, (void)zero, (void)bits, (void)n, (void)d, (void)group;
    (void)x, (void)ldx, (void)t, (void)out, (void)ldo, (void)nthreads;
    return 0;
#endif
}

/* ---- layers pruned 2:4, then quantized (csrc/qsparse.c's layout: the kept codes [rows, d / 2] in column order, 4
   bits two per byte with the even kept value in the low nibble, 8 bits one per byte; their 2-bit positions;
   scales / zero points over the original columns' groups). Per 64 columns, the 32 kept codes become their bf16
   weights as above (the group's table) and x is gathered to them as in csrc/sparse_bf16.c (nm24_control): one
   vpermt2w and one vdpbf16ps per token and row, 4-row x 4-token tiles. Groups must be whole multiples of 64. */
#if defined(QGEMV_BF16_DOT) && defined(__AVX512VBMI__)
#define NM24_BF16_DOT 1
ALWAYS_INLINE void nm24_tile(const uint8_t* packed, int64_t ldp, const uint8_t* indices, int64_t ldi,
                             const void* scale, int scale_bf16, const uint8_t* zero, int bits, int64_t group,
                             int64_t groups, const uint16_t* x, int64_t ldx, int64_t r0, int nr, int64_t j0, int nt,
                             float* out, int64_t ldo) {
    __m512 acc[4][4];
    for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nt; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t ahead = nr * ldp;  /* each row prefetches its bytes in the next tile */
    for (int64_t g = 0; g < groups; ++g) {
        __m512i table[4];
        __m512 s[4], off[4];
        group_state(scale, scale_bf16, zero, bits, groups, r0, nr, g, table, s, off);
        for (int64_t c = g * group; c < (g + 1) * group; c += 64) {
            __m512i w[4], control[4];
            for (int i = 0; i < nr; ++i) {
                const uint8_t* row = packed + (r0 + i) * ldp;
                if (bits == 4) {
                    __builtin_prefetch(row + ahead + c / 4, 0, 1);
                    w[i] = weights_int4(row + c / 4, table[i]);
                } else {
                    __builtin_prefetch(row + ahead + c / 2, 0, 1);
                    w[i] = weights_int8(row + c / 2, s[i], off[i]);
                }
                control[i] = nm24_control(indices + (r0 + i) * ldi + c / 8);
            }
            nm24_step(acc, w, control, nr, x + j0 * ldx + c, ldx, nt);
        }
    }
    for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nt; ++j) out[(j0 + j) * ldo + r0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}

#define NM24(nr, nt) nm24_tile(packed, ldp, indices, ldi, scale, scale_bf16, zero, bits, group, groups, x, ldx, r0, \
                               nr, j, nt, out, ldo)
#define NM24_ROWS(nr) { int64_t j = 0; for (; j + 4 <= t; j += 4) NM24(nr, 4); \
    switch (t - j) { case 3: NM24(nr, 3); break; case 2: NM24(nr, 2); break; case 1: NM24(nr, 1); break; } }
#endif

/* The bf16 weight of such a layer, rows [rows, d] written dense for prefill's GEMM (bit for bit qsparse.c's
   nm24_dequantize, whose bf16 output went value by value through float32: 14336 x 4096 int4 took ~50 ms in 512-row
   blocks, the layer 0.14-0.30x the dense bf16 one at 16-64 tokens). Per 32 columns the 16 kept values' bf16
   weights (as above) spread to their columns by vpexpandw under the mask their positions make. */
#ifdef NM24_BF16_DOT
/* a byte of positions (two groups of four columns, two 2-bit positions each) -> the 8 columns' mask, bit 8 set where
   both groups' positions ascend (computing it per byte took ~4x longer than the decode's stores) */
static const uint16_t NM24_BYTE_MASK[256] = {
    0x011, 0x013, 0x015, 0x019, 0x013, 0x012, 0x016, 0x01a, 0x015, 0x016, 0x014, 0x01c, 0x019, 0x01a, 0x01c, 0x018,
    0x031, 0x033, 0x035, 0x039, 0x033, 0x032, 0x036, 0x03a, 0x035, 0x036, 0x034, 0x03c, 0x039, 0x03a, 0x03c, 0x038,
    0x051, 0x053, 0x055, 0x059, 0x053, 0x052, 0x056, 0x05a, 0x055, 0x056, 0x054, 0x05c, 0x059, 0x05a, 0x05c, 0x058,
    0x091, 0x093, 0x095, 0x099, 0x093, 0x092, 0x096, 0x09a, 0x095, 0x096, 0x094, 0x09c, 0x099, 0x09a, 0x09c, 0x098,
    0x031, 0x033, 0x035, 0x039, 0x133, 0x032, 0x036, 0x03a, 0x135, 0x136, 0x034, 0x03c, 0x139, 0x13a, 0x13c, 0x038,
    0x021, 0x023, 0x025, 0x029, 0x023, 0x022, 0x026, 0x02a, 0x025, 0x026, 0x024, 0x02c, 0x029, 0x02a, 0x02c, 0x028,
    0x061, 0x063, 0x065, 0x069, 0x063, 0x062, 0x066, 0x06a, 0x065, 0x066, 0x064, 0x06c, 0x069, 0x06a, 0x06c, 0x068,
    0x0a1, 0x0a3, 0x0a5, 0x0a9, 0x0a3, 0x0a2, 0x0a6, 0x0aa, 0x0a5, 0x0a6, 0x0a4, 0x0ac, 0x0a9, 0x0aa, 0x0ac, 0x0a8,
    0x051, 0x053, 0x055, 0x059, 0x153, 0x052, 0x056, 0x05a, 0x155, 0x156, 0x054, 0x05c, 0x159, 0x15a, 0x15c, 0x058,
    0x061, 0x063, 0x065, 0x069, 0x163, 0x062, 0x066, 0x06a, 0x165, 0x166, 0x064, 0x06c, 0x169, 0x16a, 0x16c, 0x068,
    0x041, 0x043, 0x045, 0x049, 0x043, 0x042, 0x046, 0x04a, 0x045, 0x046, 0x044, 0x04c, 0x049, 0x04a, 0x04c, 0x048,
    0x0c1, 0x0c3, 0x0c5, 0x0c9, 0x0c3, 0x0c2, 0x0c6, 0x0ca, 0x0c5, 0x0c6, 0x0c4, 0x0cc, 0x0c9, 0x0ca, 0x0cc, 0x0c8,
    0x091, 0x093, 0x095, 0x099, 0x193, 0x092, 0x096, 0x09a, 0x195, 0x196, 0x094, 0x09c, 0x199, 0x19a, 0x19c, 0x098,
    0x0a1, 0x0a3, 0x0a5, 0x0a9, 0x1a3, 0x0a2, 0x0a6, 0x0aa, 0x1a5, 0x1a6, 0x0a4, 0x0ac, 0x1a9, 0x1aa, 0x1ac, 0x0a8,
    0x0c1, 0x0c3, 0x0c5, 0x0c9, 0x1c3, 0x0c2, 0x0c6, 0x0ca, 0x1c5, 0x1c6, 0x0c4, 0x0cc, 0x1c9, 0x1ca, 0x1cc, 0x0c8,
    0x081, 0x083, 0x085, 0x089, 0x083, 0x082, 0x086, 0x08a, 0x085, 0x086, 0x084, 0x08c, 0x089, 0x08a, 0x08c, 0x088,
};

ALWAYS_INLINE uint32_t nm24_mask32(const uint8_t* idx, uint32_t* ascending) {
    uint32_t m0 = NM24_BYTE_MASK[idx[0]], m1 = NM24_BYTE_MASK[idx[1]], m2 = NM24_BYTE_MASK[idx[2]];
    uint32_t m3 = NM24_BYTE_MASK[idx[3]];
    *ascending &= m0 & m1 & m2 & m3 & 256 ? 1u : 0u;
    return (m0 & 255) | (m1 & 255) << 8 | (m2 & 255) << 16 | (m3 & 255) << 24;
}
#endif

/* Returns 0 where this build lacks the instructions or a row's positions are not ascending pairs (what packing
   writes): the caller then runs nm24_dequantize over the whole block. group % 64 == 0, d % group == 0. */
int nm24_dequantize_bf16(const uint8_t* packed, int64_t ldp, const uint8_t* indices, int64_t ldi, const void* scale,
                         int scale_bf16, const uint8_t* zero, int bits, int64_t rows, int64_t d, int64_t group,
                         uint16_t* out, int nthreads) {
#ifdef NM24_BF16_DOT
    int64_t groups = d / group;
    const float symmetric_offset = bits == 4 ? 8.f : 128.f;
    const size_t scale_bytes = scale_bf16 ? 2 : 4;
    uint32_t ok = 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *row = packed + r * ldp, *idx = indices + r * ldi;
        const void* sr = (const char*)scale + r * groups * scale_bytes;
        uint16_t* o = out + r * d;
        uint32_t ascending = 1;
        for (int64_t g = 0; g < groups; ++g) {
            float sg = scale_at(sr, scale_bf16, g), og = zero ? (float)zero[r * groups + g] : symmetric_offset;
            __m512i table = nibble_table(sg, og);
            __m512 s = _mm512_set1_ps(sg), off = _mm512_set1_ps(og);
            for (int64_t c = g * group; c < (g + 1) * group; c += 64) {  /* 64 columns: 32 kept values */
                __m512i w = bits == 4 ? weights_int4(row + c / 4, table) : weights_int8(row + c / 2, s, off);
                uint32_t lo = nm24_mask32(idx + c / 8, &ascending), hi = nm24_mask32(idx + c / 8 + 4, &ascending);
                _mm512_storeu_si512((void*)(o + c), _mm512_maskz_expand_epi16((__mmask32)lo, w));
                _mm512_storeu_si512((void*)(o + c + 32), _mm512_maskz_expand_epi16(
                    (__mmask32)hi, _mm512_castsi256_si512(_mm512_extracti64x4_epi64(w, 1))));
            }
        }
        if (!ascending) {
            #pragma omp atomic write
            ok = 0;
        }
    }
    return (int)ok;
#else
    (void)packed, (void)ldp, (void)indices, (void)ldi, (void)scale, (void)scale_bf16, (void)zero, (void)bits;
    (void)rows, (void)d, (void)group, (void)out, (void)nthreads;
    return 0;
#endif
}

/* 1 where this build has the 2:4 kernel below (AVX512-BF16 and VBMI) */
int nm24_qgemv_bf16_available(void) {
#ifdef NM24_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

/* packed [rows, ldp] kept codes, indices [rows, ldi], scale [rows, groups], zero [rows, groups] or NULL; x [t, ldx]
   bf16 (d columns); out [t, ldo] float32. group % 64 == 0 and d % group == 0 (the caller checks). Returns 0 where
   this build lacks the instructions (nothing written). */
int nm24_qgemv_bf16(const uint8_t* packed, int64_t ldp, const uint8_t* indices, int64_t ldi, const void* scale,
                    int scale_bf16, const uint8_t* zero, int bits, int64_t rows, int64_t d, int64_t group,
                    const uint16_t* x, int64_t ldx, int64_t t, float* out, int64_t ldo, int nthreads) {
#ifdef NM24_BF16_DOT
    if (t <= 0 || rows <= 0) return 1;
    int64_t groups = d / group;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t k = 0; k < rows / 4; ++k) {
        int64_t r0 = 4 * k;
        NM24_ROWS(4)
    }
    for (int64_t r0 = rows / 4 * 4; r0 < rows; ++r0) NM24_ROWS(1)
    return 1;
#else
    (void)packed, (void)ldp, (void)indices, (void)ldi, (void)scale, (void)scale_bf16, (void)zero, (void)bits;
    (void)rows, (void)d, (void)group, (void)x, (void)ldx, (void)t, (void)out, (void)ldo, (void)nthreads;
    return 0;
#endif
}
