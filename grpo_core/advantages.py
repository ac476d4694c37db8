"""Group-relative advantages: the "GR" of GRPO.

For N = B·G rewards laid out as B consecutive groups of G samples of the same prompt:

    A_i = (r_i − b_i) / (s + eps)

with the baseline b_i chosen by ``baseline``:
  - "mean":          b_i = mean of the G rewards of i's group (GRPO).
  - "leave_one_out": b_i = mean of the OTHER G − 1 rewards (RLOO, Kool et al. 2019; Ahmadian et
                     al. 2024): r_i − b_i = G/(G − 1) · (r_i − mean), so it is the GRPO numerator
                     scaled by G/(G − 1) (needs G ≥ 2),
and s chosen by ``scale``:
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
  - ``scale`` divides the numerator of either baseline by the same std (TRL's RLOO with
    normalised advantages); "none" keeps the raw r_i − b_i.

DAPO dynamic sampling (Yu et al. 2025) keeps only *informative* groups, those whose rewards are not
all equal (``informative_groups``); ``DynamicSampling`` is the bookkeeping of its refill loop.
"""

import torch

SCALES = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")      # GRPO | RLOO


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
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, baseline: str = "mean"
) -> torch.Tensor:
    """rewards (N,) with N = B·G in consecutive groups → advantages (N,) fp32."""
    check_rewards(rewards, group_size)
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    if baseline not in BASELINES:
        raise ValueError(f"group_advantages: baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("group_advantages: baseline='leave_one_out' needs group_size >= 2 "
                         "(the baseline is the mean of the other G - 1 samples)")
    # fp64 inside: an fp32 mean of equal values can be an ulp off, which 1/eps would magnify
    r = rewards.double().view(-1, group_size)                     # (B, G)
    if baseline == "mean":
        centered = r - r.mean(dim=1, keepdim=True)                 # (B, G)
    else:                                                          # b_i = (Σ_g r − r_i) / (G − 1)
        centered = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
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


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: True where a group's G rewards are not all equal (DAPO keeps only these).

    Exact equality, the same test that gives equal-reward groups exactly zero advantage.
    """
    check_rewards(rewards, group_size)
    r = rewards.view(-1, group_size)                               # (B, G)
    return r.amax(dim=1) != r.amin(dim=1)


class DynamicSampling:
    """DAPO's refill loop, as bookkeeping: the trainer samples, this decides what to keep.

        ds = DynamicSampling(B, G, max_rounds)
        while ds.wants_more():
            records = draw ds.prompts_per_round prompts; roll out; score → rewards (B·G,)
            keep = ds.add(rewards)        # group indices of this round to keep (≤ what is missing)
        ds.metrics()                       # prompts drawn, rounds, groups kept, short-by

    Each round draws a full batch of B prompts (as verl does), keeps its informative groups in
    order until B are collected, and drops the rest. After ``max_rounds`` rounds the step goes on
    with what it has (possibly fewer than B groups; ``metrics()["dynamic_sampling/short"]`` says
    by how many) instead of sampling forever on a batch of prompts that are all too easy or too hard.
    """

    def __init__(self, batch_prompts: int, group_size: int, max_rounds: int):
        if batch_prompts < 1 or group_size < 1 or max_rounds < 1:
            raise ValueError(f"DynamicSampling: batch_prompts, group_size, max_rounds must be >= 1, got "
                             f"{batch_prompts}, {group_size}, {max_rounds}")
        self.want, self.group_size, self.max_rounds = batch_prompts, group_size, max_rounds
        self.prompts_per_round = batch_prompts
        self.rounds = self.kept = self.drawn = 0

    def wants_more(self) -> bool:
        return self.kept < self.want and self.rounds < self.max_rounds

    def add(self, rewards: torch.Tensor) -> list[int]:
        """Rewards (k·G,) of one round's k prompts → indices (into those k) of the groups to keep."""
        if not self.wants_more():
            raise ValueError("DynamicSampling.add: the batch is already full or max_rounds is spent; "
                             "check wants_more() before sampling another round")
        ok = informative_groups(rewards, self.group_size)             # (k,)
        keep = ok.nonzero().flatten().tolist()[: self.want - self.kept]
        self.rounds += 1
        self.drawn += int(ok.numel())
        self.kept += len(keep)
        return keep

    def metrics(self) -> dict:
        return {"dynamic_sampling/prompts_drawn": self.drawn, "dynamic_sampling/rounds": self.rounds,
                "dynamic_sampling/groups_kept": self.kept, "dynamic_sampling/short": self.want - self.kept}
