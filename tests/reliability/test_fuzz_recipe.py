"""Fuzz the recipe parser (recipe/schema.py over recipe/yaml_lines.py): only RecipeError/InputError
escapes, nothing hangs, YAML alias bombs stay linear, and no YAML tag ever constructs an object."""

from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability._fuzz import fuzz, json_values, no_hang
from torchcompress.recipe.registry import STAGE_KINDS
from torchcompress.errors import InputError, RecipeError
from torchcompress.recipe.schema import BUNDLED_DIR, parse_recipe

BUNDLED = {p.stem: p.read_text() for p in sorted(BUNDLED_DIR.glob("*.yaml"))}


def parse_or_typed_error(text: str):
    with no_hang(10):
        try:
            return parse_recipe(text, "fuzz.yaml")
        except InputError as e:
            assert "fuzz.yaml" in str(e) or not isinstance(e, RecipeError), e
            return None


@fuzz(150)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_fuzz_any_text(text):
    parse_or_typed_error(text)


_YAML_BITS = ["\n", " ", "  ", "\t", ":", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!int ", "!!float ", "!!binary ",
              "!!python/object/apply:os.system ['touch x']", "!!set ", "? ", "|", ">", "'", '"', "#", "---", "...",
              "%YAML 1.1", "<<: ", "~", "null", ".nan", ".inf", "-1", "0x10", "1e400", "9" * 30, "\x00", "\ufeff"]


@fuzz(200)
@given(data=st.data())
def test_fuzz_mutated_bundled_recipes(data):
    """Bundled recipes with YAML syntax spliced in, lines dropped or duplicated."""
    lines = BUNDLED[data.draw(st.sampled_from(sorted(BUNDLED)), label="recipe")].splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["insert", "drop", "dup", "replace"]))
        i = data.draw(st.integers(0, len(lines) - 1))
        if op == "insert":
            line = lines[i]
            j = data.draw(st.integers(0, len(line)))
            lines[i] = line[:j] + data.draw(st.sampled_from(_YAML_BITS) | st.text(max_size=5)) + line[j:]
        elif op == "drop" and len(lines) > 1:
            lines.pop(i)
        elif op == "dup":
            lines.insert(i, lines[i])
        else:
            lines[i] = data.draw(st.text(max_size=30)) + "\n"
    parse_or_typed_error("".join(lines))


@st.composite
def recipe_documents(draw):
    """Structurally plausible recipes: real stage kinds, real and made-up keys, any values."""
    stages = []
    for i in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(sorted(STAGE_KINDS)) | json_values())
        stage = {"kind": kind}
        for key in draw(st.lists(st.sampled_from(["name", "targets", "ignore", "scheme", "bits", "group_size", "damp",
                                                  "block_size", "qtype", "sparsity", "rank", "temperature", "extra"]),
                                 max_size=4)):
            if key == "scheme":
                stage[key] = draw(st.dictionaries(
                    st.sampled_from(["bits", "granularity", "group_size", "symmetric", "scale_dtype", "nope"]),
                    json_values(), max_size=4))
            else:
                stage[key] = draw(json_values())
        stages.append(stage)
    doc = {"stages": stages}
    if draw(st.booleans()):
        doc["name"] = draw(json_values())
    return doc


@fuzz(60)
@given(doc=recipe_documents())
def test_fuzz_structured_documents(doc):
    r = parse_or_typed_error(yaml.safe_dump(doc, allow_unicode=True))
    if r is not None:  # a recipe that parses is made of typed, validated configs
        assert r.stages and all(type(s.config) is STAGE_KINDS[s.kind] for s in r.stages)


def test_alias_bomb_is_linear():
    """'billion laughs': 9 levels of 9 aliases is 387M nodes if expanded; converted once each it is not."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        levels.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    text = "stages:\n  - kind: rtn\n    ignore: {" + ", ".join(levels) + "}\n"
    t0 = time.perf_counter()
    with no_hang(10), pytest.raises(RecipeError):
        parse_recipe(text, "bomb.yaml")
    assert time.perf_counter() - t0 < 5  # a generous bound on a linear-time parse of 10 lines


def test_recursive_alias_is_an_error():
    with pytest.raises(RecipeError, match="recursive alias"):
        parse_recipe("stages: &s\n  - kind: rtn\n    ignore: *s\n", "loop.yaml")


def test_deep_nesting_is_an_error():
    with no_hang(10), pytest.raises(RecipeError, match="nested too deeply|malformed"):
        parse_recipe("stages: " + "[" * 20000 + "]" * 20000, "deep.yaml")


@pytest.mark.parametrize("text", ["stages:\n  - kind: rtn\n    scheme: {bits: !!int abc}\n",
                                  "stages:\n  - kind: rtn\n    scheme: {bits: !!float x}\n",
                                  "stages:\n  - kind: rtn\n    scheme: {scale_dtype: [float16]}\n",
                                  "stages:\n  - kind: rtn\n    scheme: {bits: !!timestamp 2020-99-99}\n"])
def test_bad_scalars_name_the_line(text):
    with pytest.raises(RecipeError) as ei:
        parse_recipe(text, "s.yaml")
    assert "s.yaml:3" in str(ei.value)


def test_python_tags_never_construct(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for tag in ["!!python/object/apply:os.system ['touch pwned']", "!!python/name:os.system",
                "!!python/object/new:subprocess.Popen [['touch', 'pwned']]"]:
        for text in (f"stages: {tag}\n", f"stages:\n  - kind: rtn\n    name: {tag}\n", f"name: {tag}\nstages: []\n"):
            with pytest.raises(RecipeError):
                parse_recipe(text, "tag.yaml")
    assert not (tmp_path / "pwned").exists()
