"""The memory planner against measurement on CPU: one real GRPO step per model size, in a child
process.

    OMP_NUM_THREADS=1 python -m bench.bench_memory_plan     # all cases, ≤ ~12 GB RAM
    OMP_NUM_THREADS=1 python -m bench.bench_memory_plan --cases lora-2b-l6

Each case builds a random-weight Qwen2-VL / Qwen2.5-VL at published widths (heads, vocabulary,
vision tower; grpo_models.shapes) and reduced depth, in fp32 (the CPU dtype), and runs one
complete ``GRPOTrainer.step`` (rollout, reference log-probs, update with AdamW) in a fresh child
process. Measured = the child's peak RSS (``ru_maxrss``) minus its RSS just before the model is
built (python, torch, transformers, tokenizer already loaded). A sampler thread reads the RSS
every 2 ms and keeps the largest value per phase (rollout, scoring, backward, optimizer), so the
phases can be compared too. Predicted = ``grpo_core.memory_plan.plan`` with ``Precision(4, 4)``
(fp32 compute and master: no copies), ``device="cpu"``, and the step's real prompt length.

glibc's malloc keeps freed blocks below its (dynamic) mmap threshold in the heap, so RSS would
count freed tensors; the child sets ``MALLOC_MMAP_THRESHOLD_=65536`` so that larger blocks come
from mmap and go back to the system when freed: RSS then follows live tensors, as a GPU's
allocated-bytes counter does.

Writes bench/results/<cpu>/memory_plan.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

CASES = {  # name → architecture, depth, method; each sized to run in about a minute on one thread
    "full-2b-l2": dict(arch="qwen2-vl-2b", layers=2, vision_depth=2, lora=0, beta=0.04, ckpt=False),
    "ckpt-2b-l4": dict(arch="qwen2-vl-2b", layers=4, vision_depth=2, lora=0, beta=0.0, ckpt=True),
    "full-3b-l2": dict(
        arch="qwen2.5-vl-3b", layers=2, vision_depth=1, lora=0, beta=0.0, ckpt=False
    ),
    "lora-2b-l6": dict(
        arch="qwen2-vl-2b", layers=6, vision_depth=2, lora=16, beta=0.04, ckpt=False
    ),
    "lora-7b-l2": dict(
        arch="qwen2-vl-7b", layers=2, vision_depth=1, lora=16, beta=0.04, ckpt=False
    ),
}
HISTORY = (
    "History: in the first run every full fine-tuning case was within ±1 %, but LoRA (2B widths, "
    "6 layers) was −17 % and LoRA (7B widths) −20 %: the planner assumed the fused loss skips the "
    "lm_head's dW when the lm_head is frozen, and it does not (grpo_core/kernels: the fp32 (V, H) "
    "accumulator is allocated and filled, then dropped). The planner now counts it; the "
    "predictions below were recomputed from the same measurements with `--replan`.\n\n"
    "Reading the phase columns: the measured step is the first one, so AdamW's moments (8 B per "
    "trainable parameter, created lazily by the first `optimizer.step`) do not exist yet during "
    "its rollout and backward, while the plan's phases are those of a later step (resident "
    "moments): full fine-tuning's rollout/backward predictions are higher by exactly those bytes. "
    "The measured 'backward' also covers the moment after the optimizer step, before `zero_grad` "
    "(weights + gradients + moments). The full fine-tuning peaks are the optimizer step; the LoRA "
    "peaks are the backward (activations, frozen weights, loss buffers), which checks the "
    "activation formulas."
)
B, G, C, IMAGE = 2, 4, 32, 448  # prompts, group size, new tokens, image side (1024 patches)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    """Largest RSS seen per phase label (sampled every 2 ms)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks, self.stop = "setup", {}, False

    def run(self):
        while not self.stop:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss())
            time.sleep(0.002)


def _tagged(sampler, name, fn):
    def run(*a, **kw):
        before, sampler.phase = sampler.phase, name
        try:
            return fn(*a, **kw)
        finally:
            sampler.phase = before

    return run


def child(name: str, tok_dir: str) -> dict:
    import torch
    from grpo_models.policy_utils import apply_lora
    from grpo_models.qwen2_vl import Qwen2VLPolicy
    from grpo_models.shapes import hf_config
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    from grpo_core.config import TrainConfig
    from grpo_core.data import make_synthetic_vqa
    from grpo_core.rewards import RewardSpec
    from grpo_core.trainer import GRPOTrainer

    case = CASES[name]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    proc = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=IMAGE * IMAGE,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    records = make_synthetic_vqa(8, seed=0, image_size=IMAGE)
    sampler = Sampler()
    sampler.start()
    base = rss()
    model = AutoModelForImageTextToText.from_config(
        hf_config(case["arch"], tok, case["layers"], case["vision_depth"]),
        attn_implementation="sdpa",
    )
    if case["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case["lora"]:
        model = apply_lora(model, {"r": case["lora"], "lora_alpha": 32})
    policy = Qwen2VLPolicy(model, tok, proc)
    cfg = TrainConfig()
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = G, B, C
    cfg.grpo.beta, cfg.grpo.backend, cfg.model.lora_rank = case["beta"], "torch", case["lora"]
    cfg.run.progress, cfg.run.resume, cfg.run.output_dir = False, False, tempfile.mkdtemp()
    spec = RewardSpec(
        "vowel", lambda c, r: [float(t[:1].lower() in "aeiou") for t in c], 1.0, "accuracy"
    )
    tr = GRPOTrainer(policy, records, cfg.validate(), reward_specs=[spec])
    tr.rollout = _tagged(sampler, "rollout", tr.rollout)
    tr.score = _tagged(sampler, "scoring", tr.score)
    tr.update = _tagged(sampler, "backward", tr.update)
    tr.optimizer.step = _tagged(sampler, "optimizer", tr.optimizer.step)
    enc = policy.encode(tr._next_prompts()[0])
    tr.data_pos = 0
    prompt_len = enc.input_ids.shape[1]
    image_tokens = int((enc.input_ids[0] == policy.image_token_id).sum())
    t0 = time.perf_counter()
    m = tr.step()
    seconds = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "case": name,
        **case,
        "prompt_len": prompt_len,
        "image_tokens": image_tokens,
        "completion_len": float(m["completion_len"]),
        "seconds": seconds,
        "measured": peak - base,
        "measured_phases": {k: v - base for k, v in sampler.peaks.items() if k != "setup"},
    }


def predict(row: dict) -> dict:
    """The plan of a measured case (the planner as it is now: --replan after a change)."""
    from grpo_models.shapes import architecture

    from grpo_core.memory_plan import Arch, Precision, Setup, plan

    a = dataclasses.replace(
        Arch.from_config(architecture(row["arch"]), row["arch"]),
        layers=row["layers"],
        v_depth=row["vision_depth"],
    )
    image_tokens = row.get("image_tokens", IMAGE * IMAGE // (14 * 14 * 4))
    s = Setup(
        gpus=1,
        lora_rank=row["lora"],
        checkpointing=row["ckpt"],
        reference=row["beta"] > 0 and not row["lora"],
        prompts=B,
        group=G,
        new_tokens=C,
        prompt_text_tokens=row["prompt_len"] - image_tokens,
        image_pixels=IMAGE * IMAGE,
        device="cpu",
    )
    p = plan(a, s, Precision(compute=4, master=4))
    return {
        **row,
        "params_M": a.params() / 1e6,
        "predicted": p.peak,
        "predicted_phase": p.peak_phase,
        "predicted_phases": {k: p.phase_total(k) for k in p.phases},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--child")
    ap.add_argument("--tok")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<cpu>/)")
    ap.add_argument(
        "--replan",
        action="store_true",
        help="recompute the predictions of the measured rows in memory_plan.json (no new runs)",
    )
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tok)))
        return 0
    import torch
    from grpo_models.tiny import build_tiny_tokenizer

    from .common import device_label, results_dir

    out = args.out or results_dir(torch.device("cpu"))
    os.makedirs(out, exist_ok=True)
    if args.replan:
        with open(os.path.join(out, "memory_plan.json")) as f:
            saved = json.load(f)
        return _write(out, [predict(r) for r in saved["rows"]], saved["device"], saved["loadavg"])
    tok = tempfile.mkdtemp()
    build_tiny_tokenizer(tok)
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    rows = []
    for name in args.cases:
        r = subprocess.run(
            [sys.executable, "-m", "bench.bench_memory_plan", "--child", name, "--tok", tok],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(predict(json.loads(r.stdout.strip().splitlines()[-1])))
        x = rows[-1]
        print(f"{_summary(x)}, {x['seconds']:.0f} s", flush=True)
    return _write(
        out, rows, device_label(torch.device("cpu")), open("/proc/loadavg").read().strip()
    )


def _write(out: str, rows: list, device: str, loadavg: str) -> int:
    with open(os.path.join(out, "memory_plan.json"), "w") as f:
        json.dump({"device": device, "loadavg": loadavg, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "memory_plan.md"), "w") as f:
        f.write(render(rows, device, loadavg))
    for x in rows:
        print(_summary(x))
    return 0


def _summary(x: dict) -> str:
    g, err = 2**30, 100 * (x["predicted"] / x["measured"] - 1)
    return (
        f"{x['case']}: predicted {x['predicted'] / g:.2f} GiB, "
        f"measured {x['measured'] / g:.2f} GiB ({err:+.1f} %)"
    )


def render(rows, device: str, loadavg: str = "") -> str:
    g = 2**30
    lines = [
        f"# Memory planner vs measurement ({device}, fp32, one GRPO step)",
        "",
        "`OMP_NUM_THREADS=1 python -m bench.bench_memory_plan`: child-process peak RSS above its "
        f"pre-model RSS vs `grpo_core.memory_plan` (B={B} prompts, G={G}, {C} new tokens, one "
        f"{IMAGE}×{IMAGE} image per prompt; published widths, reduced depth). Phases: sampled RSS "
        "peaks (2 ms) / the plan's phase totals (scoring: reference / old log-probs, not planned: "
        f"it stays below the rollout). Load average at the end: {loadavg}.",
        "",
        HISTORY,
        "",
        "| case | params | predicted GiB | measured GiB | error | peak phase (plan) | "
        "rollout p/m | backward p/m | optimizer p/m | scoring m | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        pp, mp = x["predicted_phases"], x["measured_phases"]
        ph = " | ".join(
            f"{pp[k] / g:.2f} / {mp.get(k, 0) / g:.2f}"
            for k in ("rollout", "backward", "optimizer")
        )
        lines.append(
            f"| {x['case']} ({x['arch']}, L={x['layers']}, V={x['vision_depth']}"
            f"{', LoRA ' + str(x['lora']) if x['lora'] else ''}{', ckpt' if x['ckpt'] else ''}"
            f"{', β>0' if x['beta'] else ''}) | {x['params_M']:.0f} M | {x['predicted'] / g:.2f} | "
            f"{x['measured'] / g:.2f} | {100 * (x['predicted'] / x['measured'] - 1):+.1f} % | "
            f"{x['predicted_phase']} | {ph} | {mp.get('scoring', 0) / g:.2f} | {x['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
