#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define QGEMV_AVX2 1
#endif

#include "bf16.h"
#include "bf16_weights.h"

/* QuantizedLinear's product on the CPU for a few tokens (decoding): out[j, r] = sum_g s[r, g] * sum_{c in g}
   (u[r, c] - z[r, g]) * x[j, c], u the stored codes (4 bits: two per byte, even column in the low nibble; 8 bits:
   one per byte), z the group's zero point (asymmetric) or the symmetric offset (8 / 128), s the group's scale
   (float32 or bfloat16, as stored). The weight is never dequantized into memory: torch's path built the float
   weight on every call (several full-size temporaries) and then multiplied it, reading ~10x the bytes the codes
   hold. Sums in float32 per group, then scaled: the reference (`dequantized_weight` then a matmul) rounds
   differently, within float32 error of the same product.
   Tokens go in blocks of four / two / one: each code is decoded once per block. 4 bits: x is split once per call
   into its even and odd columns, so both nibbles of a byte meet contiguous x (a stride-2 x would not vectorize).
   With AVX-512 and whole groups (a multiple of 32 columns; the usual 128) a nibble becomes its float (code - zero)
   by one permute from a 16-entry table, and the group's sums stay in vector registers until the row ends; the plain
   C loops (any machine, any group) reduce every group horizontally, ~8x slower at Llama-3-8B's MLP shape. AVX2
   without AVX-512 (e.g. AMD Zen 2/3) has the same structure at 8 lanes, a nibble converted to float instead of
   looked up (there the plain loops made a quantized layer 0.5-0.7x the dense one at 1 token). */


/* partial[j] = sum over nb bytes of (lo - off) * xe[j][b] + (hi - off) * xo[j][b], tokens j < nt (4, 2 or 1) */
ALWAYS_INLINE void dot_int4(const uint8_t* q, int64_t nb, const float* xe, const float* xo, int64_t ldx, float off,
                            int nt, float* partial) {
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    if (nt == 4) {
        #pragma omp simd reduction(+:p0, p1, p2, p3)
        for (int64_t b = 0; b < nb; ++b) {
            float lo = (float)(q[b] & 15) - off, hi = (float)(q[b] >> 4) - off;
            p0 += lo * xe[b] + hi * xo[b];
            p1 += lo * xe[ldx + b] + hi * xo[ldx + b];
            p2 += lo * xe[2 * ldx + b] + hi * xo[2 * ldx + b];
            p3 += lo * xe[3 * ldx + b] + hi * xo[3 * ldx + b];
        }
    } else if (nt == 2) {
        #pragma omp simd reduction(+:p0, p1)
        for (int64_t b = 0; b < nb; ++b) {
            float lo = (float)(q[b] & 15) - off, hi = (float)(q[b] >> 4) - off;
            p0 += lo * xe[b] + hi * xo[b];
            p1 += lo * xe[ldx + b] + hi * xo[ldx + b];
        }
    } else {
        #pragma omp simd reduction(+:p0)
        for (int64_t b = 0; b < nb; ++b)
            p0 += ((float)(q[b] & 15) - off) * xe[b] + ((float)(q[b] >> 4) - off) * xo[b];
    }
    partial[0] = p0; partial[1] = p1; partial[2] = p2; partial[3] = p3;
}

ALWAYS_INLINE void dot_int8(const uint8_t* q, int64_t nc, const float* x, int64_t ldx, float off, int nt,
                            float* partial) {
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
    if (nt == 4) {
        #pragma omp simd reduction(+:p0, p1, p2, p3)
        for (int64_t c = 0; c < nc; ++c) {
            float w = (float)q[c] - off;
            p0 += w * x[c]; p1 += w * x[ldx + c]; p2 += w * x[2 * ldx + c]; p3 += w * x[3 * ldx + c];
        }
    } else if (nt == 2) {
        #pragma omp simd reduction(+:p0, p1)
        for (int64_t c = 0; c < nc; ++c) {
            float w = (float)q[c] - off;
            p0 += w * x[c]; p1 += w * x[ldx + c];
        }
    } else {
        #pragma omp simd reduction(+:p0)
        for (int64_t c = 0; c < nc; ++c) p0 += ((float)q[c] - off) * x[c];
    }
    partial[0] = p0; partial[1] = p1; partial[2] = p2; partial[3] = p3;
}

#if defined(__AVX512F__)
/* row_tokens for AVX-512: groups of a multiple of 32 (4 bits) / 16 (8 bits) columns, d a multiple of the group */
ALWAYS_INLINE void row_tokens_avx512(const uint8_t* row, const void* scale, int scale_bf16, const uint8_t* zero,
                                     int bits, int64_t d, int64_t group, int64_t groups, const float* xa,
                                     const float* xb, int64_t ldx, int nt, float* out, int64_t ldo) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i low = _mm512_set1_epi32(15);
    __m512 total[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    for (int64_t g = 0; g < groups; ++g) {
        __m512 off = _mm512_set1_ps(zero ? (float)zero[g] : symmetric_offset);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        if (bits == 4) {
            __m512 table = _mm512_sub_ps(iota, off);  /* nibble i -> i - zero */
            for (int64_t k = g * group / 2; k < (g + 1) * group / 2; k += 16) {
                __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + k)));
                __m512 wl = _mm512_permutexvar_ps(_mm512_and_si512(b, low), table);
                __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
                for (int j = 0; j < nt; ++j) {
                    acc[j] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xa + j * ldx + k), acc[j]);
                    acc[j] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xb + j * ldx + k), acc[j]);
                }
            }
        } else {
            for (int64_t c = g * group; c < (g + 1) * group; c += 16) {
                __m512 w = _mm512_sub_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + c)))), off);
                for (int j = 0; j < nt; ++j) acc[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xa + j * ldx + c), acc[j]);
            }
        }
        __m512 s = _mm512_set1_ps(scale_bf16 ? bf16_to_f32(((const uint16_t*)scale)[g]) : ((const float*)scale)[g]);
        for (int j = 0; j < nt; ++j) total[j] = _mm512_fmadd_ps(s, acc[j], total[j]);
    }
    for (int j = 0; j < nt; ++j) out[j * ldo] = _mm512_reduce_add_ps(total[j]);
}
#endif

#ifdef QGEMV_AVX2
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* eight bytes widened to int32 lanes; their value (lane - off) as floats: 8-bit codes, or a byte's low / high nibble */
static inline __m256i widen8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline __m256 minus(__m256i lanes, __m256 off) { return _mm256_sub_ps(_mm256_cvtepi32_ps(lanes), off); }
static inline __m256 low_nibbles(__m256i b, __m256 off) {
    return minus(_mm256_and_si256(b, _mm256_set1_epi32(15)), off);
}
static inline __m256 high_nibbles(__m256i b, __m256 off) { return minus(_mm256_srli_epi32(b, 4), off); }

/* row_tokens_avx512 at 8 lanes: groups of a multiple of 16 (4 bits) / 8 (8 bits) columns, d a multiple of the group */
ALWAYS_INLINE void row_tokens_avx2(const uint8_t* row, const void* scale, int scale_bf16, const uint8_t* zero,
                                   int bits, int64_t group, int64_t groups, const float* xa, const float* xb,
                                   int64_t ldx, int nt, float* out, int64_t ldo) {
    __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    for (int64_t g = 0; g < groups; ++g) {
        __m256 off = _mm256_set1_ps(zero ? (float)zero[g] : symmetric_offset);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        if (bits == 4) {
            for (int64_t k = g * group / 2; k < (g + 1) * group / 2; k += 8) {
                __m256i b = widen8(row + k);
                __m256 wl = low_nibbles(b, off), wh = high_nibbles(b, off);
                for (int j = 0; j < nt; ++j) {
                    acc[j] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xa + j * ldx + k), acc[j]);
                    acc[j] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xb + j * ldx + k), acc[j]);
                }
            }
        } else {
            for (int64_t c = g * group; c < (g + 1) * group; c += 8) {
                __m256 w = minus(widen8(row + c), off);
                for (int j = 0; j < nt; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xa + j * ldx + c), acc[j]);
            }
        }
        __m256 sc = _mm256_set1_ps(scale_bf16 ? bf16_to_f32(((const uint16_t*)scale)[g]) : ((const float*)scale)[g]);
        for (int j = 0; j < nt; ++j) total[j] = _mm256_fmadd_ps(sc, acc[j], total[j]);
    }
    for (int j = 0; j < nt; ++j) out[j * ldo] = hsum256(total[j]);
}

/* one token: four independent accumulators, since one chain of dependent FMAs (4-cycle latency) would cap the loop
   at ~2 bytes of codes a cycle (the 8-bit loop runs 32 codes a pass; group % 8 == 0 leaves a tail of 8s) */
ALWAYS_INLINE void row_one_avx2(const uint8_t* row, const void* scale, int scale_bf16, const uint8_t* zero, int bits,
                                int64_t group, int64_t groups, const float* xa, const float* xb, float* out) {
    __m256 total = _mm256_setzero_ps();
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    for (int64_t g = 0; g < groups; ++g) {
        __m256 off = _mm256_set1_ps(zero ? (float)zero[g] : symmetric_offset);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        if (bits == 4) {  /* 8 bytes: their low nibbles meet xa, high ones xb; two such blocks a pass */
            int64_t k = g * group / 2, end = (g + 1) * group / 2;
            for (; k + 16 <= end; k += 16) {
                __m256i b0 = widen8(row + k), b1 = widen8(row + k + 8);
                a0 = _mm256_fmadd_ps(low_nibbles(b0, off), _mm256_loadu_ps(xa + k), a0);
                a1 = _mm256_fmadd_ps(high_nibbles(b0, off), _mm256_loadu_ps(xb + k), a1);
                a2 = _mm256_fmadd_ps(low_nibbles(b1, off), _mm256_loadu_ps(xa + k + 8), a2);
                a3 = _mm256_fmadd_ps(high_nibbles(b1, off), _mm256_loadu_ps(xb + k + 8), a3);
            }
            for (; k < end; k += 8) {
                __m256i b = widen8(row + k);
                a0 = _mm256_fmadd_ps(low_nibbles(b, off), _mm256_loadu_ps(xa + k), a0);
                a1 = _mm256_fmadd_ps(high_nibbles(b, off), _mm256_loadu_ps(xb + k), a1);
            }
        } else {
            int64_t c = g * group, end = (g + 1) * group;
            for (; c + 32 <= end; c += 32) {
                a0 = _mm256_fmadd_ps(minus(widen8(row + c), off), _mm256_loadu_ps(xa + c), a0);
                a1 = _mm256_fmadd_ps(minus(widen8(row + c + 8), off), _mm256_loadu_ps(xa + c + 8), a1);
                a2 = _mm256_fmadd_ps(minus(widen8(row + c + 16), off), _mm256_loadu_ps(xa + c + 16), a2);
                a3 = _mm256_fmadd_ps(minus(widen8(row + c + 24), off), _mm256_loadu_ps(xa + c + 24), a3);
            }
            for (; c < end; c += 8) a0 = _mm256_fmadd_ps(minus(widen8(row + c), off), _mm256_loadu_ps(xa + c), a0);
        }
        __m256 sc = _mm256_set1_ps(scale_bf16 ? bf16_to_f32(((const uint16_t*)scale)[g]) : ((const float*)scale)[g]);
        total = _mm256_fmadd_ps(sc, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), total);
    }
    *out = hsum256(total);
}
#endif

/* one row against tokens [j0, j0 + nt): out[(j0 + i) * ldo] for i < nt */
ALWAYS_INLINE void row_tokens(const uint8_t* row, const void* scale, int scale_bf16, const uint8_t* zero, int bits,
                              int64_t d, int64_t group, int64_t groups, const float* xa, const float* xb,
                              int64_t ldx, int nt, float* out, int64_t ldo) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, partial[4];
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    for (int64_t g = 0; g < groups; ++g) {
        int64_t c0 = g * group, nc = c0 + group < d ? group : d - c0;
        float off = zero ? (float)zero[g] : symmetric_offset;
        if (bits == 4) dot_int4(row + c0 / 2, nc / 2, xa + c0 / 2, xb + c0 / 2, ldx, off, nt, partial);
        else dot_int8(row + c0, nc, xa + c0, ldx, off, nt, partial);
        float s = scale_bf16 ? bf16_to_f32(((const uint16_t*)scale)[g]) : ((const float*)scale)[g];
        for (int i = 0; i < nt; ++i) acc[i] += s * partial[i];
    }
    for (int i = 0; i < nt; ++i) out[i * ldo] = acc[i];
}

/* a row against a block of tokens: the AVX-512 loop where `fast` (whole vector groups), else the plain C one */
ALWAYS_INLINE void row_block(int fast, const uint8_t* row, const void* scale, int scale_bf16, const uint8_t* zero,
                             int bits, int64_t d, int64_t group, int64_t groups, const float* xa, const float* xb,
                             int64_t ldx, int nt, float* out, int64_t ldo) {
#if defined(__AVX512F__)
    if (fast) {
        row_tokens_avx512(row, scale, scale_bf16, zero, bits, d, group, groups, xa, xb, ldx, nt, out, ldo);
        return;
    }
#elif defined(QGEMV_AVX2)
    if (fast && nt == 1) {
        row_one_avx2(row, scale, scale_bf16, zero, bits, group, groups, xa, xb, out);
        return;
    }
    if (fast) {
        row_tokens_avx2(row, scale, scale_bf16, zero, bits, group, groups, xa, xb, ldx, nt, out, ldo);
        return;
    }
#endif
    (void)fast;
    row_tokens(row, scale, scale_bf16, zero, bits, d, group, groups, xa, xb, ldx, nt, out, ldo);
}

/* packed [n, ldp] codes, scale [n, groups] (float32, or bfloat16 when scale_bf16), zero [n, groups] uint8 or NULL
   (symmetric); x [t, d] float32; out [t, n] float32. 4 bits needs d and group even (the caller checks). Returns 0
   when a temporary cannot be allocated (nothing written). */
int qgemv(const uint8_t* packed, int64_t ldp, const void* scale, int scale_bf16, const uint8_t* zero, int bits,
          int64_t n, int64_t d, int64_t group, const float* x, int64_t ldx, int64_t t, float* out, int64_t ldo,
          int nthreads) {
    if (t <= 0 || n <= 0) return 1;
    int64_t groups = (d + group - 1) / group;
    const float *xa = x, *xb = NULL;
    float* split = NULL;
    int64_t ldxs = ldx;
    if (bits == 4) {  /* even columns, then odd columns, per token */
        int64_t half = d / 2;
        split = malloc(2 * t * half * sizeof(float));
        if (!split) return 0;
        for (int64_t j = 0; j < t; ++j)
            for (int64_t b = 0; b < half; ++b) {
                split[j * half + b] = x[j * ldx + 2 * b];
                split[(t + j) * half + b] = x[j * ldx + 2 * b + 1];
            }
        xa = split, xb = split + t * half, ldxs = half;
    }
    size_t scale_bytes = scale_bf16 ? 2 : 4;
    int fast = 0;
#if defined(__AVX512F__)
    fast = d % group == 0 && group % (bits == 4 ? 32 : 16) == 0;  /* whole groups of whole vectors */
#elif defined(QGEMV_AVX2)
    fast = d % group == 0 && group % (bits == 4 ? 16 : 8) == 0;
#endif
    int64_t row_bytes = bits == 4 ? (d + 1) / 2 : d;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t* row = packed + r * ldp;
        /* the row two ahead into L2 while this one is multiplied: the hardware prefetcher alone left the loop
           waiting on DRAM (14336 x 4096 at one token, one Zen 5 core: int4 4.2 -> 2.0 ms, int8 7.5 -> 3.0 ms) */
        for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(row + 2 * ldp + o, 0, 1);
        const void* sr = (const char*)scale + r * groups * scale_bytes;
        const uint8_t* zr = zero ? zero + r * groups : NULL;
        int64_t j = 0;
        for (; j + 4 <= t; j += 4)
            row_block(fast, row, sr, scale_bf16, zr, bits, d, group, groups, xa + j * ldxs,
                      xb ? xb + j * ldxs : NULL, ldxs, 4, out + j * ldo + r, ldo);
        for (; j + 2 <= t; j += 2)
            row_block(fast, row, sr, scale_bf16, zr, bits, d, group, groups, xa + j * ldxs,
                      xb ? xb + j * ldxs : NULL, ldxs, 2, out + j * ldo + r, ldo);
        for (; j < t; ++j)
            row_block(fast, row, sr, scale_bf16, zr, bits, d, group, groups, xa + j * ldxs,
                      xb ? xb + j * ldxs : NULL, ldxs, 1, out + j * ldo + r, ldo);
    }
    free(split);
    return 1;
}

/* The float weight the codes stand for, written once: out[r, c] = (u[r, c] - z[r, g]) * s[r, g] in float32, or that
   float32 product rounded to bfloat16 (to nearest even, as torch's .to(torch.bfloat16)): bit for bit what the torch
   reference (`QuantizedLinear.dequantized_weight`) computes, without its full-size int16 / float temporaries (which
   made it ~500 ms for a 14336 x 4096 layer). For prefill-sized inputs, which then run a dense matmul. Any group. */
/* one row's float values; the loops are branch-free so they vectorize (4 bits: byte b -> columns 2b, 2b + 1) */
static void dequantize_row(const uint8_t* q, const float* sc, int scale_bf16, const uint8_t* zero, int bits,
                           int64_t d, int64_t group, float* dst) {
    int64_t groups = (d + group - 1) / group;
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    for (int64_t g = 0; g < groups; ++g) {
        int64_t c0 = g * group, c1 = c0 + group < d ? c0 + group : d;
        float s = scale_bf16 ? bf16_to_f32(((const uint16_t*)sc)[g]) : sc[g];
        float off = zero ? (float)zero[g] : symmetric_offset;
#if defined(__AVX512F__)
        if (bits == 4 && c0 % 32 == 0 && (c1 - c0) % 32 == 0) {  /* 16 bytes -> 32 values: a nibble's value by a
                                                                      permute from a table of (i - off) * s, the
                                                                      same float operations as the loops below */
            const __m512 table = _mm512_mul_ps(_mm512_sub_ps(
                _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(off)),
                _mm512_set1_ps(s));
            const __m512i low = _mm512_set1_epi32(15);
            const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for (int64_t b = c0 / 2; b < c1 / 2; b += 16) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + b)));
                __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(v, low), table);
                __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
                _mm512_storeu_ps(dst + 2 * b, _mm512_permutex2var_ps(lo, first, hi));
                _mm512_storeu_ps(dst + 2 * b + 16, _mm512_permutex2var_ps(lo, second, hi));
            }
            continue;
        }
        if (bits == 8 && (c1 - c0) % 16 == 0) {
            const __m512 vs = _mm512_set1_ps(s), voff = _mm512_set1_ps(off);
            for (int64_t c = c0; c < c1; c += 16) {
                __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + c))));
                _mm512_storeu_ps(dst + c, _mm512_mul_ps(_mm512_sub_ps(u, voff), vs));
            }
            continue;
        }
#endif
        if (bits == 8) {
            for (int64_t c = c0; c < c1; ++c) dst[c] = ((float)q[c] - off) * s;
        } else if (c0 % 2 == 0 && c1 % 2 == 0) {
            for (int64_t b = c0 / 2; b < c1 / 2; ++b) {
                dst[2 * b] = ((float)(q[b] & 15) - off) * s;
                dst[2 * b + 1] = ((float)(q[b] >> 4) - off) * s;
            }
        } else {  /* an odd group boundary: column by column */
            for (int64_t c = c0; c < c1; ++c) dst[c] = ((float)((q[c >> 1] >> ((c & 1) * 4)) & 15) - off) * s;
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* a row's bf16 values straight from the codes (whole groups of a multiple of 32 columns), the same bits as
   dequantize_row then rounding (bf16_weights.h): 14336 x 4096 int4 in 512-row blocks, one Zen 5 core, 6.6 ms
   through the float row */
static void dequantize_row_bf16(const uint8_t* q, const void* sc, int scale_bf16, const uint8_t* zero, int bits,
                                int64_t d, int64_t group, uint16_t* dst) {
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    for (int64_t g = 0; g < d / group; ++g) {
        float s = scale_bf16 ? bf16_to_f32(((const uint16_t*)sc)[g]) : ((const float*)sc)[g];
        float off = zero ? (float)zero[g] : symmetric_offset;
        if (bits == 4) {
            __m512i table = nibble_table(s, off);
            for (int64_t c = g * group; c < (g + 1) * group; c += 32)
                _mm512_storeu_si512((void*)(dst + c), weights_int4(q + c / 2, table));
        } else {
            __m512 vs = _mm512_set1_ps(s), voff = _mm512_set1_ps(off);
            for (int64_t c = g * group; c < (g + 1) * group; c += 32)
                _mm512_storeu_si512((void*)(dst + c), weights_int8(q + c, vs, voff));
        }
    }
}
#endif

/* Returns 0 (nothing written past the rows done) when a bf16 output's per-thread float row cannot be allocated. */
int dequantize(const uint8_t* packed, int64_t ldp, const void* scale, int scale_bf16, const uint8_t* zero, int bits,
               int64_t n, int64_t d, int64_t group, void* out, int out_bf16, int nthreads) {
    int64_t groups = (d + group - 1) / group;
    size_t scale_bytes = scale_bf16 ? 2 : 4;
    int ok = 1;
    #pragma omp parallel num_threads(nthreads)
    {
        float* row = out_bf16 ? malloc(d * sizeof(float)) : NULL;
        if (out_bf16 && !row) {
            #pragma omp atomic write
            ok = 0;
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; ++r) {
            const void* sr = (const char*)scale + r * groups * scale_bytes;
            const uint8_t* zr = zero ? zero + r * groups : NULL;
            if (!out_bf16) {
                dequantize_row(packed + r * ldp, sr, scale_bf16, zr, bits, d, group, (float*)out + r * d);
                continue;
            }
            uint16_t* o = (uint16_t*)out + r * d;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
            if (d % group == 0 && group % 32 == 0) {
                dequantize_row_bf16(packed + r * ldp, sr, scale_bf16, zr, bits, d, group, o);
                continue;
            }
#endif
            if (!row) continue;
            dequantize_row(packed + r * ldp, sr, scale_bf16, zr, bits, d, group, row);
            int64_t c = 0;
#if defined(__AVX512BF16__)
            /* round to nearest even, like f32_to_bf16 (the values are normal numbers or zero: a group's scale is at
               least the dtype's smallest normal, and this instruction reads subnormals as zero) */
            for (; c + 32 <= d; c += 32)
                _mm512_storeu_si512((void*)(o + c), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + c + 16),
                                                                                  _mm512_loadu_ps(row + c)));
#endif
            for (; c < d; ++c) o[c] = f32_to_bf16(row[c]);
        }
        free(row);
    }
    return ok;
}
