"""Run by test_ddp.py, alone or under `accelerate launch --cpu --num_processes N`: a tiny-Llama QAT run
with a fixed global batch; rank 0 writes the per-step global loss to argv[1]."""

import json
import sys

import torch


def main(out: str) -> None:
    from accelerate import Accelerator
    from transformers import LlamaForCausalLM

    sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
    from tests.tiny import tiny_config
    from torchcompress.config import QATConfig, QuantScheme
    from torchcompress.distill import TrainSettings
    from torchcompress.training.hooks import QATHook
    from torchcompress.training.loop import BatchSchedule, causal_lm_loss, train

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    print("distributed:", acc.distributed_type, acc.num_processes, flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=96))
    ids = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0))
    data = BatchSchedule(ids, batch_size=4, seed=1)
    hook = QATHook(QATConfig(QuantScheme(bits=4, group_size=32, symmetric=False), learnable_scale=True), freeze=False)
    losses = train(model, data, causal_lm_loss, TrainSettings(steps=8, lr=2e-3), hooks=[hook], accelerator=acc)
    if acc.is_main_process:
        w = model.model.layers[0].mlp.up_proj.weight.detach()
        with open(out, "w") as f:
            json.dump({"losses": losses, "world": acc.num_processes, "w_sum": float(w.double().sum())}, f)


if __name__ == "__main__":
    main(sys.argv[1])
