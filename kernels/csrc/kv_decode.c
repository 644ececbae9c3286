/* Decode attention over the paged compressed KV storage (kernels/kv_pages.py) plus the window of recent tokens, on
   the CPU: the whole of kv_attention_reference.py in one call per layer. The torch reference spends ~25 small ops
   per page side and layer; at a decode step that fixed cost, not the data, is what made the compressed cache slower
   than DynamicCache (BENCHMARKS.md). Here every (batch row, KV head) pair is one pass over its pages:
     scores: per key group (G tokens of a channel share scale/zero) the query rows are pre-multiplied by the scale
             (q*s, in lane order) and q.zero summed once; per token the codes are unpacked into a float row and
             dotted with each query row; low-rank terms as (q U) . a_t, outliers as sparse corrections;
     softmax over pages ++ window (+ additive bias), then
     values: p_t * scale_tg weighs the unpacked code row, p . zero per group, (p a) U^T, outliers.
   Codes are unpacked lane-outer (lane j: channels j, j+S, ...: contiguous byte loads, one shift and mask per lane,
   what the compiler vectorizes); query rows and the value accumulator live in that lane order, so no interleave is
   needed until the end. fp16 fields are converted by bit manipulation; fp8 (e4m3) factors and log8 scales (one
   byte per group, kernels/kv_scale.py) through tables. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F_CODES, F_SCALE, F_ZERO, F_OUT_VALUES, F_OUT_OFFSETS, F_A, F_BASIS, N_FIELDS };

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__F16C__)
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f; /* subnormal: m * 2^-24 */
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* n fp16 values -> float, channel order (dst[i] = src[i]) or lane order (dst[j*(n/s) + i] = src[i*s + j]) */
static inline void h2f_row(const uint16_t* src, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = h2f(src[i]);
}
static inline void to_lanes(const float* src, int64_t d, int s, float* dst) {
    int64_t n = d / s;
    for (int j = 0; j < s; ++j)
        for (int64_t i = 0; i < n; ++i) dst[j * n + i] = src[i * s + j];
}
static inline void from_lanes_add(const float* src, int64_t d, int s, float* dst) {
    int64_t n = d / s;
    for (int j = 0; j < s; ++j)
        for (int64_t i = 0; i < n; ++i) dst[i * s + j] += src[j * n + i];
}

/* One packed row of D codes -> floats in lane order: lane j (of S) holds channels j, j+S, ...; out[j*(D/S) + i]
   is channel i*S + j. 3 bits: 8 codes per 24-bit little-endian word, so S = 8. With AVX2, eight bytes (or words)
   at a time are widened to int32 once and every lane is one shift + mask + convert (compilers scalarize the plain
   loop for 2-bit codes). */
static inline void unpack_row(const uint8_t* row, int bits, int64_t d, float* out) {
    int s = bits == 3 ? 8 : 8 / bits;
    int64_t n = d / s;
    unsigned mask = (1u << bits) - 1u;
    uint32_t w[64];  /* 3 bits: the 24-bit words (d <= 512) */
    if (bits == 3)
        for (int64_t i = 0; i < n; ++i)
            w[i] = (uint32_t)row[3 * i] | ((uint32_t)row[3 * i + 1] << 8) | ((uint32_t)row[3 * i + 2] << 16);
#if defined(__AVX512F__)
    if (n % 16 == 0) {  /* sixteen bytes (words) at a time */
        const __m512i m = _mm512_set1_epi32((int)mask);
        for (int64_t i = 0; i < n; i += 16) {
            __m512i v = bits == 3 ? _mm512_loadu_si512((const void*)(w + i))
                                  : _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + i)));
            for (int j = 0; j < s; ++j) {
                __m512i c = _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(bits * j)), m);
                _mm512_storeu_ps(out + j * n + i, _mm512_cvtepi32_ps(c));
            }
        }
        return;
    }
#endif
#if defined(__AVX2__)
    if (n % 8 == 0) {
        const __m256i m = _mm256_set1_epi32((int)mask);
        for (int64_t i = 0; i < n; i += 8) {
            __m256i v = bits == 3 ? _mm256_loadu_si256((const __m256i*)(w + i))
                                  : _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + i)));
            for (int j = 0; j < s; ++j) {
                __m256i c = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_set1_epi32(bits * j)), m);
                _mm256_storeu_ps(out + j * n + i, _mm256_cvtepi32_ps(c));
            }
        }
        return;
    }
#endif
    for (int j = 0; j < s; ++j) {
        float* o = out + j * n;
        unsigned sh = (unsigned)(bits * j);
        for (int64_t i = 0; i < n; ++i) o[i] = (float)(((bits == 3 ? w[i] : (uint32_t)row[i]) >> sh) & mask);
    }
}

static inline int lanes_of(int bits) { return bits == 3 ? 8 : 8 / bits; }

static inline float factor(const void* a, int fp8, int64_t i, const float* lut) {
    return fp8 ? lut[((const uint8_t*)a)[i]] : h2f(((const uint16_t*)a)[i]);
}

#if defined(__AVX512F__)
/* [sum(a0), sum(a1), sum(a2), sum(a3)]: halves added, then two rounds of pairwise adds across the four */
static inline __m256 halves(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
static inline __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m256 b0 = halves(a0), b1 = halves(a1), b2 = halves(a2), b3 = halves(a3);
    __m256 c = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));  /* per 128-bit half: 4 partials */
    return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}
#endif

static inline float dot(const float* x, const float* y, int64_t n) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
    return acc;
}

typedef struct {
    const int64_t* ptrs;    /* [n_pages, N_FIELDS] data pointers (0: field absent) */
    const int64_t* tokens;  /* [n_pages] tokens per page */
    const int64_t* ranks;   /* [n_pages] low-rank rank per page (0: none) */
    const int64_t* fp8;     /* [n_pages] token factors stored as fp8 e4m3 */
    int bits, group, per_group, chunk;
    const float* slut;      /* log8 scales: the value of each byte [256]; NULL: fp16 scales */
} Store;

/* n scales of a page's scale field from entry `off` on -> float */
static inline void scale_row(const Store* st, const void* base, int64_t off, int64_t n, float* dst) {
    if (st->slut) {
        const uint8_t* u = (const uint8_t*)base + off;
        for (int64_t i = 0; i < n; ++i) dst[i] = st->slut[u[i]];
    } else {
        h2f_row((const uint16_t*)base + off, n, dst);
    }
}

static const void* field(const Store* st, int64_t page, int f) {
    return (const void*)(intptr_t)st->ptrs[page * N_FIELDS + f];
}

/* scores [R, T] of one page for head bh: q rows in channel order (qc) and lane order (ql) [R, D]; tmp [2, D]. */
static inline __attribute__((always_inline)) void page_scores_impl(
        const Store* st, int64_t page, int64_t bh, const float* qc, const float* ql, int64_t r_rows, int64_t d,
        float* s, int64_t lds, float* qs, float* buf, float* tmp, const float* lut, int bits) {
    int64_t t = st->tokens[page], g = st->group, nb = d * bits / 8, ng = t / g;
    int sl = lanes_of(bits);
    const uint8_t* codes = (const uint8_t*)field(st, page, F_CODES) + bh * t * nb;
    const void* scale = field(st, page, F_SCALE);
    const uint16_t* zero = (const uint16_t*)field(st, page, F_ZERO) + bh * ng * d;
    float qz[64], *sc = tmp, *sc_lanes = tmp + d;
    for (int64_t grp = 0; grp < ng; ++grp) {
        scale_row(st, scale, (bh * ng + grp) * d, d, sc);
        to_lanes(sc, d, sl, sc_lanes);
        h2f_row(zero + grp * d, d, sc);
        for (int64_t r = 0; r < r_rows; ++r) {
            qz[r] = dot(qc + r * d, sc, d);
            #pragma omp simd
            for (int64_t c = 0; c < d; ++c) qs[r * d + c] = ql[r * d + c] * sc_lanes[c];
        }
        int64_t k = grp * g, end = k + g;
        for (; k + 4 <= end; k += 4) {  /* four tokens at a time: four independent sums per query row */
            for (int u = 0; u < 4; ++u) unpack_row(codes + (k + u) * nb, bits, d, buf + u * d);
            const float *b0 = buf, *b1 = buf + d, *b2 = buf + 2 * d, *b3 = buf + 3 * d;
            for (int64_t r = 0; r < r_rows; ++r) {
                const float* x = qs + r * d;
                float* sr = s + r * lds + k;
#if defined(__AVX512F__)
                if (d % 16 == 0) {  /* four vector sums, then one combined horizontal sum (not four) */
                    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int64_t c = 0; c < d; c += 16) {
                        __m512 xv = _mm512_loadu_ps(x + c);
                        a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(b0 + c), a0);
                        a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(b1 + c), a1);
                        a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(b2 + c), a2);
                        a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(b3 + c), a3);
                    }
                    _mm_storeu_ps(sr, _mm_add_ps(_mm_set1_ps(qz[r]), hsum4(a0, a1, a2, a3)));
                    continue;
                }
#endif
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
                #pragma omp simd reduction(+:a0, a1, a2, a3)
                for (int64_t c = 0; c < d; ++c) { a0 += x[c] * b0[c]; a1 += x[c] * b1[c]; a2 += x[c] * b2[c]; a3 += x[c] * b3[c]; }
                sr[0] = qz[r] + a0; sr[1] = qz[r] + a1; sr[2] = qz[r] + a2; sr[3] = qz[r] + a3;
            }
        }
        for (; k < end; ++k) {
            unpack_row(codes + k * nb, bits, d, buf);
            for (int64_t r = 0; r < r_rows; ++r) s[r * lds + k] = qz[r] + dot(qs + r * d, buf, d);
        }
    }
    int64_t rank = st->ranks[page];
    if (rank) {  /* (q U) . a_t: U [D, r] fp16, a [T, r] */
        const uint16_t* u = (const uint16_t*)field(st, page, F_BASIS) + bh * d * rank;
        const void* a = field(st, page, F_A);
        int fp8 = (int)st->fp8[page];
        float qu[64 * 16];
        for (int64_t r = 0; r < r_rows; ++r)
            for (int64_t j = 0; j < rank; ++j) {
                float acc = 0.f;
                for (int64_t c = 0; c < d; ++c) acc += qc[r * d + c] * h2f(u[c * rank + j]);
                qu[r * rank + j] = acc;
            }
        for (int64_t k = 0; k < t; ++k)
            for (int64_t j = 0; j < rank; ++j) {
                float av = factor(a, fp8, (bh * t + k) * rank + j, lut);
                for (int64_t r = 0; r < r_rows; ++r) s[r * lds + k] += qu[r * rank + j] * av;
            }
    }
    if (st->per_group) {  /* group (tg, ch): tokens tg*G.. of channel ch; offsets are token offsets in the group */
        int64_t chunks = t / st->chunk, n_out = (st->chunk / g) * d * st->per_group;
        const uint16_t* ov = (const uint16_t*)field(st, page, F_OUT_VALUES) + bh * chunks * n_out;
        const uint8_t* oo = (const uint8_t*)field(st, page, F_OUT_OFFSETS) + bh * chunks * n_out;
        int64_t per = st->per_group, i = 0;
        for (int64_t ch = 0; ch < chunks; ++ch)
            for (int64_t tg = 0; tg < st->chunk / g; ++tg)
                for (int64_t c = 0; c < d; ++c)
                    for (int64_t e = 0; e < per; ++e, ++i) {
                        int64_t tok = ch * st->chunk + tg * g + oo[i];
                        float v = h2f(ov[i]);
                        for (int64_t r = 0; r < r_rows; ++r) s[r * lds + tok] += qc[r * d + c] * v;
                    }
    }
}

/* acc (lane order) [R, D] += p . codes*scale; out (channel order) [R, D] += zeros, low-rank, outliers. */
static inline __attribute__((always_inline)) void page_mix_impl(
        const Store* st, int64_t page, int64_t bh, const float* p, int64_t ldp, int64_t r_rows, int64_t d,
        float* acc, float* out, float* buf, const float* lut, int bits) {
    int64_t t = st->tokens[page], g = st->group, nb = d * bits / 8, ng = d / g;
    int sl = lanes_of(bits);
    int64_t n = d / sl, seg = g / sl;
    const uint8_t* codes = (const uint8_t*)field(st, page, F_CODES) + bh * t * nb;
    const void* scale = field(st, page, F_SCALE);
    const uint16_t* zero = (const uint16_t*)field(st, page, F_ZERO) + bh * t * ng;
    float zsum[16 * 64];  /* [R, ng] sum_t p_t zero_tg */
    float sc[4 * 64], zf[4 * 64];
    memset(zsum, 0, sizeof(float) * (size_t)(r_rows * ng));
    for (int64_t k = 0; k < t; k += 4) {  /* four tokens at a time: the accumulator loaded and stored once per four */
        int u_n = t - k < 4 ? (int)(t - k) : 4;
        for (int u = 0; u < 4; ++u) {  /* a missing token (tail) gets zero codes and zero weight */
            if (u < u_n) {
                unpack_row(codes + (k + u) * nb, bits, d, buf + u * d);
                scale_row(st, scale, (bh * t + k + u) * ng, ng, sc + u * ng);
                h2f_row(zero + (k + u) * ng, ng, zf + u * ng);
            } else {
                memset(buf + u * d, 0, sizeof(float) * (size_t)d);
                for (int64_t gi = 0; gi < ng; ++gi) sc[u * ng + gi] = zf[u * ng + gi] = 0.f;
            }
        }
        const float *b0 = buf, *b1 = buf + d, *b2 = buf + 2 * d, *b3 = buf + 3 * d;
        for (int64_t r = 0; r < r_rows; ++r) {
            float pk[4];
            for (int u = 0; u < 4; ++u) pk[u] = u < u_n ? p[r * ldp + k + u] : 0.f;
            float* a = acc + r * d;
            for (int64_t gi = 0; gi < ng; ++gi)
                zsum[r * ng + gi] += pk[0] * zf[gi] + pk[1] * zf[ng + gi] + pk[2] * zf[2 * ng + gi] + pk[3] * zf[3 * ng + gi];
            for (int j = 0; j < sl; ++j)  /* lane j's entries i*S + j fall in group i / (G/S) */
                for (int64_t gi = 0; gi < ng; ++gi) {
                    float w0 = pk[0] * sc[gi], w1 = pk[1] * sc[ng + gi], w2 = pk[2] * sc[2 * ng + gi];
                    float w3 = pk[3] * sc[3 * ng + gi];
                    int64_t off = j * n + gi * seg;
                    float* aj = a + off;
                    #pragma omp simd
                    for (int64_t i = 0; i < seg; ++i) aj[i] += w0 * b0[off + i] + w1 * b1[off + i] + w2 * b2[off + i] + w3 * b3[off + i];
                }
        }
    }
    for (int64_t r = 0; r < r_rows; ++r)
        for (int64_t c = 0; c < d; ++c) out[r * d + c] += zsum[r * ng + c / g];
    int64_t rank = st->ranks[page];
    if (rank) {  /* (p a) U^T */
        const uint16_t* u = (const uint16_t*)field(st, page, F_BASIS) + bh * d * rank;
        const void* a = field(st, page, F_A);
        int fp8 = (int)st->fp8[page];
        float pa[64 * 16];
        memset(pa, 0, sizeof(float) * (size_t)(r_rows * rank));
        for (int64_t k = 0; k < t; ++k)
            for (int64_t j = 0; j < rank; ++j) {
                float av = factor(a, fp8, (bh * t + k) * rank + j, lut);
                for (int64_t r = 0; r < r_rows; ++r) pa[r * rank + j] += p[r * ldp + k] * av;
            }
        for (int64_t c = 0; c < d; ++c)
            for (int64_t j = 0; j < rank; ++j) {
                float uv = h2f(u[c * rank + j]);
                for (int64_t r = 0; r < r_rows; ++r) out[r * d + c] += pa[r * rank + j] * uv;
            }
    }
    if (st->per_group) {  /* group (t, gi): channels gi*G.. of token t; offsets are channel offsets in the group */
        int64_t chunks = t / st->chunk, n_out = st->chunk * ng * st->per_group;
        const uint16_t* ov = (const uint16_t*)field(st, page, F_OUT_VALUES) + bh * chunks * n_out;
        const uint8_t* oo = (const uint8_t*)field(st, page, F_OUT_OFFSETS) + bh * chunks * n_out;
        int64_t per = st->per_group, i = 0;
        for (int64_t ch = 0; ch < chunks; ++ch)
            for (int64_t k = ch * st->chunk; k < (ch + 1) * st->chunk; ++k)
                for (int64_t gi = 0; gi < ng; ++gi)
                    for (int64_t e = 0; e < per; ++e, ++i) {
                        int64_t c = gi * g + oo[i];
                        float v = h2f(ov[i]);
                        for (int64_t r = 0; r < r_rows; ++r) out[r * d + c] += p[r * ldp + k] * v;
                    }
    }
}

/* Specialized copies for the common code widths and head sizes: with bits and D constant the unpacking and the
   dot products unroll into straight vector code (2-3x faster than with run-time loop bounds). */
#define SPECIALIZE(BITS, D)                                                                                        \
    static void page_scores_##BITS##_##D(const Store* st, int64_t page, int64_t bh, const float* qc,              \
                                         const float* ql, int64_t r_rows, int64_t d, float* s, int64_t lds,      \
                                         float* qs, float* buf, float* tmp, const float* lut) {                  \
        (void)d;                                                                                                  \
        page_scores_impl(st, page, bh, qc, ql, r_rows, D, s, lds, qs, buf, tmp, lut, BITS);                       \
    }                                                                                                             \
    static void page_mix_##BITS##_##D(const Store* st, int64_t page, int64_t bh, const float* p, int64_t ldp,    \
                                      int64_t r_rows, int64_t d, float* acc, float* out, float* buf,             \
                                      const float* lut) {                                                         \
        (void)d;                                                                                                  \
        page_mix_impl(st, page, bh, p, ldp, r_rows, D, acc, out, buf, lut, BITS);                                  \
    }
SPECIALIZE(2, 64) SPECIALIZE(3, 64) SPECIALIZE(4, 64) SPECIALIZE(8, 64)
SPECIALIZE(2, 128) SPECIALIZE(3, 128) SPECIALIZE(4, 128) SPECIALIZE(8, 128)

typedef void (*ScoresFn)(const Store*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, float*,
                         int64_t, float*, float*, float*, const float*);
typedef void (*MixFn)(const Store*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, float*,
                      float*, const float*);

static void page_scores_any(const Store* st, int64_t page, int64_t bh, const float* qc, const float* ql,
                            int64_t r_rows, int64_t d, float* s, int64_t lds, float* qs, float* buf, float* tmp,
                            const float* lut) {
    page_scores_impl(st, page, bh, qc, ql, r_rows, d, s, lds, qs, buf, tmp, lut, st->bits);
}
static void page_mix_any(const Store* st, int64_t page, int64_t bh, const float* p, int64_t ldp, int64_t r_rows,
                         int64_t d, float* acc, float* out, float* buf, const float* lut) {
    page_mix_impl(st, page, bh, p, ldp, r_rows, d, acc, out, buf, lut, st->bits);
}

static ScoresFn scores_fn(int bits, int64_t d) {
    if (d == 64) switch (bits) { case 2: return page_scores_2_64; case 3: return page_scores_3_64;
                                 case 4: return page_scores_4_64; case 8: return page_scores_8_64; }
    if (d == 128) switch (bits) { case 2: return page_scores_2_128; case 3: return page_scores_3_128;
                                  case 4: return page_scores_4_128; case 8: return page_scores_8_128; }
    return page_scores_any;
}
static MixFn mix_fn(int bits, int64_t d) {
    if (d == 64) switch (bits) { case 2: return page_mix_2_64; case 3: return page_mix_3_64;
                                 case 4: return page_mix_4_64; case 8: return page_mix_8_64; }
    if (d == 128) switch (bits) { case 2: return page_mix_2_128; case 3: return page_mix_3_128;
                                  case 4: return page_mix_4_128; case 8: return page_mix_8_128; }
    return page_mix_any;
}

/* out [B, H, R, D] = softmax(q K^T * scale + bias) V for every (b, h); q [B, H, R, D] (R = query heads per KV head
   x L steps, row i*L + l at step l); window keys/values [B, H, W, D] fp32; bias [B, L, N+W] with strides
   (bias_sb, bias_sl) or NULL; lut: fp8 e4m3 factor values [256]; k_slut / v_slut: log8 scale values [256], or NULL
   where that side's scales are fp16. Returns 0, or -1 if a buffer could not be allocated. */
int kv_decode_attention(const float* q, int64_t b_size, int64_t h_size, int64_t r_rows, int64_t l_steps, int64_t d,
                        float softmax_scale, int64_t n_pages,
                        const int64_t* k_ptrs, const int64_t* v_ptrs, const int64_t* tokens,
                        const int64_t* k_ranks, const int64_t* v_ranks, const int64_t* k_fp8, const int64_t* v_fp8,
                        int k_bits, int k_group, int k_per_group, int v_bits, int v_group, int v_per_group,
                        int chunk, const float* wk, const float* wv, int64_t w_len,
                        const float* bias, int64_t bias_sb, int64_t bias_sl, const float* lut,
                        const float* k_slut, const float* v_slut, float* out, int nthreads) {
    Store ks = {k_ptrs, tokens, k_ranks, k_fp8, k_bits, k_group, k_per_group, chunk, k_slut};
    Store vs = {v_ptrs, tokens, v_ranks, v_fp8, v_bits, v_group, v_per_group, chunk, v_slut};
    int64_t n = 0;
    for (int64_t pg = 0; pg < n_pages; ++pg) n += tokens[pg];
    int64_t kv = n + w_len, pairs = b_size * h_size;
    ScoresFn page_scores = scores_fn(k_bits, d);
    MixFn page_mix = mix_fn(v_bits, d);
    int failed = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(|:failed)
    for (int64_t bh = 0; bh < pairs; ++bh) {
        int64_t b = bh / h_size;
        /* s [R, kv] | qc, ql, qs, acc [R, D] | buf [4, D] | tmp [2, D] */
        float* mem = (float*)malloc(sizeof(float) * (size_t)(r_rows * kv + 4 * r_rows * d + 6 * d));
        if (!mem) { failed = 1; continue; }
        float *s = mem, *qc = s + r_rows * kv, *ql = qc + r_rows * d, *qs = ql + r_rows * d, *acc = qs + r_rows * d;
        float *buf = acc + r_rows * d, *tmp = buf + 4 * d;
        const float* qh = q + bh * r_rows * d;
        for (int64_t i = 0; i < r_rows * d; ++i) qc[i] = qh[i] * softmax_scale;
        for (int64_t r = 0; r < r_rows; ++r) to_lanes(qc + r * d, d, lanes_of(k_bits), ql + r * d);
        int64_t start = 0;
        for (int64_t pg = 0; pg < n_pages; ++pg) {
            page_scores(&ks, pg, bh, qc, ql, r_rows, d, s + start, kv, qs, buf, tmp, lut);
            start += tokens[pg];
        }
        for (int64_t w = 0; w < w_len; ++w) {
            const float* kw = wk + (bh * w_len + w) * d;
            for (int64_t r = 0; r < r_rows; ++r) s[r * kv + n + w] = dot(qc + r * d, kw, d);
        }
        float* o = out + bh * r_rows * d;
        for (int64_t r = 0; r < r_rows; ++r) {
            float* sr = s + r * kv;
            if (bias) {
                const float* br = bias + b * bias_sb + (r % l_steps) * bias_sl;
                for (int64_t k = 0; k < kv; ++k) sr[k] += br[k];
            }
            float mx = -INFINITY, sum = 0.f;
            for (int64_t k = 0; k < kv; ++k) mx = sr[k] > mx ? sr[k] : mx;
            for (int64_t k = 0; k < kv; ++k) { sr[k] = expf(sr[k] - mx); sum += sr[k]; }
            float inv = 1.f / sum;
            for (int64_t k = 0; k < kv; ++k) sr[k] *= inv;
            for (int64_t c = 0; c < d; ++c) o[r * d + c] = 0.f;
            for (int64_t w = 0; w < w_len; ++w) {
                float pw = sr[n + w];
                const float* vw = wv + (bh * w_len + w) * d;
                #pragma omp simd
                for (int64_t c = 0; c < d; ++c) o[r * d + c] += pw * vw[c];
            }
        }
        if (n) {
            memset(acc, 0, sizeof(float) * (size_t)(r_rows * d));
            start = 0;
            for (int64_t pg = 0; pg < n_pages; ++pg) {
                page_mix(&vs, pg, bh, s + start, kv, r_rows, d, acc, o, buf, lut);
                start += tokens[pg];
            }
            for (int64_t r = 0; r < r_rows; ++r) from_lanes_add(acc + r * d, d, lanes_of(v_bits), o + r * d);
        }
        free(mem);
    }
    return failed ? -1 : 0;
}
