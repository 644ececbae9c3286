/* The bf16 weight QuantizedLinear's torch reference builds (bf16((u - z) * s), bit for bit), 32 columns at a time in
   a vector, from 4-bit or 8-bit codes: what csrc/qgemv_bf16.c multiplies and csrc/qgemv.c's dequantize writes; and
   the 2:4 gather control of the bf16 sparse products. */
#ifndef COMPRESS_BF16_WEIGHTS_H
#define COMPRESS_BF16_WEIGHTS_H
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* 16 bf16 weights bf16((i - off) * s) for a nibble i, in the low 16 words (vpermw reads only indices < 16) */
ALWAYS_INLINE __m512i nibble_table(float s, float off) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(off)), _mm512_set1_ps(s));
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));
}

/* 32 weights from 16 bytes of 4-bit codes: dword b = low nibble | high nibble << 16 (columns 2b, 2b + 1 in order) */
ALWAYS_INLINE __m512i weights_int4(const uint8_t* q, __m512i table) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q));
    __m512i idx = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
    return _mm512_permutexvar_epi16(idx, table);
}

/* 32 weights from 32 8-bit codes: (u - off) * s in float32, rounded to bf16 to nearest even */
ALWAYS_INLINE __m512i weights_int8(const uint8_t* q, __m512 s, __m512 off) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + 16))));
    lo = _mm512_mul_ps(_mm512_sub_ps(lo, off), s);
    hi = _mm512_mul_ps(_mm512_sub_ps(hi, off), s);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

#if defined(__AVX512VBMI__)
/* 2:4 layers (csrc/sparse_bf16.c, qgemv_bf16.c): a 64-column step's gather control for vpermt2w over x's 64
   entries: word k (kept value k of the step) = 4 * (k / 2) + its 2-bit position, from the step's 8 bytes of the
   little-endian position stream */
ALWAYS_INLINE __m512i nm24_control(const uint8_t* idx) {
    const __m512i shifts = _mm512_set_epi8(0, 62, 0, 60, 0, 58, 0, 56, 0, 54, 0, 52, 0, 50, 0, 48, 0, 46, 0, 44, 0, 42,
                                           0, 40, 0, 38, 0, 36, 0, 34, 0, 32, 0, 30, 0, 28, 0, 26, 0, 24, 0, 22, 0, 20,
                                           0, 18, 0, 16, 0, 14, 0, 12, 0, 10, 0, 8, 0, 6, 0, 4, 0, 2, 0, 0);
    const __m512i base = _mm512_set_epi16(60, 60, 56, 56, 52, 52, 48, 48, 44, 44, 40, 40, 36, 36, 32, 32, 28, 28, 24,
                                          24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    uint64_t bits;
    memcpy(&bits, idx, 8);
    __m512i fields = _mm512_multishift_epi64_epi8(shifts, _mm512_set1_epi64((long long)bits));
    return _mm512_add_epi16(_mm512_and_si512(fields, _mm512_set1_epi16(3)), base);
}

/* one 64-column 2:4 step of a tile: acc[i][j] += w[i] . (token j's 64 entries of x at `x` gathered by control[i]),
   rows i < nr, tokens j < nt (x: the step's first column of the tile's first token, rows ldx apart) */
ALWAYS_INLINE void nm24_step(__m512 acc[][4], const __m512i* w, const __m512i* control, int nr, const uint16_t* x,
                             int64_t ldx, int nt) {
    for (int j = 0; j < nt; ++j) {
        const uint16_t* xj = x + j * ldx;
        __m512i lo = _mm512_loadu_si512((const void*)xj), hi = _mm512_loadu_si512((const void*)(xj + 32));
        for (int i = 0; i < nr; ++i)
            acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i],
                                         (__m512bh)_mm512_permutex2var_epi16(lo, control[i], hi));
    }
}
#endif
#endif
#endif
