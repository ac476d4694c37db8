"""Vision patch embedding: the stock ``nn.Conv3d`` vs ``PatchGemm`` (the same product as one GEMM).

    OMP_NUM_THREADS=1 python -m bench.bench_patch_embed      # CPU: the tiny rollout bench's images
    python -m bench.bench_patch_embed --model 2b --out DIR   # GPU: Qwen2-VL-2B's patch embed, bf16

Qwen2-VL's patch embedding is a Conv3d whose stride equals its kernel over inputs of exactly one
kernel, i.e. (patches × 1176) · (1176 × embed). ``grpo_models.vision_patch`` runs it as that GEMM
(DECISIONS.md §17). Rows, each timed alternately (conv, GEMM, conv, GEMM, ...) so that load on a
shared machine falls on both alike:
  proj      the projection alone on the bench's patches (CPU tiny: 4 images of 448² = 4096
            patches → 32 channels; GPU 2b: 8 images of 448² = 8192 patches → 1280, bf16);
  vision    (tiny only) the whole vision tower of the tiny policy, conv vs GEMM in place.
Columns: median ms (20/80 % quantiles), the ratio conv / GEMM, and the largest difference of the
outputs (the GEMM and the conv sum in different orders: rounding-level).
Writes <out>/<device>/patch_embed.{json,md} (default out: bench/results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch
from grpo_models.vision_patch import PatchGemm, stock_patch_embed

from bench.common import device_label, loadavg, results_dir, time_ms, write_table

PATCH = (3, 2, 14, 14)                 # channels, frames, height, width: 1176 inputs a patch
COLUMNS = ["row", "dtype", "patches", "embed", "conv_ms", "conv_p20", "conv_p80", "gemm_ms",
           "gemm_p20", "gemm_p80", "conv_over_gemm", "max_abs_diff", "loadavg"]


def _alternating(fns: dict, device: torch.device, rounds: int) -> dict:
    """{name: (median, q20, q80)} over ``rounds`` alternating time_ms calls of each fn."""
    runs = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            runs[name].append(time_ms(fn, device))
    return {name: tuple(statistics.median(r[i] for r in rs) for i in range(3))
            for name, rs in runs.items()}


def _row(name: str, conv, gemm, dtype, device, rounds: int, patches: int, embed: int) -> dict:
    """``conv`` / ``gemm``: fn() → output, the same computation with either projection."""
    with torch.no_grad():
        t = _alternating({"conv": conv, "gemm": gemm}, device, rounds)
        diff = (conv().float() - gemm().float()).abs().max().item()
    return {"row": name, "dtype": str(dtype).replace("torch.", ""), "patches": patches,
            "embed": embed, "conv_ms": t["conv"][0], "conv_p20": t["conv"][1],
            "conv_p80": t["conv"][2], "gemm_ms": t["gemm"][0], "gemm_p20": t["gemm"][1],
            "gemm_p80": t["gemm"][2], "conv_over_gemm": t["conv"][0] / t["gemm"][0],
            "max_abs_diff": diff, "loadavg": loadavg()}


def _proj_row(images: int, embed: int, dtype, device, rounds: int) -> dict:
    """The projection alone: images of 448² (1024 patches each) through a random Conv3d."""
    conv = torch.nn.Conv3d(3, embed, PATCH[1:], stride=PATCH[1:], bias=False)
    conv = conv.to(device=device, dtype=dtype)
    gemm = PatchGemm(conv)
    n = images * 1024
    x = torch.randn(n, *PATCH, device=device, dtype=dtype)
    return _row("proj", lambda: conv(x), lambda: gemm(x), dtype, device, rounds, n, embed)


def _vision_row(rounds: int) -> dict:
    """The tiny policy's whole vision tower on the rollout bench's 4 images, conv vs GEMM."""
    from bench.bench_rollout import CONFIGS, TEXTS, _images, tiny_policy
    from grpo_core.policy import Prompt

    cfg = CONFIGS["tiny"]
    with tempfile.TemporaryDirectory(prefix="bench_patch_embed_") as workdir:
        policy = tiny_policy(cfg, workdir)
        prompts = [Prompt(TEXTS[i % len(TEXTS)], [im])
                   for i, im in enumerate(_images(cfg["prompts"], cfg["image"]))]
        enc = policy.encode(prompts)
        core = policy.model.model             # the HF Qwen2-VL model under the LM head

        def tower():                          # (Σ image tokens, H) image features
            feats = core.get_image_features(enc.pixel_values, enc.image_grid_thw).pooler_output
            return torch.cat(list(feats), 0)

        def tower_stock():                    # the same with the stock Conv3d (same weights)
            with stock_patch_embed(core.visual):
                return tower()

        return _row("vision", tower_stock, tower, enc.pixel_values.dtype, torch.device("cpu"),
                    rounds, int(enc.pixel_values.shape[0]),
                    core.visual.patch_embed.proj.out_channels)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "2b"])
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median)")
    ap.add_argument("--out", default=None, help="results root (default bench/results)")
    given = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(given)
    if args.model == "2b":
        if not torch.cuda.is_available():
            raise SystemExit("bench_patch_embed --model 2b needs a CUDA GPU (bf16 Conv3d vs GEMM); "
                             "run the tiny CPU rows without --model")
        device = torch.device("cuda")
        rows = [_proj_row(8, 1280, torch.bfloat16, device, args.rounds)]
    else:
        device = torch.device("cpu")
        rows = [_proj_row(4, 32, torch.float32, device, args.rounds), _vision_row(args.rounds)]
    meta = {"title": "Vision patch embedding: stock Conv3d vs PatchGemm",
            "device": device_label(device),
            "command": " ".join(["python -m bench.bench_patch_embed", *given]),
            "notes": ["conv and GEMM timed alternately, medians over rounds; same weights"]}
    stem = write_table(os.path.join(results_dir(device, args.out), "patch_embed"), meta, rows,
                       COLUMNS)
    print(f"results in {stem}.md")
    for r in rows:                               # last: the device check's summary keeps it
        print(f"[{r['row']}] conv {r['conv_ms']:.2f} ms vs GEMM {r['gemm_ms']:.2f} ms: "
              f"{r['conv_over_gemm']:.2f}x (max |diff| {r['max_abs_diff']:.2e}, "
              f"load {r['loadavg']})")
    return stem


if __name__ == "__main__":
    main()
