#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Weights are float32 or bfloat16 (a bf16 model decodes from its own weights: half the bytes, no float copy); the
   products and sums are float32 either way. The helpers below take the weight type as a constant `bf16` and are
   always inlined into the exported kernels (one per type, from DEFINE_GATHERS), which hold the OpenMP loops: a loop
   outlined from a body shared by both types would run one generic loop (measured: the bf16 dot at 7.9 GB/s, now 12).
   bf16 -> fp32 is a 16-bit shift, which vectorizes.
   Several tokens (batched decoding): each weight element is loaded (and widened) once for a block of up to four
   tokens, not once per token (per token, four tokens ran the bf16 gathers compute-bound at ~6 GB/s). */

ALWAYS_INLINE float load_w(const void* row, int64_t c, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t*)row)[c]) : ((const float*)row)[c];
}

ALWAYS_INLINE const void* row_at(const void* w, int64_t ldw, int64_t r, int bf16) {
    return (const char*)w + r * ldw * (bf16 ? 2 : 4);
}

/* o[j * ldo + i] = dot(w_i, x_j) for rows w0..w3 and tokens j < nt (nt = 4, 2 or 1: one accumulator per pair) */
ALWAYS_INLINE void dot_rows4(const void* w0, const void* w1, const void* w2, const void* w3, const float* x,
                             int64_t ldx, int64_t d, float* o, int64_t ldo, int nt, int bf16) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    float a00 = 0.f, a10 = 0.f, a20 = 0.f, a30 = 0.f, a01 = 0.f, a11 = 0.f, a21 = 0.f, a31 = 0.f;
    float a02 = 0.f, a12 = 0.f, a22 = 0.f, a32 = 0.f, a03 = 0.f, a13 = 0.f, a23 = 0.f, a33 = 0.f;
    if (nt == 4) {
        #pragma omp simd reduction(+:a00, a10, a20, a30, a01, a11, a21, a31, a02, a12, a22, a32, a03, a13, a23, a33)
        for (int64_t c = 0; c < d; ++c) {
            float v0 = load_w(w0, c, bf16), v1 = load_w(w1, c, bf16), v2 = load_w(w2, c, bf16);
            float v3 = load_w(w3, c, bf16), y0 = x0[c], y1 = x1[c], y2 = x2[c], y3 = x3[c];
            a00 += v0 * y0; a10 += v1 * y0; a20 += v2 * y0; a30 += v3 * y0;
            a01 += v0 * y1; a11 += v1 * y1; a21 += v2 * y1; a31 += v3 * y1;
            a02 += v0 * y2; a12 += v1 * y2; a22 += v2 * y2; a32 += v3 * y2;
            a03 += v0 * y3; a13 += v1 * y3; a23 += v2 * y3; a33 += v3 * y3;
        }
    } else if (nt == 2) {
        #pragma omp simd reduction(+:a00, a10, a20, a30, a01, a11, a21, a31)
        for (int64_t c = 0; c < d; ++c) {
            float v0 = load_w(w0, c, bf16), v1 = load_w(w1, c, bf16), v2 = load_w(w2, c, bf16);
            float v3 = load_w(w3, c, bf16), y0 = x0[c], y1 = x1[c];
            a00 += v0 * y0; a10 += v1 * y0; a20 += v2 * y0; a30 += v3 * y0;
            a01 += v0 * y1; a11 += v1 * y1; a21 += v2 * y1; a31 += v3 * y1;
        }
    } else {
        #pragma omp simd reduction(+:a00, a10, a20, a30)
        for (int64_t c = 0; c < d; ++c) {
            float y0 = x0[c];
            a00 += load_w(w0, c, bf16) * y0; a10 += load_w(w1, c, bf16) * y0;
            a20 += load_w(w2, c, bf16) * y0; a30 += load_w(w3, c, bf16) * y0;
        }
    }
    float acc[4][4] = {{a00, a10, a20, a30}, {a01, a11, a21, a31}, {a02, a12, a22, a32}, {a03, a13, a23, a33}};
    for (int j = 0; j < nt; ++j)
        for (int i = 0; i < 4; ++i) o[j * ldo + i] = acc[j][i];
}

/* out[j, r..r+3] for every token: blocks of four tokens, then two, then one */
ALWAYS_INLINE void dot_quad(const void* w, int64_t ldw, const int64_t* idx, int64_t r, int64_t k, const float* x,
                            int64_t ldx, int64_t t, int64_t d, float* out, int64_t ldo, int bf16) {
    const void *w0 = row_at(w, ldw, idx[r], bf16), *w1 = row_at(w, ldw, idx[r + 1], bf16);
    const void *w2 = row_at(w, ldw, idx[r + 2], bf16), *w3 = row_at(w, ldw, idx[r + 3], bf16);
    for (int64_t n = r + 4; n < r + 8 && n < k; ++n) __builtin_prefetch(row_at(w, ldw, idx[n], bf16));
    int64_t j = 0;
    for (; j + 4 <= t; j += 4) dot_rows4(w0, w1, w2, w3, x + j * ldx, ldx, d, out + j * ldo + r, ldo, 4, bf16);
    for (; j + 2 <= t; j += 2) dot_rows4(w0, w1, w2, w3, x + j * ldx, ldx, d, out + j * ldo + r, ldo, 2, bf16);
    for (; j < t; ++j) dot_rows4(w0, w1, w2, w3, x + j * ldx, ldx, d, out + j * ldo + r, ldo, 1, bf16);
}

ALWAYS_INLINE void dot_row(const void* row, const float* x, int64_t ldx, int64_t t, int64_t d, float* out,
                           int64_t ldo, int bf16) {
    for (int64_t j = 0; j < t; ++j) {
        const float* xj = x + j * ldx;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t c = 0; c < d; ++c) acc += load_w(row, c, bf16) * xj[c];
        out[j * ldo] = acc;
    }
}

/* o_j[c] += sum_i h[j * ldh + i] * w_i[c] over columns [c0, c1), rows w0..w3, tokens j < nt (4, 2 or 1) */
ALWAYS_INLINE void axpy_rows4(const void* w0, const void* w1, const void* w2, const void* w3, const float* h,
                              int64_t ldh, float* out, int64_t ldo, int64_t c0, int64_t c1, int nt, int bf16) {
    float hv[4][4] = {{0.f}};
    int any = 0;
    for (int j = 0; j < nt; ++j)
        for (int i = 0; i < 4; ++i) any |= (hv[j][i] = h[j * ldh + i]) != 0.f;
    if (!any) return;  /* none of these tokens keeps any of these neurons */
    float *o0 = out, *o1 = out + ldo, *o2 = out + 2 * ldo, *o3 = out + 3 * ldo;
    if (nt == 4) {
        #pragma omp simd
        for (int64_t c = c0; c < c1; ++c) {
            float v0 = load_w(w0, c, bf16), v1 = load_w(w1, c, bf16), v2 = load_w(w2, c, bf16);
            float v3 = load_w(w3, c, bf16);
            o0[c] += hv[0][0] * v0 + hv[0][1] * v1 + hv[0][2] * v2 + hv[0][3] * v3;
            o1[c] += hv[1][0] * v0 + hv[1][1] * v1 + hv[1][2] * v2 + hv[1][3] * v3;
            o2[c] += hv[2][0] * v0 + hv[2][1] * v1 + hv[2][2] * v2 + hv[2][3] * v3;
            o3[c] += hv[3][0] * v0 + hv[3][1] * v1 + hv[3][2] * v2 + hv[3][3] * v3;
        }
    } else if (nt == 2) {
        #pragma omp simd
        for (int64_t c = c0; c < c1; ++c) {
            float v0 = load_w(w0, c, bf16), v1 = load_w(w1, c, bf16), v2 = load_w(w2, c, bf16);
            float v3 = load_w(w3, c, bf16);
            o0[c] += hv[0][0] * v0 + hv[0][1] * v1 + hv[0][2] * v2 + hv[0][3] * v3;
            o1[c] += hv[1][0] * v0 + hv[1][1] * v1 + hv[1][2] * v2 + hv[1][3] * v3;
        }
    } else {
        #pragma omp simd
        for (int64_t c = c0; c < c1; ++c)
            o0[c] += hv[0][0] * load_w(w0, c, bf16) + hv[0][1] * load_w(w1, c, bf16)
                     + hv[0][2] * load_w(w2, c, bf16) + hv[0][3] * load_w(w3, c, bf16);
    }
}

/* columns [c0, c1) of out[j, :] = sum_r h[j, r] * wt[idx[r], :]: rows four at a time (out loaded and stored once per
   four rows, four streams in flight), tokens in blocks of four, two, one */
ALWAYS_INLINE void axpy_columns(const void* wt, int64_t ldw, const int64_t* idx, int64_t k, const float* h,
                                int64_t ldh, int64_t t, float* out, int64_t ldo, int64_t c0, int64_t c1, int bf16) {
    for (int64_t j = 0; j < t; ++j)
        for (int64_t c = c0; c < c1; ++c) out[j * ldo + c] = 0.f;
    int64_t r = 0;
    for (; r + 4 <= k; r += 4) {
        const void *w0 = row_at(wt, ldw, idx[r], bf16), *w1 = row_at(wt, ldw, idx[r + 1], bf16);
        const void *w2 = row_at(wt, ldw, idx[r + 2], bf16), *w3 = row_at(wt, ldw, idx[r + 3], bf16);
        for (int64_t n = r + 4; n < r + 8 && n < k; ++n)
            __builtin_prefetch((const char*)row_at(wt, ldw, idx[n], bf16) + c0 * (bf16 ? 2 : 4));
        int64_t j = 0;
        for (; j + 4 <= t; j += 4)
            axpy_rows4(w0, w1, w2, w3, h + j * ldh + r, ldh, out + j * ldo, ldo, c0, c1, 4, bf16);
        for (; j + 2 <= t; j += 2)
            axpy_rows4(w0, w1, w2, w3, h + j * ldh + r, ldh, out + j * ldo, ldo, c0, c1, 2, bf16);
        for (; j < t; ++j) axpy_rows4(w0, w1, w2, w3, h + j * ldh + r, ldh, out + j * ldo, ldo, c0, c1, 1, bf16);
    }
    for (; r < k; ++r) {
        const void* row = row_at(wt, ldw, idx[r], bf16);
        for (int64_t j = 0; j < t; ++j) {
            float hv = h[j * ldh + r];
            if (hv == 0.f) continue;
            float* oj = out + j * ldo;
            #pragma omp simd
            for (int64_t c = c0; c < c1; ++c) oj[c] += hv * load_w(row, c, bf16);
        }
    }
}

/* gather_dot: out[j, r] = dot(w[idx[r], :d], x[j, :d]), rows four at a time (four accumulators and four memory
   streams in flight: one row at a time left one dependent FMA chain and one stream, ~1.5x slower than a contiguous
   GEMV over as many rows). gather_axpy: out[j, :d] = sum_r h[j, r] * wt[idx[r], :d]; threads split the d columns
   (no reduction across threads). */
#define DEFINE_GATHERS(SUFFIX, WT, BF16)                                                                            \
void gather_dot##SUFFIX(const WT* w, int64_t ldw, const int64_t* idx, int64_t k, const float* x, int64_t ldx,        \
                        int64_t t, int64_t d, float* out, int64_t ldo, int nthreads) {                              \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t r = 0; r < k; r += 4) {                                                                            \
        if (r + 4 <= k) dot_quad(w, ldw, idx, r, k, x, ldx, t, d, out, ldo, BF16);                                  \
        else                                                                                                        \
            for (int64_t q = r; q < k; ++q) dot_row(row_at(w, ldw, idx[q], BF16), x, ldx, t, d, out + q, ldo, BF16); \
    }                                                                                                               \
}                                                                                                                   \
void gather_axpy##SUFFIX(const WT* wt, int64_t ldw, const int64_t* idx, int64_t k, const float* h, int64_t ldh,     \
                         int64_t t, int64_t d, float* out, int64_t ldo, int nthreads) {                             \
    int64_t block = (d + nthreads - 1) / nthreads;                                                                  \
    block = (block + 15) / 16 * 16;                                                                                 \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t c0 = 0; c0 < d; c0 += block)                                                                       \
        axpy_columns(wt, ldw, idx, k, h, ldh, t, out, ldo, c0, c0 + block < d ? c0 + block : d, BF16);              \
}

DEFINE_GATHERS(, float, 0)
DEFINE_GATHERS(_bf16, uint16_t, 1)

/* The activation-sparse MLP's selection, one call instead of ~10 small torch ops per decoding step (nonzero and
   boolean indexing alone cost ~1.2 ms per step at 14336 neurons, a twentieth of the step): for each column i of
   pre [t, n], a_j = silu(pre[j, i]) and token j keeps it when |a_j| * scale[ids[i]] >= thr and allow[j, i] (when
   given); a column any token keeps goes to out position k: idx[k] = ids[i] (ids NULL: i), mask[j, k] = kept by
   token j, g[j, k] = a_j where kept, else 0 (mask, g: leading dimension n; either may be NULL). Returns k. */
int64_t select_silu(const float* pre, int64_t ldp, int64_t t, int64_t n, const int64_t* ids, const float* scale,
                    float thr, const uint8_t* allow, int64_t lda, int64_t* idx, uint8_t* mask, float* g) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
        int64_t id = ids ? ids[i] : i;
        float s = scale ? scale[id] : 1.f;
        int any = 0;
        for (int64_t j = 0; j < t; ++j) {
            float v = pre[j * ldp + i], a = 0.f;
            int keep = 0;
            if (fabsf(v) * s >= thr && (!allow || allow[j * lda + i])) {  /* |silu(v)| <= |v|: most skip expf */
                a = v / (1.f + expf(-v));
                keep = fabsf(a) * s >= thr;
            }
            any |= keep;
            if (mask) mask[j * n + k] = (uint8_t)keep;
            if (g) g[j * n + k] = keep ? a : 0.f;
        }
        if (any) idx[k++] = id;  /* mask and g at column k are overwritten by the next column otherwise */
    }
    return k;
}
