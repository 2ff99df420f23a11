"""ONNX export for onnxruntime / onnxruntime-genai: a KV-cache decoder whose quantized Linears are
``com.microsoft::MatMulNBits`` carrying our own codes, scales and zero points.

The float graph is built by a maintained exporter, onnxruntime-genai's model builder
(``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``), from a float32 copy of the model whose
weights are exactly what our layers compute with (formats/onnx_plan.py). The builder writes the
decoder (``input_ids``, ``attention_mask``, ``past_key_values.N.key/value`` in; ``logits``,
``present.N.key/value`` out; GroupQueryAttention with rotary positions derived from the attention
mask), ``genai_config.json`` and the tokenizer files. We then swap each quantized layer's ``MatMul``
for ``MatMulNBits``. MatMuls are matched to layers by their weights' bytes (the builder stores
``W^T`` verbatim), not by node names, so a builder that renames or reorders nodes cannot mis-assign
a layer; a quantized layer with no matching MatMul (e.g. a fused projection) is an error.

Requires the ``[onnx]`` extra (onnx, onnxruntime, onnxruntime-genai). Output is written atomically.

    >>> export_onnx(model, tokenizer, "out/smollm2-w4-onnx")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from .atomic import atomic_directory
from .onnx_plan import NBitsLayer, plan_layers, write_float_source

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SUMMARY_FILE = "torchcompress_onnx.json"
_BUILDER_OPTIONS = ["fuse_qkv=false"]  # one MatMul per Linear: q/k/v may differ in scheme


@dataclass
class OnnxExportResult:
    path: Path
    nbits_layers: dict[str, str] = field(default_factory=dict)  # layer -> "w4 g128 sym"
    float_layers: int = 0  # MatMuls left in float
    bytes: int = 0


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise InputError(f"--format onnx needs the [onnx] extra (pip install onnx onnxruntime onnxruntime-genai): {e}") from None


def _run_builder(src: Path, out: Path, cache: Path) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(cache), "--extra_options", *_BUILDER_OPTIONS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the builder reads the local copy only
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"onnxruntime-genai's model builder could not export this model: {tail[0]}")


def _digest(a) -> str:
    return hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _nbits_nodes(layer_name: str, node, layer: NBitsLayer, graph_inits: list):
    """Nodes (an optional input Gather for act-order, then MatMulNBits) replacing ``node`` (a MatMul)."""
    from onnx import helper, numpy_helper

    w = layer.weight
    base = f"{layer_name}.nbits"
    a_in = node.input[0]
    nodes = []
    if layer.perm is not None:  # act-order: x[..., perm] @ (columns sorted by group)
        graph_inits.append(numpy_helper.from_array(layer.perm.numpy().astype("int64"), f"{base}.perm"))
        a_in = f"{node.name}/act_order_gather/output_0"
        nodes.append(helper.make_node("Gather", [node.input[0], f"{base}.perm"], [a_in], axis=-1,
                                      name=f"{node.name}/act_order_gather"))
    graph_inits.append(numpy_helper.from_array(w.b.numpy(), f"{base}.qweight"))
    graph_inits.append(numpy_helper.from_array(w.scales.numpy(), f"{base}.scales"))
    inputs = [a_in, f"{base}.qweight", f"{base}.scales"]
    if w.zero_points is not None:
        graph_inits.append(numpy_helper.from_array(w.zero_points.numpy(), f"{base}.zero_points"))
        inputs.append(f"{base}.zero_points")
    nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), domain="com.microsoft",
                                  name=f"{node.name}NBits", K=w.k, N=w.n, bits=w.bits, block_size=w.block_size,
                                  accuracy_level=0))  # 0: A stays float32 (exact float products, no int8 A)
    return nodes


def rewrite_matmuls(model_proto, nbits: dict[str, NBitsLayer]) -> int:
    """Replace, in place, the MatMul of every layer in ``nbits`` by MatMulNBits; returns how many
    MatMuls stay float."""
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    by_digest: dict[tuple, list[str]] = {}
    for name, layer in nbits.items():
        wt = layer.dense.t().contiguous().numpy()  # (K, N): the builder's MatMul weight layout
        by_digest.setdefault((wt.shape, _digest(wt)), []).append(name)
    new_nodes, new_inits, dropped, n_float = [], [], set(), 0
    for node in graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            names = by_digest.get((arr.shape, _digest(arr)))
            if names:
                layer_name = names.pop(0)
                new_nodes.extend(_nbits_nodes(layer_name, node, nbits[layer_name], new_inits))
                dropped.add(node.input[1])
                continue
            n_float += 1
        new_nodes.append(node)
    missing = [n for names in by_digest.values() for n in names]
    if missing:
        raise InputError(f"{missing[0]}: no MatMul with this layer's weight in the builder's graph (fused or "
                         f"transformed projection?); {len(missing)} quantized layer(s) unplaced")
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return n_float


def export_onnx(model: torch.nn.Module, tokenizer, out: str | Path) -> OnnxExportResult:
    """Write ``out/`` (model.onnx + model.onnx.data, genai_config.json, tokenizer files) for
    onnxruntime-genai. Refuses (before writing anything) a layer ONNX cannot hold."""
    _require_onnx()
    import onnx

    out = Path(out)
    nbits, dense = plan_layers(model)  # every refusal happens here, before any file exists
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".build", dir=out.parent if out.parent.exists() else None))
    try:
        src, built = work / "float_source", work / "built"
        src.mkdir()
        write_float_source(model, tokenizer, src, nbits, dense)
        _run_builder(src, built, work / "cache")
        proto = onnx.load(str(built / MODEL_FILE))  # with its external data
        n_float = rewrite_matmuls(proto, nbits)
        with atomic_directory(out) as tmp:
            onnx.save_model(proto, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE, size_threshold=1024)
            for f in built.iterdir():
                if f.is_file() and f.name not in (MODEL_FILE, DATA_FILE):
                    shutil.copy2(f, tmp / f.name)
            summary = {"producer": "torchcompress", "matmul_nbits": {k: v.scheme for k, v in nbits.items()},
                       "float_matmuls": n_float, "builder": "onnxruntime_genai.models.builder -p fp32 -e cpu"}
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return OnnxExportResult(out, {k: v.scheme for k, v in nbits.items()}, n_float, size)
