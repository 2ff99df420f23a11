"""Module selection by type, exact name, name suffix and ``re:`` regex (full match)."""

from __future__ import annotations

import pytest
import torch.nn as nn

from torchcompress.errors import ConfigError
from torchcompress.targets import select_modules, set_submodule


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.xfc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)
        self.conv = nn.Conv1d(1, 1, 1)


def names(model, targets=(nn.Linear,), ignore=()):
    return [n for n, _ in select_modules(model, targets, ignore)]


ALL_LINEARS = [f"layers.{i}.{n}" for i in range(2) for n in ("fc", "fc2", "xfc")] + ["head"]


def test_type_target_in_module_order():
    assert names(Net()) == ALL_LINEARS
    assert names(Net(), [nn.LayerNorm]) == ["layers.0.norm", "layers.1.norm"]
    assert names(Net(), [nn.LayerNorm, nn.Conv1d]) == ["layers.0.norm", "layers.1.norm", "conv"]


def test_type_target_matches_subclasses():
    class MyLinear(nn.Linear):
        pass

    m = nn.Sequential(MyLinear(2, 2), nn.Linear(2, 2))
    assert names(m) == ["0", "1"]


def test_root_module_never_selected():
    lin = nn.Linear(3, 3)
    assert names(lin) == []
    assert names(lin, ["re:.*"]) == []


def test_exact_and_suffix_names():
    net = Net()
    assert names(net, ["layers.1.fc"]) == ["layers.1.fc"]
    # suffix after a dot: "fc" matches both blocks' fc, not fc2 nor xfc
    assert names(net, ["fc"]) == ["layers.0.fc", "layers.1.fc"]
    assert names(net, ["1.fc2"]) == ["layers.1.fc2"]
    assert names(net, ["c"]) == []  # no partial-word matches
    assert names(net, ["ayers.0.fc"]) == []
    assert names(net, ["head"]) == ["head"]
    # a name selects that module only, not its children
    assert names(net, ["layers.0"]) == ["layers.0"]


def test_regex_is_a_full_match():
    net = Net()
    assert names(net, ["re:fc"]) == []  # fullmatch, not search
    assert names(net, ["re:.*fc"]) == ["layers.0.fc", "layers.0.xfc", "layers.1.fc", "layers.1.xfc"]
    assert names(net, [r"re:layers\.\d\.fc2?"]) == ["layers.0.fc", "layers.0.fc2", "layers.1.fc", "layers.1.fc2"]
    assert names(net, [r"re:layers\.1\..*"]) == ["layers.1.fc", "layers.1.fc2", "layers.1.xfc", "layers.1.norm"]


def test_ignore_wins_over_targets():
    net = Net()
    assert names(net, ignore=["head"]) == ALL_LINEARS[:-1]
    assert names(net, ignore=["fc", "xfc"]) == ["layers.0.fc2", "layers.1.fc2", "head"]
    assert names(net, ignore=[r"re:layers\.0\..*"]) == [n for n in ALL_LINEARS if not n.startswith("layers.0.")]
    assert names(net, ignore=[nn.Linear]) == []
    assert names(net, ["fc"], ignore=["layers.0.fc"]) == ["layers.1.fc"]


def test_mixed_type_and_name_targets():
    net = Net()
    assert names(net, [nn.LayerNorm, "head"]) == ["layers.0.norm", "layers.1.norm", "head"]


@pytest.mark.parametrize("bad", ["", 3, None, "re:(", "re:[a-"])
@pytest.mark.parametrize("where", ["targets", "ignore"])
def test_bad_patterns_raise_config_error(bad, where):
    kw = {"targets": [nn.Linear], "ignore": []}
    kw[where] = [bad]
    with pytest.raises(ConfigError) as ei:
        list(select_modules(Net(), **kw))
    assert ei.value.field == where


def test_set_submodule_nested_top_level_and_indexed():
    net = Net()
    new = nn.Identity()
    set_submodule(net, "layers.1.fc", new)
    assert net.layers[1].fc is new
    set_submodule(net, "head", new)
    assert net.head is new
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    set_submodule(seq, "0", new)
    assert seq[0] is new
    with pytest.raises(AttributeError):
        set_submodule(net, "nope.fc", new)
