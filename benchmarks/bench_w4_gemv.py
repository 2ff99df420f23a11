"""One-row (decode) speed of the native int4 GEMV, per instruction set: G weights/s on one thread
streaming 4 x 4096x4096 W4 asymmetric layers (64M weights, past the caches), groups 32 and 128.

    python benchmarks/bench_w4_gemv.py [repo root]

Best of 7 rounds of 5 passes, thread CPU time. Compare two builds by running it on two checkouts in
alternation: run-to-run spread on the 2-core VM is large (one build measured 3.2-6.0 over three runs).
"""
import os
import sys, time, torch
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torchcompress as tc
from torchcompress.ops.native import load_native
torch.set_num_threads(1)
ext = load_native()
for g in (32, 128):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(4)])  # 64M weights: past the cache
    tc.quantize_(lin, tc.RTNConfig(tc.QuantScheme(bits=4, group_size=g, symmetric=False)), ignore=[])
    x = torch.randn(1, 4096)
    for isa in ext.available_isas()[:2]:
        fns = [(lambda m: (lambda: ext.int_linear(x, m.qweight, m.scale, m.zero, None, 4, m.group_size, 4096, isa, "gemv")))(m) for m in lin]
        with torch.inference_mode():
            for f in fns: f()
            best = 1e9
            for r in range(7):
                t = time.thread_time()
                for _ in range(5):
                    for f in fns: f()
                best = min(best, (time.thread_time() - t) / 5)
        print(f"W4 g{g} asym {isa} 1 thread: {4*4096*4096/best/1e9:.1f} G weights/s")
