#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* The activation-sparse MLP's gate predictor: out[j, r] = sum_g sw[r, g] * sx[j, g] * sum_{c in g} code[r, c] *
   xq[j, c], a product of a weight's int8 / int4 copy (one scale sw per `group` columns) with x rounded to int8 per
   token and group (sx = max |x| / 127 over the group, round half to even): integer products, so every path (AVX-512
   VNNI, the float vector loop, plain C, the torch reference) sums the same integers. At one token it should cost
   what reading the codes costs (a quarter / an eighth of the fp32 weight's bytes); compilers vectorize the plain
   loop poorly (128-bit lanes, a horizontal sum per group: as slow as the fp32 product), hence intrinsics.
   int4 layout: in each group, byte b holds column b in its low nibble and column b + group / 2 in its high nibble,
   each as value + 8 (unsigned, as vpdpbusd wants one operand).
   Each row prefetches (into L2) the row PREFETCH_BYTES ahead: the hardware prefetcher alone leaves the loop
   waiting on DRAM at every few pages (int4 14336 x 4096, cache flushed before each call, one core: 3.4 ms ->
   2.8 ms; the codes are ~29 MB; a simple stream over as many bytes takes 2.5 ms). */

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 16384
#endif

static inline void prefetch_row(const void* row, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char*)row + b, 0, 1);
}

typedef struct {
    int8_t* q;      /* [t, d] x rounded */
    float* f;       /* [t, d] the same integers as floats (the float loop's operand) */
    float* scale;   /* [t, groups] */
    float* sum;     /* [t, groups] sum of the rounded values */
} rounded_x;

static int round_x(const float* x, int64_t ldx, int64_t t, int64_t d, int64_t group, rounded_x* r) {
    int64_t groups = d / group;
    r->q = malloc(t * d);
    r->f = malloc(t * d * sizeof(float));
    r->scale = malloc(t * groups * sizeof(float));
    r->sum = malloc(t * groups * sizeof(float));
    if (!r->q || !r->f || !r->scale || !r->sum) return 0;
    for (int64_t j = 0; j < t; ++j)
        for (int64_t g = 0; g < groups; ++g) {
            const float* xg = x + j * ldx + g * group;
            float m = 0.f;
            for (int64_t c = 0; c < group; ++c) m = fmaxf(m, fabsf(xg[c]));
            float s = m > 0.f ? m / 127.f : 1.f;
            int32_t sum = 0;
            for (int64_t c = 0; c < group; ++c) {
                int v = (int)nearbyintf(xg[c] / s);
                v = v > 127 ? 127 : v < -127 ? -127 : v;
                r->q[j * d + g * group + c] = (int8_t)v;
                r->f[j * d + g * group + c] = (float)v;
                sum += v;
            }
            r->scale[j * groups + g] = s;
            r->sum[j * groups + g] = (float)sum;
        }
    return 1;
}

static void free_x(rounded_x* r) { free(r->q); free(r->f); free(r->scale); free(r->sum); }

/* sum over one group of code * x (x: the rounded integers as floats; exact: integer products and sums < 2^24);
   int4 codes still carry their + 8 */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 codes8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }  /* low 8 bytes */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

static float group_dot_int8(const int8_t* q, const float* x, int64_t group) {
    int64_t c = 0;
    float a = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
    for (; c + 16 <= group; c += 16) {
        __m128i b = _mm_loadu_si128((const __m128i*)(q + c));
        p0 = _mm256_fmadd_ps(codes8(b), _mm256_loadu_ps(x + c), p0);
        p1 = _mm256_fmadd_ps(codes8(_mm_unpackhi_epi64(b, b)), _mm256_loadu_ps(x + c + 8), p1);
    }
    a = hsum(_mm256_add_ps(p0, p1));
#endif
    for (; c < group; ++c) a += (float)q[c] * x[c];
    return a;
}

static float group_dot_int4(const uint8_t* q, const float* x, int64_t half) {
    int64_t c = 0;
    float a = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    const __m128i low = _mm_set1_epi8(15);
    __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
    for (; c + 16 <= half; c += 16) {
        __m128i b = _mm_loadu_si128((const __m128i*)(q + c));
        __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        p0 = _mm256_fmadd_ps(codes8(lo), _mm256_loadu_ps(x + c), p0);
        p1 = _mm256_fmadd_ps(codes8(_mm_unpackhi_epi64(lo, lo)), _mm256_loadu_ps(x + c + 8), p1);
        p0 = _mm256_fmadd_ps(codes8(hi), _mm256_loadu_ps(x + half + c), p0);
        p1 = _mm256_fmadd_ps(codes8(_mm_unpackhi_epi64(hi, hi)), _mm256_loadu_ps(x + half + c + 8), p1);
    }
    a = hsum(_mm256_add_ps(p0, p1));
#endif
    for (; c < half; ++c) a += (float)(q[c] & 15) * x[c] + (float)(q[c] >> 4) * x[c + half];
    return a;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
/* one row against one token, groups of 128 columns; int4: the 64 bytes of a group are one vector */
static float row_vnni_int4(const uint8_t* q, const int8_t* x, const float* sw, const float* sx, const float* sum,
                           int64_t groups) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc = _mm512_setzero_ps();
    float offset = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
        __m512i b = _mm512_loadu_si512((const void*)(q + g * 64));
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low),
                                          _mm512_loadu_si512((const void*)(x + g * 128)));
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(b, 4), low),
                                  _mm512_loadu_si512((const void*)(x + g * 128 + 64)));
        float s = sw[g] * sx[g];
        acc = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(dot), acc);
        offset += 8.f * s * sum[g];
    }
    return _mm512_reduce_add_ps(acc) - offset;
}

/* the same for four tokens (x: four rows of d bytes): each group's codes are loaded and split into nibbles once */
static void row_vnni_int4_t4(const uint8_t* q, const int8_t* x, int64_t d, const float* sw, const float* sx,
                             const float* sum, int64_t groups, float* out, int64_t ldo) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float offset[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t g = 0; g < groups; ++g) {
        __m512i b = _mm512_loadu_si512((const void*)(q + g * 64));
        __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        for (int j = 0; j < 4; ++j) {
            const int8_t* xj = x + j * d + g * 128;
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void*)xj));
            dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void*)(xj + 64)));
            float s = sw[g] * sx[j * groups + g];
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(dot), acc[j]);
            offset[j] += 8.f * s * sum[j * groups + g];
        }
    }
    for (int j = 0; j < 4; ++j) out[j * ldo] = _mm512_reduce_add_ps(acc[j]) - offset[j];
}

/* int8: vpdpbusd multiplies unsigned by signed bytes, so x goes in as x + 128 and sum(code) * 128 comes off */
static float row_vnni_int8(const int8_t* q, const uint8_t* xu, const float* sw, const float* sx, int64_t groups) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512i dot = _mm512_setzero_si512(), codes = _mm512_setzero_si512();
        for (int64_t c = 0; c < 128; c += 64) {
            __m512i w = _mm512_loadu_si512((const void*)(q + g * 128 + c));
            dot = _mm512_dpbusd_epi32(dot, _mm512_loadu_si512((const void*)(xu + g * 128 + c)), w);
            codes = _mm512_dpbusd_epi32(codes, ones, w);
        }
        dot = _mm512_sub_epi32(dot, _mm512_slli_epi32(codes, 7));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(sw[g] * sx[g]), _mm512_cvtepi32_ps(dot), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#endif

#if !defined(HAVE_VNNI) && defined(__AVX2__) && defined(__FMA__)
#define HAVE_AVX2_INT 1
/* AVX2 without VNNI (e.g. AMD Zen 2/3): integer products with vpmaddubsw, which multiplies unsigned by signed bytes
   into saturating 16-bit pair sums. int8: |code| as the unsigned operand and x times the code's sign as the signed
   one (the sign trick), so a pair sums to at most 2 * 128 * 127 < 2^15: exact. int4: the nibbles (value + 8, at most
   15) are unsigned already. Converting the codes to floats instead (group_dot_int8) ran at ~6 GB/s of codes on one
   core, a quarter of what the fp32 product streams: compute-bound. Groups of a multiple of 32 columns. */
static inline __m256i dot_pairs(__m256i unsigned_bytes, __m256i signed_bytes, __m256i acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned_bytes, signed_bytes), ones));
}

static float row_avx2_int8(const int8_t* q, const int8_t* x, const float* sw, const float* sx, int64_t groups,
                           int64_t group) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m256i dot = _mm256_setzero_si256();
        for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
            __m256i w = _mm256_loadu_si256((const __m256i*)(q + c));
            __m256i v = _mm256_loadu_si256((const __m256i*)(x + c));
            dot = dot_pairs(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w), dot);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(sw[g] * sx[g]), _mm256_cvtepi32_ps(dot), acc);
    }
    return hsum(acc);
}

/* int4 (layout above: byte b of a group holds columns b and b + group / 2); the + 8 comes off through sum(x) */
static float row_avx2_int4(const uint8_t* q, const int8_t* x, const float* sw, const float* sx, const float* sum,
                           int64_t groups, int64_t group) {
    const __m256i low = _mm256_set1_epi8(15);
    int64_t half = group / 2;
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
        __m256i dot = _mm256_setzero_si256();
        const int8_t* xg = x + g * group;
        for (int64_t c = 0; c < half; c += 32) {
            __m256i b = _mm256_loadu_si256((const __m256i*)(q + g * half + c));
            dot = dot_pairs(_mm256_and_si256(b, low), _mm256_loadu_si256((const __m256i*)(xg + c)), dot);
            dot = dot_pairs(_mm256_and_si256(_mm256_srli_epi16(b, 4), low),
                            _mm256_loadu_si256((const __m256i*)(xg + half + c)), dot);
        }
        float s = sw[g] * sx[g];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(dot), acc);
        offset += 8.f * s * sum[g];
    }
    return hsum(acc) - offset;
}
#endif

void qmatvec_int8(const int8_t* q, const float* scale, int64_t n, int64_t d, int64_t group, const float* x,
                  int64_t ldx, int64_t t, float* out, int64_t ldo, int nthreads) {
    int64_t groups = d / group;
    rounded_x rx;
    if (!round_x(x, ldx, t, d, group, &rx)) { free_x(&rx); return; }
#ifdef HAVE_VNNI
    uint8_t* xu = NULL;
    if (group == 128 && (xu = malloc(t * d)))
        for (int64_t i = 0; i < t * d; ++i) xu[i] = (uint8_t)(rx.q[i] + 128);
#endif
    int64_t ahead = PREFETCH_BYTES / d + 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        if (r + ahead < n) prefetch_row(q + (r + ahead) * d, d);
        const int8_t* qr = q + r * d;
        const float* sr = scale + r * groups;
        for (int64_t j = 0; j < t; ++j) {
            const float* sx = rx.scale + j * groups;
#ifdef HAVE_VNNI
            if (xu) { out[j * ldo + r] = row_vnni_int8(qr, xu + j * d, sr, sx, groups); continue; }
#endif
#ifdef HAVE_AVX2_INT
            if (group % 32 == 0) {
                out[j * ldo + r] = row_avx2_int8(qr, rx.q + j * d, sr, sx, groups, group);
                continue;
            }
#endif
            float total = 0.f;
            for (int64_t g = 0; g < groups; ++g)
                total += sr[g] * sx[g] * group_dot_int8(qr + g * group, rx.f + j * d + g * group, group);
            out[j * ldo + r] = total;
        }
    }
#ifdef HAVE_VNNI
    free(xu);
#endif
    free_x(&rx);
}

void qmatvec_int4(const uint8_t* q, const float* scale, int64_t n, int64_t d, int64_t group, const float* x,
                  int64_t ldx, int64_t t, float* out, int64_t ldo, int nthreads) {
    int64_t groups = d / group, half = group / 2;
    rounded_x rx;
    if (!round_x(x, ldx, t, d, group, &rx)) { free_x(&rx); return; }
    int64_t ahead = PREFETCH_BYTES / (d / 2) + 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        if (r + ahead < n) prefetch_row(q + (r + ahead) * (d / 2), d / 2);
        const uint8_t* qr = q + r * (d / 2);
        const float* sr = scale + r * groups;
        int64_t j = 0;
#ifdef HAVE_VNNI
        if (group == 128)  /* four tokens per pass over the row's codes, then one at a time */
            for (; j + 4 <= t; j += 4)
                row_vnni_int4_t4(qr, rx.q + j * d, d, sr, rx.scale + j * groups, rx.sum + j * groups, groups,
                                 out + j * ldo + r, ldo);
#endif
        for (; j < t; ++j) {
            const float* sx = rx.scale + j * groups;
            const float* sum = rx.sum + j * groups;
#ifdef HAVE_VNNI
            if (group == 128) { out[j * ldo + r] = row_vnni_int4(qr, rx.q + j * d, sr, sx, sum, groups); continue; }
#endif
#ifdef HAVE_AVX2_INT
            if (group % 64 == 0) {
                out[j * ldo + r] = row_avx2_int4(qr, rx.q + j * d, sr, sx, sum, groups, group);
                continue;
            }
#endif
            float total = 0.f;
            for (int64_t g = 0; g < groups; ++g)
                total += sr[g] * sx[g] * (group_dot_int4(qr + g * half, rx.f + j * d + g * group, half) - 8.f * sum[g]);
            out[j * ldo + r] = total;
        }
    }
    free_x(&rx);
}
