"""A lean greedy/sampling decoder for Llama-family causal LMs whose layers may be compressed.

``transformers``' ``generate()`` spends most of a small model's CPU decode step in Python: per block
the module tree, cache objects, mask construction, RoPE, and per linear layer the path from the
module to its kernel. :class:`Decoder` runs the same computation on the same modules with a static
KV cache and linear layers bound once to their kernels (:mod:`.kernels`): q/k/v and gate/up each
become one call, norms are the model's own modules (their exact arithmetic), RoPE tables are
computed once by the model's own rotary embedding, and decode attention runs on the key/value heads
(query heads packed per KV head, as transformers does for one query token).

For one sequence whose block layers all have native kernels (GGUF blocks, 4/8-bit int codes), a
decode step is one native call instead (:func:`.kernels.native_plan`, ``kernels/cpu/decode_step.cpp``):
one OpenMP team per token, the same row kernels, no Python between the pieces of the step.
``TORCHCOMPRESS_DECODE_STEP=0`` turns it off.

    >>> from torchcompress.runtime import generate
    >>> out = generate(model, input_ids, max_new_tokens=32)        # greedy, (B, T + 32)

Handled: decoder-only models whose blocks have ``self_attn.{q,k,v,o}_proj`` (optional biases,
optional per-head ``q_norm``/``k_norm`` as in Qwen3), ``mlp.{gate,up,down}_proj`` with SiLU,
``input_layernorm``/``post_attention_layernorm``, full attention (Llama, Mistral without an active
sliding window, Qwen2, Qwen3, SmolLM). Anything else raises :class:`UnsupportedModelError` naming
what is missing, so a caller can use ``model.generate`` instead. Prompts in a batch have equal length
(no padding mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from .kernels import RMS_NORMS, Kernel, bind, bind_rows, native_plan

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(InputError):
    """The model's architecture is not one :class:`Decoder` runs; the message says which part."""


@dataclass
class _Block:
    norm1: Kernel
    qkv: Kernel
    q_norm: Kernel | None
    k_norm: Kernel | None
    o: Kernel
    norm2: Kernel
    gate_up: Kernel
    down: Kernel


# RMSNorm classes whose forward is x * rsqrt(mean(x^2) + eps) * weight computed in fp32: for fp32
# weights torch.rms_norm gives the same bits in one op instead of six (tests check the tokens)
_RMS_NORMS = RMS_NORMS


def _norm(mod: nn.Module):
    w = getattr(mod, "weight", None)
    eps = getattr(mod, "variance_epsilon", None)
    if type(mod).__name__ in _RMS_NORMS and w is not None and w.dtype == torch.float32 and eps is not None:
        shape = (w.shape[0],)
        return lambda h: torch.rms_norm(h, shape, w, eps)
    return mod


def _get(obj, path: str, where: str):
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModelError(f"{where}: no {path!r} (the decoder runs Llama-style blocks)")
        obj = getattr(obj, part)
    return obj


class Decoder:
    """Static-cache decoding state for one model: ``max_len`` positions for ``batch`` sequences.
    ``isa`` picks the native decode step's instruction set (``auto``: the best this CPU has; tests
    name ``avx2`` to cover the AMD path on an AVX-512 machine)."""

    def __init__(self, model: nn.Module, max_len: int = 2048, batch: int = 1, isa: str = "auto"):
        cfg = model.config
        kind = getattr(cfg, "model_type", None)
        if kind not in SUPPORTED:
            raise UnsupportedModelError(f"model_type {kind!r}: the decoder runs {', '.join(SUPPORTED)}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg.hidden_act!r}: the decoder's MLP is SiLU-gated")
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and max_len > window:
            raise UnsupportedModelError(f"sliding_window {window} < max_len {max_len}: the decoder runs full attention")
        if max_len < 1 or batch < 1:
            raise InputError(f"Decoder: max_len and batch must be >= 1, got {max_len}, {batch}")
        self.model = model
        inner = _get(model, "model", "model")
        self.embed = _get(inner, "embed_tokens", "model.model")
        self.norm = _get(inner, "norm", "model.model")
        self.head = _get(model, "lm_head", "model")
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len, self.batch = max_len, batch
        layers = _get(inner, "layers", "model.model")
        self.blocks = [self._block(i, layer) for i, layer in enumerate(layers)]
        self.scaling = float(getattr(layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        p = next(model.parameters())
        dtype, device = p.dtype, p.device
        # RoPE tables from the model's own rotary embedding (its scaling rules and attention factor)
        pos = torch.arange(max_len, device=device).unsqueeze(0)
        with torch.inference_mode():
            cos, sin = inner.rotary_emb(torch.zeros(1, 1, self.head_dim, dtype=dtype, device=device), pos)
        # rotate_half(x) * sin == x.roll(hd / 2) * sin_signed, sin_signed = (-sin[:hd/2], sin[hd/2:]):
        # negation is exact, so the same bits with one op instead of four
        half = self.head_dim // 2
        self.cos = cos.clone()  # (1, max_len, head_dim)
        self.sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        shape = (len(self.blocks), batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.head_kernel = bind(self.head)
        self.norm_kernel = _norm(self.norm)
        self.layer_k = list(self.k_cache.unbind(0))  # (batch, n_kv, max_len, head_dim) views per block
        self.layer_v = list(self.v_cache.unbind(0))
        # one native call per decode step when every block's layers have native kernels (batch 1, fp32)
        self.plan = native_plan(self, layers, isa) if batch == 1 and dtype == torch.float32 else None

    def _block(self, i: int, layer: nn.Module) -> _Block:
        where = f"model.model.layers.{i}"
        attn, mlp = _get(layer, "self_attn", where), _get(layer, "mlp", where)
        q, k, v = (_get(attn, f"{n}_proj", f"{where}.self_attn") for n in "qkv")
        o = _get(attn, "o_proj", f"{where}.self_attn")
        gate, up, down = (_get(mlp, f"{n}_proj", f"{where}.mlp") for n in ("gate", "up", "down"))
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Block(
            norm1=_norm(_get(layer, "input_layernorm", where)), qkv=bind_rows([q, k, v]),
            q_norm=None if qn is None else _norm(qn), k_norm=None if kn is None else _norm(kn), o=bind(o),
            norm2=_norm(_get(layer, "post_attention_layernorm", where)), gate_up=bind_rows([gate, up]),
            down=bind(down),
        )

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Runs tokens ``ids`` (B, T) at positions ``pos .. pos+T-1`` (the cache holds 0..pos-1) and
        returns the logits of the last position, (B, vocab)."""
        B, T = ids.shape
        if B != self.batch:
            raise InputError(f"Decoder: built for batch {self.batch}, got {B} sequences")
        if pos < 0 or pos + T > self.max_len:
            raise InputError(f"Decoder: positions {pos}..{pos + T - 1} exceed max_len {self.max_len}")
        if T == 1 and self.plan is not None:
            h = self.plan.step(self.embed(ids).reshape(1, -1), pos)
            return self.head_kernel(self.norm_kernel(h))
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        h = self.embed(ids)  # (B, T, H)
        H = h.shape[-1]
        cos = self.cos[:, pos:pos + T].unsqueeze(1)  # (1, 1, T, hd)
        sin = self.sin[:, pos:pos + T].unsqueeze(1)
        end = pos + T
        mask = None
        if T > 1 and pos > 0:  # a prompt continued after cached tokens: causal over the new rows
            mask = torch.ones(T, end, dtype=torch.bool, device=h.device).tril(pos)
        half = hd // 2
        nqk = nh + nkv if self.blocks and self.blocks[0].q_norm is None else 0  # q and k roped together
        for i, b in enumerate(self.blocks):
            x = b.norm1(h).reshape(B * T, H)
            qkv = b.qkv(x)
            if nqk:
                qk = qkv[:, :nqk * hd].reshape(B, T, nqk, hd).transpose(1, 2)  # (B, nh + nkv, T, hd)
                qk = qk * cos + qk.roll(half, -1) * sin
                q, k = qk[:, :nh], qk[:, nh:]
            else:
                q = b.q_norm(qkv[:, :nh * hd].reshape(B, T, nh, hd)).transpose(1, 2)
                k = b.k_norm(qkv[:, nh * hd:(nh + nkv) * hd].reshape(B, T, nkv, hd)).transpose(1, 2)
                q = q * cos + q.roll(half, -1) * sin
                k = k * cos + k.roll(half, -1) * sin
            v = qkv[:, (nh + nkv) * hd:].reshape(B, T, nkv, hd).transpose(1, 2)
            kc, vc = self.layer_k[i], self.layer_v[i]
            kc[:, :, pos:end] = k
            vc[:, :, pos:end] = v
            kk, vv = kc[:, :, :end], vc[:, :, :end]
            if T == 1:  # query heads packed per KV head: (B, nkv, nh / nkv, hd), no repeat of K/V
                a = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hd), kk, vv, scale=self.scaling)
            else:
                a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None,
                                                   scale=self.scaling, enable_gqa=nh != nkv)
            a = a.reshape(B, nh, T, hd).transpose(1, 2).reshape(B * T, nh * hd)
            h = h + b.o(a).reshape(B, T, H)
            x = b.norm2(h).reshape(B * T, H)
            g, u = b.gate_up(x).chunk(2, dim=-1)
            h = h + b.down(F.silu(g) * u).reshape(B, T, H)
        last = self.norm_kernel(h[:, -1])  # (B, H)
        return self.head_kernel(last)


@torch.inference_mode()
def generate(model_or_decoder, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
             min_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``input_ids`` (B, T) followed by up to ``max_new_tokens`` tokens: greedy when ``temperature``
    is 0, else sampled from softmax(logits / temperature), restricted to the ``top_k`` most likely
    when ``top_k`` > 0. Stops early once every sequence has produced ``eos_token_id``; before
    ``min_new_tokens`` tokens that token is never chosen (its logit is -inf, as in transformers)."""
    if max_new_tokens < 0 or min_new_tokens < 0:
        raise InputError(f"max_new_tokens and min_new_tokens must be >= 0, got {max_new_tokens}, {min_new_tokens}")
    if min_new_tokens and eos_token_id is None:
        raise InputError("min_new_tokens needs eos_token_id (the token it keeps from being chosen)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    dec = model_or_decoder
    if not isinstance(dec, Decoder):
        dec = Decoder(model_or_decoder, max_len=T + max_new_tokens, batch=B)
    elif T + max_new_tokens > dec.max_len or B != dec.batch:
        raise InputError(f"Decoder built for batch {dec.batch}, {dec.max_len} positions; "
                         f"asked for batch {B}, {T + max_new_tokens}")
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = dec.forward(input_ids, 0)
    pos = T
    for step in range(max_new_tokens):
        if step < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        nxt = _pick(logits, temperature, top_k, generator)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        logits = dec.forward(nxt[:, None], pos)
        pos += 1
    return torch.cat(out, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
