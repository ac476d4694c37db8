"""A tiny local judge for the semantic reward on the synthetic task, trained so that it means something.

    python -m grpo_app.judge runs/tiny-judge          # ~1 minute on one CPU thread; prints its accuracy

The study's semantic reward asks a medical LLM whether the reasoning is sound. A tiny *random*
LM as judge would be a coin flip per completion: noise in the reward, nothing learned from it. So
this module trains the tiny text LM (grpo_models.tiny.build_tiny_qwen2, hidden 64, 2 layers) to
answer the judge prompt of ``grpo_core.rewards_judge`` (same template, same "Yes"/"No" tokens) on
synthetic completions of the quadrant task:

    Yes  the reasoning names the option text of the answer's letter          ("upper left" … A)
    Yes  it is the format warm-up's sentence, which names no option          ("I look at the image.")
    No   it names another option's text                                     ("upper left" … C)
    No   it pads either sentence with a run of repeated filler words        (length padding)

What it can and cannot judge: it reads text only, never the image, so "sound" here means the
reasoning does not contradict the answer and is not padded; whether the answer is right is the accuracy
reward's job. The objective is the judge's own decision rule: binary cross-entropy on
σ(logit_Yes − logit_No) at the prompt's last position. ``train_judge`` returns its accuracy on
held-out completions (other synthetic items, other draws), written to ``judge.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .warmup import GOLD_REASONING, WARMUP_REASONING

FILLER = ("the", "t", "image", "is", "of")     # words a length reward can be gamed with


def judge_example(record, g: torch.Generator) -> tuple[str, float]:
    """(completion, label) for one synthetic mc record: sound (1.0) half the time, else unsound."""
    def pick(n):
        return int(torch.randint(n, (1,), generator=g))

    letters = list(record.options)
    answer = letters[pick(len(letters))]
    kind = pick(4)                                      # 0, 1: sound; 2: other option; 3: padded
    named = answer if kind != 2 else [x for x in letters if x != answer][pick(len(letters) - 1)]
    if kind == 1 or (kind == 3 and pick(2)):
        sentence = WARMUP_REASONING                      # names no option: sound unless padded
    else:
        sentence = GOLD_REASONING.format(a=record.options[named])
    if kind == 3:
        words = sentence.split()
        cut = pick(len(words) + 1)
        words[cut:cut] = [FILLER[pick(len(FILLER))]] * (3 + pick(8))
        sentence = " ".join(words)
    return f"<think>{sentence}</think><answer>{answer}</answer>", float(kind < 2)


def _batch_logit_gap(judge, prompts, model) -> torch.Tensor:
    """logit_Yes − logit_No at each prompt's last token, with gradient (left-padded batch)."""
    tok = judge.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), judge.pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, T - len(x):] = torch.tensor(x)
        mask[i, T - len(x):] = 1
    logits = model(input_ids=input_ids, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    return logits[:, judge.yes_id] - logits[:, judge.no_id]                      # (b,)


def train_judge(path: str, seed: int = 0, steps: int = 200, batch_size: int = 32, lr: float = 2e-3,
                n_eval: int = 400, progress: bool = True) -> dict:
    """Build the tiny text LM at ``path``, train it as a judge (module docstring), save it; returns
    {"accuracy": held-out accuracy of the binary decision, "steps", "seconds", "loss_last"}."""
    from grpo_models.tiny import build_tiny_qwen2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_core.data import make_synthetic_vqa
    from grpo_core.rewards_judge import LLMJudgeReward

    t0 = time.perf_counter()
    build_tiny_qwen2(path, seed=seed)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    judge = LLMJudgeReward(model, tok, yes_token="Yes", no_token="No")
    train_recs, eval_recs = make_synthetic_vqa(500, seed=seed + 7), make_synthetic_vqa(n_eval, seed=seed + 8)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    bar = None
    if progress:
        from grpo_core.progress import bar as progress_bar
        bar = progress_bar(steps, "judge", "step")
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train_recs), (batch_size,), generator=g).tolist()
        pairs = [judge_example(train_recs[i], g) for i in idx]
        prompts = [judge.build_prompt(c, train_recs[i]) for (c, _), i in zip(pairs, idx)]
        gap = _batch_logit_gap(judge, prompts, model)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(gap, torch.tensor([y for _, y in pairs]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    if bar:
        bar.close()
    model.eval()
    pairs = [judge_example(r, g) for r in eval_recs]
    got = judge([c for c, _ in pairs], eval_recs)                                # the reward, binary mode
    acc = sum(float(a == y) for a, (_, y) in zip(got, pairs)) / len(pairs)
    model.save_pretrained(path)
    info = {"accuracy": acc, "steps": steps, "seconds": time.perf_counter() - t0, "loss_last": loss.item(),
            "n_eval": len(pairs), "seed": seed}
    with open(os.path.join(path, "judge.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def ensure_judge(path: str, seed: int = 0, progress: bool = True) -> dict:
    """The trained judge at ``path``: its judge.json when already there, else train it now."""
    info = os.path.join(path, "judge.json")
    if os.path.exists(info):
        with open(info) as f:
            return json.load(f)
    return train_judge(path, seed=seed, progress=progress)


def prepare_judges(cfg, progress: bool = True, build: bool = True) -> None:
    """Before training: every ``semantic_judge`` reward of ``cfg`` must find its judge at
    ``model_path``; on the synthetic task a missing one is trained there now (``ensure_judge``),
    by this process only when ``build`` (rank 0 of a data-parallel job; the others wait)."""
    for entry in cfg.grpo.rewards:
        path = entry.get("model_path") if entry.get("name") == "semantic_judge" else None
        if not path or os.path.exists(os.path.join(path, "config.json")):
            continue
        if cfg.data.source != "synthetic":
            raise FileNotFoundError(f"semantic_judge: model_path={path!r} holds no checkpoint "
                                    "(config.json); point it at "
                                    "a local judge LM (e.g. BioMistral-7B) in grpo.rewards")
        if not build:
            continue
        print(f"semantic_judge: no judge at {path}; training the tiny synthetic judge there (grpo_app.judge)")
        info = ensure_judge(path, progress=progress)
        print(f"semantic_judge: tiny judge held-out accuracy {info['accuracy']:.1%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grpo_app.judge", description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default="runs/tiny-judge", help="folder to write the judge to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = train_judge(args.path, seed=args.seed, steps=args.steps)
    print(f"tiny judge at {args.path}: held-out accuracy {info['accuracy']:.1%} on {info['n_eval']} completions "
          f"(sound vs wrong option vs padded), {info['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
