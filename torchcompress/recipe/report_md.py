"""A report people can look at: Markdown + PNG plots (per-layer SQNR, bytes by module type).

Plots are drawn with matplotlib's Agg backend (no display needed); matplotlib is imported only here.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..formats.atomic import atomic_directory
from .runner import Report


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


_LAYER_RE = re.compile(r"^(?P<prefix>.*?)(?P<idx>\d+)\.(?P<leaf>.+)$")


def _plot_sqnr(report: Report, path: Path) -> bool:
    """Per-layer SQNR: a (block x module) heatmap when names carry a block index (decoder models),
    else one bar per module."""
    rows = [r for r in report.layers if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    parsed = [_LAYER_RE.match(r.module) for r in rows]
    if all(parsed) and len(rows) > 8:
        blocks = sorted({int(m["idx"]) for m in parsed})
        leaves = list(dict.fromkeys(m["leaf"] for m in parsed))
        grid = [[math.nan] * len(leaves) for _ in blocks]
        for r, m in zip(rows, parsed):
            grid[blocks.index(int(m["idx"]))][leaves.index(m["leaf"])] = r.sqnr_db
        fig, ax = plt.subplots(figsize=(1.3 * len(leaves) + 3, 0.28 * len(blocks) + 2))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(leaves)), leaves, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_ylabel(f"block ({parsed[0]['prefix']}N)")
        finite = [v for row in grid for v in row if not math.isnan(v)]
        lo, hi = min(finite), max(finite)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):  # dark text on the bright end of viridis
                    bright = hi > lo and (v - lo) / (hi - lo) > 0.6
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="k" if bright else "w")
        fig.colorbar(im, ax=ax, label="weight SQNR (dB, higher is better)")
        ax.set_title("Per-layer weight SQNR after compression")
    else:
        fig, ax = plt.subplots(figsize=(9, max(3.0, 0.18 * len(rows) + 1.5)))
        ax.barh(range(len(rows)), [r.sqnr_db for r in rows])
        ax.set_yticks(range(len(rows)), [r.module for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("weight SQNR (dB, higher is better)")
        ax.set_title("Per-layer weight SQNR after compression")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_bits(report: Report, path: Path) -> bool:
    """Bits per weight of each layer a budget search sized (block x module heatmap, its pick written in
    each cell; one bar per layer for names without a block index). False when no layer was sized."""
    rows = [r for r in report.layers if r.choice is not None and r.bits_per_weight is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    parsed = [_LAYER_RE.match(r.module) for r in rows]
    if all(parsed):
        blocks = sorted({int(m["idx"]) for m in parsed})
        leaves = list(dict.fromkeys(m["leaf"] for m in parsed))
        grid = [[math.nan] * len(leaves) for _ in blocks]
        label = [[""] * len(leaves) for _ in blocks]
        for r, m in zip(rows, parsed):
            i, j = blocks.index(int(m["idx"])), leaves.index(m["leaf"])
            grid[i][j], label[i][j] = r.bits_per_weight, r.choice
        fig, ax = plt.subplots(figsize=(1.3 * len(leaves) + 3, 0.28 * len(blocks) + 2))
        im = ax.imshow(grid, aspect="auto", cmap="plasma")
        ax.set_xticks(range(len(leaves)), leaves, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_ylabel(f"block ({parsed[0]['prefix']}N)")
        for i, row in enumerate(label):
            for j, text in enumerate(row):
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=5.5, color="w")
        fig.colorbar(im, ax=ax, label="bits per weight (codes + scales + zeros)")
    else:
        fig, ax = plt.subplots(figsize=(9, max(3.0, 0.18 * len(rows) + 1.5)))
        ax.barh(range(len(rows)), [r.bits_per_weight for r in rows])
        ax.set_yticks(range(len(rows)), [f"{r.module} ({r.choice})" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("bits per weight (codes + scales + zeros)")
    params = sum(r.params for r in rows)
    bpw = sum(r.bits_per_weight * r.params for r in rows) / params
    ax.set_title(f"Bits per layer chosen under the budget ({bpw:.3f} bits/weight over {len(rows)} layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_bytes(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kinds = sorted(set(report.bytes_by_type_before) | set(report.bytes_by_type_after))
    before = [report.bytes_by_type_before.get(k, 0) / 2**20 for k in kinds]
    after = [report.bytes_by_type_after.get(k, 0) / 2**20 for k in kinds]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = range(len(kinds))
    ax.bar([i - 0.2 for i in x], before, width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], after, width=0.4, label="after")
    ax.set_xticks(list(x), kinds, rotation=20, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("Tensor bytes by module type")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(report: Report, has_sqnr_plot: bool, has_bits_plot: bool = False) -> str:
    d = report.to_dict()
    lines = [f"# torchcompress report: {report.recipe}", ""]
    if "model" in d:
        lines += [f"Model: {d['model']}", ""]
    lines += [
        "| measure | value |", "|---|---|",
        f"| tensor bytes before | {report.size_bytes_before:,} ({_mib(report.size_bytes_before)}) |",
        f"| tensor bytes after | {report.size_bytes_after:,} ({_mib(report.size_bytes_after)}) |",
        f"| compression ratio | {report.compression_ratio:.2f}x |",
    ]
    if d.get("sparse_bytes_after"):
        lines.append(f"| tensor bytes after, 2:4 layers sparse (values + bitmask) | {d['sparse_bytes_after']:,} "
                     f"({_mib(d['sparse_bytes_after'])}, {report.size_bytes_before / d['sparse_bytes_after']:.2f}x) |")
    if "disk_bytes_after" in d:
        lines.append(f"| bytes on disk after | {d['disk_bytes_after']:,} ({_mib(d['disk_bytes_after'])}) |")
    for key, label in [("perplexity_before", "perplexity before"), ("perplexity_after", "perplexity after"),
                       ("kl_divergence", "KL(float || compressed), nats/token"), ("top1_agreement", "top-1 agreement")]:
        if key in d:
            lines.append(f"| {label} | {d[key]:.4f} |")
    if "eval" in d:
        e = d["eval"]
        lines += ["", f"Evaluation text: {e['text']}; {e['windows']} windows of {e['seq_len']} tokens "
                      f"({e['tokens']} predicted tokens)."]
    if "calibration" in d:
        c = d["calibration"]
        srcs = "; ".join(f"{s['description']} ({s['samples']} samples)" for s in c["sources"])
        lines += ["", f"Calibration data: {c['samples']} x {c['seq_len']} ({c['tokens']} tokens) from {srcs}; "
                      f"sha256 {c['sha256'][:16]}."]
    lines += ["", "## Stages", "", "| stage | kind | modules | seconds |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.kind} | {s.modules} | {s.seconds:.2f} |" for s in report.stages]
    lines += ["", "## Bytes by module type", "", "![bytes by module type](bytes_by_type.png)", ""]
    if has_sqnr_plot:
        lines += ["## Per-layer error", "", "![per-layer SQNR](layer_sqnr.png)", ""]
    if has_bits_plot:
        sized = [r for r in report.layers if r.choice is not None and r.bits_per_weight is not None]
        bpw = sum(r.bits_per_weight * r.params for r in sized) / sum(r.params for r in sized)
        lines += ["## Bits per layer (size budget)", "", f"{len(sized)} layers sized by the budget search: "
                  f"{bpw:.3f} bits per weight overall.", "", "![bits per layer](bits_per_layer.png)", ""]
    rows = [r for r in report.layers if r.sqnr_db is not None]
    if rows:
        worst = sorted(rows, key=lambda r: r.sqnr_db)[:10]
        lines += ["Lowest-SQNR layers (where quality is lost first):", "",
                  "| module | SQNR dB | MSE | bits/weight |", "|---|---|---|---|"]
        lines += [f"| {r.module} | {r.sqnr_db:.2f} | {r.mse:.3e} | {r.bits_per_weight:.3f} |" for r in worst]
        lines += ["", "<details><summary>All layers</summary>", "",
                  "| stage | module | params | bytes before | bytes after | SQNR dB | bits/weight |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.stage} | {r.module} | {r.params:,} | {r.bytes_before:,} | {r.bytes_after:,} | "
                  f"{r.sqnr_db:.2f} | {r.bits_per_weight:.3f} |" for r in rows]
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def write_report(report: Report, out_dir: str | os.PathLike) -> Path:
    """Write ``report.md``, ``report.json`` and the PNG plots to ``out_dir`` (atomically)."""
    import json

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        has_sqnr = _plot_sqnr(report, tmp / "layer_sqnr.png")
        has_bits = _plot_bits(report, tmp / "bits_per_layer.png")
        _plot_bytes(report, tmp / "bytes_by_type.png")
        (tmp / "report.md").write_text(render_markdown(report, has_sqnr, has_bits))
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return out_dir
