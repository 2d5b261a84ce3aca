// The CPU kernels' entry points, shared by the C files (which check their definitions against these) and
// mirrored by perfxllm/kernels/cpu_lib.py's SIGNATURES for ctypes.
#ifndef PERFXLLM_CPU_KERNELS_H
#define PERFXLLM_CPU_KERNELS_H
#include <stdint.h>

// quant_matmul.c
void int4_matmul(const float* x, int64_t m, int64_t k, const uint8_t* qweight, const uint16_t* scales,
                 const void* zeros, int zeros_are_min, int64_t n, int64_t g, float* y, float* scratch);
void int8_matmul(const float* x, int64_t m, int64_t k, const int8_t* qweight, const uint16_t* scales, int64_t n,
                 int64_t g, int64_t xg, float* y, float* scratch);
void int4_dequantize(const uint8_t* qweight, const uint16_t* scales, const void* zeros, int zeros_are_min,
                     int64_t n, int64_t k, int64_t g, float* out);
void int8_dequantize(const int8_t* qweight, const uint16_t* scales, int64_t n, int64_t k, int64_t g, float* out);

// decode_ops.c
void add_rmsnorm_f32(const float* x, const float* residual, const float* w, int64_t rows, int64_t h, float eps,
                     float* out, float* res_out);
void silu_mul_f32(const float* gate_up, int64_t rows, int64_t inter, float* out);
void rope_cache_write_f32(float* qkv, int64_t tokens, int64_t hq, int64_t hkv, int64_t d, const int64_t* positions,
                          const float* cos_sin, const int64_t* slots, float* k_cache, float* v_cache);
void decode_attention_f32(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                          const int32_t* block_tables, int64_t table_width, const int32_t* context_lens, int64_t batch,
                          int64_t hq, int64_t hkv, int64_t d, int64_t block_size, float scale, float* out);
#endif
