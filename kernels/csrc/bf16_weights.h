/* The bf16 weight QuantizedLinear's torch reference builds (bf16((u - z) * s), bit for bit), 32 columns at a time in
   a vector, from 4-bit or 8-bit codes: what csrc/qgemv_bf16.c multiplies and csrc/qgemv.c's dequantize writes. */
#ifndef COMPRESS_BF16_WEIGHTS_H
#define COMPRESS_BF16_WEIGHTS_H
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <stdint.h>

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
#endif
#endif
