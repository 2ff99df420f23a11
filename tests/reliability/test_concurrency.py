"""Many threads calling the same compressed module at once give what serial calls give, and the
first calls racing with lazy initialisation (native extension import, GPTQ's sorted layout) are safe."""

import subprocess
import sys
import textwrap
import threading

import torch
import torch.nn as nn

import torchcompress as tc


def _modules():
    from torchcompress.lowrank import LoRAConfig
    from torchcompress.nn.gptq_linear import module_from_gptq
    from torchcompress.primitives.gptq import gptq_quantize
    from torchcompress.quant.gguf import quantize_gguf_
    from torchcompress.quant.gguf_config import GGUFConfig

    torch.manual_seed(0)
    k, n = 256, 96
    w4 = tc.quantize_(nn.Sequential(nn.Linear(k, n)), tc.RTNConfig(tc.QuantScheme(bits=4, group_size=32)), ignore=())[0]
    w8 = tc.quantize_(nn.Sequential(nn.Linear(k, n)), tc.RTNConfig(tc.QuantScheme(bits=8, granularity="channel")),
                      ignore=())[0]
    lin = nn.Linear(k, n)
    x = torch.randn(512, k) * torch.linspace(0.1, 3, k)  # uneven columns: act-order permutes them
    res = gptq_quantize(lin.weight.detach(), 2 * x.T @ x / x.shape[0], tc.QuantScheme(bits=4, group_size=64),
                        act_order=True, name="gptq")
    gptq = module_from_gptq(lin, res, tc.QuantScheme(bits=4, group_size=64))
    lora = tc.add_lora_(nn.Sequential(nn.Linear(k, n)), LoRAConfig(targets=("0",), r=4))[0]
    nn.init.normal_(lora.lora_B.weight)  # a non-zero adapter
    gguf = quantize_gguf_(nn.Sequential(nn.Linear(k, n)), GGUFConfig(qtype="Q4_0", pure=True, leave_output=True))[0]
    return {"w4": w4, "w8": w8, "gptq-act-order": gptq, "lora": lora, "gguf-q4_0": gguf}


def test_threads_equal_serial():
    mods = _modules()
    inputs = [torch.randn(b, 256, generator=torch.Generator().manual_seed(b)) for b in (1, 3, 16, 40)]
    with torch.no_grad():
        serial = {name: [m(x) for x in inputs] for name, m in mods.items()}
    got, errors = {}, []
    start = threading.Barrier(8)

    def worker(t):
        try:
            start.wait()
            with torch.no_grad():
                for r in range(5):
                    for name, m in mods.items():
                        i = (t + r) % len(inputs)
                        got.setdefault((t, r, name), (i, m(inputs[i])))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert len(got) == 8 * 5 * len(mods)
    for (_, _, name), (i, y) in got.items():
        assert torch.equal(y, serial[name][i]), name


def test_first_calls_race_with_lazy_initialisation():
    # a fresh process: the native extension, the ops and GPTQ's sorted layout are all created by
    # whichever of the racing first calls gets there first
    code = textwrap.dedent("""
        import threading, torch
        from tests.reliability.test_concurrency import _modules
        mods = _modules()
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
        out, errors = {}, []
        start = threading.Barrier(6)
        def worker(t):
            try:
                start.wait()
                with torch.no_grad():
                    for name, m in mods.items():
                        out[(t, name)] = m(x)
            except Exception as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        [t.start() for t in ts]; [t.join(120) for t in ts]
        assert not errors, errors
        with torch.no_grad():
            for name, m in mods.items():
                ref = m(x)
                assert all(torch.equal(out[(t, name)], ref) for t in range(6)), name
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]
