"""Data-parallel GRPO on torch.distributed (launched with torchrun): DDP or FSDP2.

    torchrun --nproc_per_node 8 -m grpo_app.cli train --config ... dist.mode=ddp

Each of the W ranks takes a contiguous slice of the step's B prompts (rank r: prompts
[r·B/W, (r+1)·B/W)), generates its G completions per prompt and scores them. Whole groups stay on
one rank, so the per-group advantage needs no communication; the rewards are still all-gathered
(B·G floats) so that ``adv_scale="batch"`` and the logged reward statistics are those of the full
batch. Then every rank runs the same number of forward/backward micro-batches and one optimizer
step on gradients that are summed over ranks.

Loss normalisation across micro-batches AND ranks (what makes W ranks = one big batch):
    L = Σ_ranks Σ_micro ℓ_mb,   ℓ_mb = (numerator of the micro-batch) / D_global
with D_global the denominator of the whole optimizer step, all-reduced before the first micro-batch:
    token_mean  D = Σ_ranks Σ_kept-rows |o_i|      (all-reduced token count)
    seq_mean    D = Σ_ranks (kept rows)            (all-reduced sequence count; per-seq means inside)
    constant    D = Σ_ranks (kept rows) · max_len  (max_len is a config constant, never a local max)
DDP and FSDP2 *average* gradients over the W ranks (divide by W after summing), so each rank
back-propagates W·ℓ_mb: the synced gradient is then Σ_ranks Σ_micro ∇ℓ_mb = ∇L exactly, the gradient
a single process computes on the concatenated batch (tests/test_distributed.py checks this for
every ``agg``). Logged values are unscaled.

Choices and limits, one line each:
  - DDP does not see the policy's own methods (``completion_hidden`` bypasses ``model.forward``), so
    the whole micro-step (hidden states + fused loss, lm_head included) runs as the forward of a
    small wrapper module (``_Call``) around ``policy.model``; FSDP2 gets the same through
    ``register_fsdp_forward_method`` on the root. Gradient accumulation uses DDP ``no_sync`` on all
    but the last micro-batch; FSDP2 reduce-scatters every micro-batch (keeps grads sharded).
  - Ranks may keep different numbers of groups (``skip_zero_std_groups``); the short ranks run
    zero-weight micro-batches so every rank makes the same collectives.
  - FSDP2 units: the classes in the HF model's ``_no_split_modules`` (decoder layers, vision
    blocks); embeddings, lm_head (tied to them) and norms stay in the root unit.
  - Generation under FSDP2 runs inside one root forward with re-sharding switched off, so every
    unit is all-gathered once per rollout (not once per decode step) and freed afterwards: peak
    memory during rollout is the full model. Eval does the same on every rank.
  - With β > 0 the frozen reference is sharded too (FSDP2) or kept whole per rank (DDP).
  - Checkpoints: full state dict gathered to rank 0 (the single-process format, loadable by
    transformers); every rank reads it back on resume, so ``run.output_dir`` must be on a
    filesystem all nodes see. FSDP2 stores the optimizer state by parameter name.
  - FSDP2 with LoRA is not supported (use ddp: the trainable part is small anyway).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

MODES = ("none", "ddp", "fsdp2")


@dataclass
class DistState:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"
    backend: str | None = None


_STATE = DistState()


# ---- process group ---------------------------------------------------------------------------
def init(cfg) -> DistState:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK.

    ``cfg`` is a ``config.DistConfig``. mode "none" never creates a group (and refuses W > 1).
    A ddp/fsdp2 run started without torchrun becomes a 1-process group, so one code path serves all.
    """
    global _STATE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.mode == "none":
        if world > 1:
            raise ValueError(f"dist: launched on WORLD_SIZE={world} processes but dist.mode='none'; "
                             "set dist.mode=ddp or dist.mode=fsdp2 (or launch one process)")
        _STATE = DistState()
        return _STATE
    if cfg.mode not in MODES:
        raise ValueError(f"dist: mode must be one of {MODES}, got {cfg.mode!r}")
    if "RANK" not in os.environ:                       # plain `python -m ...`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s), **kw)
    _STATE = DistState(rank, dist.get_world_size(), local, cfg.mode, backend)
    return _STATE


def teardown() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = DistState()


@contextmanager
def session(cfg):
    """init … teardown; an exception in this rank is printed with its rank before it propagates."""
    st = init(cfg)
    try:
        yield st
    except BaseException as e:
        if st.world > 1:
            print(f"grpo: rank {st.rank}/{st.world} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return _STATE.rank


def world() -> int:
    return _STATE.world


def mode() -> str:
    return _STATE.mode


def is_main() -> bool:
    return _STATE.rank == 0


def active() -> bool:
    return _STATE.mode != "none" and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


# ---- data and metrics ------------------------------------------------------------------------
def shard(items: list) -> list:
    """This rank's contiguous slice of the step's items: [r·B/W, (r+1)·B/W). B must divide by W."""
    n, w = len(items), world()
    if n % w:
        raise ValueError(f"dist: {n} prompts per step cannot be split over {w} ranks; "
                         f"set rollout.prompts_per_step to a multiple of {w}")
    k = n // w
    return items[rank() * k:(rank() + 1) * k]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _STATE.backend == "nccl" else torch.device("cpu")


def gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """All ranks' rows (rank order) of ``t`` (n_r, ...) and the slice that is this rank's own."""
    if not active():
        return t, slice(0, t.shape[0])
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - t.shape[0]
    local = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]).to(dev)    # all_gather needs equal shapes
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local)
    full = torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)
    start = sum(sizes[:rank()])
    return full, slice(start, start + t.shape[0])


def all_reduce(x, op: str = "sum"):
    """Sum / max / min of a float, int or tensor over ranks (identity when not distributed)."""
    if not active():
        return x
    t = torch.as_tensor(x, dtype=torch.float64).to(_comm_device()).clone()
    dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    if isinstance(x, torch.Tensor):
        return t.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return type(x)(t.item()) if isinstance(x, (int, float)) else t


def reduce_sums(d: dict, same: tuple = ()) -> dict:
    """Sum a dict of floats over ranks in one all-reduce; keys in ``same`` are already equal on all ranks."""
    keys = [k for k in sorted(d) if k not in same]
    if not active() or not keys:
        return dict(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {**d, **dict(zip(keys, t.tolist()))}


def local_value(x) -> float:
    """A Python float from a scalar that may be a DTensor (FSDP2 grad norm)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


# ---- wrapping the policy ---------------------------------------------------------------------
def _call(fn, *args, **kw):
    return fn(*args, **kw)


class _Call(torch.nn.Module):
    """The forward DDP runs: ``fn(*args)`` over a policy whose parameters live in ``self.model``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kw):
        return fn(*args, **kw)


class Parallel:
    """How one policy runs under the current mode: ``forward`` (with grad), ``infer`` (no grad),
    ``accumulate`` (gradient-sync context per micro-batch), ``grad_scale`` (= W under ddp/fsdp2)."""

    def __init__(self, policy, mode: str = "none", trainable: bool = True, reshard_after_forward: bool = True):
        self.policy, self.mode, self.trainable = policy, mode, trainable
        self.reshard_after_forward = reshard_after_forward
        self.grad_scale = world() if mode in ("ddp", "fsdp2") and trainable else 1
        self._ddp = None
        if mode == "ddp" and trainable:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # broadcasts rank 0's weights at construction: all ranks start identical
            self._ddp = DDP(_Call(policy.model), device_ids=None, forward_sync_buffers=False)
        elif mode == "fsdp2":
            _fully_shard(policy.model, reshard_after_forward)

    def forward(self, fn, *args, **kw):
        """Run ``fn`` (which uses the policy) as the wrapped model's forward: grads will sync."""
        if self._ddp is not None:
            return self._ddp(fn, *args, **kw)
        if self.mode == "fsdp2":
            return self.policy.model._grpo_call(fn, *args, **kw)
        return fn(*args, **kw)

    def infer(self, fn, *args, gather_all: bool = False, **kw):
        """``fn`` without grad. FSDP2: inside one root forward; ``gather_all`` keeps every unit
        gathered until ``fn`` returns (generation: one all-gather per rollout, not per decode step)."""
        with torch.no_grad():
            if self.mode != "fsdp2":
                return fn(*args, **kw)
            model = self.policy.model
            if not gather_all:
                return model._grpo_call(fn, *args, **kw)
            model.set_reshard_after_forward(False)
            try:
                return model._grpo_call(fn, *args, **kw)
            finally:
                model.set_reshard_after_forward(self.reshard_after_forward)
                model.set_reshard_after_forward(False, recurse=False)   # the root keeps FSDP's default
                for m in model.modules():
                    if hasattr(m, "reshard") and hasattr(m, "_get_fsdp_state"):
                        m.reshard()

    def accumulate(self, sync: bool):
        """DDP: skip the all-reduce on all but the last micro-batch. FSDP2 reduces every micro-batch."""
        return self._ddp.no_sync() if self._ddp is not None and not sync else nullcontext()

    # ---- checkpoint state (collective under fsdp2: call on every rank) ----
    def full_state(self, optimizer) -> tuple[dict | None, dict | None]:
        """(model, optimizer) full state dicts on rank 0 for fsdp2 (FQN-keyed optimizer), else (None, None)."""
        if self.mode != "fsdp2":
            return None, None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.policy.model, options=opts),
                get_optimizer_state_dict(self.policy.model, optimizer, options=opts))


def _fully_shard(model: torch.nn.Module, reshard_after_forward: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if hasattr(model, "peft_config"):
        raise ValueError("dist.mode=fsdp2 with LoRA (model.lora_rank > 0) is not supported; use dist.mode=ddp")
    mesh = init_device_mesh(_comm_device().type, (world(),))
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"dist.mode=fsdp2: {type(model).__name__} lists no _no_split_modules to shard by; "
                         "use dist.mode=ddp")
    for m in units:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    model._grpo_call = _call
    register_fsdp_forward_method(model, "_grpo_call")
