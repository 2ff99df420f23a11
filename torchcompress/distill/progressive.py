"""Smaller students by dropping decoder layers, and progressive distillation through a chain of them.

:func:`make_student` builds a fresh model of the same class from a copy of the config with fewer
layers and copies the kept layers' weights (and everything outside the layer stack) into it.
:func:`progressive_distill` runs stages ``teacher -> student_1 -> student_2 ...``: each student is
initialised from its predecessor and distilled from it with that stage's temperature and steps.

Example::

    stages = [ProgressiveStage(keep="every_other", steps=200), ProgressiveStage(keep="every_other", steps=200)]
    final, history = progressive_distill(model, stages, data)
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError, InputError
from .config import KDConfig, TrainSettings

log = logging.getLogger(__name__)


def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for prefix in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        try:
            mods = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(mods, nn.ModuleList):
            return prefix, mods
    raise InputError(f"{type(model).__name__}: no decoder layer stack found (looked for model.layers, transformer.h, layers)")


def resolve_keep(keep, n_layers: int) -> tuple[int, ...]:
    """``'every_other'`` (layers 0, 2, 4, ... and always the last), an int (that many, evenly spread,
    first and last kept) or explicit indices -> sorted unique indices."""
    if keep == "every_other":
        idx = list(range(0, n_layers, 2))
        if idx[-1] != n_layers - 1 and n_layers > 1:
            idx[-1] = n_layers - 1  # the last layer feeds the head: keep it, and the count stays ceil(n/2)
        return tuple(idx)
    if isinstance(keep, int) and not isinstance(keep, bool):
        if not 1 <= keep <= n_layers:
            raise ConfigError("keep", f"must keep between 1 and {n_layers} layers, got {keep}")
        if keep == 1:
            return (n_layers - 1,)
        return tuple(sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)}))
    if isinstance(keep, (list, tuple)) and keep and all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        idx = tuple(sorted(set(keep)))
        if idx[0] < 0 or idx[-1] >= n_layers:
            raise ConfigError("keep", f"layer indices must be in [0, {n_layers}), got {list(keep)}")
        return idx
    raise ConfigError("keep", f"must be 'every_other', a layer count or a list of layer indices, got {keep!r}")


def make_student(model: nn.Module, keep) -> nn.Module:
    """A new model of ``type(model)`` with only layers ``keep`` (see :func:`resolve_keep`), weights copied."""
    prefix, layers = _layer_stack(model)
    idx = resolve_keep(keep, len(layers))
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(idx)
    if getattr(cfg, "layer_types", None) is not None:  # per-layer attention kinds follow their layers
        cfg.layer_types = [cfg.layer_types[i] for i in idx]
    student = type(model)(cfg).to(dtype=next(model.parameters()).dtype)
    new_of_old = {old: new for new, old in enumerate(idx)}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    sd = {}
    for k, v in model.state_dict().items():
        m = pat.match(k)
        if m is None:
            sd[k] = v.clone()
        elif int(m.group(1)) in new_of_old:
            sd[f"{prefix}.{new_of_old[int(m.group(1))]}.{m.group(2)}"] = v.clone()
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise InputError(f"make_student: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return student.train(model.training)


@dataclass(frozen=True)
class ProgressiveStage:
    """One step of the chain: which layers of the predecessor the student keeps, the loss, the training."""

    keep: object = "every_other"
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        if not isinstance(self.kd, KDConfig) or not isinstance(self.train, TrainSettings):
            raise ConfigError("kd", "kd must be a KDConfig and train a TrainSettings")
        resolve_keep(self.keep, 10**6) if self.keep != "every_other" and not isinstance(self.keep, int) else None


def progressive_distill(model: nn.Module, stages, data, *, on_stage: Callable | None = None):
    """Run the chain; returns ``(final student, [loss history per stage])``. ``model`` is the first teacher
    and is not modified. ``on_stage(i, student, losses)`` is called after each stage (evaluation)."""
    from ..training.loop import BatchSchedule, train
    from .distiller import Distiller

    if not stages:
        raise ConfigError("stages", "progressive distillation needs at least one stage")
    teacher, history = model, []
    for i, st in enumerate(stages):
        student = make_student(teacher, st.keep)
        n_t, n_s = len(_layer_stack(teacher)[1]), len(_layer_stack(student)[1])
        log.info("progressive stage %d: %d -> %d layers, T=%s, %d steps", i, n_t, n_s, st.kd.temperature, st.train.steps)
        distiller = Distiller(teacher, st.kd)
        sched = BatchSchedule(data.input_ids, data.attention_mask, st.train.batch_size, st.train.seed)
        losses = train(student, sched, lambda m, ids, mask, d=distiller: d.loss(m, ids, mask), st.train)
        history.append(losses)
        if on_stage is not None:
            on_stage(i, student, losses)
        teacher = student
    return teacher.eval(), history


def drop_layers_(model: nn.Module, keep) -> tuple[int, ...]:
    """In place: keep only decoder layers ``keep`` (config, per-layer ``layer_idx`` and ``layer_types``
    follow). Same result as :func:`make_student` without building a second model; returns the kept
    indices."""
    prefix, layers = _layer_stack(model)
    idx = resolve_keep(keep, len(layers))
    from ..targets import set_submodule

    set_submodule(model, prefix, nn.ModuleList([layers[i] for i in idx]))
    for new, layer in enumerate(model.get_submodule(prefix)):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new  # the KV cache is indexed by position in the stack
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.num_hidden_layers = len(idx)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [cfg.layer_types[i] for i in idx]
    return idx


layer_stack = _layer_stack  # public name: (prefix, decoder layer list) of a model
