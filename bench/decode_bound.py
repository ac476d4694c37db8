"""The physical bound of one shared-prefix decode step: the least it must read and compute.

One decode step of N = B·G rows (B prompts of P stored tokens, G samples each, t completion
tokens attended per row, the new one included) must at least

    read    W_layers + W_norm + W_head                      every weight the step uses, once
            + layers · B · P · 2 · kvh · d · e_kv           the prompt K/V, once per prompt (shared)
            + layers · N · t · 2 · kvh · d · e_kv           each row's own completion K/V
            + N · H · e_emb                                 the N embedding rows gathered
            + 2 · N · V · 4                                 the fp32 logits, written and read once
    compute 2 · N · (Σ_layers |W_linear| + |W_head|)        the projections and the lm_head
            + layers · 4 · N · nh · d · (P + t)             q·Kᵀ and p·V over prompt + own columns

    bound_s = max(bytes / bandwidth, FLOPs / matmul rate)   whichever resource runs out first

Left out (each ≪ the terms above at real sizes): activations in and out of every op, the new
K/V written, the softmax / norm / activation arithmetic, the sampler's passes over the logits
beyond one read (the rollout bench's time per forward includes the sampler). The prompt counts
its left padding (the step reads the padded block). A rollout's steps attend to t = 1 … new − 1 own
columns; ``t = new / 2`` gives the mean of the bytes and of the FLOPs (both are linear in t).
The FLOP count equals what ``torch.utils.flop_counter`` counts for an eager step
(tests/test_decode_bound.py), the K/V bytes equal the prefill cache's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCost:
    bytes: float        # memory read per decode step (B)
    flops: float        # matmul FLOPs per decode step

    def bound_s(self, bandwidth: float | None, matmul_rate: float | None) -> float | None:
        """Seconds per step at the roofline: the larger of the two; None if neither is known."""
        times = [x / r for x, r in ((self.bytes, bandwidth), (self.flops, matmul_rate)) if r]
        return max(times) if times else None


def _linear_numel(module: torch.nn.Module) -> int:
    """Weights that are read as GEMM operands (nn.Linear, LoRA's included), in ``module``."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def decode_step_cost(lm, head_weight: torch.Tensor, prompts: int, group_size: int,
                     prompt_len: int, own: float) -> StepCost:
    """``lm``: a Qwen2-VL text model (its decoder layers, norm, embedding); ``head_weight`` (V, H);
    ``own``: completion columns attended per row (may be fractional: a mean over steps)."""
    cfg = lm.config
    n = prompts * group_size
    layers, nh, kvh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    d = lm.layers[0].self_attn.head_dim
    kv_e = lm.layers[0].self_attn.k_proj.weight.element_size()         # the cache's dtype
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    weights = nbytes(lm.layers.parameters()) + nbytes(lm.norm.parameters()) + nbytes([head_weight])
    kv = layers * 2 * kvh * d * kv_e * (prompts * prompt_len + n * own)
    emb = n * cfg.hidden_size * lm.embed_tokens.weight.element_size()
    logits = 2 * n * head_weight.shape[0] * 4
    gemm = 2 * n * (_linear_numel(lm.layers) + head_weight.numel())
    attention = layers * 4 * n * nh * d * (prompt_len + own)
    return StepCost(bytes=weights + kv + emb + logits, flops=gemm + attention)

