"""One decoder block with the calibration activations that enter it.

:func:`capture_inputs` runs the model up to its first decoder block (embeddings, rotary tables,
masks) and keeps what the block receives: hidden states (in an :class:`ActivationStore`: on the
execution device, or on disk with ``offload_dir`` from the first batch on), the keyword arguments
(masks, position embeddings) and the real-token masks. :class:`BlockContext` is what a stage's
per-block callback gets: run the batches through the block, collect input statistics of named
linears (summed across processes), find which linears share an input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..calibration.offload import ActivationStore
from .stats import Statistic


class StopForward(Exception):
    """Raised by a hook once the rest of a forward is not needed."""


def to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    hidden: ActivationStore  # per batch: (B, L, D)
    kwargs: list = field(default_factory=list)  # per batch: the block call's keyword arguments (CPU)
    masks: list = field(default_factory=list)  # per batch: (B, L) attention mask, 1 on real tokens

    def __len__(self) -> int:
        return len(self.hidden)


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, batches, device, offload_dir=None,
                   keep_on=None) -> BlockInputs:
    """What ``first_block`` receives for every ``(ids, mask)`` batch, captured before it runs.

    Hidden states go to ``keep_on`` (default: ``device``) or to disk under ``offload_dir``."""
    got = BlockInputs(ActivationStore(offload_dir))
    keep_on = device if keep_on is None else keep_on

    def hook(_mod, args, kwargs):
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw["use_cache"] = False
        got.hidden.append(hidden.detach().to(keep_on))
        got.kwargs.append(to_device(kw, "cpu"))
        raise StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, mask in batches:
            got.masks.append(mask.cpu())
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return got


class BlockContext:
    """A decoder block on the execution device and the activations entering it."""

    def __init__(self, block: nn.Module, prefix: str, inputs: BlockInputs, device):
        self.block = block
        self.prefix = prefix  # "model.layers.3."
        self.inputs = inputs
        self.device = torch.device(device)

    def forward(self, i: int) -> torch.Tensor:
        """Batch ``i`` through the block (its current weights)."""
        out = self.block(self.inputs.hidden[i].to(self.device), **to_device(self.inputs.kwargs[i], self.device))
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def collect(self, linears: dict[str, nn.Module], kind: str = "hessian", stop_after: str | None = None
                ) -> dict[str, Statistic]:
        """Statistics ``kind`` of each named linear's input over every batch's real tokens, summed
        across processes. ``stop_after``: the forward stops once that linear has run."""
        stats = {n: Statistic(kind, m.in_features, self.device) for n, m in linears.items()}
        mask = [None]

        def hook(name, stop):
            def fn(_mod, args, _out):
                x = args[0].detach()  # (B, L, K)
                m = mask[0]
                x = x[m.to(x.device)] if m is not None else x.reshape(-1, x.shape[-1])  # (T, K)
                stats[name].add(x)
                if stop:
                    raise StopForward
            return fn

        handles = [m.register_forward_hook(hook(n, n == stop_after)) for n, m in linears.items()]
        try:
            for i in range(len(self.inputs)):
                mask[0] = self.inputs.masks[i].bool()
                try:
                    self.forward(i)
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        return {n: s.all_reduce() for n, s in stats.items()}

    @torch.no_grad()
    def linear_groups(self, linears: dict[str, nn.Module]) -> list[list[str]]:
        """Linears in execution order, grouped by shared input (q/k/v read the same tensor)."""
        order, seen, alive = [], {}, []

        def hook(name):
            def fn(_mod, args, _out):
                alive.append(args[0])  # kept alive so no later tensor reuses its address
                key = (args[0].data_ptr(), tuple(args[0].shape))
                if key in seen:
                    order[seen[key]].append(name)
                else:
                    seen[key] = len(order)
                    order.append([name])
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
        try:
            if len(self.inputs):
                self.forward(0)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in linears if not any(n in g for g in order)]
        return order + ([missing] if missing else [])

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """Every batch through the block, in order (kept where the inputs are kept)."""
        return [self.forward(i).detach() for i in range(len(self.inputs))]

    @torch.no_grad()
    def propagate(self, outputs: list[torch.Tensor] | None = None) -> None:
        """Replace the inputs by the block's outputs (or by ``outputs``): the next block's inputs."""
        for i in range(len(self.inputs)):
            out = outputs[i] if outputs is not None else self.forward(i).detach()
            keep = self.inputs.hidden[i].device if not self.inputs.hidden.on_disk else "cpu"
            self.inputs.hidden[i] = out.to(keep)
