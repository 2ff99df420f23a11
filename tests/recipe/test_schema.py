import pytest
import torch.nn as nn

from torchcompress.config import Granularity, RTNConfig
from torchcompress.errors import InputError, RecipeError
from torchcompress.recipe.schema import bundled_recipes, load_recipe, parse_recipe

GOOD = """\
name: mixed
description: attention at 8 bits, MLP at 4
stages:
  - kind: rtn
    name: attn
    scheme: {bits: 8, granularity: channel}
    targets: ["re:.*self_attn\\\\..*"]
  - kind: rtn
    name: mlp
    scheme:
      bits: 4
      group_size: 64
      symmetric: false
    targets: [Linear]
    ignore: [lm_head, "re:.*\\\\.0\\\\..*"]
"""


def test_bundled_recipes_parse():
    assert {"w4-rtn", "w8-rtn"} <= set(bundled_recipes())
    for name in bundled_recipes():
        r = load_recipe(name)
        assert r.stages and r.name == name


def test_good_recipe_builds_typed_configs():
    r = parse_recipe(GOOD, "mixed.yaml")
    assert [s.name for s in r.stages] == ["attn", "mlp"]
    a, m = r.stages
    assert isinstance(a.config, RTNConfig) and a.config.scheme.bits == 8
    assert a.config.scheme.granularity is Granularity.CHANNEL
    assert a.targets == ("re:.*self_attn\\..*",) and a.ignore is None
    assert m.config.scheme.group_size == 64 and m.config.scheme.symmetric is False
    assert m.targets == (nn.Linear,) and m.ignore == ("lm_head", "re:.*\\.0\\..*")


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("stages:\n  - kind: rtn\n    scheme: {bits: 9}\n", 3, "bits: must be between 2 and 8"),
        ("stages:\n  - kind: rtn\n    scheme: {bits: 0}\n", 3, "bits"),
        ("stages:\n  - kind: rtn\n    scheme: {group_size: -4}\n", 3, "group_size"),
        ("stages:\n  - kind: rtn\n    scheme: {group_size: 0}\n", 3, "group_size"),
        ("stages:\n  - kind: rtn\n    scheme: {bits: true}\n", 3, "bits"),
        ("stages:\n  - kind: rtn\n    scheme: {granularity: row}\n", 3, "granularity"),
        ("stages:\n  - kind: rtn\n\n    bitz: 4\n", 4, "unknown key 'bitz'"),
        ("stages:\n  - kind: rtn\n    scheme:\n      bits: 4\n      grup: 3\n", 5, "unknown key 'grup'"),
        ("name: x\nextra: 1\nstages:\n  - kind: rtn\n", 2, "unknown key 'extra'"),
        ("stages:\n  - kind: gptqq\n", 2, "not a stage kind"),
        ("stages:\n  - name: a\n", 2, "not a stage kind"),
        ("stages: []\n", 1, "non-empty list"),
        ("name: x\n", 1, "non-empty list"),
        ("stages:\n  - kind: rtn\n    name: a\n  - kind: rtn\n    name: a\n", 1, "duplicate stage name"),
        ("stages:\n  - kind: rtn\n    kind: rtn\n", 3, "duplicate key"),
        ("stages:\n  - kind: rtn\n    targets: [1, 2]\n", 3, "targets"),
        ("stages: [\n", 2, "malformed YAML"),
        ("- just\n- a list\n", 1, "top level"),
        ("stages:\n  - !!python/object/apply:os.system ['echo pwned']\n", 2, "malformed YAML"),
    ],
)
def test_bad_recipes_name_the_line(text, line, fragment):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "bad.yaml")
    assert e.value.line == line, str(e.value)
    assert fragment in str(e.value)
    assert str(e.value).startswith(f"bad.yaml:{line}:")


def test_empty_recipe():
    with pytest.raises(RecipeError, match="empty recipe"):
        parse_recipe("", "empty.yaml")


def test_unknown_recipe_name_lists_bundled():
    with pytest.raises(InputError, match="w4-rtn"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("payload", [
    "stages: !!python/object/apply:os.system ['true']\n",
    "stages:\n  - kind: !!python/name:os.system\n",
    "stages:\n  - !!set {a, b}\n",
])
def test_python_tags_are_refused_not_executed(payload):
    with pytest.raises(RecipeError, match="malformed YAML|not allowed"):
        parse_recipe(payload, "evil.yaml")


def test_example_recipes_in_repo_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "recipes"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        assert load_recipe(f).stages
