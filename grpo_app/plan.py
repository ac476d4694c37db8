"""`grpo plan`: the per-GPU memory table of a config before anything is loaded
(grpo_core.memory_plan).

    grpo plan --config examples/configs/pmc_vqa_grpo_instruct.yaml --model qwen2-vl-2b
    grpo plan --config examples/configs/pmc_vqa_grpo_ddp.yaml --model qwen2-vl-7b --gpus 8 \
        dist.mode=fsdp2

The model's sizes come from ``--model NAME`` (published shapes: grpo_models.shapes) or else from
``model.path``'s config.json (no weights read). ``grpo train`` prints the same table at its start
(``log_plan``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:                       # grpo_core imports torch: loaded only when a plan is made
    from grpo_core.memory_plan import Arch, Precision


def add_plan_arguments(p) -> None:
    from grpo_models.shapes import ARCHITECTURES

    p.add_argument("--config", help="YAML config (examples/configs/; keys in docs/CONFIG.md)")
    p.add_argument(
        "--model",
        choices=sorted(ARCHITECTURES),
        help="a published architecture's shapes (default: model.path's config.json)",
    )
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs of the job (dist.mode none + >1 GPU: ddp)"
    )
    p.add_argument(
        "--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)"
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=200,
        help="text tokens of a prompt, images excluded (default 200: PMC-VQA question + options)",
    )
    p.add_argument(
        "overrides", nargs="*", help="section.key=value overrides, e.g. model.lora_rank=64"
    )


def arch_for(cfg, model: str | None = None) -> Arch:
    """Sizes of a named architecture, or of model.path's config.json (the error says which)."""
    from grpo_core.memory_plan import Arch

    if model:
        from grpo_models.shapes import architecture

        return Arch.from_config(architecture(model), model)
    path = os.path.join(cfg.model.path or "", "config.json")
    if not os.path.isfile(path):
        from grpo_models.shapes import ARCHITECTURES

        raise FileNotFoundError(
            f"grpo plan: {path!r} does not exist; point model.path at a checkpoint, or name "
            f"the architecture with --model ({', '.join(sorted(ARCHITECTURES))})"
        )
    with open(path) as f:
        return Arch.from_config(json.load(f), os.path.basename(os.path.normpath(cfg.model.path)))


def checkpoint_max_pixels(cfg) -> int | None:
    """The image processor's max pixels saved with the checkpoint (None when there is none)."""
    path = os.path.join(cfg.model.path or "", "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        pre = json.load(f)
    return pre.get("max_pixels") or (pre.get("size") or {}).get("longest_edge")


def precision_for(cfg, device: str) -> Precision:
    """fp32 master weights; compute in bf16 unless the config asks fp32 (or "auto" on a CPU)."""
    from grpo_core.memory_plan import Precision

    fp32 = cfg.model.dtype == "float32" or (cfg.model.dtype == "auto" and device == "cpu")
    return Precision(compute=4 if fp32 else 2, master=4)


def run_plan_cli(args) -> int:
    from grpo_core.config import load_config
    from grpo_core.memory_plan import plan, setup_from_config
    from grpo_core.memory_plan_table import render

    cfg = load_config(args.config, list(args.overrides))
    a = arch_for(cfg, args.model)
    s = setup_from_config(cfg, gpus=args.gpus, prompt_text_tokens=args.prompt_tokens,
                          checkpoint_max_pixels=None if args.model else checkpoint_max_pixels(cfg))
    print(render(plan(a, s, precision_for(cfg, "gpu")), args.gpu_mem))
    return 0


def log_plan(cfg, world: int) -> None:
    """The plan of this run, printed by rank 0 as `grpo train` starts; never stops training."""
    import torch

    from grpo_core.memory_plan import plan, setup_from_config
    from grpo_core.memory_plan_table import render

    device = "gpu" if torch.cuda.is_available() else "cpu"
    try:
        a = arch_for(cfg)
        s = setup_from_config(cfg, gpus=world, device=device,
                              checkpoint_max_pixels=checkpoint_max_pixels(cfg))
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "gpu" else None
        print(render(plan(a, s, precision_for(cfg, device)), mem), flush=True)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        print(
            f"grpo: no memory plan for this model ({type(e).__name__}: {e})",
            file=sys.stderr,
            flush=True,
        )


def memory_grid(gpu_gib: float = 80.0) -> str:
    """docs/TRAINING.md's table: 2B / 3B / 7B × full / LoRA × 1 GPU / 8 GPUs (ddp, fsdp2) ×
    optimizer on the GPU / offloaded, at the study's step (pmc_vqa_grpo_instruct.yaml: 16 prompts
    × G=8 on one GPU, pmc_vqa_grpo_ddp.yaml: 64 on eight; 512 new tokens, 2 prompts per
    micro-batch, checkpointing, 401408 px). ``python -m grpo_app.plan`` prints it."""
    import dataclasses

    from grpo_core.config import load_config
    from grpo_core.memory_plan import GiB, plan, setup_from_config

    here = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs"
    )
    rows = [
        "| model | method | GPUs | peak GiB/GPU | phase | offloaded optimizer: peak "
        "| host GiB/process |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in ("qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2-vl-7b"):
        a = arch_for(None, model)
        for lora in (0, 64):
            for gpus, mode in ((1, "none"), (8, "ddp"), (8, "fsdp2")):
                name = "pmc_vqa_grpo_instruct.yaml" if gpus == 1 else "pmc_vqa_grpo_ddp.yaml"
                cfg = load_config(
                    os.path.join(here, name), [f"model.lora_rank={lora}", f"dist.mode={mode}"]
                )
                s = setup_from_config(cfg, gpus=gpus)
                p, q = plan(a, s), plan(a, dataclasses.replace(s, offload_optimizer=True))

                def cell(x):
                    return f"{x.peak / GiB:.1f}" + ("" if x.fits(gpu_gib) else " ✗")

                rows.append(
                    f"| {model} | {'LoRA r=64' if lora else 'full'} | {gpus} ({mode}) | "
                    f"{cell(p)} | {p.peak_phase} | {cell(q)} | "
                    f"{p.host_total / GiB:.0f} / {q.host_total / GiB:.0f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    print(memory_grid())
