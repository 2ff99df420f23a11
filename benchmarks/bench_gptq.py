"""GPTQ on single layers: our implementation beside the public reference (IST-DASLab/gptq), on CPU.

For each SmolLM2-135M linear shape it builds a Hessian from correlated inputs with outlier
channels, then runs both implementations on the same weight and Hessian, interleaved
(ours, reference, ours, ...), and prints the median wall time of each, the ratio, and each
result's layer error ``trace(dW H dW^T)`` next to RTN's. The reference is read from a checkout
you point to (never part of this repository)::

    git clone https://github.com/IST-DASLab/gptq /tmp/gptq-ref     # or any copy of gptq.py + quant.py
    OMP_NUM_THREADS=1 python benchmarks/bench_gptq.py --ref /tmp/gptq-ref

The two symmetric grids differ (reference: scale 2*max|w|/(2^b-1) with zero 2^(b-1); ours:
max|w|/(2^(b-1)-1)), so errors are compared in asymmetric mode, where both use the same min/max
grid. The reference keeps its Hessian in float32, so both get the float32-rounded Hessian; then
``same`` (the fraction of weights whose quantized values are identical in both) shows whether the
two compute the same thing (100% but where the Hessian's float32 diagonal has ties: act-order then
sorts them, and the reference's unstable sort may order them otherwise). ``same f64`` compares ours on that Hessian with ours on the unrounded
float64 one: GPTQ's rounding decisions are chaotic in the Hessian's last bits, so this fraction,
with equal layer errors, is the spread two numerically equivalent runs have.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time

import torch
import torch.nn as nn

from torchcompress.config import QuantScheme
from torchcompress.primitives.affine import fake_quantize
from torchcompress.primitives.gptq import gptq_quantize, layer_error

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (in_features, out_features)


def problem(k: int, n: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5)
    x += 0.1 * torch.randn(tokens, k, generator=g)
    x[:, :4] *= 20  # outlier channels
    w = torch.randn(n, k, generator=g) * 0.05
    h = (x.double().T @ x.double()) * (2 / tokens)
    return w, h


def run_reference(mod, w, h, bits, group, act_order):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    q = mod.gptq.GPTQ(layer)
    q.H = h.float().clone()
    q.quantizer = mod.quant.Quantizer()
    q.quantizer.configure(bits, perchannel=True, sym=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its own timing and error
        q.fasterquant(blocksize=128, percdamp=0.01, groupsize=group, actorder=act_order)
    return layer.weight.data.clone()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="directory holding the reference gptq.py and quant.py")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--act-order", action="store_true")
    args = p.parse_args(argv)

    sys.path.insert(0, args.ref)
    torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs CUDA unconditionally
    import types

    import gptq as ref_gptq  # noqa: E402
    import quant as ref_quant  # noqa: E402

    mod = types.SimpleNamespace(gptq=ref_gptq, quant=ref_quant)
    scheme = QuantScheme(bits=args.bits, group_size=args.group, symmetric=False, scale_dtype="float32")
    print(f"W{args.bits} g{args.group} asym act_order={args.act_order}, {args.tokens} tokens, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'K x N':>11} | {'ours s':>7} {'ref s':>7} {'ref/ours':>8} | {'err ours':>10} {'err ref':>10} {'err RTN':>10} | {'same':>6} {'same f64':>8}")
    for k, n in SHAPES:
        w, h64 = problem(k, n, args.tokens, seed=k + n)
        h = h64.float().double()  # float32 values: what the reference holds
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours = gptq_quantize(w, h, scheme, act_order=args.act_order).dequantize()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = run_reference(mod, w, h, args.bits, args.group, args.act_order)
            t_ref.append(time.perf_counter() - t0)
        mo, mr = statistics.median(t_ours), statistics.median(t_ref)
        e_o, e_r, e_rtn = layer_error(ours, w, h), layer_error(ref, w, h), layer_error(fake_quantize(w, scheme), w, h)
        same = float((ours == ref).float().mean())
        same64 = float((gptq_quantize(w, h64, scheme, act_order=args.act_order).dequantize() == ours).float().mean())
        print(f"{k:>5}x{n:<5} | {mo:7.3f} {mr:7.3f} {mr / mo:8.2f} | {e_o:10.4g} {e_r:10.4g} {e_rtn:10.4g} | "
              f"{same:6.1%} {same64:8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
