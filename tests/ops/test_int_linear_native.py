"""The native CPU kernels of ``torchcompress::int_linear`` against the pure-PyTorch reference.

Every instruction set this CPU has (avx512, avx2, portable) and both paths (fused GEMV, tiled
dequant + GEMM) are checked on shapes with 1x1, odd K/N, partial last groups, odd group sizes and
batches 1..64, for fp32/bf16/fp16 activations. Tolerances come from measured errors: against an
fp64 product of the same dequantized weights, the kernels' fp32 error was <= 1.4e-6 of max|y|
(the reference's own: <= 1.1e-6); bf16/fp16 results differ from the reference by their output
rounding (and the reference's rounding of the weights to bf16/fp16).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from torchcompress.config import QuantScheme
from torchcompress.ops import native
from torchcompress.ops.fastpath import int_linear_fast
from torchcompress.ops.int_linear import _reference, dequantize_packed
from torchcompress.primitives.affine import quantize_affine
from torchcompress.primitives.packing import pack

HAS_CXX = shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture(scope="module")
def ext():
    if not HAS_CXX:
        pytest.skip("no C++ compiler on PATH: the native extension cannot be built here")
    mod = native.load_native()
    assert mod is not None, "a compiler is present, so the extension must build"
    return mod


def _isas():
    if not HAS_CXX:
        return ["none"]
    mod = native.load_native()
    return mod.available_isas() if mod is not None else ["none"]


ISAS = _isas()
PATHS = ["gemv", "tiled"]
# (out N, in K, group_size): 1x1, odd K/N, K=576 g128 (partial last group), odd group sizes
# (4-bit groups that do not start on a byte: portable path), K < group, group of 48 (not a SIMD multiple),
# K = 160 g32 (the one-row kernel's full-group-of-32 loop: two groups per step, then an odd last group)
SHAPES = [(1, 1, 128), (3, 7, 4), (5, 576, 128), (17, 100, 32), (9, 33, 3), (64, 256, 48), (31, 130, 128), (40, 64, 64),
          (7, 160, 32)]
TOL = {  # (rtol, atol as a fraction of max|y_ref|)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


def _packed(n, k, scheme):
    w = torch.randn(n, k)
    q = quantize_affine(w, scheme)
    return pack(q.codes, scheme.bits), q.scale, q.zero, q.group_size


def _close(got, ref, dtype, what):
    rtol, atol = TOL[dtype]
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def _cases(dtype):
    # every shape with group granularity and both symmetries; channel/tensor on two shapes; batches
    # cycle through 1..64 so that each shape meets several (the 16-wide, 8-wide and 1..4 passes)
    batches = (1, 2, 5, 8, 9, 16, 17, 64)
    i = 0
    for n, k, gs in SHAPES if dtype is torch.float32 else SHAPES[::2]:
        for sym in (True, False):
            for gran in ("group",) + (("channel", "tensor") if k in (7, 130) else ()):
                yield n, k, gs, sym, gran, (batches[i % 8], batches[(i + 3) % 8])
                i += 1


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_match_reference(ext, isa, bits, dtype):
    for n, k, gs, sym, gran, batches in _cases(dtype):
        scheme = QuantScheme(bits=bits, group_size=gs, symmetric=sym, granularity=gran)
        qw, scale, zero, g = _packed(n, k, scheme)
        bias = torch.randn(n) if n % 2 else None
        for m in batches:
            x = torch.randn(m, k).to(dtype)
            ref = _reference(x, qw, scale, zero, bias, bits, g, k)
            for path in PATHS:
                got = ext.int_linear(x, qw, scale, zero, bias, bits, g, k, isa, path)
                _close(got, ref, dtype, f"{isa}/{path} n={n} k={k} gs={g} {gran} sym={sym} m={m}")


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_error_no_worse_than_reference(ext, isa):
    # Against an fp64 product of the same dequantized weights: the fused kernel (which folds the zero
    # point into per-group sums of x) must be about as accurate as dequantize + fp32 matmul.
    for bits, sym in ((4, True), (4, False), (8, True), (8, False)):
        qw, scale, zero, g = _packed(96, 4096, QuantScheme(bits=bits, group_size=128, symmetric=sym))
        w = dequantize_packed(qw, scale, zero, bits, g, 4096, torch.float64)
        x = torch.randn(4, 4096) + 0.5  # a non-zero mean makes the zero-point fold cancel more
        exact = x.double() @ w.T
        ref_err = (_reference(x, qw, scale, zero, None, bits, g, 4096).double() - exact).abs().max()
        for path in PATHS:
            err = (ext.int_linear(x, qw, scale, zero, None, bits, g, 4096, isa, path).double() - exact).abs().max()
            assert err <= 8 * ref_err + 1e-6 * exact.abs().max(), (bits, sym, path, float(err), float(ref_err))


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_scale_dtypes_and_3d_noncontiguous_input(ext, scale_dtype):
    qw, scale, zero, g = _packed(24, 160, QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype=scale_dtype))
    x = torch.randn(160, 3, 2).permute(1, 2, 0)  # (3, 2, 160), not contiguous
    ref = _reference(x, qw, scale, zero, None, 4, g, 160)
    for isa in ext.available_isas():
        got = ext.int_linear(x, qw, scale, zero, None, 4, g, 160, isa, "auto")
        _close(got, ref, torch.float32, f"{isa} scale {scale_dtype}")


def test_op_dispatches_to_native_and_reference_env(ext, monkeypatch):
    qw, scale, zero, g = _packed(33, 256, QuantScheme(bits=4, group_size=64))
    x = torch.randn(2, 256)
    fast = int_linear_fast(x, qw, scale, zero, None, 4, g, 256)
    assert fast is not None  # 4-bit on CPU with the extension: the native path is taken
    y_auto = torch.ops.torchcompress.int_linear(x, qw, scale, zero, None, 4, g, 256)
    monkeypatch.setenv("TORCHCOMPRESS_KERNEL", "reference")
    y_ref = torch.ops.torchcompress.int_linear(x, qw, scale, zero, None, 4, g, 256)
    torch.testing.assert_close(y_auto, fast, rtol=0, atol=0)
    _close(y_auto, y_ref, torch.float32, "op auto vs reference")
    assert int_linear_fast(x, *_packed(8, 256, QuantScheme(bits=3, group_size=64))[:2], None, None, 3, 64, 256) is None


def test_opcheck(ext):
    qw, scale, zero, g = _packed(12, 96, QuantScheme(bits=4, group_size=32, symmetric=False))
    x = torch.randn(3, 96, requires_grad=True)
    torch.library.opcheck(torch.ops.torchcompress.int_linear.default, (x, qw, scale, zero, torch.randn(12), 4, g, 96))


def test_bad_arguments_raise(ext):
    qw, scale, zero, g = _packed(8, 64, QuantScheme(bits=4, group_size=32))
    with pytest.raises(RuntimeError, match="bytes per row"):
        ext.int_linear(torch.randn(1, 64), qw[:, :-1], scale, zero, None, 4, g, 64)
    with pytest.raises(RuntimeError, match="in_features"):
        ext.int_linear(torch.randn(1, 63), qw, scale, zero, None, 4, g, 64)
    with pytest.raises(RuntimeError, match="scale shape"):
        ext.int_linear(torch.randn(1, 64), qw, scale[:, :1].repeat(1, 3), zero, None, 4, g, 64)
    with pytest.raises(RuntimeError, match="not available|path must be"):
        ext.int_linear(torch.randn(1, 64), qw, scale, zero, None, 4, g, 64, "sse9", "auto")


def test_build_is_cached_and_keyed(ext, monkeypatch):
    assert native.build() is not None  # second call: loads the cached build
    key = native.build_key()
    monkeypatch.setattr(native, "CFLAGS", native.CFLAGS + ("-DTC_TEST_FLAG",))
    assert native.build_key() != key  # flags are part of the key


def test_no_compiler_warns_once_and_reference_runs(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
        native._check_toolchain()
    monkeypatch.setattr(native, "build", lambda verbose=False: (_ for _ in ()).throw(native.NativeUnavailable("no C++ compiler: test")))
    monkeypatch.setitem(__import__("sys").modules, "torchcompress._C", None)  # no installed build either
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert native._load_once.__wrapped__() is None
    assert len(rec) == 1 and "no C++ compiler" in str(rec[0].message) and "reference" in str(rec[0].message)


@pytest.mark.parametrize("bias", [False, True])
def test_parallel_tiled_path_under_inference_mode(ext, bias):
    # regression: worker threads of the tiled path do not inherit InferenceMode; writing into the
    # (inference) output tensor from them was refused. Large enough to be split across threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        qw, scale, zero, g = _packed(1536, 576, QuantScheme(bits=4, group_size=128, symmetric=False))
        b = torch.randn(1536) if bias else None
        x = torch.randn(2, 40, 576)
        with torch.inference_mode():
            got = torch.ops.torchcompress.int_linear(x, qw, scale, zero, b, 4, g, 576)
        ref = _reference(x, qw, scale, zero, b, 4, g, 576)
        _close(got, ref, torch.float32, "tiled under inference_mode")
    finally:
        torch.set_num_threads(threads)
