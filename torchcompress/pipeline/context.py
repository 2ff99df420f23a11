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
    kwargs: list = field(default_factory=list)  # per batch: the first block's keyword arguments (masks, rotary)
    masks: list = field(default_factory=list)  # per batch: (B, L) attention mask, 1 on real tokens
    # block index -> per batch kwargs, for blocks that get other ones than the first (Gemma's sliding
    # and global layers get different masks and rotary tables)
    block_kwargs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden)

    def kwargs_for(self, block: int, i: int) -> dict:
        per = self.block_kwargs.get(block)
        return per[i] if per is not None else self.kwargs[i]


def _same(a, b) -> bool:
    """The same keyword arguments: identical tensor objects (the model passes one mask to every layer)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks, batches, device, offload_dir=None, keep_on=None) -> BlockInputs:
    """What the decoder ``blocks`` receive for every ``(ids, mask)`` batch: the first block's hidden
    states, and every block's keyword arguments. No block runs: each is replaced by a pass-through
    for the capture (so blocks may still be on the meta device); the forward stops after the last.

    Hidden states go to ``keep_on`` (default: ``device``) or to disk under ``offload_dir``."""
    got = BlockInputs(ActivationStore(offload_dir))
    keep_on = device if keep_on is None else keep_on
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
        blocks = [blocks]
    per_block: list[list] = [[] for _ in blocks]

    def passthrough(b):
        def fn(*args, **kwargs):
            kw = dict(kwargs)
            hidden = args[0] if args else kw.pop("hidden_states")
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            kw["use_cache"] = False
            if b == 0:
                got.hidden.append(hidden.detach().to(keep_on))
            per_block[b].append(kw)
            if b == len(blocks) - 1:
                raise StopForward
            return hidden
        return fn

    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate's dispatch hooks live there
    for b, block in enumerate(blocks):
        block.forward = passthrough(b)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        for ids, mask in batches:
            got.masks.append(mask.cpu())
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for block, fwd in zip(blocks, saved):
            if fwd is None:
                del block.forward
            else:
                block.forward = fwd
    for b in range(len(blocks)):
        if b and not all(_same(x, y) for x, y in zip(per_block[b], per_block[0])):
            got.block_kwargs[b] = [to_device(kw, "cpu") for kw in per_block[b]]
    got.kwargs = [to_device(kw, "cpu") for kw in per_block[0]]
    return got


def real_rows(x: torch.Tensor, mask: torch.Tensor | None, owner=None) -> torch.Tensor:
    """The rows of a linear's input ``x`` that are real calibration tokens, as (T, K).

    ``mask``: (B, L) bool, True on real tokens. ``x`` is (B, L, K); or (B * L, K), the flattened
    tokens a MoE layer hands its shared expert; or (T_e, K), the tokens routed to one expert, whose
    positions among the (B * L) the expert's ``owner`` (ExpertLinears, index) recorded in its forward."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    mask = mask.to(x.device)
    if x.shape[:-1] == mask.shape:
        return x[mask]
    if owner is not None:
        experts, e = owner
        return x[mask.reshape(-1)[experts.routed[e].to(x.device)]]
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    raise ValueError(f"linear input of shape {tuple(x.shape)} does not match the calibration mask {tuple(mask.shape)}")


class BlockContext:
    """A decoder block on the execution device and the activations entering it."""

    def __init__(self, block: nn.Module, prefix: str, inputs: BlockInputs, device, index: int = 0):
        self.block = block
        self.prefix = prefix  # "model.layers.3."
        self.inputs = inputs
        self.device = torch.device(device)
        self.index = index  # the block's position in the stack

    def forward(self, i: int) -> torch.Tensor:
        """Batch ``i`` through the block (its current weights)."""
        kw = to_device(self.inputs.kwargs_for(self.index, i), self.device)
        out = self.block(self.inputs.hidden[i].to(self.device), **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def collect(self, linears: dict[str, nn.Module], kind: str = "hessian", stop_after: str | None = None
                ) -> dict[str, Statistic]:
        """Statistics ``kind`` of each named linear's input over every batch's real tokens, summed
        across processes. ``stop_after``: the forward stops once that linear has run."""
        from .experts import routed_owners

        stats = {n: Statistic(kind, m.in_features, self.device) for n, m in linears.items()}
        mask = [None]
        owners = routed_owners(self.block)  # expert linears see only the rows routed to them

        def hook(name, stop):
            def fn(mod, args, _out):
                x = args[0].detach()  # (B, L, K), or (B * L, K) inside a MoE layer, or (T_e, K) in an expert
                stats[name].add(real_rows(x, mask[0], owners.get(id(mod))))
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
        order, seen, alive, placed = [], {}, [], set()

        def hook(name):
            def fn(_mod, args, _out):
                if name in placed:  # seen in an earlier batch
                    return
                placed.add(name)
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
            # batch 0 runs every dense linear; an expert no token of batch 0 was routed to waits for a
            # later batch (the batches run until every linear has been seen, or none is left)
            for i in range(len(self.inputs)):
                self.forward(i)
                if len(placed) == len(linears):
                    break
        finally:
            for h in handles:
                h.remove()
        # never run (an expert no calibration token reaches): each alone, as nothing shows a shared input
        return order + [[n] for n in linears if n not in placed]

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
