"""Evaluation metrics and the CLI's command span. Each is a no-op (no OpenTelemetry import) when off."""

from __future__ import annotations

import contextlib
import logging

from . import names as N
from .run import Instruments, _providers, _tracer

log = logging.getLogger("torchcompress.telemetry")


@contextlib.contextmanager
def span(name: str, attributes: dict | None = None):
    """A span around a block (errors recorded on it), or nothing when no SDK tracer is installed."""
    tp, _ = _providers()
    if tp is None:
        yield None
        return
    try:
        cm = _tracer(tp).start_as_current_span(name, attributes=attributes or {})
    except Exception as e:
        log.debug("telemetry: no span %s: %s", name, e)
        yield None
        return
    with cm as s:
        yield s


def command_span(command: str):
    """The CLI command's root span (``torchcompress.command``)."""
    return span(N.SPAN_COMMAND, {N.COMMAND: command})


def _num(v):
    return v is not None and isinstance(v, (int, float)) and v == v  # not None, not NaN


def record_eval(perplexity: float | None = None, *, baseline_perplexity: float | None = None,
                accuracy: float | None = None, baseline_accuracy: float | None = None,
                kl_divergence: float | None = None, top1_agreement: float | None = None,
                attributes: dict | None = None) -> None:
    """Record a model's quality, and its loss vs the uncompressed (``baseline_*``) model.

    >>> record_eval(19.44, baseline_perplexity=14.47, attributes={"torchcompress.recipe.name": "w4-rtn"})
    """
    _, mp = _providers()
    if mp is None:
        return
    try:
        m, a = Instruments(mp), dict(attributes or {})
        comp, ref = {**a, N.MODEL_STATE: "compressed"}, {**a, N.MODEL_STATE: "uncompressed"}
        if _num(perplexity):
            m.ppl.set(float(perplexity), comp if _num(baseline_perplexity) else a)
        if _num(baseline_perplexity):
            m.ppl.set(float(baseline_perplexity), ref)
            if _num(perplexity):
                m.ppl_increase.set(float(perplexity) / float(baseline_perplexity) - 1, a)
        if _num(accuracy):
            m.accuracy.set(float(accuracy), comp if _num(baseline_accuracy) else a)
        if _num(baseline_accuracy):
            m.accuracy.set(float(baseline_accuracy), ref)
            if _num(accuracy):
                m.accuracy_drop.set(float(baseline_accuracy) - float(accuracy), a)
        if _num(kl_divergence):
            m.kl.set(float(kl_divergence), a)
        if _num(top1_agreement):
            m.top1.set(float(top1_agreement), a)
    except Exception as e:
        log.debug("telemetry: record_eval failed: %s: %s", type(e).__name__, e)


def record_speedup(speedup: float, attributes: dict | None = None) -> None:
    """Record ``torchcompress.inference.speedup`` (uncompressed forward time / compressed)."""
    _, mp = _providers()
    if mp is None or not _num(speedup):
        return
    try:
        Instruments(mp).speedup.set(float(speedup), dict(attributes or {}))
    except Exception as e:
        log.debug("telemetry: record_speedup failed: %s", e)


@contextlib.contextmanager
def timed_eval(model, reference=None, attributes: dict | None = None):
    """While evaluating: time every forward of ``model`` (and ``reference``, the uncompressed one)
    with :func:`instrument`, and on exit record the speedup. Nothing when no SDK meter is installed."""
    _, mp = _providers()
    if mp is None:
        yield
        return
    from .hooks import instrument

    a = dict(attributes or {})
    tm = instrument(model, attributes={**a, N.MODEL_STATE: "compressed" if reference is not None else "evaluated"},
                    meter_provider=mp)
    tr = None
    if reference is not None and reference is not model:
        tr = instrument(reference, attributes={**a, N.MODEL_STATE: "uncompressed"}, meter_provider=mp)
    try:
        yield
    finally:
        tm.remove()
        if tr is not None:
            tr.remove()
            if tm.count and tr.count and tm.total_ms > 0:
                record_speedup(tr.mean_ms / tm.mean_ms, a)


@contextlib.contextmanager
def eval_scope(model, reference=None, attributes: dict | None = None):
    """An evaluation: a ``torchcompress.eval`` span, and the forwards of ``model`` (and
    ``reference``) timed into ``torchcompress.inference.duration`` with the speedup at the end."""
    with span(N.SPAN_EVAL, attributes), timed_eval(model, reference, attributes):
        yield


def record_eval_result(res, attributes: dict | None = None) -> None:
    """:func:`record_eval` for a :class:`torchcompress.eval.perplexity.EvalResult`."""
    record_eval(res.perplexity, baseline_perplexity=res.perplexity_ref, kl_divergence=res.kl_divergence,
                top1_agreement=res.top1_agreement, attributes={**(attributes or {}), N.EVAL_TOKENS: res.tokens})
