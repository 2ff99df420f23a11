"""The bad-input table: every CLI flag and every recipe config field, a bad value, and the promise
(shared/docs/CLI.md): exit status 2 and one line on stderr naming the flag / field / file:line.

New flags and config fields get a row each (one line). Config fields are also covered generically:
every field of every stage kind in ``STAGE_KINDS`` is given a value of the wrong type, so a new
config is checked the moment it is registered.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from torchcompress.cli import main
from torchcompress.recipe.registry import STAGE_KINDS

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def ctx(tiny_model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # nothing can be created below a regular file, even by root
    text = tmp_path / "text.txt"
    from tests.tiny import TINY_TEXT

    text.write_text(TINY_TEXT)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages: [\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 64)
    bad_run = tmp_path / "bad-run"
    bad_run.mkdir()
    (bad_run / "run.json").write_text("{ not json")
    return {"bad_run": str(bad_run), "model": str(tiny_model_dir), "tmp": str(tmp_path), "blocker": str(blocker), "text": str(text),
            "bad_yaml": str(bad_yaml), "binary": str(binary)}


def run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.err


def assert_bad_input(rc, err, fragment):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error:"), err
    assert fragment in lines[-1], (fragment, lines[-1])
    assert len([ln for ln in lines if ln.startswith("error")]) == 1


C = "compress --model {model} --recipe w8-rtn --out {tmp}/o"
G = "compress --model {model} --recipe w4-gptq-g128 --out {tmp}/o --calib {text} --calib-samples 2 --seq-len 16"
E = "eval --model {model} --text {text} --seq-len 16 --windows 2"
X = "export --model {model} --format gguf --qtype Q8_0 --out {tmp}/m.gguf"

# (command line, fragment the one error line must contain); one row per bad value
CLI_ROWS = [
    # global
    ("", "required"),
    ("frobnicate", "invalid choice"),
    (C + " --no-such-flag", "--no-such-flag"),
    # compress
    ("compress --recipe w8-rtn --out {tmp}/o", "--model"),
    ("compress --model {model} --out {tmp}/o", "--recipe"),
    ("compress --model {model} --recipe w8-rtn", "--out"),
    ("compress --model {tmp}/missing --recipe w8-rtn --out {tmp}/o", "missing"),
    ("compress --model {text} --recipe w8-rtn --out {tmp}/o", ".gguf"),
    ("compress --model {tmp} --recipe w8-rtn --out {tmp}/o", "config.json"),
    ("compress --model {model} --recipe no-such-recipe --out {tmp}/o", "no-such-recipe"),
    (C + " --device tpu", "--device tpu"),
    (C + " --dtype int8", "--dtype"),
    (C + " --stream maybe", "--stream"),
    (E + " --device gpu:0", "--device gpu:0"),
    ("compress --model {model} --recipe {bad_yaml} --out {tmp}/o", "bad.yaml:"),
    ("compress --model {model} --recipe {binary} --out {tmp}/o", "binary.txt"),
    ("compress --model {model} --recipe w8-rtn --out {blocker}/sub/o", "a-file"),
    ("compress --model {model} --recipe w8-rtn --out {blocker}", "a-file"),
    (C + " --calib {tmp}/nocalib.txt", "nocalib.txt"),
    (C + " --calib hf:", "hf:"),
    (C + " --calib {text}@-1", "-1"),
    (C + " --calib-samples 0", "--calib-samples"),
    (C + " --calib-samples -5", "--calib-samples"),
    (C + " --calib-samples many", "--calib-samples"),
    (C + " --seq-len 0", "--seq-len"),
    (C + " --seq-len 1.5", "--seq-len"),
    (C + " --eval {tmp}/missing.txt", "missing.txt"),
    (C + " --eval {binary}", "binary.txt"),
    (C + " --eval-windows 0", "--eval-windows"),
    (C + " --target-bpw many", "--target-bpw"),
    (C + " --target-bpw 0.5", "0.5"),  # below what 2-bit everything gives: the feasible range is named
    (C + " --target-size lots", "--target-size"),
    (C + " --json {blocker}/sub/r.json", "a-file"),
    (C + " --report {blocker}/sub/report", "a-file"),
    (C + " --offload-dir {blocker}/sub/off", "a-file"),
    ("compress --model {model} --recipe w8-rtn --out {bad_run} --resume", "run record"),
    (G.replace("--calib-samples 2", "--calib-samples 0"), "--calib-samples"),
    (G.replace("{text}", "{binary}"), "binary.txt"),
    # eval
    ("eval --text {text}", "--model"),
    ("eval --model {model}", "--text"),
    ("eval --model {tmp}/missing --text {text}", "missing"),
    ("eval --model {model} --text {tmp}/missing.txt", "missing.txt"),
    (E + " --seq-len 0", "--seq-len"),
    (E + " --windows 0", "--windows"),
    (E + " --windows x", "--windows"),
    (E + " --json {blocker}/sub/e.json", "a-file"),
    # info
    ("info {tmp}/nothing", "nothing"),
    ("info {text}", "text.txt"),
    ("info {binary}", "binary.txt"),
    # export
    ("export --model {model} --qtype Q8_0 --out {tmp}/m.gguf", "--format"),
    ("export --model {model} --format onnx --out {tmp}/m.gguf", "--format"),
    (X.replace("Q8_0", "Q9_K"), "Q9_K"),
    (X.replace("m.gguf", "m.bin"), "--out"),
    (X.replace("{tmp}/m.gguf", "{blocker}/sub/m.gguf"), "a-file"),
    ("export --model {tmp}/missing --format gguf --out {tmp}/m.gguf", "missing"),
    (X + " --imatrix {tmp}/missing.safetensors", "missing.safetensors"),
    (X + " --imatrix-samples 0", "--imatrix-samples"),
    (X + " --tokenizer-pre bad/name", "--tokenizer-pre"),
    (X + " --stream maybe", "--stream"),
    ("export --model {model} --format gptq --out {tmp}/g", "quantized"),
    ("export --model {model} --format compressed-tensors --out {tmp}/g.gguf", "--out"),
    # recipe check
    ("recipe check {tmp}/missing.yaml", "missing.yaml"),
    ("recipe check {bad_yaml}", "bad.yaml:"),
    ("recipe", "required"),
]


@pytest.mark.parametrize("line, fragment", CLI_ROWS, ids=[r[0] or "<empty>" for r in CLI_ROWS])
def test_cli_bad_value(ctx, capsys, line, fragment):
    argv = [a.format(**ctx) for a in line.split()]
    rc, err = run_cli(argv, capsys)
    assert_bad_input(rc, err, fragment.format(**ctx))


VALUELESS = {"-h", "--help", "-v", "--verbose", "--pure", "--leave-output"}  # switches: nothing to get wrong


def test_every_flag_has_a_row():
    """A new flag without a row in CLI_ROWS fails here: add one line above."""
    import argparse

    from torchcompress.cli import build_parser

    flags = set()

    def walk(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    walk(sub)
            else:
                flags.update(o for o in a.option_strings)

    walk(build_parser())
    # a row is about a flag when the flag is in its own part of the line (beyond the shared prefixes
    # C, G, E, X) or in its expected fragment (rows that leave a required flag out)
    about = set()
    for line, fragment in CLI_ROWS:
        own = line.replace(C, "").replace(G, "").replace(E, "").replace(X, "")
        about |= {t for t in own.split() + fragment.split() if t.startswith("-")}
    missing = sorted(flags - VALUELESS - about)
    assert not missing, f"flags without a bad-value row: {missing}"


def test_unwritable_outputs_fail_before_any_work(ctx, capsys):
    """--json/--report/--out that cannot be written are refused before the model loads."""
    for flag in ("--json", "--report", "--offload-dir"):
        rc, err = run_cli(C.format(**ctx).split() + [flag, f"{ctx['blocker']}/sub/x"], capsys)
        assert rc == 2 and "loaded" not in err, (flag, err)


# --------------------------------------------------------------------------------------------- config fields

# (stage kind, field path, bad value as YAML, fragment); one row per bad value. Kinds that are not
# registered (yet) are skipped, so rows can be added before their feature lands.
FIELD_ROWS = [
    ("rtn", "scheme.bits", "1", "between 2 and 8"),
    ("rtn", "scheme.bits", "9", "between 2 and 8"),
    ("rtn", "scheme.bits", "4.5", "integer"),
    ("rtn", "scheme.bits", "true", "integer"),
    ("rtn", "scheme.group_size", "0", "positive"),
    ("rtn", "scheme.group_size", "-128", "positive"),
    ("rtn", "scheme.granularity", "row", "one of"),
    ("rtn", "scheme.symmetric", "maybe", "true or false"),
    ("rtn", "scheme.scale_dtype", "float64", "one of"),
    ("rtn", "scheme.nope", "1", "unknown key"),
    ("qat_prepare", "scheme.bits", "12", "between 2 and 8"),
    ("gptq", "damp", "-0.1", "damp"),
    ("gptq", "damp", ".nan", "damp"),
    ("gptq", "damp", ".inf", "damp"),
    ("gptq", "block_size", "0", "positive"),
    ("gptq", "act_order", "yes please", "true or false"),
    ("gguf", "qtype", "Q9_K", "one of"),
    ("gguf", "pure", "3", "true or false"),
    ("prune_magnitude", "sparsity", "1.5", "sparsity"),
    ("prune_magnitude", "sparsity", "-0.1", "sparsity"),
    ("prune_magnitude", "sparsity", ".nan", "sparsity"),
    ("prune_magnitude", "scope", "galaxy", "scope"),
    ("prune_magnitude", "n", "-1", "n"),
    ("wanda", "sparsity", "2", "sparsity"),
    ("sparsegpt", "damp", "-1", "damp"),
    ("sparsegpt", "block_size", "0", "block_size"),
    ("prune_structured", "mlp_ratio", "1.5", "mlp_ratio"),
    ("prune_structured", "importance", "vibes", "importance"),
    ("lora", "r", "0", "r"),
    ("lora", "r", "-4", "r"),
    ("lora", "dropout", "1.5", "dropout"),
    ("lora", "init", "random-ish", "init"),
    ("svd", "rank", "0", "rank"),
    ("svd", "energy", "1.5", "energy"),
    ("svd", "param_ratio", "0", "param_ratio"),
    ("distill", "temperature", "0", "temperature"),
    ("distill", "temperature", "-1", "temperature"),
]


def _stage_yaml(kind: str, path: str, value: str) -> tuple[str, int]:
    """A one-stage recipe setting ``path`` (``field`` or ``scheme.field``) to ``value``; its line."""
    head = "name: bad\nstages:\n  - kind: {kind}\n".format(kind=kind)
    if "." in path:
        outer, inner = path.split(".", 1)
        return head + f"    {outer}:\n      {inner}: {value}\n", 5
    return head + f"    {path}: {value}\n", 4


# fields a stage kind needs to be valid at all (so that a bad value is the only thing wrong), and the
# fields that take their place (one of an exclusive group); one line per kind
BASE = {"svd": ({"rank": "4"}, {"rank", "energy", "param_ratio"}),
        "budget": ({"target_bpw": "4.5"}, {"target_bpw", "target_size"})}


def _check_field(tmp_path, capsys, kind, path, value, fragment):
    text, line = _stage_yaml(kind, path, value)
    base, replaced_by = BASE.get(kind, ({}, set()))
    if path.split(".")[0] not in replaced_by:
        text += "".join(f"    {k}: {v}\n" for k, v in base.items())
    f = tmp_path / "bad-field.yaml"
    f.write_text(text)
    rc, err = run_cli(["recipe", "check", str(f)], capsys)
    assert_bad_input(rc, err, fragment)
    last = err.strip().splitlines()[-1]
    assert f"{f}:{line}" in last, last  # the file and the line of the bad value
    assert f"stages[0].{path.split('.')[0]}" in last, last  # the field


@pytest.mark.parametrize("kind, path, value, fragment", FIELD_ROWS, ids=[f"{k}.{p}={v}" for k, p, v, _ in FIELD_ROWS])
def test_config_field_bad_value(tmp_path, capsys, kind, path, value, fragment):
    if kind not in STAGE_KINDS:
        pytest.skip(f"stage kind {kind!r} is not registered yet")
    _check_field(tmp_path, capsys, kind, path, value, fragment)


def _wrong_type(hint) -> str | None:
    """A YAML value of the wrong type for a field annotated ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return "just-a-string"
    if hint is bool:
        return "'true'"
    if hint in (int, float) or (origin in (typing.Union, getattr(__import__("types"), "UnionType", None))
                                and set(args) & {int, float}):
        return "[1, 2]"
    if hint is str:
        return "{a: 1}"
    if hint is tuple or origin is tuple:
        return "{a: 1}"
    return "{a: {b: [1, 2]}}"


def _all_fields():
    from torchcompress.recipe.schema import _STAGE_KEYS

    rows = []
    for kind, cls in sorted(STAGE_KINDS.items()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _STAGE_KEYS:
                continue  # `targets`/`ignore`/`name` are stage keys, checked below
            if dataclasses.is_dataclass(hints[f.name]):
                sub = typing.get_type_hints(hints[f.name])
                rows += [(kind, f"{f.name}.{g.name}", _wrong_type(sub[g.name])) for g in dataclasses.fields(hints[f.name])]
            rows.append((kind, f.name, _wrong_type(hints[f.name])))
    return rows


ALL_FIELDS = _all_fields()


@pytest.mark.parametrize("kind, path, value", ALL_FIELDS, ids=[f"{k}.{p}" for k, p, _ in ALL_FIELDS])
def test_every_config_field_rejects_a_wrong_type(tmp_path, capsys, kind, path, value):
    _check_field(tmp_path, capsys, kind, path, value, "")


@pytest.mark.parametrize("snippet, line, fragment", [
    ("  - kind: rtn\n    targets: 5\n", 4, "targets"),
    ("  - kind: rtn\n    ignore: [\"\"]\n", 4, "ignore"),
    ("  - kind: rtn\n    name: 7\n", 4, "name"),
    ("  - kind: nope\n", 3, "kind"),
    ("  - kind: rtn\n    name: a\n  - kind: rtn\n    name: a\n", 2, "duplicate stage name"),
])
def test_stage_keys(tmp_path, capsys, snippet, line, fragment):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\nstages:\n" + snippet)
    rc, err = run_cli(["recipe", "check", str(f)], capsys)
    assert_bad_input(rc, err, fragment)
    assert f"{f}:{line}" in err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------- composition

@pytest.mark.parametrize("first, second", [
    ("kind: rtn\n    scheme: {bits: 4, group_size: 32}", "kind: rtn\n    scheme: {bits: 8, granularity: channel}"),
    ("kind: qat_prepare\n    scheme: {bits: 4, group_size: 32}", "kind: rtn"),
])
def test_stages_that_cannot_compose(ctx, capsys, first, second):
    """A later stage that finds nothing to change because an earlier one replaced its targets: exit 2
    naming both stages, and no output written."""
    f = f"{ctx['tmp']}/compose.yaml"
    with open(f, "w") as fh:
        fh.write(f"name: compose\nstages:\n  - name: first\n    {first}\n  - name: second\n    {second}\n")
    assert run_cli(["recipe", "check", f], capsys)[0] == 0  # each stage is valid on its own
    rc, err = run_cli(["compress", "--model", ctx["model"], "--recipe", f, "--out", f"{ctx['tmp']}/o"], capsys)
    assert_bad_input(rc, err, "do not compose")
    assert "'second'" in err and "'first'" in err
    import os

    assert not os.path.exists(f"{ctx['tmp']}/o")
