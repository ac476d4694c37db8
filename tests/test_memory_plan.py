"""The memory planner (grpo_core.memory_plan): its sizes against the real modules, its rules.

- parameter counts: the planner's formulas equal the transformers modules' numel for every named
  architecture (built on the meta device: no memory, no download) and for LoRA (peft on a small
  model at the real layout);
- the plan's rules: checkpointing and smaller micro-batches lower the backward peak, FSDP2 divides
  resident state by the GPUs, offload moves AdamW's states to host RAM, the advice fits;
- `grpo plan` prints the table for every shipped GPU config.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from grpo_models.shapes import ARCHITECTURES, architecture, hf_config

from grpo_core.config import load_config
from grpo_core.memory_plan import Arch, GiB, Precision, Setup, advise, plan, setup_from_config
from grpo_core.memory_plan_table import render

GPU_CONFIGS = (
    "pmc_vqa_grpo_instruct",
    "pmc_vqa_grpo_base",
    "pmc_vqa_drgrpo",
    "pmc_vqa_grpo_ecr",
    "pmc_vqa_grpo_cwr",
    "pmc_vqa_grpo_semantic",
    "pmc_vqa_grpo_ddp",
)


def _meta_model(cfg):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_param_counts_match_transformers(name):
    model = _meta_model(hf_config(name, layers=2, vision_depth=2))
    a = dataclasses.replace(Arch.from_config(architecture(name)), layers=2, v_depth=2)
    assert a.params() == sum(p.numel() for p in model.parameters())
    assert a.vision_params() == sum(p.numel() for p in model.model.visual.parameters())
    assert a.embed_params() == sum(
        p.numel()
        for n, p in model.named_parameters()
        if "embed_tokens" in n or "lm_head" in n or n.endswith("language_model.norm.weight")
    )


def test_published_sizes():
    """The named architectures are the published ones (2.21 B, 3.75 B, 8.29 B parameters)."""
    sizes = {n: Arch.from_config(d).params() / 1e9 for n, d in ARCHITECTURES.items()}
    assert sizes == pytest.approx(
        {
            "qwen2-vl-2b": 2.209,
            "qwen2.5-vl-3b": 3.755,
            "qwen2-vl-7b": 8.291,
            "qwen2.5-vl-7b": 8.292,
        },
        abs=1e-3,
    )


@pytest.mark.parametrize("name", ["qwen2-vl-2b", "qwen2.5-vl-3b"])
def test_lora_count_matches_peft(name):
    """Real layout (kv heads, biases), narrow widths (a small model): peft's trainable count."""
    from grpo_models.policy_utils import apply_lora

    d = {
        **architecture(name),
        "text_config": {
            **architecture(name)["text_config"],
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 320,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    }
    d["vision_config"] = {
        **d["vision_config"],
        "hidden_size" if "intermediate_size" in d["vision_config"] else "embed_dim": 64,
        "num_heads": 2,
        "out_hidden_size": 128,
    }
    if "intermediate_size" in d["vision_config"]:
        d["vision_config"]["intermediate_size"] = 96
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(hf_config(d, layers=2, vision_depth=1))
    n_trainable = sum(
        p.numel() for p in apply_lora(model, {"r": 4}).parameters() if p.requires_grad
    )
    a = dataclasses.replace(Arch.from_config(d), layers=2)
    assert a.lora_params(4) == n_trainable


def _setup(**kw):
    return Setup(**{"prompts": 16, "group": 8, "new_tokens": 512, "micro_prompts": 2, **kw})


A2B = Arch.from_config(architecture("qwen2-vl-2b"), "qwen2-vl-2b")
A7B = Arch.from_config(architecture("qwen2-vl-7b"), "qwen2-vl-7b")


def test_rules():
    base = plan(A2B, _setup())
    ckpt = plan(A2B, _setup(checkpointing=True))
    assert ckpt.phase_total("backward") < base.phase_total("backward")
    assert plan(A2B, _setup(micro_prompts=1)).phase_total("backward") < base.phase_total("backward")
    # FSDP2 over 8 GPUs: fp32 masters and AdamW states are 1/8 of one GPU's
    one, eight = plan(A7B, _setup(gpus=1, mode="fsdp2")), plan(A7B, _setup(gpus=8, mode="fsdp2"))
    g1, g8 = ({x.what: x.bytes for x in p.resident} for p in (one, eight))
    assert g8["optimizer states"] == pytest.approx(g1["optimizer states"] / 8)
    assert g1["optimizer states"] == pytest.approx(A7B.params() * 8)
    # offload: no optimizer bytes on the GPU, the same bytes in host RAM
    off = plan(A2B, _setup(offload_optimizer=True))
    assert {x.what: x.bytes for x in off.resident}["optimizer states"] == 0
    assert off.host_total - base.host_total == pytest.approx(A2B.params() * (8 + 8))
    # LoRA: no reference copy, trainable = adapters only
    lora = plan(A7B, _setup(lora_rank=64, reference=False))
    resident = [sum(x.bytes for x in p.resident) for p in (lora, plan(A7B, _setup()))]
    assert resident[0] < 0.2 * resident[1]  # bf16 base (2 B) vs 4 + 2 + 8 B
    # fp32 everywhere (the CPU case): no compute copies
    assert not [
        x for x in plan(A2B, _setup(), Precision(4, 4)).phases["backward"] if "copies" in x.what
    ]


def test_advice_fits_and_is_minimal():
    s = _setup(gpus=8, mode="ddp", checkpointing=True)
    fix = advise(A7B, s, Precision(), 80)
    assert fix and fix[0].startswith("dist.mode=fsdp2") and len(fix) == 1
    assert plan(A7B, dataclasses.replace(s, mode="fsdp2")).fits(80)
    assert advise(A2B, _setup(checkpointing=True), Precision(), 80) == []
    assert advise(A7B, _setup(), Precision(), 1) is None


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_grpo_plan_prints_every_gpu_config(name, capsys):
    from grpo_app.cli import main

    args = [
        "plan",
        "--config",
        f"examples/configs/{name}.yaml",
        "--model",
        "qwen2-vl-2b",
        "--gpu-mem",
        "80",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PEAK" in out and "fits 80 GiB" in out


def test_setup_from_config_reads_every_key():
    cfg = load_config("examples/configs/pmc_vqa_grpo_ddp.yaml", ["model.lora_rank=16"])
    s = setup_from_config(cfg, gpus=8)
    assert (
        s.mode,
        s.lora_rank,
        s.reference,
        s.prompts,
        s.local_prompts,
        s.micro_prompts,
        s.checkpointing,
        s.image_pixels,
    ) == ("ddp", 16, False, 64, 8, 2, True, 401408)
    assert plan(A2B, s).peak < 80 * GiB


@pytest.mark.parametrize("name", GPU_CONFIGS + ("pmc_vqa_sft",))
def test_gpu_configs_checkpoint_by_default(name):
    """Gradient checkpointing is on in every GPU config: it pays at the study's shapes (2B: the
    plan's activations fall from ~34 to ~2 GiB, the peak from ~77 to ~46 GiB)."""
    cfg = load_config(f"examples/configs/{name}.yaml")
    assert cfg.model.gradient_checkpointing
    if name != "pmc_vqa_sft":
        s = setup_from_config(cfg)
        off = plan(A2B, dataclasses.replace(s, checkpointing=False))
        assert plan(A2B, s).peak < 0.7 * off.peak


def test_training_doc_holds_the_current_plan():
    """docs/TRAINING.md's memory table and 7B plan are the planner's output (regenerate them with
    `python -m grpo_app.plan` and `grpo plan ... --model qwen2-vl-7b --gpus 8 dist.mode=fsdp2`)."""
    from grpo_app.plan import memory_grid

    with open("docs/TRAINING.md", encoding="utf-8") as f:
        doc = f.read()
    assert memory_grid() in doc
    cfg = load_config("examples/configs/pmc_vqa_grpo_ddp.yaml", ["dist.mode=fsdp2"])
    a7 = Arch.from_config(architecture("qwen2-vl-7b"), "qwen2-vl-7b")
    assert render(plan(a7, setup_from_config(cfg, gpus=8)), 80) in doc


def test_plan_from_a_checkpoint_config(tiny_vlm_path, tiny_vlm_policy, capsys):
    """model.path's config.json (no weights read) gives the exact parameter count, and `grpo
    train`'s start-up line prints the plan with the checkpoint's own image bound."""
    from grpo_app.plan import arch_for, log_plan

    cfg = load_config("examples/configs/synthetic_grpo_instruct.yaml",
                      [f"model.path={tiny_vlm_path}"])
    a = arch_for(cfg)
    assert a.params() == sum(p.numel() for p in tiny_vlm_policy.model.parameters())
    log_plan(cfg, 1)
    out = capsys.readouterr().out
    assert "PEAK" in out and "(3136 px/image)" in out      # min(56² synthetic, 224² processor)
