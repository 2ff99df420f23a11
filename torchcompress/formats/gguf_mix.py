"""llama.cpp's file types ("mixes") and its per-tensor type choices for Llama-family models.

Mirrors ``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` for the types we write
(Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, IQ4_NL, IQ4_XS, plus the legacy Q4_0/Q4_1/Q5_0/Q5_1 and F16/F32) on
a dense (non-MoE, non-Falcon, not 70B) Llama model:

* only 2-D tensors whose name ends in ``weight`` and is not a ``*_norm.weight`` are quantized;
* ``output.weight`` (or ``token_embd.weight`` when embeddings are tied): Q8_0 if its rows are not
  a multiple of the default type's block, else Q6_K unless the default is Q8_0;
* ``attn_v``: Q6_K for Q4_K_M/Q5_K_M on "more bits" layers, Q5_K for Q4_K_S's first 4;
* ``ffn_down``: Q6_K for Q4_K_M/Q5_K_M on "more bits" layers, Q5_K for Q4_K_S's first n/8 (and
  for IQ4_NL/IQ4_XS's first n/8 when no imatrix is used); ``attn_v``: Q5_K for IQ4_NL/IQ4_XS when
  4 or more query heads share a KV head;
* then the shape fallback: rows not a multiple of 256 turn Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, and anything still not fitting -> F16.

``pure`` skips the mix rules (not the fallback); ``leave_output`` keeps ``output.weight`` as is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import ConfigError
from ..primitives.gguf_common import LAYOUTS, GGMLType


class FileType(enum.IntEnum):
    """``general.file_type`` values (llama.cpp's ``enum llama_ftype``)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 7
    Q5_0 = 8
    Q5_1 = 9
    Q2_K = 10
    Q3_K_S = 11
    Q3_K_M = 12
    Q3_K_L = 13
    Q4_K_S = 14
    Q4_K_M = 15
    Q5_K_S = 16
    Q5_K_M = 17
    Q6_K = 18
    IQ4_NL = 25
    IQ4_XS = 30


SUPPORTED = ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
             "IQ4_NL", "IQ4_XS")

_DEFAULT_TYPE = {
    FileType.F32: GGMLType.F32,
    FileType.F16: GGMLType.F16,
    FileType.Q4_0: GGMLType.Q4_0,
    FileType.Q4_1: GGMLType.Q4_1,
    FileType.Q5_0: GGMLType.Q5_0,
    FileType.Q5_1: GGMLType.Q5_1,
    FileType.Q8_0: GGMLType.Q8_0,
    FileType.Q4_K_S: GGMLType.Q4_K,
    FileType.Q4_K_M: GGMLType.Q4_K,
    FileType.Q5_K_S: GGMLType.Q5_K,
    FileType.Q5_K_M: GGMLType.Q5_K,
    FileType.Q6_K: GGMLType.Q6_K,
    FileType.IQ4_NL: GGMLType.IQ4_NL,
    FileType.IQ4_XS: GGMLType.IQ4_XS,
}

_FALLBACK = {
    GGMLType.Q2_K: GGMLType.Q4_0,
    GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
    GGMLType.IQ4_XS: GGMLType.IQ4_NL,
}


def parse_file_type(name: str) -> FileType:
    key = str(name).strip().upper()
    if key not in SUPPORTED:
        raise ConfigError("qtype", f"unknown GGUF type {name!r}; choose one of {', '.join(SUPPORTED)}")
    return FileType[key]


@dataclass(frozen=True)
class MixOptions:
    file_type: FileType
    pure: bool = False  # every quantizable tensor gets the default type (shape fallback still applies)
    leave_output: bool = False  # keep output.weight unquantized (F32 source stays F32)
    has_imatrix: bool = False  # IQ4_NL/IQ4_XS: without one, the first n/8 ffn_down get Q5_K
    n_gqa: int = 1  # query heads per KV head; IQ4_NL/IQ4_XS give attn_v Q5_K from 4 on

    def __post_init__(self):
        if not isinstance(self.file_type, FileType) or self.file_type not in _DEFAULT_TYPE:
            raise ConfigError("file_type", f"unsupported file type {self.file_type!r}")


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: GGMLType, ncols: int) -> GGMLType:
    if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) or ncols % LAYOUTS[t].block_size == 0:
        return t
    t2 = _FALLBACK.get(t, t)
    return t2 if ncols % LAYOUTS[t2].block_size == 0 else GGMLType.F16


class TypePlanner:
    """Picks each tensor's type in file order (llama.cpp counts attn_v tensors as it goes).

    >>> p = TypePlanner(MixOptions(FileType.Q4_K_M), n_layer=30, tied=True)
    >>> p.choose("blk.0.ffn_down.weight", (576, 1536))
    <GGMLType.Q6_K: 14>
    """

    def __init__(self, opts: MixOptions, n_layer: int, tied: bool):
        self.opts = opts
        self.n_layer = n_layer
        self.tied = tied
        self.i_attn_v = 0
        self.n_attn_v = n_layer  # one attn_v per layer in a dense Llama

    def choose(self, name: str, shape: tuple[int, ...], source: GGMLType = GGMLType.F32) -> GGMLType:
        """``shape`` is the PyTorch shape (rows, cols); ggml's ne[0] is the last dimension."""
        ft = self.opts.file_type
        default = _DEFAULT_TYPE[ft]
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            return source
        if self.opts.leave_output and name == "output.weight":
            return source
        if default in (GGMLType.F32, GGMLType.F16):
            return default
        ncols = shape[-1]
        t = default
        if not self.opts.pure:
            t = self._mix(name, ncols, default)
        return _fallback(t, ncols)

    def _mix(self, name: str, ncols: int, t: GGMLType) -> GGMLType:
        ft = self.opts.file_type
        if name == "output.weight" or (self.tied and name == "token_embd.weight"):
            if ncols % LAYOUTS[t].block_size:
                return GGMLType.Q8_0
            return t if t == GGMLType.Q8_0 else GGMLType.Q6_K
        if name == "token_embd.weight":
            return t
        if "attn_v.weight" in name:
            i = self.i_attn_v
            self.i_attn_v += 1
            if ft in (FileType.Q4_K_M, FileType.Q5_K_M) and _use_more_bits(i, self.n_attn_v):
                return GGMLType.Q6_K
            if ft == FileType.Q4_K_S and i < 4:
                return GGMLType.Q5_K
            if ft in (FileType.IQ4_NL, FileType.IQ4_XS) and self.opts.n_gqa >= 4:
                return GGMLType.Q5_K
            return t
        if "ffn_down" in name:
            i = int(name.split(".")[1])
            n = self.n_layer
            if ft in (FileType.Q4_K_M, FileType.Q5_K_M) and _use_more_bits(i, n):
                return GGMLType.Q6_K
            if ft == FileType.Q4_K_S and i < n // 8:
                return GGMLType.Q5_K
            if ft in (FileType.IQ4_NL, FileType.IQ4_XS) and i < n // 8 and not self.opts.has_imatrix:
                return GGMLType.Q5_K
            return t
        return t


fallback_type = _fallback  # public name: llama.cpp's shape fallback (GGUF QAT applies it too)
