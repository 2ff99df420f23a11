"""The compressed-tensors package as the oracle of our exports: its own decompressor on a saved directory."""

import json


def their_weight(path, name):
    """Module ``name``'s weight as compressed-tensors decompresses it from ``path/model.safetensors``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    group = next(g for g in qc["config_groups"].values() if name in g["targets"])
    scheme = QuantizationScheme(**{k: group[k] for k in ("targets", "weights", "input_activations", "format")})
    sd = load_file(str(path / "model.safetensors"))
    sub = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
    return BaseCompressor.get_value_from_registry(group["format"]).decompress(sub, scheme)["weight"]
