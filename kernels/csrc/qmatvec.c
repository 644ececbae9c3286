#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* out[j, r] = sum_g scale[r, g] * sum_{c in group g} code[r, c] * x[j, c]: a product with a weight's int8 or int4
   copy (one scale per `group` columns), for the activation-sparse MLP's gate predictor. At one token it should cost
   what reading the codes costs (a quarter / an eighth of the fp32 weight's bytes), so the int -> float conversion
   must keep up: compilers vectorize the plain loop poorly (128-bit lanes, a horizontal sum per group: as slow as
   the fp32 product), hence AVX-512 / AVX2 intrinsics with vector partial sums per group; the plain loop remains
   for other CPUs. int4 layout: in each group, byte b holds column b in its low nibble and column b + group / 2 in
   its high nibble, each as value + 8. */

static float dot_int8_plain(const int8_t* q, const float* x, int64_t n) {
    float a = 0.f;
    for (int64_t c = 0; c < n; ++c) a += (float)q[c] * x[c];
    return a;
}

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vset(float s) { return _mm512_set1_ps(s); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vint8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }  /* 16 codes */
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vset(float s) { return _mm256_set1_ps(s); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vec vint8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }  /* low 8 codes */
#endif

#ifdef LANES
/* two vectors of 16 codes' products: 16 int8 codes in b against x[0..16) */
static inline void fma16(__m128i b, const float* x, vec* p0, vec* p1) {
#if LANES == 16
    *p0 = vfma(vint8(b), vload(x), *p0);
#else
    *p0 = vfma(vint8(b), vload(x), *p0);
    *p1 = vfma(vint8(_mm_unpackhi_epi64(b, b)), vload(x + 8), *p1);
#endif
}
#endif

void qmatvec_int8(const int8_t* q, const float* scale, int64_t n, int64_t d, int64_t group, const float* x,
                  int64_t ldx, int64_t t, float* out, int64_t ldo, int nthreads) {
    int64_t groups = d / group;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const int8_t* qr = q + r * d;
        const float* sr = scale + r * groups;
        for (int64_t j = 0; j < t; ++j) {
            const float* xj = x + j * ldx;
            float total = 0.f;
#ifdef LANES
            vec acc = vzero();
#endif
            for (int64_t g = 0; g < groups; ++g) {
                const int8_t* qg = qr + g * group;
                const float* xg = xj + g * group;
                int64_t c = 0;
#ifdef LANES
                vec p0 = vzero(), p1 = vzero();
                for (; c + 32 <= group; c += 32) {
                    fma16(_mm_loadu_si128((const __m128i*)(qg + c)), xg + c, &p0, &p1);
                    fma16(_mm_loadu_si128((const __m128i*)(qg + c + 16)), xg + c + 16, &p1, &p0);
                }
                acc = vfma(vset(sr[g]), vadd(p0, p1), acc);
#endif
                total += sr[g] * dot_int8_plain(qg + c, xg + c, group - c);
            }
#ifdef LANES
            total += vsum(acc);
#endif
            out[j * ldo + r] = total;
        }
    }
}

void qmatvec_int4(const uint8_t* q, const float* scale, int64_t n, int64_t d, int64_t group, const float* x,
                  int64_t ldx, int64_t t, float* out, int64_t ldo, int nthreads) {
    int64_t groups = d / group, half = group / 2;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t* qr = q + r * (d / 2);
        const float* sr = scale + r * groups;
        for (int64_t j = 0; j < t; ++j) {
            const float* xj = x + j * ldx;
            float total = 0.f;
#ifdef LANES
            vec acc = vzero();
            const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
#endif
            for (int64_t g = 0; g < groups; ++g) {
                const uint8_t* qg = qr + g * half;
                const float* xg = xj + g * group;
                int64_t c = 0;
#ifdef LANES
                vec p0 = vzero(), p1 = vzero();
                for (; c + 16 <= half; c += 16) {
                    __m128i b = _mm_loadu_si128((const __m128i*)(qg + c));
                    fma16(_mm_sub_epi8(_mm_and_si128(b, low), eight), xg + c, &p0, &p1);
                    fma16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low), eight), xg + half + c, &p1, &p0);
                }
                acc = vfma(vset(sr[g]), vadd(p0, p1), acc);
#endif
                /* the tail: columns c..half of the low half and their partners in the high half */
                float a = 0.f;
                for (int64_t k = c; k < half; ++k)
                    a += (float)((int)(qg[k] & 15) - 8) * xg[k] + (float)((int)(qg[k] >> 4) - 8) * xg[k + half];
                total += sr[g] * a;
            }
#ifdef LANES
            total += vsum(acc);
#endif
            out[j * ldo + r] = total;
        }
    }
}
