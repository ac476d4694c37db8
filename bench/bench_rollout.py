"""Rollout throughput: ``grpo_core.rollout.generate_groups`` vs HF ``generate(num_return_sequences=G)``.

    python -m bench.bench_rollout [--quick] [--config tiny|tiny-eos|2b|all]

Same model, same encoded prompts, same sampling (T = 1, top-k off, top-p off), same work: every
row generates exactly ``new`` tokens (EOS and the vision tokens are suppressed on both sides:
``suppress_tokens`` for HF, an −inf ``lm_head_bias`` for ours). HF runs as shipped (its
patch embedding as the stock Conv3d, not our ``PatchGemm``). Runs alternate HF / ours so a
noisy machine slows both alike; we report medians, the median of the per-repetition ratios
(each HF / ours pair back to back, with their range), and on CPU also the ratio of process CPU
time (robust to other processes sharing the cores).

Configs:
  tiny-eos  realistic lengths (CPU): the tiny model, 128 new tokens, EOS allowed: impossible for the
        first 8 tokens, then its logit raised by 3 (≈ 3.7 % stop chance per token): lengths spread
        over 8–128, so finished rows leave the batch (compaction). Both sides apply the same rule
        (a LogitsProcessor for HF); tokens/s counts the tokens up to each row's EOS. Ours also runs
        with compaction off (``compact_below=0``) in the same loop: the compaction gain.
  tiny  the reference: random Qwen2-VL, text hidden 128 × 4 layers, 448×448 images (256 image
        tokens), 4 prompts × G = 8, 32 new tokens, on CPU. Target (issue #25): ≥ 5× HF tokens/s.
  2b    Qwen2-VL-2B shapes with random bf16 weights (GPU only), 16 prompts × G = 8 = 128 rows,
        256 new tokens: tokens/s of HF, of ours as configured (``rollout.graphs: auto``) and of
        ours with the decode step replayed as a CUDA graph (``graphs: on``), in the same run.

Every config reports how close a decode step comes to its physical bound (bench/decode_bound.py:
the weights + the shared prompt K/V + each row's own K/V read once over the memory bandwidth, or
the GEMM FLOPs over the matmul rate, whichever is larger; the rates are the device check's
measured ones where it set them, else measured here: a 1024³ fp32 matmul on CPU, whose memory
bandwidth is not used) against the decode loop's time per forward (sampler included); not for
tiny-eos, whose batch shrinks as rows finish.

Results: bench/results/<device>/rollout.{json,md} (bench/common.py's folder rule).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from grpo_models.vision_patch import stock_patch_embed

from bench import common
from bench.common import device_label, loadavg, peak_bandwidth, results_dir, write_table
from bench.decode_bound import decode_step_cost
from grpo_core.policy import Prompt
from grpo_core.rollout import generate_groups
from grpo_core.sampling import SamplingConfig

CONFIGS = {
    "tiny": dict(hidden=128, layers=4, image=448, prompts=4, G=8, new=32, reps=7, device="cpu"),
    "tiny-eos": dict(hidden=128, layers=4, image=448, prompts=4, G=8, new=128, reps=5, device="cpu",
                     eos_after=8, eos_shift=3),
    "2b": dict(image=448, prompts=16, G=8, new=256, reps=3, device="cuda"),
}
TEXTS = ["What is shown in this scan?", "Which organ is affected and where is the lesion located?",
         "CT or MRI?", "Describe the abnormality.", "Is there a fracture?", "Which modality was used here?",
         "Where is the mass?", "Is this image normal?"]


# ── setup ────────────────────────────────────────────────────────────────────────────────────────

class NoEos:
    """Policy view whose sampler never emits EOS: every row runs the full budget, like HF with
    ``suppress_tokens`` = EOS, so both sides do exactly the same number of decode steps."""

    def __init__(self, policy):
        self._p = policy
        self._bias = policy.lm_head_bias.clone()
        self._bias[list(policy.eos_token_ids)] = float("-inf")

    def __getattr__(self, name):
        return getattr(self._p, name)

    @property
    def lm_head_bias(self):
        return self._bias


def eos_rule(logits: torch.Tensor, j: int, eos_ids, after: int, shift: float) -> torch.Tensor:
    """The tiny-eos length rule on next-token logits (N, V) for new token j (in place)."""
    logits[:, list(eos_ids)] = float("-inf") if j < after else logits[:, list(eos_ids)] + shift
    return logits


class EosAfter:
    """Policy view applying ``eos_rule`` (all rows of a chunk are at the same token j)."""

    def __init__(self, policy, after: int, shift: float):
        self._p, self._after, self._shift, self._j = policy, after, shift, 0

    def __getattr__(self, name):
        return getattr(self._p, name)

    def prefill(self, enc):
        logits, state = self._p.prefill(enc)
        self._j = 0
        return eos_rule(logits, 0, self._p.eos_token_ids, self._after, self._shift), state

    def decode_step(self, state, tokens):
        logits, state = self._p.decode_step(state, tokens)
        self._j += 1
        return eos_rule(logits, self._j, self._p.eos_token_ids, self._after, self._shift), state


def _hf_eos_processor(prompt_len: int, eos_ids, after: int, shift: float):
    from transformers import LogitsProcessor

    class EosAfterProcessor(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return eos_rule(scores, input_ids.shape[1] - prompt_len, eos_ids, after, shift)

    return EosAfterProcessor()


def _images(n: int, side: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_policy(cfg: dict, workdir: str):
    from grpo_models.qwen2_vl import Qwen2VLPolicy
    from grpo_models.tiny import build_tiny_qwen2_vl

    px = cfg["image"] ** 2
    path = build_tiny_qwen2_vl(os.path.join(workdir, "tiny"), hidden=cfg["hidden"], layers=cfg["layers"], max_pixels=px)
    return Qwen2VLPolicy.from_pretrained(path, dtype=torch.float32, device="cpu", max_pixels=px)


def qwen2_vl_2b_policy(cfg: dict, workdir: str):
    """Qwen2-VL-2B architecture, random bf16 weights on cfg["device"], the tiny tokenizer's special ids."""
    from grpo_models.qwen2_vl import Qwen2VLPolicy
    from grpo_models.tiny import build_tiny_tokenizer, qwen2_vl_2b_config
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = build_tiny_tokenizer(os.path.join(workdir, "tok"))
    conf = qwen2_vl_2b_config()
    ids = {t: tok.convert_tokens_to_ids(t)
           for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    conf.image_token_id, conf.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    conf.vision_start_token_id, conf.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    conf.text_config.eos_token_id = conf.text_config.bos_token_id = conf.text_config.pad_token_id = tok.pad_token_id
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(cfg["device"]):
        model = Qwen2VLForConditionalGeneration(conf).to(torch.bfloat16).eval()
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=cfg["image"] ** 2, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)
    return Qwen2VLPolicy(model, tok, proc)


# ── timing ───────────────────────────────────────────────────────────────────────────────────────

def _timed(fn, device: str):
    """(wall s, process CPU s, fn's result); on CUDA the peak-memory counter starts with the call
    (``_peak_gib`` reads it)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c, out


def _peak_gib(device: str) -> float | None:
    """Peak allocated GiB of the last ``_timed`` call on CUDA; None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def hf_generate(policy, enc, G: int, new: int, eos: dict | None = None):
    """HF sampling; ``eos`` None: EOS suppressed (every row runs ``new`` tokens), else
    {after, shift}: the tiny-eos rule."""
    never = torch.isinf(policy.lm_head_bias).nonzero().flatten().tolist()
    extra = {"suppress_tokens": never + list(policy.eos_token_ids)}
    if eos is not None:
        eos_ids = list(policy.eos_token_ids)
        proc = _hf_eos_processor(enc.input_ids.shape[1], eos_ids, eos["after"], eos["shift"])
        extra = {"suppress_tokens": never, "logits_processor": [proc], "eos_token_id": eos_ids}
    e = enc.to(policy.device)
    with torch.no_grad(), stock_patch_embed(policy.model):       # HF as shipped: its Conv3d
        return policy.model.generate(
            input_ids=e.input_ids, attention_mask=e.attention_mask, pixel_values=e.pixel_values,
            image_grid_thw=e.image_grid_thw, mm_token_type_ids=(e.input_ids == policy.image_token_id).int(),
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G,
            max_new_tokens=new, pad_token_id=policy.pad_token_id, **extra,
        )


def _hf_tokens(out: torch.Tensor, prompt_len: int, eos_ids) -> int:
    """Generated tokens up to and including each row's first EOS."""
    comp = out[:, prompt_len:]
    is_eos = torch.isin(comp, torch.tensor(list(eos_ids)))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, comp.shape[1])
    return int(first.sum())


def run_config(name: str, cfg: dict, reps: int, workdir: str, compile: str = "auto") -> dict:
    device = cfg["device"]
    build = tiny_policy if name.startswith("tiny") else qwen2_vl_2b_policy
    policy = build(cfg, workdir)
    prompts = [Prompt(TEXTS[i % len(TEXTS)], [im]) for i, im in enumerate(_images(cfg["prompts"], cfg["image"]))]
    enc = policy.encode(prompts)
    B, G, new, P = cfg["prompts"], cfg["G"], cfg["new"], enc.input_ids.shape[1]
    eos = {"after": cfg["eos_after"], "shift": cfg["eos_shift"]} if "eos_after" in cfg else None
    ours_policy = NoEos(policy) if eos is None else EosAfter(policy, eos["after"], eos["shift"])
    sampling = SamplingConfig(max_new_tokens=new, temperature=1.0, seed=0, compile=compile)
    no_compact = SamplingConfig(**{**sampling.__dict__, "compact_below": 0.0})

    hf_w, hf_c, hf_tok, our_w, our_c, our_tok, stats, nc_w, nc_tok = ([] for _ in range(9))
    peaks = {"hf": None, "ours": None}                             # GiB, last repetition (CUDA)
    hf_generate(policy, enc, G, 2)                                          # warm-up both paths
    t0 = time.perf_counter()                                                # (compile=on: compiles)
    # compile=on: warm up at the timed shapes (the K/V buffers' size is the budget), so the
    # compile happens here and not in the first timed repetition
    warm = SamplingConfig(**{**sampling.__dict__, "max_new_tokens": new if compile == "on" else 3})
    generate_groups(ours_policy, enc, G, warm)
    warmup_s = time.perf_counter() - t0
    for rep in range(reps):
        w, c, out = _timed(lambda: hf_generate(policy, enc, G, new, eos), device)
        if eos is None:
            assert out.shape == (B * G, P + new), "HF stopped early: EOS not suppressed?"
        hf_w.append(w), hf_c.append(c), hf_tok.append(_hf_tokens(out, P, policy.eos_token_ids))
        peaks["hf"] = _peak_gib(device)
        key = SamplingConfig(**{**sampling.__dict__, "seed": rep})          # fresh draws per rep
        w, c, ro = _timed(lambda key=key: generate_groups(ours_policy, enc, G, key), device)
        peaks["ours"] = _peak_gib(device)
        if eos is None:
            assert int(ro.completion_mask.sum()) == B * G * new
        our_w.append(w), our_c.append(c), stats.append(ro.stats), our_tok.append(ro.stats["tokens"])
        if eos is not None:                                        # same draws, compaction off
            key = SamplingConfig(**{**no_compact.__dict__, "seed": rep})
            w, _, ro2 = _timed(lambda key=key: generate_groups(ours_policy, enc, G, key), device)
            assert torch.equal(ro2.completion_ids, ro.completion_ids), "compaction changed a token"
            nc_w.append(w), nc_tok.append(ro2.stats["tokens"])
    hf_prefill, _, _ = _timed(lambda: hf_generate(policy, enc, G, 1), device)  # HF prefill + 1 token

    med = statistics.median
    hf_tps = [t / w for t, w in zip(hf_tok, hf_w)]
    our_tps = [t / w for t, w in zip(our_tok, our_w)]
    row = {
        "config": name, "device": device, "prompts": B, "G": G, "new_tokens": new,
        "prompt_len": int(P),
        "image_tokens": int((enc.input_ids == policy.image_token_id).sum() // B),
        "reps": reps, "threads": torch.get_num_threads(), "loadavg": loadavg(),
        "compile": compile, "ours_warmup_s": warmup_s,
        "hf_peak_GiB": peaks["hf"], "ours_peak_GiB": peaks["ours"],
        "hf_s": med(hf_w), "ours_s": med(our_w),
        "hf_tokens_per_s": med(hf_tps), "ours_tokens_per_s": med(our_tps),
        "mean_len_hf": sum(hf_tok) / (len(hf_tok) * B * G),
        "mean_len_ours": sum(our_tok) / (len(our_tok) * B * G),
        "speedup": med(our_tps) / med(hf_tps),
        "speedup_cpu_time": None if device != "cpu" else (
            med(t / c for t, c in zip(our_tok, our_c)) / med(t / c for t, c in zip(hf_tok, hf_c))),
        "speedup_best": max(our_tps) / max(hf_tps),
        # per repetition ours / HF, each pair run back to back: drift of the machine's speed
        # between repetitions cancels; the spread shows how far one pair can be trusted
        "speedup_paired": med(o / h for o, h in zip(our_tps, hf_tps)),
        "speedup_paired_min": min(o / h for o, h in zip(our_tps, hf_tps)),
        "speedup_paired_max": max(o / h for o, h in zip(our_tps, hf_tps)),
        "ours_prefill_s": med(s["prefill_s"] for s in stats),
        "ours_decode_ms_per_step": med(s["decode_ms_per_step"] for s in stats),
        "hf_decode_ms_per_step_est": 1e3 * (med(hf_w) - hf_prefill) / (new - 1),
        "hf_prefill_s_est": hf_prefill,
        "compactions": med(s["compactions"] for s in stats),
        "rows_decoded_share": med(s["rows_decoded"] / (B * G * max(s["steps"] - 1, 1))
                                  for s in stats),
    }
    if nc_w:
        row["ours_no_compaction_tokens_per_s"] = med(t / w for t, w in zip(nc_tok, nc_w))
        row["compaction_gain"] = row["ours_tokens_per_s"] / row["ours_no_compaction_tokens_per_s"]
    row["ours_ms_per_forward"] = med(_ms_per_forward(s) for s in stats)
    if device == "cuda":                                       # the step as one CUDA graph
        row.update(_graph_run(ours_policy, enc, G, sampling, reps))
        if row.get("ours_graph_tokens_per_s"):
            row["graphs_gain"] = row["ours_graph_tokens_per_s"] / row["ours_tokens_per_s"]
    if eos is None:                 # every row runs the budget: the bound's shapes (not compacted)
        row.update(_bound(policy, B, G, int(P), new, torch.device(device), row))
    return row


def _ms_per_forward(stats: dict) -> float:
    """Decode-loop milliseconds per decode forward (the sampler's share included): a chunk of
    ``steps`` sampled tokens runs ``steps`` − 1 forwards (none after its last token)."""
    return 1e3 * stats["decode_s"] / max(stats["steps"] - stats["chunks"], 1)


def _graph_run(policy, enc, G: int, sampling: SamplingConfig, reps: int) -> dict:
    """Ours with ``rollout.graphs: on`` (one capture per chunk, in the timing): tokens/s and ms per
    forward, or the error (the eager and HF numbers of the run still count)."""
    from grpo_models import step_runner

    cfg = SamplingConfig(**{**sampling.__dict__, "graphs": "on"})
    capture, captures = step_runner.StepRunner._capture, []

    def timed_capture(runner, tokens):               # warm-up step + capture, once per chunk
        torch.cuda.synchronize()
        t = time.perf_counter()
        capture(runner, tokens)
        torch.cuda.synchronize()
        captures.append(time.perf_counter() - t)

    step_runner.StepRunner._capture = timed_capture
    try:
        generate_groups(policy, enc, G, SamplingConfig(**{**cfg.__dict__, "max_new_tokens": 3}))
        runs = [_timed(lambda: generate_groups(policy, enc, G, cfg), "cuda") for _ in range(reps)]
    except Exception as exc:  # noqa: BLE001 - recorded: the device run must keep its other numbers
        return {"graphs_error": f"{type(exc).__name__}: {exc}"[:400]}
    finally:
        step_runner.StepRunner._capture = capture
    tps = statistics.median(ro.stats["tokens"] / w for w, _, ro in runs)
    return {"ours_graph_tokens_per_s": tps, "ours_graph_peak_GiB": _peak_gib("cuda"),
            "ours_graph_capture_ms": 1e3 * statistics.median(captures[1:] or captures),
            "ours_graph_ms_per_forward": statistics.median(_ms_per_forward(ro.stats)
                                                           for _, _, ro in runs)}


def _bound(policy, B: int, G: int, P: int, new: int, device: torch.device, row: dict) -> dict:
    """The decode step's physical bound (bench/decode_bound.py) at the mean own length new / 2,
    and the fraction of it the measured forwards reach (eager / as configured, and graphs)."""
    cost = decode_step_cost(policy._lm, policy.lm_head_weight, B, G, P, own=new / 2)
    bw, rate = peak_bandwidth(device), common.matmul_rate(device)
    bound_s = cost.bound_s(bw, rate)
    out = {"bound_bytes": cost.bytes, "bound_flops": cost.flops,
           "bandwidth_GBps": bw / 1e9 if bw else None, "matmul_TFLOPs": rate / 1e12,
           "bound_ms": 1e3 * bound_s, "bound_by": "memory" if bw and cost.bytes / bw >= bound_s
           else "compute", "fraction_of_bound": 1e3 * bound_s / row["ours_ms_per_forward"]}
    if row.get("ours_graph_ms_per_forward"):
        out["fraction_of_bound_graph"] = 1e3 * bound_s / row["ours_graph_ms_per_forward"]
    return out


# ── results ──────────────────────────────────────────────────────────────────────────────────────

def write_results(rows: list[dict], command: str, root: str | None = None) -> str:
    import transformers

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"title": f"Rollout: generate_groups vs HF generate ({device_label(dev)})", "bench": "rollout",
            "command": command, "device": device_label(dev), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "notes": ["medians over reps, HF and ours alternating"]}
    cols = ["config", "compile", "prompts", "G", "new_tokens", "prompt_len", "threads", "loadavg",
            "hf_tokens_per_s", "ours_tokens_per_s", "speedup", "speedup_cpu_time", "speedup_paired",
            "speedup_paired_min", "speedup_paired_max", "ours_prefill_s",
            "hf_prefill_s_est", "ours_decode_ms_per_step", "hf_decode_ms_per_step_est",
            "mean_len_ours", "mean_len_hf", "ours_no_compaction_tokens_per_s", "compaction_gain",
            "ours_graph_tokens_per_s", "graphs_gain", "graphs_error", "ours_ms_per_forward",
            "ours_graph_ms_per_forward", "ours_graph_capture_ms", "bound_ms", "bound_by",
            "fraction_of_bound", "fraction_of_bound_graph", "hf_peak_GiB", "ours_peak_GiB",
            "ours_graph_peak_GiB", "ours_warmup_s"]
    return write_table(os.path.join(results_dir(dev, root), "rollout"), meta, rows, cols)


def _bound_line(row: dict) -> str:
    if row.get("bound_ms") is None:
        return "no bound: rows finish early (EOS) and leave the batch"
    text = (f"bound {row['bound_ms']:.3g} ms/step ({row['bound_by']}); a forward takes "
            f"{row['ours_ms_per_forward']:.3g} ms: {row['fraction_of_bound']:.1%} of the bound")
    if row.get("fraction_of_bound_graph") is not None:
        text += (f"; as a CUDA graph {row['ours_graph_ms_per_forward']:.3g} ms: "
                 f"{row['fraction_of_bound_graph']:.1%}, {row['graphs_gain']:.2f}x eager tokens/s")
    if row.get("graphs_error"):
        text += f"; CUDA graph run failed: {row['graphs_error']}"
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--config", default="all", choices=["all", *CONFIGS])
    ap.add_argument("--out", default=None, help="results root (default bench/results); files go to <out>/<device>/")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="rollout.compile for ours (on: torch.compile'd decode step; the warm-up "
                         "run compiles, its time is reported as ours_warmup_s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                    help="override a config entry, e.g. --set prompts=1 --set new=4 (smoke runs)")
    args = ap.parse_args(argv)
    names = list(CONFIGS) if args.config == "all" else [args.config]
    for item in args.set:
        key, _, value = item.partition("=")
        for cfg in (CONFIGS[n] for n in names):
            if key not in cfg:
                raise SystemExit(f"--set {item}: no config entry {key!r}; entries: {sorted(cfg)}")
            cfg[key] = int(value)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            cfg = CONFIGS[name]
            if cfg["device"] == "cuda" and not torch.cuda.is_available():
                print(f"[{name}] skipped: needs a CUDA GPU")
                continue
            reps = 2 if args.quick else cfg["reps"]
            row = run_config(name, cfg, reps, workdir, args.compile)
            rows.append(row)
            if row.get("compaction_gain") is not None:
                print(f"[{name}] compaction: {row['compaction_gain']:.2f}x tokens/s over none "
                      f"({row['ours_no_compaction_tokens_per_s']:.0f} tok/s), mean length "
                      f"{row['mean_len_ours']:.1f} (HF {row['mean_len_hf']:.1f})")
            print(f"[{name}] ours {row['ours_tokens_per_s']:.0f} tok/s vs HF {row['hf_tokens_per_s']:.0f} tok/s: "
                  f"{row['speedup']:.2f}x wall"
                  + (f", {row['speedup_cpu_time']:.2f}x CPU time" if row["speedup_cpu_time"]
                     else "")
                  + f"; per pair {row['speedup_paired']:.2f}x "
                  f"({row['speedup_paired_min']:.2f}-{row['speedup_paired_max']:.2f})"
                  + f" | ours prefill {row['ours_prefill_s']:.3f}s, "
                  f"decode {row['ours_decode_ms_per_step']:.2f} ms/step; "
                  f"HF prefill ~{row['hf_prefill_s_est']:.3f}s, decode ~{row['hf_decode_ms_per_step_est']:.2f} ms/step")
            print(f"[{name}] {_bound_line(row)}")
            if row.get("ours_peak_GiB") is not None:
                print(f"[{name}] peak GPU memory: HF {row['hf_peak_GiB']:.1f} GiB, ours "
                      f"{row['ours_peak_GiB']:.1f} GiB (CUDA graph: "
                      f"{row.get('ours_graph_peak_GiB') or float('nan'):.1f} GiB, capture "
                      f"{row.get('ours_graph_capture_ms') or float('nan'):.0f} ms per chunk)")
    if rows:
        cmd = "python -m bench.bench_rollout " + " ".join(argv if argv is not None else sys.argv[1:])
        print("results in", write_results(rows, cmd, args.out))
        last = rows[-1]                                    # the device check's summary: last line
        print(f"[{last['config']}] {last['speedup']:.2f}x HF tokens/s; {_bound_line(last)}")


if __name__ == "__main__":
    main()
