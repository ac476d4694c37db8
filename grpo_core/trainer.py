"""GRPO trainer: one step, read top to bottom.

    records ─► prompts ─► generate_groups (prefill once per prompt, G samples each)
            ─► rewards (B·G, R) ─► weighted sum ─► group_advantages (B·G,)
            ─► old log-probs (μ > 1) and reference log-probs (β > 0): no grad, fused, chunked
            ─► μ optimizer steps, each over shuffled micro-batches of whole groups:
               policy.completion_hidden ─► fused_linear_grpo_loss ─► backward
               (denominators of the whole batch, so accumulation = one big batch)
            ─► clip grad norm ─► AdamW ─► LR schedule ─► metrics

How this departs from the GRPO paper (DeepSeekMath), one line each:
  - ``grpo.agg`` picks the normalisation: "seq_mean" is the paper, "token_mean" DAPO, "constant"
    Dr. GRPO; ``grpo.adv_scale="none"`` removes the std division (Dr. GRPO).
  - Clipping may be asymmetric (DAPO clip-higher) and dual-clipped; KL can sit in the loss (GRPO)
    or in the reward (``grpo.kl_placement``).
  - Micro-batches hold whole groups, so each prompt's images go through the vision tower once per
    forward and are shared by its G completions.
  - Groups whose G rewards are all equal carry zero advantage; they are always counted, and
    dropped from the update when ``grpo.skip_zero_std_groups`` (saves compute, same gradient
    except through the KL term).
  - Data parallel (``dist.mode`` ddp / fsdp2, see grpo_core.distributed): each rank rolls out its
    own B/W prompts, rewards are all-gathered for the advantages, the loss denominators are the
    all-reduced counts of the step and each rank back-propagates W·loss, so W ranks give exactly
    the single-process gradient of the concatenated batch. Only rank 0 logs and writes.
"""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import nullcontext

import torch

from . import distributed as D
from .advantages import group_advantages, group_reward_std
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, to_dict
from .data.templates import make_prompt_fn
from .kernels import fused_linear_grpo_loss, linear_token_logprobs
from .loss import kl_penalized_rewards
from .optim import make_optimizer, make_scheduler
from .rewards import RewardSpec, combine_rewards, get_reward
from .rollout import generate_groups
from .sampling import SamplingConfig


def rewards_from_config(entries) -> list[RewardSpec]:
    specs = []
    for e in entries:
        e = dict(e)
        name, weight = e.pop("name"), float(e.pop("weight", 1.0))
        specs.append(RewardSpec(name, get_reward(name, **e), weight))
    return specs


def completion_logprobs(policy, enc, ids, mask, group_size, temperature, backend="auto", micro_prompts=0):
    """Log-probs (N, C) of given completions under ``policy``, no grad, whole groups per chunk."""
    B = enc.input_ids.shape[0]
    step = micro_prompts or B
    out = []
    with torch.no_grad():
        for s in range(0, B, step):
            pidx = list(range(s, min(B, s + step)))
            rows = slice(s * group_size, (s + len(pidx)) * group_size)
            h = policy.completion_hidden(enc.select(pidx), ids[rows], mask[rows], group_size)   # (n, C, H)
            out.append(linear_token_logprobs(h, policy.lm_head_weight.to(h.dtype), ids[rows], temperature, mask=mask[rows],
                                             bias=policy.lm_head_bias, backend=backend))
    return torch.cat(out)                                                                      # (N, C)


class GRPOTrainer:
    """GRPO on a ``Policy`` (see grpo_core.policy) over a list of VQA records."""

    def __init__(self, policy, train_records, cfg: TrainConfig, eval_records=None, ref_policy=None,
                 reward_specs=None, prompt_fn=None, eval_fn=None):
        cfg.validate()
        if len(train_records) < cfg.rollout.prompts_per_step:
            raise ValueError(f"GRPOTrainer: {len(train_records)} training records < rollout.prompts_per_step="
                             f"{cfg.rollout.prompts_per_step}")
        self.policy, self.records, self.cfg = policy, list(train_records), cfg
        self.eval_records, self.eval_fn = eval_records, eval_fn
        self.prompt_fn = prompt_fn or make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, cfg.run.seed)
        self.specs = reward_specs or rewards_from_config(cfg.grpo.rewards)
        self.ref_policy = self._make_reference(ref_policy)
        if cfg.rollout.prompts_per_step % D.world():
            raise ValueError(f"GRPOTrainer: rollout.prompts_per_step={cfg.rollout.prompts_per_step} is not a multiple "
                             f"of the {D.world()} ranks; each rank takes an equal share of whole groups")
        # data parallelism: wrap (DDP / FSDP2 or nothing) before the optimizer sees the parameters
        self.par = D.Parallel(policy, D.mode(), reshard_after_forward=cfg.dist.reshard_after_forward)
        self.ref_par = D.Parallel(self.ref_policy, D.mode(), trainable=False) if hasattr(self.ref_policy, "model") else None
        total_opt_steps = cfg.run.steps * cfg.grpo.mu
        self.optimizer = make_optimizer(policy.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim.warmup_steps, total_opt_steps, cfg.optim.schedule)
        self.step_idx, self.data_pos, self.history = 0, 0, []
        self.device = policy.device
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if cfg.run.bf16_autocast and self.device.type == "cuda" else nullcontext())

    # ---- setup -----------------------------------------------------------------------------
    def _make_reference(self, ref_policy):
        g = self.cfg.grpo
        if g.beta == 0:
            return None                      # β = 0: no reference model is built or loaded at all
        if ref_policy is not None:
            return ref_policy
        mode = g.ref if g.ref != "auto" else ("adapters" if self.cfg.model.lora_rank > 0 else "copy")
        if mode == "adapters":
            return "adapters"                # the policy with its LoRA adapters disabled
        ref = copy.deepcopy(self.policy)     # a frozen copy of the initial policy
        for p in ref.model.parameters():
            p.requires_grad_(False)
        ref.model.eval()
        return ref

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + self.step_idx * 7919 + salt)

    def _next_records(self):
        """B records in an epoch-wise permutation seeded by (seed, epoch): resumable by position."""
        B, n = self.cfg.rollout.prompts_per_step, len(self.records)
        out = []
        while len(out) < B:
            epoch, i = divmod(self.data_pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.run.seed + 17 * epoch))
            out.append(self.records[int(perm[i])])
            self.data_pos += 1
        return out

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> dict:
        cfg, g, G = self.cfg, self.cfg.grpo, self.cfg.rollout.group_size
        t0 = time.perf_counter()

        # 1. rollout: B prompts, G completions each, prompt prefilled once per group
        records = D.shard(self._next_records())          # this rank's B/W prompts of the step's batch
        prompts, records = self.prompt_fn(records)
        sampling = SamplingConfig(**cfg.rollout.sampling_options(),
                                  seed=int(self._generator(1 + 1000 * D.rank()).initial_seed()))   # (seed, step, rank)
        self.policy.model.eval()
        with self.autocast:
            ro = self.par.infer(generate_groups, self.policy, prompts, G, sampling, gather_all=True)
        enc, ids, mask = ro.encoded, ro.completion_ids, ro.completion_mask.to(torch.float32)   # (N, C)
        t1 = time.perf_counter()

        # 2. rewards → advantages (per group of G)
        reps = [r for r in records for _ in range(G)]
        total, columns = combine_rewards(self.specs, ro.texts, reps)                          # (N,)
        total = total.to(self.device)
        ref_lp = self._ref_logprobs(enc, ids, mask, G)                                         # (N, C) | None
        if g.kl_placement == "reward":
            with self.autocast:
                cur_lp = self.par.infer(completion_logprobs, self.policy, enc, ids, mask, G, cfg.rollout.temperature,
                                        g.backend, g.micro_batch_prompts)
            total = kl_penalized_rewards(total, cur_lp, ref_lp, mask, g.beta, g.kl)
        total_all, own = D.gather_rows(total)            # (N_all,) every rank's rewards, rank order
        adv = group_advantages(total_all, G, scale=g.adv_scale)[own]                           # (N,)
        zero_std_all = group_reward_std(total_all, G) == 0                                     # (B_all,)
        zero_std = zero_std_all[own.start // G: own.stop // G]                                 # (B,)
        t2 = time.perf_counter()

        # 3. update: μ optimizer steps over the same rollouts
        keep = [b for b in range(len(records)) if not (g.skip_zero_std_groups and zero_std[b])]
        upd = self._update(enc, ids, mask, adv, ref_lp if g.kl_placement == "loss" else None, keep, G)
        t3 = time.perf_counter()

        self.step_idx += 1
        # per-row statistics of every rank (N_all, 2 + R): metrics of the whole batch
        cols = [ro.completion_mask.sum(1), ro.truncated, *columns.values()]
        rows, _ = D.gather_rows(torch.stack([c.float().cpu() for c in cols], 1))
        lens = rows[:, 0]
        m = {"step": self.step_idx, "lr": self.scheduler.get_last_lr()[0], **upd,
             "reward": total_all.mean().item(), "reward_std": total_all.std().item() if total_all.numel() > 1 else 0.0,
             "zero_std_frac": zero_std_all.float().mean().item(),
             "completion_len": lens.mean().item(), "completion_len_max": lens.max().item(),
             "truncated_frac": rows[:, 1].mean().item(),
             "tokens_per_s": D.all_reduce(float(ro.stats.get("tokens_per_s", 0.0))),   # all ranks together
             "time_rollout": t1 - t0, "time_scoring": t2 - t1, "time_update": t3 - t2}   # this rank's
        for j, name in enumerate(columns):
            m[f"reward/{name}"] = rows[:, 2 + j].mean().item()
        m["accuracy"] = m.get("reward/accuracy", m.get("reward/accuracy_graded", float("nan")))
        m["format_rate"] = m.get("reward/format", m.get("reward/format_nothink", float("nan")))
        return m

    def _ref_logprobs(self, enc, ids, mask, G):
        if self.ref_policy is None:
            return None
        g, T = self.cfg.grpo, self.cfg.rollout.temperature
        if self.ref_policy == "adapters":
            with self.policy.disable_adapters(), self.autocast:
                return self.par.infer(completion_logprobs, self.policy, enc, ids, mask, G, T, g.backend, g.micro_batch_prompts)
        par = self.ref_par or D.Parallel(self.ref_policy)
        with self.autocast:
            return par.infer(completion_logprobs, self.ref_policy, enc, ids, mask, G, T, g.backend, g.micro_batch_prompts)

    def _update(self, enc, ids, mask, adv, ref_lp, keep, G) -> dict:
        cfg, g = self.cfg, self.cfg.grpo
        T = cfg.rollout.temperature
        sums: dict[str, float] = {}
        if D.all_reduce(len(keep)) == 0:      # every group (on every rank) had equal rewards: skipped
            return {"loss": 0.0, "grad_norm": 0.0, "skipped_groups": D.all_reduce(len(adv) // G)}
        self.policy.model.train()
        old_lp = None
        # π_old = the policy that sampled, frozen for μ passes. Recomputed with the training forward
        # rather than taken from the rollout, so the ratio is exactly 1 on the first pass (the decode
        # path computes the same distribution with other kernels; in bf16 they differ in rounding).
        if g.mu > 1:
            with self.autocast:
                old_lp = self.par.infer(completion_logprobs, self.policy, enc, ids, mask, G, T, g.backend, g.micro_batch_prompts)
        rows_of = lambda ps: torch.cat([torch.arange(p * G, (p + 1) * G) for p in ps])      # noqa: E731
        keep_rows = rows_of(keep) if keep else torch.zeros(0, dtype=torch.long)
        # denominators of the whole optimizer step: all micro-batches of all ranks (see distributed.py)
        total_tokens = D.all_reduce(mask[keep_rows].sum())
        total_seqs = int(D.all_reduce(len(keep_rows)))
        mb = g.micro_batch_prompts or max(len(keep), 1)
        for it in range(g.mu):
            order = torch.randperm(len(keep), generator=self._generator(100 + it)).tolist()
            chunks = [[keep[j] for j in order[s:s + mb]] for s in range(0, len(order), mb)]
            n_chunks = int(D.all_reduce(len(chunks), "max"))   # every rank runs as many micro-batches
            self.optimizer.zero_grad(set_to_none=True)
            for c in range(n_chunks):
                pidx, weight = (chunks[c], 1.0) if c < len(chunks) else ([0], 0.0)   # 0.0: a filler for sync
                rows = rows_of(pidx)
                with self.par.accumulate(sync=c == n_chunks - 1):
                    with self.autocast:
                        loss, m = self.par.forward(
                            self._micro_loss, enc.select(pidx), ids[rows], mask[rows], adv[rows],
                            None if old_lp is None else old_lp[rows], None if ref_lp is None else ref_lp[rows],
                            total_tokens, total_seqs)
                    (loss * (weight * self.par.grad_scale)).backward()   # × W: DDP/FSDP average over ranks
                w = weight * m["tokens"].item() / max(total_tokens.item(), 1.0)   # token-weighted metric average
                for k, v in m.items():
                    if k != "tokens":
                        sums[k] = sums.get(k, 0.0) + w * float(v) / g.mu
                sums["loss"] = sums.get("loss", 0.0) + weight * loss.item() / g.mu
            params = [p for p in self.policy.model.parameters() if p.grad is not None]
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf"))
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + D.local_value(gn) / g.mu
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["skipped_groups"] = len(adv) // G - len(keep)
        return D.reduce_sums(sums, same=("grad_norm",))   # local shares of global means → global

    def _micro_loss(self, enc, ids, mask, adv, old_lp, ref_lp, total_tokens, total_seqs):
        """GRPO loss of one micro-batch of whole groups, divided by the step's global denominators."""
        cfg, g, G = self.cfg, self.cfg.grpo, self.cfg.rollout.group_size
        h = self.policy.completion_hidden(enc, ids, mask, G)                                  # (n, C, H)
        return fused_linear_grpo_loss(
            h, self.policy.lm_head_weight.to(h.dtype), ids,                  # autocast: bf16 h
            old_lp, ref_lp, adv, mask, bias=self.policy.lm_head_bias, temperature=cfg.rollout.temperature,
            clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip,
            beta=g.beta if ref_lp is not None else 0.0, kl=g.kl, agg=g.agg,
            max_len=g.max_len or cfg.rollout.max_new_tokens,
            total_tokens=total_tokens, total_seqs=total_seqs, backend=g.backend)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> list[dict]:
        cfg = self.cfg
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        if cfg.run.resume and (ck := latest_checkpoint(cfg.run.output_dir)):
            self.resume(ck)
        log_path = os.path.join(cfg.run.output_dir, "metrics.jsonl")
        main = D.is_main()                    # only rank 0 logs, draws and writes
        writer = _tensorboard(cfg.run.output_dir) if main else None
        bar = _progress(cfg.run.steps, self.step_idx, cfg.run.progress and main)
        t_start = time.perf_counter()
        while self.step_idx < cfg.run.steps:
            m = self.step()
            if self.eval_fn and cfg.run.eval_every and self.step_idx % cfg.run.eval_every == 0:
                m.update({f"eval/{k}": v for k, v in self.par.infer(self.eval_fn, self.policy, gather_all=True).items()})
            self.history.append(m)
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
            if writer:
                for k, v in m.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(k, v, self.step_idx)
            if bar:
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", kl=f"{m.get('kl', 0):.3f}",
                                len=f"{m['completion_len']:.0f}")
            if cfg.run.save_every and self.step_idx % cfg.run.save_every == 0:
                self.save()
            if cfg.run.time_budget_s and time.perf_counter() - t_start > cfg.run.time_budget_s:
                break
        if bar:
            bar.close()
        if writer:
            writer.close()
        return self.history

    def save(self) -> str:
        """Call on every rank: FSDP2 gathers the full state to rank 0, which alone writes."""
        state = {"data_pos": self.data_pos, "config": json.dumps(to_dict(self.cfg))}
        model_state, optim_state = self.par.full_state(self.optimizer)   # (None, None) unless fsdp2
        path = None
        if D.is_main():
            path = save_checkpoint(self.cfg.run.output_dir, self.step_idx, self.policy, self.optimizer,
                                   self.scheduler, state, keep_last=self.cfg.run.keep_last,
                                   model_state=model_state, optim_state=optim_state)
        D.barrier()                           # no rank reads a checkpoint before it is whole
        return path or checkpoint_path(self.cfg.run.output_dir, self.step_idx)

    def resume(self, path: str) -> None:
        state = load_checkpoint(path, self.policy, self.optimizer, self.scheduler)
        self.step_idx, self.data_pos = int(state["step"]), int(state["data_pos"])


def _progress(total, start, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="grpo", dynamic_ncols=True)


def _tensorboard(logdir):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(logdir)
    except Exception:  # tensorboard not installed: JSONL + plot only
        return None
