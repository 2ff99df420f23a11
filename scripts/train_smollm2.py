"""SmolLM2-135M training-time compression measurements on CPU (issue #7 note).

Held-out text: /usr/share/common-licenses/GPL-3, 14 windows x 512 tokens (the project's comparable
perplexity). Training text: random 'pydoc' windows (calibration source; never the GPL text).

    HF_HUB_OFFLINE=1 python scripts/train_smollm2.py qat --steps 200 --out /tmp/qat.json
    HF_HUB_OFFLINE=1 python scripts/train_smollm2.py gguf-qat --qtype Q4_0 --steps 60 --out /tmp/gq.json
    HF_HUB_OFFLINE=1 python scripts/train_smollm2.py student --loss kd --steps 200 --out /tmp/kd.json
    HF_HUB_OFFLINE=1 python scripts/train_smollm2.py student --loss ce --steps 200 --out /tmp/ce.json
    HF_HUB_OFFLINE=1 python scripts/train_smollm2.py student --loss ema --steps 200 --out /tmp/ema.json
    HF_HUB_OFFLINE=1 python scripts/train_smollm2.py progressive --steps 100 --out /tmp/prog.json
    # the layers 2 progressive halvings of 30 keep, distilled directly from the full model (baseline)
    HF_HUB_OFFLINE=1 python scripts/train_smollm2.py student --keep 0,4,8,12,16,20,24,29 --steps 200 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch

import torchcompress as tc
from torchcompress.calibration import CalibrationConfig, build_calibration
from torchcompress.distill import Distiller, KDConfig, TrainSettings
from torchcompress.distill.progressive import (
    ProgressiveStage,
    make_student,
    progressive_distill,
)
from torchcompress.distill.self_distill import EMATeacher
from torchcompress.eval.perplexity import evaluate, make_windows
from torchcompress.models import load_model
from torchcompress.training.config import GGUFQATConfig
from torchcompress.training.loop import BatchSchedule, causal_lm_loss, train

GPL = "/usr/share/common-licenses/GPL-3"


def ppl(model, windows) -> float:
    return round(evaluate(model, windows).perplexity, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["qat", "gguf-qat", "student", "progressive"])
    ap.add_argument("--loss", choices=["kd", "ce", "ema"], default="kd", help="student mode: training loss")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--lsq", action="store_true", help="qat: learnable step sizes")
    ap.add_argument("--qtype", default="Q4_0", help="gguf-qat: GGUF block type (pure; rows that do not fit fall back)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hard", type=float, default=0.0, help="hard-label CE weight next to the soft KD loss")
    ap.add_argument("--stages", type=int, default=2, help="progressive: number of halvings")
    ap.add_argument("--ema-decay", type=float, default=0.99, help="student --loss ema: the teacher's EMA decay")
    ap.add_argument("--keep", default="every_other", help="student: layers kept, 'every_other' or indices 0,4,8")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--windows", type=int, default=14)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    lm = load_model("default")
    model, tok = lm.model, lm.tokenizer
    with open(GPL, encoding="utf-8") as f:
        windows = make_windows(tok, f.read(), 512, a.windows, "GPL-3")
    n_samples = a.steps * a.batch * (a.stages if a.mode == "progressive" else 1)
    calib = build_calibration(CalibrationConfig(sources=("pydoc",), num_samples=n_samples, seq_len=a.seq, seed=1), model, tok)
    model.model.embed_tokens.weight.requires_grad_(False)  # tied with lm_head; not trained in any run
    settings = TrainSettings(steps=a.steps, lr=a.lr, batch_size=a.batch, warmup_steps=min(20, a.steps // 10))
    data = BatchSchedule(calib.input_ids, calib.attention_mask, a.batch, seed=0)
    kd = KDConfig(temperature=a.temperature, soft_weight=1.0, hard_weight=a.hard)
    res = {"args": vars(a), "train_data": calib.describe(), "eval": f"{GPL}, {windows.ids.shape[0]} x 512 tokens"}
    if a.mode == "qat":
        res["float_ppl"] = ppl(model, windows)
        scheme = tc.QuantScheme(bits=a.bits, group_size=a.group, symmetric=False)
        rtn = tc.quantize_(copy.deepcopy(model), tc.RTNConfig(scheme))
        res["rtn_ppl"] = ppl(rtn, windows)
        del rtn
        teacher = copy.deepcopy(model)
        tc.quantize_(model, tc.QATConfig(scheme, learnable_scale=a.lsq) if a.lsq else tc.QATConfig(scheme))
        d = Distiller(teacher, kd)
        losses = train(model, data, lambda m, ids, mask: d.loss(m, ids, mask), settings)
        tc.freeze_(model)
        res["qat_ppl"] = ppl(model, windows)
        res["gap_recovered"] = round((res["rtn_ppl"] - res["qat_ppl"]) / (res["rtn_ppl"] - res["float_ppl"]), 4)
    elif a.mode == "gguf-qat":
        # PTQ = the same prepare + freeze without training: freeze gives quantize_gguf_'s bytes (pure)
        # for every Linear but lm_head (tied with the float embedding; neither is trained or quantized)
        cfg = GGUFQATConfig(a.qtype)
        res["float_ppl"] = ppl(model, windows)
        ptq = tc.freeze_(tc.quantize_(copy.deepcopy(model), cfg))
        res["types"] = sorted({m.qtype.name for m in ptq.modules() if hasattr(m, "blocks")})
        res["ptq_ppl"] = ppl(ptq, windows)
        del ptq
        logging.info("float %.3f, PTQ %s %.3f", res["float_ppl"], a.qtype, res["ptq_ppl"])
        teacher = copy.deepcopy(model)
        tc.quantize_(model, cfg)
        d = Distiller(teacher, kd)
        losses = train(model, data, lambda m, ids, mask: d.loss(m, ids, mask), settings)
        tc.freeze_(model)
        res["qat_ppl"] = ppl(model, windows)
        res["gap_recovered"] = round((res["ptq_ppl"] - res["qat_ppl"]) / (res["ptq_ppl"] - res["float_ppl"]), 4)
    elif a.mode == "student":
        keep = a.keep if a.keep == "every_other" else [int(i) for i in a.keep.split(",")]
        student = make_student(model, keep)
        res["student_layers"] = student.config.num_hidden_layers
        res["student_init_ppl"] = ppl(student, windows)
        if a.loss == "kd":
            d = Distiller(model, kd)
            losses = train(student, data, lambda m, ids, mask: d.loss(m, ids, mask), settings)
        elif a.loss == "ce":
            losses = train(student, data, causal_lm_loss, settings)
        else:  # self-distillation: CE + KL to an EMA of the student itself
            ema = EMATeacher(student, decay=a.ema_decay)
            d = Distiller(ema, KDConfig(temperature=a.temperature, soft_weight=1.0, hard_weight=1.0))
            losses = train(student, data, lambda m, ids, mask: d.loss(m, ids, mask), settings, hooks=[ema])
            res["ema_teacher_ppl"] = ppl(ema.model, windows)
        res["student_ppl"] = ppl(student, windows)
    else:
        per_stage = []
        stages = [ProgressiveStage(keep="every_other", kd=kd, train=settings) for _ in range(a.stages)]

        def on_stage(i, student, losses):
            per_stage.append({"layers": student.config.num_hidden_layers, "ppl": ppl(student, windows),
                              "loss_first10": sum(losses[:10]) / len(losses[:10]),
                              "loss_last10": sum(losses[-10:]) / len(losses[-10:])})
            logging.info("stage %d: %s", i, per_stage[-1])

        _, hist = progressive_distill(model, stages, calib, on_stage=on_stage)
        losses = [x for h in hist for x in h]
        res["stages"] = per_stage
    res["loss_first10"] = sum(losses[:10]) / len(losses[:10])  # mean of the first (up to) 10 steps
    res["loss_last10"] = sum(losses[-10:]) / len(losses[-10:])
    res["seconds"] = round(time.time() - t0, 1)
    res["threads"] = torch.get_num_threads()
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
