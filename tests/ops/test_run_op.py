"""run_op: the op's Python implementation is called directly only in plain eager inference, and the
three quantized Linears give the same outputs on both paths (and still compile to the op)."""

import pytest
import torch
import torch.nn as nn

from torchcompress.ops.backend import run_op


def _recorder():
    calls = []
    return calls, (lambda *a: calls.append("op") or a[0]), (lambda *a: calls.append("impl") or a[0])


def test_direct_only_without_autograd_on_plain_tensors():
    calls, op, impl = _recorder()
    x = torch.randn(3)
    with torch.no_grad():
        run_op(op, impl, x)
    with torch.inference_mode():
        run_op(op, impl, x)
    run_op(op, impl, x)  # grad mode: the op, whose autograd formula gives x its gradient
    with torch.no_grad():
        run_op(op, impl, torch.empty(3, device="meta"))  # the op's fake implementation
        run_op(op, impl, nn.Parameter(x))  # a subclass (DTensor, FakeTensor... alike): the dispatcher
    assert calls == ["impl", "impl", "op", "op", "op"]


def test_compiling_uses_the_op():
    calls, op, impl = _recorder()

    def f(x):
        return run_op(op, impl, x) + 1

    with torch.no_grad():
        torch.compile(f, backend="eager")(torch.randn(3))
    assert calls == ["op"]


def test_jit_tracing_uses_the_op():
    calls, op, impl = _recorder()
    with torch.no_grad():
        torch.jit.trace(lambda x: run_op(op, impl, x) * 2, torch.randn(3), check_trace=False)
    assert calls == ["op"]


def _layer(which: str) -> nn.Module:
    import torchcompress as tc
    from torchcompress.nn.gguf_linear import GGUFLinear
    from torchcompress.primitives.gguf_common import GGMLType

    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    if which == "gguf":
        return GGUFLinear.from_linear(lin, GGMLType.Q4_0)
    if which == "gptq":  # act-order: a data-dependent column -> group map, sorted layout cached
        from torchcompress.primitives.gptq import accumulate_hessian, gptq_quantize
        from torchcompress.nn.gptq_linear import GPTQLinear, module_from_gptq

        x = torch.randn(256, 64) @ torch.randn(64, 64) / 8
        h = accumulate_hessian(torch.zeros(64, 64, dtype=torch.float64), x) * (2 / 256)
        scheme = tc.QuantScheme(bits=4, group_size=32, symmetric=False)
        mod = module_from_gptq(lin, gptq_quantize(lin.weight.detach(), h, scheme, act_order=True), scheme)
        assert type(mod) is GPTQLinear
        return mod
    q = nn.Sequential(lin)
    tc.quantize_(q, tc.QuantScheme(bits=4, group_size=32))
    return q[0]


@pytest.mark.parametrize("which", ["int", "gguf", "gptq"])
def test_modules_same_output_direct_and_through_the_op(which):
    m = _layer(which)
    x = torch.randn(3, 64)
    with torch.no_grad():
        direct = m(x)
    x.requires_grad_(True)
    through_op = m(x)  # grad mode: the custom op
    assert torch.equal(direct, through_op.detach())
    through_op.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        compiled = torch.compile(m, backend="eager", fullgraph=True)(x.detach())
    # traced, GPTQLinear's act-order layout is not the eager cache: the same products, summed in
    # another order (tests/nn/test_gptq_linear.py::test_compiles); the others are bit-identical
    torch.testing.assert_close(compiled, direct, rtol=1e-5, atol=1e-5)
