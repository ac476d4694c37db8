"""grpo_core: a from-scratch GRPO engine for RL fine-tuning of vision-language models on medical VQA.

The engine layer: it knows no model and no command line. Policies (grpo_models) implement the
``Policy`` protocol; the app (grpo_app) wires configs, policies and trainers into the `grpo` command.

    from grpo_core import GRPOTrainer, TrainConfig, make_synthetic_vqa
    trainer = GRPOTrainer(policy, make_synthetic_vqa(200), TrainConfig())
    trainer.train()

Modules, one concept each:
    advantages, logprobs, loss      the reference math (every fast path is tested against these)
    kernels                         fused log-prob / GRPO-loss kernels: torch, Triton, CUDA
    policy                          the Policy protocol: what the engine needs from any model
    sampling, rollout               hand-written batched sampling, G completions per prompt
    answers, rewards, eval          reading completions, reward functions, evaluation
    data                            VQA records, dataset loaders, prompt templates, synthetic task
    trainer, sft                    one GRPO step, one SFT step (and their state to checkpoint)
    harness, safeguards             the one run loop around any trainer; what keeps a run's work
    checkpoint, resume              crash-safe checkpoints; which settings may change on resume
    config, options, distributed    dataclass configs from YAML, declared options; DDP / FSDP2
"""

from .advantages import group_advantages
from .config import TrainConfig, load_config
from .data import VQARecord, build_records, load_dataset, make_prompt_fn, make_synthetic_vqa
from .eval import EvalResult, evaluate
from .kernels import fused_grpo_loss, fused_linear_grpo_loss, linear_token_logprobs, token_logprobs
from .loss import LossOptions, grpo_loss
from .policy import Encoded, Policy, Prompt
from .rewards import RewardSpec, combine_rewards, get_reward
from .rollout import Rollout, generate_groups
from .sampling import SamplingConfig
from .sft import SFTTrainer
from .trainer import GRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "EvalResult", "Encoded", "GRPOTrainer", "LossOptions", "Policy", "Prompt", "RewardSpec", "Rollout",
    "SFTTrainer",
    "SamplingConfig", "TrainConfig", "VQARecord", "build_records", "combine_rewards", "evaluate",
    "fused_grpo_loss", "fused_linear_grpo_loss", "generate_groups", "get_reward", "group_advantages",
    "grpo_loss", "linear_token_logprobs", "load_config", "load_dataset", "make_prompt_fn",
    "make_synthetic_vqa", "token_logprobs",
]
