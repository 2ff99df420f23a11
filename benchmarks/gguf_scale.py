"""GGUF export of a real-shape checkpoint: streamed (one tensor in memory) against whole-model, and
the file read back with gguf-py's reader.

    OMP_NUM_THREADS=1 python benchmarks/gguf_scale.py --model /tmp/scale/llama-1b --compare
    OMP_NUM_THREADS=1 python benchmarks/gguf_scale.py --model /tmp/scale/llama-8b
    OMP_NUM_THREADS=1 python benchmarks/gguf_scale.py --throughput     # one 4096x14336 matrix, per type

Each export runs the CLI in a child process; its wall time and peak RSS come from that child's own
rusage (``os.wait4``). ``--compare`` also exports with ``--stream off`` (the whole model loaded in
float32 first) and checks that both files hold the same key/values and the same tensors (names,
order, types, shapes, bytes). The checkpoints come from ``bench_scale.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's torchcompress


def export(model: Path, out: Path, qtype: str, stream: str) -> dict:
    cmd = [sys.executable, "-m", "torchcompress", "export", "--model", str(model), "--format", "gguf",
           "--qtype", qtype, "--stream", stream, "--out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out_txt, err_txt = p.stdout.read(), p.stderr.read()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{err_txt[-3000:]}")
    res = {"stream": stream, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,
           "bytes": out.stat().st_size, "line": out_txt.strip().splitlines()[-1]}
    print(f"export --stream {stream}: {wall:.0f} s wall, peak RSS {res['peak_rss_gib']:.2f} GiB, "
          f"{res['bytes'] / 2**30:.2f} GiB file\n  {res['line']}", flush=True)
    return res


def read(path: Path):
    """gguf-py's reader over the file: (key/values, [(name, type, shape, bytes view)])."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    kv = {}
    for name, f in r.fields.items():
        kv[name] = [bytes(f.parts[i].tobytes()) for i in f.data]
    tensors = [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), t.data) for t in r.tensors]
    return kv, tensors


def check_readable(path: Path) -> None:
    kv, tensors = read(path)
    total = sum(int(d.nbytes) for *_, d in tensors)
    types = Counter(t for _, t, _, _ in tensors)
    print(f"GGUFReader: {len(kv)} key/values, {len(tensors)} tensors ({', '.join(f'{n} {t}' for t, n in sorted(types.items()))}), "
          f"{total / 2**30:.2f} GiB of tensor data", flush=True)


def compare(a: Path, b: Path) -> list[str]:
    import numpy as np

    kva, ta = read(a)
    kvb, tb = read(b)
    diffs = [f"key {k} differs" for k in sorted(set(kva) | set(kvb)) if kva.get(k) != kvb.get(k)]
    if [t[:3] for t in ta] != [t[:3] for t in tb]:
        diffs.append("tensor tables (names, order, types, shapes) differ")
        return diffs
    for (name, *_, da), (*_, db) in zip(ta, tb):
        if da.nbytes != db.nbytes or not np.array_equal(np.asarray(da).view(np.uint8), np.asarray(db).view(np.uint8)):
            diffs.append(f"tensor {name} bytes differ")
    print(f"compared {len(kva)} key/values and {len(ta)} tensors", flush=True)
    return diffs


def throughput(rows: int = 4096, cols: int = 14336, ref_rows: int = 64) -> None:
    """M weights/s of the quantizers Q4_K_M uses on one 8B MLP matrix: the native kernel (what runs
    when it is built) and the PyTorch reference (its fallback, on ``ref_rows`` rows: it is slow)."""
    import torch

    from torchcompress.primitives.gguf_blocks import _native_op, quantize, quantize_reference
    from torchcompress.primitives.gguf_common import GGMLType

    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    print(f"{rows}x{cols} float32, {torch.get_num_threads()} threads; native kernels: {_native_op() is not None}")
    for name in ["Q4_K", "Q6_K", "Q5_0", "Q8_0"]:
        t = GGMLType[name]
        t0 = time.perf_counter()
        out = quantize(x, t)
        tn = time.perf_counter() - t0
        xs = x[:ref_rows]
        t0 = time.perf_counter()
        ref = quantize_reference(xs, t)
        tr = time.perf_counter() - t0
        same = bool(torch.equal(out[:ref_rows], ref))
        print(f"  {name}: native {x.numel() / tn / 1e6:7.1f} M weights/s ({tn:.2f} s), PyTorch reference "
              f"{xs.numel() / tr / 1e6:6.2f} M weights/s; identical on {ref_rows} rows: {same}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--throughput", action="store_true", help="quantizer speed on one 4096x14336 matrix, then stop")
    ap.add_argument("--qtype", default="Q4_K_M")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: beside the model")
    ap.add_argument("--compare", action="store_true", help="also export with --stream off and compare the files")
    ap.add_argument("--keep", action="store_true", help="keep the .gguf files")
    args = ap.parse_args()
    if args.throughput:
        return throughput()
    if args.model is None:
        ap.error("--model is required (or --throughput)")
    d = args.out_dir or args.model.parent
    streamed = d / f"{args.model.name}-{args.qtype}-stream.gguf"
    export(args.model, streamed, args.qtype, "on")
    check_readable(streamed)
    if args.compare:
        whole = d / f"{args.model.name}-{args.qtype}-whole.gguf"
        export(args.model, whole, args.qtype, "off")
        diffs = compare(streamed, whole)
        print("EQUAL: streamed and whole-model exports hold the same key/values and tensor bytes" if not diffs
              else f"NOT EQUAL: {len(diffs)} differences\n" + "\n".join(diffs[:20]), flush=True)
        if not args.keep:
            whole.unlink()
        if diffs:
            sys.exit(1)
    if not args.keep:
        streamed.unlink()


if __name__ == "__main__":
    main()
