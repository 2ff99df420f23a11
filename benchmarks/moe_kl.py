"""KL(float || quantized) of a random-initialised tiny Mixtral through the block pipeline: w4-rtn vs
w4-gptq-g128, calibrated and evaluated on disjoint random token windows, and how many expert linears
fell back to round-to-nearest for too few routed calibration tokens.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python3 benchmarks/moe_kl.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    import transformers as t

    from torchcompress.calibration.data import CalibrationSet
    from torchcompress.formats.checkpoint import load_compressed
    from torchcompress.recipe.schema import load_recipe
    from torchcompress.recipe.streaming import compress_checkpoint

    torch.manual_seed(0)
    cfg = t.MixtralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=256)
    model = t.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    cal = torch.randint(0, 512, (64, 64), generator=g)
    held_out = torch.randint(0, 512, (16, 64), generator=g)
    calib = CalibrationSet(cal, torch.ones_like(cal))
    with torch.no_grad():
        ref = F.log_softmax(model(held_out).logits, -1)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        model.save_pretrained(src)
        for name in ("w4-rtn", "w4-gptq-g128"):
            rep = compress_checkpoint(src, load_recipe(name), Path(d) / name, calib=calib)
            q = load_compressed(Path(d) / name)
            with torch.no_grad():
                lq = F.log_softmax(q(held_out).logits, -1)
            kl = (ref.exp() * (ref - lq)).sum(-1).mean().item()
            fell = sum(1 for r in rep.layers if r.rtn_fallback)
            print(f"{name}: mean KL(float || quantized) {kl:.5f} nats/token over {held_out.numel()} tokens; "
                  f"rtn_fallback {fell}/{len(rep.layers)} linears")


if __name__ == "__main__":
    main()
