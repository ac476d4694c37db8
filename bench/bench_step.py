"""One full GRPO training step: grpo_core's GRPOTrainer vs TRL's GRPOTrainer (when trl imports).

    python -m bench.bench_step [--quick] [--image-size 448] [--prompts 2] [--group 8] [--new-tokens 32]
                               [--beta 0.04] [--mu 1] [--steps 5] [--rounds 1] [--model tiny|2b]
                               [--providers ours,trl] [--out DIR]

--model 2b: the Qwen2-VL-2B architecture with random bf16 weights (GPU only), else the tiny one.

A step = rollout (B prompts × G samples, up to `new_tokens` each) → rewards → advantages →
reference log-probs (β > 0) → μ optimizer steps. Both trainers get the same saved tiny random
Qwen2-VL (same weights), the same prompts and images (synthetic scans), the same chat template,
G, completion budget, β, μ, ε = 0.2, learning rate, rewards (accuracy + 0.5 · format), sampling
(T = 1, no top-k/top-p), fp32 on CPU (bf16 weights + autocast on GPU), no gradient checkpointing.

What each engine does with that step, for the reader of the ratio:
  ours  prefill each prompt once and fan its KV cache out to G samples; vision tower once per
        prompt in the loss forward; fused-linear GRPO loss (no full logits).
  trl   HF `generate` on B·G rows (each row re-encodes its prompt and image); full-logit loss.

Each provider runs in its own subprocess (clean peak-memory numbers, no shared threads/state).
Timing: `warmup` untimed steps (their total: warmup_s), then `steps` timed steps (wall clock, CUDA
synchronised), median, 20/80 % quantiles and mean (a recompile when a shape changes mid-run shows
in the mean, not the median); on CPU also the process CPU time per step (a second, load-robust
measure). `--rollout-compile on` runs ours with `rollout.compile: on` (the warm-up compiles).
Peak memory: CUDA max allocated, or the process's peak RSS on CPU.
Deviations from TRL's own defaults, on purpose: gradient checkpointing off (TRL defaults it on),
bf16 off on CPU. TRL needs a processor; transformers' Qwen2VLProcessor insists on a video
processor that needs torchvision, so we hand TRL an image-only subclass (same tokenizer, same
PIL image processor, same chat template): `_image_only_processor`.
Writes <out>/step_<cpu|cuda>.json and .md (default out: bench/results/<device>/).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

PROVIDERS = ("ours", "trl")
REFERENCE = "trl"
EXTERNAL_TRL_CPU = {"s": 1.8, "what": "TRL 1.16 GRPOTrainer, CPU, tiny Qwen2-VL (hidden 64, 2 layers), "
                    "2 prompts × G=8, 448² images, 32 new tokens, β=0.04, μ=1 (issue 8; not this run)"}


@dataclass
class StepShape:
    model: str = "tiny"           # "tiny" (hidden × layers below) | "2b" (Qwen2-VL-2B shapes, random bf16, GPU)
    image_size: int = 448         # square synthetic scans, px (448² = 256 image tokens after merge)
    prompts: int = 2              # B prompts per step
    group: int = 8                # G samples per prompt
    new_tokens: int = 32          # completion budget
    beta: float = 0.04            # KL coefficient (reference model on)
    mu: int = 1                   # optimizer steps per batch of rollouts
    hidden: int = 64              # tiny Qwen2-VL text hidden size
    layers: int = 2               # tiny Qwen2-VL text layers
    steps: int = 5                # timed steps
    warmup: int = 1               # untimed steps first
    seed: int = 0
    lr: float = 1e-6
    rollout_compile: str = "auto"  # ours: rollout.compile (auto|on|off); "on" compiles in warm-up


QUICK = dict(image_size=112, prompts=1, group=4, new_tokens=8, steps=2, warmup=1)


# ---- shared set-up -------------------------------------------------------------------------


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(path: str, shape: StepShape) -> str:
    from grpo_models.tiny import build_tiny_qwen2_vl

    px = max(shape.image_size, 56) ** 2
    if shape.model == "2b":
        if not torch.cuda.is_available():
            raise RuntimeError("bench_step: --model 2b needs a CUDA GPU (2.2 B parameters); use the tiny model on CPU")
        return build_2b_shaped(path, shape.seed, px)
    if shape.model != "tiny":
        raise ValueError(f"bench_step: --model must be 'tiny' or '2b', got {shape.model!r}")
    return build_tiny_qwen2_vl(path, seed=shape.seed, hidden=shape.hidden, layers=shape.layers,
                               min_pixels=min(56 * 56, px), max_pixels=px)


def build_2b_shaped(path: str, seed: int, max_pixels: int, config=None, dev: str = "cuda") -> str:
    """Qwen2-VL-2B architecture (V = 151,936) with random bf16 weights and the tiny tokenizer's
    special-token ids, saved at `path` (ids past the tokenizer's ~1k decode to empty text)."""
    from grpo_models.tiny import build_tiny_tokenizer, qwen2_vl_2b_config
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = build_tiny_tokenizer(path)
    conf = config or qwen2_vl_2b_config()
    ids = {t: tok.convert_tokens_to_ids(t)
           for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    conf.image_token_id, conf.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    conf.vision_start_token_id, conf.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    conf.text_config.eos_token_id, conf.text_config.pad_token_id = eos, tok.pad_token_id
    conf.text_config.bos_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]), torch.device(dev):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(conf).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    model.generation_config.eos_token_id = [eos, tok.pad_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2,
                             merge_size=2).save_pretrained(path)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return path


def make_records(shape: StepShape):
    from grpo_core.data import make_synthetic_vqa

    return make_synthetic_vqa(shape.prompts * (shape.warmup + shape.steps), seed=shape.seed,
                              image_size=shape.image_size)


REWARDS = [{"name": "accuracy", "weight": 1.0}, {"name": "format_nothink", "weight": 0.5}]
TEMPLATE = "nothink"


def peak_memory_mb(dev: torch.device) -> tuple[float, str]:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"   # Linux: KiB


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---- ours ------------------------------------------------------------------------------------


def run_ours(path: str, shape: StepShape) -> dict:
    from grpo_app.factory import load_policy
    from grpo_core.config import TrainConfig
    from grpo_core.trainer import GRPOTrainer

    cfg = TrainConfig()
    cfg.model.path, cfg.model.device = path, "auto"
    cfg.data.prompt = TEMPLATE
    cfg.rollout.group_size, cfg.rollout.prompts_per_step = shape.group, shape.prompts
    cfg.rollout.max_new_tokens, cfg.rollout.temperature = shape.new_tokens, 1.0
    cfg.rollout.compile = shape.rollout_compile
    cfg.grpo.beta, cfg.grpo.mu, cfg.grpo.rewards = shape.beta, shape.mu, REWARDS
    cfg.grpo.agg, cfg.grpo.adv_scale = "token_mean", "group"          # = TRL loss_type="dapo", scale_rewards="group"
    cfg.optim.lr = shape.lr
    cfg.run.steps, cfg.run.seed, cfg.run.progress = shape.warmup + shape.steps, shape.seed, False
    policy = load_policy(cfg.model, seed=shape.seed)
    trainer = GRPOTrainer(policy, make_records(shape), cfg)
    dev = policy.device
    times, cpu, lengths, warm = [], [], [], 0.0
    for i in range(shape.warmup + shape.steps):
        if i == shape.warmup and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.step()
        _sync(dev)
        if i >= shape.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            lengths.append(m["completion_len"])
        else:
            warm += time.perf_counter() - t0
    return {"times": times, "cpu_times": cpu, "completion_len": sum(lengths) / len(lengths),
            "warmup_s": warm}


# ---- TRL -------------------------------------------------------------------------------------


def _image_only_processor(path: str):
    """Qwen2VLProcessor without the video processor (which needs torchvision): what TRL needs."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = AutoTokenizer.from_pretrained(path)
    return ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil.from_pretrained(path), tok,
                                     chat_template=tok.chat_template)


def _trl_rewards(records):
    """Our reward functions in TRL's calling convention (completions + dataset columns)."""
    from grpo_core.rewards import get_reward

    def wrap(name):
        fn = get_reward(name)

        def reward(prompts, completions, record_idx, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [float(x) for x in fn(texts, [records[i] for i in record_idx])]
        reward.__name__ = name
        return reward
    return [wrap(r["name"]) for r in REWARDS], [r["weight"] for r in REWARDS]


def run_trl(path: str, shape: StepShape) -> dict:
    from datasets import Dataset
    from transformers import Qwen2VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_core.data.templates import render_text

    dev = device()
    records = make_records(shape)
    rows = [{"prompt": [{"role": "user", "content": [
                 {"type": "image"}, {"type": "text", "text": render_text(r, TEMPLATE)}]}],
             "image": r.images[0].convert("RGB"), "record_idx": i} for i, r in enumerate(records)]
    funcs, weights = _trl_rewards(records)
    out = tempfile.mkdtemp(prefix="trl-step-")
    args = GRPOConfig(
        output_dir=out, per_device_train_batch_size=shape.prompts * shape.group, num_generations=shape.group,
        max_completion_length=shape.new_tokens, beta=shape.beta, num_iterations=shape.mu, learning_rate=shape.lr,
        temperature=1.0, top_k=0, top_p=1.0, loss_type="dapo", scale_rewards="group", reward_weights=weights,
        max_steps=shape.warmup + shape.steps, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=False, bf16=dev.type == "cuda", use_cpu=dev.type == "cpu", seed=shape.seed,
        dataloader_num_workers=0, shuffle_dataset=False, disable_tqdm=True,
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    stamps: list[tuple[float, float, float]] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            _sync(dev)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            _sync(dev)
            stamps.append((time.perf_counter() - self.t0, time.process_time() - self.c0))
            if len(stamps) == shape.warmup and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=_image_only_processor(path), callbacks=[Clock()])
    trainer.train()
    timed_lengths = lengths[shape.warmup:] or lengths
    return {"times": [w for w, _ in stamps[shape.warmup:]], "cpu_times": [c for _, c in stamps[shape.warmup:]],
            "completion_len": sum(timed_lengths) / max(len(timed_lengths), 1)}


# ---- driver ----------------------------------------------------------------------------------


def trl_available() -> str | None:
    """None if TRL imports, else why not (one line)."""
    try:
        import trl
        return None if trl.__version__ else "trl has no version"
    except Exception as e:  # not installed, or broken against this transformers
        return f"trl not importable ({type(e).__name__}: {e}); pip install trl to compare"


def child(provider: str, path: str, shape: StepShape, out_json: str) -> None:
    torch.manual_seed(shape.seed)
    res = run_ours(path, shape) if provider == "ours" else run_trl(path, shape)
    res["peak_mem_mb"], res["mem_kind"] = peak_memory_mb(device())
    with open(out_json, "w") as f:
        json.dump(res, f)


def run_provider(provider: str, path: str, shape: StepShape, timeout: float, isolate: bool = True) -> dict:
    """Run one provider (in a fresh interpreter if ``isolate``); returns its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        if not isolate:
            child(provider, path, shape, os.path.join(tmp, "res.json"))
            with open(os.path.join(tmp, "res.json")) as f:
                return json.load(f)
        res_path = os.path.join(tmp, "res.json")
        cmd = [sys.executable, "-m", "bench.bench_step", "--child", provider, "--model-dir", path,
               "--shape", json.dumps(asdict(shape)), "--child-out", res_path]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"bench_step: provider {provider!r} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        with open(res_path) as f:
            return json.load(f)


def summarise(provider: str, res: dict, shape: StepShape) -> dict:
    t = torch.tensor(res["times"], dtype=torch.float64)
    q = t.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    cpu = torch.tensor(res["cpu_times"], dtype=torch.float64).median().item() if device().type == "cpu" else None
    return {"provider": provider, "model": shape.model, "image_px": shape.image_size,
            "B": shape.prompts, "G": shape.group,
            "new_tokens": shape.new_tokens, "s": q[0], "s_p20": q[1], "s_p80": q[2],
            "s_min": t.min().item(), "s_mean": t.mean().item(), "cpu_s": cpu,
            "steps": len(res["times"]), "warmup_s": res.get("warmup_s"),
            "rollout_compile": shape.rollout_compile if provider == "ours" else None,
            "completion_len": res["completion_len"], "peak_mem_mb": res["peak_mem_mb"]}


def write(out_dir: str, meta: dict, rows: list[dict]) -> str:
    from bench.common import write_table

    cols = ["provider", "rollout_compile", "model", "image_px", "B", "G", "new_tokens", "s", "s_p20",
            "s_p80", "s_min", "s_mean", "warmup_s", "speedup_vs_trl", "cpu_s", "cpu_speedup_vs_trl",
            "completion_len", "peak_mem_mb"]
    return write_table(os.path.join(out_dir, f"step_{'cuda' if device().type == 'cuda' else 'cpu'}"), meta, rows, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny step (112 px, 1×4, 8 tokens, 2 timed steps): CI smoke")
    for name, default in asdict(StepShape()).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=None)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per provider subprocess")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the providers this many times (steps each)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one subprocess per provider (default: on, off with --quick)")
    ap.add_argument("--out", help="folder for step_<cpu|cuda>.{json,md} (default bench/results/<device>/)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.model_dir, StepShape(**json.loads(args.shape)), args.child_out)
        return 0

    given = {k: v for k in asdict(StepShape()) if (v := getattr(args, k)) is not None}
    shape = StepShape(**{**(QUICK if args.quick else {}), **given})
    providers, notes = [p for p in args.providers.split(",") if p], []
    if "trl" in providers and (why := trl_available()):
        providers.remove("trl")
        notes.append(f"TRL skipped: {why}")
    isolate = (not args.quick) if args.isolate is None else args.isolate
    if not isolate:
        notes.append("in-process run: peak RSS is the whole process's so far, not the step's alone")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(os.path.join(tmp, "tiny-qwen2-vl"), shape)
        runs: dict = {p: [] for p in providers}
        for _ in range(args.rounds):          # providers alternate: a load spike hits both alike
            for p in providers:
                runs[p].append(run_provider(p, path, shape, args.timeout, isolate))
        for p, res in runs.items():
            merged = {"times": [t for r in res for t in r["times"]],
                      "cpu_times": [t for r in res for t in r["cpu_times"]],
                      "completion_len": sum(r["completion_len"] for r in res) / len(res),
                      "warmup_s": sum(r.get("warmup_s") or 0.0 for r in res) or None,
                      "peak_mem_mb": max(r["peak_mem_mb"] for r in res)}
            rows.append(summarise(p, merged, shape))
            print(f"{p:5s} {rows[-1]['s']:.3f} s/step (p20 {rows[-1]['s_p20']:.3f}, p80 {rows[-1]['s_p80']:.3f}), "
                  f"completion {rows[-1]['completion_len']:.1f} tokens, peak {rows[-1]['peak_mem_mb']:.0f} MB")
    ref = next((r for r in rows if r["provider"] == REFERENCE), None)
    for r in rows:
        r["speedup_vs_trl"] = ref["s"] / r["s"] if ref else None
        r["cpu_speedup_vs_trl"] = ref["cpu_s"] / r["cpu_s"] if ref and r["cpu_s"] else None
    if device().type == "cpu":
        notes.append("cpu_s: median process CPU time per step (all threads): robust to other processes on the cores")
    if ref is None:
        notes.append(f"no same-run TRL number; external reference only: {EXTERNAL_TRL_CPU['s']} s/step for "
                     f"{EXTERNAL_TRL_CPU['what']}")
    import shlex
    cmd = "python -m bench.bench_step " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    from bench.common import device_label, package_version, results_dir
    from bench.run_all import git_commit

    dev = device()
    meta = {"title": "one GRPO training step: grpo_core vs TRL GRPOTrainer", "device": device_label(dev),
            "torch": torch.__version__, "command": cmd.strip(), "shape": asdict(shape), "notes": notes,
            "reference": REFERENCE, "time_unit": "s",
            "memory": "cuda max allocated" if dev.type == "cuda" else "process peak RSS",
            "trl": package_version("trl"), "transformers": package_version("transformers"), "git": git_commit(),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}

    stem = write(args.out or results_dir(dev), meta, rows)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
