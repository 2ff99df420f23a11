"""Crash safety: kill -9 at random points while writing, a full disk, and --resume after a kill.

The kill tests fork a child that rewrites the same output in a loop (version A, B, A, ...) and
SIGKILL it at a random moment, many times. After every kill the target must hold a complete A, a
complete B, or nothing (directories are swapped with two renames), never a torn mix; and at least
one kill must have landed mid-write (a temp file/directory left behind), or the test proved nothing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import torchcompress as tc
from torchcompress.errors import WriteError
from torchcompress.formats.checkpoint import MANIFEST_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.filterwarnings("ignore")


def canonical(path) -> tuple:
    """A safetensors file as (header dict, data bytes): its JSON header's key order is not stable
    between writes (a hash map in the Rust writer), the tensors and their layout are."""
    import json

    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _model(seed: int):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256))
    tc.quantize_(m, tc.QuantScheme(bits=4, group_size=64), targets=["0", "2"])  # "4" stays float (1 MiB)
    return m.eval()


def _skeleton():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256))


def kill_at_random(writers, verify, leftovers, *, trials: int, max_delay: float, seed: int = 0):
    """Fork a child running writers[0], writers[1], writers[0], ... forever; SIGKILL it after a random
    delay; ``verify()`` -> outcome name (raises on a torn output). Returns the outcomes."""
    rng = random.Random(seed)
    outcomes, mid_write = [], 0
    for _ in range(trials):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no pytest, no cleanup handlers; write until killed
            try:
                os.close(r)
                os.write(w, b"1")
                i = 0
                while True:
                    writers[i % 2]()
                    i += 1
            finally:
                os._exit(1)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.append(verify())
        left = leftovers()
        mid_write += bool(left)
        for p in left:  # what a killed writer leaves is hidden temp files/directories; remove for the next trial
            import shutil

            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    assert mid_write > 0, f"no kill landed mid-write in {trials} trials: {outcomes}"
    return outcomes


def test_kill_during_save_compressed(tmp_path):
    torch.set_num_threads(1)
    a, b = _model(1), _model(2)
    out = tmp_path / "out"
    tc.save_compressed(a, tmp_path / "A")
    tc.save_compressed(b, tmp_path / "B")
    versions = {name: canonical(tmp_path / name / WEIGHTS_NAME) for name in "AB"}
    tc.save_compressed(a, out)  # the user's previous output

    def verify():
        if not out.exists():
            return "nothing"
        assert (out / WEIGHTS_NAME).is_file() and (out / MANIFEST_NAME).is_file(), sorted(os.listdir(out))
        data = canonical(out / WEIGHTS_NAME)
        name = next((n for n, v in versions.items() if v == data), None)
        assert name is not None, "torn model.safetensors"
        tc.load_compressed(out, _skeleton())  # and it loads
        return name

    def leftovers():
        return [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    outcomes = kill_at_random([lambda: tc.save_compressed(a, out), lambda: tc.save_compressed(b, out)],
                              verify, leftovers, trials=12, max_delay=0.25)
    assert set(outcomes) <= {"A", "B", "nothing"}
    assert "B" in outcomes  # some kills came after a complete swap


def test_kill_during_gguf_write(tmp_path):
    from torchcompress.formats.gguf_file import KV, TensorPlan, VType, write_gguf
    from torchcompress.primitives.gguf_common import GGMLType

    torch.set_num_threads(1)
    plans = [TensorPlan(f"t{i}", (256, 1024), GGMLType.F32) for i in range(8)]  # 8 MiB
    blobs = {v: torch.full((256 * 1024 * 4,), v, dtype=torch.uint8) for v in (1, 2)}
    target = tmp_path / "m.gguf"

    def write(v):
        write_gguf(target, [KV("general.name", VType.STRING, f"v{v}")], plans, lambda t: blobs[v])

    write(1)
    ref = {}
    for v in (1, 2):
        write(v)
        ref[v] = target.read_bytes()
    write(1)

    def verify():
        if not target.exists():
            return "nothing"
        data = target.read_bytes()
        name = next((v for v, d in ref.items() if d == data), None)
        assert name is not None, f"torn .gguf ({len(data)} bytes)"
        return name

    def leftovers():
        return [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf.")]

    outcomes = kill_at_random([lambda: write(1), lambda: write(2)], verify, leftovers, trials=12, max_delay=0.25)
    assert "nothing" not in outcomes  # a file is replaced by one rename: never absent once written
    assert 2 in outcomes


# --------------------------------------------------------------------------------------------- disk full


class _FileSizeLimit:
    """RLIMIT_FSIZE for this process (SIGXFSZ ignored): every write past ``limit`` bytes fails with
    EFBIG, in Python and in native writers alike, as on a full disk."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        import resource

        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

    def __exit__(self, *exc):
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.old_sig)


def test_disk_full_during_save_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    tc.save_compressed(_model(1), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}  # the very same files: nothing rewrote them
    with _FileSizeLimit(200_000), pytest.raises(WriteError, match="too large|No space"):
        tc.save_compressed(_model(2), out)  # model.safetensors is ~1.4 MB
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temp directory is gone


def test_disk_full_during_gguf_write_keeps_old_file(tmp_path):
    from torchcompress.formats.gguf_file import KV, TensorPlan, VType, write_gguf
    from torchcompress.primitives.gguf_common import GGMLType

    target = tmp_path / "m.gguf"
    plans = [TensorPlan("t", (256, 1024), GGMLType.F32)]
    write_gguf(target, [KV("general.name", VType.STRING, "old")], plans, lambda t: torch.zeros(t.nbytes, dtype=torch.uint8))
    old = target.read_bytes()
    with _FileSizeLimit(100_000), pytest.raises(WriteError):
        write_gguf(target, [KV("general.name", VType.STRING, "new")], plans,
                   lambda t: torch.ones(t.nbytes, dtype=torch.uint8))
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.parametrize("where", ["fsync", "rename"])
def test_enospc_at_commit_keeps_old_output(tmp_path, monkeypatch, where):
    """ENOSPC from fsync (delayed allocation reports it there) or the final rename: typed, old output intact."""
    import errno

    out = tmp_path / "out"
    tc.save_compressed(_model(1), out)
    before = (out / WEIGHTS_NAME).read_bytes()

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, enospc)
    with pytest.raises(WriteError, match="No space left"):
        tc.save_compressed(_model(2), out)
    monkeypatch.undo()
    assert (out / WEIGHTS_NAME).read_bytes() == before


@pytest.mark.slow
def test_cli_disk_full_is_exit_2_one_line(tiny_model_dir, tmp_path):
    """Through the real CLI in a child process limited to 50 kB files: exit 2, one line, old output kept."""
    out = tmp_path / "out"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY)); "
            "from torchcompress.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["compress", "--model", str(tiny_model_dir), "--recipe", "w8-rtn", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCHCOMPRESS_KERNEL="reference")
    from torchcompress.cli import main

    assert main(args) == 0
    before = (out / WEIGHTS_NAME).read_bytes()
    args[4] = "w4-rtn"
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert p.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert (out / WEIGHTS_NAME).read_bytes() == before


# --------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_cli_gptq_killed_then_resumed_is_bit_identical(tmp_path):
    """`compress` with a GPTQ recipe, SIGKILLed after its first finished decoder block, then rerun with
    --resume: continues from OUT.partial and writes the same bytes as an uninterrupted run."""
    import json

    from transformers import LlamaForCausalLM

    from tests.tiny import TINY_TEXT, make_tokenizer, tiny_config

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    tok = make_tokenizer()
    LlamaForCausalLM(tiny_config(vocab_size=len(tok), num_hidden_layers=8, hidden_size=256,
                                 intermediate_size=512)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text(TINY_TEXT * 4)
    common = ["--model", str(model_dir), "--recipe", "w4-gptq-g128", "--calib", str(text), "--calib-samples", "8",
              "--seq-len", "64", "--stream", "on"]
    # the uninterrupted run in a fresh process like the killed and resumed ones below: same kernels and
    # thread count (an earlier test may have changed this process's), since the quantized blocks'
    # forwards feed the next block's Hessian and matmuls round differently across those
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCHCOMPRESS_KERNEL="reference")
    r = subprocess.run([sys.executable, "-m", "torchcompress", "compress", *common, "--out", str(tmp_path / "ref")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    reference = canonical(tmp_path / "ref" / WEIGHTS_NAME)

    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "torchcompress", "compress", *common, "--out", str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = None
    deadline = time.time() + 300
    while child.poll() is None and time.time() < deadline:
        found = list((tmp_path / "out.partial").glob("state.json"))  # the block pipeline's resume state
        if found:
            try:
                state = json.loads(found[0].read_text())
            except (OSError, ValueError):
                state = None
            if state and state["done_blocks"] >= 1:
                child.send_signal(signal.SIGKILL)
                break
        time.sleep(0.002)
    child.wait()
    assert state and 1 <= state["done_blocks"] < 8, (state, child.stderr.read().decode()[-2000:])
    assert not out.exists()  # killed before the save: no output, not a partial one
    p = subprocess.run([sys.executable, "-m", "torchcompress", "compress", *common, "--out", str(out), "--resume"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert canonical(out / WEIGHTS_NAME) == reference  # same tensors, bit for bit
    assert not (tmp_path / "out.partial").exists()  # state removed once the output is complete
