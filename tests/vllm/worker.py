"""Runs inside the vLLM venv (scripts/vllm_venv.sh), never in the test process: loads one exported
checkpoint in vLLM's CPU engine and answers a request written by the tests as JSON.

    python worker.py REQUEST.json RESULT.json

Request: {"model": dir, "dtype": "bfloat16", "prompts": [[ids], ...], "max_tokens": 20,
"scored": [[ids], ...]}. Result: {"tokens": [[ids], ...] (greedy, EOS ignored),
"logprobs": [[float, ...], ...] (log p(scored[i][t] | scored[i][:t]) for t >= 1, teacher-forced),
"quantization": what vLLM resolved the checkpoint's method to, "seconds": load time}.
Errors (vLLM refusing the checkpoint) propagate: the exit status is non-zero and stderr holds them.
This file imports neither torchcompress nor the tests package.
"""

import json
import os
import sys
import time


def main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.load(open(request_path))
    t0 = time.perf_counter()
    llm = LLM(model=req["model"], dtype=req.get("dtype", "bfloat16"), max_model_len=req.get("max_model_len", 512),
              seed=0, enforce_eager=True)
    seconds = time.perf_counter() - t0
    greedy = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    # teacher forcing: the whole sequence as the prompt; prompt_logprobs=0 returns the prompt token's own
    # log-probability at every position after the first
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in req["scored"]], score, use_tqdm=False)
    logprobs = []
    for seq, o in zip(req["scored"], outs):
        per_pos = o.prompt_logprobs
        logprobs.append([per_pos[t][seq[t]].logprob for t in range(1, len(seq))])
    quant = getattr(llm.llm_engine.model_config, "quantization", None)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"tokens": tokens, "logprobs": logprobs, "quantization": quant, "seconds": seconds}, f)
    os.replace(tmp, result_path)
    # stop the engine's processes now, while the interpreter is whole (see the note at the bottom)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # vLLM CPU 0.32's teardown at interpreter exit aborts on this machine ("terminate called without
    # an active exception": a C++ thread still joinable when the interpreter finalises), after the
    # answer is complete and written and the engine processes are stopped. The answer is what the tests
    # check, so leave without running interpreter finalisation; an error before this line still exits
    # non-zero with vLLM's traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
