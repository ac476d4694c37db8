"""Optimizer and learning-rate schedule, shared by the GRPO and SFT trainers.

    AdamW over the trainable parameters; LR = base · factor(k), k = optimizer steps taken:
      k < warmup:  factor = (k + 1) / warmup                            linear warm-up
      after:       constant 1 | cosine ½(1 + cos(π·f)) | linear 1 − f,  f = (k − warmup) / (total − warmup)

``total`` is fixed when the schedule is built (run.steps · μ for GRPO): raising run.steps on a
resume rebuilds it with the new total, so a decaying schedule stretches from that step on (the
steps already taken keep the LRs they had).
"""

from __future__ import annotations

import math

import torch

from .precision import check_master_weights

SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(model: torch.nn.Module, lr, weight_decay, betas=(0.9, 0.99),
                   offload: bool = False):
    """AdamW over the trainable parameters, which must be fp32/fp64 master weights: a 16-bit weight
    loses updates of ~lr to rounding (grpo_core.precision), so it is refused here, whoever calls.
    ``offload``: AdamW's states in host RAM (OffloadedAdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no trainable parameters (all frozen?)")
    check_master_weights(model, "make_optimizer")
    cls = OffloadedAdamW if offload else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))


class OffloadedAdamW(torch.optim.AdamW):
    """AdamW whose moments (and an fp32 copy of each parameter) live in host RAM; the step runs on
    the CPU and copies the new values back into the device parameters.

    GPU memory per trainable parameter: weight + gradient only (AdamW's 8 B of fp32 moments move to
    the host); cost: one device→host copy of the gradients and one host→device copy of the weights
    per step, and the update at CPU speed. Same math as ``torch.optim.AdamW`` (single-tensor path,
    amsgrad/maximize off), step by step:
        p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
    Parameters that are DTensors (FSDP2 shards) are updated on their local shard. State dicts have
    AdamW's layout (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints move between the two.
    """

    def __init__(self, params, **kw):
        super().__init__(params, foreach=False, **kw)
        self._shadow: dict = {}                   # param → its fp32 host copy (not in state dicts)

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.to_local() if hasattr(p, "to_local") else p

    @staticmethod
    def _dtype(p: torch.Tensor) -> torch.dtype:
        """Host dtype of the copy and moments: fp32, or the parameter's when wider (fp64)."""
        return torch.promote_types(p.dtype, torch.float32)

    def _host_state(self, p: torch.Tensor) -> dict:
        st, dt = self.state[p], self._dtype(p)
        if not st:
            z = torch.zeros(self._local(p).shape, dtype=dt, device="cpu")
            st.update(step=torch.tensor(0.0), exp_avg=z, exp_avg_sq=z.clone())
        if p not in self._shadow:
            self._shadow[p] = self._local(p).detach().to("cpu", dt, copy=True)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._host_state(p)
                g = self._local(p.grad).to("cpu", self._dtype(p))
                w, m, v = self._shadow[p], st["exp_avg"], st["exp_avg_sq"]
                st["step"] += 1
                t = float(st["step"])
                w.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                self._local(p).copy_(w)
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)       # (moves the moments to each parameter's device)
        for p, st in self.state.items():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = self._local(st[k]).to("cpu", self._dtype(p))
            if "step" in st:
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32, device="cpu")
        self._shadow.clear()                      # re-copied from the (restored) parameters


def lr_factor(k: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """The multiplier of the base LR at optimizer step k (see module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")
    if k < warmup_steps:
        return (k + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    frac = min((k - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else max(0.0, 1 - frac)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, schedule: str = "constant"):
    """Linear warm-up to the base LR, then constant / cosine / linear decay to 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, warmup_steps, total_steps, schedule))
