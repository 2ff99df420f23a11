"""Running vLLM (CPU build, its own venv from scripts/vllm_venv.sh) on a checkpoint, from the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
DEFAULT_VENV = Path.home() / ".cache" / "torchcompress" / "vllm-venv"


def venv_dir() -> Path:
    """TORCHCOMPRESS_VLLM_VENV, else scripts/vllm_venv.sh's default."""
    return Path(os.environ.get("TORCHCOMPRESS_VLLM_VENV", DEFAULT_VENV))


def venv_python() -> Path | None:
    """The vLLM venv's python, or None when the venv is not built."""
    py = venv_dir() / "bin" / "python"
    return py if py.is_file() else None


@dataclass
class VllmRun:
    ok: bool
    tokens: list | None = None
    logprobs: list | None = None
    quantization: str | None = None
    error: str = ""  # the last exception line vLLM printed (a refusal), when not ok


def _reason(log: str) -> str:
    """The root cause of a failed start: vLLM re-raises it across processes, so take the first line
    naming an exception in the worker's traceback (its log lines go to stdout), and the reason lines
    under it."""
    lines = [ln.split("] ", 1)[-1].strip() if "] " in ln else ln.strip() for ln in log.splitlines()]
    for i, ln in enumerate(lines):
        if ln.split(":")[0].endswith(("Error", "Exception")) and not ln.startswith(("RuntimeError: Engine core",
                                                                                       "Exception: WorkerProc")):
            tail = [x for x in lines[i + 1:i + 6] if x and not x.startswith(("Traceback", "File ", "(", "["))]
            return " ".join([ln] + tail)
    return lines[-1] if lines else ""


def run_vllm(model_dir: Path, prompts: list, max_tokens: int, scored: list, work: Path,
             timeout: float = 900) -> VllmRun:
    """Greedy tokens for ``prompts`` and teacher-forced log-probs of ``scored`` from vLLM (bf16)."""
    py = venv_python()
    assert py is not None, "no vLLM venv (scripts/vllm_venv.sh)"
    work.mkdir(parents=True, exist_ok=True)
    req, res = work / "request.json", work / "result.json"
    req.write_text(json.dumps({"model": str(model_dir), "dtype": "bfloat16", "prompts": prompts,
                               "max_tokens": max_tokens, "scored": scored}))
    # 1 GiB of KV cache is plenty for 2 x 40 tokens; no hub; the worker must not see our checkout's
    # packages (PYTHONPATH): vLLM runs in its own environment.
    # VLLM_CPU_INT4_W4A8=0: on CPUs with AMX, vLLM CPU (0.32) serves a W4A16 checkpoint in bf16 as W4A8
    # by default (int8 dynamic activation quantization, its `int4_scaled_mm_cpu`), which is not the
    # scheme the checkpoint declares; measured on SmolLM2 W4 g64 sym (raw prompts): 18/40 tokens, mean
    # |log-prob diff| 0.234 nats with it, against transformers bf16's own 39/40, 0.032. Off, vLLM runs
    # the W4A16 kernel (`cpu_gemm_wna16`) on every CPU, so the test checks our export, not that choice.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_INT4_W4A8="0")
    # its own process group, output to a file (not pipes): when the worker exits, whatever engine
    # process vLLM left behind is killed with the group instead of holding the test on an open pipe
    log_path = work / "vllm.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen([str(py), str(WORKER), str(req), str(res)], stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=str(work), start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    text = log_path.read_text(errors="replace")
    if rc != 0:
        return VllmRun(ok=False, error=_reason(text) or f"vLLM worker exited with status {rc}")
    out = json.loads(res.read_text())
    return VllmRun(ok=True, tokens=out["tokens"], logprobs=out["logprobs"], quantization=out["quantization"])


def mean_abs_logprob_diff(a: list, b: list) -> float:
    """Mean |a - b| over every scored position of every sequence (nats)."""
    pairs = [(x, y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=True)]
    return sum(abs(x - y) for x, y in pairs) / len(pairs)
