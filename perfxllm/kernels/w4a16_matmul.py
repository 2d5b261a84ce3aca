"""W4A16 matmul: y = x @ W.T for fp16/bf16 activations x [N, K] and an int4 weight W [M, K] with one scale
and zero point (or float minimum) per group of G in {32, 64, 128} input channels (perfxllm.quant.formats).

`prepack` repacks an Int4Weight once at load time:
    qweight int32   [M, K // 8]   word w of a row holds input channels 8w..8w+7; channel 8w + e sits in byte
                                  j = 2 (e % 2) + (e // 2) % 2, low nibble for e < 4, high nibble otherwise
                                  (the order in which _dequantize's joins lay the nibbles out)
    scales  float16 [K // G, M]   transposed so a tile's scales are one contiguous load
    bias    float16 [K // G, M]   W = q * scale + bias (bias = -zero * scale, or the Q4_1 minimum)

Both kernels turn nibbles into floats with one LOP3 each: byte j of a word is shifted so that its two
nibbles land in mantissa bits 12-15 and 16-19 of a float32 whose other bits are those of 1.0, giving
1 + q / 2048 and 1 + q / 128; the offset and the factor are folded into the scale. (The 1.0 bits come in
as a kernel argument, `one_bits`: with two immediates ptxas would need a second LOP3.)

Two kernels, picked by N (tokens):
    N = 1   GEMV on the CUDA cores: a tile of BLOCK_M rows by part of a group, one group or several per
            iteration; the products are summed in registers per word (fp16 pairs: per four words, a
            thread's 16-byte load) and scaled per group, and the sum across K happens once, after the loop.
            Split along K with fp32 atomics when there are too few row tiles. For fp16 x the products are
            fp16x2 in PTX (_QUAD_DOT_PTX: two nibbles per LOP3, two products per HFMA2, one chain over the
            four words); for bf16 x, and under the interpreter, float32.
    N <= 8  the tuner also tries the same GEMV over N rows of x, each weight tile unpacked once for all (fp16
            pairs too, with the sums of x made as products with words of ones, in the products' layout).
    N > 1   tensor cores with the weight as the A operand (acc [BLOCK_M, BLOCK_N] = W x^T, so N can be as
            small as 16): a tile is dequantized in registers (q * scale + bias in fp32, rounded to x's
            dtype) and fed to tl.dot; split along K for small N.
    N large the tuner may pick instead: dequantize W in slices into a fixed scratch buffer and multiply with
            cuBLAS (it wins where the tensor-core kernel's in-loop dequantization, repeated for every tile
            of x, costs more than writing W once in fp16).

Block shapes are tuned per (kernel, N bucket, M, K) on the GPU and cached on disk (_common.DiskTuner).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import HALF_DTYPES, DiskTuner, check_tensor, interpreting, num_sms
from perfxllm.kernels.pdl import pdl_enabled, pdl_launch_args, prefetch_l2, wait_for_inputs
from perfxllm.kernels.silu_mul import silu_mul
from perfxllm.quant.formats import Int4Weight, int4_format_name

ONE_BITS = 0x3F800000  # the bits of float32 1.0
# Bit offset of input channel 8w + e within word w (see the module docstring).
_NIBBLE_SHIFT = [8 * (2 * (e % 2) + (e // 2) % 2) + 4 * (e // 4) for e in range(8)]


@dataclass
class W4Packed:
    qweight: torch.Tensor  # int32 [M, K // 8], nibble order in the module docstring
    scales: torch.Tensor  # float16 [K // G, M]
    bias: torch.Tensor  # float16 [K // G, M]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8

    @property
    def format_name(self) -> str:
        return int4_format_name(self.group_size, minima=False)  # minima and zero points are both bias here

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_matmul(x, self)


def prepack(w: Int4Weight) -> W4Packed:
    """Repack a spec-format Int4Weight (integer zero points or float minima) into the kernel layout."""
    m, k = w.shape
    g = w.group_size
    if g not in (32, 64, 128) or k % g:
        raise ValueError(f"group size {g} with K={k}: need G in (32, 64, 128) dividing K")
    q = w.unpack().view(m, k // 8, 8).to(torch.int64)
    shifts = torch.tensor(_NIBBLE_SHIFT, device=q.device)
    words = (q << shifts).sum(-1)  # disjoint bits: the sum is an OR
    qweight = (words - (words >= 2**31).long() * 2**32).to(torch.int32).contiguous()
    s = w.scales.float()
    z = w.unpacked_zeros().float()
    b = z if w.zeros.is_floating_point() else -z * s
    return W4Packed(qweight, s.t().contiguous().half(), b.t().contiguous().half(), g)


@triton.jit
def _byte_to_window(q, j: tl.constexpr):
    """Shift words so that the low nibble of byte j sits at bit 12 and its high nibble at bit 16."""
    if j < 2:
        return q << (12 - 8 * j)
    else:
        return q >> (8 * j - 12)


@triton.jit
def _nibble(t, mask: tl.constexpr, one_bits):
    """1 + q / 2048 (mask 0xF000) or 1 + q / 128 (mask 0xF0000) as float32, q the nibble under the mask."""
    return ((t & mask) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _dequantize_byte(q, j: tl.constexpr, s, b, one_bits, dtype: tl.constexpr):
    """Both nibbles of byte j of each word, q * s + b in dtype: [R, W, 2] (low, high)."""
    t = _byte_to_window(q, j)
    lo = _nibble(t, 0xF000, one_bits) * (s * 2048.0) + (b - s * 2048.0)
    hi = _nibble(t, 0xF0000, one_bits) * (s * 128.0) + (b - s * 128.0)
    return tl.join(lo.to(dtype), hi.to(dtype))


@triton.jit
def _dequantize(q, s, b, one_bits, dtype: tl.constexpr):
    """int32 words [R, W] with float32 scale and bias [R, 1] -> weights q * s + b, [R, 8 W] in dtype."""
    pairs_01 = tl.join(
        _dequantize_byte(q, 0, s, b, one_bits, dtype), _dequantize_byte(q, 1, s, b, one_bits, dtype)
    )
    pairs_23 = tl.join(
        _dequantize_byte(q, 2, s, b, one_bits, dtype), _dequantize_byte(q, 3, s, b, one_bits, dtype)
    )
    # [R, W, nibble, byte % 2, byte // 2] -> channel 8 w + 4 nibble + 2 (byte % 2) + byte // 2
    return tl.reshape(tl.join(pairs_01, pairs_23), (q.shape[0], 8 * q.shape[1]))


@triton.jit
def _group_scale_bias(s_ptr, b_ptr, group, M, offs_m, mask_m):
    """Rows offs_m's scale and bias of one K group, float32 [R] each."""
    s = tl.load(s_ptr + group * M + offs_m, mask=mask_m, other=0).to(tl.float32)
    b = tl.load(b_ptr + group * M + offs_m, mask=mask_m, other=0).to(tl.float32)
    return s, b


@triton.jit
def _row_words(K):
    """Words per row of qweight: G (32, 64 or 128) divides K, so a multiple of 4 and rows start on 16 bytes
    (which lets the loads be 16 bytes wide)."""
    return tl.multiple_of(K // 8, 4)


@triton.jit
def _load_rows(offs, count):
    """Row indexes for loads: those past the last row read the last row, so the loop needs no masks (their
    results are never stored)."""
    return tl.minimum(offs, count - 1)


@triton.jit
def _words_dot_x(q, x_words, one_bits):
    """For int32 words q and pointers x_words to the first input channel of each word (broadcastable against
    q), the sum over each word's 8 channels of nibble * x, and the sum of x over them. The nibbles are
    summed as (1 + q / 2048) and (1 + q / 128) (one LOP3 each, see _nibble) and the 1s taken off after."""
    lo = 0.0  # sum over low nibbles of (1 + q / 2048) x
    hi = 0.0  # sum over high nibbles of (1 + q / 128) x
    x_lo_sum = 0.0
    x_hi_sum = 0.0
    for j in tl.static_range(4):
        t = _byte_to_window(q, j)
        x_lo = tl.load(x_words + (2 * (j % 2) + j // 2)).to(tl.float32)
        x_hi = tl.load(x_words + (4 + 2 * (j % 2) + j // 2)).to(tl.float32)
        lo += _nibble(t, 0xF000, one_bits) * x_lo
        hi += _nibble(t, 0xF0000, one_bits) * x_hi
        x_lo_sum += x_lo
        x_hi_sum += x_hi
    return lo * 2048.0 + (hi * 128.0 - (x_lo_sum * 2048.0 + x_hi_sum * 128.0)), x_lo_sum + x_hi_sum


def _quad_dot_ptx() -> str:
    """PTX for the fp16 products of four words of a row (one thread's 16 bytes) with their inputs, summed.

    The nibble pairs at bits (0, 16), (8, 24), (4, 20) and (12, 28) of a word are input channels (0, 1), (2, 3),
    (4, 5) and (6, 7) (see _NIBBLE_SHIFT). One LOP3 puts two nibbles into the mantissas of an fp16x2 of
    1024 + q (or 1024 + 16 q for bits 4 and 12), one FMA leaves q / X_PAIR_SCALE exactly (a power of two,
    and q / 256 has four significant bits), and one HFMA2 adds two products with x into a single fp16x2 chain
    over the 32 channels (16 products a half, at most 16 * 15 / 256 * 65504 < 65504: no fp16 x overflows
    it); the two halves are then summed in fp32. Operands: $0 the float32 sum, $1-$4 the words, $5-$20 the
    pairs of x, four a word."""
    lines = [
        ".reg .b32 t, a, b, c, d, k, r, m, s, o, p;",
        ".reg .b16 h0, h1;",
        ".reg .f32 f0, f1;",
        "mov.b32 k, 0x64006400;",  # fp16x2 (1024, 1024)
        "mov.b32 r, 0x1C001C00;",  # 1/256: (1024 + q) / 256 - 4 = q / 256
        "mov.b32 m, 0xC400C400;",  # -4
        "mov.b32 s, 0x0C000C00;",  # 1/4096: (1024 + 16 q) / 4096 - 1/4 = q / 256
        "mov.b32 o, 0xB400B400;",  # -1/4
    ]
    for i in range(4):
        word, x = f"${1 + i}", [f"${5 + 4 * i + j}" for j in range(4)]
        lines += [
            f"shr.u32 t, {word}, 8;",
            f"lop3.b32 a, {word}, 0x000f000f, k, 0xea;",
            f"lop3.b32 b, {word}, 0x00f000f0, k, 0xea;",
            "lop3.b32 c, t, 0x000f000f, k, 0xea;",
            "lop3.b32 d, t, 0x00f000f0, k, 0xea;",
            "fma.rn.f16x2 a, a, r, m;",
            "fma.rn.f16x2 c, c, r, m;",
            "fma.rn.f16x2 b, b, s, o;",
            "fma.rn.f16x2 d, d, s, o;",
            f"mul.f16x2 p, a, {x[0]};" if i == 0 else f"fma.rn.f16x2 p, a, {x[0]}, p;",
            f"fma.rn.f16x2 p, c, {x[1]}, p;",
            f"fma.rn.f16x2 p, b, {x[2]}, p;",
            f"fma.rn.f16x2 p, d, {x[3]}, p;",
        ]
    lines += ["mov.b32 {h0, h1}, p;", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", "add.f32 $0, f0, f1;"]
    return "{\n" + "\n".join(lines) + "\n}"


_QUAD_DOT_PTX = tl.constexpr(_quad_dot_ptx())
X_PAIR_SCALE = tl.constexpr(256.0)  # the nibbles enter the fp16 products divided by this


@triton.jit
def _fp16_pair(v):
    """An int32 holding two fp16 -> (low, high) as float32."""
    lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _fp16_pair_sum(v):
    lo, hi = _fp16_pair(v)
    return lo + hi


@triton.jit
def _nibble_pair_dot(q, bit: tl.constexpr, pair):
    """Float32 emulation of one HFMA2 of _QUAD_DOT_PTX: the nibbles at bit and bit + 16 times the low and high
    fp16 of pair."""
    lo, hi = _fp16_pair(pair)
    return ((q >> bit) & 0xF).to(tl.float32) * lo + ((q >> (bit + 16)) & 0xF).to(tl.float32) * hi


@triton.jit
def _split4(t):
    """t [..., 2, 2], a dimension of 4 (held within each thread) reshaped -> its four slices."""
    a, b = tl.split(t)  # a: slices 0 and 2, b: 1 and 3
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _word_dot_x_pairs(q, x01, x23, x45, x67):
    """Float32 emulation of one word of _QUAD_DOT_PTX."""
    dot = _nibble_pair_dot(q, 0, x01) + _nibble_pair_dot(q, 8, x23)
    return dot + _nibble_pair_dot(q, 4, x45) + _nibble_pair_dot(q, 12, x67)


@triton.jit
def _by_word(pairs):
    """Pairs of x [..., W // 4, word (2 x 2), pair (2 x 2)] (4 pairs a word) -> 16 tensors [..., W // 4]: word
    0's four pairs, word 1's..."""
    p0, p1, p2, p3 = _split4(pairs)  # by pair [..., W // 4, 2, 2], then by word
    p0_0, p0_1, p0_2, p0_3 = _split4(p0)
    p1_0, p1_1, p1_2, p1_3 = _split4(p1)
    p2_0, p2_1, p2_2, p2_3 = _split4(p2)
    p3_0, p3_1, p3_2, p3_3 = _split4(p3)
    return p0_0, p1_0, p2_0, p3_0, p0_1, p1_1, p2_1, p3_1, p0_2, p1_2, p2_2, p3_2, p0_3, p1_3, p2_3, p3_3


@triton.jit
def _quads_dot_x_pairs(q, x_pairs, ASM: tl.constexpr):
    """For int32 words q [R, W] and int32 pointers x_pairs [1, W] to each word's first pair of fp16 inputs (x
    4-byte aligned), per four consecutive words of a row ([R, W // 4]): the sum over their 32 channels of
    nibble * x / X_PAIR_SCALE, and ([1, W // 4]) the sum of x over them. ASM: in fp16x2 PTX (_QUAD_DOT_PTX);
    else in float32 with the same pairing (the Triton interpreter runs no PTX)."""
    R: tl.constexpr = q.shape[0]
    W4: tl.constexpr = q.shape[1] // 4
    q0, q1, q2, q3 = _split4(tl.reshape(q, [R, W4, 2, 2]))
    pairs = tl.load(x_pairs[:, :, None] + tl.arange(0, 4)[None, None, :])  # [1, W, pair]
    x_sum = tl.sum(tl.reshape(_fp16_pair_sum(pairs), [1, W4, 16]), axis=2)
    return _quads_dot(q0, q1, q2, q3, tl.reshape(pairs, [1, W4, 2, 2, 2, 2]), ASM), x_sum


@triton.jit
def _quads_dot_x_rows(q, x_pairs, ASM: tl.constexpr):
    """_quads_dot_x_pairs for several rows of x: x_pairs [BN, W] -> the sums [BN, R, W // 4] and the sums of x
    [BN, 1, W // 4], both divided by X_PAIR_SCALE. Each row's products reuse the words' nibbles (ptxas merges
    the repeated unpacking). The sums of x are products with words of ones, so that they come in the products'
    layout (summed across threads instead, they took one in which every thread updated most of a [BN, R] bias
    sum: 47 SASS instructions a word at two rows, against 32)."""
    R: tl.constexpr = q.shape[0]
    BN: tl.constexpr = x_pairs.shape[0]
    W4: tl.constexpr = q.shape[1] // 4
    q0, q1, q2, q3 = _split4(tl.reshape(q, [1, R, W4, 2, 2]))
    pairs = tl.load(x_pairs[:, :, None] + tl.arange(0, 4)[None, None, :])  # [BN, W, pair]
    by_word = tl.reshape(pairs, [BN, 1, W4, 2, 2, 2, 2])
    ones = tl.full([1, 1, W4], 0x11111111, tl.int32)
    return _quads_dot(q0, q1, q2, q3, by_word, ASM), _quads_dot(ones, ones, ones, ones, by_word, ASM)


@triton.jit
def _quads_dot(q0, q1, q2, q3, by_word, ASM: tl.constexpr):
    """The sums over four words' 32 channels of nibble * x / X_PAIR_SCALE: q0..q3 the words, by_word their
    pairs of x [..., word (2 x 2), pair (2 x 2)]."""
    a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3 = _by_word(by_word)
    if ASM:
        operands = [q0, q1, q2, q3, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3]
        dot = tl.inline_asm_elementwise(
            _QUAD_DOT_PTX, "=f" + ",r" * 20, operands, dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        dot = _word_dot_x_pairs(q0, a0, a1, a2, a3) + _word_dot_x_pairs(q1, b0, b1, b2, b3)
        dot += _word_dot_x_pairs(q2, c0, c1, c2, c3) + _word_dot_x_pairs(q3, d0, d1, d2, d3)
        dot = dot / X_PAIR_SCALE
    return dot


@triton.jit
def _split_range(pid_k, num_splits, K, BLOCK_K: tl.constexpr):
    """The K tiles [start, end) of split pid_k."""
    num_iters = K // BLOCK_K
    per_split = tl.cdiv(num_iters, num_splits)
    start = pid_k * per_split
    return start, tl.minimum(start + per_split, num_iters)


@triton.jit
def _finish_split(acc, mask, out_ptrs, ws_ptrs, count_ptr, num_splits):
    """Split-K epilogue with no launch before or after: each split adds its partial sums into a zeroed fp32
    workspace, and the last split to arrive at the output tile writes the total and leaves the workspace
    and the tile's arrival counter at zero for the next launch."""
    tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
    tl.debug_barrier()  # every thread's partial sums are in before the arrival is counted
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == num_splits - 1:
        # read and zero in one atomic, on the bits (the interpreter has no float exchange)
        bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), 0, mask=mask, sem="relaxed")
        total = bits.to(tl.float32, bitcast=True)
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")


@triton.jit
def _prefetch_weights(qw_ptr, offs_m, M, K, offs_w, it_start, it_end, BLOCK_K: tl.constexpr):
    """K tiles [it_start, it_end) of rows offs_m into L2, in loads of offs_w words a row: the weights are no
    kernel's output, so under PDL a GEMV starts reading them while the previous kernel runs."""
    rows = qw_ptr + _load_rows(offs_m, M)[:, None].to(tl.int64) * _row_words(K) + offs_w[None, :]
    for it in range(it_start, it_end):
        for piece in tl.static_range(BLOCK_K // 8 // offs_w.shape[0]):
            prefetch_l2(rows + it * (BLOCK_K // 8) + piece * offs_w.shape[0])


@triton.jit(do_not_specialize=["split_k", "prefetch_tiles"])
def _w4_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    M,
    K,
    split_k,
    prefetch_tiles,  # with PDL: K tiles a program prefetches into L2 before its inputs are ready
    one_bits,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,  # weight tiles in flight (cp.async into shared memory); 1: plain loads
    PAIRS: tl.constexpr,  # fp16 x: products in fp16 pairs (_quads_dot_x_pairs); else float32 (_words_dot_x)
    ASM: tl.constexpr,  # the pairs in PTX (not under the interpreter)
    PDL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # A K tile is part of one group (BLOCK_K <= G) or several whole groups, one [BLOCK_M, W] load each
    GROUPS: tl.constexpr = BLOCK_K // G if BLOCK_K > G else 1
    W: tl.constexpr = BLOCK_K // 8 // GROUPS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_w = tl.arange(0, W)
    it_start, it_end = _split_range(pid_k, split_k, K, BLOCK_K)
    if PDL:
        _prefetch_weights(
            qw_ptr, offs_m, M, K, offs_w, it_start, tl.minimum(it_start + prefetch_tiles, it_end), BLOCK_K
        )
    wait_for_inputs(PDL)

    w_ptrs = qw_ptr + offs_m[:, None].to(tl.int64) * _row_words(K) + offs_w[None, :]
    ACC_W: tl.constexpr = W // 4 if PAIRS else W  # PAIRS: one sum per four words
    acc = tl.zeros([BLOCK_M, ACC_W], dtype=tl.float32)  # summed across K after the loop
    acc_bias = tl.zeros([BLOCK_M], dtype=tl.float32)
    for it in tl.range(it_start, it_end, num_stages=STAGES):
        for piece in tl.static_range(GROUPS):
            k0 = it * BLOCK_K + piece * (8 * W)
            q = tl.load(w_ptrs + k0 // 8, mask=mask_m[:, None], other=0)
            s, b = _group_scale_bias(s_ptr, b_ptr, k0 // G, M, offs_m, mask_m)
            if PAIRS:  # [BLOCK_M, W // 4], [1, W // 4]
                x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + k0 // 2 + offs_w[None, :] * 4
                q_dot_x, x_sum = _quads_dot_x_pairs(q, x_pairs, ASM)
            else:
                q_dot_x, x_sum = _words_dot_x(q, x_ptr + k0 + offs_w[None, :] * 8, one_bits)
            acc += q_dot_x * s[:, None]
            acc_bias += b * tl.sum(x_sum, axis=1)

    out = tl.sum(acc, axis=1) * (X_PAIR_SCALE if PAIRS else 1.0) + acc_bias
    if split_k == 1:
        tl.store(out_ptr + offs_m, out.to(out_ptr.dtype.element_ty), mask=mask_m)
    else:
        _finish_split(out, mask_m, out_ptr + offs_m, ws_ptr + offs_m, count_ptr + pid_m, split_k)


@triton.jit(do_not_specialize=["N", "split_k"])
def _w4_gemv_rows_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    N,
    M,
    K,
    stride_xn,
    stride_on,
    split_k,
    one_bits,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    PAIRS: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    """_w4_gemv_kernel for a few rows of x (N <= BLOCK_N): each weight tile is unpacked once for all of them,
    and the products are [BLOCK_N, BLOCK_M, W] tensors on the CUDA cores (fp16 pairs: [.., W // 4])."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    W: tl.constexpr = BLOCK_K // 8

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, W)
    x_row = _load_rows(offs_n, N).to(tl.int64)  # padding rows: their sums are dropped

    it_start, it_end = _split_range(pid_k, split_k, K, BLOCK_K)
    if PDL:
        _prefetch_weights(qw_ptr, offs_m, M, K, offs_w, it_start, tl.minimum(it_start + 1, it_end), BLOCK_K)
    wait_for_inputs(PDL)

    w_ptrs = qw_ptr + offs_m[:, None].to(tl.int64) * (K // 8) + offs_w[None, :]
    ACC_W: tl.constexpr = W // 4 if PAIRS else W
    acc = tl.zeros([BLOCK_N, BLOCK_M, ACC_W], dtype=tl.float32)  # summed across K after the loop
    for it in tl.range(it_start, it_end, num_stages=STAGES):
        k0 = it * BLOCK_K
        q = tl.load(w_ptrs + it * W, mask=mask_m[:, None], other=0)
        s, b = _group_scale_bias(s_ptr, b_ptr, k0 // G, M, offs_m, mask_m)
        if PAIRS:  # [BN, BM, W // 4], [BN, 1, W // 4]
            x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + (x_row[:, None] * stride_xn + k0) // 2
            q_dot_x, x_sum = _quads_dot_x_rows(q, x_pairs + offs_w[None, :] * 4, ASM)
        else:  # [BN, BM, W], [BN, 1, W]
            x_words = x_ptr + x_row[:, None, None] * stride_xn + k0 + offs_w[None, None, :] * 8
            q_dot_x, x_sum = _words_dot_x(q[None, :, :], x_words, one_bits)
        acc += q_dot_x * s[None, :, None] + x_sum * b[None, :, None]

    out = tl.sum(acc, axis=2) * (X_PAIR_SCALE if PAIRS else 1.0)
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_m[None, :]
    mask = mask_n[:, None] & mask_m[None, :]
    if split_k == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_n[:, None] * M + offs_m[None, :]
        _finish_split(out, mask, out_ptrs, ws_ptrs, count_ptr + pid_m, split_k)


@triton.jit(do_not_specialize=["N"])
def _w4_gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    N,
    M,
    K,
    stride_xn,
    stride_on,
    one_bits,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)  # fastest: the row tiles of x that share a weight tile run together
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    dtype = x_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    it_start, it_end = _split_range(pid_k, SPLIT_K, K, BLOCK_K)
    wait_for_inputs(PDL)

    rows = _load_rows(offs_m, M)
    w_ptrs = qw_ptr + rows[:, None].to(tl.int64) * _row_words(K) + tl.arange(0, BLOCK_K // 8)[None, :]
    x_ptrs = x_ptr + _load_rows(offs_n, N)[:, None].to(tl.int64) * stride_xn + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Scale and bias are loaded a tile ahead: the pipeliner moves the weight and x tiles through shared
    # memory, but not these, and each iteration would otherwise wait for their load from DRAM.
    s, b = _group_scale_bias(
        s_ptr, b_ptr, tl.minimum(it_start, K // BLOCK_K - 1) * BLOCK_K // G, M, offs_m, mask_m
    )
    for it in range(it_start, it_end):
        k0 = it * BLOCK_K
        q = tl.load(w_ptrs + k0 // 8)
        s_next, b_next = _group_scale_bias(
            s_ptr, b_ptr, tl.minimum(it + 1, it_end - 1) * BLOCK_K // G, M, offs_m, mask_m
        )
        w = _dequantize(q, s[:, None], b[:, None], one_bits, dtype)
        x = tl.load(x_ptrs + k0)
        acc = tl.dot(w, tl.trans(x), acc)
        s, b = s_next, b_next

    out_ptrs = out_ptr + offs_n[None, :].to(tl.int64) * stride_on + offs_m[:, None]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_n[None, :] * M + offs_m[:, None]
        count = count_ptr + pid_n * tl.num_programs(1) + pid_m
        _finish_split(acc, mask, out_ptrs, ws_ptrs, count, SPLIT_K)


@triton.jit
def _w4_dequant_kernel(
    qw_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    K,
    row0,
    one_bits,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """Rows row0 + [0, rows) of W, dequantized into out [rows, K]."""
    wait_for_inputs(PDL)  # out is the scratch the previous matmul read
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = row0 + offs_r
    mask_m = offs_m < M
    k0 = tl.program_id(1) * BLOCK_K
    q = tl.load(
        qw_ptr + offs_m[:, None].to(tl.int64) * (K // 8) + k0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :],
        mask=mask_m[:, None],
        other=0,
    )
    s, b = _group_scale_bias(s_ptr, b_ptr, k0 // G, M, offs_m, mask_m)
    w = _dequantize(q, s[:, None], b[:, None], one_bits, out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_r[:, None].to(tl.int64) * K + k0 + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptrs, w, mask=mask_m[:, None])


SCRATCH_BYTES = 32 * 2**20  # the dequantized slice of W; fixed, since CUDA graphs keep its address
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _launch_dequant_matmul(
    x: torch.Tensor, w: W4Packed, cfg: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    _check_config(w, cfg)
    n, k = x.shape
    m = w.shape[0]
    key = (x.device, x.dtype)
    if key not in _scratch:
        _scratch[key] = torch.empty(SCRATCH_BYTES // 2, device=x.device, dtype=x.dtype)
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    rows = min(m, SCRATCH_BYTES // (2 * k) // bm * bm)
    dest = out if out is not None else x.new_empty(n, m)
    pdl = pdl_launch_args(x.device)
    for row0 in range(0, m, rows):
        w_rows = _scratch[key][: min(rows, m - row0) * k].view(-1, k)
        grid = (triton.cdiv(w_rows.shape[0], bm), k // bk)
        _w4_dequant_kernel[grid](
            w.qweight,
            w.scales,
            w.bias,
            w_rows,
            m,
            k,
            row0,
            ONE_BITS,
            G=w.group_size,
            BLOCK_M=bm,
            BLOCK_K=bk,
            **pdl,
        )
        # a column slice of dest: cuBLAS writes it in place (leading dimension m), no temporary and no copy
        torch.mm(x, w_rows.t(), out=dest[:, row0 : row0 + w_rows.shape[0]])
    return dest


# Split-K partial sums and per-tile arrival counters, zero between launches (see _finish_split). Allocated
# once per device and never moved, since CUDA graphs keep their addresses.
SPLIT_WS_FLOATS = 2**21
SPLIT_WS_TILES = 2**14
_split_ws: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_fits(outputs: int, tiles: int) -> bool:
    return outputs <= SPLIT_WS_FLOATS and tiles <= SPLIT_WS_TILES


def _split_workspace(device: torch.device, outputs: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The workspace and counters for a split-K launch of `outputs` values in `tiles` output tiles (0 tiles:
    no split; the kernel gets the pointers and leaves them alone)."""
    if device not in _split_ws:
        _split_ws[device] = (
            torch.zeros(SPLIT_WS_FLOATS, device=device),
            torch.zeros(SPLIT_WS_TILES, dtype=torch.int32, device=device),
        )
    ws, counts = _split_ws[device]
    if tiles and (outputs > ws.numel() or tiles > counts.numel()):
        raise ValueError(f"split-K over {outputs} outputs in {tiles} tiles exceeds the workspace")
    return ws, counts


def _check_config(w: W4Packed, cfg: dict, groups_per_tile: bool = False) -> None:
    """The kernels take one group's scale per K tile: a tile must lie within a group. The GEMV also takes
    tiles of several whole groups (groups_per_tile), which must divide K."""
    bk, g, k = cfg["BLOCK_K"], w.group_size, w.shape[1]
    if groups_per_tile and bk > g:
        if bk % g or k % bk:
            raise ValueError(f"BLOCK_K={bk} must be a multiple of the group size {g} that divides K={k}")
    elif g % bk:
        raise ValueError(f"BLOCK_K={bk} must divide the group size {g}")


def _splits(tiles: int, iters: int, sms: int, outputs: int, deep: bool = False) -> list[int]:
    """Splits along K worth trying: none, and (where the workspace holds the outputs) enough to give every
    SM two programs (at least 2 iterations each), half that and twice that. deep: also four times that, down
    to one iteration a program: for the GEMV, whose split is a runtime argument (no compile per split), and
    for the tensor-core kernel at N <= 64, whose small tiles leave room for many programs an SM (on an H200,
    12288 x 4096 at N = 16 and 32 ran 10-30% faster split 6-11 ways than the 2-4 ways the others allow)."""
    if not _split_fits(outputs, tiles):
        return [1]
    want = min(max(1, -(-2 * sms // tiles)), max(1, iters // 2))
    splits = {1, max(1, want // 2), want, min(2 * want, max(1, iters // 2))}
    return sorted(splits | {min(4 * want, iters)} if deep else splits)


GEMV_ROWS_MAX = 8  # tokens up to which the tuner also tries the GEMV over several rows

# GEMV tiles (rows, K, warps): 8 to 32 words of weights per thread. The fewer registers a tile takes, the more
# warps an SM runs, and the GEMV needs them to hide its loads and its dependent integer-float chains.
_GEMV_TILES = (
    (128, 64, 4),
    (128, 128, 4),
    (256, 64, 4),
    (256, 128, 4),
    (256, 64, 8),
    (256, 128, 8),
    (512, 64, 8),
    (512, 128, 8),
)
# Tiles of several whole groups (rows, groups, warps): 2-4 x 64 contiguous bytes of each row per load.
_GEMV_WIDE_TILES = (
    (16, 4, 2),
    (32, 4, 2),
    (32, 4, 4),
    (64, 2, 4),
    (64, 4, 4),
    (128, 2, 4),
    (64, 4, 8),
    (128, 4, 8),
)


def _no_taller_than(tiles: list[tuple[int, ...]], m: int) -> list[tuple[int, ...]]:
    """Tiles (rows first) no taller than M rounded up to a power of two, else the shortest: a taller tile
    adds only rows past M, and each tile shape the tuner tries costs a compile."""
    return [t for t in tiles if t[0] <= triton.next_power_of_2(m)] or [min(tiles)]


def _gemv_configs(m: int, k: int, g: int, sms: int, dtype: torch.dtype, pdl: bool) -> list[dict]:
    """pdl: also try a program prefetching all its K tiles into L2 while the previous kernel runs (one
    pipeline stage: the tuner's pick on most shapes), not only its first."""
    pairs = dtype == torch.float16  # products in fp16 pairs: 15-30% faster on an H200 (kernels-notes, v8)
    if interpreting():
        return [dict(BLOCK_M=16, BLOCK_K=min(64, g), SPLIT_K=2, num_warps=4, num_stages=1, PAIRS=pairs)]
    tiles = sorted({(bm, min(bk, g), w) for bm, bk, w in _GEMV_TILES})
    tiles += [(bm, groups * g, w) for bm, groups, w in _GEMV_WIDE_TILES if k % (groups * g) == 0]
    tiles = _no_taller_than(tiles, m)
    return [
        dict(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=st, PAIRS=pairs, PREFETCH=pf)
        for bm, bk, w in tiles
        for sk in _splits(triton.cdiv(m, bm), k // bk, sms, m, deep=True)
        for st, pf in [(1, 1), (2, 1), (4, 1)] + ([(1, k // bk)] if pdl else [])
    ]


def _gemv_rows_configs(n: int, m: int, k: int, g: int, sms: int, dtype: torch.dtype) -> list[dict]:
    """For 2 <= n <= GEMV_ROWS_MAX: the GEMV's tiles with about as many products per thread as its own, and
    the pipeline depth the GEMV's tuning picked for most shapes (each variant costs a compile at start-up).
    fp16 pairs take twice the rows: a thread's sums of x and its x pairs serve all its rows (offline sm_90
    builds at two rows: 32 instructions a word in 128-row tiles, 40 in 64-row ones)."""
    if n > GEMV_ROWS_MAX or interpreting():
        return []
    pairs = dtype == torch.float16
    rows_per_n = 2 if pairs else 1
    tiles = _no_taller_than(
        sorted({(max(32, rows_per_n * bm // n), min(bk, g), w) for bm, bk, w in _GEMV_TILES}), m
    )
    base = dict(GEMV_ROWS=True, BLOCK_N=n, num_stages=2, PAIRS=pairs)
    return [
        dict(base, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, num_warps=w)
        for bm, bk, w in tiles
        for sk in _splits(triton.cdiv(m, bm), k // bk, sms, n * m)
    ]


def _gemm_configs(n: int, m: int, k: int, g: int, sms: int) -> list[dict]:
    if interpreting():
        return [dict(BLOCK_N=16, BLOCK_M=32, BLOCK_K=min(64, g), SPLIT_K=1, num_warps=4, num_stages=1)]
    if n <= 16:
        shapes = [(16, bm, bk, 4, st) for bm in (64, 128) for bk in sorted({min(64, g), g}) for st in (3, 5)]
    elif n <= 64:
        shapes = [(bn, bm, bk, 4, 4) for bn in (32, 64) for bm in (64, 128) for bk in sorted({min(64, g), g})]
    else:
        shapes = [
            (64, 128, 64, 4, 4),
            (128, 128, 64, 8, 3),
            (128, 128, 128, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (64, 256, 128, 8, 3),
        ]
    configs = [dict(DEQUANT=True, BLOCK_M=32, BLOCK_K=g)] if n >= 128 else []
    for bn, bm, bk, w, st in sorted({(bn, bm, min(bk, g), w, st) for bn, bm, bk, w, st in shapes}):
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        splits = _splits(tiles, k // bk, sms, n * m, deep=True) if n <= 64 else [1]
        configs += [
            dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=st) for sk in splits
        ]
    return configs


def _pairs(x: torch.Tensor, cfg: dict) -> bool:
    """The fp16x2 products where the config asks for them and they apply: fp16 x on 4 bytes (every row), and K
    tiles of at least four words a row (a thread's chain)."""
    return (
        cfg.get("PAIRS", False)
        and x.dtype == torch.float16
        and x.data_ptr() % 4 == 0
        and x.stride(0) % 2 == 0
        and cfg["BLOCK_K"] >= 32
    )


def _launch_gemv(x: torch.Tensor, w: W4Packed, cfg: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    _check_config(w, cfg, groups_per_tile=True)
    m, k = w.shape
    split = cfg["SPLIT_K"]
    dest = out if out is not None else x.new_empty(1, m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), split)
    ws, counts = _split_workspace(x.device, m, grid[0] if split > 1 else 0)
    _w4_gemv_kernel[grid](
        x,
        w.qweight,
        w.scales,
        w.bias,
        dest,
        ws,
        counts,
        m,
        k,
        split,
        cfg.get("PREFETCH", 1),
        ONE_BITS,
        G=w.group_size,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        STAGES=cfg["num_stages"],
        PAIRS=_pairs(x, cfg),
        ASM=not interpreting(),
        num_warps=cfg["num_warps"],
        **pdl_launch_args(x.device),
    )
    return dest


def _launch_gemv_rows(
    x: torch.Tensor, w: W4Packed, cfg: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    _check_config(w, cfg)
    n, k = x.shape
    m = w.shape[0]
    if n > cfg["BLOCK_N"]:
        raise ValueError(f"the GEMV of several rows takes at most BLOCK_N={cfg['BLOCK_N']} rows, got {n}")
    split = cfg["SPLIT_K"]
    dest = out if out is not None else x.new_empty(n, m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), split)
    ws, counts = _split_workspace(x.device, n * m, grid[0] if split > 1 else 0)
    _w4_gemv_rows_kernel[grid](
        x,
        w.qweight,
        w.scales,
        w.bias,
        dest,
        ws,
        counts,
        n,
        m,
        k,
        x.stride(0),
        dest.stride(0),
        split,
        ONE_BITS,
        G=w.group_size,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        STAGES=cfg["num_stages"],
        PAIRS=_pairs(x, cfg),
        ASM=not interpreting(),
        num_warps=cfg["num_warps"],
        **pdl_launch_args(x.device),
    )
    return dest


def _launch_gemm(x: torch.Tensor, w: W4Packed, cfg: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    _check_config(w, cfg)
    n, k = x.shape
    m = w.shape[0]
    dest = out if out is not None else x.new_empty(n, m)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), cfg["SPLIT_K"])
    ws, counts = _split_workspace(x.device, n * m, grid[0] * grid[1] if cfg["SPLIT_K"] > 1 else 0)
    _w4_gemm_kernel[grid](
        x,
        w.qweight,
        w.scales,
        w.bias,
        dest,
        ws,
        counts,
        n,
        m,
        k,
        x.stride(0),
        dest.stride(0),
        ONE_BITS,
        G=w.group_size,
        **pdl_launch_args(x.device),
        **cfg,
    )
    return dest


_tuner = DiskTuner("w4a16_matmul", __file__)
_cold_weights_lock = threading.Lock()  # one for all: an eager call that does not tune builds none


def w4a16_matmul(
    x: torch.Tensor, w: W4Packed, out: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """x float16/bfloat16 [N, K] (or [..., K]), w from prepack -> x @ W.T, [N, M] (or [..., M]) in x's dtype.

    out: optional contiguous destination of that shape and dtype. config: force one block shape (tests);
    by default it is tuned per shape on the GPU."""
    check_tensor("x", x, dtypes=HALF_DTYPES)
    if not isinstance(w, W4Packed):
        raise ValueError(f"w must be a W4Packed from w4a16_matmul.prepack, got {type(w).__name__}")
    m, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight has K={k}")
    for name in ("qweight", "scales", "bias"):
        check_tensor(f"w.{name}", getattr(w, name), device=x.device, contiguous=True)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=(*lead, m), device=x.device, contiguous=True)
    if n == 0:
        return x.new_empty(*lead, m) if out is None else out
    if config is None:
        sms = num_sms(x.device)
        bucket = (
            triton.next_power_of_2(n) if n <= GEMV_ROWS_MAX else max(16, min(triton.next_power_of_2(n), 4096))
        )
        key = f"{bucket}:{m}:{k}:{w.group_size}:{x.dtype}:{sms}"
        g = w.group_size
        cold_weight = _cold_weights(w)
        tuning_x = _after_a_kernel(x2) if n <= GEMV_ROWS_MAX else lambda: x2
        config = _tuner.pick(
            key,
            lambda: (
                _gemv_configs(m, k, g, sms, x.dtype, pdl_enabled(x.device))
                if n == 1
                else _gemm_configs(bucket, m, k, g, sms) + _gemv_rows_configs(bucket, m, k, g, sms, x.dtype)
            ),
            lambda c: _launcher(n, c)(tuning_x(), cold_weight(), c),
            _build,
        )
    return _launcher(n, config)(x2, w, config, None if out is None else out.view(n, m)).view(*lead, m)


def _after_a_kernel(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """For tuning decode sizes: a function that returns an input shaped like x (zeros: SiLU of zeros times
    x) made anew by a short PDL kernel, as a decode step's matmuls get theirs from a norm, attention or SiLU.
    Timed one after another instead, each GEMV's prefetch overlapped a whole GEMV, and configs 5-10% faster
    there were no faster in the step (kernels-notes v10, v16)."""
    gate_up: list[torch.Tensor] = []

    def made() -> torch.Tensor:
        with _cold_weights_lock:
            if not gate_up:
                gate_up.append(torch.cat([torch.zeros_like(x), x], dim=1))  # silu(0) * x = 0 * x: finite
        return silu_mul(gate_up[0])

    return made


def _cold_weights(w: W4Packed) -> Callable[[], W4Packed]:
    """For tuning: a function that returns w and, from its second call on, copies of it in turn, enough that
    a call never finds its weight in the L2 cache. In a model the other layers' weights pass through L2
    between two uses of one; timed on one weight, a 25 MB int4 matrix stayed in the 50 MB L2 and the tuner's
    picks followed that. It may be called from several threads (the tuner compiles on a pool)."""

    def weights() -> Iterator[W4Packed]:
        yield w
        nbytes = sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.bias))
        l2 = torch.cuda.get_device_properties(w.qweight.device).L2_cache_size
        copies = [w] + [
            W4Packed(w.qweight.clone(), w.scales.clone(), w.bias.clone(), w.group_size)
            for _ in range(min(7, -(-2 * l2 // nbytes)))
        ]
        yield from itertools.cycle(copies)

    each = weights()

    def take() -> W4Packed:
        with _cold_weights_lock:
            return next(each)

    return take


def _build(config: dict) -> tuple | None:
    """What a config compiles to, for the tuner: the GEMVs take their split and prefetch depth at run time,
    and the cuBLAS configs build only the dequantize kernel."""
    if config.get("DEQUANT"):
        return None
    gemv = "BLOCK_N" not in config or config.get("GEMV_ROWS")
    return tuple(sorted((k, v) for k, v in config.items() if not (gemv and k in ("SPLIT_K", "PREFETCH"))))


def _launcher(n: int, config: dict) -> Callable:
    if n == 1:
        return _launch_gemv
    if config.get("GEMV_ROWS"):
        return _launch_gemv_rows
    return _launch_dequant_matmul if config.get("DEQUANT") else _launch_gemm


def w4a16_matmul_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """The same product in float32 from the spec format: x [..., K] -> [..., M] float32."""
    return x.float() @ w.dequantize(torch.float32).t()
