"""The data of one GRPO step, typed: what scoring hands to the update, and what the step logs.

    Rollout ──score──► Experience (this rank's rows: everything the loss needs)
                   └─► RowResults (every rank's rows: rewards, lengths — gathered once, for the
                                   group advantages and the step's metrics)

Layout: B prompts, G completions each, N = B·G rows in prompt-major order (row i belongs to
prompt i // G), C completion tokens. One dtype per tensor, kept end to end: the mask is bool,
token ids int64, log-probs and advantages fp32 (fp64 when the policy is fp64, in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Experience:
    """Scored rollouts of this rank's B prompts: the input of ``GRPOTrainer.update``."""

    encoded: Any                             # the policy's Encoded batch of B prompts (images included)
    completion_ids: torch.Tensor             # (N, C) int64, padded after EOS
    mask: torch.Tensor                       # (N, C) bool: tokens that count in the loss
    advantages: torch.Tensor                 # (N,) fp32, group-relative
    old_logprobs: torch.Tensor | None        # (N, C) π_old, the sampling policy (μ > 1), else None
    ref_logprobs: torch.Tensor | None        # (N, C) π_ref when the KL term is in the loss, else None
    group_size: int                          # G
    keep: list[int] = field(default_factory=list)   # prompts whose groups enter the update

    @property
    def num_prompts(self) -> int:
        return self.completion_ids.shape[0] // self.group_size

    def rows(self, prompts) -> torch.Tensor:
        """Row indices (len(prompts)·G,) of the given prompts' groups, in that order."""
        G = self.group_size
        if not len(prompts):
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(p * G, (p + 1) * G) for p in prompts])

    def groups(self, prompts) -> "Experience":
        """The sub-batch of whole groups ``prompts`` (a micro-batch), prompts renumbered 0…."""
        r = self.rows(prompts)
        pick = lambda t: None if t is None else t[r]          # noqa: E731
        return replace(self, encoded=self.encoded.select(list(prompts)), completion_ids=self.completion_ids[r],
                       mask=self.mask[r], advantages=self.advantages[r], old_logprobs=pick(self.old_logprobs),
                       ref_logprobs=pick(self.ref_logprobs), keep=list(range(len(prompts))))

    def kept_tokens(self) -> torch.Tensor:
        """Number of counted tokens in the kept groups (a 0-dim tensor)."""
        return self.mask[self.rows(self.keep)].sum()


@dataclass
class RowResults:
    """Per-row results of every rank, gathered in one collective (rank order, then row order)."""

    total: torch.Tensor                      # (N_all,) fp32 reward that enters the advantages
    lengths: torch.Tensor                    # (N_all,) completion tokens (EOS included)
    truncated: torch.Tensor                  # (N_all,) 1.0 where the completion hit max_new_tokens
    columns: dict[str, torch.Tensor]         # reward name → (N_all,) its unweighted values
    own: slice                               # this rank's rows within the N_all

    @classmethod
    def gather(cls, dist, total, lengths, truncated, columns: dict) -> "RowResults":
        """Stack this rank's (N,) vectors into one (N, 3 + R) matrix and all-gather it once."""
        names = list(columns)
        local = torch.stack([total.float().cpu(), lengths.float().cpu(), truncated.float().cpu(),
                             *(columns[k].float().cpu() for k in names)], 1)            # (N, 3 + R)
        rows, own = dist.gather_rows(local)                                              # (N_all, 3 + R)
        col = [c.contiguous() for c in rows.unbind(1)]     # contiguous: reductions sum in plain row order
        return cls(col[0], col[1], col[2], {k: col[3 + j] for j, k in enumerate(names)}, own)

    @classmethod
    def cat(cls, parts: list["RowResults"]) -> "RowResults":
        """The rows of several rounds of one step (DAPO refills), in round order; ``own`` is the first's."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.total for p in parts]), torch.cat([p.lengths for p in parts]),
                   torch.cat([p.truncated for p in parts]),
                   {k: torch.cat([p.columns[k] for p in parts]) for k in parts[0].columns}, parts[0].own)
