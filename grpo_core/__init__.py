"""grpo_core: a from-scratch GRPO engine for RL fine-tuning of vision-language models on medical VQA.

Modules, one concept each: advantages, logprobs, loss (the reference math); kernels (fused
Triton / CUDA / chunked-torch paths); policy (protocol); sampling, rollout; data, rewards, eval;
trainer, sft, config, checkpoint, cli.
"""

__version__ = "0.1.0"
