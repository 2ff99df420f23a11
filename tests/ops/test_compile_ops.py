"""The quantized-Linear ops under torch.compile: fake implementations that agree with the real ones
(``torch.library.opcheck``), and a small decoder-like module (int4 with the K-major copy, GPTQ
act-order, GGUF Q4_K) compiled with ``fullgraph=True`` (any graph break raises) through AOTAutograd,
which runs the fake implementations with symbolic batch sizes, on the CPU path of each op."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchcompress as tc
from tests.ops.test_run_op import _layer


def _int_args(bits=4, gs=32, sym=False, n=24, k=64, m=3):
    from torchcompress.primitives.affine import quantize_affine
    from torchcompress.primitives.kernel_layout import to_kmajor
    from torchcompress.primitives.packing import pack

    q = quantize_affine(torch.randn(n, k), tc.QuantScheme(bits=bits, group_size=gs, symmetric=sym))
    qw = pack(q.codes, bits)
    return (torch.randn(m, k), qw, q.scale, q.zero, torch.randn(n), bits, gs, k, to_kmajor(qw, bits, k))


def test_opcheck_int_linear():
    import torchcompress.ops.int_linear  # noqa: F401  (registers the op)

    args = _int_args()
    torch.library.opcheck(torch.ops.torchcompress.int_linear.default, args)
    torch.library.opcheck(torch.ops.torchcompress.int_linear.default, args[:-1])  # without the K-major copy
    x = args[0].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.torchcompress.int_linear.default, (x, *args[1:]))  # the autograd formula


def test_opcheck_gguf_and_gptq():
    from torchcompress.nn.gguf_linear import GGUFLinear
    from torchcompress.primitives.gguf_common import GGMLType

    g = GGUFLinear.from_linear(nn.Linear(256, 16), GGMLType.Q4_K)
    torch.library.opcheck(torch.ops.torchcompress.gguf_linear.default,
                          (torch.randn(2, 256), g.blocks, None, int(g.qtype), 256))
    p = _layer("gptq")
    layout, gs = p._kernel_layout()
    torch.library.opcheck(torch.ops.torchcompress.gptq_linear.default,
                          (torch.randn(2, 64), p.qweight, p.scale, p.zero, p.g_idx, p.bias, 4, 64, layout.perm,
                           layout.qweight, gs))


class _Step(nn.Module):
    """A decoder step's Linear shapes: up (int4 K-major), act, act-order GPTQ down, GGUF head."""

    def __init__(self):
        super().__init__()
        from torchcompress.nn.gguf_linear import GGUFLinear
        from torchcompress.primitives.gguf_common import GGMLType

        up = nn.Sequential(nn.Linear(64, 64))
        tc.quantize_(up, tc.QuantScheme(bits=4, group_size=32, symmetric=False))
        self.up = up[0].use_kmajor_layout()
        self.down = _layer("gptq")  # (64 -> 24)
        self.proj = nn.Linear(24, 256)  # float, as norms and projections left unquantized
        self.head = GGUFLinear.from_linear(nn.Linear(256, 8), GGMLType.Q4_K)

    def forward(self, x):
        h = self.down(torch.nn.functional.silu(self.up(x)))
        return self.head(self.proj(h))


def test_decoder_step_compiles_without_graph_breaks():
    torch.manual_seed(0)
    m = _Step().eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (1, 5):  # one graph, symbolic batch: the fake implementations run with a SymInt
            x = torch.randn(batch, 64)
            # measured 0.0 (batches 1, 5, 9); traced, GPTQ act-order may sum its sorted columns in another order
            torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)

    def broken(x):
        torch._dynamo.graph_break()
        return x + 1

    with pytest.raises(Exception, match="graph_break|Graph break"):  # fullgraph=True does refuse a break here
        torch.compile(broken, backend="aot_eager", fullgraph=True)(torch.randn(2))
