"""Checkpoints: a transformers-loadable policy plus the trainer state needed to resume exactly.

Layout of one checkpoint::

    ckpt-000120/
      policy/               policy.save_pretrained(...): safetensors, config, tokenizer, processor
      weights.safetensors   policy.model.state_dict() exactly as trained (resume reads this one)
      trainer_state.pt      optimizer, scheduler, step, data position — tensors and plain Python
                            only, loaded with torch.load(weights_only=True)
      run_config.json       the resolved config of the run (grpo_core.resume compares it on resume)
      reference.safetensors only when the reference model is synced during the run (grpo.ref_sync_steps):
                            a frozen initial reference is rebuilt from model.path instead
      manifest.json         written last: {"format", "step", "files": {relpath: {"bytes", "sha256"}}}

A directory ``ckpt-N`` is *complete* when its manifest parses and every file it lists is there with
the listed size (cheap: no reading); it *verifies* when moreover every sha256 matches and every
floating tensor of ``weights.safetensors`` is finite. Resume uses only verified checkpoints.

Saving is write → fsync → swap, so that at every instant a complete copy of the newest saved step
exists under a name recovery knows (never "delete the old, then rename the new"):

    1. write everything into ``ckpt-N.tmp``; hash and fsync each file; write manifest.json last
    2. ``ckpt-N`` absent (a new step):  rename ckpt-N.tmp → ckpt-N
       ``ckpt-N`` present (a re-save):  rename ckpt-N → ckpt-N.old, ckpt-N.tmp → ckpt-N, delete .old
    3. prune to ``keep_last``: rename each old checkpoint to ``ckpt-M.del``, then delete it

    killed during     what is on disk                          next start (recover_leftovers)
    1                 previous ckpts whole, partial .tmp       .tmp deleted
    2 (re-save)       ckpt-N.old and ckpt-N.tmp, both whole     .tmp promoted to ckpt-N, .old deleted
    after 2           ckpt-N whole (+ .old)                     .old deleted
    3                 ckpt-N whole, a half-deleted .del         .del deleted (never a half ckpt-M)
    (old code)        ckpt-N half deleted, whole copy in .tmp   .tmp put back (unsealed: --seal it)

Each rename is atomic on POSIX and the directory is fsynced after it, so the sequence survives a
power cut too. ``grpo_core.resume.find_resumable_checkpoint`` recovers, then walks newest first,
reports each checkpoint that fails verification by path and file, and falls back to the previous one.

Distributed runs (grpo_core.distributed): rank 0 alone writes this same layout (and alone calls
``recover_leftovers`` / ``resume.find_resumable_checkpoint``: they rename and delete). Under FSDP2 the
full model state is gathered to rank 0 first (``model_state``) and the optimizer state is stored by
parameter name (``optimizer_format: "fqn"``); on resume every rank reads the full files and FSDP2
re-shards them, so a checkpoint resumes on any number of ranks. Checkpoints of single-process /
DDP runs hold ``optimizer.state_dict()`` (``"ids"``).

Resume needs no RNG state: every random choice of step k (prompt order, sampling, micro-batch
shuffle) is drawn from generators seeded by (run seed, k), so step k after a resume draws the
same numbers as step k of an uninterrupted run.

Cost: the checksums read every file once more at save and at resume (sha256 runs at ~1-2 GB/s);
that is the price of telling a damaged checkpoint from a good one before training on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.json"
REFERENCE = "reference.safetensors"
FORMAT = 1
REQUIRED = ("weights.safetensors", "trainer_state.pt", "policy/config.json")   # listed in every manifest
_NAME = re.compile(r"^ckpt-(\d+)$")
_LEFTOVER = re.compile(r"^ckpt-(\d+)\.(tmp|old|del)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; ``path`` (the checkpoint) and ``file`` (inside it) say where."""

    def __init__(self, message: str, path: str | None = None, file: str | None = None):
        self.path, self.file = path, file
        where = f"checkpoint {path}" + (f", file {file}" if file else "") + ": " if path else ""
        super().__init__(where + message)


# ---- names ------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[str]:
    """``ckpt-N`` directories in ``output_dir``, oldest first (``*.tmp/.old/.del`` leftovers excluded)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir) if (m := _NAME.match(d))]
    return [os.path.join(output_dir, d) for _, d in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"ckpt-{step:06d}")


def checkpoint_step(path: str) -> int:
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise ValueError(f"{path} is not named like a checkpoint (ckpt-NNNNNN)")
    return int(m.group(1))


# ---- durable files and the manifest -----------------------------------------------------------
def _fsync_dir(path: str) -> None:
    """Make renames/creations inside ``path`` durable (a no-op where the OS cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _digest(path: str, sync: bool = False) -> dict:
    """{"bytes", "sha256"} of one file; ``sync``: fsync it to disk on the way (one read for both)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            n += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"bytes": n, "sha256": h.hexdigest()}


def _files_under(root: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/") for f in files]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(path: str, step: int) -> dict:
    """Hash and fsync every file under ``path``, then write manifest.json (last) and fsync it."""
    files = {rel: _digest(os.path.join(path, rel), sync=True) for rel in _files_under(path)}
    missing = [f for f in REQUIRED if f not in files]
    if missing:
        raise CheckpointError(f"cannot seal: {missing} missing", path)
    manifest = {"format": FORMAT, "step": int(step), "files": files}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in {os.path.dirname(os.path.join(path, rel)) for rel in files} | {path}:
        _fsync_dir(d)
    return manifest


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint ``path``, with every listed file present at its listed size."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError("manifest.json is missing: the save was interrupted, or an older "
                              "grpo_core wrote it (if it loads, seal it: `grpo resume-plan --seal "
                              "PATH`)", path, MANIFEST)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        sizes = {rel: int(meta["bytes"]) for rel, meta in manifest["files"].items() if str(meta["sha256"])}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"unreadable manifest ({type(e).__name__}: {e})", path, MANIFEST) from None
    if manifest.get("format", 0) > FORMAT:
        raise CheckpointError(f"format {manifest['format']} is newer than this grpo_core reads ({FORMAT})",
                              path, MANIFEST)
    for rel in REQUIRED:
        if rel not in sizes:
            raise CheckpointError("not listed in the manifest", path, rel)
    for rel, size in sizes.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError("missing", path, rel)
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{os.path.getsize(full)} bytes, the manifest says {size} "
                                  "(truncated or overwritten)", path, rel)
    return manifest


def _is_complete(path: str) -> bool:
    try:
        read_manifest(path)
        return True
    except CheckpointError:
        return False


def first_nonfinite(tensors: dict) -> str | None:
    """Name and count of the first floating tensor holding NaN or ±inf, else None. One pass per
    tensor: NaN and ±inf make the fp64 sum non-finite (a sum of finite weights cannot overflow fp64)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
            bad = int((~torch.isfinite(t)).sum())
            return f"tensor {name!r} ({bad} of {t.numel()} values are NaN/inf)"
    return None


@contextmanager
def reading(path: str, file: str):
    """Any error while reading ``file`` of checkpoint ``path`` becomes a CheckpointError naming both."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot be read ({type(e).__name__}: {e})", path, file) from e


def verify_checkpoint(path: str, checksums: bool = True, finite: bool = True) -> dict:
    """Raise CheckpointError (naming the file) unless ``path`` is complete, every sha256 matches and
    the weights are finite; return the manifest."""
    manifest = read_manifest(path)
    if _NAME.match(os.path.basename(os.path.normpath(path))) and manifest.get("step") != checkpoint_step(path):
        raise CheckpointError(f"holds step {manifest.get('step')} but is named for step {checkpoint_step(path)}",
                              path, MANIFEST)
    if checksums:
        for rel, meta in manifest["files"].items():
            if _digest(os.path.join(path, rel))["sha256"] != meta["sha256"]:
                raise CheckpointError("sha256 differs from the manifest: the file changed after it was "
                                      "written (disk or copy damage)", path, rel)
    if finite:
        weights = os.path.join(path, "weights.safetensors")
        with reading(path, "weights.safetensors"), safe_open(weights, "pt") as f:   # one by one
            bad = next((b for k in f.keys() if (b := first_nonfinite({k: f.get_tensor(k)}))), None)
        if bad:
            raise CheckpointError(f"{bad}: the run had diverged when this was saved", path, "weights.safetensors")
    return manifest


# ---- save ----------------------------------------------------------------------------------------
def _state_dict_for_save(model: torch.nn.Module | None, sd: dict | None = None) -> dict[str, torch.Tensor]:
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
                    *, model_state: dict | None = None, optim_state: dict | None = None,
                    config: dict | None = None, ref_state: dict | None = None,
                    export_dtype: torch.dtype | None = None) -> str:
    """Write checkpoint ``step`` (write → fsync → swap, see module doc) and keep the newest ``keep_last``.

    ``model_state`` / ``optim_state``: full state dicts gathered from a sharded model (FSDP2, on
    rank 0) to write instead of ``policy.model.state_dict()`` / ``optimizer.state_dict()``.
    ``config``: the resolved run config (``dataclasses.asdict``), written to run_config.json; when
    None, a JSON string in ``state["config"]`` is used. ``ref_state``: the state dict of a reference
    model that the run moves (grpo.ref_sync_steps), written to reference.safetensors. Refuses
    (CheckpointError, nothing written) weights holding NaN/inf, so a diverged run cannot replace
    its last good checkpoint. ``export_dtype``: the dtype of the loadable ``policy/`` copy (the
    resume weights, weights.safetensors, are always written as stored: fp32 masters).
    """
    os.makedirs(output_dir, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    weights = _state_dict_for_save(policy.model, model_state)
    ref = None if ref_state is None else _state_dict_for_save(None, ref_state)
    for what, sd in (("", weights), ("reference ", ref or {})):
        if bad := first_nonfinite(sd):
            raise CheckpointError(f"refusing to save step {step}: {what}{bad}; the checkpoints already in "
                                  f"{output_dir} are kept", final)
    _recover_step(output_dir, step)              # a copy of this step left by a killed save is kept
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if model_state is None:
        policy.save_pretrained(os.path.join(tmp, "policy"), **({"dtype": export_dtype} if export_dtype else {}))
    else:
        _save_policy_from_state(policy, os.path.join(tmp, "policy"), weights, export_dtype)
    save_file(weights, os.path.join(tmp, "weights.safetensors"))
    if ref is not None:
        save_file(ref, os.path.join(tmp, REFERENCE))
    torch.save(
        {"optimizer": optimizer.state_dict() if optim_state is None else optim_state,
         "optimizer_format": "ids" if optim_state is None else "fqn",
         "scheduler": scheduler.state_dict() if scheduler else None, "step": step, **state},
        os.path.join(tmp, "trainer_state.pt"),
    )
    if config is None and isinstance(state.get("config"), str):
        config = json.loads(state["config"])
    if config is not None:
        with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    write_manifest(tmp, step)                    # fsyncs every file; the manifest marks "complete"
    _swap_into_place(tmp, final)
    if keep_last > 0:
        others = [c for c in list_checkpoints(output_dir) if c != final]
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            _remove(old)
    return final


def _swap_into_place(tmp: str, final: str) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` steps aside to ``.old`` first."""
    parent = os.path.dirname(final) or "."
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)                   # now: .old and .tmp both complete, no ckpt-N
        os.replace(tmp, final)
        _fsync_dir(parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        _fsync_dir(parent)


def _remove(path: str) -> None:
    """Delete a checkpoint so that a kill midway leaves ``*.del`` (cleaned later), never a half ckpt."""
    trash = path + ".del"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    _fsync_dir(os.path.dirname(path) or ".")
    shutil.rmtree(trash)


def _save_policy_from_state(policy, path: str, weights: dict, dtype: torch.dtype | None = None) -> None:
    """``policy.save_pretrained`` for a sharded model: the HF module writes the gathered weights."""
    os.makedirs(path, exist_ok=True)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    policy.model.save_pretrained(path, state_dict=weights)
    for part in ("tokenizer", "image_processor"):
        if getattr(policy, part, None) is not None:
            getattr(policy, part).save_pretrained(path)


# ---- recovery and fallback ---------------------------------------------------------------------
def _looks_whole(path: str) -> bool:
    """Has every required file (a checkpoint from before manifests, or an unsealed copy)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in REQUIRED)


def _recover_step(output_dir: str, step: int) -> list[str]:
    """Leave one ``ckpt-N`` for ``step``: the first complete of (ckpt-N, .tmp, .old); drop the rest."""
    final = checkpoint_path(output_dir, step)
    copies = [p for p in (final, final + ".tmp", final + ".old") if os.path.isdir(p)]
    good = next((p for p in copies if _is_complete(p)), None)
    if good is None and os.path.isdir(final) and not _looks_whole(final):
        # only the pre-manifest code left a half-deleted ckpt-N: its whole copy is the unsealed .tmp
        good = next((p for p in copies if _looks_whole(p)), None)
    notes = []
    if good is not None and good != final:
        if os.path.isdir(final):
            _remove(final)
            notes.append(f"removed {final}: incomplete, a complete copy of step {step} was left by an "
                         "interrupted save")
        os.replace(good, final)
        _fsync_dir(output_dir)
        notes.append(f"recovered {final} from {os.path.basename(good)}, left by an interrupted save")
    for p in (final + ".tmp", final + ".old"):
        if os.path.isdir(p):
            shutil.rmtree(p)
            notes.append(f"removed {os.path.basename(p)}, the leftover of an interrupted save "
                         f"({'a duplicate' if good else 'incomplete'})")
    return notes


def recover_leftovers(output_dir: str) -> list[str]:
    """Finish what killed saves left in ``output_dir`` (see the table in the module doc); return notes.
    Renames and deletes: call on one process (rank 0) only, before reading checkpoints."""
    if not os.path.isdir(output_dir):
        return []
    notes, steps = [], set()
    for d in sorted(os.listdir(output_dir)):
        m = _LEFTOVER.match(d)
        if m and m.group(2) == "del":
            shutil.rmtree(os.path.join(output_dir, d))
            notes.append(f"finished deleting {d} (an interrupted prune of old checkpoints)")
        elif m:
            steps.add(int(m.group(1)))
    for step in sorted(steps):
        notes += _recover_step(output_dir, step)
    return notes


# ---- load ----------------------------------------------------------------------------------------
def _is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def load_checkpoint(path: str, policy, optimizer=None, scheduler=None, verify: bool = True,
                    ref_model: torch.nn.Module | None = None) -> dict:
    """Restore weights (and optimizer/scheduler, and a synced reference into ``ref_model``, when
    given) from ``path``; return the trainer state.

    Everything is read and checked (manifest and checksums when ``verify``, finite weights, state
    readable) before anything is loaded into the model; pass ``verify=False`` when
    ``find_resumable_checkpoint`` has just verified ``path``. Problems raise CheckpointError.
    """
    if verify:
        verify_checkpoint(path, finite=False)            # finiteness is checked below, on what is loaded
    for rel in ("weights.safetensors", "trainer_state.pt"):
        if not os.path.exists(os.path.join(path, rel)):
            raise CheckpointError("missing: the checkpoint is incomplete", path, rel)
    sharded = _is_sharded(policy.model)
    with reading(path, "weights.safetensors"):
        sd = load_file(os.path.join(path, "weights.safetensors"),
                       device="cpu" if sharded else str(next(policy.model.parameters()).device))
    if bad := first_nonfinite(sd):
        raise CheckpointError(f"{bad}: the run had diverged when this was saved", path, "weights.safetensors")
    with reading(path, "trainer_state.pt"):                       # never unpickle code
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    if sharded:                               # FSDP2: every rank reads the full file, keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(policy.model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        result = policy.model.load_state_dict(sd, strict=False)
    _check_match(path, "weights.safetensors", policy.model, sd, *result)
    if ref_model is not None:
        _load_reference(path, ref_model)
    if optimizer is not None:
        _load_optimizer(path, policy.model, optimizer, state, sharded)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def _load_reference(path: str, ref_model: torch.nn.Module) -> None:
    ref_path = os.path.join(path, REFERENCE)
    if not os.path.exists(ref_path):
        raise CheckpointError("missing: the run syncs its reference model (grpo.ref_sync_steps), but this "
                              "checkpoint holds none (saved without ref_state)", path, REFERENCE)
    with reading(path, REFERENCE):
        sd = load_file(ref_path, device=str(next(ref_model.parameters()).device))
    if bad := first_nonfinite(sd):
        raise CheckpointError(bad, path, REFERENCE)
    _check_match(path, REFERENCE, ref_model, sd, *ref_model.load_state_dict(sd, strict=False))


def _check_match(path: str, file: str, model, sd: dict, missing, unexpected) -> None:
    """Every key loaded, none left over, except tied weights (saved once, under one of their names)."""
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(sd)
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"does not match the model: missing {list(missing)[:5]}, unexpected "
                              f"{list(unexpected)[:5]}", path, file)


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

