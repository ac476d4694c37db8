"""Reference-model sync: every k steps, ref ← α·policy + (1 − α)·ref (TR-DPO, Gorbatovski et al. 2024).

The KL term holds the policy near π_ref. A reference that never moves holds it near the initial
model forever; a synced one lets it drift at a controlled pace: α = 1 copies the policy (a hard
reset of the anchor), α < 1 is an exponential moving average of the policy seen every k steps.
TRL calls these ``ref_model_mixup_alpha`` (0.6) and ``ref_model_sync_steps`` (512).

    if cfg.grpo.ref_sync_steps and step % cfg.grpo.ref_sync_steps == 0:   # after the optimizer step
        sync_reference_(ref_policy.model, policy.model, cfg.grpo.ref_sync_alpha)

What the reference is decides whether the sync means anything:
  - a frozen copy (grpo.ref="copy"): the mix is done parameter by parameter, in place, under
    no_grad (``torch.lerp``), exactly the formula above.
  - the policy with its LoRA adapters disabled (grpo.ref="adapters"): refused. That reference IS
    the base weights the adapters train on top of; moving it would move the policy too.
  - a frozen copy of a LoRA policy: α = 1 is exact (every factor copied, so B·A is copied);
    α < 1 is refused, because mixing the factors A and B separately does not mix the weights
    B·A (αB₁ + (1 − α)B₂)(αA₁ + (1 − α)A₂) ≠ αB₁A₁ + (1 − α)B₂A₂.
Buffers (rotary tables, norms' running stats) are not parameters and are left as they are.
"""

from __future__ import annotations

import torch

_LORA_MARK = "lora_"     # peft's parameter names: ...lora_A.default.weight, ...lora_B.default.weight


def check_ref_sync(ref_sync_steps: int, ref_sync_alpha: float, *, beta: float, ref: str, lora_rank: int,
                   kl_placement: str = "loss", where: str = "config", prefix: str = "grpo.") -> None:
    """Config-time rules of the sync (ValueError naming the key): called from TrainConfig.validate."""
    if ref_sync_steps == 0:
        return
    if not 0.0 < ref_sync_alpha <= 1.0:
        raise ValueError(f"{where}: {prefix}ref_sync_alpha={ref_sync_alpha!r} must be in (0, 1]")
    if beta == 0:
        raise ValueError(f"{where}: {prefix}ref_sync_steps={ref_sync_steps} syncs the reference model, but "
                         f"{prefix}beta=0 builds none; set {prefix}beta > 0 or {prefix}ref_sync_steps=0")
    mode = ref if ref != "auto" else ("adapters" if lora_rank > 0 else "copy")
    if mode == "adapters":
        raise ValueError(f"{where}: {prefix}ref_sync_steps={ref_sync_steps} with the reference = the policy with "
                         "its LoRA adapters disabled (grpo.ref='adapters', or 'auto' with model.lora_rank > 0): "
                         "that reference is the base the adapters train on, so syncing it would move the policy "
                         f"too. Use {prefix}ref='copy' (a frozen copy to sync) or {prefix}ref_sync_steps=0")
    if lora_rank > 0 and ref_sync_alpha != 1.0:
        raise ValueError(f"{where}: {prefix}ref_sync_alpha={ref_sync_alpha} with LoRA (model.lora_rank={lora_rank}): "
                         "mixing the factors A and B does not mix the weights B·A; use "
                         f"{prefix}ref_sync_alpha=1.0 (copy the policy into the reference) or full fine-tuning")


@torch.no_grad()
def sync_reference_(ref_model: torch.nn.Module, policy_model: torch.nn.Module, alpha: float) -> None:
    """In place: every parameter p_ref ← α·p_policy + (1 − α)·p_ref. Same parameter names and shapes.

    ``ref_model`` must be a separate module (a frozen copy), not the string "adapters" nor the
    policy itself; see the module docstring for the LoRA rules.
    """
    if isinstance(ref_model, str) or ref_model is policy_model:
        raise ValueError("sync_reference_: the reference is the policy itself (with its adapters disabled); there is "
                         "no separate copy to sync. Use grpo.ref='copy' for a reference that can be synced")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"sync_reference_: alpha must be in (0, 1], got {alpha!r}")
    ref_params = dict(ref_model.named_parameters())
    pol_params = dict(policy_model.named_parameters())
    if ref_params.keys() != pol_params.keys():
        only_ref = sorted(ref_params.keys() - pol_params.keys())[:3]
        only_pol = sorted(pol_params.keys() - ref_params.keys())[:3]
        raise ValueError(f"sync_reference_: reference and policy parameters differ (only in reference: {only_ref}, "
                         f"only in policy: {only_pol}); the reference must be a copy of the policy")
    if alpha != 1.0 and any(_LORA_MARK in n for n in pol_params):
        raise ValueError("sync_reference_: alpha < 1 on a LoRA model mixes the factors A and B separately, which "
                         "does not mix the weights B·A; use alpha=1.0 (an exact copy) or full fine-tuning")
    for name, p_ref in ref_params.items():
        p_pol = pol_params[name]
        if p_ref.shape != p_pol.shape:
            raise ValueError(f"sync_reference_: parameter {name!r} is {tuple(p_ref.shape)} in the reference and "
                             f"{tuple(p_pol.shape)} in the policy")
        if alpha == 1.0:
            p_ref.copy_(p_pol)
        else:
            p_ref.lerp_(p_pol.to(p_ref.dtype), alpha)        # p_ref + α (p_pol − p_ref)
