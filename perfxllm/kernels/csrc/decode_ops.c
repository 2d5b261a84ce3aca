// The small ops of a decode step on the CPU in float32, one call each instead of the dozen torch ops of
// their references (perfxllm.layers: norm, activation, rotary, attention), whose per-op dispatch costs more
// than their arithmetic at one token. Same math as the references, float32 throughout.
#include <math.h>
#include <stdint.h>

#include "cpu_kernels.h"

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
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < inter; i++) {
            const float g = gate_up[r * 2 * inter + i];
            out[r * inter + i] = g / (1.0f + expf(-g)) * gate_up[r * 2 * inter + inter + i];
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

// One query token per sequence: out[b, h] = softmax(q[b, h] . K * scale) V over the sequence's context_lens[b]
// cached positions, found through its block table, in one pass with a running maximum (no buffer of scores).
// q [B, Hq, D] with row stride q_stride; caches [blocks, block_size, Hkv, D]; out [B, Hq, D].
void decode_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                          const int32_t* block_tables, int64_t table_width, const int32_t* context_lens, int64_t batch,
                          int64_t hq, int64_t hkv, int64_t d, int64_t block_size, float scale, float* out) {
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < hq; h++) {
            const int64_t ctx = context_lens[b], kvh = h / (hq / hkv);
            const float* qh = q + b * q_stride + h * d;
            float* o = out + (b * hq + h) * d;
            float running_max = -INFINITY, total = 0.0f;
            for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
            for (int64_t p = 0; p < ctx; p++) {
                const int64_t slot = (int64_t)block_tables[b * table_width + p / block_size] * block_size + p % block_size;
                const float* k = k_cache + (slot * hkv + kvh) * d;
                const float* v = v_cache + (slot * hkv + kvh) * d;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d; i++) s += qh[i] * k[i];
                s *= scale;
                if (s > running_max) {  // rescale what is summed so far to the new maximum
                    const float shrink = expf(running_max - s);
                    total *= shrink;
                    for (int64_t i = 0; i < d; i++) o[i] *= shrink;
                    running_max = s;
                }
                const float w = expf(s - running_max);
                total += w;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) o[i] += w * v[i];
            }
            for (int64_t i = 0; i < d; i++) o[i] /= total;
        }
}
