"""Training precision: fp32 master weights, arithmetic in the compute dtype (``model.dtype``).

    what                          dtype                     why
    trainable parameters          fp32 (fp64 in tests)      AdamW moves a weight by ~lr per step
    their gradients, AdamW state  the parameters' (fp32)    DDP / FSDP2 reduce gradients in fp32
    frozen parameters             may stay in compute dtype  the reference, LoRA's base, a frozen tower
    matmuls, attention, the loss  ``model.dtype``            under torch.autocast (bf16 / fp16)
    log-probs, softmax sums       fp32                       the fused kernels accumulate in fp32

Why the weights cannot be bf16: a bf16 number has 8 significant bits, so a weight of size 0.02 sits
on a grid of spacing 2⁻¹³ ≈ 1.2e-4. An AdamW step moves it by about lr (1e-6 in GRPO runs), a
hundredth of that spacing, and the rounding puts it back where it was: measured, 1.9 % of a bf16
model's weights moved in 6 GRPO steps at lr 1e-6, against 99.9 % in fp32. In fp32 the spacing at
0.02 is 1.9e-9, so every such update survives.

So every trainer calls ``master_weights_`` before it builds its optimizer (trainable low-precision
parameters are upcast in place: a checkpoint loaded in bf16 becomes its exact fp32 copy), and
``make_optimizer`` refuses low-precision trainable parameters outright. Compute happens in
``model.dtype`` through ``autocast``; the fused loss's inputs are cast explicitly (``compute_cast``)
because it runs outside autocast's op lists. The memory this costs: docs/TRAINING.md.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = ("auto",) + tuple(COMPUTE_DTYPES)      # model.dtype ("auto": bf16 on GPU, fp32 on CPU)


class LowPrecisionTrainingError(TypeError):
    """Trainable parameters stored in bf16/fp16: their updates would round away."""


def resolve_compute_dtype(name: str, device) -> torch.dtype:
    """``model.dtype`` → the dtype matmuls run in: "auto" is bf16 on a GPU, fp32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}")
    return COMPUTE_DTYPES[name]


def resolve_export_dtype(export: str, compute: str, device) -> torch.dtype:
    """``run.export_dtype`` → the dtype of a written policy; "auto" follows ``model.dtype``."""
    return resolve_compute_dtype(compute if export == "auto" else export, device)


def low_precision_trainable(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters stored in bf16/fp16."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in LOW_PRECISION]


def master_weights_(model: torch.nn.Module) -> int:
    """Upcast every trainable bf16/fp16 parameter to fp32 in place (``p.data``: the Parameter object,
    and so weight tying and any module holding it, stays the same). Buffers and frozen parameters
    are left as they are. Returns the number of parameters upcast."""
    n = 0
    for p in model.parameters():                 # each shared (tied) parameter once
        if p.requires_grad and p.dtype in LOW_PRECISION:
            p.data = p.data.float()
            n += 1
    return n


def check_master_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse trainable bf16/fp16 parameters (see the module docstring)."""
    bad = low_precision_trainable(model)
    if bad:
        dt = dict(model.named_parameters())[bad[0]].dtype
        raise LowPrecisionTrainingError(
            f"{where}: {len(bad)} trainable parameters are stored in {dt} ({', '.join(bad[:3])}, ...): "
            "an AdamW update of ~lr rounds away in a 16-bit weight (at lr 1e-6 almost none would move). "
            "Keep trainable weights in fp32: call grpo_core.precision.master_weights_(model) first "
            "(the trainers do), and choose the compute dtype with model.dtype=bfloat16")


MATMUL_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def store_for_compute_(model: torch.nn.Module, dtype: torch.dtype, like: torch.nn.Module) -> None:
    """Store a frozen copy of ``like`` (the policy, after ``master_weights_``): its matmul weights
    (Linear / Conv weights and biases) in ``dtype``, every other parameter (embeddings, norms) in
    the dtype ``like`` holds it in (fp32 where the policy trains it); buffers untouched.

    Autocast casts exactly these to ``dtype`` at every use, and an fp32 → bf16 cast is the same
    rounding whenever it happens: so the frozen copy computes bit for bit what the fp32 policy
    computed under autocast when it was copied (the reference's KL to the policy is exactly 0 at
    the first step), at about half the memory. Storing everything in bf16 would not: a bf16
    embedding makes the residual stream bf16 where the policy's is fp32 (measured: KL 5.7e-5 at
    step 1 on the 2B-shaped model). A weight tied to an embedding (Qwen2-VL-2B's lm_head) is not
    a matmul-only weight and keeps the policy's dtype."""
    owners: dict[int, set] = {}                  # a tied lm_head is also the embedding: not only matmul
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(isinstance(m, MATMUL_MODULES))
    matmul = {i for i, kinds in owners.items() if kinds == {True}}
    target = dict(like.named_parameters())
    for name, p in model.named_parameters():
        want = dtype if id(p) in matmul else target[name].dtype
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


def uses_autocast(dtype: torch.dtype) -> bool:
    return dtype in LOW_PRECISION


def autocast(device, dtype: torch.dtype):
    """A context computing in ``dtype``: torch.autocast for bf16/fp16 (on CPU too), else nothing
    (fp32/fp64 weights compute in their own dtype)."""
    if not uses_autocast(dtype):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def compute_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the compute dtype where that is bf16/fp16 (differentiable: gradients flow back to the
    fp32 master), unchanged otherwise."""
    return t.to(dtype) if uses_autocast(dtype) and t.dtype != dtype else t


def check_trainable_compute(dtype: torch.dtype, where: str) -> None:
    """fp16 training needs loss scaling (its exponent range underflows small gradients); not built."""
    if dtype == torch.float16:
        raise ValueError(f"{where}: model.dtype=float16 cannot train here: fp16 gradients underflow without "
                         "loss scaling, which grpo_core does not implement. Use model.dtype=bfloat16 "
                         "(Ampere or newer) or float32; float16 is fine for eval and rollout only")
