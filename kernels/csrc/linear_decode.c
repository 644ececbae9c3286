/* Decoding steps of the linearized attention layers (linearize/attention.py, linearize/mom.py) on the CPU, for every
   (batch row, KV head) in one call: linear_decode_step (GLA / HGRN2 gates, the hybrid's window), mom_decode_step
   and gsa_decode_step below. linear_decode_step: the gated recurrence updated in place, its read-out (optionally
   normalized), and, for the Liger Attention hybrid, the sliding-window softmax branch over the ring buffer of the
   last W - 1 tokens plus the new one, whose key/value then replace the oldest slot. The torch path (kernels/gla.py
   gla_step, kernels/window_attention.py, LinearizedLayer.store) spends ~40 small ops per layer on this; at a decode
   step of a small model that fixed cost, not the arithmetic, decides the speed.

   Per (b, h), with G query heads per KV head, K = key dim, V = value columns of the state (+1 when normalized: the
   ones column carrying z_t):
     valid token: S = diag(exp(g)) S + phi(k)^T v;   padding: S unchanged (its k, v, gate are zero)
     o_i = phi(q_i) S;  normalized: o_i[:V-1] / max(o_i[V-1], 1e-6)
     hybrid: w_i = softmax over the valid slots and the new key (if valid) of q_rot_i . k * scale, mixing values;
             out_i = alpha * o_i + beta * w_i (w_i = 0 when nothing is visible) */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* One SIMD register of floats (GCC/Clang vector extensions): 8 with AVX, else 4 (SSE, NEON); aligned(4) so a
   pointer into any float array may be read through it. */
#ifdef __AVX__
#define LANES 8
#else
#define LANES 4
#endif
typedef float f32xN __attribute__((vector_size(4 * LANES), aligned(4)));

/* e^x, vectorizable inside `omp simd` loops (libm's expf is a call per element): x = n ln2 + r with |r| <= ln2 / 2,
   a degree-6 polynomial for e^r (Cephes' coefficients), 2^n built in the exponent bits: within 1 ulp of e^x over
   every float in [-87.3, 88.7] without FMA, 1.02 ulp with it (checked against double exp); below -87.3 it returns
   0 (no denormals), above 88.7 +inf, NaN stays NaN. */
static inline float exp_vec(float x) {
    float y = x < -87.33654f ? -87.33654f : x;  /* (fminf/fmaxf are libm calls: no vector loop around them) */
    y = y > 88.72284f ? 88.72284f : y;
    /* n = round(y / ln2) by the 1.5 * 2^23 trick (floorf is a libm call unless traps are off) */
    float n = (y * 1.44269504f + 12582912.f) - 12582912.f;
    float r = y - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t ni = (int32_t)n, top = ni > 127;  /* n = 128 (x near ln FLT_MAX): 2^127, then times 2 */
    union { int32_t i; float f; } scale;  /* (a union, not memcpy: GCC vectorizes it) */
    scale.i = (ni - top + 127) << 23;
    float e = x < -87.33654f ? 0.f : p * scale.f * (top ? 2.f : 1.f);
    return x != x ? x : e;
}

/* y[i] = exp_vec(x[i]): exported so that tests compare it with a float64 exp over its whole range */
void exp_vec_array(const float* x, int64_t n, float* y) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = exp_vec(x[i]);
}

/* out[:n] (+)= w * x S for x [K] and S [K, n] (row stride `stride`): 8 registers of columns at a time, held over
   all K rows (a read-modify-write of out per row would wait on its own stores); the rest column by column. */
static inline void vec_mat(const float* x, const float* s, int64_t k_dim, int64_t n, int64_t stride, float w,
                           int add, float* out) {
    int64_t c0 = 0;
    for (; c0 + 8 * LANES <= n; c0 += 8 * LANES) {
        f32xN acc[8] = {0};
        for (int64_t d = 0; d < k_dim; ++d) {
            const f32xN* row = (const f32xN*)(s + d * stride + c0);
            float xd = x[d];
            for (int j = 0; j < 8; ++j) acc[j] += xd * row[j];
        }
        f32xN* o = (f32xN*)(out + c0);
        for (int j = 0; j < 8; ++j) o[j] = add ? o[j] + w * acc[j] : w * acc[j];
    }
    for (int64_t c = c0; c < n; ++c) {
        float acc = 0.f;
        for (int64_t d = 0; d < k_dim; ++d) acc += x[d] * s[d * stride + c];
        out[c] = add ? out[c] + w * acc : w * acc;
    }
}

static inline float dotf(const float* x, const float* y, int64_t n) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
    return acc;
}

/* softmax of x [n] into y */
static inline void softmax_into(const float* x, int64_t n, float* y) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t i = 0; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
    #pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < n; ++i) { y[i] = exp_vec(x[i] - mx); sum += y[i]; }
    float inv = 1.f / sum;
    for (int64_t i = 0; i < n; ++i) y[i] *= inv;
}

/* sum over i of log1p(e^-|x_i|) (logsigmoid(x) = min(x, 0) - log1p(e^-|x|)) as the log of products of 64 terms
   (each in (1, 2]: at most 2^64), one logf per 64 terms instead of a log1pf each */
static inline float sum_log1p_exp_neg_abs(const float* x, int64_t n) {
    float total = 0.f;
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        int64_t end = i0 + 64 < n ? i0 + 64 : n;
        float prod = 1.f;
        #pragma omp simd reduction(*:prod)
        for (int64_t i = i0; i < end; ++i) prod *= 1.f + exp_vec(x[i] < 0.f ? x[i] : -x[i]);
        total += logf(prod);
    }
    return total;
}

/* log(sigmoid(x)) without overflow: min(x, 0) - log1p(exp(-|x|)) */
static inline float log_sigmoid(float x) { return fminf(x, 0.f) - log1pf(expf(-fabsf(x))); }

/* x cos + rotate_half(x) sin into y [d]: rotate_half(x) = (-x[d/2:], x[:d/2]) */
static inline void rope_into(const float* x, const float* cos, const float* sin, int64_t d, float* y) {
    int64_t half = d / 2;
    for (int64_t c = 0; c < half; ++c) y[c] = x[c] * cos[c] - x[c + half] * sin[c];
    for (int64_t c = half; c < d; ++c) y[c] = x[c] * cos[c] + x[c - half] * sin[c];
}

/* From the raw projections q [B, Hq, K], k [B, H, K], v [B, H, V] (before RoPE); state [B, H, K, VS]
   (VS = V + normalize); q_rot [B, Hq, D], k_rot [B, H, D], or, when rope_cos is given, NULL: the step rotates q
   and k itself, x cos + rotate_half(x) sin with rope_cos, rope_sin [B, D] (D = K; Llama's RoPE, which the module
   checked its model's function computes); ring_k [B, H, S, D], ring_v [B, H, S, V], ring_valid [B, S] (uint8);
   new_valid [B] (uint8, NULL: all valid); slots S = 0: no window branch. out [B, Hq, V].
   The step applies Liger's feature map itself (linearize/attention.py `features`), gate 1 (GLA) or 2 (HGRN2):
   phi = softmax over K for q and for GLA's k, HGRN2's phi(k) = 1 - sigmoid(k); log-gate = logsigmoid(k) / 16
   (GLA) or logsigmoid(k) (HGRN2); the normalized state's ones column appended to v. */
int linear_decode_step(const float* q, const float* k, const float* v, float* state, int64_t b_size,
                       int64_t h_size, int64_t groups, int64_t k_dim, int64_t vs_dim, int normalize, int gate,
                       const float* q_rot, const float* k_rot, const float* rope_cos, const float* rope_sin,
                       float* ring_k, float* ring_v, uint8_t* ring_valid, int64_t slots, int64_t slot,
                       int64_t d_rot, const uint8_t* new_valid, float alpha, float beta, float scale, float* out,
                       int nthreads) {
    int64_t v_dim = vs_dim - (normalize ? 1 : 0), pairs = b_size * h_size;
    int failed = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(|:failed)
    for (int64_t bh = 0; bh < pairs; ++bh) {
        int64_t b = bh / h_size;
        int valid = new_valid ? new_valid[b] != 0 : 1;
        float* s = state + bh * k_dim * vs_dim;
        /* [vs_dim] read-out, [slots + 1] window weights, phi(k), log-gate, v ++ 1, phi(q), rotated q and k */
        float* tmp = (float*)malloc(sizeof(float) * (size_t)(2 * vs_dim + slots + 1 + 3 * k_dim + 2 * d_rot));
        if (!tmp) { failed = 1; continue; }
        float* p = tmp + vs_dim;
        float* pk = p + slots + 1;
        float* g = pk + k_dim;
        float* vv = g + k_dim;
        float* pq = vv + vs_dim;
        float* qr_buf = pq + k_dim;
        float* kr_buf = qr_buf + d_rot;
        const float* kr = k + bh * k_dim;
        const float* k_new = slots == 0 ? NULL : k_rot ? k_rot + bh * d_rot : kr_buf;  /* the new key, rotated */
        if (slots && !k_rot) rope_into(kr, rope_cos + b * d_rot, rope_sin + b * d_rot, d_rot, kr_buf);
        if (gate == 1) {
            softmax_into(kr, k_dim, pk);
            for (int64_t d = 0; d < k_dim; ++d) g[d] = log_sigmoid(kr[d]) * (1.f / 16.f);
        } else {
            for (int64_t d = 0; d < k_dim; ++d) { pk[d] = 1.f / (1.f + expf(kr[d])); g[d] = log_sigmoid(kr[d]); }
        }
        for (int64_t c = 0; c < v_dim; ++c) vv[c] = v[bh * v_dim + c];
        if (normalize) vv[v_dim] = 1.f;
        if (valid) {
            for (int64_t d = 0; d < k_dim; ++d) {
                float decay = expf(g[d]), kd = pk[d];
                float* row = s + d * vs_dim;
                #pragma omp simd
                for (int64_t c = 0; c < vs_dim; ++c) row[c] = decay * row[c] + kd * vv[c];
            }
        }
        for (int64_t i = 0; i < groups; ++i) {
            int64_t qh = bh * groups + i;
            softmax_into(q + qh * k_dim, k_dim, pq);
            vec_mat(pq, s, k_dim, vs_dim, vs_dim, 1.f, 0, tmp);
            float* o = out + qh * v_dim;
            float inv = 1.f;
            if (normalize) inv = 1.f / fmaxf(tmp[v_dim], 1e-6f);
            for (int64_t c = 0; c < v_dim; ++c) o[c] = tmp[c] * inv;
            if (slots == 0) continue;
            /* window branch: the slots (any order: one new token sees them all) and the new key */
            const float* qr = q_rot ? q_rot + qh * d_rot : qr_buf;
            if (!q_rot) rope_into(q + qh * k_dim, rope_cos + b * d_rot, rope_sin + b * d_rot, d_rot, qr_buf);
            const float* rk = ring_k + bh * slots * d_rot;
            const float* rv = ring_v + bh * slots * v_dim;
            const uint8_t* rvalid = ring_valid + b * slots;
            float mx = -INFINITY;
            for (int64_t j = 0; j < slots; ++j) {
                p[j] = rvalid[j] ? dotf(qr, rk + j * d_rot, d_rot) * scale : -INFINITY;
                mx = p[j] > mx ? p[j] : mx;
            }
            p[slots] = valid ? dotf(qr, k_new, d_rot) * scale : -INFINITY;
            mx = p[slots] > mx ? p[slots] : mx;
            for (int64_t c = 0; c < v_dim; ++c) o[c] *= alpha;
            if (mx == -INFINITY) continue;  /* nothing visible: the window branch adds zeros */
            float sum = 0.f;
            for (int64_t j = 0; j <= slots; ++j) { p[j] = p[j] == -INFINITY ? 0.f : expf(p[j] - mx); sum += p[j]; }
            float w = beta / sum;
            for (int64_t j = 0; j < slots; ++j) {
                if (p[j] == 0.f) continue;
                float pj = p[j] * w;
                const float* vj = rv + j * v_dim;
                #pragma omp simd
                for (int64_t c = 0; c < v_dim; ++c) o[c] += pj * vj[c];
            }
            if (valid) {
                float pn = p[slots] * w;
                const float* vn = v + bh * v_dim;
                #pragma omp simd
                for (int64_t c = 0; c < v_dim; ++c) o[c] += pn * vn[c];
            }
        }
        if (slots) {  /* the new token replaces the oldest slot (a padding token is stored as zeros, invalid) */
            float* dk = ring_k + (bh * slots + slot) * d_rot;
            float* dv = ring_v + (bh * slots + slot) * v_dim;
            const float* sv = v + bh * v_dim;
            for (int64_t c = 0; c < d_rot; ++c) dk[c] = valid ? k_new[c] : 0.f;  /* (as the torch path: a NaN in a
               padding row's key never reaches a later blocked attention, where a masked NaN still poisons) */
            for (int64_t c = 0; c < v_dim; ++c) dv[c] = valid ? sv[c] : 0.f;
        }
        free(tmp);
    }
    /* after every head has read the old slot: the validity row is shared by a batch row's heads */
    for (int64_t b = 0; slots && b < b_size; ++b) ring_valid[b * slots + slot] = new_valid ? (new_valid[b] != 0) : 1;
    return failed ? -1 : 0;
}

/* Which memories row b's token reads and writes, from its router logits [M]: the shared memory (if any, index 0,
   weight 1) and the top_k routed ones by softmax probability (ties: the lower index), weighted by their
   probabilities renormalized over the chosen (linearize/mom.py top_k_routing). mix [M1] (0: not chosen), active
   [M1] (a chosen memory is written even where its weight underflows to 0). */
static void mom_route(const float* logits, int64_t memories, int shared, int64_t top_k, float* mix, uint8_t* active) {
    float* routed = mix + shared;
    uint8_t* chosen = active + shared;
    if (shared) { mix[0] = 1.f; active[0] = 1; }
    softmax_into(logits, memories, routed);
    for (int64_t m = 0; m < memories; ++m) chosen[m] = 0;
    float total = 0.f;
    for (int64_t t = 0; t < top_k && t < memories; ++t) {
        int64_t best = -1;
        for (int64_t m = 0; m < memories; ++m)
            if (!chosen[m] && (best < 0 || routed[m] > routed[best])) best = m;
        chosen[best] = 1;
        total += routed[best];
    }
    for (int64_t m = 0; m < memories; ++m) routed[m] = chosen[m] ? routed[m] / total : 0.f;
}

/* One decoding step of a Mixture-of-Memories layer (linearize/mom.py), from the raw projections q [B, Hq, K],
   k [B, H, K], v [B, H, V] (before RoPE), the write-strength logits beta_logit [B, H] and the router logits
   [B, M] (the step applies the features and the routing itself: ~20 small torch ops per layer fewer):
     phi(q) = softmax(q);  key = phi(k) / |phi(k)| (gate 1, GLA: phi = softmax; gate 2, HGRN2: phi = 1 - sigmoid);
     log a = mean over K of logsigmoid(k) (/ 16 for GLA);  beta = sigmoid(beta_logit);
   per (b, h), every active memory m (the shared one and the routed ones) takes the gated delta-rule step
     S_m = a S_m + key (beta (v - key^T a S_m))^T
   (padding or an unrouted memory: S_m unchanged), and out = out_scale * sum_m mix_m phi(q) S_m.
   state [B, M1, H, K, V] (in place; M1 = M + shared); new_valid [B] (uint8, NULL: all valid); out [B, Hq, V]. */
int mom_decode_step(const float* q, const float* k, const float* v, const float* beta_logit,
                    const float* router_logits, float* state, int64_t b_size, int64_t memories, int shared,
                    int64_t top_k, int gate, int64_t h_size, int64_t groups, int64_t k_dim, int64_t v_dim,
                    const uint8_t* new_valid, float out_scale, float* out, int nthreads) {
    int64_t pairs = b_size * h_size, m1 = memories + (shared ? 1 : 0);
    float* mix = (float*)malloc(sizeof(float) * (size_t)(b_size * m1));
    uint8_t* active = (uint8_t*)malloc((size_t)(b_size * m1));
    if (!mix || !active) { free(mix); free(active); return -1; }
    for (int64_t b = 0; b < b_size; ++b)
        mom_route(router_logits + b * memories, memories, shared, top_k, mix + b * m1, active + b * m1);
    int failed = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(|:failed)
    for (int64_t bh = 0; bh < pairs; ++bh) {
        int64_t b = bh / h_size, h = bh % h_size;
        int valid = new_valid ? new_valid[b] != 0 : 1;
        /* [V] correction, [K] unit key, [groups * K] phi(q) */
        float* corr = (float*)malloc(sizeof(float) * (size_t)(v_dim + k_dim + groups * k_dim));
        if (!corr) { failed = 1; continue; }
        float* key = corr + v_dim;
        float* pq = key + k_dim;
        const float* kr = k + bh * k_dim;
        float low = 0.f, norm = 0.f;
        if (gate == 1) softmax_into(kr, k_dim, key);
        else {
            #pragma omp simd
            for (int64_t d = 0; d < k_dim; ++d) key[d] = 1.f / (1.f + exp_vec(kr[d]));
        }
        #pragma omp simd reduction(+:low, norm)
        for (int64_t d = 0; d < k_dim; ++d) {
            low += kr[d] < 0.f ? kr[d] : 0.f;
            norm += key[d] * key[d];
        }
        float log_a = (low - sum_log1p_exp_neg_abs(kr, k_dim)) / (float)k_dim * (gate == 1 ? 1.f / 16.f : 1.f);
        norm = 1.f / fmaxf(sqrtf(norm), 1e-12f);
        for (int64_t d = 0; d < k_dim; ++d) key[d] *= norm;
        float a = expf(log_a), bt = 1.f / (1.f + expf(-beta_logit[bh]));
        for (int64_t i = 0; i < groups; ++i) softmax_into(q + (bh * groups + i) * k_dim, k_dim, pq + i * k_dim);
        for (int64_t i = 0; i < groups * v_dim; ++i) out[bh * groups * v_dim + i] = 0.f;
        const float* vh = v + bh * v_dim;
        for (int64_t m = 0; m < m1; ++m) {
            float* s = state + ((b * m1 + m) * h_size + h) * k_dim * v_dim;
            if (valid && active[b * m1 + m]) {
                vec_mat(key, s, k_dim, v_dim, v_dim, 1.f, 0, corr);
                for (int64_t c = 0; c < v_dim; ++c) corr[c] = bt * (vh[c] - a * corr[c]);
                for (int64_t d = 0; d < k_dim; ++d) {
                    float kd = key[d];
                    float* row = s + d * v_dim;
                    #pragma omp simd
                    for (int64_t c = 0; c < v_dim; ++c) row[c] = a * row[c] + kd * corr[c];
                }
            }
            float w = mix[b * m1 + m] * out_scale;
            if (w == 0.f) continue;
            for (int64_t i = 0; i < groups; ++i)
                vec_mat(pq + i * k_dim, s, k_dim, v_dim, v_dim, w, 1, out + (bh * groups + i) * v_dim);
        }
        free(corr);
    }
    free(mix);
    free(active);
    return failed ? -1 : 0;
}

/* mom_decode_step over `tokens` tokens, one after the other (a prompt without gradients): q [T, B, Hq, K],
   k [T, B, H, K], v [T, B, H, V], beta_logit [T, B, H], router_logits [T, B, M], new_valid [T, B] or NULL,
   out [T, B, Hq, V]; the state carried in place from token to token. */
int mom_decode_steps(int64_t tokens, const float* q, const float* k, const float* v, const float* beta_logit,
                     const float* router_logits, float* state, int64_t b_size, int64_t memories, int shared,
                     int64_t top_k, int gate, int64_t h_size, int64_t groups, int64_t k_dim, int64_t v_dim,
                     const uint8_t* new_valid, float out_scale, float* out, int nthreads) {
    int64_t hq = h_size * groups;
    for (int64_t t = 0; t < tokens; ++t) {
        int status = mom_decode_step(q + t * b_size * hq * k_dim, k + t * b_size * h_size * k_dim,
                                     v + t * b_size * h_size * v_dim, beta_logit + t * b_size * h_size,
                                     router_logits + t * b_size * memories, state, b_size, memories, shared, top_k,
                                     gate, h_size, groups, k_dim, v_dim, new_valid ? new_valid + t * b_size : NULL,
                                     out_scale, out + t * b_size * hq * v_dim, nthreads);
        if (status) return status;
    }
    return 0;
}

/* One decoding step of gated slot attention (kernels/gsa.py; Liger's GSA gate) from the raw projections q [B, Hq, K],
   k [B, H, K], v [B, H, V]: the step applies the features itself (linearize/attention.py `features`):
     phi(q) = softmax(q), phi(k) = softmax(k); slot log-gate g_j = the mean of logsigmoid(k) / 16 over dimensions
     [floor(j K / M), ceil((j + 1) K / M)) (torch's adaptive average pooling, K not necessarily a multiple of M).
   Per (b, h), state [M, K + V] packs the slot keys (row j: K_t[:, j]) and slot values (row j: V_t[j]);
   a = exp(g), s = 1 - a:
     slot j: key_j = a_j key_j + s_j phi(k),  value_j = a_j value_j + s_j v   (padding: unchanged)
     o_i = softmax_j(phi(q_i) . key_j) value_j.
   state [B, H, M, K + V] (in place); new_valid [B] (uint8, NULL: all valid); out [B, Hq, V]. */
int gsa_decode_step(const float* q, const float* k, const float* v, float* state, int64_t b_size, int64_t h_size,
                    int64_t groups, int64_t k_dim, int64_t v_dim, int64_t slots, const uint8_t* new_valid, float* out,
                    int nthreads) {
    int64_t pairs = b_size * h_size, width = k_dim + v_dim;
    int failed = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(|:failed)
    for (int64_t bh = 0; bh < pairs; ++bh) {
        int64_t b = bh / h_size;
        float* s = state + bh * slots * width;
        /* [M] slot scores, [K] phi(k), [K] phi(q), [K] log-gates per dimension */
        float* p = (float*)malloc(sizeof(float) * (size_t)(slots + 3 * k_dim));
        if (!p) { failed = 1; continue; }
        float* pk = p + slots;
        float* pq = pk + k_dim;
        float* g = pq + k_dim;
        if (!new_valid || new_valid[b]) {
            const float* kr = k + bh * k_dim;
            const float* vh = v + bh * v_dim;
            softmax_into(kr, k_dim, pk);
            for (int64_t d = 0; d < k_dim; ++d) g[d] = log_sigmoid(kr[d]) * (1.f / 16.f);
            for (int64_t j = 0; j < slots; ++j) {
                int64_t lo = j * k_dim / slots, hi = ((j + 1) * k_dim + slots - 1) / slots;
                float mean = 0.f;
                for (int64_t d = lo; d < hi; ++d) mean += g[d];
                float a = expf(mean / (float)(hi - lo)), w = 1.f - a;
                float* row = s + j * width;
                for (int64_t c = 0; c < k_dim; ++c) row[c] = a * row[c] + w * pk[c];
                for (int64_t c = 0; c < v_dim; ++c) row[k_dim + c] = a * row[k_dim + c] + w * vh[c];
            }
        }
        for (int64_t i = 0; i < groups; ++i) {
            softmax_into(q + (bh * groups + i) * k_dim, k_dim, pq);
            float mx = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < slots; ++j) {
                p[j] = dotf(pq, s + j * width, k_dim);
                mx = p[j] > mx ? p[j] : mx;
            }
            for (int64_t j = 0; j < slots; ++j) { p[j] = expf(p[j] - mx); sum += p[j]; }
            float* o = out + (bh * groups + i) * v_dim;
            for (int64_t c = 0; c < v_dim; ++c) o[c] = 0.f;
            for (int64_t j = 0; j < slots; ++j) {
                float w = p[j] / sum;
                const float* vj = s + j * width + k_dim;
                #pragma omp simd
                for (int64_t c = 0; c < v_dim; ++c) o[c] += w * vj[c];
            }
        }
        free(p);
    }
    return failed ? -1 : 0;
}
