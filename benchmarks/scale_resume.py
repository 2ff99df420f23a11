"""Kill -9 a streamed GPTQ run of a real-shape checkpoint halfway, ``--resume`` it, and compare with
an uninterrupted run, tensor by tensor and bit for bit.

    OMP_NUM_THREADS=2 python benchmarks/scale_resume.py --shape 1b --samples 8 --seq-len 512 --root /tmp/scale

1. run A: ``compress --recipe w4-gptq-g128 --stream on`` to ``A`` without interruption;
2. run B: the same command to ``B``; once its progress shows about half the blocks done, wait half a
   block's time (so the kill lands inside a block's GPTQ solve, not between blocks) and SIGKILL it;
3. run B again with ``--resume``: it must start at the block ``B.partial/state.json`` names;
4. every tensor of every safetensors file of A and B equal bit for bit (dtype, shape and bytes), the
   other files equal byte for byte, and ``run.json`` (the report) equal once its timings and memory
   figures are removed.

The checkpoint and its calibration file are written by ``bench_scale.py`` (random-initialised Llama
weights; fewer calibration rows than the 64 x 512 of the memory benchmark keep two runs short: the
resume path does not depend on how many rows there are).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_scale import SHAPES, write_calibration, write_checkpoint  # noqa: E402

PROGRESS = re.compile(r"compress: block (\d+)/(\d+)")
VOLATILE = re.compile(r"seconds|wall|time|peak|rss|cuda|elapsed|_s$|out$|^out|date|created")


def _cmd(args, ckpt: Path, calib: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torchcompress", "compress", "--model", str(ckpt), "--recipe", args.recipe,
            "--calib", str(calib), "--calib-samples", str(args.samples), "--seq-len", str(args.seq_len),
            "--device", "cpu", "--stream", "on", "--out", str(out)]


def _run(cmd: list[str], log: Path, kill_after: int | None = None, kill_delay: float = 0.0) -> dict:
    """Run ``cmd``; with ``kill_after``: SIGKILL it ``kill_delay`` s after progress shows that many blocks."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    blocks, killed = [], {}
    with open(log, "w") as f:
        for line in p.stdout:
            f.write(line)
            f.flush()
            m = PROGRESS.search(line)
            if m:
                blocks.append((int(m.group(1)), time.perf_counter() - t0))
                if kill_after is not None and int(m.group(1)) >= kill_after and not killed:
                    def kill():
                        killed["at_s"] = time.perf_counter() - t0
                        os.kill(p.pid, signal.SIGKILL)
                    killed["timer"] = threading.Timer(kill_delay, kill)
                    killed["timer"].start()
    rc = p.wait()
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "blocks": blocks, "killed_at_s": killed.get("at_s")}


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if not VOLATILE.search(k)}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two output directories (empty: equal)."""
    from safetensors import safe_open

    diffs = []
    fa, fb = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    if fa != fb:
        return [f"file lists differ: {fa} vs {fb}"]
    n_tensors = 0
    for name in fa:
        pa, pb = a / name, b / name
        if name.endswith(".safetensors"):
            with safe_open(str(pa), "pt") as ta, safe_open(str(pb), "pt") as tb:
                if sorted(ta.keys()) != sorted(tb.keys()):
                    diffs.append(f"{name}: tensor names differ")
                    continue
                for k in ta.keys():
                    x, y = ta.get_tensor(k), tb.get_tensor(k)
                    n_tensors += 1
                    if x.dtype != y.dtype or x.shape != y.shape or not _same_bits(x, y):
                        diffs.append(f"{name}:{k} differs")
        elif name == "run.json":
            ja, jb = _strip(json.loads(pa.read_text())), _strip(json.loads(pb.read_text()))
            if ja != jb:
                diffs.append(f"run.json differs apart from timings: {_first_diff(ja, jb)}")
        elif pa.read_bytes() != pb.read_bytes():
            diffs.append(f"{name} differs")
    print(f"compared {len(fa)} files, {n_tensors} tensors", flush=True)
    return diffs


def _same_bits(x, y) -> bool:
    import torch

    x, y = x.contiguous(), y.contiguous()
    return torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


def _first_diff(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_diff(x, y, f"{path}[{i}]")
    return f"{path}: {str(a)[:200]} vs {str(b)[:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--root", default="/tmp/torchcompress-scale")
    ap.add_argument("--recipe", default="w4-gptq-g128")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None,
                    help="keep the shape's blocks but only this many (default: all; on a loaded 2-core CPU a 1B "
                    "GPTQ block takes minutes)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs A and B")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    tag = args.shape + (f"-L{args.layers}" if args.layers else "")
    ckpt = root / f"llama-{tag}"
    if not (ckpt / "config.json").is_file():
        write_checkpoint(args.shape, ckpt, layers=args.layers)
    calib = root / f"calib-{args.shape}-{args.samples}x{args.seq_len}.safetensors"
    if not calib.is_file():
        write_calibration(calib, SHAPES[args.shape]["vocab_size"], args.samples, args.seq_len)
    a, b = root / f"resume-{tag}-A", root / f"resume-{tag}-B"
    for d in (a, b, Path(f"{a}.partial"), Path(f"{b}.partial")):
        shutil.rmtree(d, ignore_errors=True)
    print(f"{tag}: {args.recipe}, {args.samples} x {args.seq_len} calibration tokens, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}", flush=True)

    ra = _run(_cmd(args, ckpt, calib, a), root / f"resume-{tag}-A.log")
    assert ra["rc"] == 0, (root / f"resume-{tag}-A.log").read_text()[-3000:]
    n = ra["blocks"][-1][0]
    times = [t for _, t in ra["blocks"]]
    per_block = (times[-1] - times[0]) / max(1, len(times) - 1)
    print(f"A (uninterrupted): {ra['wall_s']:.0f} s, {n} blocks, {per_block:.1f} s per block", flush=True)

    half = n // 2
    rb = _run(_cmd(args, ckpt, calib, b), root / f"resume-{tag}-B1.log", kill_after=half, kill_delay=per_block / 2)
    state = json.loads((Path(f"{b}.partial") / "state.json").read_text())
    print(f"B (killed): rc {rb['rc']} after {rb['wall_s']:.0f} s, progress had shown block {rb['blocks'][-1][0]}/{n}; "
          f"SIGKILL {per_block / 2:.1f} s later (inside the next block); state.json done_blocks = "
          f"{state['done_blocks']}; {b}.exists() = {b.exists()}", flush=True)
    assert rb["rc"] == -signal.SIGKILL and not b.exists()

    rr = _run(_cmd(args, ckpt, calib, b) + ["--resume"], root / f"resume-{tag}-B2.log")
    assert rr["rc"] == 0, (root / f"resume-{tag}-B2.log").read_text()[-3000:]
    first = rr["blocks"][0][0]
    print(f"B (--resume): {rr['wall_s']:.0f} s, first block computed {first}/{n} (resumed after block "
          f"{state['done_blocks']}), {len(rr['blocks'])} blocks computed", flush=True)
    print(f"B total: {rb['wall_s'] + rr['wall_s']:.0f} s (killed run + resumed run) vs A {ra['wall_s']:.0f} s", flush=True)

    diffs = compare(a, b)
    if diffs:
        print(f"NOT EQUAL: {len(diffs)} differences", *diffs[:20], sep="\n")
        sys.exit(1)
    print("EQUAL: every tensor bit for bit, every other file byte for byte, run.json apart from timings")
    if not args.keep:
        shutil.rmtree(a), shutil.rmtree(b)


if __name__ == "__main__":
    main()
