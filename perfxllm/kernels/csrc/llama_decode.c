// A whole decode step of a Llama-family model with quantized projections on the CPU in one call: what a
// CUDA graph is to the GPU path. It runs the same ops, in the same order, as LlamaForCausalLM.forward and
// compute_logits do through the per-op launchers (quant_matmul.c, decode_ops.c), without the Python between
// them. perfxllm/engine/cpu_graph.py fills the structures below from a loaded model.
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

enum { INT4_ZEROS = 0, INT4_MINS = 1, INT8 = 2 };

typedef struct {
    const void* qweight;
    const uint16_t* scales;
    const void* zeros;  // int4 only: uint8 zero points, or float16 minima
    const float* bias;  // NULL or [n]
    int64_t kind, n, k, g, xg;  // xg: int8's x block
} QLinear;

typedef struct {
    const float* input_norm;
    const float* post_norm;
    QLinear qkv, o, gate_up, down;
    float* k_cache;
    float* v_cache;
} DecodeLayer;

typedef struct {
    int64_t num_layers, hidden, inter, hq, hkv, d, block_size;
    float eps, scale;
    const float* embed;
    const float* final_norm;
    const float* cos_sin;
    const DecodeLayer* layers;
    QLinear lm_head;  // qweight NULL: a dense lm_head, which the caller applies to the hidden states
} DecodeModel;

static void qlinear(const QLinear* l, const float* x, int64_t m, float* y, float* scratch) {
    if (l->kind == INT8)
        int8_matmul(x, m, l->k, l->qweight, l->scales, l->n, l->g, l->xg, y, scratch);
    else
        int4_matmul(x, m, l->k, l->qweight, l->scales, l->zeros, l->kind == INT4_MINS, l->n, l->g, y, scratch);
    if (l->bias)
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < l->n; j++) y[r * l->n + j] += l->bias[j];
}

// Floats of work a batch of b needs (decode_work_size's caller allocates it once, for the largest batch).
int64_t llama_decode_work_size(const DecodeModel* m, int64_t b) {
    const int64_t widest = m->inter > m->hidden ? m->inter : m->hidden;
    return b * (3 * m->hidden + (m->hq + 2 * m->hkv) * m->d + m->hq * m->d + 3 * m->inter + 2 * widest);
}

// One new token for each of b sequences -> the final hidden states [b, hidden] (normed) and, when lm_head is
// packed, logits [b, vocab].
void llama_decode(const DecodeModel* m, int64_t b, const int64_t* ids, const int64_t* positions,
                  const int64_t* slots, const int32_t* block_tables, int64_t table_width, const int32_t* context_lens,
                  float* work, float* hidden, float* logits) {
    const int64_t h = m->hidden, w = (m->hq + 2 * m->hkv) * m->d, inter = m->inter;
    float* x = work;
    float* res = x + b * h;
    float* normed = res + b * h;
    float* qkv = normed + b * h;
    float* attn = qkv + b * w;
    float* gate_up = attn + b * m->hq * m->d;
    float* act = gate_up + 2 * b * inter;
    float* scratch = act + b * inter;
    for (int64_t r = 0; r < b; r++) memcpy(res + r * h, m->embed + ids[r] * h, h * sizeof(float));
    add_rmsnorm_f32(res, NULL, m->layers[0].input_norm, b, h, m->eps, normed, NULL);
    for (int64_t i = 0; i < m->num_layers; i++) {
        const DecodeLayer* l = m->layers + i;
        if (i > 0) add_rmsnorm_f32(x, res, l->input_norm, b, h, m->eps, normed, res);
        qlinear(&l->qkv, normed, b, qkv, scratch);
        rope_cache_write_f32(qkv, b, m->hq, m->hkv, m->d, positions, m->cos_sin, slots, l->k_cache, l->v_cache);
        decode_attention_f32(qkv, w, l->k_cache, l->v_cache, block_tables, table_width, context_lens, b, m->hq,
                             m->hkv, m->d, m->block_size, m->scale, attn);
        qlinear(&l->o, attn, b, x, scratch);
        add_rmsnorm_f32(x, res, l->post_norm, b, h, m->eps, normed, res);
        qlinear(&l->gate_up, normed, b, gate_up, scratch);
        silu_mul_f32(gate_up, b, inter, act);
        qlinear(&l->down, act, b, x, scratch);
    }
    add_rmsnorm_f32(x, res, m->final_norm, b, h, m->eps, hidden, res);
    if (m->lm_head.qweight) qlinear(&m->lm_head, hidden, b, logits, scratch);
}
