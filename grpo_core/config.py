"""Configs: one dataclass per concern, loaded from YAML with dotted command-line overrides.

    grpo train --config examples/configs/synthetic_grpo_instruct.yaml grpo.beta=0.0 optim.lr=1e-4

Unknown keys and badly typed values are errors that name the key, the file and what is allowed.
Every field declares what it accepts (``option(default, choices=..., ge=...)``, grpo_core.options):
the allowed values of a choice are the tuple defined by the module that gives them meaning
(advantages.SCALES, loss.AGGS, ...), never retyped here, and ``validate`` checks them all when the
config loads, before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

import yaml

from .advantages import BASELINES, SCALES
from .data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_CHECKS
from .data.loaders_hf import check_column_mapping
from .data.synthetic import TASKS as SYNTHETIC_TASKS
from .data.templates import TEMPLATES
from .distributed import MODES
from .kernels.dispatch import BACKENDS, check_backend
from .loss import (
    AGGS,
    KL_PLACEMENTS,
    KLS,
    POLICY_LOSSES,
    RATIO_LEVELS,
    check_loss_options,
    loss_options,
)
from .optim import SCHEDULES
from .options import check_options, option
from .policy import PROMPT_WRAPPERS
from .ref_sync import check_ref_sync
from .reporting import check_report_to
from .rewards import check_reward_entries
from .sampling import SamplingOptions
from .sft import SFT_TARGETS

DTYPES = ("auto", "float32", "bfloat16", "float16")      # model.dtype ("auto": bf16 on GPU, fp32 on CPU)
REFERENCES = ("auto", "copy", "adapters")                  # grpo.ref
KERNEL_BACKENDS = ("auto",) + BACKENDS                     # grpo.backend
DIST_BACKENDS = ("auto", "nccl", "gloo")                   # dist.backend


@dataclass
class ModelConfig:
    path: str = ""                                         # local checkpoint dir (a real Qwen2-VL, or a tiny one: model.tiny)
    kind: str = "qwen2_vl"                                 # "qwen2_vl" (also 2.5-VL), "text", or "module:Class" (resolved by the app layer)
    template: str = option("chat", choices=PROMPT_WRAPPERS)  # "chat" = instruct init, "plain" = base init (the study's axis)
    dtype: str = option("auto", choices=DTYPES)            # weights and activations; "auto" = bf16 on GPU, fp32 on CPU
    device: str = "auto"                                   # "auto" = cuda if available else cpu
    gradient_checkpointing: bool = False                   # recompute activations in backward (less memory)
    freeze_vision: bool = False                            # keep the vision tower fixed
    lora_rank: int = option(0, ge=0)                       # 0 = full fine-tuning; > 0 = LoRA on the language model
    lora_alpha: int = option(32, gt=0)                     # LoRA scale numerator (scale = alpha / rank)
    min_pixels: int | None = option(None, ge=1)            # image processor bounds (None = the checkpoint's)
    max_pixels: int | None = option(None, ge=1)            # e.g. 401408 (~400k pixels, as in the study)
    tiny: bool = False                                     # build a tiny random Qwen2-VL at `path` if it is missing


@dataclass
class DataConfig:
    source: str = "synthetic"                              # "synthetic" or a path handled by grpo_core.data.load_dataset
    format: str | None = None                              # dataset format name (None = detect)
    split: str | None = None                               # split to read where the format has several
    eval_source: str | None = None                         # held-out records from here (None = a held-out slice of `source`)
    eval_split: str | None = None                          # split of `eval_source` to read (e.g. "test" of the same folder)
    eval_size: int = option(200, ge=1)                     # held-out records split off `source` (synthetic: generated with another seed)
    train_size: int = option(2000, ge=1)                   # synthetic only: training items
    image_size: int = option(56, ge=28)                    # synthetic only: image side in pixels
    synthetic_task: str = option("quadrant", choices=tuple(SYNTHETIC_TASKS))  # synthetic only
    lesion_sigma: float = option(0.036, gt=0)              # synthetic only: lesion std / image size
    lesion_amplitude: float = option(0.5, gt=0)            # synthetic only: lesion peak brightness
    prompt: str = option("nothink", choices=TEMPLATES)     # "think" | "nothink" | "direct" (grpo_core.data.templates)
    shuffle_options: bool = False                          # permute options per record (fixed per seed and record id)
    skip_bad: bool = False                                 # skip (and count) bad rows instead of raising
    limit: int | None = option(None, ge=1)                 # use only the first N records
    check_images: str = option("decode", choices=IMAGE_CHECKS)  # before training: "none" | "exists" | "open" | "decode" (every pixel: catches truncated files)
    max_image_pixels: int | None = option(DEFAULT_MAX_IMAGE_PIXELS, ge=1)  # larger images are bad rows, refused before decoding (None = PIL's limit)
    allow_outside_root: bool = False                       # let image paths leave the dataset folder (../, absolute, symlinks)
    columns: dict | None = None                            # hf_dataset / hf_parquet: {question: col, answer: col, image: col, options: col, ...}


@dataclass
class RolloutConfig(SamplingOptions):
    """Sampling options (max_new_tokens, temperature, top_p, top_k, min_p, max_batch_sequences:
    grpo_core.sampling.SamplingOptions) plus the batch shape of a step."""

    group_size: int = option(8, ge=2)                      # G: samples per prompt (≥ 2: the baseline is the group mean)
    prompts_per_step: int = option(8, ge=1)                # B: prompts per optimizer step (N = B·G sequences)


@dataclass
class GRPOConfig:
    adv_scale: str = option("group", choices=SCALES)       # "group" | "batch" | "none" (Dr. GRPO)
    agg: str = option("token_mean", choices=AGGS)          # "token_mean" | "seq_mean" | "constant" (Dr. GRPO)
    clip_low: float = option(0.2, ge=0, lt=1)              # ε_low
    clip_high: float = option(0.2, ge=0)                   # ε_high (DAPO clip-higher: e.g. 0.28)
    dual_clip: float | None = option(None, gt=1)           # c > 1 bounds the loss for A < 0; None = off
    beta: float = option(0.04, ge=0)                       # KL coefficient; 0 = no reference model at all
    kl: str = option("k3", choices=KLS)                    # "k1" | "k2" | "k3"
    kl_placement: str = option("loss", choices=KL_PLACEMENTS)  # "loss" (GRPO) | "reward" (PPO-style penalty in the reward)
    mu: int = option(1, ge=1)                              # optimizer steps per batch of rollouts (μ); > 1 uses old log-probs
    micro_batch_prompts: int = option(0, ge=0)             # prompts (whole groups) per forward/backward; 0 = all
    micro_batch_tokens: int = option(0, ge=0)              # tokens per forward/backward (whole groups); 0 = off
    skip_zero_std_groups: bool = False                     # drop groups whose rewards are all equal (always counted)
    max_len: int | None = option(None, ge=1)               # Dr. GRPO constant; None = rollout.max_new_tokens
    rewards: list = field(default_factory=lambda: [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.5}])  # {name, weight, [role], options…} each (grpo_core.rewards.REWARDS)
    ref: str = option("auto", choices=REFERENCES)          # "auto" | "copy" (frozen copy) | "adapters" (LoRA disabled)
    backend: str = option("auto", choices=KERNEL_BACKENDS)  # fused-loss backend: auto | torch | triton | cuda
    # variants (docs/VARIANTS.md; the loss math: grpo_core/loss.py)
    ratio_level: str = option("token", choices=RATIO_LEVELS)   # "token" (GRPO) | "sequence" (GSPO) | "sequence_token" (GSPO-token)
    policy_loss: str = option("clip", choices=POLICY_LOSSES)   # "clip" (PPO/GRPO) | "cispo" (MiniMax-M1) | "sapo" (soft gate)
    delta: float | None = option(None, gt=1)               # clip only: cap the unclipped ratio at δ (TRL's two-sided delta); None = off
    cispo_max: float = option(5.0, gt=0)                   # cispo only: cap on the detached ratio weight
    sapo_tau_pos: float = option(1.0, gt=0)                # sapo only: gate temperature τ for A > 0
    sapo_tau_neg: float = option(1.05, gt=0)               # sapo only: gate temperature τ for A ≤ 0
    entropy_coef: float = option(0.0, ge=0)                # entropy bonus: loss −= coef · mean entropy (0 = off)
    top_entropy_quantile: float = option(1.0, gt=0, le=1)  # policy loss on the top-q highest-entropy tokens only (1 = all; 0.2 = "80/20")
    kl_bias_correction: bool = False                       # KL term × importance ratio (DeepSeek-V3.2; TRL use_bias_correction_kl)
    baseline: str = option("mean", choices=BASELINES)      # "mean" (GRPO) | "leave_one_out" (RLOO)
    dynamic_sampling: bool = False                         # DAPO: resample until B groups have unequal rewards
    dynamic_sampling_max_rounds: int = option(4, ge=1)     # DAPO: rollout rounds per step at most (then go on with fewer groups)
    mask_truncated_completions: bool = False               # DAPO: completions that hit max_new_tokens leave the loss
    ref_sync_steps: int = option(0, ge=0)                  # every k steps ref ← α·policy + (1 − α)·ref; 0 = never (grpo_core.ref_sync)
    ref_sync_alpha: float = option(0.6, gt=0, le=1)        # α of the reference sync (TR-DPO; TRL's 0.6)


@dataclass
class OptimConfig:
    lr: float = option(1e-6, gt=0)                         # peak learning rate (after warm-up)
    weight_decay: float = option(0.0, ge=0)                # AdamW decoupled weight decay
    betas: tuple = option((0.9, 0.99), ge=0, lt=1, length=2)  # AdamW (β1, β2)
    warmup_steps: int = option(0, ge=0)                    # linear warm-up, in optimizer steps
    schedule: str = option("constant", choices=SCHEDULES)  # "constant" | "cosine" | "linear" after warm-up (grpo_core.optim)
    max_grad_norm: float = option(1.0, ge=0)               # clip the global grad norm; 0 = no clipping
    offload_states: bool = False                           # AdamW moments in host RAM (OffloadedAdamW)


@dataclass
class RunConfig:
    steps: int = option(100, ge=1)                         # GRPO steps (each: one rollout batch, μ optimizer steps)
    seed: int = 0                                          # every random draw of step k derives from (seed, k)
    output_dir: str = "runs/grpo"                          # checkpoints, metrics.jsonl, plots
    eval_every: int = option(0, ge=0)                      # held-out eval every N steps; 0 = only at the end
    eval_limit: int | None = option(None, ge=1)            # held-out records scored per eval (None = all of them)
    save_every: int = option(0, ge=0)                      # checkpoint every N steps; 0 = only at the end
    keep_last: int = option(2, ge=0)                       # checkpoints kept (0 = all)
    resume: bool = True                                    # continue from the newest good checkpoint in output_dir
    resume_force: bool = False                             # resume despite a changed fixed setting; with resume=false, move an earlier run in output_dir to previous-run-K/
    progress: bool = True                                  # progress bar
    bf16_autocast: bool = True                             # on GPU only
    time_budget_s: float = option(0.0, ge=0)               # stop early after this wall time (0 = none)
    log_completions: int = option(4, ge=0)                 # rows (prompt, completion, rewards) to samples.jsonl/.html per log; 0 = none
    log_completions_every: int = option(0, ge=0)           # also log samples every N steps (they are always logged at each eval); 0 = only at evals
    report_to: list = field(default_factory=list)          # extra metric sinks: "tensorboard", "wandb" (optional extras; grpo_core.reporting)
    max_nonfinite_steps: int = option(3, ge=1)             # stop after this many steps in a row with a NaN/inf loss or gradient


@dataclass
class DistConfig:
    mode: str = option("none", choices=MODES)              # "none" | "ddp" (replicated model) | "fsdp2" (fully_shard; models that don't fit one GPU)
    backend: str = option("auto", choices=DIST_BACKENDS)   # "auto" = nccl on GPU, gloo on CPU | "nccl" | "gloo"
    timeout_s: float = option(600.0, gt=0)                 # collective timeout: a dead or stalled rank ends the job after this
    reshard_after_forward: bool = True                     # fsdp2: free gathered params after forward (False = more memory, less comm)


@dataclass
class SFTConfig:
    target: str = option("answer", choices=SFT_TARGETS)    # "answer" (<answer>X</answer>) or "reasoning" (needs record.extra["reasoning"])
    steps: int = option(100, ge=1)                         # optimizer steps
    batch_size: int = option(16, ge=1)                     # records per step
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))   # the same optimizer options as GRPO


@dataclass
class WarmupConfig:
    """Format warm-up before GRPO (`grpo train`): SFT on the prompt's answer format with random option
    letters, so a model that never writes the format starts at chance instead of at zero reward."""

    steps: int = option(0, ge=0)                           # SFT steps on random answers before GRPO; 0 = no warm-up
    batch_size: int = option(16, ge=1)                     # records per warm-up step
    lr: float = option(3e-3, gt=0)                         # warm-up learning rate (AdamW, constant)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> "TrainConfig":
        """Every field against its declaration (options.check_options), then the cross-field rules."""
        _check_all(self, "")
        g, r = self.grpo, self.rollout
        if g.kl_placement == "reward" and g.beta == 0:
            raise ValueError("config: grpo.kl_placement='reward' needs grpo.beta > 0")
        if not g.rewards:
            raise ValueError("config: grpo.rewards is empty; name at least one reward (e.g. accuracy)")
        if g.agg == "constant" and g.max_len is not None and g.max_len < r.max_new_tokens:
            raise ValueError(f"config: grpo.max_len={g.max_len} is shorter than rollout.max_new_tokens="
                             f"{r.max_new_tokens}; Dr. GRPO's constant must cover the longest completion")
        check_backend(g.backend, paths=("linear",))        # the training path runs the fused-linear loss
        check_report_to(self.run.report_to)
        check_loss_options(**loss_options(g), kl_placement=g.kl_placement, where="config", prefix="grpo.")
        check_ref_sync(g.ref_sync_steps, g.ref_sync_alpha, beta=g.beta, ref=g.ref, lora_rank=self.model.lora_rank,
                       kl_placement=g.kl_placement, where="config", prefix="grpo.")
        check_reward_entries(g.rewards)                    # names, options vs signatures, did-you-mean
        check_column_mapping(self.data.columns)            # data.columns for hf_dataset / hf_parquet
        return self


def _check_all(obj, where: str) -> None:
    check_options(obj, where.rstrip("."))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_all(value, f"{where}{f.name}.")


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
