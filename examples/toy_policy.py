"""A policy without transformers: a position-aware bigram LM that implements grpo_core's Policy.

    python examples/toy_policy.py          # a few GRPO steps in seconds: the reward goes up

What the engine needs from a model is small (grpo_core/policy.py): encode prompts, prefill them
once, fan the decode state out to G rows, decode one token for every row, and — for training —
the hidden states that predict each completion token. Here:

    hidden(prev token t, position p) = E[t] + P[p]           (H,)
    logits                           = hidden @ Wᵀ            (V,)   W is the lm_head

so the decode state is just each row's position, and ``completion_hidden`` is a gather. Token ids:
0 = pad, 1 = EOS, 2… text (one id per character). ``suppressed`` ids get −inf in ``lm_head_bias``
(as a VLM's vision tokens do): the sampler never emits them and the loss never scores them.
The rollout tests use this same class (with ``eos_logit`` to tune how often rows stop, and
``prefill_rows`` to check that each prompt is prefilled once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ToyEncoded:
    input_ids: torch.Tensor       # (B, P) left-padded
    attention_mask: torch.Tensor  # (B, P) 0 on padding

    def select(self, prompt_idx) -> "ToyEncoded":
        idx = torch.as_tensor(list(prompt_idx), dtype=torch.long)
        return ToyEncoded(self.input_ids[idx], self.attention_mask[idx])

    def to(self, device) -> "ToyEncoded":
        return ToyEncoded(self.input_ids.to(device), self.attention_mask.to(device))


class BigramPolicy:
    """Bigram LM over V ids with a learned position embedding (see module docstring)."""

    device = torch.device("cpu")

    def __init__(self, V: int = 40, H: int = 16, eos_logit: float = 0.0, suppressed=(38, 39), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()                                     # what the optimizer trains
        self.model.E = torch.nn.Parameter(torch.randn(V, H, generator=g))            # token embedding
        self.model.P = torch.nn.Parameter(torch.randn(256, H, generator=g) * 0.5)    # position embedding
        self.model.W = torch.nn.Parameter(torch.randn(V, H, generator=g) * 0.7)      # lm_head (V, H)
        self.eos_token_ids, self.pad_token_id, self.vocab_size = (1,), 0, V
        self.eos_logit = eos_logit        # added to the EOS logit: tunes how often rows stop
        self.suppressed = list(suppressed)
        self.prefill_rows: list[int] = []  # rows of every prefill call (inspection / tests)

    # ---- what the loss needs -----------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.W

    @property
    def lm_head_bias(self) -> torch.Tensor:
        b = torch.zeros(self.vocab_size)
        b[self.suppressed] = float("-inf")
        return b

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        z = h @ self.model.W.T
        z[..., 1] += self.eos_logit
        z[..., self.suppressed] += 8.0    # these would dominate without the bias
        return z.float()

    def _logits(self, prev, pos):                                          # (n,), (n,) → (n, V)
        return self._head(self.model.E[prev] + self.model.P[pos])

    # ---- the Policy protocol -----------------------------------------------------------------
    def encode(self, prompts) -> ToyEncoded:
        seqs = [[2 + (ord(c) % 30) for c in p.text] for p in prompts]      # images are ignored
        P = max(map(len, seqs))
        ids = torch.tensor([[0] * (P - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs])
        return ToyEncoded(ids, mask)

    def prefill(self, enc: ToyEncoded):
        self.prefill_rows.append(enc.input_ids.shape[0])
        pos = enc.attention_mask.sum(-1) - 1                               # (b,) position of the last token
        return self._logits(enc.input_ids[:, -1], pos), pos

    def expand(self, state, group_size: int):
        return state.repeat_interleave(group_size)

    def compact_state(self, state, prompts, rows, group_size: int):
        return state.index_select(0, rows)                                 # rows leave the batch

    def decode_step(self, state, tokens):
        pos = state + 1
        return self._logits(tokens, pos), pos

    def completion_hidden(self, enc: ToyEncoded, completion_ids, completion_mask, group_size: int):
        last = enc.input_ids[:, -1].repeat_interleave(group_size)          # (N,)
        pos0 = (enc.attention_mask.sum(-1) - 1).repeat_interleave(group_size)
        prev = torch.cat([last[:, None], completion_ids[:, :-1]], 1)       # (N, C): the token predicting j
        pos = pos0[:, None] + torch.arange(completion_ids.shape[1])        # (N, C)
        return self.model.E[prev] + self.model.P[pos]                      # (N, C, H)

    def decode(self, ids, mask=None) -> list[str]:
        mask = torch.ones_like(ids) if mask is None else mask
        return [" ".join(str(int(t)) for t, m in zip(r, mr) if m and t > 1) for r, mr in zip(ids, mask)]

    def disable_adapters(self):
        raise NotImplementedError("BigramPolicy has no adapters; the trainer keeps a frozen copy as reference")

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        import os

        os.makedirs(path, exist_ok=True)
        state = {k: v.to(dtype) if dtype is not None else v for k, v in self.model.state_dict().items()}
        torch.save(state, os.path.join(path, "bigram.pt"))


def short_answer_reward(completions, records):
    """1 for a completion of at most 2 tokens (texts are space-separated ids), else 0."""
    return [float(len(c.split()) <= 2) for c in completions]


def main(steps: int = 12) -> list[dict]:
    from grpo_core import GRPOTrainer, TrainConfig, make_synthetic_vqa
    from grpo_core.rewards import RewardSpec

    cfg = TrainConfig()
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 8, 4, 6
    cfg.grpo.beta, cfg.optim.lr = 0.0, 0.05
    cfg.run.steps, cfg.run.output_dir, cfg.run.progress = steps, "runs/toy_policy", False
    cfg.run.resume, cfg.run.resume_force = False, True        # a fresh run; an earlier one moves aside
    trainer = GRPOTrainer(BigramPolicy(), make_synthetic_vqa(32, seed=0), cfg,
                          reward_specs=[RewardSpec("short", short_answer_reward, 1.0)])
    history = trainer.train()
    for m in history[:: max(1, steps // 4)] + history[-1:]:
        print(f"step {m['step']:3d}  reward {m['reward']:.2f}  completion length {m['completion_len']:.1f}")
    return history


if __name__ == "__main__":
    main()
