"""Checkpoints: a transformers-loadable policy plus the trainer state needed to resume exactly.

Layout of one checkpoint (written as ``ckpt-000120.tmp`` then renamed, so a crash mid-write
leaves the previous checkpoint intact and the half-written one is ignored):

    ckpt-000120/
      policy/               policy.save_pretrained(...): safetensors, config, tokenizer, processor
      weights.safetensors   policy.model.state_dict() exactly as trained (resume reads this one)
      trainer_state.pt      optimizer, scheduler, step, data position, config — tensors and plain
                            Python only, loaded with torch.load(weights_only=True)

Resume needs no RNG state: every random choice of step k (prompt order, sampling, micro-batch
shuffle) is drawn from generators seeded by (run seed, k), so step k after a resume draws the
same numbers as step k of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^ckpt-(\d+)$")


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoints in ``output_dir``, oldest first (``*.tmp`` leftovers are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir) if (m := _NAME.match(d))]
    return [os.path.join(output_dir, d) for _, d in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def _state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): keep one name per storage, the
    # loader restores the tie through load_state_dict(strict=False) + the tie check below.
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(output_dir: str, step: int, policy, optimizer, scheduler, state: dict, keep_last: int = 2) -> str:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    policy.save_pretrained(os.path.join(tmp, "policy"))
    save_file(_state_dict_for_save(policy.model), os.path.join(tmp, "weights.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
         "step": step, **state},
        os.path.join(tmp, "trainer_state.pt"),
    )
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears whole or not at all
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, policy, optimizer=None, scheduler=None) -> dict:
    """Restore weights (and optimizer/scheduler when given) from ``path``; return the trainer state."""
    weights = os.path.join(path, "weights.safetensors")
    state_path = os.path.join(path, "trainer_state.pt")
    for f in (weights, state_path):
        if not os.path.exists(f):
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {os.path.basename(f)} is missing")
    sd = load_file(weights, device=str(next(policy.model.parameters()).device))
    missing, unexpected = policy.model.load_state_dict(sd, strict=False)
    tied = {n for n, _ in policy.model.named_parameters(remove_duplicate=False)} - set(sd)
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = torch.load(state_path, map_location="cpu", weights_only=True)  # never unpickle code
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
