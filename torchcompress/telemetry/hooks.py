"""Inference timing through removable forward hooks: ``instrument(model)`` / ``uninstrument(model)``.

Every forward of the model and of the chosen modules is timed into the histogram
``torchcompress.inference.duration`` (s). ``sample_ratio`` bounds the overhead: the decision is
made once per model forward (deterministically: every 1/ratio-th call), and below 1 the modules'
hooks are registered for a sampled forward only (the model's pre-hook adds them, its post-hook
takes them off), so an unsampled forward pays for the model's two hooks alone. On CUDA a forward
is timed with CUDA events, read back once they completed (polled, never waited for) and at
``remove()`` (the one synchronize); on CPU with ``time.perf_counter_ns``. The hooks assume one
forward of the model at a time (training, eval and generation loops); forwards of one model from
several threads at once may mis-time modules.

Example::

    from torchcompress import telemetry
    telemetry.configure()                     # or OTEL_* environment variables + configure_from_env()
    h = telemetry.instrument(model, modules=["re:.*layers\\.\\d+"], sample_ratio=0.1)
    model.generate(...)
    telemetry.uninstrument(model)             # or h.remove()
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Iterable

import torch
import torch.nn as nn

from . import names as N

log = logging.getLogger("torchcompress.telemetry")

_ATTR = "_torchcompress_instrumentation"  # the model's list of live Instrumentation objects
_MAX_PENDING = 4096  # CUDA event pairs not yet read back; beyond this the oldest are dropped


class Instrumentation:
    """The hooks :func:`instrument` added; ``remove()`` takes every one of them off again.

    ``count``/``total_ms``/``mean_ms``: the model-level forwards timed so far.
    """

    def __init__(self, model: nn.Module, sample_ratio: float, histogram, attributes: dict):
        self.model, self.ratio, self.hist = model, float(sample_ratio), histogram
        self.count, self.total_ms, self.dropped = 0, 0.0, 0
        self.handles: list = []
        self._acc = 1.0 - self.ratio  # the first forward is sampled
        self._active = False
        self._starts: dict[int, list] = {}
        self._pending: collections.deque = collections.deque()
        self._base = dict(attributes)
        self._cuda = False
        # below ratio 1 the modules' hooks are only on during a sampled forward: an unsampled forward
        # then runs every module on PyTorch's hook-free fast path (a hook costs microseconds per call
        # even when it returns at once, which shows on launch-bound GPU forwards)
        self._dynamic = self.ratio < 1.0
        self._module_hooks: list = []  # (module, pre hook, post hook) registered per sampled forward
        self._live: list = []  # their handles while a sampled forward runs

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.count if self.count else float("nan")

    def _watch(self, module: nn.Module, attrs: dict, root: bool) -> None:
        dev = next((p.device for p in module.parameters()), None) or next((b.device for b in module.buffers()), None)
        cuda = dev is not None and dev.type == "cuda"
        self._cuda |= cuda
        attrs = {**self._base, **attrs, N.DEVICE: dev.type if dev is not None else "cpu"}
        key = id(module)
        if root:
            pre = self._root_pre(key, cuda)
            post = self._root_post(key, cuda, attrs)
            self.handles.append(module.register_forward_pre_hook(pre))
            self.handles.append(module.register_forward_hook(post, always_call=True))
        elif self._dynamic:
            self._module_hooks.append((module, self._pre(key, cuda), self._post(key, cuda, attrs, False)))
        else:
            self.handles.append(module.register_forward_pre_hook(self._pre(key, cuda)))
            self.handles.append(module.register_forward_hook(self._post(key, cuda, attrs, False)))

    def _start(self, cuda: bool):
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter_ns()

    def _pre(self, key: int, cuda: bool):
        def hook(module, args):
            if self._active:
                self._starts.setdefault(key, []).append(self._start(cuda))
        return hook

    def _post(self, key: int, cuda: bool, attrs: dict, root: bool):
        def hook(module, args, output):
            stack = self._starts.get(key)
            if not self._active or not stack:
                return
            start = stack.pop()
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                if len(self._pending) >= _MAX_PENDING:
                    self._pending.popleft()
                    self.dropped += 1
                self._pending.append((start, end, attrs, root))
                self._poll()
            else:
                self._record((time.perf_counter_ns() - start) / 1e6, attrs, root)
        return hook

    def _root_pre(self, key: int, cuda: bool):
        inner = self._pre(key, cuda)

        def hook(module, args):
            self._acc += self.ratio
            if self._acc < 1.0 - 1e-9:
                self._active = False
                return
            self._acc -= 1.0
            self._active = True
            for mod, pre, post in self._module_hooks:
                self._live.append(mod.register_forward_pre_hook(pre))
                self._live.append(mod.register_forward_hook(post))
            inner(module, args)
        return hook

    def _root_post(self, key: int, cuda: bool, attrs: dict):
        inner = self._post(key, cuda, attrs, True)

        def hook(module, args, output):  # always called; output is None when forward raised: not timed
            try:
                if output is not None:
                    inner(module, args, output)
            finally:
                self._active = False
                self._starts.clear()  # an exception mid-forward leaves starts behind
                self._unhook_modules()
        return hook

    def _unhook_modules(self) -> None:
        for h in self._live:
            h.remove()
        self._live.clear()

    def _record(self, ms: float, attrs: dict, root: bool) -> None:
        if root:
            self.count += 1
            self.total_ms += ms
        try:
            self.hist.record(ms / 1000.0, attrs)  # the metric is in seconds (OpenTelemetry's unit for durations)
        except Exception as e:  # never let telemetry break a forward
            log.debug("telemetry: record failed: %s", e)

    def _poll(self) -> None:
        while self._pending and self._pending[0][1].query():
            start, end, attrs, root = self._pending.popleft()
            self._record(start.elapsed_time(end), attrs, root)

    def remove(self) -> None:
        """Remove every hook (and read back the CUDA timings still in flight)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._unhook_modules()
        self._module_hooks.clear()
        if self._cuda and self._pending:
            torch.cuda.synchronize()
            self._poll()
        live = getattr(self.model, _ATTR, None)
        if live is not None and self in live:
            live.remove(self)
            if not live:
                delattr(self.model, _ATTR)


def instrument(model: nn.Module, modules: Iterable | None = None, *, sample_ratio: float = 1.0,
               attributes: dict | None = None, meter_provider=None) -> Instrumentation:
    """Time ``model``'s forward passes, and those of ``modules`` (patterns as in recipes: types,
    names, ``re:`` regexes), into ``torchcompress.inference.duration``. Returns the hooks' handle.

    ``meter_provider``: where to record (default: OpenTelemetry's global one). With no SDK meter
    provider installed nothing is hooked (telemetry is off) and an empty handle comes back.
    """
    from ..errors import ConfigError

    if isinstance(sample_ratio, bool) or not isinstance(sample_ratio, (int, float)) or not 0 < sample_ratio <= 1:
        raise ConfigError("sample_ratio", f"must be in (0, 1], got {sample_ratio!r}")
    if meter_provider is None:
        from .run import _providers

        meter_provider = _providers()[1]
    if meter_provider is None:
        log.debug("telemetry: instrument(): no OpenTelemetry meter provider installed; nothing hooked")
        return Instrumentation(model, sample_ratio, None, {})
    from .. import __version__

    hist = meter_provider.get_meter(N.SCOPE, __version__).create_histogram(
        N.M_INFER[0], unit=N.M_INFER[1], description=N.M_INFER[2], explicit_bucket_boundaries_advisory=N.INFER_BUCKETS)
    inst = Instrumentation(model, sample_ratio, hist, attributes or {})
    inst._watch(model, {N.SCOPE_KIND: "model", N.MODULE_TYPE: type(model).__name__}, root=True)
    if modules is not None:
        from ..targets import select_modules

        seen = {id(model)}
        for name, mod in select_modules(model, targets=modules):
            if id(mod) not in seen:
                seen.add(id(mod))
                inst._watch(mod, {N.SCOPE_KIND: "module", N.MODULE: name, N.MODULE_TYPE: type(mod).__name__}, root=False)
    live = getattr(model, _ATTR, None)
    if live is None:
        live = []
        object.__setattr__(model, _ATTR, live)  # a plain attribute: not a submodule, not in state_dict
    live.append(inst)
    return inst


def uninstrument(model: nn.Module) -> int:
    """Remove every hook :func:`instrument` put on ``model``. Returns how many instrument() calls it undid."""
    n = 0
    for inst in list(getattr(model, _ATTR, ())):
        n += 1
        inst.remove()
    return n
