"""Data-parallel GRPO on torch.distributed (launched with torchrun): DDP or FSDP2.

    torchrun --nproc_per_node 8 -m grpo_app train --config ... dist.mode=ddp

    with distributed.session(cfg.dist) as dist:             # a DistContext: rank, world, collectives
        trainer = GRPOTrainer(policy, records, cfg, dist=dist)

Each of the W ranks takes a contiguous slice of the step's B prompts (rank r: prompts
[r·B/W, (r+1)·B/W)), generates its G completions per prompt and scores them. Whole groups stay on
one rank, so the per-group advantage needs no communication; the per-row results (rewards,
lengths) are all-gathered once so that ``adv_scale="batch"`` and the logged statistics are those of
the full batch. Then every rank runs the same number of forward/backward micro-batches and one
optimizer step on gradients that are summed over ranks.

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

Two objects, no module state:
  - ``DistContext``: who this process is (rank, world, mode) and how its numbers meet the others'
    (shard, gather_rows, all_reduce, barrier). The trainer is given one; a default one is a
    single process, where every collective is the identity.
  - ``Replica`` (``dist.replicate(policy)``): how one policy runs under the mode. DDP and FSDP2 only
    see a module's ``forward``, and the policy's training forward is its own ``completion_hidden``,
    so the replica runs that method as the forward of a small wrapper module (``_Root``) that DDP
    or ``fully_shard`` wraps: ``replica.hidden(...)``. ``replica.gathered()`` keeps every FSDP2 unit
    all-gathered for a block of no-grad work (a rollout, eval, old/ref log-probs), so a rollout
    gathers each unit once, not once per decode step.

Choices and limits, one line each:
  - The lm_head is applied by the fused loss outside the wrapper's forward. DDP syncs every
    parameter's accumulated gradient (the tied lm_head is also used inside the forward), and
    FSDP2's root keeps its own unit (embeddings, tied lm_head, norms) unsharded after forward
    (its default) and reduce-scatters it after backward, so both see that gradient.
  - Gradient accumulation uses DDP ``no_sync`` on all but the last micro-batch; FSDP2
    reduce-scatters every micro-batch (keeps grads sharded).
  - Ranks may keep different numbers of groups (``skip_zero_std_groups``); the short ranks run
    zero-weight micro-batches so every rank makes the same collectives.
  - FSDP2 units: the classes in the HF model's ``_no_split_modules`` (decoder layers, vision
    blocks); embeddings, lm_head (tied to them) and norms stay in the root unit.
  - Precision (grpo_core.precision): DDP all-reduces the fp32 master gradients; FSDP2 shards the
    fp32 masters, gathers them in the compute dtype and reduce-scatters gradients in fp32.
  - Under ``gathered()`` peak memory is the full model (every unit unsharded); it is freed after.
  - With β > 0 the frozen reference is sharded too (FSDP2) or kept whole per rank (DDP).
  - Checkpoints: full state dict gathered to rank 0 (the single-process format, loadable by
    transformers); every rank reads it back on resume, so ``run.output_dir`` must be on a
    filesystem all nodes see. FSDP2 stores the optimizer state by parameter name.
  - LoRA under FSDP2: the same units (decoder layers with their adapters, frozen vision blocks);
    a unit may mix trainable adapters and frozen base weights (FSDP2 shards each parameter on its
    own), only the adapters get gradients and optimizer states; the base is sharded too, so a 7B
    base costs 1/W of its bf16 bytes per GPU at rest.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

MODES = ("none", "ddp", "fsdp2")


class DistContext:
    """This process's place in the job: rank, world size, data-parallel mode, collective backend."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, mode: str = "none",
                 backend: str | None = None):
        if mode not in MODES:
            raise ValueError(f"dist: mode must be one of {MODES}, got {mode!r}")
        self.rank, self.world, self.local_rank, self.mode, self.backend = rank, world, local_rank, mode, backend

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world={self.world}, mode={self.mode!r}, backend={self.backend!r})"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when collectives really communicate (a ddp/fsdp2 process group exists)."""
        return self.mode != "none" and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ---- data and metrics -----------------------------------------------------------------
    def shard(self, items: list) -> list:
        """This rank's contiguous slice of the step's items: [r·B/W, (r+1)·B/W). B must divide by W."""
        n, w = len(items), self.world
        if n % w:
            raise ValueError(f"dist: {n} prompts per step cannot be split over {w} ranks; "
                             f"set rollout.prompts_per_step to a multiple of {w}")
        k = n // w
        return items[self.rank * k:(self.rank + 1) * k]

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def gather_rows(self, t: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """All ranks' rows (rank order) of ``t`` (n_r, ...) and the slice that is this rank's own."""
        if not self.active:
            return t, slice(0, t.shape[0])
        dev = self._comm_device()
        n = torch.tensor([t.shape[0]], device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        pad = max(sizes) - t.shape[0]
        local = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]).to(dev)    # all_gather needs equal shapes
        parts = [torch.empty_like(local) for _ in sizes]
        dist.all_gather(parts, local)
        full = torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)
        start = sum(sizes[:self.rank])
        return full, slice(start, start + t.shape[0])

    def all_reduce(self, x, op: str = "sum"):
        """Sum / max / min of a float, int or tensor over ranks (identity when not distributed)."""
        if not self.active:
            return x
        t = torch.as_tensor(x, dtype=torch.float64).to(self._comm_device()).clone()
        dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        if isinstance(x, torch.Tensor):
            return t.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        return type(x)(t.item()) if isinstance(x, (int, float)) else t

    def reduce_sums(self, d: dict, same: tuple = ()) -> dict:
        """Sum a dict of floats over ranks in one all-reduce; keys in ``same`` are already equal on all ranks."""
        keys = [k for k in sorted(d) if k not in same]
        if not self.active or not keys:
            return dict(d)
        t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {**d, **dict(zip(keys, t.tolist()))}

    # ---- policies -----------------------------------------------------------------------------
    def replicate(self, policy, trainable: bool = True, reshard_after_forward: bool = True,
                  compute_dtype: torch.dtype | None = None) -> "Replica":
        """How ``policy`` runs under this context's mode (see Replica)."""
        return Replica(self, policy, trainable, reshard_after_forward, compute_dtype)


def local_value(x) -> float:
    """A Python float from a scalar that may be a DTensor (FSDP2 grad norm)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


# ---- process group ---------------------------------------------------------------------------
def init(cfg) -> DistContext:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK.

    ``cfg`` is a ``config.DistConfig``. mode "none" never creates a group (and refuses W > 1).
    A ddp/fsdp2 run started without torchrun becomes a 1-process group, so one code path serves all.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.mode == "none":
        if world > 1:
            raise ValueError(f"dist: launched on WORLD_SIZE={world} processes but dist.mode='none'; "
                             "set dist.mode=ddp or dist.mode=fsdp2 (or launch one process)")
        return DistContext()
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
    return DistContext(rank, dist.get_world_size(), local, cfg.mode, backend)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(cfg):
    """init … teardown, yielding the DistContext; an exception in this rank is printed with its
    rank before it propagates."""
    ctx = init(cfg)
    try:
        yield ctx
    except BaseException as e:
        if ctx.world > 1:
            print(f"grpo: rank {ctx.rank}/{ctx.world} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one policy under the mode ---------------------------------------------------------------
class _Root(torch.nn.Module):
    """The module DDP / fully_shard wrap: its forward is the policy's training forward."""

    def __init__(self, policy):
        super().__init__()
        self.model = policy.model              # registers the parameters under their usual names
        self._policy = [policy]                # (a list: not a submodule, not a second parameter owner)

    def forward(self, enc, ids, mask, group_size):
        return self._policy[0].completion_hidden(enc, ids, mask, group_size)


class Replica:
    """One policy under the context's mode.

    ``hidden(enc, ids, mask, G)``   = ``policy.completion_hidden`` run as the wrapped root's forward
                                      (DDP: gradients sync; FSDP2: units gathered and resharded)
    ``gathered()``                  FSDP2: every unit all-gathered for a block of no-grad work
    ``accumulate(sync)``            DDP: skip the all-reduce on all but the last micro-batch
    ``grad_scale``                  W under ddp/fsdp2 (they average over ranks; see module doc)
    ``full_state(optimizer)``       FSDP2: full model / optimizer state dicts on rank 0
    """

    def __init__(self, ctx: DistContext, policy, trainable: bool = True, reshard_after_forward: bool = True,
                 compute_dtype: torch.dtype | None = None):
        self.ctx, self.policy, self.mode = ctx, policy, ctx.mode
        self.reshard_after_forward = reshard_after_forward
        self.grad_scale = ctx.world if ctx.mode in ("ddp", "fsdp2") and trainable else 1
        self._root = None
        if ctx.mode == "ddp" and trainable:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # broadcasts rank 0's weights at construction: all ranks start identical
            self._root = DDP(_Root(policy), device_ids=None, forward_sync_buffers=False)
        elif ctx.mode == "fsdp2":
            self._root = _fully_shard(_Root(policy), ctx, reshard_after_forward, compute_dtype)

    def hidden(self, enc, ids, mask, group_size: int) -> torch.Tensor:
        """The policy's training forward (N, C, H), run where the mode's gradient sync sees it."""
        if self._root is None:
            return self.policy.completion_hidden(enc, ids, mask, group_size)
        return self._root(enc, ids, mask, group_size)

    @contextmanager
    def gathered(self):
        """No-grad block; under FSDP2 every unit stays all-gathered until it ends."""
        with torch.no_grad():
            if self.mode != "fsdp2":
                yield
                return
            units = _fsdp_units(self._root)
            for m in units:
                m.set_reshard_after_forward(False, recurse=False)
                m.unshard()
            try:
                yield
            finally:
                for m in units:
                    m.set_reshard_after_forward(self.reshard_after_forward and m is not self._root, recurse=False)
                    m.reshard()

    def accumulate(self, sync: bool):
        """DDP: skip the all-reduce on all but the last micro-batch. FSDP2 reduces every micro-batch."""
        is_ddp = self.mode == "ddp" and self._root is not None
        return self._root.no_sync() if is_ddp and not sync else nullcontext()

    # ---- checkpoint state (collective under fsdp2: call on every rank) ----
    def full_state(self, optimizer) -> tuple[dict | None, dict | None]:
        """(model, optimizer) full state dicts on rank 0 for fsdp2 (FQN-keyed optimizer; None without
        an optimizer), else (None, None)."""
        if self.mode != "fsdp2":
            return None, None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(self.policy.model, options=opts)
        return model, (get_optimizer_state_dict(self.policy.model, optimizer, options=opts) if optimizer else None)


def _fsdp_units(root: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def _fully_shard(root: _Root, ctx: DistContext, reshard_after_forward: bool,
                 compute_dtype: torch.dtype | None = None) -> _Root:
    """fully_shard each decoder layer / vision block, then the root; run one empty forward so that
    FSDP2's lazy initialisation (which module is the root) happens before any other call.

    Precision: the shards hold the fp32 master weights; with a bf16/fp16 ``compute_dtype`` the
    all-gathered copies are cast to it (half the all-gather traffic) and gradients are
    reduce-scattered in fp32 (``MixedPrecisionPolicy``), into fp32 sharded gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .precision import uses_autocast

    model = root.model                          # LoRA: the peft wrapper (adapters + frozen base)
    mesh = init_device_mesh(ctx._comm_device().type, (ctx.world,))
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"dist.mode=fsdp2: {type(model).__name__} lists no _no_split_modules to shard by; "
                         "use dist.mode=ddp")
    mp = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
          if compute_dtype is not None and uses_autocast(compute_dtype) else MixedPrecisionPolicy())
    for m in units:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(root, mesh=mesh, reshard_after_forward=False, mp_policy=mp)   # the root stays gathered after forward
    _lazy_init(root)
    return root


def _lazy_init(root) -> None:
    """FSDP2 decides its root at the first forward: make that the root's, with nothing in it."""
    def nothing(*args, **kw):
        return None

    root.forward = nothing                      # instance attribute: the hooks still wrap __call__
    try:
        with torch.no_grad():
            root(None, None, None, 0)
    finally:
        del root.forward
    root.reshard()                              # back to sharded parameters (what the optimizer must see)
