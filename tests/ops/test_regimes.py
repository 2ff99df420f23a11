"""The W4A16 dispatcher: regime by batch from a per-device crossover table, defaults, overrides."""

from __future__ import annotations

import pytest

from torchcompress.errors import ConfigError
from torchcompress.ops.regimes import (DEFAULT_CROSSOVERS, ENV_VAR, Crossovers, Regime, choose_regime, crossovers_for,
                                       parse_crossovers)

TABLE = {"NVIDIA H100 80GB HBM3": Crossovers(gemv_max_m=8, dot_max_m=128),
         "Some GPU": Crossovers(gemv_max_m=16, dot_max_m=64)}
BATCHES = (1, 8, 16, 64, 128, 2048)


def test_choice_at_each_batch_from_the_table():
    h100 = crossovers_for("NVIDIA H100 80GB HBM3", TABLE, env={})
    assert [choose_regime(m, h100).value for m in BATCHES] == ["gemv", "gemv", "dot", "dot", "dot", "dequant"]
    other = crossovers_for("Some GPU", TABLE, env={})
    assert [choose_regime(m, other).value for m in BATCHES] == ["gemv", "gemv", "gemv", "dot", "dequant", "dequant"]
    # no tl.dot regime at all: gemv up to 8, then dequant
    assert [choose_regime(m, Crossovers(8, 8)) for m in (8, 9)] == [Regime.GEMV, Regime.DEQUANT]


def test_unknown_device_and_cpu_get_the_defaults():
    assert crossovers_for("NVIDIA A100-SXM4-80GB", TABLE, env={}) is DEFAULT_CROSSOVERS
    assert crossovers_for(None, TABLE, env={}) is DEFAULT_CROSSOVERS
    assert (DEFAULT_CROSSOVERS.gemv_max_m, DEFAULT_CROSSOVERS.dot_max_m) == (8, 128)


def test_env_override_beats_the_table(monkeypatch):
    assert crossovers_for("Some GPU", TABLE, env={ENV_VAR: "gemv=4,dot=32"}) == Crossovers(4, 32)
    assert crossovers_for("Some GPU", TABLE, env={ENV_VAR: "dot=300"}) == Crossovers(8, 300)  # gemv: the default
    monkeypatch.setenv(ENV_VAR, "gemv=2")
    assert crossovers_for("Some GPU", TABLE) == Crossovers(2, 128)  # read from os.environ on each call


@pytest.mark.parametrize("bad", ["gemv8", "gemm=4", "gemv=-1", "dot=x", "gemv=64,dot=16"])
def test_bad_override_is_a_config_error(bad):
    parse_crossovers.cache_clear()
    with pytest.raises(ConfigError):
        parse_crossovers(bad)


def test_crossovers_validate():
    with pytest.raises(ConfigError, match="dot_max_m"):
        Crossovers(gemv_max_m=16, dot_max_m=8)
    with pytest.raises(ConfigError, match="gemv_max_m"):
        Crossovers(gemv_max_m=True)
    assert Crossovers(1, 2).as_dict() == {"gemv_max_m": 1, "dot_max_m": 2}


def test_import_does_not_load_triton():
    import subprocess
    import sys

    code = "import sys, torchcompress.ops.regimes\nprint('triton' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_regime_for_a_non_cuda_device_uses_the_defaults(monkeypatch):
    import torch

    from torchcompress.ops.regimes import regime_for

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert [regime_for(m, torch.device("cpu")).value for m in BATCHES] == \
        ["gemv", "gemv", "dot", "dot", "dot", "dequant"]
    monkeypatch.setenv(ENV_VAR, "gemv=1,dot=16")
    assert [regime_for(m, torch.device("cpu")).value for m in BATCHES] == \
        ["gemv", "dot", "dot", "dequant", "dequant", "dequant"]
