#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define SPARSE_BF16_DOT 1
#endif

#include "bf16.h"
#include "bf16_weights.h"

/* SparseLinear's product for bf16 values and bf16 x on CPUs with AVX512-BF16 and VBMI/VBMI2 (AMD Zen 4/5, Intel Ice
   Lake server / Sapphire Rapids and later): out[j, r] = sum over kept c of W[r, c] * x[j, c], summed in float32 by
   vdpbf16ps (32 products an instruction, as the dense bf16 layer's oneDNN kernel). sparse_linear.c widens bf16 to
   float32 and multiplies 8 or 16 lanes at a time: a bf16 layer there ran at the dense float32 layer's cost, while
   the dense bf16 layer it replaces runs the 32-lane instruction, so `auto` loaded bf16 pruned layers dense.
   2:4 (values [rows, d / 2], 2-bit positions): 64 columns a step, x gathered to the 32 kept values: one vpermt2w
   from x's 64 entries per token and row, controlled by the step's 64 bits of positions spread to words
   (nm24_control in bf16_weights.h: vpmultishiftqb) plus each group's base column; only the kept products are computed.
   50% bitmask (values row-major, a bit per column): 32 columns a step, the step's kept values expanded to their
   lanes from the mask bits (vpexpandw, zeros elsewhere), then multiplied with x as it is.
   Tiles of NR rows x up to NT tokens share each x load across rows. The caller checks d % 64 (2:4) / d % 32
   (bitmask) and keeps sparse_linear.c for the rest. */

#ifdef SPARSE_BF16_DOT
#define NR 4
#define NT 4
#define PREFETCH_STEPS 8  /* steps ahead (values of 8 steps: 512 bytes of a 2:4 row, ~512 of a bitmask row) */

/* 2:4 rows [r0, r0 + nr) x tokens [j0, j0 + nt) */
ALWAYS_INLINE void nm24_tile(const uint16_t* values, int64_t ldv, const uint8_t* indices, int64_t ldi, int64_t d,
                             const uint16_t* x, int64_t ldx, int64_t r0, int nr, int64_t j0, int nt, float* out,
                             int64_t ldo) {
    __m512 acc[NR][4];  /* nm24_step's shape (NT is 4) */
    for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nt; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 64) {
        __m512i control[NR], vals[NR];
        for (int i = 0; i < nr; ++i) {
            const uint16_t* v = values + (r0 + i) * ldv + c / 2;
            __builtin_prefetch(v + 32 * PREFETCH_STEPS, 0, 1);
            vals[i] = _mm512_loadu_si512((const void*)v);
            control[i] = nm24_control(indices + (r0 + i) * ldi + c / 8);
        }
        nm24_step(acc, vals, control, nr, x + j0 * ldx + c, ldx, nt);
    }
    for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nt; ++j) out[(j0 + j) * ldo + r0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}

/* bitmask rows [r0, r0 + nr) x tokens [j0, j0 + nt) */
ALWAYS_INLINE void bitmask_tile(const uint16_t* values, const uint8_t* mask, int64_t ldm, const int64_t* offsets,
                                int64_t d, const uint16_t* x, int64_t ldx, int64_t r0, int nr, int64_t j0, int nt,
                                float* out, int64_t ldo) {
    __m512 acc[NR][NT];
    const uint16_t* v[NR];
    for (int i = 0; i < nr; ++i) {
        v[i] = values + offsets[r0 + i];
        for (int j = 0; j < nt; ++j) acc[i][j] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < d; c += 32) {
        __m512i w[NR];
        for (int i = 0; i < nr; ++i) {
            uint32_t bits;
            memcpy(&bits, mask + (r0 + i) * ldm + c / 8, 4);
            __builtin_prefetch(v[i] + 32 * PREFETCH_STEPS, 0, 1);
            /* the memory form: on a Zen 5 core 10-25% faster here than a masked load + vpexpandw on the register */
            w[i] = _mm512_maskz_expandloadu_epi16((__mmask32)bits, (const void*)v[i]);
            v[i] += __builtin_popcount(bits);
        }
        for (int j = 0; j < nt; ++j) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + (j0 + j) * ldx + c));
            for (int i = 0; i < nr; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i], xv);
        }
    }
    for (int i = 0; i < nr; ++i)
        for (int j = 0; j < nt; ++j) out[(j0 + j) * ldo + r0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}

/* rows [r0, r0 + nr) against every token, NT at a time, the remainder as one tile (constant nr and nt per call) */
#define REST(call, nr) switch (t - j) { case 3: call(nr, 3); break; case 2: call(nr, 2); break; \
    case 1: call(nr, 1); break; default: break; }
#define ALL_TOKENS(call, nr) { int64_t j = 0; for (; j + NT <= t; j += NT) call(nr, NT); REST(call, nr) }
#define NM24(nr, nt) nm24_tile(values, ldv, indices, ldi, d, x, ldx, r0, nr, j, nt, out, ldo)
#define BITMASK(nr, nt) bitmask_tile(values, mask, ldm, offsets, d, x, ldx, r0, nr, j, nt, out, ldo)
#endif

/* 1 where this build has the bf16 kernels (the caller runs sparse_linear.c otherwise) */
int sparse_bf16_available(void) {
#ifdef SPARSE_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

/* 2:4: values [rows, ldv] bf16 (d / 2 kept), indices [rows, ldi] (2-bit positions, little-endian), x [t, ldx]
   bf16, out [t, ldo] float32; d % 64 == 0. Returns 0 where this build lacks the instructions (nothing written). */
int nm24_linear_bf16(const uint16_t* values, int64_t ldv, const uint8_t* indices, int64_t ldi, int64_t rows,
                     int64_t d, const uint16_t* x, int64_t ldx, int64_t t, float* out, int64_t ldo, int nthreads) {
#ifdef SPARSE_BF16_DOT
    if (t <= 0 || rows <= 0) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t k = 0; k < rows / NR; ++k) {
        int64_t r0 = k * NR;
        ALL_TOKENS(NM24, NR)
    }
    for (int64_t r0 = rows / NR * NR; r0 < rows; ++r0) ALL_TOKENS(NM24, 1)
    return 1;
#else
    (void)values, (void)ldv, (void)indices, (void)ldi, (void)rows, (void)d, (void)x, (void)ldx, (void)t, (void)out;
    (void)ldo, (void)nthreads;
    return 0;
#endif
}

/* bitmask: values [nnz] bf16 row-major, mask [rows, ldm] (column c in bit c % 8 of byte c / 8), offsets [rows] into
   values; x, out as above; d % 32 == 0. Returns 0 where this build lacks the instructions. */
int bitmask_linear_bf16(const uint16_t* values, const uint8_t* mask, int64_t ldm, const int64_t* offsets,
                        int64_t rows, int64_t d, const uint16_t* x, int64_t ldx, int64_t t, float* out, int64_t ldo,
                        int nthreads) {
#ifdef SPARSE_BF16_DOT
    if (t <= 0 || rows <= 0) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t k = 0; k < rows / NR; ++k) {
        int64_t r0 = k * NR;
        ALL_TOKENS(BITMASK, NR)
    }
    for (int64_t r0 = rows / NR * NR; r0 < rows; ++r0) ALL_TOKENS(BITMASK, 1)
    return 1;
#else
    (void)values, (void)mask, (void)ldm, (void)offsets, (void)rows, (void)d, (void)x, (void)ldx, (void)t, (void)out;
    (void)ldo, (void)nthreads;
    return 0;
#endif
}
