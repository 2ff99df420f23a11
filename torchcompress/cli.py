"""The ``torchcompress`` command line (contract: shared/docs/CLI.md).

Exit status: 0 success, 2 bad input (one line naming what is wrong), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import InputError

log = logging.getLogger("torchcompress")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors are bad input too: exit 2, one line
        self.exit(2, f"error: {message}\n")


def _positive(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {v}")
        return v

    return parse


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(total: int, desc: str):
    """A tqdm bar on a terminal; silent otherwise (the caller prints one line per stage)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False, file=sys.stderr)


def _write_json(path: str, data: dict) -> None:
    from .formats.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _eval_windows(tokenizer, text_spec: str, seq_len: int, windows: int):
    from .eval.perplexity import make_windows
    from .eval.text import load_text

    if tokenizer is None:
        raise InputError("the model has no tokenizer; perplexity needs one")
    text, desc = load_text(text_spec)
    return make_windows(tokenizer, text, seq_len, windows, desc)


RUN_RECORD = "run.json"


def _fingerprint(args, recipe) -> str:
    """What a finished run in --out was made from: model files (names, sizes), recipe, calibration."""
    import hashlib

    from . import __version__
    from .models import DEFAULT, default_gguf_path

    src = default_gguf_path() if args.model == DEFAULT else Path(args.model)
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file() and p.name != RUN_RECORD)
    h = hashlib.sha256()
    for part in [__version__, repr(recipe.stages), str(args.calib), str(args.calib_samples), str(args.seq_len)]:
        h.update(part.encode() + b"\0")
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode() + b"\0")
    return h.hexdigest()


def _finished_run(args, fingerprint: str):
    """With --resume: the record of a finished run in --out made from the same inputs, else None."""
    record = Path(args.out) / RUN_RECORD
    if not args.resume or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{record}: unreadable run record ({e}); remove --resume to start over") from None
    if data.get("fingerprint") != fingerprint:
        raise InputError(f"--resume: {args.out} was made from a different model, recipe or data; "
                         "refusing to resume (remove --resume to overwrite)")
    return data


def _calib_config(args, recipe):
    """The calibration set the recipe needs (default: text sampled from the model), else None.
    A --calib given to a recipe that needs none is still checked: a typo should not pass silently."""
    from .calibration import CalibrationConfig, parse_sources

    names, weights = parse_sources(args.calib or "self")
    from .calibration.sources import check_hf_spec

    for name in names:
        if name.startswith("hf:"):
            check_hf_spec(name)
        if name not in ("self", "pydoc") and not name.startswith("hf:") and not any(c in name for c in "*?[") \
                and not Path(name).is_file():
            raise InputError(f"--calib {name}: no such file (give a file, a glob, 'self', 'pydoc' or hf:NAME[:SPLIT[:COLUMN]])")
    cfg = CalibrationConfig(sources=names, weights=weights, num_samples=args.calib_samples, seq_len=args.seq_len)
    if not any(getattr(s.config, "needs_calibration", False) for s in recipe.stages):
        return None  # (built anyway: bad weights such as a.txt@-1 fail here too)
    return cfg


def _check_outputs(args, *flags: str, dirs: tuple = ()) -> None:
    """Outputs that cannot be created fail before any work (not after an hour of compression): the
    nearest existing ancestor of each must be a writable directory; ``dirs`` name directory outputs."""
    import os

    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        p = Path(value).absolute()
        if p.exists() and p.is_dir() != (flag in dirs):
            raise InputError(f"{flag} {value}: exists and is {'not ' if flag in dirs else ''}a directory")
        anc = p.parent
        while not anc.exists():
            anc = anc.parent
        if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {value}: cannot be created ({anc} is not a writable directory)")


def _build_calib(cfg, lm):
    if cfg is None:
        return None
    from .calibration import build_calibration

    if lm.tokenizer is None:
        raise InputError("the model has no tokenizer; calibration data needs one")
    t0 = time.perf_counter()
    calib = build_calibration(cfg, lm.model, lm.tokenizer)
    d = calib.describe()
    _say(f"calibration: {d['samples']} x {d['seq_len']} ({d['tokens']} tokens) from "
         + "; ".join(s["description"] for s in d["sources"]) + f" in {time.perf_counter() - t0:.1f}s")
    return calib


def cmd_compress(args) -> int:
    from .eval.perplexity import evaluate
    from .formats.checkpoint import save_compressed
    from .models import load_model
    from .recipe.runner import Report, clone_model, compress
    from .recipe.schema import load_recipe

    recipe = load_recipe(args.recipe)  # bad recipes fail before the model loads
    if args.target_bpw is not None or args.target_size is not None:  # mixed precision under a size budget
        from .recipe.budget_flags import with_budget

        recipe = with_budget(recipe, args.target_bpw, args.target_size)
    calib_cfg = _calib_config(args, recipe)  # bad --calib specs fail before the model loads
    _check_outputs(args, "--out", "--json", "--report", "--offload-dir", dirs=("--out", "--report", "--offload-dir"))
    from .pipeline.skeleton import resolve_device

    device = resolve_device(args.device)  # --device cuda without CUDA fails before any work
    src = _stream_source(args.model, args.stream)
    from .recipe.streaming import streamable

    if src is not None:
        why = streamable(recipe)
        if why is None:
            return _compress_streaming(args, recipe, calib_cfg, src, device)
        if args.stream == "on":
            raise InputError(f"--stream on: {why}")
        _say(f"loading the whole model: {why}")
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=_dtype_for(args, src))
    lm.model.to(device)
    _say(f"loaded {lm.description} in {time.perf_counter() - t0:.1f}s")
    fingerprint = _fingerprint(args, recipe)
    finished = _finished_run(args, fingerprint)
    windows = reference = None
    if args.eval:
        windows = _eval_windows(lm.tokenizer, args.eval, args.seq_len, args.eval_windows)
        reference = clone_model(lm.model) if finished is None else lm.model
    if finished is not None:
        _say(f"--resume: {args.out} already holds this run; skipping compression")
        report = Report.from_dict(finished["report"])
        lm = load_model(args.out)
    else:
        calib = _build_calib(calib_cfg, lm)
        state_dir = Path(f"{args.out}.state")  # per-block state of calibrated stages: a killed run resumes
        if calib is not None:
            if state_dir.exists() and not args.resume:
                import shutil

                shutil.rmtree(state_dir)
            calib.state_dir = state_dir
            calib.offload_dir = args.offload_dir
        report = compress(lm.model, recipe, calib,
                          on_stage=lambda s: _say(f"stage {s.name} ({s.kind}): {s.modules} modules in {s.seconds:.2f}s"))
        if calib is not None:
            report.extra["calibration"] = calib.describe()
        record = {"fingerprint": fingerprint, "report": report.to_dict()}
        save_compressed(lm.model, args.out, lm.tokenizer, {RUN_RECORD: json.dumps(record, indent=2).encode()})
        if calib is not None and state_dir.exists():
            import shutil

            shutil.rmtree(state_dir)
    report.extra["model"] = lm.description
    report.extra["out"] = str(args.out)
    report.extra["disk_bytes_after"] = _weights_bytes(args.out)
    if windows is not None:
        from . import telemetry

        bar = _progress(2 * windows.ids.shape[0], "eval")
        tel = {"torchcompress.recipe.name": recipe.name, "torchcompress.eval.text": windows.description}
        with telemetry.eval_scope(lm.model, reference, tel):  # no-op unless OTEL_* configured telemetry
            res = evaluate(lm.model, windows, ref_model=reference, progress=lambda n: bar.update(2 * n))
        bar.close()
        _record_eval(report, recipe, windows, res)
    return _finish_report(args, report)


def _weights_bytes(out) -> int:
    """Bytes of the weight files of a compress output (one file or shards)."""
    return sum(f.stat().st_size for f in Path(out).glob("model*.safetensors"))


STREAM_ABOVE = 2 * 2**30  # --stream auto: checkpoints whose float32 weights exceed this stream block by block


def _big_enough(path: Path, mode: str) -> bool:
    """--stream on / off, or auto: stream when the model in float32 would take over 2 GiB (smaller ones
    load whole: the in-memory path also times every forward for telemetry)."""
    if mode != "auto":
        return mode == "on"
    from .pipeline.shards import Checkpoint

    ckpt = Checkpoint.open(path)
    return sum(i.nbytes // i.dtype.itemsize * 4 for i in ckpt.tensors.values()) > STREAM_ABOVE


def _stream_source(spec: str, mode: str = "auto"):
    """The safetensors directory the block pipeline streams ``--model`` from, else None (a .gguf,
    a compress output, a directory without safetensors, a small model under --stream auto: those load whole)."""
    from .formats.checkpoint import read_manifest
    from .models import DEFAULT, _default_dir

    if mode == "off":
        return None
    path = _default_dir() if str(spec) == DEFAULT else Path(spec)
    if not path.is_dir() or not (path / "config.json").is_file() or read_manifest(path) is not None:
        return None
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return None
    return path if _big_enough(path, mode) else None


def _dtype_for(args, src):
    """--dtype as a torch dtype (``auto``: the checkpoint's own dtype; float32 for GGUF and compress outputs)."""
    import json

    from .pipeline.skeleton import resolve_dtype

    ckpt_dtype = None
    if src is not None:
        cfg = json.loads((Path(src) / "config.json").read_text())
        name = cfg.get("torch_dtype") or cfg.get("dtype")
        import torch

        ckpt_dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return resolve_dtype(getattr(args, "dtype", "auto"), ckpt_dtype)


def _compress_streaming(args, recipe, calib_cfg, src: Path, device) -> int:
    """compress on the block pipeline: the checkpoint streams through the recipe one block at a time."""
    from transformers import AutoTokenizer

    from .pipeline.shards import Checkpoint
    from .pipeline.skeleton import resolve_dtype
    from .progress import BlockProgress, memory_summary
    from .recipe.runner import Report
    from .recipe.streaming import compress_checkpoint

    ckpt = Checkpoint.open(src)  # missing / truncated shards fail here, before any work
    dtype = resolve_dtype(args.dtype, ckpt.torch_dtype)
    device = _init_distributed(device)
    fingerprint = _fingerprint(args, recipe) + f"|{dtype}"
    finished = _finished_run(args, fingerprint)
    try:
        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError):
        tok = None
    windows = _eval_windows(tok, args.eval, args.seq_len, args.eval_windows) if args.eval else None
    desc = str(args.model)
    if finished is not None:
        _say(f"--resume: {args.out} already holds this run; skipping compression")
        report = Report.from_dict(finished["report"])
    else:
        calib = None
        if calib_cfg is not None:
            from .models import load_model

            if "self" in calib_cfg.sources:  # text sampled from the model needs the whole model once
                lm = load_model(args.model, dtype=dtype)
                calib = _build_calib(calib_cfg, lm)
                del lm
            else:
                from .models import LoadedModel

                calib = _build_calib(calib_cfg, LoadedModel(None, tok, desc))
        _say(f"streaming {src} ({ckpt.total_bytes() / 2**30:.2f} GiB, {dtype}) through {recipe.name} on {device}, "
             "one decoder block at a time")

        def record(rep):
            rep.extra.update(memory_summary(device))
            if calib is not None:
                rep.extra["calibration"] = calib.describe()
            return {RUN_RECORD: json.dumps({"fingerprint": fingerprint, "report": rep.to_dict()}, indent=2).encode()}

        report = compress_checkpoint(ckpt, recipe, args.out, calib=calib, device=device, dtype=dtype, tokenizer=tok,
                                     resume=args.resume, offload_dir=args.offload_dir, extra_files=record,
                                     on_block=BlockProgress("compress", device),
                                     on_stage=lambda s: _say(f"stage {s.name} ({s.kind}): {s.modules} modules in {s.seconds:.2f}s"),
                                     fingerprint_extra=fingerprint)
    report.extra["model"] = desc
    report.extra["out"] = str(args.out)
    report.extra["disk_bytes_after"] = _weights_bytes(args.out)
    report.extra["device"] = str(device)
    report.extra["dtype"] = str(dtype).replace("torch.", "")
    if windows is not None:
        from .eval.streaming import evaluate_streaming

        res = evaluate_streaming(args.out, windows, ref_dir=src, device=device, dtype=dtype,
                                 progress=BlockProgress("eval", device))
        _record_eval(report, recipe, windows, res)
    report.extra.update(memory_summary(device))
    return _finish_report(args, report)


def _init_distributed(device):
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU); each
    rank takes its own GPU (LOCAL_RANK). Calibration samples are split across ranks by the pipeline."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    d = torch.distributed
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not d.is_initialized():
        d.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _record_eval(report, recipe, windows, res) -> None:
    from . import telemetry

    tel = {"torchcompress.recipe.name": recipe.name, "torchcompress.eval.text": windows.description}
    telemetry.record_eval_result(res, tel)
    report.extra.update(perplexity_before=res.perplexity_ref, perplexity_after=res.perplexity,
                        kl_divergence=res.kl_divergence, top1_agreement=res.top1_agreement,
                        eval={"text": windows.description, "windows": res.windows, "seq_len": res.seq_len,
                              "tokens": res.tokens})


def _finish_report(args, report) -> int:
    d = report.to_dict()
    if args.json:
        _write_json(args.json, d)
    if args.report:
        from .recipe.report_md import write_report

        write_report(report, args.report)
    print(_summary(d))
    return 0


def _summary(d: dict) -> str:
    out = [f"recipe {d['recipe']}: {d['size_bytes_before'] / 2**20:.1f} MiB -> {d['size_bytes_after'] / 2**20:.1f} MiB "
           f"(x{d['compression_ratio']:.2f}); on disk {d['disk_bytes_after'] / 2**20:.1f} MiB in {d['out']}"]
    if "perplexity_after" in d:
        out.append(f"perplexity {d['perplexity_before']:.3f} -> {d['perplexity_after']:.3f}, "
                   f"KL {d['kl_divergence']:.4f} nats/token, top-1 agreement {d['top1_agreement']:.4f} "
                   f"({d['eval']['windows']} x {d['eval']['seq_len']} tokens of {d['eval']['text']})")
    return "\n".join(out)


def cmd_eval(args) -> int:
    from .eval.perplexity import evaluate
    from .models import load_model

    _check_outputs(args, "--json")
    from .pipeline.skeleton import resolve_device

    device = resolve_device(args.device)
    path = _eval_stream_source(args.model, args.stream)
    if path is not None:
        return _eval_streaming(args, path, device)
    lm = load_model(args.model, dtype=_dtype_for(args, None))
    lm.model.to(device)
    windows = _eval_windows(lm.tokenizer, args.text, args.seq_len, args.windows)
    from . import telemetry

    bar = _progress(windows.ids.shape[0], "eval")
    tel = {"torchcompress.model.name": lm.description, "torchcompress.eval.text": windows.description}
    with telemetry.eval_scope(lm.model, None, tel):  # no-op unless OTEL_* configured telemetry
        res = evaluate(lm.model, windows, progress=bar.update)
    bar.close()
    telemetry.record_eval_result(res, tel)
    d = {"model": lm.description, "text": windows.description, **res.to_dict()}
    if args.json:
        _write_json(args.json, d)
    print(f"perplexity {res.perplexity:.4f} over {res.tokens} tokens ({res.windows} x {res.seq_len}) of {windows.description}")
    return 0


def _eval_stream_source(spec: str, mode: str = "auto"):
    """A directory ``eval`` streams block by block: safetensors weights and a transformers config.json
    (a Hugging Face model, or a compress output of one); None for .gguf files, other models, and
    small models under --stream auto."""
    from .models import DEFAULT, _default_dir

    if mode == "off":
        return None
    path = _default_dir() if str(spec) == DEFAULT else Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("model*.safetensors")):
        return path if _big_enough(path, mode) else None
    return None


def _eval_streaming(args, path: Path, device) -> int:
    from transformers import AutoTokenizer

    from .eval.streaming import evaluate_streaming
    from .pipeline.shards import Checkpoint
    from .pipeline.skeleton import resolve_dtype
    from .progress import BlockProgress, memory_summary

    ckpt = Checkpoint.open(path)  # missing / truncated shards fail before any work
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError):
        tok = None
    windows = _eval_windows(tok, args.text, args.seq_len, args.windows)
    dtype = resolve_dtype(args.dtype, ckpt.torch_dtype)
    res = evaluate_streaming(path, windows, device=device, dtype=dtype, progress=BlockProgress("eval", device))
    from . import telemetry

    telemetry.record_eval_result(res, {"torchcompress.model.name": str(args.model),
                                       "torchcompress.eval.text": windows.description})
    d = {"model": str(args.model), "text": windows.description, **res.to_dict(), **memory_summary(device)}
    if args.json:
        _write_json(args.json, d)
    print(f"perplexity {res.perplexity:.4f} over {res.tokens} tokens ({res.windows} x {res.seq_len}) of {windows.description}")
    return 0


def cmd_info(args) -> int:
    from .info import describe

    print(describe(args.path))
    return 0


def cmd_recipe(args) -> int:
    from .recipe.schema import load_recipe

    r = load_recipe(args.recipe)
    print(f"ok: {r.name}: {len(r.stages)} stage(s): " + ", ".join(f"{s.name} ({s.kind})" for s in r.stages))
    return 0


def _export_quantized(args) -> int:
    """GPTQ / compressed-tensors / sparse-24-bitmask: a directory for serving engines, from a `compress` output."""
    from .formats.compressed_tensors import save_compressed_tensors
    from .formats.gptq import save_gptq
    from .models import load_model
    from .nn.quant_linear import QuantLinear

    if str(args.out).endswith(".gguf"):
        raise InputError(f"--out {args.out}: --format {args.format} writes a directory, not a .gguf file")
    _check_outputs(args, "--out", dirs=("--out",))
    t0 = time.perf_counter()
    lm = load_model(args.model)
    if args.format == "sparse-24-bitmask":  # 2:4-pruned float / INT8 / FP8 layers
        from .formats.sparse24 import save_sparse24

        out = save_sparse24(lm.model, args.out, tokenizer=lm.tokenizer)
        print(f"wrote {out} ({args.format}) in {time.perf_counter() - t0:.1f}s")
        return 0
    from .nn.scheme_linear import SchemeLinear

    kinds = (QuantLinear, SchemeLinear) if args.format == "compressed-tensors" else (QuantLinear,)
    if not any(isinstance(m, kinds) for m in lm.model.modules()):
        raise InputError(f"--model {args.model}: has no quantized Linear layer; --format {args.format} exports the "
                         "output of `torchcompress compress` with an RTN or GPTQ recipe")
    _say(f"loaded {lm.description} in {time.perf_counter() - t0:.1f}s")
    save = save_gptq if args.format == "gptq" else save_compressed_tensors
    t0 = time.perf_counter()
    out = save(lm.model, args.out, tokenizer=lm.tokenizer)
    print(f"wrote {out} ({args.format}) in {time.perf_counter() - t0:.1f}s")
    return 0


def _export_gguf_blocks(args, lm) -> int:
    """A `compress` output whose Linears are GGUFLinear: their blocks go to the .gguf verbatim."""
    from .formats.gguf_write_blocks import export_gguf_blocks

    given = [f for f, on in (("--pure", args.pure), ("--leave-output", args.leave_output), ("--imatrix", args.imatrix)) if on]
    if given:
        raise InputError(f"{given[0]}: --model {args.model} holds GGUF blocks already (written as they are)")
    t0 = time.perf_counter()
    src = Path(args.model) if str(args.model).endswith(".gguf") else None  # keep a .gguf's tokenizer verbatim
    res = export_gguf_blocks(lm.model, lm.tokenizer, args.out, tokenizer_from=src, tokenizer_pre=args.tokenizer_pre)
    print(f"wrote {res.path} (the model's own blocks; --qtype not used; {res.file_size / 2**20:.1f} MiB, "
          + _type_counts(res.types) + f") in {time.perf_counter() - t0:.1f}s")
    return 0


def _export_onnx(args) -> int:
    """onnxruntime / onnxruntime-genai: a KV-cache decoder, quantized Linears as MatMulNBits."""
    from .formats.onnx_export import export_onnx
    from .models import load_model

    if str(args.out).endswith((".gguf", ".onnx")):
        raise InputError(f"--out {args.out}: --format onnx writes a directory (model.onnx, genai_config.json, tokenizer)")
    _check_outputs(args, "--out", dirs=("--out",))
    t0 = time.perf_counter()
    lm = load_model(args.model)
    _say(f"loaded {lm.description} in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    res = export_onnx(lm.model, lm.tokenizer, args.out)
    from collections import Counter

    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(res.nbits_layers.values()).items())) or "none"
    print(f"wrote {res.path} (onnx, {res.bytes / 2**20:.1f} MiB; MatMulNBits: {kinds}; {res.float_layers} float "
          f"MatMul) in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_export(args) -> int:
    if args.format == "onnx":
        return _export_onnx(args)
    if args.format != "gguf":
        return _export_quantized(args)
    from .formats.gguf_mix import parse_file_type
    from .formats.gguf_write import export_gguf
    from .models import DEFAULT, default_gguf_path, load_model

    ft = parse_file_type(args.qtype)  # a bad --qtype fails before the model loads
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", args.tokenizer_pre):  # llama.cpp's names: lowercase words, - and _
        raise InputError(f"--tokenizer-pre {args.tokenizer_pre!r}: not a llama.cpp pre-tokenizer name (e.g. default, llama3, gpt2)")
    if not str(args.out).endswith(".gguf"):
        raise InputError(f"--out {args.out}: must be a .gguf file name")
    _check_outputs(args, "--out")
    src = _stream_source(args.model, args.stream)
    if src is not None and not args.imatrix:
        return _export_gguf_streaming(args, ft, src)
    t0 = time.perf_counter()
    lm = load_model(args.model)
    _say(f"loaded {lm.description} in {time.perf_counter() - t0:.1f}s")
    from .nn.gguf_linear import GGUFLinear

    if any(isinstance(m, GGUFLinear) for m in lm.model.modules()):  # GGUF blocks already (kind: gguf, GGUF QAT)
        return _export_gguf_blocks(args, lm)
    # a model that came from a .gguf keeps that file's tokenizer metadata verbatim (pre-tokenizer too)
    src = default_gguf_path() if str(args.model) == DEFAULT else Path(args.model) if str(args.model).endswith(".gguf") else None
    t0 = time.perf_counter()
    imat = None
    if args.imatrix:
        from .calibration.imatrix import imatrix_from_spec

        imat = imatrix_from_spec(args.imatrix, lm.model, lm.tokenizer, num_samples=args.imatrix_samples)
        _say(f"imatrix from {args.imatrix}: {len(imat)} layers in {time.perf_counter() - t0:.1f}s")
    res = export_gguf(lm.model, lm.tokenizer, args.out, ft, pure=args.pure, leave_output=args.leave_output,
                      tokenizer_from=src, tokenizer_pre=args.tokenizer_pre, importance=imat)
    print(f"wrote {res.path} ({ft.name}, {res.file_size / 2**20:.1f} MiB, {len(res.types)} tensors: "
          + _type_counts(res.types) + f") in {time.perf_counter() - t0:.1f}s")
    return 0


def _device_flags(p) -> None:
    p.add_argument("--device", default="auto", help="where compression / evaluation runs: auto (CUDA when present), "
                   "cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype while working (auto: the checkpoint's torch_dtype); Hessians, Cholesky, GPTQ "
                   "and SparseGPT updates and SVD stay float32 per layer")
    p.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="run one decoder block at a time from the safetensors shards (auto: when the model "
                   "in float32 exceeds 2 GiB)")


def _export_gguf_streaming(args, ft, src: Path) -> int:
    """GGUF export of a safetensors checkpoint, one tensor in memory at a time."""
    from transformers import AutoTokenizer

    from .formats.gguf_write import export_gguf
    from .models import DEFAULT, default_gguf_path
    from .pipeline.shards import Checkpoint, LazyWeights
    from .pipeline.skeleton import build_skeleton
    from .progress import memory_summary

    ckpt = Checkpoint.open(src)  # missing / truncated shards fail here
    skeleton = build_skeleton(ckpt, ckpt.torch_dtype or torch_float32())
    try:
        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError):
        tok = None
    t0 = time.perf_counter()
    res = export_gguf(skeleton, tok, args.out, ft, pure=args.pure, leave_output=args.leave_output,
                      tokenizer_from=default_gguf_path() if str(args.model) == DEFAULT else None,
                      tokenizer_pre=args.tokenizer_pre, weights=LazyWeights(skeleton, ckpt))
    mem = memory_summary("cpu")
    print(f"wrote {res.path} ({ft.name}, {res.file_size / 2**20:.1f} MiB, {len(res.types)} tensors: "
          + _type_counts(res.types) + f") in {time.perf_counter() - t0:.1f}s, streamed from {src} "
          f"(peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB)")
    return 0


def torch_float32():
    import torch

    return torch.float32


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="torchcompress", description="Compress PyTorch / Hugging Face models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="apply a recipe and save the compressed model")
    c.add_argument("--model", required=True, help="'default', a model directory, a .gguf file or a compress output")
    c.add_argument("--recipe", required=True, help="YAML file or bundled recipe name (w4-rtn, w8-rtn)")
    c.add_argument("--out", required=True, help="output directory (written atomically)")
    c.add_argument("--calib", help="calibration data for stages that need activations: a text file, a glob, "
                   "'self' (text sampled from the model; the default), 'pydoc', hf:NAME[:SPLIT[:COLUMN]], "
                   "a chat .jsonl or a pre-tokenized .safetensors; mix with SRC@WEIGHT,SRC@WEIGHT")
    c.add_argument("--calib-samples", type=_positive("--calib-samples"), default=128)
    c.add_argument("--seq-len", type=_positive("--seq-len"), default=512)
    c.add_argument("--eval", help="text file (or 'pydoc') for perplexity/KL before and after")
    c.add_argument("--eval-windows", type=_positive("--eval-windows"), default=32)
    c.add_argument("--json", help="write the report as JSON here")
    c.add_argument("--report", help="write a Markdown report with plots into this directory")
    c.add_argument("--resume", action="store_true", help="if --out holds a finished run of the same model/recipe/data, reuse it; "
                   "a killed GPTQ run continues from OUT.state after its last finished block (refused if they differ)")
    c.add_argument("--offload-dir", help="keep calibration activations on disk here between decoder blocks instead "
                   "of in memory (layer-by-layer stages; for long calibration sets on big models)")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--target-bpw", type=float, help="mixed precision: the bits per weight (codes + scales + "
                        "zeros) of the quantized Linears; each layer's width/group (or GGUF type) is chosen by an exact "
                        "knapsack over its measured output error (turns the recipe's rtn/gptq/gguf stage into a budget stage)")
    budget.add_argument("--target-size", help="mixed precision: the weights file's size (80MB, 75MiB, 1.5GB or bytes)")
    _device_flags(c)
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="perplexity of a model on a text")
    e.add_argument("--model", required=True)
    e.add_argument("--text", required=True, help="text file or 'pydoc'")
    e.add_argument("--seq-len", type=_positive("--seq-len"), default=512)
    e.add_argument("--windows", type=_positive("--windows"), default=32)
    e.add_argument("--json")
    _device_flags(e)
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("info", help="what a compressed directory, model directory or .gguf file holds")
    i.add_argument("path")
    i.set_defaults(fn=cmd_info)

    x = sub.add_parser("export", help="write a model in another tool's format (.gguf for llama.cpp; GPTQ or "
                       "compressed-tensors directories for vLLM / transformers / GPTQModel; onnx directories for "
                       "onnxruntime-genai)")
    x.add_argument("--model", required=True, help="'default', a model directory or a .gguf file (float weights) for "
                   "gguf; a `compress` output with quantized layers for gptq / compressed-tensors")
    x.add_argument("--format", required=True, choices=["gguf", "gptq", "compressed-tensors", "onnx", "sparse-24-bitmask"])
    x.add_argument("--qtype", default="Q4_K_M", help="llama.cpp file type: Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0, "
                   "Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, F16, F32")
    x.add_argument("--out", required=True, help="output .gguf file, or directory for gptq / compressed-tensors "
                   "(written atomically)")
    x.add_argument("--pure", action="store_true", help="the file type's block type for every tensor (no mix rules)")
    x.add_argument("--leave-output", action="store_true", help="keep output.weight unquantized")
    x.add_argument("--tokenizer-pre", default="default", help="llama.cpp pre-tokenizer name for a Hugging Face tokenizer")
    x.add_argument("--imatrix", help="gguf: importance-weighted K-quants (llama.cpp's imatrix), from a .safetensors "
                   "imatrix or computed from calibration text ('pydoc', 'self', a text file...)")
    x.add_argument("--imatrix-samples", type=_positive("--imatrix-samples"), default=64,
                   help="calibration samples of 512 tokens for --imatrix")
    x.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="gguf from a safetensors checkpoint: one tensor in memory at a time (auto: when the model "
                   "in float32 exceeds 2 GiB); off loads the whole model first")
    x.set_defaults(fn=cmd_export)

    r = sub.add_parser("recipe", help="recipe tools")
    rsub = r.add_subparsers(dest="recipe_command", required=True, parser_class=_Parser)
    rc = rsub.add_parser("check", help="validate a recipe without running it (exit 2 on error)")
    rc.add_argument("recipe")
    rc.set_defaults(fn=cmd_recipe)
    return p


def _type_counts(types: dict) -> str:
    """'12 Q4_K, 3 Q6_K' for a GGUF export's tensor -> type map."""
    from collections import Counter

    return ", ".join(f"{n} {k}" for k, n in sorted(Counter(t.name for t in types.values()).items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from . import telemetry  # imports OpenTelemetry only when OTEL_* ask for telemetry

    telemetry.configure_from_env()
    try:
        with telemetry.command_span(args.command):
            return args.fn(args)
    except InputError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an environment failure: keep the traceback for the report
        log.debug("unhandled", exc_info=True)
        import traceback

        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    finally:
        telemetry.shutdown()  # bounded: a dead collector never holds up the exit


if __name__ == "__main__":
    sys.exit(main())
