"""A model's skeleton on the meta device, its decoder blocks, and moving one module at a time
between the checkpoint, the execution device and nothing.

Parameters of the skeleton are meta tensors (no memory); buffers computed at construction (rotary
``inv_freq``) stay real. :func:`materialize` gives one submodule its checkpoint tensors on the
execution device, :func:`release` turns them back into meta tensors.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn

from ..errors import FormatError, InputError
from .shards import Checkpoint

log = logging.getLogger(__name__)

# model_type -> how its checkpoint is known to be laid out: a decoder stack at ``model.layers``
# (the transformers CausalLM classes of these families); others are found by the generic search.
KNOWN_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
               "qwen2_moe", "qwen3_moe", "olmo2", "granite")


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The transformers causal LM of ``ckpt`` with meta parameters in ``dtype`` (real buffers)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..formats.hf import register_model_type

    register_model_type()  # a checkpoint in our own format names its model_type so only we read it
    try:
        config = AutoConfig.from_pretrained(str(ckpt.dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(ckpt.dir / "config.json", f"not a usable transformers config: {e}") from None
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise InputError(f"{ckpt.dir}: architecture {getattr(config, 'model_type', '?')!r} is not a causal LM "
                         f"transformers can build: {e}".splitlines()[0]) from None
    from .experts import unfuse_experts_

    unfuse_experts_(model)  # one nn.Linear per expert projection, named as the checkpoint names them
    return model.eval()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, layers)``: the decoder block list (``model.layers`` in Llama-like models)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and (n is None or len(m) == n) and name.endswith("layers"):
            return name, m
    mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise InputError(f"architecture {mt!r}: no known decoder blocks (a list of num_hidden_layers modules named "
                     "'layers'); the block pipeline cannot stream it")


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """Parameter names that share their tensor with another one (tied embeddings): name -> source.
    transformers ties them only when weights load; its ``all_tied_weights_keys`` names the pairs."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if isinstance(declared, dict) and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {str(k): str(v) for k, v in declared.items()}
    out, seen = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return out


def checkpoint_key(model: nn.Module, ckpt: Checkpoint, full: str) -> str:
    """The checkpoint's name for the model's tensor ``full``: the same name, the name transformers'
    conversion mapping renames to it (``block_sparse_moe.`` -> ``mlp.``), or, for tied copies, their source."""
    if full in ckpt.tensors:
        return full
    renamed = _renamed(model, ckpt).get(full)
    if renamed is not None:
        return renamed
    tied = tied_sources(model)
    src = tied.get(full)
    if src is not None and src in ckpt.tensors:
        return src
    for a, b in tied.items():  # the checkpoint may hold the other name of a tied pair
        if b == full and a in ckpt.tensors:
            return a
    raise FormatError(ckpt.dir, f"no tensor {full!r} in the checkpoint")


def _renamed(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Module tensor name -> checkpoint key, for the keys the conversion mapping renames (cached on the model)."""
    cache = model.__dict__.setdefault("_tc_ckpt_names", {})
    got = cache.get(id(ckpt))
    if got is None:
        from .experts import checkpoint_names

        got = cache[id(ckpt)] = checkpoint_names(model, ckpt.tensors)
    return got


def tied_sources(model: nn.Module) -> dict[str, str]:
    """Tied tensor name -> the name it shares its tensor with (cached on the model)."""
    tied = getattr(model, "_tc_tied", None)
    if tied is None:
        tied = model._tc_tied = _tied_sources(model)
    return tied


@torch.no_grad()
def read_state(model: nn.Module, name: str, ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Submodule ``name``'s meta tensors read from ``ckpt`` into CPU memory (floats in ``dtype``)."""
    module = model.get_submodule(name) if name else model
    prefix = f"{name}." if name else ""
    sd = {}
    for key, t in module.state_dict(keep_vars=True).items():
        if not t.is_meta:
            continue
        src = checkpoint_key(model, ckpt, prefix + key)
        v = ckpt.get(src, dtype=dtype if t.is_floating_point() else None)
        if v.dtype == torch.float16 and ckpt.tensors[src].dtype != torch.float16 and not bool(torch.isfinite(v).all()):
            raise InputError(f"--dtype float16: tensor {src!r} of {ckpt.dir} holds values beyond float16's range "
                             "(use bfloat16 or float32)")
        if tuple(v.shape) != tuple(t.shape):
            raise FormatError(ckpt.tensors[src].file, f"tensor {src!r} has shape {tuple(v.shape)}; the config implies "
                                                      f"{tuple(t.shape)}")
        sd[key] = v
    return sd


@torch.no_grad()
def assign_state(model: nn.Module, name: str, sd: dict[str, torch.Tensor], device) -> nn.Module:
    """Give submodule ``name`` the tensors ``sd`` (from :func:`read_state`) on ``device``."""
    module = model.get_submodule(name) if name else model
    module.load_state_dict({k: v.to(device, non_blocking=True) for k, v in sd.items()}, strict=False, assign=True)
    for key, t in module.named_buffers():  # computed buffers (rotary) follow the module to the device
        if not t.is_meta and t.device != torch.device(device):
            owner, _, attr = key.rpartition(".")
            (module.get_submodule(owner) if owner else module)._buffers[attr] = t.to(device)
    return module


def materialize(model: nn.Module, name: str, ckpt: Checkpoint, dtype: torch.dtype, device) -> nn.Module:
    """Load submodule ``name``'s parameters and persistent buffers from ``ckpt`` onto ``device``."""
    return assign_state(model, name, read_state(model, name, ckpt, dtype), device)


class Prefetcher:
    """Reads block ``b + 1``'s tensors from disk on a thread while block ``b`` is worked on (file
    reads release the GIL): one extra block in host memory buys the I/O's overlap with compute."""

    def __init__(self, model: nn.Module, names: list[str], ckpt: Checkpoint, dtype: torch.dtype):
        from concurrent.futures import ThreadPoolExecutor

        self.model, self.names, self.ckpt, self.dtype = model, names, ckpt, dtype
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tc-prefetch")
        self.pending: dict[int, object] = {}

    def _submit(self, i: int) -> None:
        if 0 <= i < len(self.names) and i not in self.pending:
            self.pending[i] = self.pool.submit(read_state, self.model, self.names[i], self.ckpt, self.dtype)

    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors (read now if not prefetched), and start reading block ``i + 1``."""
        self._submit(i)
        sd = self.pending.pop(i).result()
        self._submit(i + 1)
        return sd

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True)


def release(module: nn.Module) -> None:
    """Drop the module's tensors (parameters and buffers become meta tensors again) and hand the
    freed heap back to the OS: glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap
    threshold in the heap, so without a trim every block's weights would stay in the resident set."""
    module.to("meta")
    _malloc_trim()


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def _malloc_trim() -> None:
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a missing GPU is bad input."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InputError(f"--device {spec}: not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {spec}: only auto, cpu, cuda and cuda:N are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(spec: str | None, ckpt_dtype: torch.dtype | None, source: str = "the checkpoint") -> torch.dtype:
    """``auto`` = the checkpoint's ``torch_dtype`` (float32 when it names none)."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return ckpt_dtype if ckpt_dtype in _DTYPES.values() else torch.float32
    if spec not in _DTYPES:
        raise InputError(f"--dtype {spec}: not one of auto, bfloat16, float16, float32")
    return _DTYPES[spec]
