"""Rotations of the residual stream (QuaRot / SpinQuant-style, random Hadamard), merged into the weights.

With RMSNorm weights folded into the linears that read them (the norms become plain ``x / rms(x)``,
which commutes with any orthogonal ``Q`` since ``||x Q|| = ||x||``), the residual stream can be
rotated, ``h -> h Q``, without changing the model's function (row vectors, ``W`` is ``(out, in)``):

- embeddings ``E <- E Q``; linears reading the stream (q, k, v, gate, up, lm_head) ``W <- W Q``;
- linears writing to it (o_proj, down_proj) ``W <- Q^T W`` and ``b <- b Q``;
- per head, v_proj's outputs and o_proj's inputs by ``Q_h`` (head_dim): ``W_v[h] <- Q_h^T W_v[h]``,
  ``W_o[:, h] <- W_o[:, h] Q_h`` (attention mixes values linearly within a head, so ``Q_h`` passes through);
- optionally (``online_down``) down_proj's input by a Hadamard ``H`` applied at run time
  (:class:`~..nn.hadamard_linear.HadamardInputLinear`), ``W_down <- W_down H``.

Rotated weights have their outliers spread over all coordinates, which is what makes RTN / GPTQ
after it lose less. ``Q = diag(s) H / sqrt(d)`` (random signs ``s`` from ``seed``; a seeded random
orthogonal matrix where no Hadamard order fits). Tied embeddings are untied (the head also carries
the final norm's weight). Only architectures known to be pre-norm RMSNorm decoders are accepted;
anything else is refused by name before a tensor changes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError, InputError
from ..primitives.hadamard import hadamard_factors, hadamard_matrix, random_hadamard

log = logging.getLogger(__name__)

# config.model_type of the decoders whose block is h += attn(rmsnorm(h)); h += mlp(rmsnorm(h)) with
# separate q/k/v/o and gate/up/down Linears (Gemma's (1 + w) norms and extra post-norms, Phi-3's fused
# projections, parallel-attention and LayerNorm models are not)
KNOWN_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_ATTN_IN, _MLP_IN = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


@dataclass(frozen=True)
class RotateConfig:
    """``seed``: of the random signs (and of the orthogonal fallback); ``online_down``: also rotate
    down_proj's input by a Hadamard applied at run time (a wrapper module; intermediate size must
    have a Hadamard order here)."""

    seed: int = 0
    online_down: bool = False

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", f"must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.online_down, bool):
            raise ConfigError("online_down", f"must be true or false, got {self.online_down!r}")


def _refuse(model_type, why: str):
    raise InputError(f"rotate: architecture {model_type!r} is not supported ({why}); the rotation knows "
                     f"{', '.join(KNOWN_ARCHITECTURES)} and changed nothing")


def _is_plain_rmsnorm(norm: nn.Module, d: int) -> bool:
    """True when ``norm(x) == weight * x / sqrt(mean(x^2) + eps)`` on a random probe (a copy on the CPU,
    so meta skeletons are probed too): LayerNorm (mean subtracted, bias) and Gemma's ``(1 + w)`` fail."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (d,) or getattr(norm, "bias", None) is not None:
        return False
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        return False
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.weight.copy_(torch.rand(d, generator=g) + 0.5)
        x = torch.randn(3, d, generator=g) * 3 + 1
        want = probe.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        got = probe(x)
    return isinstance(got, torch.Tensor) and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))


class Rotation:
    """The rotation of one model: its checks, matrices and the per-part updates (in place).

    Built from the model (or its meta skeleton); the constructor refuses an unknown architecture
    before anything changes. ``block(b)``, ``embedding(e)``, ``final_norm(n)``, ``head(h)`` update
    one part each, identically on the in-memory and streamed paths."""

    def __init__(self, model: nn.Module, cfg: RotateConfig):
        from ..pipeline.skeleton import find_blocks

        self.cfg = cfg
        conf = getattr(model, "config", None)
        mt = getattr(conf, "model_type", type(model).__name__)
        if mt not in KNOWN_ARCHITECTURES:
            _refuse(mt, "not a known pre-norm RMSNorm decoder")
        self.prefix, blocks = find_blocks(model)
        base = self.prefix.rpartition(".")[0]
        self.embed_name, self.norm_name, self.head_name = f"{base}.embed_tokens", f"{base}.norm", "lm_head"
        d = conf.hidden_size
        self.heads, self.kv_heads = conf.num_attention_heads, conf.num_key_value_heads or conf.num_attention_heads
        self.head_dim = getattr(conf, "head_dim", None) or d // self.heads
        for name in (self.embed_name, self.norm_name, self.head_name):
            try:
                model.get_submodule(name)
            except AttributeError:
                _refuse(mt, f"no module {name!r}")
        if type(model.get_submodule(self.embed_name)) is not nn.Embedding:
            _refuse(mt, f"{self.embed_name} is not an nn.Embedding")
        if not _is_plain_rmsnorm(model.get_submodule(self.norm_name), d):
            _refuse(mt, f"{self.norm_name} is not an RMSNorm without bias")
        head = model.get_submodule(self.head_name)
        if type(head) is not nn.Linear or head.bias is not None:
            _refuse(mt, f"{self.head_name} is not a plain nn.Linear without bias (already compressed?)")
        for b, block in enumerate(blocks):
            self._check_block(block, f"{self.prefix}.{b}", mt, d)
        self.d = d
        self.q = random_hadamard(d, cfg.seed)  # (d, d) float64, orthogonal
        self.q_head = random_hadamard(self.head_dim, cfg.seed + 1)  # (head_dim, head_dim)
        if cfg.online_down:
            n = conf.intermediate_size
            if hadamard_factors(n) is None:
                raise ConfigError("online_down", f"intermediate size {n} has no Hadamard order here (k * 2^m)")
            self.h_down = hadamard_matrix(n).to(torch.float64) / n ** 0.5
        self._final_norm_weight = None

    def _check_block(self, block: nn.Module, name: str, mt, d: int) -> None:
        for part in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(block, part, None)
            if norm is None or not _is_plain_rmsnorm(norm, d):
                _refuse(mt, f"{name}.{part} is missing or not an RMSNorm without bias")
        extra = {n for n, m in block.named_children()} - {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"}
        if extra:  # e.g. Gemma 2's post-attention norms on the block outputs: not rotation-invariant
            _refuse(mt, f"{name} has modules {sorted(extra)} beside attention, MLP and the two norms")
        for sub, names in (("self_attn", _ATTN_IN + ("o_proj",)), ("mlp", _MLP_IN + ("down_proj",))):
            for n in names:
                m = getattr(getattr(block, sub, None), n, None)
                if type(m) is not nn.Linear:
                    _refuse(mt, f"{name}.{sub}.{n} is not a plain nn.Linear (fused, missing or already compressed)")

    @staticmethod
    def _set(lin, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        if weight is not None:
            lin.weight.data = weight.to(lin.weight.dtype).contiguous()
        if bias is not None:
            lin.bias.data = bias.to(lin.bias.dtype).contiguous()

    @torch.no_grad()
    def block(self, block: nn.Module) -> list[str]:
        """Fold the two norms, rotate the block's Linears; the names (in the block) of what changed."""
        dev = block.self_attn.q_proj.weight.device
        q = self.q.to(dev)
        attn, mlp = block.self_attn, block.mlp
        for norm, readers in ((block.input_layernorm, [getattr(attn, n) for n in _ATTN_IN]),
                              (block.post_attention_layernorm, [getattr(mlp, n) for n in _MLP_IN])):
            w = norm.weight.detach().to(torch.float64)
            for lin in readers:  # W <- (W diag(w)) Q
                self._set(lin, (lin.weight.to(torch.float64) * w) @ q)
            norm.weight.data = torch.ones_like(norm.weight)
        for lin in (attn.o_proj, mlp.down_proj):  # W <- Q^T W, b <- b Q
            self._set(lin, q.T @ lin.weight.to(torch.float64), None if lin.bias is None else lin.bias.to(torch.float64) @ q)
        qh, hd = self.q_head.to(dev), self.head_dim
        v = attn.v_proj
        wv = v.weight.to(torch.float64).reshape(self.kv_heads, hd, -1)
        self._set(v, torch.einsum("ji,hjd->hid", qh, wv).reshape(v.weight.shape),
                  None if v.bias is None else (v.bias.to(torch.float64).reshape(self.kv_heads, hd) @ qh).reshape(-1))
        o = attn.o_proj
        wo = o.weight.to(torch.float64).reshape(o.weight.shape[0], self.heads, hd)
        self._set(o, (wo @ qh).reshape(o.weight.shape))
        names = [f"self_attn.{n}" for n in _ATTN_IN + ("o_proj",)] + [f"mlp.{n}" for n in _MLP_IN + ("down_proj",)]
        if self.cfg.online_down:
            from ..nn.hadamard_linear import HadamardInputLinear

            down = mlp.down_proj
            self._set(down, down.weight.to(torch.float64) @ self.h_down.to(dev))
            mlp.down_proj = HadamardInputLinear(down)
        return names

    @torch.no_grad()
    def embedding(self, emb: nn.Embedding) -> None:
        """``E <- E Q`` (the new tensor: a tied head keeps the old one until :meth:`head`)."""
        emb.weight = nn.Parameter(emb.weight.to(torch.float64).matmul(self.q.to(emb.weight.device)).to(emb.weight.dtype),
                                  requires_grad=emb.weight.requires_grad)

    @torch.no_grad()
    def final_norm(self, norm: nn.Module) -> None:
        self._final_norm_weight = norm.weight.detach().to(torch.float64).clone()
        norm.weight.data = torch.ones_like(norm.weight)

    @torch.no_grad()
    def head(self, head: nn.Linear) -> None:
        """``W <- (W diag(w_norm)) Q`` as a new, untied parameter (call after :meth:`final_norm`)."""
        if self._final_norm_weight is None:
            raise RuntimeError("rotate: the head is rotated after the final norm is folded")
        w = self._final_norm_weight.to(head.weight.device)
        new = (head.weight.to(torch.float64) * w) @ self.q.to(head.weight.device)
        head.weight = nn.Parameter(new.to(head.weight.dtype), requires_grad=head.weight.requires_grad)


@torch.no_grad()
def rotate_(model: nn.Module, cfg: RotateConfig = RotateConfig(), on_module=None) -> nn.Module:
    """Rotate a Llama-like model's residual stream in place (function unchanged); returns the model.

    ``on_module(name, module)`` is called for each changed module. Example::

        rotate_(model, RotateConfig(seed=0))
    """
    rot = Rotation(model, cfg)  # refuses before anything changes
    from ..pipeline.skeleton import find_blocks

    _, blocks = find_blocks(model)
    for b, block in enumerate(blocks):
        for n in rot.block(block):
            if on_module is not None:
                on_module(f"{rot.prefix}.{b}.{n}", block.get_submodule(n))
    untie(model)
    rot.embedding(model.get_submodule(rot.embed_name))
    rot.final_norm(model.get_submodule(rot.norm_name))
    rot.head(model.get_submodule(rot.head_name))
    if on_module is not None:
        on_module(rot.embed_name, model.get_submodule(rot.embed_name))
        on_module(rot.head_name, model.get_submodule(rot.head_name))
    return model


def untie(model: nn.Module) -> bool:
    """Mark the config untied (the head gets its own tensor when rotated); True when it was tied."""
    conf = getattr(model, "config", None)
    was = bool(getattr(conf, "tie_word_embeddings", False))
    if was:
        conf.tie_word_embeddings = False
        log.info("rotate: untied the output head from the embeddings (the head carries the final norm's weight)")
    return was


def rotation_plan(cfg: RotateConfig, model: nn.Module | None, on_module):
    """The rotation on the block pipeline: ``(step, rest, prepare)``.

    ``step``: the data-free per-block update; ``rest(view)``: the embedding, final norm and head as the
    pipeline writes them (norm before head: the head takes its weight); ``prepare(view)``: the
    embedding the pipeline materialises to capture block 0's inputs, rotated the same way, so
    calibrated stages after this one see the rotated stream. ``model`` None: a plan only checked
    for streamability (no model yet)."""
    from ..pipeline.engine import BlockStep

    rot = Rotation(model, cfg) if model is not None else None  # refuses an unknown architecture up front

    def apply(ctx):
        for n in rot.block(ctx.block):
            on_module(f"{ctx.prefix}{n}", ctx.block.get_submodule(n))

    def _get(view, name):
        try:
            return view.get_submodule(name)
        except AttributeError:
            return None

    def rest(view):
        for name, fn, record in ((rot.embed_name, rot.embedding, True), (rot.norm_name, rot.final_norm, False),
                                 (rot.head_name, rot.head, True)):
            m = _get(view, name)
            if m is not None:
                fn(m)
                if record:
                    on_module(name, m)

    def prepare(view):
        m = _get(view, rot.embed_name)
        if m is not None:
            rot.embedding(m)

    return BlockStep(apply, needs_forward=False, name="rotate"), rest, prepare
