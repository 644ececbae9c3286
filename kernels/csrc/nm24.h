/* 2:4 helpers shared by the packed sparse products (sparse_linear.c: float values; qsparse.c: int4/int8 codes). */
#ifndef COMPRESS_NM24_H
#define COMPRESS_NM24_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"

/* a permute control per byte value (2:4 positions, a bitmask's bits): 8 lanes each */
typedef struct {
    int32_t lane[256][8];
} lane_table;

/* the `bits`-bit field i of a little-endian bit stream (an N:M row's positions) */
ALWAYS_INLINE int64_t field_at(const uint8_t* idx, int64_t i, int bits) {
    int64_t bit = i * bits, byte = bit >> 3;
    int shift = (int)(bit & 7);
    uint32_t w = idx[byte];
    if (shift + bits > 8) w |= (uint32_t)idx[byte + 1] << 8;  /* a field straddling two bytes (m not a power of 4) */
    return (w >> shift) & ((1u << bits) - 1);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 2:4, 16 columns (four groups, eight kept values) a step, x gathered to the values rather than values spread over
   the columns: no zero lanes, and in-lane permutes only. The reordered x (nm24_reordered_x) has each 16 columns as
   [0-3, 8-11, 4-7, 12-15], so that the eight values' lanes (groups 0 0 1 1 2 2 3 3) find their group's four x
   values in the same 128-bit half: lanes 0,1,4,5 permute from xp[0:8] (groups 0 and 2), lanes 2,3,6,7 from
   xp[8:16] (groups 1 and 3); the permute reads the low two bits of each lane's control, the value's 2-bit position
   shifted down. */
ALWAYS_INLINE __m256 nm24_x(const float* xj, __m256i ctrl) {
    return _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(xj), ctrl),
                           _mm256_permutevar_ps(_mm256_loadu_ps(xj + 8), ctrl), 0xCC);
}

/* step k's control: its 16 bits of positions, value v's two in lane v */
ALWAYS_INLINE __m256i nm24_ctrl(const uint8_t* idx, int64_t k) {
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    uint16_t u;
    memcpy(&u, idx + 2 * k, 2);
    return _mm256_srlv_epi32(_mm256_set1_epi32(u), shifts);
}

/* 2:4: lane L of a position byte's 8 columns takes value 0..3, or lane 4 (zero) where no kept value sits */
static inline void nm24_spread_table(lane_table* t) {
    for (int b = 0; b < 256; ++b)
        for (int lane = 0; lane < 8; ++lane) {
            int base = lane < 4 ? 0 : 2, col = lane & 3, v = 4;
            if (((b >> (2 * base)) & 3) == col) v = base;
            else if (((b >> (2 * base + 2)) & 3) == col) v = base + 1;
            t->lane[b][lane] = v;
        }
}

/* x [t, >= d16] -> a new [t, d16] copy reordered for nm24_x (NULL when it cannot be allocated) */
static inline float* nm24_reordered_x(const float* x, int64_t ldx, int64_t t, int64_t d16) {
    float* xp = malloc(t * d16 * sizeof(float));
    if (!xp) return NULL;
    for (int64_t j = 0; j < t; ++j)
        for (int64_t c = 0; c < d16; c += 16)
            for (int q = 0; q < 4; ++q) {
                xp[j * d16 + c + q] = x[j * ldx + c + q];
                xp[j * d16 + c + 4 + q] = x[j * ldx + c + 8 + q];
                xp[j * d16 + c + 8 + q] = x[j * ldx + c + 4 + q];
                xp[j * d16 + c + 12 + q] = x[j * ldx + c + 12 + q];
            }
    return xp;
}
#endif
#endif
