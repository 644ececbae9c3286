#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSE_AVX2 1
#endif

#include "bf16.h"
#include "nm24.h"

/* SparseLinear's product on the CPU for a few tokens (decoding), read from its packed storage:
   out[j, r] = sum_c W[r, c] * x[j, c] over the kept weights only, W never built. Decoding a token is a pass over
   the weight's bytes, so reading the packed values + positions (2:4 in float32: 0.53x of the dense bytes) instead
   of decoding the whole weight on every call (torch's path: 20-50x slower than dense) is what makes a pruned layer
   faster than the dense one. Sums in float32 (per lane, then across lanes), so results differ from the dense
   product by float32 rounding only. Prefill-sized inputs instead decode blocks of rows (nm_decode / bitmask_decode,
   bit copies of the values) for torch's GEMM.
   Layouts (compress/prune/packing.py): N:M: values [rows, kept] + per row a little-endian stream of ceil(log2 m)-bit
   positions inside each group of m; bitmask: values [nnz] row-major + per row ceil(d / 8) bytes, column c in bit
   c % 8 of byte c / 8, + row offsets into values. Values float32 or bfloat16 (value_bf16).
   AVX2 fast paths: 2:4 - 16 columns (eight values) a step, x's matching entries gathered by in-lane permutes
   (nm24_gather); bitmask - 8 columns a step: the next eight values loaded, each set bit's lane given the value of
   its rank (a 256-entry table), the clear lanes zeroed, the pointer moved by the byte's popcount. Both prefetch the
   values PREFETCH_BYTES ahead (without it, 2:4 at 14336 x 4096 read 14 GB/s where the dense product read 24, one
   core of an EPYC; with it the layer is 1.5-1.6x the dense one). Everything else (other N:M, tails of d % 16 or
   d % 8 columns, machines without AVX2) runs the plain loops. Tokens go in blocks of four / two / one, each weight
   vector decoded once per block. */

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

ALWAYS_INLINE float value_at(const void* v, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t*)v)[i]) : ((const float*)v)[i];
}

#ifdef SPARSE_AVX2
/* bitmask: lane L takes the value of its rank among the byte's set bits; a clear lane's entry has the sign bit set
   (the permute reads the low three bits only; a blend on the sign bit then zeroes the lane) */
static void rank_table(lane_table* t) {
    for (int b = 0; b < 256; ++b) {
        int rank = 0;
        for (int lane = 0; lane < 8; ++lane) {
            t->lane[b][lane] = (b >> lane) & 1 ? rank : INT32_MIN;
            rank += (b >> lane) & 1;
        }
    }
}

ALWAYS_INLINE __m256 load8(const void* v, int64_t i, int bf16) {
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                      (const __m128i*)((const uint16_t*)v + i))), 16))
                : _mm256_loadu_ps((const float*)v + i);
}

/* the 8 columns of mask byte b whose first kept value is value index i of n_values; `guard` (a constant where
   inlined) where the eight values read could pass the buffer's end: the last row(s) only, since the check in the
   loop costs ~30% of its time */
ALWAYS_INLINE __m256 bitmask_block(const void* v, int64_t i, int64_t n_values, int guard, int bf16, uint8_t b,
                                   const lane_table* t) {
    __m256 vals;
    if (!guard || i + 8 <= n_values) {
        vals = load8(v, i, bf16);
    } else {  /* the last values of the buffer: copy what is there */
        float tail[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int64_t k = 0; k < n_values - i; ++k) tail[k] = value_at(v, i + k, bf16);
        vals = _mm256_loadu_ps(tail);
    }
    __m256i ctrl = _mm256_loadu_si256((const __m256i*)t->lane[b]);
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(vals, ctrl), _mm256_setzero_ps(), _mm256_castsi256_ps(ctrl));
}
#endif

/* ---- N:M ---- */

#ifdef SPARSE_AVX2
/* the float values of 2:4 rows against x reordered for nm24_x (nm24.h) */
ALWAYS_INLINE void nm24_gather(const void* v, int bf16, const uint8_t* idx, int64_t blocks16, const float* xp,
                               int64_t ldxp, int nt, __m256* a) {
    int64_t k = 0;
    if (nt == 1) {  /* four FMA chains: fewer leave the loop bound by their latency */
        __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (; k + 4 <= blocks16; k += 4) {
            const char* ahead = (const char*)v + (8 * k << (2 - bf16)) + PREFETCH_BYTES;
            __builtin_prefetch(ahead, 0, 0);
            __builtin_prefetch(ahead + 64, 0, 0);  /* 128 bytes of float32 values a step */
            a[0] = _mm256_fmadd_ps(load8(v, 8 * k, bf16), nm24_x(xp + 16 * k, nm24_ctrl(idx, k)), a[0]);
            a1 = _mm256_fmadd_ps(load8(v, 8 * k + 8, bf16), nm24_x(xp + 16 * k + 16, nm24_ctrl(idx, k + 1)), a1);
            a2 = _mm256_fmadd_ps(load8(v, 8 * k + 16, bf16), nm24_x(xp + 16 * k + 32, nm24_ctrl(idx, k + 2)), a2);
            a3 = _mm256_fmadd_ps(load8(v, 8 * k + 24, bf16), nm24_x(xp + 16 * k + 48, nm24_ctrl(idx, k + 3)), a3);
        }
        a[0] = _mm256_add_ps(_mm256_add_ps(a[0], a1), _mm256_add_ps(a2, a3));
    }
    for (; k < blocks16; ++k) {
        __m256i ctrl = nm24_ctrl(idx, k);
        __m256 w = load8(v, 8 * k, bf16);
        for (int j = 0; j < nt; ++j) a[j] = _mm256_fmadd_ps(w, nm24_x(xp + j * ldxp + 16 * k, ctrl), a[j]);
    }
}
#endif


/* values [i0, kept) of one N:M row against nt tokens, the plain loop */
ALWAYS_INLINE void nm_row_plain(const void* v, int bf16, const uint8_t* idx, int n, int m, int bits, int64_t i0,
                                int64_t kept, const float* x, int64_t ldx, int nt, float* acc) {
    for (int64_t g = i0 / n, i = i0; i < kept; ++g)  /* i0 is a multiple of n */
        for (int q = 0; q < n; ++q, ++i) {
            float w = value_at(v, i, bf16);
            int64_t c = g * m + field_at(idx, i, bits);
            for (int j = 0; j < nt; ++j) acc[j] += w * x[j * ldx + c];
        }
}

ALWAYS_INLINE void nm_row(const void* v, int bf16, const uint8_t* idx, int n, int m, int bits, int64_t kept,
                          int64_t d, const float* x, int64_t ldx, const float* xp, int64_t ldxp, int nt, float* out,
                          int64_t ldo) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t i0 = 0;
#ifdef SPARSE_AVX2
    if (xp) {  /* 2:4 */
        int64_t blocks16 = d / 16;
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        nm24_gather(v, bf16, idx, blocks16, xp, ldxp, nt, a);
        for (int j = 0; j < nt; ++j) acc[j] = hsum256(a[j]);
        i0 = 8 * blocks16;  /* the last d % 16 columns in the plain loop */
    }
#else
    (void)d, (void)xp, (void)ldxp;
#endif
    nm_row_plain(v, bf16, idx, n, m, bits, i0, kept, x, ldx, nt, acc);
    for (int j = 0; j < nt; ++j) out[j * ldo] = acc[j];
}

/* values [rows, kept] (value_bf16: bfloat16, else float32), indices [rows, ldi] uint8; x [t, d] float32; out [t, rows]
   float32. The caller checks d % m == 0 and kept == d / m * n. Returns 0 when x's reordered copy cannot be allocated
   (nothing written). */
int nm_linear(const void* values, int value_bf16, const uint8_t* indices, int64_t ldi, int n, int m, int bits,
              int64_t rows, int64_t d, const float* x, int64_t ldx, int64_t t, float* out, int64_t ldo,
              int nthreads) {
    if (t <= 0 || rows <= 0) return 1;
    int64_t kept = d / m * n;
    size_t value_bytes = value_bf16 ? 2 : 4;
    float* xp = NULL;
    int64_t ldxp = 16 * (d / 16);
#ifdef SPARSE_AVX2
    if (n == 2 && m == 4 && ldxp > 0) {
        xp = nm24_reordered_x(x, ldx, t, ldxp);
        if (!xp) return 0;
    }
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const void* v = (const char*)values + r * kept * value_bytes;
        const uint8_t* idx = indices + r * ldi;
        int64_t j = 0;
        for (; j + 4 <= t; j += 4)
            nm_row(v, value_bf16, idx, n, m, bits, kept, d, x + j * ldx, ldx, xp ? xp + j * ldxp : NULL, ldxp, 4,
                   out + j * ldo + r, ldo);
        for (; j + 2 <= t; j += 2)
            nm_row(v, value_bf16, idx, n, m, bits, kept, d, x + j * ldx, ldx, xp ? xp + j * ldxp : NULL, ldxp, 2,
                   out + j * ldo + r, ldo);
        for (; j < t; ++j)
            nm_row(v, value_bf16, idx, n, m, bits, kept, d, x + j * ldx, ldx, xp ? xp + j * ldxp : NULL, ldxp, 1,
                   out + j * ldo + r, ldo);
    }
    free(xp);
    return 1;
}

/* ---- bitmask ---- */

ALWAYS_INLINE void bitmask_row(const void* v, int bf16, int64_t start, int64_t n_values, int guard,
                               const uint8_t* mask, int64_t d, const float* x, int64_t ldx, int nt,
                               const void* table, float* out,
                               int64_t ldo) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t i = start, c0 = 0;
#ifdef SPARSE_AVX2
    const lane_table* t = (const lane_table*)table;
    int64_t blocks = d / 8;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if (nt == 1) {  /* 32 columns a step: four FMA chains (two left the loop bound by their latency), one mask load,
                       no branches (a clear byte's block is zeros) */
        __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 4 <= blocks; k += 4) {
            uint32_t b;
            memcpy(&b, mask + k, 4);
            __builtin_prefetch((const char*)v + (i << (2 - bf16)) + PREFETCH_BYTES, 0, 0);
            int64_t i1 = i + __builtin_popcount(b & 0xffu), i2 = i + __builtin_popcount(b & 0xffffu);
            int64_t i3 = i + __builtin_popcount(b & 0xffffffu);
            a[0] = _mm256_fmadd_ps(bitmask_block(v, i, n_values, guard, bf16, (uint8_t)b, t),
                                   _mm256_loadu_ps(x + 8 * k), a[0]);
            a1 = _mm256_fmadd_ps(bitmask_block(v, i1, n_values, guard, bf16, (uint8_t)(b >> 8), t),
                                 _mm256_loadu_ps(x + 8 * k + 8), a1);
            a2 = _mm256_fmadd_ps(bitmask_block(v, i2, n_values, guard, bf16, (uint8_t)(b >> 16), t),
                                 _mm256_loadu_ps(x + 8 * k + 16), a2);
            a3 = _mm256_fmadd_ps(bitmask_block(v, i3, n_values, guard, bf16, (uint8_t)(b >> 24), t),
                                 _mm256_loadu_ps(x + 8 * k + 24), a3);
            i += __builtin_popcount(b);
        }
        for (; k < blocks; ++k) {
            uint8_t b = mask[k];
            if (b) a[0] = _mm256_fmadd_ps(bitmask_block(v, i, n_values, guard, bf16, b, t),
                                          _mm256_loadu_ps(x + 8 * k), a[0]);
            i += __builtin_popcount(b);
        }
        a[0] = _mm256_add_ps(_mm256_add_ps(a[0], a1), _mm256_add_ps(a2, a3));
    } else {
        for (int64_t k = 0; k < blocks; ++k) {
            uint8_t b = mask[k];
            if (!b) continue;
            __m256 w = bitmask_block(v, i, n_values, guard, bf16, b, t);
            for (int j = 0; j < nt; ++j) a[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j * ldx + 8 * k), a[j]);
            i += __builtin_popcount(b);
        }
    }
    for (int j = 0; j < nt; ++j) acc[j] = hsum256(a[j]);
    c0 = 8 * blocks;
#else
    (void)table, (void)n_values, (void)guard;
#endif
    for (int64_t c = c0; c < d; ++c) {  /* the plain loop (and the last d % 8 columns) */
        if (!((mask[c >> 3] >> (c & 7)) & 1)) continue;
        float w = value_at(v, i++, bf16);
        for (int j = 0; j < nt; ++j) acc[j] += w * x[j * ldx + c];
    }
    for (int j = 0; j < nt; ++j) out[j * ldo] = acc[j];
}

ALWAYS_INLINE void bitmask_rows_tokens(const void* v, int bf16, int64_t start, int64_t n_values, int guard,
                                       const uint8_t* mr, int64_t d, const float* x, int64_t ldx, int64_t t,
                                       const void* table, float* out, int64_t ldo) {
    int64_t j = 0;
    for (; j + 4 <= t; j += 4)
        bitmask_row(v, bf16, start, n_values, guard, mr, d, x + j * ldx, ldx, 4, table, out + j * ldo, ldo);
    for (; j + 2 <= t; j += 2)
        bitmask_row(v, bf16, start, n_values, guard, mr, d, x + j * ldx, ldx, 2, table, out + j * ldo, ldo);
    for (; j < t; ++j)
        bitmask_row(v, bf16, start, n_values, guard, mr, d, x + j * ldx, ldx, 1, table, out + j * ldo, ldo);
}

/* values [n_values] row-major, mask [rows, ldm] uint8, offsets [rows] int64 (each row's first value); x [t, d]
   float32; out [t, rows] float32 */
void bitmask_linear(const void* values, int value_bf16, int64_t n_values, const uint8_t* mask, int64_t ldm,
                    const int64_t* offsets, int64_t rows, int64_t d, const float* x, int64_t ldx, int64_t t,
                    float* out, int64_t ldo, int nthreads) {
    if (t <= 0 || rows <= 0) return;
    lane_table* table = NULL;
#ifdef SPARSE_AVX2
    lane_table local;
    rank_table(&local);
    table = &local;
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* mr = mask + r * ldm;
        /* a row whose blocks cannot read past the values: the next row's start + 8 within them */
        if (r + 1 < rows && offsets[r + 1] + 8 <= n_values)
            bitmask_rows_tokens(values, value_bf16, offsets[r], n_values, 0, mr, d, x, ldx, t, table, out + r, ldo);
        else
            bitmask_rows_tokens(values, value_bf16, offsets[r], n_values, 1, mr, d, x, ldx, t, table, out + r, ldo);
    }
}

/* ---- decoding into a dense buffer (prefill: a block of rows, then torch's GEMM) ----
   out [rows, d] in the values' own 2- or 4-byte type (value_bytes), zeros where pruned: a copy of bits, so exactly
   the torch reference's weight for any such dtype. AVX2 and 4-byte values: 8 columns a store (2:4: a byte's four
   values spread by a permute from a table whose zero lanes read lane 4, a zero; bitmask: as in bitmask_block). */

#ifdef SPARSE_AVX2
/* eight 32-bit lanes holding 16-bit values -> those eight 16-bit values stored at o */
ALWAYS_INLINE void store8_u16(uint16_t* o, __m256i lanes) {
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lanes, lanes), 0x08);
    _mm_storeu_si128((__m128i*)o, _mm256_castsi256_si128(packed));
}
#endif

#define NM_DECODE_ROW(T)                                                                   \
    do {                                                                                   \
        const T* vr = (const T*)v;                                                         \
        T* o = (T*)dst;                                                                    \
        memset(o, 0, d * sizeof(T));                                                       \
        for (int64_t g = 0, i = 0; g < d / m; ++g)                                         \
            for (int q = 0; q < n; ++q, ++i) o[g * m + field_at(idx, i, bits)] = vr[i];    \
    } while (0)

void nm_decode(const void* values, int value_bytes, const uint8_t* indices, int64_t ldi, int n, int m, int bits,
               int64_t rows, int64_t d, void* out, int nthreads) {
    int64_t kept = d / m * n;
#ifdef SPARSE_AVX2
    lane_table spread;
    int fast = n == 2 && m == 4 && d % 8 == 0;
    if (fast) nm24_spread_table(&spread);
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const void* v = (const char*)values + r * kept * value_bytes;
        const uint8_t* idx = indices + r * ldi;
        void* dst = (char*)out + r * d * value_bytes;
#ifdef SPARSE_AVX2
        if (fast && value_bytes == 4) {
            for (int64_t k = 0; k < d / 8; ++k) {
                __m256 four = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps((const float*)v + 4 * k), 0);
                _mm256_storeu_ps((float*)dst + 8 * k, _mm256_permutevar8x32_ps(
                    four, _mm256_loadu_si256((const __m256i*)spread.lane[idx[k]])));
            }
            continue;
        }
        if (fast) {  /* 16-bit values: widened to 32-bit lanes (lanes 4-7 zero), spread, narrowed */
            for (int64_t k = 0; k < d / 8; ++k) {
                __m256i four = _mm256_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)((const uint16_t*)v + 4 * k)));
                store8_u16((uint16_t*)dst + 8 * k, _mm256_permutevar8x32_epi32(
                    four, _mm256_loadu_si256((const __m256i*)spread.lane[idx[k]])));
            }
            continue;
        }
#endif
        if (value_bytes == 4) NM_DECODE_ROW(uint32_t);
        else NM_DECODE_ROW(uint16_t);
    }
}

#define BITMASK_DECODE_ROW(T, C0)                                                          \
    do {                                                                                   \
        const T* vr = (const T*)values;                                                    \
        T* o = (T*)dst;                                                                    \
        for (int64_t c = C0; c < d; ++c)                                                   \
            o[c] = (mr[c >> 3] >> (c & 7)) & 1 ? vr[i++] : (T)0;                           \
    } while (0)

void bitmask_decode(const void* values, int value_bytes, int64_t n_values, const uint8_t* mask, int64_t ldm,
                    const int64_t* offsets, int64_t rows, int64_t d, void* out, int nthreads) {
#ifdef SPARSE_AVX2
    lane_table ranks;
    rank_table(&ranks);
#endif
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* mr = mask + r * ldm;
        void* dst = (char*)out + r * d * value_bytes;
        int64_t i = offsets[r], c0 = 0;
#ifdef SPARSE_AVX2
        /* bitmask_block on the values' bits: 16-bit ones read as bf16 (a shift into the high half, exact), the
           lanes moved and zeroed, then shifted back; 32-bit ones as floats (permutes and blends move bits only) */
        int guard = !(r + 1 < rows && offsets[r + 1] + 8 <= n_values), two = value_bytes == 2;
        for (int64_t k = 0; k < d / 8; ++k) {
            uint8_t b = mr[k];
            __m256 w = guard ? bitmask_block(values, i, n_values, 1, two, b, &ranks)
                             : bitmask_block(values, i, n_values, 0, two, b, &ranks);
            if (two) store8_u16((uint16_t*)dst + 8 * k, _mm256_srli_epi32(_mm256_castps_si256(w), 16));
            else _mm256_storeu_ps((float*)dst + 8 * k, w);
            i += __builtin_popcount(b);
        }
        c0 = 8 * (d / 8);
#else
        (void)n_values;
#endif
        if (value_bytes == 4) BITMASK_DECODE_ROW(uint32_t, c0);
        else BITMASK_DECODE_ROW(uint16_t, c0);
    }
}
