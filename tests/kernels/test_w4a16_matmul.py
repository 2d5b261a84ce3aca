"""W4A16 matmul against the float32 reference from the spec format."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels import w4a16_matmul as mod
from perfxllm.quant.formats import Int4Weight, pack_int4

TOL = 3e-3  # fp16 activations and outputs, fp32 accumulation


def random_int4(m: int, k: int, g: int, float_min: bool = False, seed: int = 0) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed)
    wq = torch.randint(0, 16, (m, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(m, k // g, generator=gen) * 0.02 + 0.001).half()
    if float_min:
        zeros = (torch.randn(m, k // g, generator=gen) * 0.1).half()
    else:
        zeros = pack_int4(torch.randint(0, 16, (m, k // g), generator=gen, dtype=torch.uint8))
    return Int4Weight(pack_int4(wq), scales, zeros, g)


def run_case(n, m, k, g, device, rel_err, config=None, float_min=False, seed=0):
    w = random_int4(m, k, g, float_min, seed)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)).half()
    ref = mod.w4a16_matmul_ref(x, w)
    packed = mod.prepack(w.to(device))
    out = torch.full((n, m), float("nan"), device=device, dtype=torch.float16)
    res = mod.w4a16_matmul(x.to(device), packed, out=out, config=config)
    assert res.data_ptr() == out.data_ptr()
    assert out.dtype == torch.float16 and out.shape == (n, m)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("n", [1, 3])
def test_gemv_group_sizes(n, g, device, rel_err):
    run_case(n, 40, 3 * 128, g, device, rel_err, seed=g + n)


@pytest.mark.parametrize("n", [1, 2, 16, 17])
def test_switch_points(n, device, rel_err):
    """Both sides of the GEMV -> tensor-core switch (N = 1 -> 2) and of the first tuning bucket (16)."""
    run_case(n, 24, 192, 64, device, rel_err, seed=n)


def test_gemm_ragged(device, rel_err):
    run_case(37, 72, 320, 32, device, rel_err, seed=5)


def test_float_minimum_zeros(device, rel_err):
    run_case(2, 16, 128, 32, device, rel_err, float_min=True)


@pytest.mark.parametrize("split_k", [1, 3])
def test_split_k(split_k, device, rel_err):
    cfg = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=32, SPLIT_K=split_k, num_warps=4, num_stages=1)
    run_case(2, 20, 224, 32, device, rel_err, config=cfg)
    run_case(2, 20, 224, 32, device, rel_err, config=cfg, seed=1)  # again, on the workspace left behind
    run_case(2, 20, 224, 32, device, rel_err, config=cfg, float_min=True, seed=2)
    assert_split_workspace_clean(device)


@pytest.mark.parametrize(("k", "g", "split_k"), [(160, 32, 4), (256, 64, 3)])
def test_split_k_scales_a_tile_ahead(k, g, split_k, device, rel_err):
    """The tensor-core kernel loads each K tile's scale and bias one tile ahead: splits that start inside a
    group (K tiles of half a group) and a split left with no tile (5 tiles in 4 splits of 2) still use each
    tile's own group."""
    cfg = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=32, SPLIT_K=split_k, num_warps=4, num_stages=1)
    run_case(3, 24, k, g, device, rel_err, config=cfg, seed=7)
    assert_split_workspace_clean(device)


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize(("n", "block_n", "split_k", "g"), [(2, 2, 1, 128), (3, 4, 3, 32), (8, 8, 2, 64)])
def test_gemv_over_several_rows(n, block_n, split_k, g, pairs, device, rel_err):
    """The GEMV that unpacks each weight tile once for a few rows of x, with padding rows and split K, its
    products in float32 or in fp16 pairs (float32 emulation under the interpreter)."""
    cfg = dict(
        GEMV_ROWS=True,
        BLOCK_N=block_n,
        BLOCK_M=16,
        BLOCK_K=32 if g == 32 else 64,
        SPLIT_K=split_k,
        num_warps=4,
        num_stages=1,
        PAIRS=pairs,
    )
    run_case(n, 40, 256, g, device, rel_err, config=cfg, seed=n)
    run_case(n, 40, 256, g, device, rel_err, config=cfg, seed=n + 1)  # again, on the workspace left behind
    run_case(n, 40, 256, g, device, rel_err, config=cfg, float_min=True, seed=n + 2)
    if split_k > 1:
        assert_split_workspace_clean(device)
    with pytest.raises(ValueError, match="at most BLOCK_N"):
        run_case(block_n + 1, 40, 256, g, device, rel_err, config=cfg)


def test_unsplit_launches_ignore_the_workspace_size(device, rel_err, monkeypatch):
    """Only a split launch needs its outputs to fit the split-K workspace."""
    monkeypatch.setattr(mod, "SPLIT_WS_FLOATS", 16)
    monkeypatch.setattr(mod, "_split_ws", {})  # a workspace of that size, dropped after the test
    gemv = dict(BLOCK_M=16, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=1)
    run_case(1, 40, 128, 64, device, rel_err, config=gemv)
    gemm = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=1)
    run_case(3, 40, 128, 32, device, rel_err, config=gemm)
    with pytest.raises(ValueError, match="workspace"):
        run_case(3, 40, 128, 32, device, rel_err, config={**gemm, "SPLIT_K": 2})


def assert_split_workspace_clean(device):
    """The last split of each tile leaves the partial sums and the arrival counters at zero."""
    assert mod._split_ws
    for ws, counts in mod._split_ws.values():
        assert not ws.any() and not counts.any()


def test_tuner_skips_tiles_taller_than_the_matrix(monkeypatch):
    """The GPU's candidate lists (built on the CPU here): no tile taller than M rounded up to a power of two,
    else the shortest tile; a 7B shape keeps every tile."""
    monkeypatch.setattr(mod, "interpreting", lambda: False)
    small = mod._gemv_configs(40, 512, 128, 132, torch.float16, True)
    assert small and {c["BLOCK_M"] for c in small} <= {16, 32, 64}
    no_wide_tile = mod._gemv_configs(40, 384, 128, 132, torch.float16, True)  # 384: no 2 or 4 whole groups
    assert {c["BLOCK_M"] for c in no_wide_tile} == {128}
    rows = mod._gemv_rows_configs(4, 40, 512, 128, 132, torch.float16)
    assert rows and {c["BLOCK_M"] for c in rows} <= {32, 64}
    big = mod._gemv_configs(12288, 4096, 128, 132, torch.float16, True)
    assert {c["BLOCK_M"] for c in big} == {16, 32, 64, 128, 256, 512}


def test_config_tiles_must_lie_within_a_group(device, rel_err):
    cfg = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide the group size 32"):
        run_case(2, 16, 128, 32, device, rel_err, config=cfg)
    gemv = dict(BLOCK_M=16, BLOCK_K=96, SPLIT_K=1, num_warps=4, num_stages=1)  # the GEMV: whole groups
    with pytest.raises(ValueError, match="BLOCK_K=96 must be a multiple of the group size 32 that divides"):
        run_case(1, 16, 128, 32, device, rel_err, config=gemv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the Triton interpreter")
@pytest.mark.parametrize("split_k", [1, 3])
def test_tensor_cores_bfloat16(split_k, rel_err):
    w = random_int4(72, 384, 64, seed=9)
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(10)).bfloat16()
    cfg = dict(BLOCK_N=16, BLOCK_M=64, BLOCK_K=64, SPLIT_K=split_k, num_warps=4, num_stages=2)
    out = mod.w4a16_matmul(x.cuda(), mod.prepack(w.to("cuda")), config=cfg)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, mod.w4a16_matmul_ref(x, w)) < 1e-2
    assert_split_workspace_clean("cuda")


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize(
    ("g", "block_k", "split_k", "stages"),
    [
        (32, 16, 2, 1),
        (32, 32, 1, 1),
        (64, 64, 3, 2),
        (128, 64, 2, 4),
        (128, 128, 5, 1),
        (64, 256, 2, 2),
        (128, 256, 1, 1),
    ],
)
def test_gemv_tiles(g, block_k, split_k, stages, pairs, device, rel_err):
    """N = 1 with K tiles of part of a group, one group or several (ragged M, splits that do not divide the
    tiles evenly), with weight tiles loaded ahead or not, products in float32 or in fp16 pairs (which need
    four words a row: BLOCK_K = 16 takes float32)."""
    cfg = dict(BLOCK_M=16, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=stages, PAIRS=pairs)
    run_case(1, 40, 1536, g, device, rel_err, config=cfg, seed=block_k + split_k)
    run_case(1, 24, 1536, g, device, rel_err, config=cfg, float_min=True, seed=g)
    assert_split_workspace_clean(device)


def test_gemv_bfloat16(device, rel_err):
    w = random_int4(40, 256, 64, seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    out = mod.w4a16_matmul(x.to(device), mod.prepack(w.to(device)))
    assert out.dtype == torch.bfloat16
    assert rel_err(out, mod.w4a16_matmul_ref(x, w)) < 1e-2


def test_prepack_places_each_channel_in_its_nibble():
    """Word w of a row holds channels 8w..8w+7 at the bit offsets the kernels read them from."""
    w = random_int4(3, 64, 32, seed=7)
    words = mod.prepack(w).qweight.long() & 0xFFFFFFFF
    q = w.unpack().long().view(3, 8, 8)
    shifts = torch.tensor(mod._NIBBLE_SHIFT)
    assert torch.equal((words[:, :, None] >> shifts) & 15, q)
    assert sorted(mod._NIBBLE_SHIFT) == list(range(0, 32, 4))


def test_leading_dims(device):
    w = random_int4(16, 64, 32)
    x = torch.randn(2, 3, 64).half()
    out = mod.w4a16_matmul(x.to(device), mod.prepack(w.to(device)))
    assert out.shape == (2, 3, 16)


def test_errors(device):
    packed = mod.prepack(random_int4(16, 64, 32).to(device))
    with pytest.raises(ValueError, match="dtype"):
        mod.w4a16_matmul(torch.randn(2, 64, device=device), packed)
    with pytest.raises(ValueError, match="K=64"):
        mod.w4a16_matmul(torch.randn(2, 96, device=device).half(), packed)
    with pytest.raises(ValueError, match="W4Packed"):
        mod.w4a16_matmul(torch.randn(2, 64, device=device).half(), torch.zeros(16, 32))
    with pytest.raises(ValueError, match="group size"):
        mod.prepack(
            Int4Weight(
                torch.zeros(4, 48, dtype=torch.uint8),
                torch.ones(4, 1).half(),
                torch.zeros(4, 1, dtype=torch.uint8),
                96,
            )
        )


@pytest.mark.parametrize("scratch_rows", [None, 32])
def test_dequantize_then_matmul(scratch_rows, device, rel_err, monkeypatch):
    """The large-N path: W dequantized into the scratch buffer (in slices when it does not fit) and one
    matmul per slice."""
    if scratch_rows is not None:
        monkeypatch.setattr(mod, "SCRATCH_BYTES", scratch_rows * 2 * 256)
        monkeypatch.setattr(mod, "_scratch", {})
    cfg = dict(DEQUANT=True, BLOCK_M=16, BLOCK_K=64)
    run_case(33, 80, 256, 64, device, rel_err, config=cfg, seed=11)


GEMV_ROWS_PAIRS = dict(GEMV_ROWS=True, BLOCK_K=64, num_warps=4, num_stages=2, PAIRS=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16x2 PTX runs on the GPU only")
@pytest.mark.parametrize(
    "cfg",
    [
        dict(BLOCK_M=32, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=2, PAIRS=True),
        dict(BLOCK_M=16, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=1, PAIRS=True),
        dict(BLOCK_M=32, BLOCK_K=256, SPLIT_K=2, num_warps=2, num_stages=2, PAIRS=True),
        dict(GEMV_ROWS_PAIRS, BLOCK_N=4, BLOCK_M=32, SPLIT_K=3),
        dict(GEMV_ROWS_PAIRS, BLOCK_N=2, BLOCK_M=64, SPLIT_K=1),
    ],
)
@pytest.mark.parametrize("float_min", [False, True])
def test_fp16_pairs_in_ptx(cfg, float_min, rel_err):
    """The GEMVs' products in fp16x2 PTX against the reference, also with activations as large as Llama's
    outliers (the fp16 products must not overflow); three rows in a GEMV of four."""
    n = 3 if cfg.get("BLOCK_N") == 4 else cfg.get("BLOCK_N", 1)
    w = random_int4(200, 1024, 64, float_min, seed=21)
    packed = mod.prepack(w.to("cuda"))
    for scale in (1.0, 2000.0):
        x = (torch.randn(n, 1024, generator=torch.Generator().manual_seed(22)) * scale).half()
        x[:, 5] = 30000.0 if scale > 1 else x[:, 5]
        out = mod.w4a16_matmul(x.cuda(), packed, config=cfg)
        assert rel_err(out, mod.w4a16_matmul_ref(x, w)) < TOL
    assert_split_workspace_clean("cuda")


def test_tuner_splits_small_n_deep(monkeypatch):
    """At N <= 64 the tensor-core kernel's candidates include splits of four times the two programs an SM
    (8 for a 12288 x 4096 weight in 64-row tiles), where an H200 found its fastest configs."""
    monkeypatch.setattr(mod, "interpreting", lambda: False)
    for n in (16, 32):
        splits = {c["SPLIT_K"] for c in mod._gemm_configs(n, 12288, 4096, 128, 132) if c["BLOCK_M"] == 64}
        assert {1, 2, 4, 8} <= splits


def test_tuner_cold_weights_from_threads(monkeypatch):
    """The tuner's weights: w first, then w and its copies in turn (enough to overflow twice the L2 cache,
    at most 7), one to each call, from any thread."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    packed = mod.prepack(random_int4(64, 256, 128))
    nbytes = sum(t.numel() * t.element_size() for t in (packed.qweight, packed.scales, packed.bias))
    l2 = SimpleNamespace(L2_cache_size=nbytes)  # two copies' worth: w and 2 copies in the cycle
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: l2)
    take = mod._cold_weights(packed)
    assert take() is packed
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: take(), range(30)))
    assert len(got) == 30 and len({id(w) for w in got}) == 3 and sum(w is packed for w in got) == 10
    assert all(torch.equal(w.qweight, packed.qweight) for w in got)


def test_tuner_builds_each_kernel_once(monkeypatch):
    """The tuner compiles one config per build ahead of timing: the GEMVs take their split and prefetch depth
    at run time (so those share a build), the tensor-core kernel its split as a constant, and the cuBLAS
    configs build nothing ahead."""
    monkeypatch.setattr(mod, "interpreting", lambda: False)
    gemv = mod._gemv_configs(12288, 4096, 128, 132, torch.float16, pdl=True)
    assert len({mod._build(c) for c in gemv}) == len(
        {(c["BLOCK_M"], c["BLOCK_K"], c["num_warps"], c["num_stages"]) for c in gemv}
    )
    gemm = mod._gemm_configs(16, 12288, 4096, 128, 132)
    assert len({mod._build(c) for c in gemm}) == len(gemm)
    rows = mod._gemv_rows_configs(4, 12288, 4096, 128, 132, torch.float16)
    assert len({mod._build(c) for c in rows}) < len(rows)
    assert [mod._build(c) for c in mod._gemm_configs(256, 4096, 4096, 128, 132) if c.get("DEQUANT")] == [None]


def test_tuning_input_comes_from_a_kernel(device):
    """Decode sizes are tuned on x made anew by a short kernel each call (as in a decode step): same shape and
    dtype, finite, and the caller's x untouched."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)).half().to(device)
    before = x.clone()
    made = mod._after_a_kernel(x)
    first, second = made(), made()
    assert first.shape == x.shape and first.dtype == x.dtype and first.data_ptr() != second.data_ptr()
    assert torch.isfinite(first).all() and torch.equal(x, before)
