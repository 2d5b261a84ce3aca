// The small ops of a decode step on the CPU in float32, one call each instead of the dozen torch ops of
// their references (perfxllm.layers: norm, activation, rotary, attention), whose per-op dispatch costs more
// than their arithmetic at one token. Same math as the references, float32 throughout.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"
#ifdef __AVX2__
#include <immintrin.h>

// e^x for 8 floats, within 2 ulp of expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6
// polynomial, 2^n put into the exponent. Inputs are clamped to [-87.3, 88.4], where 2^n stays a normal float
// (e^x of less comes out as 1.2e-38 instead of smaller or 0); NaN stays NaN.
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-87.3365447504f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
#endif

// s[j] = e^(s[j] - m) for j < n; returns their sum.
static float exp_shifted(float* s, int64_t n, float m) {
    float total = 0.0f;
    int64_t j = 0;
#ifdef __AVX2__
    __m256 sum = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(m)));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    for (int i = 0; i < 8; i++) total += lanes[i];
#endif
    for (; j < n; j++) total += s[j] = expf(s[j] - m);
    return total;
}

#ifdef __AVX2__
// out[j] = scale * (q . k_j) for four rows k_j of d floats (d a multiple of 8): four independent FMA chains.
static inline void dot4(const float* q, const float* const* k, int64_t d, float scale, float* out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + i), a3);
    }
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
    const __m128 total = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
    _mm_storeu_ps(out, _mm_mul_ps(total, _mm_set1_ps(scale)));
}

// o += w[0] v_0 + ... + w[3] v_3 for four rows v_j of d floats (d a multiple of 8).
static inline void axpy4(float* o, const float* w, const float* const* v, int64_t d) {
    const __m256 w0 = _mm256_set1_ps(w[0]), w1 = _mm256_set1_ps(w[1]), w2 = _mm256_set1_ps(w[2]),
                 w3 = _mm256_set1_ps(w[3]);
    for (int64_t i = 0; i < d; i += 8) {
        __m256 acc = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v[0] + i), _mm256_loadu_ps(o + i));
        acc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(v[1] + i), acc);
        acc = _mm256_fmadd_ps(w2, _mm256_loadu_ps(v[2] + i), acc);
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(w3, _mm256_loadu_ps(v[3] + i), acc));
    }
}
#endif

// res_out = x + residual (residual may be NULL: res_out unused), out = res_out * rsqrt(mean(res_out^2) + eps) * w.
void add_rmsnorm_f32(const float* x, const float* residual, const float* w, int64_t rows, int64_t h, float eps,
                     float* out, float* res_out) {
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * h;
        float* hr = residual ? res_out + r * h : (float*)xr;
        if (residual)
            for (int64_t i = 0; i < h; i++) hr[i] = xr[i] + residual[r * h + i];
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < h; i++) ss += hr[i] * hr[i];
        const float inv = 1.0f / sqrtf(ss / h + eps);
        for (int64_t i = 0; i < h; i++) out[r * h + i] = hr[i] * inv * w[i];
    }
}

// gate_up [T, 2I] (gate | up) -> out [T, I] = silu(gate) * up.
void silu_mul_f32(const float* gate_up, int64_t rows, int64_t inter, float* out) {
    for (int64_t r = 0; r < rows; r++) {
        const float* gate = gate_up + r * 2 * inter;
        const float* up = gate + inter;
        float* o = out + r * inter;
        int64_t i = 0;
#ifdef __AVX2__
        for (; i + 8 <= inter; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                                  _mm256_loadu_ps(up + i)));
        }
#endif
        for (; i < inter; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

// Rotates the first `rot_heads` heads of each token's qkv row in place (q then k heads, rotate_half layout,
// cos_sin [positions, D]: cos | sin) and writes its k and v heads into the caches at slots[t] (-1: nowhere).
// qkv [T, (Hq + 2 Hkv) * D]; caches [slots, Hkv * D].
void rope_cache_write_f32(float* qkv, int64_t tokens, int64_t hq, int64_t hkv, int64_t d, const int64_t* positions,
                          const float* cos_sin, const int64_t* slots, float* k_cache, float* v_cache) {
    const int64_t half = d / 2, width = (hq + 2 * hkv) * d;
    for (int64_t t = 0; t < tokens; t++) {
        float* row = qkv + t * width;
        const float* cs = cos_sin + positions[t] * d;
        for (int64_t h = 0; h < hq + hkv; h++) {
            float* x = row + h * d;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = x[i], x2 = x[i + half], c = cs[i], s = cs[half + i];
                x[i] = x1 * c - x2 * s;
                x[i + half] = x2 * c + x1 * s;
            }
        }
        if (slots[t] < 0) continue;  // padding (a CUDA graph's, the start-up step's): no slot
        float* kc = k_cache + slots[t] * hkv * d;
        float* vc = v_cache + slots[t] * hkv * d;
        for (int64_t i = 0; i < hkv * d; i++) {
            kc[i] = row[hq * d + i];
            vc[i] = row[(hq + hkv) * d + i];
        }
    }
}

#define ATTENTION_CHUNK 256  // positions whose scores are computed before they are exponentiated together

// Attention of the `group` query heads q[0..group) of one kv head over positions [start, end) of a sequence,
// into one row of d + 2 floats per head, head h's at rows + h * head_stride: the exponential-weighted sum of
// values (not normalised), then the scores' maximum and the sum of their exponentials. Chunk by chunk:
// the chunk's scores (four positions at a time, every head's before the next four, so that each key is read
// from memory once for the group), their exponentials (8 at a time) against the running maximum, which
// rescales what is summed so far when a chunk raises it, then the weighted values (likewise).
static void attend_part(const float* q, int64_t group, const float* k_cache, const float* v_cache,
                        const int32_t* table, int64_t start, int64_t end, int64_t hkv, int64_t kvh, int64_t d,
                        int64_t block_size, float scale, float* rows, int64_t head_stride) {
    float scores[group][ATTENTION_CHUNK];
    const float* k[ATTENTION_CHUNK];
    const float* v[ATTENTION_CHUNK];
    for (int64_t h = 0; h < group; h++) {
        float* row = rows + h * head_stride;
        for (int64_t i = 0; i < d; i++) row[i] = 0.0f;
        row[d] = -INFINITY;
        row[d + 1] = 0.0f;
    }
    for (int64_t p0 = start; p0 < end; p0 += ATTENTION_CHUNK) {
        const int64_t n = end - p0 < ATTENTION_CHUNK ? end - p0 : ATTENTION_CHUNK;
        for (int64_t j = 0; j < n; j++) {
            const int64_t p = p0 + j, slot = (int64_t)table[p / block_size] * block_size + p % block_size;
            k[j] = k_cache + (slot * hkv + kvh) * d;
            v[j] = v_cache + (slot * hkv + kvh) * d;
        }
        int64_t j = 0;
#ifdef __AVX2__
        if (d % 8 == 0)
            for (; j + 4 <= n; j += 4)
                for (int64_t h = 0; h < group; h++) dot4(q + h * d, k + j, d, scale, scores[h] + j);
#endif
        for (; j < n; j++)
            for (int64_t h = 0; h < group; h++) {
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d; i++) s += q[h * d + i] * k[j][i];
                scores[h][j] = s * scale;
            }
        for (int64_t h = 0; h < group; h++) {
            float* row = rows + h * head_stride;  // row[d]: the running maximum, row[d + 1]: the total
            float chunk_max = -INFINITY;
            for (j = 0; j < n; j++) chunk_max = fmaxf(chunk_max, scores[h][j]);
            if (chunk_max > row[d]) {  // rescale what is summed so far to the new maximum
                const float shrink = expf(row[d] - chunk_max);
                for (int64_t i = 0; i < d; i++) row[i] *= shrink;
                row[d + 1] *= shrink;
                row[d] = chunk_max;
            }
            row[d + 1] += exp_shifted(scores[h], n, row[d]);
        }
        j = 0;
#ifdef __AVX2__
        if (d % 8 == 0)
            for (; j + 4 <= n; j += 4)
                for (int64_t h = 0; h < group; h++) axpy4(rows + h * head_stride, scores[h] + j, v + j, d);
#endif
        for (; j < n; j++)
            for (int64_t h = 0; h < group; h++) {
                float* row = rows + h * head_stride;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) row[i] += scores[h][j] * v[j][i];
            }
    }
}

#define MAX_ATTENTION_PARTS 8

// One query token per sequence: out[b, h] = softmax(q[b, h] . K * scale) V over the sequence's context_lens[b]
// cached positions, found through its block table. Work items are (sequence, kv head, part of the context):
// each attends with all the query heads of its kv head (attend_part); contexts are cut into as many parts as
// give every thread two items, and the parts' sums are then merged per query head (flash-decoding).
// q [B, Hq, D] with row stride q_stride; caches [blocks, block_size, Hkv, D]; out [B, Hq, D].
void decode_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                          const int32_t* block_tables, int64_t table_width, const int32_t* context_lens, int64_t batch,
                          int64_t hq, int64_t hkv, int64_t d, int64_t block_size, float scale, float* out) {
    const int64_t group = hq / hkv;
    int64_t parts = 1;
    while (parts < MAX_ATTENTION_PARTS && batch * hkv * parts < 2 * omp_get_max_threads()) parts *= 2;
    // per (sequence, query head, part): d sums of values, then the maximum and the sum of exponentials
    float* partial = malloc(batch * hq * parts * (d + 2) * sizeof(float));
#pragma omp parallel
    {
#pragma omp for schedule(static) collapse(3)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t kvh = 0; kvh < hkv; kvh++)
                for (int64_t part = 0; part < parts; part++) {
                    const int64_t ctx = context_lens[b], len = (ctx + parts - 1) / parts;
                    const int64_t start = part * len < ctx ? part * len : ctx;
                    const int64_t end = start + len < ctx ? start + len : ctx;
                    attend_part(q + b * q_stride + kvh * group * d, group, k_cache, v_cache,
                                block_tables + b * table_width, start, end, hkv, kvh, d, block_size, scale,
                                partial + ((b * hq + kvh * group) * parts + part) * (d + 2), parts * (d + 2));
                }
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t h = 0; h < hq; h++) {
                const float* rows = partial + (b * hq + h) * parts * (d + 2);
                float m = -INFINITY, total = 0.0f;
                for (int64_t part = 0; part < parts; part++) m = fmaxf(m, rows[part * (d + 2) + d]);
                float* o = out + (b * hq + h) * d;
                for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
                for (int64_t part = 0; part < parts; part++) {
                    const float* r = rows + part * (d + 2);
                    if (r[d + 1] == 0.0f) continue;  // an empty part
                    const float w = expf(r[d] - m);
                    total += w * r[d + 1];
                    for (int64_t i = 0; i < d; i++) o[i] += w * r[i];
                }
                for (int64_t i = 0; i < d; i++) o[i] /= total;
            }
    }
    free(partial);
}
