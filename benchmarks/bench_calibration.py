"""Calibration sources for GPTQ on SmolLM2-135M: cost of the default set, and what each source buys.

1. Builds the default (model-sampled) calibration set twice in one process with an empty cache:
   the first call generates, the second reads the cache; prints both times and the ratio.
2. With ``--gptq``: for each source (``self``, ``pydoc``, and ``--indomain`` if given) runs GPTQ
   W3 and W4 g64 through the CLI and prints held-out perplexity beside float and RTN.
   Each GPTQ run takes minutes on CPU; this is a measurement script, never a test.

    OMP_NUM_THREADS=1 python benchmarks/bench_calibration.py --samples 32
    OMP_NUM_THREADS=1 python benchmarks/bench_calibration.py --samples 32 --gptq \\
        --heldout /usr/share/common-licenses/GPL-3 \\
        --indomain '/usr/share/common-licenses/[ALM]*@117,/usr/share/common-licenses/G*-[12]*@74'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_cost(samples: int, seq_len: int) -> None:
    from torchcompress.calibration import CalibrationConfig, build_calibration
    from torchcompress.models import load_model

    lm = load_model("default")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHCOMPRESS_CACHE"] = cache
        cfg = CalibrationConfig(sources=("self",), num_samples=samples, seq_len=seq_len)
        t0 = time.perf_counter()
        a = build_calibration(cfg, lm.model, lm.tokenizer)
        t1 = time.perf_counter()
        b = build_calibration(cfg, lm.model, lm.tokenizer)
        t2 = time.perf_counter()
    assert a.sha256() == b.sha256()
    print(f"default calibration ({samples} x {seq_len} sampled from SmolLM2): generate {t1 - t0:.1f}s, "
          f"cached {t2 - t1:.2f}s, ratio {(t1 - t0) / max(t2 - t1, 1e-9):.0f}x; {a.sources[0]['description']}")


def cli(*args) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "torchcompress", *map(str, args)], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def ppl(model: str, heldout: str, out: Path) -> float:
    js = out / f"eval-{Path(model).name}.json"
    cli("eval", "--model", model, "--text", heldout, "--seq-len", 512, "--windows", 16, "--json", js)
    return json.loads(js.read_text())["perplexity"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--gptq", action="store_true", help="also run GPTQ W3/W4 g64 with each source (slow)")
    p.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--indomain", help="calibration spec of text from the held-out text's domain (disjoint)")
    p.add_argument("--out", default="out/bench-calibration")
    args = p.parse_args(argv)
    build_cost(args.samples, args.seq_len)
    if not args.gptq:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = {"self": "self", "pydoc": "pydoc", **({"in-domain": args.indomain} if args.indomain else {})}
    base = ppl("default", args.heldout, out)
    rows = {"float": {3: base, 4: base}}
    for b in (3, 4):
        d = out / f"w{b}-rtn-g64"
        cli("compress", "--model", "default", "--recipe", HERE / "gptq_recipes" / f"w{b}-rtn-g64.yaml", "--out", d)
        rows.setdefault("RTN", {})[b] = ppl(str(d), args.heldout, out)
        for name, spec in sources.items():
            d = out / f"w{b}-gptq-g64-{name}"
            cli("compress", "--model", "default", "--recipe", HERE / "gptq_recipes" / f"w{b}-gptq-g64.yaml", "--out", d,
                "--calib", spec, "--calib-samples", args.samples, "--seq-len", args.seq_len)
            rows.setdefault(f"GPTQ {name}", {})[b] = ppl(str(d), args.heldout, out)
    print(f"perplexity on {args.heldout} (14-16 x 512 tokens), calibration {args.samples} x {args.seq_len}")
    print(f"{'':>16} {'W3 g64':>8} {'W4 g64':>8}")
    for name, r in rows.items():
        print(f"{name:>16} {r[3]:8.2f} {r[4]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
