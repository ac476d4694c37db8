"""GRPO trainer: one step, read top to bottom.

    step:    records ─► prompts
             ─► rollout   generate_groups: each prompt prefilled once, G samples each      → Rollout
             ─► score     rewards (N, R) ─► total (N,) ─► one gather of every rank's rows
                          ─► group advantages; old log-probs (μ > 1), reference log-probs (β > 0) → Experience
             ─► update    μ optimizer steps, each over shuffled micro-batches of whole groups:
                          policy hidden states ─► fused_linear_grpo_loss ─► backward
                          (denominators of the whole batch, so accumulation = one big batch)
                          ─► clip grad norm ─► AdamW ─► LR schedule
             ─► metrics   by role (accuracy, format), lengths, loss terms, timings

How this departs from the GRPO paper (DeepSeekMath), one line each:
  - ``grpo.agg`` picks the normalisation: "seq_mean" is the paper, "token_mean" DAPO, "constant"
    Dr. GRPO; ``grpo.adv_scale="none"`` removes the std division (Dr. GRPO).
  - Clipping may be asymmetric (DAPO clip-higher) and dual-clipped; KL can sit in the loss (GRPO)
    or in the reward (``grpo.kl_placement``).
  - Micro-batches hold whole groups, so each prompt's images go through the vision tower once per
    forward and are shared by its G completions.
  - π_old is recomputed with the training forward rather than taken from the rollout, so the ratio
    is exactly 1 on the first pass (the decode path computes the same distribution with other
    kernels; in bf16 they differ in rounding). With the KL in the reward that same forward also
    gives the current log-probs, so it runs once.
  - Groups whose G rewards are all equal carry zero advantage; they are always counted, and
    dropped from the update when ``grpo.skip_zero_std_groups`` (saves compute, same gradient
    except through the KL term).
  - Data parallel (``dist`` a DistContext, see grpo_core.distributed): each rank rolls out its own
    B/W prompts, the per-row results are all-gathered for the advantages, the loss denominators are
    the all-reduced counts of the step and each rank back-propagates W·loss, so W ranks give
    exactly the single-process gradient of the concatenated batch. Only rank 0 logs and writes.
"""

from __future__ import annotations

import copy
import math
import sys
import time

import torch

from .advantages import DynamicSampling, group_advantages, group_reward_std
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .config import TrainConfig, to_dict
from .data.images import ImageLoadError
from .data.templates import make_prompt_fn
from .distributed import DistContext, local_value
from .experience import Experience, RowResults
from .harness import NonFiniteTrainingError, run_training  # noqa: F401  (re-exported)
from .kernels import fused_linear_grpo_loss, linear_token_logprobs
from .loss import kl_penalized_rewards, loss_options, mask_truncated
from .optim import make_optimizer, make_scheduler
from .precision import (
    autocast,
    check_trainable_compute,
    compute_cast,
    master_weights_,
    resolve_compute_dtype,
    resolve_export_dtype,
    store_for_compute_,
    uses_autocast,
)
from .ref_sync import sync_reference_
from .resume import set_base_lr
from .rewards import DEFAULT_ROLES, RewardSpec, combine_rewards, get_reward
from .rollout import NonFiniteLogitsError, Rollout, generate_groups
from .samples import train_rows
from .sampling import SamplingConfig

BAR = {"reward": ".2f", "accuracy": ".2f", "kl": ".3f", "completion_len": ".0f"}   # beside the bar


def rewards_from_config(entries) -> list[RewardSpec]:
    """``grpo.rewards`` entries ({name, weight, [role], options…}) → RewardSpecs."""
    specs = []
    for e in entries:
        e = dict(e)
        name, weight = e.pop("name"), float(e.pop("weight", 1.0))
        role = e.pop("role", DEFAULT_ROLES.get(name))
        specs.append(RewardSpec(name, get_reward(name, **e), weight, role))
    return specs


class GRPOTrainer:
    """GRPO on a ``Policy`` (see grpo_core.policy) over a list of VQA records."""

    def __init__(self, policy, train_records, cfg: TrainConfig, ref_policy=None,
                 reward_specs=None, prompt_fn=None, eval_fn=None, dist: DistContext | None = None):
        cfg.validate()
        if len(train_records) < cfg.rollout.prompts_per_step:
            raise ValueError(f"GRPOTrainer: {len(train_records)} training records < rollout.prompts_per_step="
                             f"{cfg.rollout.prompts_per_step}")
        self.dist = dist or DistContext()
        if cfg.rollout.prompts_per_step % self.dist.world:
            raise ValueError(f"GRPOTrainer: rollout.prompts_per_step={cfg.rollout.prompts_per_step} is not a multiple "
                             f"of the {self.dist.world} ranks; each rank takes an equal share of whole groups")
        self.policy, self.records, self.cfg = policy, list(train_records), cfg
        self.eval_fn = eval_fn                        # policy -> {name: value} (the harness)
        self.prompt_fn = prompt_fn or make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, cfg.run.seed,
                                                     max_image_pixels=cfg.data.max_image_pixels)
        self._bad_rows: set = set()                               # (file, row) of skipped records, logged once
        self.specs = reward_specs if reward_specs is not None else rewards_from_config(cfg.grpo.rewards)
        # precision (grpo_core.precision): fp32 master weights, arithmetic in model.dtype under autocast
        self.device = policy.device
        self.compute_dtype = resolve_compute_dtype(cfg.model.dtype, self.device)
        check_trainable_compute(self.compute_dtype, "GRPOTrainer")
        self.ref_policy = self._make_reference(ref_policy)        # a frozen copy of the loaded policy
        master_weights_(policy.model)
        built_ref = ref_policy is None and self.ref_policy not in (None, "adapters")
        if built_ref and uses_autocast(self.compute_dtype):   # bf16 matmul weights, exact (precision.py)
            store_for_compute_(self.ref_policy.model, self.compute_dtype, like=policy.model)
        # data parallelism: wrap (DDP / FSDP2 or nothing) before the optimizer sees the parameters
        self.replica = self.dist.replicate(policy, reshard_after_forward=cfg.dist.reshard_after_forward,
                                           compute_dtype=self.compute_dtype)
        self.ref_replica = (self.dist.replicate(self.ref_policy, trainable=False, compute_dtype=self.compute_dtype)
                            if self.ref_policy not in (None, "adapters") else None)
        o = cfg.optim
        self.optimizer = make_optimizer(policy.model, o.lr, o.weight_decay, o.betas,
                                        offload=o.offload_states)
        self.scheduler = make_scheduler(self.optimizer, o.lr_warmup_steps,
                                        cfg.run.steps * cfg.grpo.mu, o.schedule)
        self.step_idx, self.data_pos, self.history = 0, 0, []
        self._last_scored: tuple | None = None   # the last scored batch, for samples.jsonl (last_samples)
        self.autocast = autocast(self.device, self.compute_dtype)
        self.export_dtype = resolve_export_dtype(cfg.run.export_dtype, cfg.model.dtype, self.device)

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

    def _draw_record(self):
        """The record at the data position in an epoch-wise permutation seeded by (seed, epoch),
        drawn once per epoch; the position moves on, so a run resumes by position."""
        n = len(self.records)
        epoch, i = divmod(self.data_pos, n)
        if getattr(self, "_perm", (None,))[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.run.seed + 17 * epoch)
            self._perm = (epoch, torch.randperm(n, generator=g).tolist())
        self.data_pos += 1
        return self.records[self._perm[1][i]]

    def _next_prompts(self):
        """This rank's prompts of the step's B records (and the records as shown), plus how many were
        skipped. A record whose images cannot be used (data.ImageLoadError) is skipped, logged once,
        counted, and replaced by the next one; every rank draws and checks the same B records, so
        the data position stays the same on all of them, and a resume never meets that record again."""
        B, skipped, prompts, shown = self.cfg.rollout.prompts_per_step, 0, [], []
        while len(prompts) < B:
            record = self._draw_record()
            try:
                (p,), (r,) = self.prompt_fn([record])
            except ImageLoadError as e:
                skipped += 1
                if skipped > len(self.records):
                    raise ImageLoadError(e.file, e.row, f"every training record tried in step {self.step_idx + 1} "
                                         f"has an unusable image ({skipped} in a row); the last one", str(e)) from None
                if (e.file, e.row) not in self._bad_rows:
                    self._bad_rows.add((e.file, e.row))
                    if self.dist.is_main:
                        print(f"grpo: step {self.step_idx + 1}: skipping a record: {e}", file=sys.stderr, flush=True)
                continue
            prompts.append(p)
            shown.append(r)
        own = self.dist.shard(list(range(B)))                      # this rank's B/W prompts of the batch
        return [prompts[i] for i in own], [shown[i] for i in own], skipped

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> dict:
        g, G = self.cfg.grpo, self.cfg.rollout.group_size
        times = [0.0, 0.0, 0.0]
        ds = DynamicSampling(self.cfg.rollout.prompts_per_step, G, g.dynamic_sampling_max_rounds)
        exps, rows, rollouts, skipped_records = [], [], [], 0
        while True:                                                # one round, or DAPO's refill rounds
            t0 = time.perf_counter()
            prompts, records, n_bad = self._next_prompts()        # this rank's B/W prompts of the step's batch
            skipped_records += n_bad
            ro = self.rollout(prompts)                             # 1. G completions per prompt
            t1 = time.perf_counter()
            exp, r = self.score(ro, records)                       # 2. rewards → advantages, old/ref log-probs
            times[0], times[1] = times[0] + t1 - t0, times[1] + time.perf_counter() - t1
            exps.append(exp), rows.append(r), rollouts.append(ro)
            if not g.dynamic_sampling:
                break
            kept = ds.add(r.total)                                 # informative groups, over every rank's rows
            first = r.own.start // G                               # this rank's first prompt among all ranks'
            exp.keep = [k - first for k in kept if 0 <= k - first < exp.num_prompts]
            if not ds.wants_more():
                break
        t2 = time.perf_counter()
        upd = self.update(exps)                                    # 3. μ optimizer steps
        times[2] = time.perf_counter() - t2
        self.step_idx += 1
        if g.ref_sync_steps and self.step_idx % g.ref_sync_steps == 0:   # ref ← α·policy + (1 − α)·ref
            sync_reference_(self.ref_policy.model, self.policy.model, g.ref_sync_alpha)
        m = self._metrics(RowResults.cat(rows), upd, rollouts, times)
        m["skipped_records"] = skipped_records                  # records whose images could not be used
        return {**m, **ds.metrics()} if g.dynamic_sampling else m

    def rollout(self, prompts) -> Rollout:
        """B prompts → N = B·G sampled completions, seeded by (run seed, step, rank)."""
        seed = int(self._generator(1 + 1000 * self.dist.rank).initial_seed())
        sampling = SamplingConfig(**self.cfg.rollout.sampling_options(), seed=seed)
        self.policy.model.eval()
        try:
            with self.replica.gathered(), self.autocast:
                return generate_groups(self.policy, prompts, self.cfg.rollout.group_size, sampling)
        except NonFiniteLogitsError as e:
            raise NonFiniteLogitsError(f"GRPO step {self.step_idx + 1}: {e}") from None

    def score(self, ro: Rollout, records) -> tuple[Experience, RowResults]:
        """Rewards, advantages and the fixed log-probs of one rollout → (Experience, every rank's rows)."""
        g, G = self.cfg.grpo, ro.group_size
        enc, ids, mask = ro.encoded, ro.completion_ids, ro.completion_mask                  # mask (N, C) bool
        total, columns = combine_rewards(self.specs, ro.texts, [r for r in records for _ in range(G)],
                                         completion_tokens=ro.lengths.tolist(),
                                         step=self.step_idx + 1)                           # (N,)
        ref_lp = self.logprobs(enc, ids, mask, "reference") if self.ref_policy is not None else None  # (N, C)
        cur_lp = None
        if g.kl_placement == "reward" or g.mu > 1:                # the sampling policy's log-probs, once
            cur_lp = self.logprobs(enc, ids, mask)
        if g.kl_placement == "reward":
            total = kl_penalized_rewards(total, cur_lp, ref_lp, mask, g.beta, g.kl)
        rows = RowResults.gather(self.dist, total, ro.lengths, ro.truncated, columns)      # one collective
        adv = group_advantages(rows.total, G, scale=g.adv_scale, baseline=g.baseline)[rows.own].to(self.device)  # (N,)
        zero_std = group_reward_std(rows.total[rows.own], G) == 0                         # (B,)
        keep = [b for b in range(len(zero_std)) if not (g.skip_zero_std_groups and zero_std[b])]
        if g.mask_truncated_completions:                          # DAPO: truncated completions out of the loss
            mask = mask_truncated(mask, ro.truncated)
        exp = Experience(enc, ids, mask, adv, cur_lp if g.mu > 1 else None,
                         ref_lp if g.kl_placement == "loss" else None, G, keep)
        # -- sample logging (grpo_core.samples): kept by reference; rows are built only when written --
        self._last_scored = (records, ro.texts, columns, total, adv, G)
        return exp, rows

    def last_samples(self) -> list[dict]:
        """A few rows (prompt, completion, rewards, advantage) of the last scored batch on this rank;
        built on demand, so a step that writes no samples pays nothing (no device syncs)."""
        if self._last_scored is None:
            return []
        return train_rows(*self._last_scored, self.cfg.run.log_completions)

    def logprobs(self, enc, ids, mask, of: str = "policy") -> torch.Tensor:
        """Log-probs (N, C) of given completions (N = B·G rows of the B prompts in ``enc``) under the
        policy (``of="policy"``) or the reference: no grad, ``grpo.micro_batch_prompts`` whole groups
        per forward. The reference is a frozen copy, or the policy with its LoRA adapters off."""
        which = self.policy if of == "policy" else self.ref_policy
        if which is None:
            raise ValueError("GRPOTrainer.logprobs: no reference model (grpo.beta = 0 builds none)")
        if which == "adapters":
            with self.policy.disable_adapters():
                return self.logprobs(enc, ids, mask, "policy")
        replica = self.replica if which is self.policy else self.ref_replica
        g, T, G = self.cfg.grpo, self.cfg.rollout.temperature, self.cfg.rollout.group_size
        B = ids.shape[0] // G
        step = g.micro_batch_prompts or B
        out = []
        with replica.gathered(), self.autocast:
            for s in range(0, B, step):
                pidx = list(range(s, min(B, s + step)))
                rows = slice(s * G, (s + len(pidx)) * G)
                h = self._compute(replica.hidden(enc.select(pidx), ids[rows], mask[rows], G))   # (n, C, H)
                out.append(linear_token_logprobs(h, which.lm_head_weight.to(h.dtype), ids[rows], T, mask=mask[rows],
                                                 bias=which.lm_head_bias, backend=g.backend))
        return torch.cat(out)                                                                    # (N, C)

    def update(self, exps: Experience | list[Experience]) -> dict:
        """μ optimizer steps on the step's Experience (a list: one per DAPO refill round); every rank
        calls it (collectives inside).

        Each pass shuffles the kept groups into micro-batches of ``grpo.micro_batch_prompts`` whole
        groups and accumulates their gradients, every micro-batch loss divided by the denominators
        of the whole step (all micro-batches, all rounds, all ranks): one optimizer step = one big batch.
        """
        cfg, g, d = self.cfg, self.cfg.grpo, self.dist
        exps = [exps] if isinstance(exps, Experience) else list(exps)
        skipped = sum(e.num_prompts - len(e.keep) for e in exps)
        if d.all_reduce(sum(len(e.keep) for e in exps)) == 0:   # every group (on every rank) was equal: skipped
            return {"loss": 0.0, "grad_norm": 0.0, "nonfinite_steps": 0, "skipped_groups": d.all_reduce(skipped)}
        self.policy.model.train()
        total_tokens = d.all_reduce(sum(e.kept_tokens() for e in exps).float())    # denominators of the step
        total_seqs = int(d.all_reduce(sum(len(e.keep) * e.group_size for e in exps)))
        sums: dict[str, float] = {"nonfinite_steps": 0}
        for it in range(g.mu):
            chunks = self._micro_batches(exps, it)                  # [(experience index, prompts)]
            n_chunks = int(d.all_reduce(len(chunks), "max"))   # every rank runs as many micro-batches
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            for c in range(n_chunks):
                # 0.0: a filler for sync
                (i, prompts), weight = (chunks[c], 1.0) if c < len(chunks) else ((0, [0]), 0.0)
                with self.replica.accumulate(sync=c == n_chunks - 1):
                    with self.autocast:
                        loss, m = self.micro_loss(exps[i].groups(prompts), total_tokens, total_seqs)
                    (loss * (weight * self.replica.grad_scale)).backward()   # × W: DDP/FSDP average over ranks
                finite &= bool(torch.isfinite(loss))
                w = weight * m["tokens"].item() / max(total_tokens.item(), 1.0)   # token-weighted metric average
                for k, v in m.items():
                    if k != "tokens":
                        sums[k] = sums.get(k, 0.0) + w * float(v) / g.mu
                sums["loss"] = sums.get("loss", 0.0) + weight * loss.item() / g.mu
            params = [p for p in self.policy.model.parameters() if p.grad is not None]
            gn = local_value(torch.nn.utils.clip_grad_norm_(
                params, cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")))   # global norm
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + gn / g.mu
            if d.all_reduce(float(not finite), "max") > 0 or not math.isfinite(gn):
                self.optimizer.zero_grad(set_to_none=True)   # NaN/inf loss or gradient: skip this step,
                sums["nonfinite_steps"] += 1                 # weights and LR schedule stay as they were
                continue
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["skipped_groups"] = skipped
        return d.reduce_sums(sums, same=("grad_norm", "nonfinite_steps"))   # local shares of global means → global

    def _micro_batches(self, exps: list[Experience], it: int) -> list[tuple[int, list[int]]]:
        """Pass ``it``: each Experience's kept prompts shuffled (seeded by step, pass and round) and cut
        into micro-batches of ``grpo.micro_batch_prompts`` whole groups (0 = all of one round);
        with ``grpo.micro_batch_tokens`` > 0 a micro-batch also closes before its tokens (prompt +
        counted completion tokens of its groups) would pass that budget (a larger group goes
        alone)."""
        out, budget = [], self.cfg.grpo.micro_batch_tokens
        for i, e in enumerate(exps):
            mb = self.cfg.grpo.micro_batch_prompts or max(len(e.keep), 1)
            perm = torch.randperm(len(e.keep), generator=self._generator(100 + it + 1000 * i))
            order = [e.keep[j] for j in perm]
            cur, used = [], 0
            for p in order:
                n = 0 if not budget else (int(e.encoded.attention_mask[p].sum())
                                          + int(e.mask[e.rows([p])].sum()))   # group's tokens
                if cur and (len(cur) == mb or used + n > budget > 0):
                    out.append((i, cur))
                    cur, used = [], 0
                cur, used = cur + [p], used + n
            out += [(i, cur)] if cur else []
        return out

    def _compute(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states in the compute dtype for the fused lm_head + loss: it runs outside autocast's op
        lists, and the fp32 residual stream of an fp32-master model would make its GEMM fp32."""
        return compute_cast(h, self.compute_dtype)

    def micro_loss(self, mb: Experience, total_tokens, total_seqs):
        """GRPO loss of one micro-batch of whole groups, divided by the step's global denominators."""
        cfg, g = self.cfg, self.cfg.grpo
        h = self._compute(self.replica.hidden(mb.encoded, mb.completion_ids, mb.mask, mb.group_size))  # (n, C, H)
        opts = {**loss_options(g), "beta": g.beta if mb.ref_logprobs is not None else 0.0,   # every grpo.* loss option
                "max_len": g.max_len or cfg.rollout.max_new_tokens}
        return fused_linear_grpo_loss(
            h, self.policy.lm_head_weight.to(h.dtype), mb.completion_ids,                  # bf16 h and W: fp32 grads
            mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.mask, bias=self.policy.lm_head_bias,
            temperature=cfg.rollout.temperature, total_tokens=total_tokens, total_seqs=total_seqs,
            backend=g.backend, **opts)

    def _metrics(self, rows: RowResults, upd: dict, rollouts: list[Rollout], times) -> dict:
        """The step's metrics over every rank's rows; "accuracy" / "format_rate" by reward role."""
        G = self.cfg.rollout.group_size
        total = rows.total
        tokens = sum(ro.stats.get("tokens", 0) for ro in rollouts)
        seconds = sum(ro.stats.get("prefill_s", 0.0) + ro.stats.get("decode_s", 0.0) for ro in rollouts)
        m = {"step": self.step_idx, "lr": self.scheduler.get_last_lr()[0], **upd,
             "reward": total.mean().item(), "reward_std": total.std().item() if total.numel() > 1 else 0.0,
             "zero_std_frac": (group_reward_std(total, G) == 0).float().mean().item(),
             "completion_len": rows.lengths.mean().item(), "completion_len_max": rows.lengths.max().item(),
             "truncated_frac": rows.truncated.mean().item(),
             "tokens_per_s": self.dist.all_reduce(tokens / max(seconds, 1e-9)),                # all ranks together
             "time_rollout": times[0], "time_scoring": times[1], "time_update": times[2]}     # this rank's
        for name, col in rows.columns.items():
            m[f"reward/{name}"] = col.mean().item()
        for role, key in (("accuracy", "accuracy"), ("format", "format_rate")):   # the first reward of each role
            name = next((s.name for s in self.specs if s.role == role), None)
            m[key] = m[f"reward/{name}"] if name else float("nan")
        return m

    # ---- the loop: grpo_core.harness -------------------------------------------------------------
    @property
    def updates_per_step(self) -> int:
        return self.cfg.grpo.mu          # a step whose μ updates were all skipped changed nothing

    def train(self, save_at_end: bool = False) -> list[dict]:
        """Run to ``run.steps`` under the run harness (grpo_core.harness: resume, metrics.jsonl,
        evals, samples, healthy checkpoints, Ctrl-C/SIGTERM, run folder lock, time budget);
        ``save_at_end``: also checkpoint the last step (``grpo train`` does)."""
        return run_training(self, self.cfg.run, self.cfg.run.steps, name="grpo",
                            eval_fn=self.eval_fn, config=to_dict(self.cfg), bar=BAR,
                            save_at_end=save_at_end)

    def save(self) -> str:
        """Call on every rank: FSDP2 gathers the full state to rank 0, which alone writes. (The
        harness checks the weights' health and the free space first.)"""
        model_state, optim_state = self.replica.full_state(self.optimizer)   # (None, None) unless fsdp2
        ref_state = self._synced_reference_state()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.cfg.run.output_dir, self.step_idx, self.policy, self.optimizer,
                                   self.scheduler, {"data_pos": self.data_pos}, keep_last=self.cfg.run.keep_last,
                                   model_state=model_state, optim_state=optim_state, config=to_dict(self.cfg),
                                   ref_state=ref_state, export_dtype=self.export_dtype)
        self.dist.barrier()                   # no rank reads a checkpoint before it is whole
        return path or checkpoint_path(self.cfg.run.output_dir, self.step_idx)

    def resume(self, path: str, verify: bool = True) -> None:
        """Continue checkpoint ``path``: weights, optimizer, schedule, step and data position (and a
        synced reference); a changed ``optim.lr`` takes effect (grpo_core.resume.set_base_lr)."""
        ref = self.ref_policy.model if self._ref_is_synced() else None
        state = load_checkpoint(path, self.policy, self.optimizer, self.scheduler, verify=verify, ref_model=ref)
        set_base_lr(self.optimizer, self.scheduler, self.cfg.optim.lr)
        self.step_idx, self.data_pos = int(state["step"]), int(state["data_pos"])

    def _ref_is_synced(self) -> bool:
        return bool(self.cfg.grpo.ref_sync_steps) and self.ref_policy not in (None, "adapters")

    def _synced_reference_state(self) -> dict | None:
        """A synced reference is run state: its (full) weights go into the checkpoint."""
        if not self._ref_is_synced():
            return None
        full, _ = self.ref_replica.full_state(None)              # FSDP2: gathered to rank 0
        return full if full is not None else self.ref_policy.model.state_dict()
