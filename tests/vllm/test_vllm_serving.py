"""vLLM (CPU build 0.32.0, bf16) as a consumer of our exports (issue #21 item 3).

For every scheme vLLM CPU serves: compress SmolLM2 with torchcompress, export it
(compressed-tensors or GPTQ), run vLLM on the directory in its own venv (scripts/vllm_venv.sh) and
compare with transformers in float32 on the same directory: greedy tokens for 2 prompts x 20 tokens
must be equal up to a fork at a near-tie of the reference (``NEAR_TIE``), and teacher-forced log-probabilities of the reference sequences must agree to a mean
|difference| under 0.1 nats (issue #21's acceptance bound). Schemes vLLM CPU refuses are tested as
refusals, with vLLM's reason, so the README's engine table is checked both ways.

Setup (why the first run measured 18/40 tokens and 0.234 nats on W4 g64 sym): on a CPU with AMX, vLLM
CPU serves W4A16 checkpoints in bf16 as W4A8 by default (VLLM_CPU_INT4_W4A8, int8 dynamic activations),
not the scheme the checkpoint declares; engine.py turns that off. The prompts are SmolLM2-Instruct's
chat template (``<|im_start|>`` first, as the model is served), not raw text without a start token.
Measured on the same W4 g64 sym directory (one run each, loaded 2-core machine; the first scored
position is p(token 1 | token 0), token 0 itself is never scored):
- transformers bf16 vs float32, raw prompts: 39/40 tokens, mean 0.032 nats (bf16 alone is small);
- vLLM W4A16 vs transformers float32, raw prompts: 39/40 tokens, 0.027 nats (one near-tie flips);
- vLLM W4A16 vs transformers float32, chat prompts: 40/40 tokens, 0.054 nats (max 0.30, in the system
  prompt).
The test's own numbers: see the README's engine table. W8 per-channel: refused (no CPU kernel for
uint8b128).
"""

from __future__ import annotations

import os

import pytest

from tests.vllm import checkpoints as C
from tests.vllm.engine import mean_abs_logprob_diff, run_vllm, venv_dir, venv_python

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow, pytest.mark.e2e,
    # one test builds its checkpoint (GPTQ with calibration: over 10 min on a loaded 2-core machine) and
    # starts vLLM (1-2 min): the suite-wide 600 s limit is too short here
    pytest.mark.timeout(1800),
    pytest.mark.skipif(venv_python() is None, reason=f"no vLLM venv at {venv_dir()} ($TORCHCOMPRESS_VLLM_VENV): build it with "
                       "`bash scripts/vllm_venv.sh`"),
]

PROMPTS = ("The capital of France is", "def fibonacci(n):")
NEW_TOKENS = 20
# issue #21's bound; measured well under it for W4 g64 sym (module docstring), and the negative control
# (another checkpoint of the same scheme) must land clearly above it
MAX_LOGPROB_DIFF = 0.1
# greedy tokens may fork where the reference's two best tokens are closer than bf16's noise: measured
# on an AVX-512 machine without AMX, W4 g64 sym forked at prompt 1 token 9 where the reference's top two
# were 0.061 nats apart (29/40 tokens, mean 0.084 nats); on an AMX machine the same export gave 40/40.
# vLLM's per-token log-prob error in bf16 is 0.05-0.08 nats on average and up to 0.30 (module
# docstring), so a fork between tokens closer than 0.2 nats is rounding, not a wrong model
NEAR_TIE = 0.2

_NOT_RUN = pytest.mark.skipif(not os.environ.get("TORCHCOMPRESS_VLLM_ALL"), reason=(
    "not yet run to the end on the 2-core machine (GPTQ build > 10 min, FP8's vLLM worker 9 min without an answer): "
    "set TORCHCOMPRESS_VLLM_ALL=1 to run it"))
SERVED = ["w4-g64-sym",
          # measured: 38/40 tokens (prompt 0 forks at token 18, the reference's top two 0.130 nats apart), 0.060 nats
          "w4-g64-asym",
          pytest.param("w4-gptq-g64", marks=_NOT_RUN), pytest.param("fp8-w8a8", marks=_NOT_RUN),
          pytest.param("int8-w8a8-smoothquant", marks=_NOT_RUN)]
# scheme -> what vLLM's CPU build says (a fragment of its error)
REFUSED = {"w8-channel": "uint8b128"}


def chat_prompt(tok, text: str) -> list[int]:
    """``text`` as one user turn in the checkpoint's chat template, ready for the assistant's answer."""
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)
    return list(enc["input_ids"])


class Served:
    """One scheme's checkpoint, its transformers float32 reference and vLLM's run (built once)."""

    def __init__(self, name: str, root):
        from transformers import AutoTokenizer

        self.scheme = C.SCHEMES[name]
        self.path = C.build(self.scheme, root / name)
        tok = AutoTokenizer.from_pretrained(str(self.path))
        self.prompts = [chat_prompt(tok, p) for p in PROMPTS]
        ref = C.load_reference(self.scheme, self.path)
        greedy = [C.greedy_top(ref, p, NEW_TOKENS) for p in self.prompts]
        self.ref_tokens = [g[0] for g in greedy]
        self.ref_top = [g[1] for g in greedy]
        self.scored = [p + t for p, t in zip(self.prompts, self.ref_tokens)]
        self.ref_logprobs = [C.teacher_forced_logprobs(ref, s) for s in self.scored]
        del ref
        self.run = run_vllm(self.path, self.prompts, NEW_TOKENS, self.scored, root / f"{name}-vllm")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    cache: dict[str, Served] = {}

    def get(name: str) -> Served:
        if name not in cache:
            cache[name] = Served(name, root)
        return cache[name]

    return get


def fork_at_near_tie(ref_tokens, ref_top, run_tokens) -> str | None:
    """None when ``run_tokens`` equal ``ref_tokens``, or each prompt's first differing token is a
    near-tie of the reference (vLLM's token among the reference's top 5, within NEAR_TIE nats of its
    choice); else why not. After a fork the two continue from different text, so later tokens are
    not compared (as vLLM's own ``check_logprobs_close``); the teacher-forced log-probabilities cover
    the whole reference sequence."""
    for i, (ref, run) in enumerate(zip(ref_tokens, run_tokens, strict=True)):
        for t, (a, b) in enumerate(zip(ref, run, strict=True)):
            if a == b:
                continue
            idx, val = ref_top[i][t]
            if b not in idx:
                return f"prompt {i} token {t}: vLLM's {b} is not in the reference's top 5 {idx}"
            gap = val[0] - val[idx.index(b)]
            if gap > NEAR_TIE:
                return f"prompt {i} token {t}: vLLM's {b} is {gap:.3f} nats below the reference's {a}"
            print(f"prompt {i} forks at token {t}: {a} vs {b}, a near-tie of {gap:.3f} nats")
            break
    return None


def agreement(tokens_a, lp_a, tokens_b, lp_b) -> tuple[int, int, float]:
    """(equal tokens, tokens, mean |log-prob difference|)."""
    pairs = [(x, y) for ta, tb in zip(tokens_a, tokens_b, strict=True) for x, y in zip(ta, tb, strict=True)]
    return sum(x == y for x, y in pairs), len(pairs), mean_abs_logprob_diff(lp_a, lp_b)


@pytest.mark.parametrize("name", SERVED)
def test_vllm_serves_export_like_transformers(served, name):
    s = served(name)
    assert s.run.ok, f"vLLM refused {name}: {s.run.error}"
    assert s.run.quantization == ("gptq" if s.scheme.export == "gptq" else "compressed-tensors")
    equal, total, diff = agreement(s.ref_tokens, s.ref_logprobs, s.run.tokens, s.run.logprobs)
    print(f"{name}: tokens {equal}/{total}, mean |log-prob diff| {diff:.4f} nats")
    fork = fork_at_near_tie(s.ref_tokens, s.ref_top, s.run.tokens)
    assert fork is None, fork
    assert diff < MAX_LOGPROB_DIFF


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_vllm_refuses_scheme_with_reason(served, name):
    s = served(name)
    assert not s.run.ok, f"vLLM now serves {name}: move it to SERVED and the README's engine table"
    assert REFUSED[name] in s.run.error, s.run.error


def test_wrong_checkpoint_fails_the_check(served):
    """Negative control: vLLM on the W4 g64 sym export scored against transformers float32 on the
    checkpoint it was made from (SmolLM2 before quantization: what a broken export or an engine that
    skipped the quantized weights would look like) must fail the check above. Measured (one run, chat
    prompts): 6/40 tokens, mean |log-prob diff| 1.156 nats, against 40/40, 0.054 for the right one."""
    from torchcompress.models import load_model

    right = served("w4-g64-sym")
    assert right.run.ok
    ref = load_model("default").model.float().eval()
    wrong_tokens = [C.greedy(ref, p, NEW_TOKENS) for p in right.prompts]
    wrong_logprobs = [C.teacher_forced_logprobs(ref, s) for s in right.scored]
    equal, total, diff = agreement(wrong_tokens, wrong_logprobs, right.run.tokens, right.run.logprobs)
    print(f"wrong checkpoint: tokens {equal}/{total}, mean |log-prob diff| {diff:.4f} nats")
    assert diff > MAX_LOGPROB_DIFF
