"""Checkpoints: a transformers-loadable policy plus the trainer state needed to resume exactly.

Layout of one checkpoint (written as ``ckpt-000120.tmp`` then renamed, so a crash mid-write
leaves the previous checkpoint intact and the half-written one is ignored):

    ckpt-000120/
      policy/               policy.save_pretrained(...): safetensors, config, tokenizer, processor
      weights.safetensors   policy.model.state_dict() exactly as trained (resume reads this one)
      trainer_state.pt      optimizer, scheduler, step, data position, config — tensors and plain
                            Python only, loaded with torch.load(weights_only=True)

Distributed runs (grpo_core.distributed): rank 0 alone writes this same layout. Under FSDP2 the
full model state is gathered to rank 0 first (``model_state``) and the optimizer state is stored
by parameter name (``optimizer_format: "fqn"``, torch.distributed.checkpoint.state_dict); on resume
every rank reads the full files and FSDP2 re-shards them, so a checkpoint resumes on any number of
ranks. Checkpoints of single-process / DDP runs hold ``optimizer.state_dict()`` (``"ids"``).

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


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"ckpt-{step:06d}")


def _state_dict_for_save(model: torch.nn.Module, sd: dict | None = None) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): keep one name per storage, the
    # loader restores the tie through load_state_dict(strict=False) + the tie check below.
    seen, out = set(), {}
    for name, t in (model.state_dict() if sd is None else sd).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(output_dir: str, step: int, policy, optimizer, scheduler, state: dict, keep_last: int = 2,
                    *, model_state: dict | None = None, optim_state: dict | None = None) -> str:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``.

    ``model_state`` / ``optim_state``: full state dicts gathered from a sharded model (FSDP2, on
    rank 0) to write instead of ``policy.model.state_dict()`` / ``optimizer.state_dict()``.
    """
    os.makedirs(output_dir, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = _state_dict_for_save(policy.model, model_state)
    if model_state is None:
        policy.save_pretrained(os.path.join(tmp, "policy"))
    else:
        _save_policy_from_state(policy, os.path.join(tmp, "policy"), weights)
    save_file(weights, os.path.join(tmp, "weights.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict() if optim_state is None else optim_state,
         "optimizer_format": "ids" if optim_state is None else "fqn",
         "scheduler": scheduler.state_dict() if scheduler else None, "step": step, **state},
        os.path.join(tmp, "trainer_state.pt"),
    )
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears whole or not at all
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_policy_from_state(policy, path: str, weights: dict) -> None:
    """``policy.save_pretrained`` for a sharded model: the HF module writes the gathered weights."""
    os.makedirs(path, exist_ok=True)
    policy.model.save_pretrained(path, state_dict=weights)
    for part in ("tokenizer", "image_processor"):
        if getattr(policy, part, None) is not None:
            getattr(policy, part).save_pretrained(path)


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def load_checkpoint(path: str, policy, optimizer=None, scheduler=None) -> dict:
    """Restore weights (and optimizer/scheduler when given) from ``path``; return the trainer state."""
    weights = os.path.join(path, "weights.safetensors")
    state_path = os.path.join(path, "trainer_state.pt")
    for f in (weights, state_path):
        if not os.path.exists(f):
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {os.path.basename(f)} is missing")
    sharded = _is_sharded(policy.model)
    sd = load_file(weights, device="cpu" if sharded else str(next(policy.model.parameters()).device))
    tied = {n for n, _ in policy.model.named_parameters(remove_duplicate=False)} - set(sd)
    if sharded:                               # FSDP2: every rank reads the full file, keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = set_model_state_dict(policy.model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        missing, unexpected = policy.model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = torch.load(state_path, map_location="cpu", weights_only=True)  # never unpickle code
    if optimizer is not None:
        _load_optimizer(path, policy.model, optimizer, state, sharded)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def _load_optimizer(path, model, optimizer, state, sharded: bool) -> None:
    if state.get("optimizer_format", "ids") == "fqn":      # written from FSDP2: keyed by parameter name
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    elif sharded:
        raise RuntimeError(f"checkpoint {path} holds a single-process optimizer state, which cannot be sharded "
                           "for dist.mode=fsdp2; resume it with dist.mode=ddp/none, or start a new run from "
                           f"its weights (model.path={os.path.join(path, 'policy')})")
    else:
        optimizer.load_state_dict(state["optimizer"])
