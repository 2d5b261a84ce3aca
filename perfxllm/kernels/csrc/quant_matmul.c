// y[M, N] = x[M, K] @ W[N, K]^T for packed weights in perfxllm.quant.formats' layout, on the CPU.
//
// x is quantized once per call to int16 in blocks of XG channels (XG = the int4 group size; for int8 the
// largest of 128, 64, 32 dividing its group), one float scale per block: |error| <= max|x_block| / 65534,
// about 1e-5 relative, far below float16's 5e-4. Integer products then take two instructions per 16
// weights (vpmaddwd) instead of a conversion and an FMA per 8. Per block:
//     sum_k (q_k * s + m) x_k = s * xscale * sum_k q_k x16_k + m * sum_k x_k      (m = -z * s for zero points)
// with sum_k x_k in float32 from x itself. The integer sums are exact, so the result is the float32
// reference up to x's int16 rounding and the order of the additions.
//
// The weights are read as stored: int4 bytes hold elements 2j (low nibble) and 2j+1 (high nibble), so 16
// bytes unpack into the even elements of a block of 32 and then the odd ones; x16 is permuted the same way.
// Rows of x are taken up to 4 at a time so each weight block is unpacked once for all of them; OpenMP threads
// split the output channels. Built by perfxllm/kernels/cpu_lib.py with -march=native; without AVX2 the plain
// C loops run instead.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_MT 4
#define MAX_NW 2  // output channels per pass when x has one row (decode)
#define BLOCK_N 16  // output channels per OpenMP work item

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant) {  // subnormal: normalise
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// x [M, K] -> x16 [M, K] and xscale [M, K / XG] (x = x16 * xscale per block), xsum [M, K / XG] when not NULL.
// permute: each run of 32 stored as its 16 even elements, then its 16 odd ones (the int4 nibble order).
static void quantize_x(const float* x, int64_t m, int64_t k, int64_t xg, int permute, int16_t* x16,
                       float* xscale, float* xsum) {
    for (int64_t r = 0; r < m; r++)
        for (int64_t b = 0; b < k / xg; b++) {
            const float* xb = x + r * k + b * xg;
            int16_t* qb = x16 + r * k + b * xg;
            float amax = 0.0f, sum = 0.0f;
            for (int64_t i = 0; i < xg; i++) {
                amax = fmaxf(amax, fabsf(xb[i]));
                sum += xb[i];
            }
            const float scale = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            xscale[r * (k / xg) + b] = scale;
            if (xsum) xsum[r * (k / xg) + b] = sum;
            for (int64_t i = 0; i < xg; i++) {
                const int64_t dst = permute ? (i & ~31) + ((i & 31) >> 1) + 16 * (i & 1) : i;
                qb[dst] = (int16_t)lrintf(xb[i] * inv);
            }
        }
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef __AVX2__
// total[w][r] += s * xscale * (q . x16) over group q, for NW consecutive output channels (weight rows) and MT
// rows of x: each block of x is loaded once for all NW rows, each block of weights unpacked once for all MT.
static inline __attribute__((always_inline)) void int4_group(const uint8_t* qrow, const float* sx, int64_t k,
                                                             int64_t g, int64_t q, const int16_t* x16,
                                                             const int nw, const int mt, __m256* total) {
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    const int64_t ng = k / g;
    __m256i acc[MAX_MT];  // nw * mt <= MAX_MT: arrays this small stay in registers
    for (int i = 0; i < nw * mt; i++) acc[i] = _mm256_setzero_si256();
    const uint8_t* qb = qrow + q * (g / 2);
    const int16_t* xb = x16 + q * g;
    for (int64_t i = 0; i < g; i += 32, qb += 16, xb += 32) {
        __m256i x_even[MAX_MT], x_odd[MAX_MT];
        for (int r = 0; r < mt; r++) {
            x_even[r] = _mm256_loadu_si256((const __m256i*)(xb + r * k));
            x_odd[r] = _mm256_loadu_si256((const __m256i*)(xb + r * k + 16));
        }
        for (int w = 0; w < nw; w++) {
            // each 16-bit lane holds one byte: its low nibble an even element, its high nibble the next odd one
            const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(qb + w * (k / 2))));
            const __m256i even = _mm256_and_si256(bytes, low4), odd = _mm256_srli_epi16(bytes, 4);
            for (int r = 0; r < mt; r++)
                acc[w * mt + r] = _mm256_add_epi32(acc[w * mt + r], _mm256_add_epi32(_mm256_madd_epi16(even, x_even[r]),
                                                                                      _mm256_madd_epi16(odd, x_odd[r])));
        }
    }
    for (int w = 0; w < nw; w++)
        for (int r = 0; r < mt; r++)
            total[w * mt + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[w * mt + r]),
                                                _mm256_broadcast_ss(sx + (w * mt + r) * ng + q), total[w * mt + r]);
}

// sx[r, q] = scale[q] * xscale[r, q] for the ng groups of one output channel and MT rows of x.
static inline __attribute__((always_inline)) void combine_scales(const uint16_t* srow, const float* xscale,
                                                                 int64_t ng, const int mt, float* sx) {
    for (int r = 0; r < mt; r++) {
        int64_t q = 0;
        for (; q + 8 <= ng; q += 8)
            _mm256_storeu_ps(sx + r * ng + q, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(srow + q))),
                                                            _mm256_loadu_ps(xscale + r * ng + q)));
        for (; q < ng; q++) sx[r * ng + q] = half_to_float(srow[q]) * xscale[r * ng + q];
    }
}
#endif

// NW consecutive output channels, MT rows of x: out[w * MT + r] = sum over groups of s * xscale * (q . x16).
// Even and odd groups keep separate running totals so that consecutive groups' FMAs do not wait on each other.
static inline __attribute__((always_inline)) void int4_row(const uint8_t* qrow, const uint16_t* srow, int64_t k,
                                                           int64_t g, const int16_t* x16, const float* xscale,
                                                           const int nw, const int mt, float* out) {
    const int64_t ng = k / g;
#ifdef __AVX2__
    float sx[nw * mt * ng];
    for (int w = 0; w < nw; w++) combine_scales(srow + w * ng, xscale, ng, mt, sx + w * mt * ng);
    __m256 even[MAX_MT], odd[MAX_MT];  // nw * mt <= MAX_MT
    for (int i = 0; i < nw * mt; i++) even[i] = odd[i] = _mm256_setzero_ps();
    int64_t q = 0;
    for (; q + 1 < ng; q += 2) {
        int4_group(qrow, sx, k, g, q, x16, nw, mt, even);
        int4_group(qrow, sx, k, g, q + 1, x16, nw, mt, odd);
    }
    if (q < ng) int4_group(qrow, sx, k, g, q, x16, nw, mt, even);
    for (int i = 0; i < nw * mt; i++) out[i] = hsum(_mm256_add_ps(even[i], odd[i]));
#else
    for (int w = 0; w < nw; w++)
        for (int r = 0; r < mt; r++) {
            float sum = 0.0f;
            for (int64_t q = 0; q < ng; q++) {
                int32_t acc = 0;
                for (int64_t i = q * g; i < (q + 1) * g; i += 32)
                    for (int j = 0; j < 16; j++) {
                        const uint8_t byte = qrow[w * (k / 2) + i / 2 + j];
                        acc += (byte & 0x0F) * x16[r * k + i + j] + (byte >> 4) * x16[r * k + i + 16 + j];
                    }
                sum += acc * half_to_float(srow[w * ng + q]) * xscale[r * ng + q];
            }
            out[w * mt + r] = sum;
        }
#endif
}

// sum_q m_q * xsum[q] over the ng groups of one output channel, m_q the group's minimum: zeros[q] itself
// (float16, GGUF Q4_1) or -z_q * s_q for integer zero points z (uint8).
static inline float offset_dot(const void* zeros, int zeros_are_min, const uint16_t* srow, const float* xsum,
                               int64_t ng) {
    float s = 0.0f;
    int64_t q = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; q + 8 <= ng; q += 8) {
        const __m256 xs = _mm256_loadu_ps(xsum + q);
        if (zeros_are_min) {
            acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)zeros + q))), xs, acc);
        } else {
            const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)((const uint8_t*)zeros + q))));
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(srow + q)));
            acc = _mm256_fnmadd_ps(_mm256_mul_ps(z, scale), xs, acc);
        }
    }
    s = hsum(acc);
#endif
    for (; q < ng; q++)
        s += (zeros_are_min ? half_to_float(((const uint16_t*)zeros)[q])
                            : -(float)((const uint8_t*)zeros)[q] * half_to_float(srow[q])) * xsum[q];
    return s;
}

#define INT4_ROWS(G)                                                             \
    switch (nw * MAX_MT + mt) {                                                  \
        case 2 * MAX_MT + 1: int4_row(qrow, srow, k, G, xr, sr, 2, 1, out); break; \
        case MAX_MT + 1: int4_row(qrow, srow, k, G, xr, sr, 1, 1, out); break;     \
        case MAX_MT + 2: int4_row(qrow, srow, k, G, xr, sr, 1, 2, out); break;     \
        case MAX_MT + 3: int4_row(qrow, srow, k, G, xr, sr, 1, 3, out); break;     \
        default: int4_row(qrow, srow, k, G, xr, sr, 1, 4, out); break;             \
    }

// W[n, k] = (q - z[n, k / G]) * s[n, k / G] for integer zero points z (uint8 [N, K/G]), or
// q * s[n, k / G] + z[n, k / G] when zeros_are_min (float16 minima [N, K/G], GGUF Q4_1); scales float16
// [N, K/G]; G a multiple of 32. scratch: at least M * (K / 2 + 2 * K / G) floats.
void int4_matmul(const float* x, int64_t m, int64_t k, const uint8_t* qweight, const uint16_t* scales,
                 const void* zeros, int zeros_are_min, int64_t n, int64_t g, float* y, float* scratch) {
    const int64_t ng = k / g;
    const size_t zero_size = zeros_are_min ? 2 : 1;
    float* xscale = scratch;
    float* xsum = xscale + m * ng;
    int16_t* x16 = (int16_t*)(xsum + m * ng);
    quantize_x(x, m, k, g, 1, x16, xscale, xsum);
#pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += BLOCK_N) {
        const int64_t n1 = n0 + BLOCK_N < n ? n0 + BLOCK_N : n;
        for (int64_t r0 = 0; r0 < m; r0 += MAX_MT) {
            const int64_t mt = m - r0 < MAX_MT ? m - r0 : MAX_MT;
            const int16_t* xr = x16 + r0 * k;
            const float* sr = xscale + r0 * ng;
            for (int64_t j = n0; j < n1;) {
                const int nw = mt == 1 && j + 1 < n1 ? 2 : 1;
                const uint8_t* qrow = qweight + j * (k / 2);
                const uint16_t* srow = scales + j * ng;
                float out[MAX_NW * MAX_MT];
                // constant group sizes and row counts: the compiler unrolls the group's blocks and keeps the
                // accumulators in registers
                switch (g) {
                    case 32: INT4_ROWS(32); break;
                    case 64: INT4_ROWS(64); break;
                    case 128: INT4_ROWS(128); break;
                    default: INT4_ROWS(g); break;
                }
                for (int w = 0; w < nw; w++, j++) {
                    const void* zrow = (const char*)zeros + j * ng * zero_size;
                    for (int64_t r = 0; r < mt; r++)
                        y[(r0 + r) * n + j] = out[w * mt + r] + offset_dot(zrow, zeros_are_min, scales + j * ng,
                                                                           xsum + (r0 + r) * ng, ng);
                }
            }
        }
    }
}

#ifdef __AVX2__
// total[r] += s * xscale * (q . x16) over x block b of one output channel, for MT rows of x.
static inline __attribute__((always_inline)) void int8_block(const int8_t* qrow, const float* sx, int64_t k,
                                                             int64_t xg, int64_t b, const int16_t* x16,
                                                             const int mt, __m256* total) {
    __m256i acc[MAX_MT];
    for (int r = 0; r < mt; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t i = b * xg; i < (b + 1) * xg; i += 32) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(qrow + i)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(qrow + i + 16)));
        for (int r = 0; r < mt; r++) {
            const int16_t* xb = x16 + r * k + i;
            const __m256i lo = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)xb));
            const __m256i hi = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(xb + 16)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(lo, hi));
        }
    }
    const int64_t nb = k / xg;
    for (int r = 0; r < mt; r++)
        total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_broadcast_ss(sx + r * nb + b), total[r]);
}
#endif

// One output channel of int8 weights, MT rows of x: out[r] = sum over x blocks of s * xscale * (q . x16).
static inline __attribute__((always_inline)) void int8_row(const int8_t* qrow, const uint16_t* srow, int64_t k,
                                                           int64_t g, int64_t xg, const int16_t* x16,
                                                           const float* xscale, const int mt, float* out) {
    const int64_t nb = k / xg;
#ifdef __AVX2__
    float sx[mt * nb];  // each x block's weight scale times its own
    if (g == xg) {
        combine_scales(srow, xscale, nb, mt, sx);
    } else {
        for (int r = 0; r < mt; r++)
            for (int64_t b = 0; b < nb; b++) sx[r * nb + b] = half_to_float(srow[b * xg / g]) * xscale[r * nb + b];
    }
    __m256 even[MAX_MT], odd[MAX_MT];
    for (int r = 0; r < mt; r++) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        int8_block(qrow, sx, k, xg, b, x16, mt, even);
        int8_block(qrow, sx, k, xg, b + 1, x16, mt, odd);
    }
    if (b < nb) int8_block(qrow, sx, k, xg, b, x16, mt, even);
    for (int r = 0; r < mt; r++) out[r] = hsum(_mm256_add_ps(even[r], odd[r]));
#else
    for (int r = 0; r < mt; r++) {
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t acc = 0;
            for (int64_t i = b * xg; i < (b + 1) * xg; i++) acc += qrow[i] * x16[r * k + i];
            sum += acc * half_to_float(srow[b * xg / g]) * xscale[r * nb + b];
        }
        out[r] = sum;
    }
#endif
}

#define INT8_ROWS(XG)                                                     \
    switch (mt) {                                                         \
        case 1: int8_row(qrow, srow, k, g, XG, xr, sr, 1, out); break;    \
        case 2: int8_row(qrow, srow, k, g, XG, xr, sr, 2, out); break;    \
        case 3: int8_row(qrow, srow, k, g, XG, xr, sr, 3, out); break;    \
        default: int8_row(qrow, srow, k, g, XG, xr, sr, 4, out); break;   \
    }

// W[n, k] = q * scales[n, k / G]: scales float16 [N, K / G] (G = K: one scale per output channel). x blocks of
// XG, a multiple of 32 dividing G. scratch: at least M * (K / 2 + K / XG) floats.
void int8_matmul(const float* x, int64_t m, int64_t k, const int8_t* qweight, const uint16_t* scales, int64_t n,
                 int64_t g, int64_t xg, float* y, float* scratch) {
    const int64_t nb = k / xg;
    float* xscale = scratch;
    int16_t* x16 = (int16_t*)(xscale + m * nb);
    quantize_x(x, m, k, xg, 0, x16, xscale, NULL);
#pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += BLOCK_N) {
        const int64_t n1 = n0 + BLOCK_N < n ? n0 + BLOCK_N : n;
        for (int64_t r0 = 0; r0 < m; r0 += MAX_MT) {
            const int64_t mt = m - r0 < MAX_MT ? m - r0 : MAX_MT;
            const int16_t* xr = x16 + r0 * k;
            const float* sr = xscale + r0 * nb;
            for (int64_t j = n0; j < n1; j++) {
                const int8_t* qrow = qweight + j * k;
                const uint16_t* srow = scales + j * (k / g);
                float out[MAX_MT];
                switch (xg) {
                    case 32: INT8_ROWS(32); break;
                    case 64: INT8_ROWS(64); break;
                    default: INT8_ROWS(xg); break;
                }
                for (int64_t r = 0; r < mt; r++) y[(r0 + r) * n + j] = out[r];
            }
        }
    }
}

#ifdef __AVX2__
// 32 weights of one group from 16 bytes: out[2j] = low nibble j, out[2j+1] = high nibble j; then
// (q - z) * s or q * s + m, multiply and add apart (no FMA), as the reference rounds.
static inline __attribute__((always_inline)) void int4_dequantize_32(const uint8_t* qb, __m256 s, __m256 m,
                                                                    __m256i z, int zeros_are_min, float* out) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)qb), low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    const __m128i pairs[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // in element order
    for (int h = 0; h < 4; h++) {
        __m256i q = _mm256_cvtepu8_epi32(h & 1 ? _mm_srli_si128(pairs[h / 2], 8) : pairs[h / 2]);
        __m256 w = zeros_are_min ? _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), s), m)
                                 : _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, z)), s);
        _mm256_storeu_ps(out + 8 * h, w);
    }
}
#endif

// For long inputs (prefill), where a float32 GEMM beats these kernels: W [N, K] dequantized into out, float32,
// with the reference's arithmetic ((q - z) * s, or q * s + m), so that the GEMM sees the very same weights.
void int4_dequantize(const uint8_t* qweight, const uint16_t* scales, const void* zeros, int zeros_are_min,
                     int64_t n, int64_t k, int64_t g, float* out) {
    const int64_t ng = k / g;
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++)
        for (int64_t q = 0; q < ng; q++) {
            const float s = half_to_float(scales[j * ng + q]);
            const float m = zeros_are_min ? half_to_float(((const uint16_t*)zeros)[j * ng + q]) : 0.0f;
            const int z = zeros_are_min ? 0 : ((const uint8_t*)zeros)[j * ng + q];
            int64_t i = q * g;
#ifdef __AVX2__
            for (; i + 32 <= (q + 1) * g; i += 32)
                int4_dequantize_32(qweight + j * (k / 2) + i / 2, _mm256_set1_ps(s), _mm256_set1_ps(m),
                                   _mm256_set1_epi32(z), zeros_are_min, out + j * k + i);
#endif
            for (; i < (q + 1) * g; i += 2) {
                const uint8_t byte = qweight[j * (k / 2) + i / 2];
                if (zeros_are_min) {
                    out[j * k + i] = (byte & 0x0F) * s + m;
                    out[j * k + i + 1] = (byte >> 4) * s + m;
                } else {
                    out[j * k + i] = (float)((byte & 0x0F) - z) * s;
                    out[j * k + i + 1] = (float)((byte >> 4) - z) * s;
                }
            }
        }
}

void int8_dequantize(const int8_t* qweight, const uint16_t* scales, int64_t n, int64_t k, int64_t g, float* out) {
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++)
        for (int64_t q = 0; q < k / g; q++) {
            const float s = half_to_float(scales[j * (k / g) + q]);
            int64_t i = q * g;
#ifdef __AVX2__
            for (; i + 8 <= (q + 1) * g; i += 8) {
                const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qweight + j * k + i)));
                _mm256_storeu_ps(out + j * k + i, _mm256_mul_ps(_mm256_cvtepi32_ps(w), _mm256_set1_ps(s)));
            }
#endif
            for (; i < (q + 1) * g; i++) out[j * k + i] = qweight[j * k + i] * s;
        }
}
