#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16.h"
#include "nm24.h"

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif

/* A QuantizedLinear pruned 2:4 before quantization (recipes/2of4-w4.yaml), multiplied for a few tokens from its
   storage: the kept codes [rows, d / 2] (4 bits: two per byte, the even kept value in the low nibble; 8 bits: one
   per byte; symmetric codes stored + 2^(b-1)), their 2-bit positions (SparseLinear's packing), and group scales
   (float32 or bf16) / zero points (uint8, asymmetric) over the original columns:
   out[j, r] = sum_g s[r, g] * sum_{kept c in g} (u[r, c] - z[r, g]) * x[j, c].
   torch's path built the float weight on every call (a decode of the positions, an unpack of the codes and several
   full-size temporaries: far slower than the dense layer); this reads ~0.16x (int4) of the dense float32 bytes.
   AVX2: 16 columns (eight kept codes) a step, x gathered to the codes as in sparse_linear.c (nm24.h); the group's
   sum stays in registers until the group ends (groups a multiple of 16 columns). Elsewhere a plain loop over the
   kept codes. Sums in float32 per group, then scaled: the reference (`dequantized_weight` then a matmul) rounds
   differently, within float32 error of the same product. */

#if defined(__AVX2__) && defined(__FMA__)
/* the eight codes of step k as floats: 4 bits, bytes 4k..4k+3 (a byte's low nibble first); 8 bits, bytes 8k..8k+7 */
ALWAYS_INLINE __m256 codes8(const uint8_t* q, int64_t k, int bits) {
    if (bits == 4) {
        uint32_t u;
        memcpy(&u, q + 4 * k, 4);
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)u), shifts),
                                                   _mm256_set1_epi32(15)));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * k))));
}
#endif

ALWAYS_INLINE float scale_at(const void* scale, int64_t g, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t*)scale)[g]) : ((const float*)scale)[g];
}

/* row r of a layer: its codes, positions, scales and zero points (NULL when symmetric) */
typedef struct {
    const uint8_t* q;
    const uint8_t* idx;
    const void* scale;
    const uint8_t* zero;
} qrow;

ALWAYS_INLINE qrow qrow_at(const uint8_t* packed, int64_t ldp, const uint8_t* indices, int64_t ldi, const void* scale,
                           int scale_bf16, const uint8_t* zero, int64_t groups, int64_t r) {
    qrow w = {packed + r * ldp, indices + r * ldi, (const char*)scale + r * groups * (scale_bf16 ? 2 : 4),
              zero ? zero + r * groups : NULL};
    return w;
}

ALWAYS_INLINE int code_at(const uint8_t* q, int64_t i, int bits) {
    return bits == 4 ? (q[i >> 1] >> ((i & 1) * 4)) & 15 : q[i];
}

/* one row against nt tokens (nt <= 4), the plain loop over kept codes */
static void row_plain(const uint8_t* q, const uint8_t* idx, const void* scale, int scale_bf16, const uint8_t* zero,
                      int bits, int64_t d, int64_t group, const float* x, int64_t ldx, int nt, float* out,
                      int64_t ldo) {
    float total[4] = {0.f, 0.f, 0.f, 0.f}, acc[4] = {0.f, 0.f, 0.f, 0.f};
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    int64_t g = 0;
    for (int64_t i = 0; i < d / 2; ++i) {
        int64_t c = (i >> 1) * 4 + field_at(idx, i, 2);
        if (c / group != g) {  /* kept codes come in column order: a new group starts */
            for (int j = 0; j < nt; ++j) total[j] += scale_at(scale, g, scale_bf16) * acc[j], acc[j] = 0.f;
            g = c / group;
        }
        float w = (float)code_at(q, i, bits) - (zero ? (float)zero[g] : symmetric_offset);
        for (int j = 0; j < nt; ++j) acc[j] += w * x[j * ldx + c];
    }
    for (int j = 0; j < nt; ++j) out[j * ldo] = total[j] + scale_at(scale, g, scale_bf16) * acc[j];
}

#if defined(__AVX2__) && defined(__FMA__)
/* the same with AVX2: groups a multiple of 16 columns, d a multiple of 16; xp reordered for nm24_x */
static void row_avx2(const uint8_t* q, const uint8_t* idx, const void* scale, int scale_bf16, const uint8_t* zero,
                     int bits, int64_t d, int64_t group, const float* xp, int64_t ldxp, int nt, float* out,
                     int64_t ldo) {
    __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
    int64_t groups = (d + group - 1) / group;
    for (int64_t g = 0; g < groups; ++g) {
        int64_t k0 = g * group / 16, k1 = ((g + 1) * group < d ? (g + 1) * group : d) / 16;
        __m256 off = _mm256_set1_ps(zero ? (float)zero[g] : symmetric_offset);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t k = k0;
        if (nt == 1) {  /* four FMA chains: fewer leave the loop bound by their latency */
            __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (; k + 4 <= k1; k += 4) {
                __builtin_prefetch(q + (k * bits) + PREFETCH_BYTES, 0, 0);
                acc[0] = _mm256_fmadd_ps(_mm256_sub_ps(codes8(q, k, bits), off),
                                         nm24_x(xp + 16 * k, nm24_ctrl(idx, k)), acc[0]);
                a1 = _mm256_fmadd_ps(_mm256_sub_ps(codes8(q, k + 1, bits), off),
                                     nm24_x(xp + 16 * k + 16, nm24_ctrl(idx, k + 1)), a1);
                a2 = _mm256_fmadd_ps(_mm256_sub_ps(codes8(q, k + 2, bits), off),
                                     nm24_x(xp + 16 * k + 32, nm24_ctrl(idx, k + 2)), a2);
                a3 = _mm256_fmadd_ps(_mm256_sub_ps(codes8(q, k + 3, bits), off),
                                     nm24_x(xp + 16 * k + 48, nm24_ctrl(idx, k + 3)), a3);
            }
            acc[0] = _mm256_add_ps(_mm256_add_ps(acc[0], a1), _mm256_add_ps(a2, a3));
        }
        for (; k < k1; ++k) {
            __m256i ctrl = nm24_ctrl(idx, k);
            __m256 w = _mm256_sub_ps(codes8(q, k, bits), off);
            for (int j = 0; j < nt; ++j) acc[j] = _mm256_fmadd_ps(w, nm24_x(xp + j * ldxp + 16 * k, ctrl), acc[j]);
        }
        __m256 s = _mm256_set1_ps(scale_at(scale, g, scale_bf16));
        for (int j = 0; j < nt; ++j) total[j] = _mm256_fmadd_ps(s, acc[j], total[j]);
    }
    for (int j = 0; j < nt; ++j) out[j * ldo] = hsum256(total[j]);
}
#endif

/* packed [rows, ldp] kept codes, indices [rows, ldi], scale [rows, groups], zero [rows, groups] or NULL; x [t, d]
   float32; out [t, rows] float32. The caller checks d % 4 == 0. Returns 0 when x's reordered copy cannot be
   allocated (nothing written). */
int nm24_qgemv(const uint8_t* packed, int64_t ldp, const uint8_t* indices, int64_t ldi, const void* scale,
               int scale_bf16, const uint8_t* zero, int bits, int64_t rows, int64_t d, int64_t group, const float* x,
               int64_t ldx, int64_t t, float* out, int64_t ldo, int nthreads) {
    if (t <= 0 || rows <= 0) return 1;
    int64_t groups = (d + group - 1) / group;
    float* xp = NULL;
#if defined(__AVX2__) && defined(__FMA__)
    if (d % 16 == 0 && group % 16 == 0) {
        xp = nm24_reordered_x(x, ldx, t, d);
        if (!xp) return 0;
    }
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        qrow w = qrow_at(packed, ldp, indices, ldi, scale, scale_bf16, zero, groups, r);
        for (int64_t j = 0; j < t; j += 4) {
            int nt = t - j < 4 ? (int)(t - j) : 4;
#if defined(__AVX2__) && defined(__FMA__)
            if (xp) {
                row_avx2(w.q, w.idx, w.scale, scale_bf16, w.zero, bits, d, group, xp + j * d, d, nt,
                         out + j * ldo + r, ldo);
                continue;
            }
#endif
            row_plain(w.q, w.idx, w.scale, scale_bf16, w.zero, bits, d, group, x + j * ldx, ldx, nt,
                      out + j * ldo + r, ldo);
        }
    }
    free(xp);
    return 1;
}

/* The float weight of rows [0, rows) of such a layer, zeros where pruned: out[r, c] = (u - z) * s in float32, or that
   product rounded to bf16 (out_bf16; to nearest even, as torch's .to(torch.bfloat16)): bit for bit what
   `QuantizedLinear.dequantized_weight` computes, without its full-size temporaries (2.5 s a call for a 14336 x 4096
   layer). For prefill-sized inputs, a block of rows at a time, then torch's GEMM. */
void nm24_dequantize(const uint8_t* packed, int64_t ldp, const uint8_t* indices, int64_t ldi, const void* scale,
                     int scale_bf16, const uint8_t* zero, int bits, int64_t rows, int64_t d, int64_t group, void* out,
                     int out_bf16, int nthreads) {
    int64_t groups = (d + group - 1) / group;
    float symmetric_offset = bits == 4 ? 8.f : 128.f;
#if defined(__AVX2__) && defined(__FMA__)
    /* float32 out, whole 8-column steps per group: a step's four kept codes dequantized in lanes 0-3 and spread to
       their columns by one permute (lanes of no kept value read lane 4, a zero): the same float operations */
    lane_table spread;
    int fast = !out_bf16 && group % 8 == 0 && d % 8 == 0;
    if (fast) nm24_spread_table(&spread);
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        qrow row = qrow_at(packed, ldp, indices, ldi, scale, scale_bf16, zero, groups, r);
        const uint8_t *q = row.q, *idx = row.idx, *zr = row.zero;
#if defined(__AVX2__) && defined(__FMA__)
        if (fast) {
            float* o = (float*)out + r * d;
            for (int64_t g = 0; g < groups; ++g) {
                int64_t k0 = g * group / 8, k1 = ((g + 1) * group < d ? (g + 1) * group : d) / 8;
                __m128 s = _mm_set1_ps(scale_at(row.scale, g, scale_bf16));
                __m128 off = _mm_set1_ps(zr ? (float)zr[g] : symmetric_offset);
                for (int64_t k = k0; k < k1; ++k) {  /* columns 8k..8k+7: kept values 4k..4k+3 */
                    __m128i u;
                    if (bits == 4) {
                        uint16_t two;
                        memcpy(&two, q + 2 * k, 2);
                        u = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(two), _mm_setr_epi32(0, 4, 8, 12)),
                                          _mm_set1_epi32(15));
                    } else {
                        int32_t four;
                        memcpy(&four, q + 4 * k, 4);
                        u = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
                    }
                    __m128 w = _mm_mul_ps(_mm_sub_ps(_mm_cvtepi32_ps(u), off), s);
                    _mm256_storeu_ps(o + 8 * k, _mm256_permutevar8x32_ps(
                        _mm256_insertf128_ps(_mm256_setzero_ps(), w, 0),
                        _mm256_loadu_si256((const __m256i*)spread.lane[idx[k]])));
                }
            }
            continue;
        }
#endif
        float* of = out_bf16 ? NULL : (float*)out + r * d;
        uint16_t* ob = out_bf16 ? (uint16_t*)out + r * d : NULL;
        if (of) memset(of, 0, d * sizeof(float));
        else memset(ob, 0, d * sizeof(uint16_t));
        for (int64_t g = 0; g < groups; ++g) {  /* group by group: its scale and zero read once */
            int64_t c0 = g * group, c1 = c0 + group < d ? c0 + group : d;
            float s = scale_at(row.scale, g, scale_bf16), off = zr ? (float)zr[g] : symmetric_offset;
            /* the kept values whose columns lie in [c0, c1): groups of 4 columns hold 2 each */
            for (int64_t i = (c0 / 4) * 2; i < (c1 + 3) / 4 * 2; ++i) {
                int64_t c = (i >> 1) * 4 + ((idx[i >> 2] >> ((i & 3) * 2)) & 3);
                if (c < c0 || c >= c1) continue;  /* a 4-column group split by a scale group (group % 4 != 0) */
                float w = ((float)code_at(q, i, bits) - off) * s;
                if (of) of[c] = w;
                else ob[c] = f32_to_bf16(w);
            }
        }
    }
}
