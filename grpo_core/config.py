"""Configs: one dataclass per concern, loaded from YAML with dotted command-line overrides.

    grpo train --config examples/configs/synthetic_grpo.yaml grpo.beta=0.0 optim.lr=1e-4

Unknown keys and badly typed values are errors that name the key, the file and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class ModelConfig:
    path: str = ""                      # local checkpoint dir (a real Qwen2-VL, or a tiny one: model.tiny)
    kind: str = "qwen2_vl"              # "qwen2_vl" (also 2.5-VL), "text", or "module:Class" (resolved by the app layer)
    template: str = "chat"              # "chat" = instruct init, "plain" = base init (the study's axis)
    dtype: str = "auto"                 # "auto" | "float32" | "bfloat16" | "float16"
    device: str = "auto"                # "auto" = cuda if available else cpu
    gradient_checkpointing: bool = False
    freeze_vision: bool = False         # keep the vision tower fixed
    lora_rank: int = 0                  # 0 = full fine-tuning; > 0 = LoRA on the language model
    lora_alpha: int = 32
    min_pixels: int | None = None       # image processor bounds (None = the checkpoint's)
    max_pixels: int | None = None       # e.g. 401408 (~400k pixels, as in the study)
    tiny: bool = False                  # build a tiny random Qwen2-VL at `path` if it is missing


@dataclass
class DataConfig:
    source: str = "synthetic"           # "synthetic" or a path handled by grpo_core.data.load_dataset
    format: str | None = None           # dataset format name (None = detect)
    split: str | None = None
    eval_source: str | None = None      # None = a held-out slice of `source`
    eval_size: int = 200                # held-out records (synthetic: generated with another seed)
    train_size: int = 2000              # synthetic only
    image_size: int = 56                # synthetic only
    synthetic_task: str = "quadrant"    # synthetic only
    lesion_sigma: float = 0.036         # synthetic only: lesion std / image size
    lesion_amplitude: float = 0.5       # synthetic only: lesion peak brightness
    prompt: str = "nothink"             # "think" | "nothink" | "direct" (grpo_core.data.templates)
    shuffle_options: bool = False
    skip_bad: bool = False              # skip (and count) bad rows instead of raising
    limit: int | None = None            # use only the first N records


@dataclass
class RolloutConfig:
    group_size: int = 8                 # G: samples per prompt
    prompts_per_step: int = 8           # B: prompts per optimizer step (N = B·G sequences)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    max_batch_sequences: int = 256      # decode at most this many sequences at once


@dataclass
class GRPOConfig:
    adv_scale: str = "group"            # "group" | "batch" | "none" (Dr. GRPO)
    agg: str = "token_mean"             # "token_mean" | "seq_mean" | "constant" (Dr. GRPO)
    clip_low: float = 0.2               # ε_low
    clip_high: float = 0.2              # ε_high (DAPO clip-higher: e.g. 0.28)
    dual_clip: float | None = None      # c > 1 bounds the loss for A < 0; None = off
    beta: float = 0.04                  # KL coefficient; 0 = no reference model at all
    kl: str = "k3"                      # "k1" | "k2" | "k3"
    kl_placement: str = "loss"          # "loss" (GRPO) | "reward" (PPO-style penalty in the reward)
    mu: int = 1                         # optimizer steps per batch of rollouts (μ); > 1 uses old log-probs
    micro_batch_prompts: int = 0        # prompts (whole groups) per forward/backward; 0 = all
    skip_zero_std_groups: bool = False  # drop groups whose rewards are all equal (always counted)
    max_len: int | None = None          # Dr. GRPO constant; None = rollout.max_new_tokens
    rewards: list = field(default_factory=lambda: [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.5}])
    ref: str = "auto"                   # "auto" | "copy" (frozen copy) | "adapters" (LoRA disabled)
    backend: str = "auto"               # fused-loss backend: auto | torch | triton | cuda


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    warmup_steps: int = 0
    schedule: str = "constant"          # "constant" | "cosine" | "linear" (after warm-up)
    max_grad_norm: float = 1.0          # 0 = no clipping


@dataclass
class RunConfig:
    steps: int = 100
    seed: int = 0
    output_dir: str = "runs/grpo"
    eval_every: int = 0                 # 0 = only at the end
    eval_size: int | None = None        # records evaluated (None = all held-out)
    save_every: int = 0                 # 0 = only at the end
    keep_last: int = 2                  # checkpoints kept
    resume: bool = True                 # continue from the newest checkpoint in output_dir
    progress: bool = True
    bf16_autocast: bool = True          # on GPU only
    time_budget_s: float = 0.0          # stop early after this wall time (0 = none)


@dataclass
class DistConfig:
    mode: str = "none"                  # "none" | "ddp" (replicated model) | "fsdp2" (fully_shard; models that don't fit one GPU)
    backend: str = "auto"               # "auto" = nccl on GPU, gloo on CPU | "nccl" | "gloo"
    timeout_s: float = 600.0            # collective timeout: a dead or stalled rank ends the job after this
    reshard_after_forward: bool = True  # fsdp2: free gathered params after forward (False = more memory, less comm)


@dataclass
class SFTConfig:
    target: str = "answer"              # "answer" (<answer>X</answer>) or "reasoning" (needs record.extra["reasoning"])
    steps: int = 100
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> "TrainConfig":
        choices = {
            "model.template": ("chat", "plain"),
            "model.dtype": ("auto", "float32", "bfloat16", "float16"),
            "grpo.adv_scale": ("group", "batch", "none"), "grpo.agg": ("token_mean", "seq_mean", "constant"),
            "grpo.kl": ("k1", "k2", "k3"), "grpo.kl_placement": ("loss", "reward"),
            "grpo.ref": ("auto", "copy", "adapters"), "grpo.backend": ("auto", "torch", "triton", "cuda"),
            "optim.schedule": ("constant", "cosine", "linear"), "data.prompt": ("think", "nothink", "direct"),
            "sft.target": ("answer", "reasoning"),
            "dist.mode": ("none", "ddp", "fsdp2"), "dist.backend": ("auto", "nccl", "gloo"),
        }
        for key, allowed in choices.items():
            sec, name = key.split(".")
            val = getattr(getattr(self, sec), name)
            if val not in allowed:
                raise ValueError(f"config: {key}={val!r} is not one of {allowed}")
        positive = {"rollout.group_size": self.rollout.group_size, "rollout.prompts_per_step": self.rollout.prompts_per_step,
                    "rollout.max_new_tokens": self.rollout.max_new_tokens, "grpo.mu": self.grpo.mu,
                    "run.steps": self.run.steps, "rollout.temperature": self.rollout.temperature}
        for key, val in positive.items():
            if val <= 0:
                raise ValueError(f"config: {key} must be > 0, got {val}")
        if self.grpo.dual_clip is not None and self.grpo.dual_clip <= 1:
            raise ValueError(f"config: grpo.dual_clip must be > 1 or null, got {self.grpo.dual_clip}")
        if not 0 < self.rollout.top_p <= 1:
            raise ValueError(f"config: rollout.top_p must be in (0, 1], got {self.rollout.top_p}")
        if self.grpo.kl_placement == "reward" and self.grpo.beta == 0:
            raise ValueError("config: grpo.kl_placement='reward' needs grpo.beta > 0")
        if self.dist.timeout_s <= 0:
            raise ValueError(f"config: dist.timeout_s must be > 0, got {self.dist.timeout_s}")
        if not self.grpo.rewards:
            raise ValueError("config: grpo.rewards is empty; name at least one reward (e.g. accuracy)")
        return self


def _coerce(value, typ, where):
    """Check/convert one YAML value against a dataclass field type; error names `where`."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError:
                pass
        raise ValueError(f"config: {where}={value!r} does not match type {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config: {where} must be true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config: {where} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config: {where} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config: {where} must be a string, got {value!r}")
    if typ in (list, tuple) or origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return type(value)(value) if typ is list else tuple(value)
        raise ValueError(f"config: {where} must be a list, got {value!r}")
    return value


def _apply(obj, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {sorted(fields)}"
            raise ValueError(f"config: unknown key {where + key!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config: {where + key} must be a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where + key))


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """YAML file (optional) then `section.key=value` overrides (values parsed as YAML)."""
    cfg = TrainConfig()
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config: file not found: {path}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config: {path} must hold a mapping at the top level")
        try:
            _apply(cfg, data, "")
        except ValueError as e:
            raise ValueError(f"{e} (in {path})") from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config: override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        _apply(cfg, nested, "")
    return cfg.validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
