"""Group-relative advantages: the "GR" of GRPO.

For N = B·G rewards laid out as B consecutive groups of G samples of the same prompt:

    A_i = (r_i − mean_g(r)) / (s + eps)

with s chosen by ``scale``:
  - "group": the std of the sample's own group (GRPO, DeepSeekMath).
  - "batch": the std of all N rewards (a more robust variant; TRL's scale_rewards="batch").
  - "none":  s = 1 and eps = 0, i.e. A_i = r_i − mean_g(r)  (Dr. GRPO: std scaling biases
             updates toward groups whose rewards barely differ).

Deviations / choices, stated once:
  - The std is the *unbiased* one (divide by G − 1), as ``torch.std`` computes it. That is what
    TRL's GRPOTrainer uses; verl's GRPO also uses ``torch.std``. A group of size 1 has no spread:
    its advantage is 0 (its std is treated as 0, not NaN).
  - eps is added to the std (not under a square root), as in TRL: A = (r − μ) / (σ + eps).
  - A group whose rewards are all equal gets exactly zero advantages (numerator is 0), never NaN.
"""

import torch

SCALES = ("group", "batch", "none")


def check_rewards(rewards: torch.Tensor, group_size: int) -> None:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"group_advantages: rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_advantages: group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards is not a multiple of group_size={group_size}; "
            "rewards must hold whole groups laid out consecutively (B·G,)"
        )
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()[:8]
        raise ValueError(f"group_advantages: rewards contain NaN/inf at indices {bad}; fix the reward functions")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """rewards (N,) with N = B·G in consecutive groups → advantages (N,) fp32."""
    check_rewards(rewards, group_size)
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    # fp64 inside: an fp32 mean of equal values can be an ulp off, which 1/eps would magnify
    r = rewards.double().view(-1, group_size)                     # (B, G)
    centered = r - r.mean(dim=1, keepdim=True)                     # (B, G)
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centered = centered.masked_fill(flat, 0.0)                     # equal rewards → exactly 0
    if scale == "none":
        return centered.view(-1).float()
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])  # (B, 1)
    else:
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)  # ()
    return (centered / (std + eps)).view(-1).float()               # (N,) fp32


def group_reward_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group unbiased std (B,), for the 'zero-variance groups' metric and group filtering."""
    check_rewards(rewards, group_size)
    r = rewards.float().view(-1, group_size)
    return r.std(dim=1) if group_size > 1 else torch.zeros(r.shape[0], device=r.device)
