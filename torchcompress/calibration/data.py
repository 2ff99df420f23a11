"""One calibration data set for every technique that needs activations.

Example::

    from torchcompress.calibration import CalibrationConfig, build_calibration
    calib = build_calibration(CalibrationConfig(sources=("self",), num_samples=128, seq_len=512), model, tok)
    for ids, mask in calib.batches(8): ...

Samples are ``num_samples`` x ``seq_len`` token ids. A sample shorter than ``seq_len`` (a short
document) is right-padded and its ``attention_mask`` is 0 there; consumers (Hessians, statistics)
must use only positions with mask 1 (:meth:`CalibrationSet.lengths`). Everything is deterministic
for a given seed: the per-source sample counts, the documents and windows drawn, the final order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .sources import CalibrationDataError, as_long, load_documents

MODES = ("random", "packed")


def parse_sources(spec: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``"a.txt@3,pydoc@1"`` -> ``(("a.txt", "pydoc"), (3.0, 1.0))``; weights default to 1."""
    names, weights = [], []
    for item in str(spec).split(","):
        item = item.strip()
        if not item:
            continue
        src, _, w = item.rpartition("@") if "@" in item else (item, "", "1")
        try:
            wf = float(w)
        except ValueError:
            raise ConfigError("calib", f"weight of {src!r} must be a number, got {w!r}") from None
        names.append(src)
        weights.append(wf)
    if not names:
        raise ConfigError("calib", f"no calibration source in {spec!r}")
    return tuple(names), tuple(weights)


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text, how much, and how it is cut. ``weights`` mix several ``sources`` (relative)."""

    sources: tuple[str, ...] = ("self",)
    weights: tuple[float, ...] | None = None
    num_samples: int = 128
    seq_len: int = 512
    mode: str = "random"  # random windows, or "packed": whole documents joined by EOS, cut into samples
    seed: int = 0
    selfgen: object | None = None  # a selfgen.SelfGenConfig for "self" (its count/length/seed are overridden)

    def __post_init__(self):
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources or not all(isinstance(s, str) and s for s in self.sources):
            raise ConfigError("sources", f"must be non-empty strings, got {self.sources!r}")
        weights = tuple(float(w) for w in (self.weights or (1.0,) * len(self.sources)))
        if len(weights) != len(self.sources):
            raise ConfigError("weights", f"{len(weights)} weight(s) for {len(self.sources)} source(s)")
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("weights", f"must be >= 0 with a positive sum, got {weights}")
        object.__setattr__(self, "weights", weights)
        for name in ("num_samples", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # (N, L) int64, right-padded
    attention_mask: torch.Tensor  # (N, L) int64, 1 on real tokens
    sources: list = field(default_factory=list)  # [{"source", "description", "samples", "weight"}]
    state_dir: object = None  # where layer-by-layer stages keep resume state (one subdirectory per stage)
    offload_dir: object = None  # where layer-by-layer stages keep block activations on disk (None: CPU memory)

    @property
    def lengths(self) -> torch.Tensor:  # (N,)
        return self.attention_mask.sum(1)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def sha256(self) -> str:
        h = hashlib.sha256(self.input_ids.contiguous().numpy().tobytes())
        h.update(self.attention_mask.contiguous().numpy().tobytes())
        return h.hexdigest()

    def batches(self, batch_size: int):
        """Yield ``(ids (B, L), mask (B, L))`` in order."""
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i:i + batch_size], self.attention_mask[i:i + batch_size]

    def describe(self) -> dict:
        """For reports, JSON and telemetry: which data was used."""
        return {"sources": self.sources, "samples": int(self.input_ids.shape[0]),
                "seq_len": int(self.input_ids.shape[1]), "tokens": self.num_tokens, "sha256": self.sha256()}


def allocate(n: int, weights: tuple[float, ...]) -> list[int]:
    """Split ``n`` samples by ``weights`` (largest remainder; ties to the earlier source)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _random_windows(docs: list[torch.Tensor], n: int, length: int, gen: torch.Generator) -> list[torch.Tensor]:
    # pick documents in proportion to their length (every token about equally likely), then a window
    sizes = torch.tensor([d.numel() for d in docs], dtype=torch.float64)
    picks = torch.multinomial(sizes, n, replacement=True, generator=gen)
    out = []
    for i in picks.tolist():
        d = docs[i]
        start = int(torch.randint(0, d.numel() - length + 1, (1,), generator=gen)) if d.numel() > length else 0
        out.append(d[start:start + length])
    return out


def _packed(docs: list[torch.Tensor], n: int, length: int, gen: torch.Generator, sep: int | None) -> list[torch.Tensor]:
    # documents in a seeded random order, each followed by EOS, packed back to back and cut into samples
    out, buf, used = [], [], 0
    while len(out) < n:
        for i in torch.randperm(len(docs), generator=gen).tolist():
            buf.append(docs[i])
            used += docs[i].numel()
            if sep is not None:
                buf.append(torch.tensor([sep]))
                used += 1
            while used >= length and len(out) < n:
                flat = torch.cat(buf)
                out.append(flat[:length])
                buf, used = [flat[length:]], flat.numel() - length
            if len(out) == n:
                break
    return out


def build_calibration(cfg: CalibrationConfig, model, tokenizer) -> CalibrationSet:
    """Load, cut and mix the sources of ``cfg`` into a :class:`CalibrationSet` (deterministic)."""
    from .selfgen import SelfGenConfig

    counts = allocate(cfg.num_samples, cfg.weights)
    gen = torch.Generator().manual_seed(cfg.seed)
    samples, described = [], []
    for k, (src, n) in enumerate(zip(cfg.sources, counts)):
        if n == 0:
            continue
        selfgen = None
        if src == "self":  # generate exactly the samples needed, seeded by the set's seed and position
            base = cfg.selfgen or SelfGenConfig()
            selfgen = SelfGenConfig(**{**base.__dict__, "num_samples": n, "seq_len": cfg.seq_len, "seed": cfg.seed + k})
        docs, desc = load_documents(src, tokenizer, model=model, selfgen=selfgen)
        docs = as_long(docs)
        if not docs:
            raise CalibrationDataError(src, "holds no text")
        if src == "self":  # exactly n samples of seq_len were generated for this set: each is one row, once
            got = [d[: cfg.seq_len] for d in docs[:n]]
        elif cfg.mode == "random":
            got = _random_windows(docs, n, cfg.seq_len, gen)
        else:
            got = _packed(docs, n, cfg.seq_len, gen, getattr(tokenizer, "eos_token_id", None))
        samples.extend(got)
        described.append({"source": src, "description": desc, "samples": n, "weight": cfg.weights[k]})
    order = torch.randperm(len(samples), generator=gen).tolist()  # interleave sources
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    ids = torch.full((len(samples), cfg.seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(samples), cfg.seq_len, dtype=torch.long)
    for row, i in enumerate(order):
        s = samples[i]
        ids[row, : s.numel()] = s
        mask[row, : s.numel()] = 1
    return CalibrationSet(ids, mask, described)
