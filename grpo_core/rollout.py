"""Rollout engine: G completions per prompt, each prompt prefilled once.

    encode B prompts once ──► for each chunk of whole groups (≤ max_batch_sequences rows):
        prefill the chunk's b prompts ONCE           → logits (b, V), state for b rows
        expand(state, G)                             → state for n = b·G rows, prompt-major
        repeat: sample_next(logits) → token per row  → decode_step(state, tokens) → logits (n, V)
        until every row has emitted an EOS or max_new_tokens is reached

Why prefill once: with images, the prompt (hundreds of image tokens) is most of the forward
cost; HF ``generate(num_return_sequences=G)`` expands the prompt rows G times *before* the
language-model prefill, so it pays that prefill G times (transformers 5.24 runs the vision tower
once per image, as we do). Sharing it removes (G − 1)/G of the language-model prefill.

How the fanned-out state is stored is the policy's business: the Qwen2-VL policy keeps the prompt
KV once per prompt and shares it across the group's G rows (``models/prefix_decode.py``), so only
each row's completion KV is per row. The engine only needs prefill / expand / decode_step.

Row order is prompt-major (row i belongs to prompt i // G), the order ``generate`` uses for
``num_return_sequences`` and the order ``group_advantages`` expects.

Deviations / choices, stated once:
  - Finished rows are fed ``pad_token_id`` (masked out) until they can leave: a policy with the
    optional ``compact_state(state, prompts, rows, g')`` gets, once the live rows fit in
    ≤ ``compact_below`` of the batch, only the prompts with a live row and g' slots each
    (``_compaction``); their K/V, positions and sampler streams (keyed by row) move with them.
  - A policy with the optional ``plan_decode(state, capacity, graphs, compile)`` sizes its decode
    buffers once for the budget and picks how steps run (CUDA graph / compiled / eager).
  - Host syncs: on a GPU the stop / EOS / NaN check (one ``.tolist()``) runs every 8 steps.
  - The recorded log-prob is the one of ``grpo_core.sampling.sample_next``: log_softmax of
    (logits + lm_head_bias) / T before top-k / top-p / min-p, i.e. what the trainer recomputes.
  - No forward is run after the last sampled token: the logits it would give are never used.
  - Sampling does not depend on the batch: row (prompt b, sample g) draws its step-t uniform from
    ``counter_uniforms(key, b, g, t)`` (key = the seed; the trainer's seed already encodes run
    seed, step and rank), so chunking (``max_batch_sequences``) leaves every completion unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from grpo_core.policy import Encoded, Policy, Prompt
from grpo_core.sampling import SamplingConfig, counter_uniforms, draw_key, sample_next


class NonFiniteLogitsError(FloatingPointError):
    """The policy returned NaN/inf next-token logits: its weights are damaged or diverged."""


@dataclass
class Rollout:
    encoded: Any                   # the policy's Encoded for the B prompts (reused by the trainer)
    completion_ids: torch.Tensor   # (N, C) int64, right-padded with pad_token_id
    completion_mask: torch.Tensor  # (N, C) bool, True on generated tokens up to and including EOS
    logprobs: torch.Tensor         # (N, C) fp32, sampling log-probs (0 on padding): the sampler's
                                   # own, checked against teacher forcing (tests/test_rollout.py)
    truncated: torch.Tensor        # (N,) bool, hit max_new_tokens without EOS (else: emitted EOS)
    texts: list[str]               # (N) decoded completions (no special tokens); row i: prompt i//G
    group_size: int = 1            # G
    stats: dict = field(default_factory=dict)  # prefill_s, decode_s, tokens, tokens_per_s, steps, ...

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) number of completion tokens that count (EOS included)."""
        return self.completion_mask.sum(-1)


@dataclass
class _Chunk:
    ids: torch.Tensor       # (n, c) int64
    mask: torch.Tensor      # (n, c) bool
    logprobs: torch.Tensor  # (n, c) fp32
    finished: torch.Tensor  # (n,) bool
    steps: int              # decode steps taken (= c)
    prefill_s: float
    decode_s: float
    rows_decoded: int = 0   # Σ over decode steps of the batch size (compaction lowers it)
    compactions: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_chunk(
    policy: Policy, enc: Encoded, G: int, cfg: SamplingConfig, key: int, first_prompt: int, bias,
    eos, progress,
) -> _Chunk:
    """Prefill b prompts once, fan out to n = b·G rows, sample until all EOS or the budget.

    Row r of the chunk is (prompt first_prompt + r // G, sample r % G); its draws come from
    ``counter_uniforms`` at that key, so they do not depend on the chunk's other rows. The batch
    holds slots; ``rows`` (slots,) says which row each slot decodes (compaction moves rows).
    """
    device, pad, T_max = policy.device, policy.pad_token_id, cfg.max_new_tokens
    t0 = time.perf_counter()
    logits, state = policy.prefill(enc)                                  # (b, V), b-row state
    state = policy.expand(state, G)                                      # n-row state; b-row one freed
    if hasattr(policy, "plan_decode"):                                   # size buffers once
        state = policy.plan_decode(state, T_max - 1, cfg.graphs, cfg.compile)
    compact = getattr(policy, "compact_state", None) if cfg.compact_below > 0 else None
    logits = logits.repeat_interleave(G, dim=0)                          # (n, V)
    _sync(device)
    t1 = time.perf_counter()

    n = logits.shape[0]
    rows = torch.arange(n, device=device)                                # (slots,) row of each slot
    prompt, sample = first_prompt + rows // G, rows % G                  # (n,) each: a row's stream
    u = None if cfg.greedy else counter_uniforms(key, prompt, sample, T_max)   # (n, T_max)
    ids = torch.full((n, T_max), pad, dtype=torch.long, device=device)   # (n, T_max)
    logps = torch.zeros((n, T_max), dtype=torch.float32, device=device)  # (n, T_max)
    alive_at = torch.zeros((n, T_max), dtype=torch.bool, device=device)  # (n, T_max) row open at step t
    alive = torch.ones(n, dtype=torch.bool, device=device)               # (slots,)
    broken = torch.zeros(n, dtype=torch.bool, device=device)             # (slots,) NaN/inf, open
    # On a GPU, `alive.sum()` is a host sync that stalls the launch queue: test it every few steps.
    check_every = 1 if device.type == "cpu" else 8
    steps, g, moved, rows_decoded, compactions = 0, G, False, 0, 0
    for t in range(T_max):
        ut = None if u is None else (u[rows, t] if moved else u[:, t])   # (slots,)
        tok, lp = sample_next(logits, cfg, None, bias, ut)               # (slots,), (slots,)
        broken |= torch.isnan(lp) & alive                                # no sync: checked with `alive`
        tok = tok.masked_fill_(~alive, pad)                              # finished rows feed pad
        if moved:
            ids[rows, t], logps[rows, t], alive_at[rows, t] = tok, lp, alive
        else:
            ids[:, t], logps[:, t], alive_at[:, t] = tok, lp, alive
        alive &= ~torch.isin(tok, eos)                                   # EOS closes the row after it
        steps = t + 1
        if progress is not None:
            progress(t + 1, T_max)
        if steps == T_max or steps % check_every == 0:
            n_alive, any_broken = torch.stack([alive.sum(), broken.any()]).tolist()  # host sync
            if any_broken:
                _raise_if_broken(rows[broken], t, G)
            if steps == T_max or not n_alive:
                break
            plan = None if compact is None else _compaction(alive, g, n_alive, cfg.compact_below)
            smaller = None if plan is None else compact(state, *plan)
            if plan is not None and smaller is None:                     # cannot be compacted
                compact = None
            elif smaller is not None:
                keep, slots, g = plan
                state = smaller
                tok, alive, broken, rows = tok[slots], alive[slots], broken[slots], rows[slots]
                moved, compactions = True, compactions + 1
        rows_decoded += tok.shape[0]
        logits, state = policy.decode_step(state, tok)                   # (slots, V)
    del state, logits
    _raise_if_broken(rows[broken], steps - 1, G)
    _sync(device)
    t2 = time.perf_counter()
    # On a GPU the loop may run a few all-finished steps past the last EOS: crop them. Columns of
    # alive_at are monotone (a closed row never reopens), so open columns form a prefix.
    steps = int(alive_at[:, :steps].any(0).sum())
    mask = alive_at[:, :steps]                                           # (n, c)
    logps = logps[:, :steps].masked_fill_(~mask, 0.0)                    # (n, c)
    finished = (torch.isin(ids[:, :steps], eos) & mask).any(1)           # (n,) emitted an EOS
    return _Chunk(ids[:, :steps], mask, logps, finished, steps, t1 - t0, t2 - t1, rows_decoded,
                  compactions)


def _compaction(alive: torch.Tensor, g: int, n_alive: int, ratio: float):
    """Finished rows leave the batch: → (prompts (b',), slots (b'·g'), g') to keep, or None.

    The batch is prompt-major, g slots per prompt. Prompts with no live slot go; each kept prompt
    keeps g' = max live slots of any prompt (its live slots, then finished ones as filler), so the
    result is still prompt-major. Done only when b'·g' ≤ ratio · slots (shapes change rarely: few
    CUDA graphs, few copies of the K/V).
    """
    n = alive.shape[0]
    if n_alive > ratio * n:                                              # b'·g' ≥ n_alive
        return None
    live = alive.view(n // g, g).cpu()                                   # (b, g)
    counts = live.sum(1)                                                 # (b,)
    keep = counts.nonzero().flatten()                                    # (b',)
    g2 = int(counts.max())
    if keep.numel() * g2 > ratio * n:
        return None
    order = torch.sort(live[keep].long(), dim=1, descending=True, stable=True).indices
    order = order[:, :g2]                                                # (b', g') live slots first

    slots = (keep[:, None] * g + order).flatten()                        # (b'·g',) live first
    return keep.to(alive.device), slots.to(alive.device), g2


def _raise_if_broken(rows: torch.Tensor, step: int, G: int) -> None:
    """``rows``: the chunk rows whose logits were NaN/inf (empty: nothing to report)."""
    if rows.numel():
        rows = rows.sort().values.tolist()
        prompts = sorted({r // G for r in rows})
        raise NonFiniteLogitsError(
            f"generate_groups: NaN/inf next-token logits by decode step {step} in rows {rows[:8]} "
            f"(prompts {prompts[:8]} of this chunk); the policy's weights are damaged or diverged: "
            "check the checkpoint it was loaded from and the learning rate")


def _right_pad(x: torch.Tensor, width: int, value) -> torch.Tensor:
    """(n, c) → (n, width) padded on the right with ``value``."""
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def generate_groups(
    policy: Policy,
    prompts: Sequence[Prompt] | Encoded,
    group_size: int,
    sampling: SamplingConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each of B prompts → Rollout with N = B·G rows.

    ``prompts`` is a list of ``Prompt`` (encoded here, once) or an already encoded batch.
    ``progress(step, max_new_tokens)`` is called after every decode step of every chunk.
    """
    cfg = sampling if sampling is not None else SamplingConfig()
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"generate_groups: group_size must be a positive int, got {group_size!r}")
    enc = prompts if isinstance(prompts, Encoded) else policy.encode(list(prompts))
    B, G = enc.input_ids.shape[0], group_size
    if B == 0:
        raise ValueError("generate_groups: got no prompts; pass at least one Prompt")
    device = policy.device
    bias = policy.lm_head_bias
    bias = None if bias is None else bias.to(device=device, dtype=torch.float32)  # (V,)
    eos = torch.tensor(sorted(set(policy.eos_token_ids)), dtype=torch.long, device=device)
    key = draw_key(cfg)                                                  # the run's sample stream
    per_chunk = max(1, cfg.max_batch_sequences // G)                     # prompts per chunk

    chunks = []
    with torch.no_grad():
        for s in range(0, B, per_chunk):
            sub = enc if per_chunk >= B else enc.select(list(range(s, min(B, s + per_chunk))))
            chunks.append(_decode_chunk(policy, sub, G, cfg, key, s, bias, eos, progress))

    C = max(c.steps for c in chunks)
    ids = torch.cat([_right_pad(c.ids, C, policy.pad_token_id) for c in chunks])       # (N, C)
    mask = torch.cat([_right_pad(c.mask, C, False) for c in chunks])                  # (N, C) bool
    logps = torch.cat([_right_pad(c.logprobs, C, 0.0) for c in chunks])               # (N, C)
    finished = torch.cat([c.finished for c in chunks])                                # (N,)
    prefill_s = sum(c.prefill_s for c in chunks)
    decode_s = sum(c.decode_s for c in chunks)
    tokens = int(mask.sum())
    stats = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens": tokens,
        "tokens_per_s": tokens / max(prefill_s + decode_s, 1e-9),
        "steps": sum(c.steps for c in chunks),
        "decode_ms_per_step": 1e3 * decode_s / max(sum(c.steps for c in chunks), 1),
        "chunks": len(chunks),
        "rows_decoded": sum(c.rows_decoded for c in chunks),   # Σ batch size over decode steps
        "compactions": sum(c.compactions for c in chunks),
        "sequences": B * G,
    }
    return Rollout(
        encoded=enc,
        completion_ids=ids,
        completion_mask=mask,
        logprobs=logps,
        truncated=~finished,
        texts=policy.decode(ids, mask),
        group_size=G,
        stats=stats,
    )
