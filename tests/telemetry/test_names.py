"""Telemetry names: each assigned once, the README's list matches names.py, units follow OpenTelemetry."""

import ast
import re
from pathlib import Path

from torchcompress.telemetry import names as N

ROOT = Path(__file__).resolve().parents[2]


def _assignments():
    tree = ast.parse((ROOT / "torchcompress" / "telemetry" / "names.py").read_text())
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]


def _known() -> set:
    out = set()
    for k in dir(N):
        v = getattr(N, k)
        if isinstance(v, str) and v.startswith("torchcompress."):
            out.add(v)
        elif isinstance(v, tuple) and v and isinstance(v[0], str) and v[0].startswith("torchcompress."):
            out.add(v[0])
    return out


def test_every_name_assigned_once():
    names = _assignments()
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_readme_names_are_the_ones_emitted():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Spans: `torchcompress.command`"):text.index("The full list is `torchcompress/telemetry/names.py`")]
    section += "".join(line for line in text.splitlines() if "gptq_loss" in line)
    mentioned = set(re.findall(r"`(torchcompress\.[a-z0-9_.]+[a-z0-9_])`", section))
    known = _known()
    # attributes with a dynamic tail (torchcompress.quant + .bits, ...) count by their prefix
    unknown = sorted(m for m in mentioned if m not in known and not any(m.startswith(k + ".") for k in known))
    assert len(mentioned) > 15 and unknown == []
    assert N.GPTQ_LOSS == "torchcompress.error.gptq_loss" and N.GPTQ_LOSS in mentioned


def test_durations_are_seconds():
    for metric in (N.M_DURATION, N.M_STAGE_DURATION, N.M_INFER):
        assert metric[1] == "s", metric
    text = (ROOT / "README.md").read_text()
    assert "`torchcompress.inference.duration` (s histogram)" in text
