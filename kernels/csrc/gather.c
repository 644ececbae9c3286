#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Weights are float32 or bfloat16 (a bf16 model decodes from its own weights: half the bytes, no float copy); the
   products and sums are float32 either way. Each kernel's body is written once, as a macro instantiated per weight
   type: OpenMP outlines a parallel loop before inlining, so a shared body with a `bf16` flag would run one generic
   loop for both (measured: the bf16 dot at 7.9 GB/s); bf16 -> fp32 is a 16-bit shift, which vectorizes. */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define LOAD_F32(row, c) ((row)[c])
#define LOAD_BF16(row, c) bf16_to_f32((row)[c])

/* gather_dot: out[j, r] = dot(w[idx[r], :d], x[j, :d]). Rows go four at a time: four independent accumulators and
   four memory streams in flight (one row at a time leaves a single dependent FMA chain and one stream: ~1.5x slower
   than a contiguous GEMV over as many rows).
   gather_axpy: out[j, :d] = sum_r h[j, r] * wt[idx[r], :d]; threads split the d columns (no reduction across
   threads). Rows go four at a time, so out is loaded and stored once per four rows and four streams are in flight. */
#define DEFINE_GATHERS(SUFFIX, WT, LOAD)                                                                            \
void gather_dot##SUFFIX(const WT* w, int64_t ldw, const int64_t* idx, int64_t k, const float* x, int64_t ldx,        \
                        int64_t t, int64_t d, float* out, int64_t ldo, int nthreads) {                              \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t r = 0; r < k; r += 4) {                                                                            \
        if (r + 4 <= k) {                                                                                           \
            const WT *w0 = w + idx[r] * ldw, *w1 = w + idx[r + 1] * ldw;                                            \
            const WT *w2 = w + idx[r + 2] * ldw, *w3 = w + idx[r + 3] * ldw;                                        \
            for (int64_t n = r + 4; n < r + 8 && n < k; ++n) __builtin_prefetch(w + idx[n] * ldw);                  \
            for (int64_t j = 0; j < t; ++j) {                                                                       \
                const float* xj = x + j * ldx;                                                                      \
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;                                                       \
                _Pragma("omp simd reduction(+:a0, a1, a2, a3)")                                                     \
                for (int64_t c = 0; c < d; ++c) {                                                                   \
                    a0 += LOAD(w0, c) * xj[c]; a1 += LOAD(w1, c) * xj[c];                                           \
                    a2 += LOAD(w2, c) * xj[c]; a3 += LOAD(w3, c) * xj[c];                                           \
                }                                                                                                   \
                float* o = out + j * ldo + r;                                                                       \
                o[0] = a0; o[1] = a1; o[2] = a2; o[3] = a3;                                                         \
            }                                                                                                       \
        } else {                                                                                                    \
            for (int64_t q = r; q < k; ++q) {                                                                       \
                const WT* row = w + idx[q] * ldw;                                                                   \
                for (int64_t j = 0; j < t; ++j) {                                                                   \
                    const float* xj = x + j * ldx;                                                                  \
                    float acc = 0.f;                                                                                \
                    _Pragma("omp simd reduction(+:acc)")                                                            \
                    for (int64_t c = 0; c < d; ++c) acc += LOAD(row, c) * xj[c];                                    \
                    out[j * ldo + q] = acc;                                                                         \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }                                                                                                               \
}                                                                                                                   \
                                                                                                                    \
void gather_axpy##SUFFIX(const WT* wt, int64_t ldw, const int64_t* idx, int64_t k, const float* h, int64_t ldh,     \
                         int64_t t, int64_t d, float* out, int64_t ldo, int nthreads) {                             \
    int64_t block = (d + nthreads - 1) / nthreads;                                                                  \
    block = (block + 15) / 16 * 16;                                                                                 \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                              \
    for (int64_t c0 = 0; c0 < d; c0 += block) {                                                                     \
        int64_t c1 = c0 + block < d ? c0 + block : d;                                                               \
        for (int64_t j = 0; j < t; ++j)                                                                             \
            for (int64_t c = c0; c < c1; ++c) out[j * ldo + c] = 0.f;                                               \
        int64_t r = 0;                                                                                              \
        for (; r + 4 <= k; r += 4) {                                                                                \
            const WT *w0 = wt + idx[r] * ldw, *w1 = wt + idx[r + 1] * ldw;                                          \
            const WT *w2 = wt + idx[r + 2] * ldw, *w3 = wt + idx[r + 3] * ldw;                                      \
            for (int64_t n = r + 4; n < r + 8 && n < k; ++n) __builtin_prefetch(wt + idx[n] * ldw + c0);            \
            for (int64_t j = 0; j < t; ++j) {                                                                       \
                const float* hj = h + j * ldh + r;                                                                  \
                float h0 = hj[0], h1 = hj[1], h2 = hj[2], h3 = hj[3];                                               \
                if (h0 == 0.f && h1 == 0.f && h2 == 0.f && h3 == 0.f) continue;                                     \
                float* oj = out + j * ldo;                                                                          \
                _Pragma("omp simd")                                                                                 \
                for (int64_t c = c0; c < c1; ++c)                                                                   \
                    oj[c] += h0 * LOAD(w0, c) + h1 * LOAD(w1, c) + h2 * LOAD(w2, c) + h3 * LOAD(w3, c);             \
            }                                                                                                       \
        }                                                                                                           \
        for (; r < k; ++r) {                                                                                        \
            const WT* row = wt + idx[r] * ldw;                                                                      \
            for (int64_t j = 0; j < t; ++j) {                                                                       \
                float hv = h[j * ldh + r];                                                                          \
                if (hv == 0.f) continue;                                                                            \
                float* oj = out + j * ldo;                                                                          \
                _Pragma("omp simd")                                                                                 \
                for (int64_t c = c0; c < c1; ++c) oj[c] += hv * LOAD(row, c);                                       \
            }                                                                                                       \
        }                                                                                                           \
    }                                                                                                               \
}

DEFINE_GATHERS(, float, LOAD_F32)
DEFINE_GATHERS(_bf16, uint16_t, LOAD_BF16)

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
