"""Our quantizers beside the peers' own packages on the same model and evaluation text: perplexity
and quantization wall time in one table (issue #22 item 8).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/bench_peers.py --threads 2 \
        --text /usr/share/common-licenses/GPL-3 --windows 32 --seq-len 512

Peers run only where installed (never dependencies of ours):
* ``hqq`` (mobiusml): ``pip install --no-deps hqq termcolor`` (its own deps would pull another torch);
  HQQLinear on CPU with the PyTorch backend, ``BaseQuantizeConfig(nbits, group_size)`` (the package's
  defaults: zero point optimised by its proximal solver, float zero points and scales in the compute
  dtype, float32 here).

* ``auto-round`` (Intel): ``pip install --no-deps auto-round`` (its ``datasets`` import is stubbed
  here when absent: calibration comes from our tokens, nothing is downloaded). ``AutoRound`` with the
  same bits/group/symmetry, iterations, step size (1/iters), samples per step and calibration tokens
  as our ``autoround`` row, float32 (``amp=False``), on CPU; it leaves fake-quantized weights in the
  model, which is what is evaluated.

Calibrated rows (``autoround``, ``auto-round``) use ``--calib-samples`` x ``--calib-seq-len`` tokens of
``--calib-source`` (default pydoc: disjoint from the default evaluation text GPL-3).

* ``llmcompressor`` (vLLM project): ``pip install --no-deps llmcompressor datasets pyarrow dill multiprocess xxhash
  pandas nvidia-ml-py`` (never its torch); ``oneshot`` with ``AWQModifier()`` (its defaults: 20-point grid with
  duo scaling, no clip search) then ``QuantizationModifier`` (int, asymmetric, groups of ``--group-size``, min-max),
  the sequential pipeline, on the same calibration tokens. It refuses groups that do not divide a layer's
  columns (SmolLM2's 576 at group 128): compare at ``--group-size 64`` there. Its CPU path pins memory, which a CPU-only torch
  refuses: pinning is made a no-op here (it only speeds host-to-GPU copies).

AWQ rows (``--calib-samples`` > 0) calibrate on ``--calib`` (in-domain text, disjoint from ``--text``):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_peers.py --threads 1 --group-size 128 \
        --calib '/usr/share/common-licenses/[ALM]*' --calib-samples 64 --only 'float,RTN W,AWQ'

Every method quantizes the same Linears (all but lm_head) of a fresh copy of the float model; the
wall time covers quantizing and packing all of them, in this process, one method after another.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time

import torch
import torch.nn as nn


def _ours(cfg):
    def run(model):
        import torchcompress as tc

        tc.quantize_(model, cfg, ignore=["lm_head"])
    return run


def _peer_hqq(bits: int, group_size: int):
    def run(model):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        qcfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
        names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]
        for n in names:
            parent, _, leaf = n.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, HQQLinear(getattr(owner, leaf), qcfg, compute_dtype=torch.float32, device="cpu"))
    return run


def _ours_autoround(cfg, calib):
    def run(model):
        from torchcompress.quant.autoround import autoround_model

        autoround_model(model, cfg, calib, ignore=["lm_head"], batch_size=8)
    return run


def _stub_datasets() -> None:
    """auto-round imports ``datasets`` at import time; without it, a stub (we pass our own token ids)."""
    import sys
    import types

    if importlib.util.find_spec("datasets") is not None or "datasets" in sys.modules:
        return
    ds = types.ModuleType("datasets")

    def absent(*_a, **_k):
        raise RuntimeError("datasets is not installed (stubbed by bench_peers.py)")

    for name in ("Dataset", "Features", "IterableDataset", "Sequence", "Value"):
        setattr(ds, name, type(name, (), {}))
    for name in ("concatenate_datasets", "load_dataset", "load_from_disk"):
        setattr(ds, name, absent)
    sys.modules["datasets"] = ds


def _peer_autoround(tokenizer, calib, bits: int, group_size: int, sym: bool, iters: int, batch_size: int, seed: int):
    def run(model):
        _stub_datasets()
        from auto_round import AutoRound

        data = [{"input_ids": calib.input_ids[i:i + 1], "attention_mask": calib.attention_mask[i:i + 1]}
                for i in range(calib.input_ids.shape[0])]
        with torch.enable_grad():
            ar = AutoRound(model, tokenizer, bits=bits, group_size=group_size, sym=sym, iters=iters, batch_size=batch_size,
                           nsamples=len(data), seqlen=calib.input_ids.shape[1], dataset=data, seed=seed, amp=False,
                           device_map="cpu", enable_torch_compile=False)
            ar.quantize()


def _ours_awq(bits: int, group_size: int, calib, clip: bool):
    def run(model):
        import torchcompress as tc
        from torchcompress.config import QuantScheme, RTNConfig
        from torchcompress.quant.awq import awq_model
        from torchcompress.quant.awq_config import AWQConfig

        scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=False)
        awq_model(model, AWQConfig(scheme, clip=clip), calib)  # the w4-awq-g128 recipe's two stages
        tc.quantize_(model, RTNConfig(scheme), ignore=["lm_head"])
    return run


def _peer_llmcompressor_awq(bits: int, group_size: int, calib, tokenizer):
    def run(model):
        import tempfile

        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():  # pin_memory needs an accelerator; it only speeds host -> GPU copies
            IntermediatesCache.pin_memory = lambda self, i: None
        cfg_dir = tempfile.mkdtemp()  # oneshot reads the model's config from name_or_path
        model.config.save_pretrained(cfg_dir)
        model.config.name_or_path = cfg_dir
        ds = Dataset.from_dict({"input_ids": calib.input_ids.tolist(), "attention_mask": calib.attention_mask.tolist()})
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=bits, type="int", strategy="group", group_size=group_size, symmetric=False))
        recipe = [AWQModifier(), QuantizationModifier(config_groups={"w": scheme}, ignore=["lm_head"])]
        oneshot(model=model, processor=tokenizer, dataset=ds, recipe=recipe, pipeline="sequential",
                num_calibration_samples=calib.input_ids.shape[0], max_seq_length=calib.input_ids.shape[1])
    return run


def main() -> None:
    from torchcompress.config import HQQConfig, QuantScheme, RTNConfig
    from torchcompress.eval.perplexity import evaluate, make_windows
    from torchcompress.eval.text import load_text
    from torchcompress.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated method name prefixes to run (default: all)")
    p.add_argument("--json", default=None, help="append one JSON line per method here")
    p.add_argument("--calib-source", default="pydoc")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--ar-group-size", type=int, default=128, help="group size of the autoround rows")
    p.add_argument("--ar-iters", type=int, default=200, help="sign-gradient steps per block (ours and auto-round)")
    p.add_argument("--ar-batch", type=int, default=8, help="samples per step (ours and auto-round)")
    p.add_argument("--ar-sym", action="store_true", help="symmetric autoround rows (default asymmetric)")
    p.add_argument("--calib", default="/usr/share/common-licenses/[ALM]*", help="calibration text of the AWQ rows")
    p.add_argument("--calib-len", type=int, default=512, help="calibration sequence length of the AWQ rows")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    lm = load_model(a.model)
    text, desc = load_text(a.text)
    windows = make_windows(lm.tokenizer, text, a.seq_len, a.windows, desc)
    b, g = a.bits, a.group_size
    methods = {
        "float": None,
        f"ours RTN W{b} g{g} (int zero)": _ours(RTNConfig(QuantScheme(bits=b, group_size=g, symmetric=False))),
        f"ours HQQ W{b} g{g} (float zero)": _ours(HQQConfig(QuantScheme(bits=b, group_size=g, symmetric=False, float_zero=True))),
        f"ours HQQ W{b} g{g} (int zero)": _ours(HQQConfig(QuantScheme(bits=b, group_size=g, symmetric=False), optimize_scale=True)),
    }
    calib = None
    if a.calib_samples > 0:
        from torchcompress.calibration import CalibrationConfig, build_calibration
        from torchcompress.calibration.data import parse_sources

        srcs, weights = parse_sources(a.calib)
        calib = build_calibration(CalibrationConfig(sources=srcs, weights=weights, num_samples=a.calib_samples,
                                                    seq_len=a.calib_len), lm.model, lm.tokenizer)
        methods[f"ours AWQ W{b} g{g} + RTN"] = _ours_awq(b, g, calib, clip=True)
        if importlib.util.find_spec("llmcompressor") is not None:
            methods[f"llm-compressor {_version('llmcompressor')} AWQ W{b} g{g}"] = _peer_llmcompressor_awq(
                b, g, calib, lm.tokenizer)
        else:
            print("# llmcompressor not installed (pip install --no-deps llmcompressor ...): its AWQ row is skipped")
        methods[f"ours AWQ W{b} g{g} + RTN (no clip, as llm-compressor)"] = _ours_awq(b, g, calib, clip=False)
    if importlib.util.find_spec("hqq") is not None:
        methods[f"hqq {_version('hqq')} W{b} g{g}"] = _peer_hqq(b, g)
    else:
        print("# hqq not installed (pip install --no-deps hqq termcolor): its row is skipped")
    from torchcompress.calibration import CalibrationConfig, build_calibration
    from torchcompress.quant.autoround_config import AutoRoundConfig

    calib = build_calibration(CalibrationConfig(sources=(a.calib_source,), num_samples=a.calib_samples,
                                                seq_len=a.calib_seq_len), lm.model, lm.tokenizer)
    ag, it, sym = a.ar_group_size, a.ar_iters, a.ar_sym
    kind = "sym" if sym else "asym"
    methods[f"ours RTN W{b} g{ag} {kind}"] = _ours(RTNConfig(QuantScheme(bits=b, group_size=ag, symmetric=sym)))
    methods[f"ours autoround W{b} g{ag} {kind} {it} it"] = _ours_autoround(
        AutoRoundConfig(QuantScheme(bits=b, group_size=ag, symmetric=sym), iters=it, batch_size=a.ar_batch), calib)
    if importlib.util.find_spec("auto_round") is not None:
        methods[f"auto-round {_version('auto-round')} W{b} g{ag} {kind} {it} it"] = _peer_autoround(
            lm.tokenizer, calib, b, ag, sym, it, a.ar_batch, 0)
    else:
        print("# auto-round not installed (pip install --no-deps auto-round): its row is skipped")
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    rows = []
    for name, fn in methods.items():
        if only and not any(o == name if name == "float" or o == "float" else name.startswith(o) or o in name
                            for o in only):
            continue
        model = copy.deepcopy(lm.model).eval()
        t0 = time.perf_counter()
        if fn is not None:
            with torch.no_grad():
                fn(model)
        wall = time.perf_counter() - t0
        ppl = evaluate(model, windows).perplexity
        rows.append((name, ppl, wall))
        print(f"{name:<40} ppl {ppl:8.4f}  quantize {wall:7.1f} s", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({"method": name, "perplexity": ppl, "quantize_s": wall, "text": desc,
                                    "calib": None if calib is None else f"{a.calib} {a.calib_samples} x {a.calib_len}",
                                    "windows": int(windows.ids.shape[0]), "seq_len": a.seq_len, "threads": a.threads}) + "\n")
        del model
    base = next((r[1] for r in rows if r[0] == "float"), None)
    print(f"\n{a.model}, {desc}, {windows.ids.shape[0]} x {a.seq_len} tokens, {a.threads} threads")
    print("| method | perplexity | x float | quantize wall (s) |\n|---|---|---|---|")
    for name, ppl, wall in rows:
        rel = f"{ppl / base:.3f}" if base else "-"
        print(f"| {name} | {ppl:.4f} | {rel} | {wall:.1f} |")


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    main()
