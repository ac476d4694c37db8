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
import re
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
from .loss import KL_PLACEMENTS, OBJECTIVE, LossOptions, check_loss_options
from .optim import SCHEDULES
from .options import check_options, fixed, may_change, not_compared, option
from .policy import PROMPT_WRAPPERS
from .precision import DTYPES
from .ref_sync import check_ref_sync
from .reporting import check_report_to
from .rewards import check_reward_entries
from .sampling import SamplingOptions

REFERENCES = ("auto", "copy", "adapters")                  # grpo.ref
KERNEL_BACKENDS = ("auto",) + BACKENDS                     # grpo.backend
DIST_BACKENDS = ("auto", "nccl", "gloo")                   # dist.backend
SFT_TARGETS = ("answer", "reasoning")                      # sft.target (sft.answer_target)

# Resume classes (grpo_core.options, read by grpo_core.resume): why a fixed setting may not change
# mid-run (printed in the error), or what a setting that may change does on resume.
_MODEL = fixed("the model the run trains")
_PARAMS = fixed("the parameters the optimizer state belongs to")
_COMPUTE = fixed("the compute dtype: the same steps in another dtype give other weights, "
                 "beyond rounding")
_PIXELS = fixed("what the model sees of each image")
_RECORDS = fixed("the training records (the saved data position indexes them)")
_PROMPTS = fixed("the prompts the policy is trained on")
_SAMPLING = fixed("the sampling distribution and the shape of a step")
_GROUPS = fixed("which groups a step trains on, and how fast the data position moves")
_REF = fixed("the reference the KL term holds the policy to")
_OPT_STATE = fixed("stored with the optimizer state")
_SCHEDULE = fixed("the shape of the LR schedule")
_SEED = fixed("every random draw of every step")
_LR = may_change("the new peak LR applies from the resume step on")        # resume.set_base_lr
_STEPS = may_change("the run stops at the new count; a decaying LR schedule is re-stretched")
_BUDGET = may_change("counted from this start")
_NEXT = may_change("applies from the resume step on")
_HOW = may_change("how steps are computed, not what: results agree up to rounding")
_SKIP = may_change("records may be dropped; later batches then differ from an uninterrupted run")
_CHECKS = may_change("which bad rows are found may change; with skip_bad, later batches then "
                     "differ")
_LOGGING = may_change("logging only: applies from the resume step on")    # samples / reporting
_EXPORT = may_change("only the loadable policy/ copy: the resume weights stay fp32")
_WARMUP = may_change("the warm-up runs only before step 1 of a new run, never on resume")
_START = not_compared("how the run starts")
_SFT = not_compared("the SFT trainer's own settings")


@dataclass
class ModelConfig:
    #: local checkpoint dir (a real Qwen2-VL, or a tiny one: model.tiny)
    path: str = option("", resume=_MODEL)
    #: "qwen2_vl" (also 2.5-VL), "text", or "module:Class" (resolved by the app layer)
    kind: str = option("qwen2_vl", resume=_MODEL)
    #: "chat" = instruct init, "plain" = base init (the study's axis)
    template: str = option("chat", choices=PROMPT_WRAPPERS, resume=_MODEL)
    #: compute dtype; trained weights stay fp32 (grpo_core.precision); "auto": bf16 GPU, fp32 CPU
    dtype: str = option("auto", choices=DTYPES, resume=_COMPUTE)
    device: str = option("auto", resume=_HOW)              # "auto" = cuda if available else cpu
    #: recompute activations in backward (less memory)
    gradient_checkpointing: bool = option(False, resume=_HOW)
    freeze_vision: bool = option(False, resume=_PARAMS)    # keep the vision tower fixed
    #: 0 = full fine-tuning; > 0 = LoRA on the language model
    lora_rank: int = option(0, ge=0, resume=_PARAMS)
    #: LoRA scale numerator (scale = alpha / rank)
    lora_alpha: int = option(32, gt=0, resume=_PARAMS)
    #: image processor bounds (None = the checkpoint's)
    min_pixels: int | None = option(None, ge=1, resume=_PIXELS)
    #: e.g. 401408 (~400k pixels, as in the study)
    max_pixels: int | None = option(None, ge=1, resume=_PIXELS)
    #: build a tiny random Qwen2-VL at `path` if it is missing
    tiny: bool = option(False, resume=_HOW)


@dataclass
class DataConfig:
    #: "synthetic" or a path handled by grpo_core.data.load_dataset
    source: str = option("synthetic", resume=_RECORDS)
    format: str | None = option(None, resume=_RECORDS)     # dataset format name (None = detect)
    split: str | None = option(None, resume=_RECORDS)  # split to read where the format has several
    #: held-out records from here (None = a held-out slice of `source`)
    eval_source: str | None = option(None, resume=_RECORDS)
    #: split of `eval_source` to read (e.g. "test" of the same folder)
    eval_split: str | None = option(None, resume=_RECORDS)
    #: held-out records split off `source` (synthetic: generated with another seed)
    eval_size: int = option(200, ge=1, resume=_RECORDS)
    train_size: int = option(2000, ge=1, resume=_RECORDS)  # synthetic only: training items
    image_size: int = option(56, ge=28, le=1024, resume=_RECORDS)  # synthetic only: image side, px
    #: synthetic only
    synthetic_task: str = option("quadrant", choices=tuple(SYNTHETIC_TASKS), resume=_RECORDS)
    #: synthetic only: lesion std / image size
    lesion_sigma: float = option(0.036, gt=0, resume=_RECORDS)
    #: synthetic only: lesion peak brightness
    lesion_amplitude: float = option(0.5, gt=0, resume=_RECORDS)
    #: "think" | "nothink" | "direct" (grpo_core.data.templates)
    prompt: str = option("nothink", choices=TEMPLATES, resume=_PROMPTS)
    #: permute options per record (fixed per seed and record id)
    shuffle_options: bool = option(False, resume=_PROMPTS)
    skip_bad: bool = option(False, resume=_SKIP)  # skip (and count) bad rows instead of raising
    limit: int | None = option(None, ge=1, resume=_RECORDS)  # use only the first N records
    #: before training: "none" | "exists" | "open" | "decode" (every pixel: catches truncated files)
    check_images: str = option("decode", choices=IMAGE_CHECKS, resume=_CHECKS)
    #: larger images are bad rows, refused before decoding (None = PIL's limit)
    max_image_pixels: int | None = option(DEFAULT_MAX_IMAGE_PIXELS, ge=1, resume=_CHECKS)
    #: let image paths leave the dataset folder (../, absolute, symlinks)
    allow_outside_root: bool = option(False, resume=_CHECKS)
    #: hf_dataset / hf_parquet: {question: col, answer: col, image: col, options: col, ...}
    columns: dict | None = option(None, resume=_RECORDS)


@dataclass
class RolloutConfig(SamplingOptions):
    """Sampling options (max_new_tokens, temperature, top_p, top_k, min_p, max_batch_sequences:
    grpo_core.sampling.SamplingOptions) plus the batch shape of a step."""

    #: G: samples per prompt (≥ 2: the baseline is the group mean)
    group_size: int = option(8, ge=2, resume=_SAMPLING)
    #: B: prompts per optimizer step (N = B·G sequences)
    prompts_per_step: int = option(8, ge=1, resume=_SAMPLING)


@dataclass
class GRPOConfig(LossOptions):
    """The loss options (grpo_core.loss.LossOptions: agg, clip_*, beta, kl, the variants) plus
    how a step is built around the loss."""

    #: "group" | "batch" | "none" (Dr. GRPO)
    adv_scale: str = option("group", choices=SCALES, resume=OBJECTIVE)
    #: "loss" (GRPO) | "reward" (PPO-style penalty in the reward)
    kl_placement: str = option("loss", choices=KL_PLACEMENTS, resume=OBJECTIVE)
    #: optimizer steps per batch of rollouts (μ); > 1 uses old log-probs
    mu: int = option(1, ge=1, resume=OBJECTIVE)
    #: prompts (whole groups) per forward/backward; 0 = all
    micro_batch_prompts: int = option(0, ge=0, resume=_HOW)
    #: tokens (prompt + completion) per forward/backward, whole groups; 0 = no token budget
    micro_batch_tokens: int = option(0, ge=0, resume=_HOW)
    #: drop groups whose rewards are all equal (always counted)
    skip_zero_std_groups: bool = option(False, resume=OBJECTIVE)
    #: Dr. GRPO constant; None = rollout.max_new_tokens
    max_len: int | None = option(None, ge=1, resume=OBJECTIVE)
    #: {name, weight, [role], options…} each (grpo_core.rewards.REWARDS)
    rewards: list = option(default_factory=lambda: [{"name": "accuracy", "weight": 1.0},
                                                    {"name": "format", "weight": 0.5}],
                           resume=OBJECTIVE)
    #: "auto" | "copy" (frozen copy) | "adapters" (LoRA disabled)
    ref: str = option("auto", choices=REFERENCES, resume=OBJECTIVE)
    #: fused-loss backend: auto | torch | triton | cuda
    backend: str = option("auto", choices=KERNEL_BACKENDS, resume=_HOW)
    #: "mean" (GRPO) | "leave_one_out" (RLOO)
    baseline: str = option("mean", choices=BASELINES, resume=OBJECTIVE)
    #: DAPO: resample until B groups have unequal rewards
    dynamic_sampling: bool = option(False, resume=_GROUPS)
    #: DAPO: rollout rounds per step at most (then go on with fewer groups)
    dynamic_sampling_max_rounds: int = option(4, ge=1, resume=_GROUPS)
    #: DAPO: completions that hit max_new_tokens leave the loss
    mask_truncated_completions: bool = option(False, resume=OBJECTIVE)
    #: every k steps ref ← α·policy + (1 − α)·ref; 0 = never (grpo_core.ref_sync)
    ref_sync_steps: int = option(0, ge=0, resume=_REF)
    #: α of the reference sync (TR-DPO; TRL's 0.6)
    ref_sync_alpha: float = option(0.6, gt=0, le=1, resume=_REF)


@dataclass
class OptimConfig:
    lr: float = option(1e-6, gt=0, resume=_LR)             # peak learning rate (after LR warm-up)
    weight_decay: float = option(0.0, ge=0, resume=_OPT_STATE)  # AdamW decoupled weight decay
    betas: tuple = option((0.9, 0.99), ge=0, lt=1, length=2, resume=_OPT_STATE)  # AdamW (β1, β2)
    lr_warmup_steps: int = option(0, ge=0, resume=_SCHEDULE)  # linear LR warm-up (optimizer steps)
    #: "constant" | "cosine" | "linear" after warm-up (grpo_core.optim)
    schedule: str = option("constant", choices=SCHEDULES, resume=_SCHEDULE)
    #: clip the global grad norm; 0 = no clipping
    max_grad_norm: float = option(1.0, ge=0, resume=_NEXT)
    #: AdamW's moments (and a host copy of the weights) in host RAM (optim.OffloadedAdamW)
    offload_states: bool = option(False, resume=_HOW)


@dataclass
class RunConfig:
    #: GRPO steps (each: one rollout batch, μ optimizer steps)
    steps: int = option(100, ge=1, resume=_STEPS)
    seed: int = option(0, ge=0, le=2**32 - 1, resume=_SEED)  # step k's draws derive from (seed, k)
    output_dir: str = option("runs/grpo", resume=_NEXT)    # checkpoints, metrics.jsonl, plots
    #: held-out eval every N steps; 0 = only at the end
    eval_every: int = option(0, ge=0, resume=_NEXT)
    #: held-out records scored per eval (None = all of them)
    eval_limit: int | None = option(None, ge=1, resume=_NEXT)
    eval_samples: int = option(0, ge=0, resume=_NEXT)      # samples per item for pass@k; 0 = none
    save_every: int = option(0, ge=0, resume=_NEXT)  # checkpoint every N steps; 0 = only at the end
    keep_last: int = option(2, ge=0, resume=_NEXT)         # checkpoints kept (0 = all)
    #: continue from the newest good checkpoint in output_dir
    resume: bool = option(True, resume=_START)
    #: resume despite changed fixed settings; with resume=false: earlier run → previous-run-K/
    resume_force: bool = option(False, resume=_START)
    progress: bool = option(True, resume=_NEXT)            # progress bar
    #: stop early after this wall time (0 = none)
    time_budget_s: float = option(0.0, ge=0, resume=_BUDGET)
    #: rows (prompt, completion, rewards) to samples.jsonl/.html per log; 0 = none
    log_completions: int = option(4, ge=0, resume=_LOGGING)
    #: also log samples every N steps (they are always logged at each eval); 0 = only at evals
    log_completions_every: int = option(0, ge=0, resume=_LOGGING)
    #: extra metric sinks: "tensorboard", "wandb" (optional extras; grpo_core.reporting)
    report_to: list = option(default_factory=list, resume=_LOGGING)
    threads: int = option(0, ge=0, resume=_HOW)            # torch CPU threads per process; 0 = auto
    #: stop after this many steps in a row with a NaN/inf loss or gradient
    max_nonfinite_steps: int = option(3, ge=1, resume=_NEXT)
    #: dtype of the loadable policy/ copy in checkpoints and exports ("auto" = model.dtype)
    export_dtype: str = option("auto", choices=DTYPES, resume=_EXPORT)


@dataclass
class DistConfig:
    #: "none" | "ddp" (replicated model) | "fsdp2" (fully_shard; models that don't fit one GPU)
    mode: str = option("none", choices=MODES, resume=_HOW)
    #: "auto" = nccl on GPU, gloo on CPU | "nccl" | "gloo"
    backend: str = option("auto", choices=DIST_BACKENDS, resume=_HOW)
    #: collective timeout: a dead or stalled rank ends the job after this
    timeout_s: float = option(600.0, gt=0, resume=_HOW)
    #: fsdp2: free gathered params after forward (False = more memory, less comm)
    reshard_after_forward: bool = option(True, resume=_HOW)


@dataclass
class SFTConfig:
    #: "answer" (<answer>X</answer>) or "reasoning" (needs record.extra["reasoning"])
    target: str = option("answer", choices=SFT_TARGETS)
    steps: int = option(100, ge=1)                         # optimizer steps
    batch_size: int = option(16, ge=1)                     # records per step
    #: the same optimizer options as GRPO
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))


@dataclass
class WarmupConfig:
    """Format warm-up before GRPO (`grpo train`): SFT on the prompt's answer format with random option
    letters, so a model that never writes the format starts at chance instead of at zero reward."""

    #: SFT steps on random answers before GRPO; 0 = no warm-up
    steps: int = option(0, ge=0, resume=_WARMUP)
    batch_size: int = option(16, ge=1, resume=_WARMUP)     # records per warm-up step
    lr: float = option(3e-3, gt=0, resume=_WARMUP)         # warm-up learning rate (AdamW, constant)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sft: SFTConfig = option(default_factory=SFTConfig, resume=_SFT)
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
        check_loss_options(g, kl_placement=g.kl_placement, where="config", prefix="grpo.")
        check_ref_sync(g.ref_sync_steps, g.ref_sync_alpha, beta=g.beta, ref=g.ref, lora_rank=self.model.lora_rank,
                       kl_placement=g.kl_placement, where="config", prefix="grpo.")
        check_reward_entries(g.rewards)                    # names, options vs signatures, did-you-mean
        check_column_mapping(self.data.columns)            # data.columns for hf_dataset / hf_parquet
        check_device(self.model.device)                    # "gpu" → what to write instead
        check_synthetic_memory(self.data)                  # (train + eval) × image_size² × 3 bytes
        return self


DEVICE_RE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")   # model.device: the devices we run on
SYNTHETIC_MAX_BYTES = 16 * 2**30                           # synthetic images are all held in memory


def check_device(device: str) -> None:
    """``model.device`` is auto, cpu, mps, cuda or cuda:N (xpu likewise); ValueError otherwise."""
    if not DEVICE_RE.fullmatch(device):
        raise ValueError(f"config: model.device={device!r} is not a device; write auto (cuda when "
                         "available, else cpu), cpu, cuda or cuda:N (e.g. cuda:1)")


def check_synthetic_memory(d) -> None:
    """The synthetic records' images, (train_size + eval_size) × image_size² × 3 bytes, fit in
    SYNTHETIC_MAX_BYTES; ValueError with the estimate otherwise (not a MemoryError later)."""
    need = (d.train_size + d.eval_size) * d.image_size ** 2 * 3
    if d.source == "synthetic" and need > SYNTHETIC_MAX_BYTES:
        raise ValueError(f"config: the synthetic data would hold {need / 2**30:.0f} GiB of images "
                         f"((data.train_size {d.train_size} + data.eval_size {d.eval_size}) × "
                         f"{d.image_size}² × 3 bytes; at most {SYNTHETIC_MAX_BYTES // 2**30} GiB); "
                         "lower data.train_size or data.image_size")


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
            value = _yaml_switch(value, fields[key])
            setattr(obj, key, _coerce(value, hints[key], where + key))


def _yaml_switch(value, field: dataclasses.Field):
    """YAML 1.1 reads the words on / off (and yes / no) as booleans: ``compile: on`` arrives as
    True. For a field whose choices are the words "on" and "off" the word is what was meant."""
    choices = field.metadata.get("choices") or ()
    if isinstance(value, bool) and "on" in choices and "off" in choices:
        return "on" if value else "off"
    return value


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
