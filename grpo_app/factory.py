"""Policy loading by name (the app layer: the only place that knows both engine and policies).

``model.kind`` names a policy class: a short name from POLICY_CLASSES or any "module:Class"
whose ``from_pretrained(path, **options)`` returns an object satisfying grpo_core.policy.Policy.
The engine never names a policy; this table does, so a user's own policy class plugs in by its
import string without any change to the engine.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

from grpo_core.config import ModelConfig
from grpo_core.precision import resolve_compute_dtype

POLICY_CLASSES = {"qwen2_vl": "grpo_models.qwen2_vl:Qwen2VLPolicy", "text": "grpo_models.text_lm:TextLMPolicy"}
TINY_BUILDERS = {"qwen2_vl": "grpo_models.tiny:build_tiny_qwen2_vl", "text": "grpo_models.tiny:build_tiny_qwen2"}


def import_object(spec: str):
    """'package.module:Name' → the object, with an error that says what to install or fix."""
    if ":" not in spec:
        raise ValueError(f"expected 'module:Name', got {spec!r}")
    mod, name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import {spec!r} ({e}); is the package installed (pip install -e .)?") from e


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device):
    """``model.dtype`` → the dtype the checkpoint is loaded in: the compute dtype. The trainers then
    upcast what they train to fp32 master weights (grpo_core.precision); what stays frozen (the
    reference, LoRA's base, a frozen vision tower) keeps this dtype."""
    return resolve_compute_dtype(name, device)


def load_policy(cfg: ModelConfig, seed: int = 0):
    """Load (or, with ``cfg.tiny``, first build) the policy described by ``cfg``."""
    kind = cfg.kind
    if not cfg.path:
        raise ValueError("model.path is empty: point it at a local checkpoint directory (or set model.tiny=true)")
    if cfg.tiny and not os.path.exists(os.path.join(cfg.path, "config.json")):
        if kind not in TINY_BUILDERS:
            raise ValueError(f"model.tiny=true is only supported for kinds {sorted(TINY_BUILDERS)}, got {kind!r}")
        print(f"grpo: model.tiny=true and {cfg.path!r} holds no checkpoint: building a NEW tiny RANDOM "
              f"{kind} model there (seed {seed}). If you meant an existing checkpoint, fix model.path "
              "and set model.tiny=false.", file=sys.stderr, flush=True)
        import_object(TINY_BUILDERS[kind])(cfg.path, seed=seed)
    if not os.path.exists(os.path.join(cfg.path, "config.json")):
        raise FileNotFoundError(f"model.path={cfg.path!r} has no config.json: not a checkpoint directory")
    cls = import_object(POLICY_CLASSES.get(kind, kind))
    device = resolve_device(cfg.device)
    opts = dict(dtype=resolve_dtype(cfg.dtype, device), device=device, template=cfg.template,
                gradient_checkpointing=cfg.gradient_checkpointing)
    if kind != "text":
        opts.update(freeze_vision=cfg.freeze_vision, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    if cfg.lora_rank > 0:
        opts["lora"] = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}
    return cls.from_pretrained(cfg.path, **{k: v for k, v in opts.items() if v is not None})
