"""GRPO trainer on the tiny Qwen2-VL: a few real steps, μ > 1, β = 0, resume, crash-safe saves."""

import os
import shutil

import pytest
import torch
from helpers import tiny_policy, vowel_reward

import grpo_core.checkpoint as ckpt_mod
import grpo_core.trainer as trainer_mod
from grpo_core.checkpoint import latest_checkpoint, load_checkpoint
from grpo_core.config import TrainConfig
from grpo_core.data import make_synthetic_vqa
from grpo_core.rewards import RewardSpec
from grpo_core.trainer import GRPOTrainer

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)


def _cfg(tmp_path, **grpo):
    cfg = TrainConfig()
    cfg.data.prompt = "nothink"
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 4, 2, 4
    cfg.grpo.beta = 0.0
    for k, v in grpo.items():
        setattr(cfg.grpo, k, v)
    cfg.optim.lr = 1e-3
    cfg.run.steps, cfg.run.output_dir, cfg.run.progress, cfg.run.resume = 3, str(tmp_path / "run"), False, False
    return cfg


def expected_vowel_reward(policy, records):
    """Exact E[vowel_reward] under the policy: first-token probability mass on vowel-initial tokens."""
    from grpo_core.data import record_to_prompt

    tok = policy.tokenizer
    starts = torch.tensor([tok.decode([i])[:1].lower() in "aeiou" for i in range(policy.vocab_size)])
    enc = policy.encode([record_to_prompt(r, template="nothink")[0] for r in records])
    with torch.no_grad():
        logits, _ = policy.prefill(enc)                                     # (B, V)
        probs = torch.softmax(logits + policy.lm_head_bias, -1)
    return probs[:, starts].sum(-1).mean().item()


@pytest.fixture(scope="module")
def records():
    return make_synthetic_vqa(24, seed=3)


def test_steps_run_and_learn_a_toy_reward(tiny_vlm_path, records, tmp_path):
    policy = tiny_policy(tiny_vlm_path)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    start = expected_vowel_reward(policy, records[-6:])
    cfg = _cfg(tmp_path)
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 8, 4, 2
    cfg.run.steps, cfg.optim.lr = 16, 2e-2     # 16 steps: +0.67..+0.84 over seeds 0-3 (8 steps: +0.05..+0.22)
    tr = GRPOTrainer(policy, records[:-6], cfg, reward_specs=[RewardSpec("vowels", vowel_reward, 1.0)])
    hist = tr.train()
    assert len(hist) == 16
    for key in ("loss", "reward", "reward/vowels", "kl", "clip_low_frac", "clip_high_frac", "entropy",
                "completion_len", "completion_len_max", "truncated_frac", "zero_std_frac", "tokens_per_s",
                "time_rollout", "time_scoring", "time_update", "grad_norm", "lr"):
        assert key in hist[-1], key
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in hist)
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
    # learning, measured exactly (no sampling noise) on held-out prompts
    after = expected_vowel_reward(policy, records[-6:])
    assert after > start + 0.25, (start, after)
    lines = open(os.path.join(cfg.run.output_dir, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 16


def test_mu_gt_1_uses_old_logprobs(tiny_vlm_path, records, tmp_path, monkeypatch):
    seen = []
    real = trainer_mod.fused_linear_grpo_loss

    def spy(*args, **kw):
        loss, m = real(*args, **kw)
        seen.append((args[3] is not None, m["ratio_mean"].item()))
        return loss, m

    monkeypatch.setattr(trainer_mod, "fused_linear_grpo_loss", spy)
    cfg = _cfg(tmp_path, mu=2)
    cfg.run.steps = 1
    # fp64: π_old and the first pass run the same forward over differently ordered micro-batches,
    # which in fp32 moves log-probs by ~1e-7 on some CPUs; in fp64 the ratio is 1 to ~1e-15
    pol = tiny_policy(tiny_vlm_path, torch.float64)
    GRPOTrainer(pol, records, cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)]).train()
    assert len(seen) == 2 and all(has_old for has_old, _ in seen)
    assert seen[0][1] == pytest.approx(1.0, abs=1e-9)      # first pass: π = π_old
    assert abs(seen[1][1] - 1.0) > 1e-6                     # after one optimizer step the ratio moved


def test_beta_zero_builds_no_reference(tiny_vlm_path, records, tmp_path, monkeypatch):
    calls = []
    policy = tiny_policy(tiny_vlm_path)
    monkeypatch.setattr(trainer_mod.copy, "deepcopy", lambda *a, **k: calls.append(1))
    tr = GRPOTrainer(policy, records, _cfg(tmp_path, beta=0.0))
    assert tr.ref_policy is None and not calls


def test_beta_positive_reference_is_frozen_copy(tiny_vlm_path, records, tmp_path):
    policy = tiny_policy(tiny_vlm_path)
    cfg = _cfg(tmp_path, beta=0.1)
    cfg.run.steps = 2
    tr = GRPOTrainer(policy, records, cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    ref_before = {k: v.clone() for k, v in tr.ref_policy.model.state_dict().items()}
    hist = tr.train()
    assert all(not p.requires_grad for p in tr.ref_policy.model.parameters())
    assert all(torch.equal(ref_before[k], v) for k, v in tr.ref_policy.model.state_dict().items())
    assert hist[-1]["kl"] > 0  # the policy moved away from its frozen reference


def _weights(policy):
    return {k: v.clone() for k, v in policy.model.state_dict().items()}


def test_resume_equals_uninterrupted(tiny_vlm_path, records, tmp_path):
    specs = [RewardSpec("v", vowel_reward, 1.0)]
    cfg = _cfg(tmp_path / "a", mu=2)
    cfg.run.steps = 4
    full = GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg, reward_specs=specs)
    hist_full = full.train()

    cfg2 = _cfg(tmp_path / "b", mu=2)
    cfg2.run.steps = 2
    part = GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg2, reward_specs=specs)
    part.train()
    part.save()
    cfg2.run.steps, cfg2.run.resume = 4, True
    resumed = GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg2, reward_specs=specs)
    hist_res = resumed.train()            # finds ckpt-000002 and continues at step 3
    assert [m["step"] for m in hist_res] == [3, 4]
    for a, b in zip(hist_full[2:], hist_res):
        assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], abs=1e-7)
    wa, wb = _weights(full.policy), _weights(resumed.policy)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_during_save_keeps_previous_checkpoint(tiny_vlm_path, records, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    cfg.run.steps = 1
    tr = GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    tr.train()
    good = tr.save()
    saved = _weights(tr.policy)
    tr.step_idx += 1
    with torch.no_grad():
        for p in tr.policy.model.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing trainer_state.pt")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.undo()
    assert latest_checkpoint(cfg.run.output_dir) == good          # the half-written one is ignored
    fresh = tiny_policy(tiny_vlm_path)
    state = load_checkpoint(good, fresh)
    assert state["step"] == 1
    w = _weights(fresh)
    assert all(torch.equal(w[k], saved[k]) for k in w)


def test_checkpoint_policy_loads_with_transformers(tiny_vlm_path, records, tmp_path):
    from transformers import AutoModelForImageTextToText

    cfg = _cfg(tmp_path)
    cfg.run.steps = 1
    tr = GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    tr.train()
    path = tr.save()
    hf = AutoModelForImageTextToText.from_pretrained(os.path.join(path, "policy"))
    ours = tr.policy.model.state_dict()
    theirs = hf.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k in theirs)
    assert len(set(ours) & set(theirs)) >= len(ours) - 1


def test_too_few_records_is_an_error(tiny_vlm_path, tmp_path):
    with pytest.raises(ValueError, match="prompts_per_step"):
        GRPOTrainer(tiny_policy(tiny_vlm_path), make_synthetic_vqa(1, seed=0), _cfg(tmp_path))


def _nan_loss_on(monkeypatch, bad_steps):
    """The fused loss returns NaN (gradients NaN too) during the given 1-based GRPO steps."""
    real = trainer_mod.fused_linear_grpo_loss
    calls = {"step": 0}

    def fake(*args, **kw):
        loss, m = real(*args, **kw)
        return (loss * float("nan"), m) if calls["step"] in bad_steps else (loss, m)

    monkeypatch.setattr(trainer_mod, "fused_linear_grpo_loss", fake)
    return calls


def test_nonfinite_step_is_skipped_counted_and_weights_untouched(tiny_vlm_path, records, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    tr = GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    calls = _nan_loss_on(monkeypatch, bad_steps={2})
    hist = []
    for k in (1, 2, 3):
        calls["step"] = k
        before = _weights(tr.policy)
        hist.append(tr.step())
        after = _weights(tr.policy)
        moved = any(not torch.equal(before[n], after[n]) for n in before)
        assert moved == (k != 2), f"step {k}: weights {'moved' if moved else 'did not move'}"
    assert [m["nonfinite_steps"] for m in hist] == [0, 1, 0]
    assert tr.scheduler.last_epoch == 2                          # the skipped step did not advance the schedule
    assert all(torch.isfinite(v).all() for v in _weights(tr.policy).values())


def test_consecutive_nonfinite_steps_stop_the_run_and_nothing_is_saved(tiny_vlm_path, records, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    cfg.run.steps, cfg.run.save_every, cfg.run.max_nonfinite_steps = 6, 1, 2
    tr = GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    _nan_loss_on(monkeypatch, bad_steps={0})                     # every call: the counter is never advanced
    with pytest.raises(trainer_mod.NonFiniteTrainingError, match=r"steps 1\.\.2: .*2 consecutive steps"):
        tr.train()
    assert latest_checkpoint(cfg.run.output_dir).endswith("ckpt-000001")   # saved before the streak ended


def test_save_refuses_nonfinite_weights(tiny_vlm_path, records, tmp_path):
    tr = GRPOTrainer(tiny_policy(tiny_vlm_path), records, _cfg(tmp_path),
                     reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    with torch.no_grad():
        next(tr.policy.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ckpt_mod.CheckpointError, match="NaN/inf"):   # the writer refuses too
        tr.save()                                  # (the harness checks first: tests/test_harness.py)
    assert latest_checkpoint(tr.cfg.run.output_dir) is None


def test_unusable_image_is_skipped_counted_and_never_met_again(tiny_vlm_path, tmp_path, capsys):
    """An image that fails at run time: the record is replaced by the next one, logged once with
    file and row, counted in skipped_records, and the data position moves past it (so a resume
    does not meet it again)."""
    import dataclasses

    bad_file = tmp_path / "broken.png"
    bad_file.write_bytes(b"")                                          # zero bytes: not an image
    recs = make_synthetic_vqa(6, seed=3)
    recs[2] = dataclasses.replace(recs[2], images=[str(bad_file)], source_file="train.csv", source_row=2)
    cfg = _cfg(tmp_path)
    cfg.rollout.prompts_per_step, cfg.run.steps, cfg.run.save_every, cfg.run.keep_last = 2, 3, 1, 0
    tr = GRPOTrainer(tiny_policy(tiny_vlm_path), recs, cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    hist = tr.train()
    assert sum(m["skipped_records"] for m in hist) == 1 and tr.data_pos == 3 * 2 + 1
    err = capsys.readouterr().err
    assert err.count("skipping a record") == 1 and "broken.png" in err and "row 2" in err
    # resuming from the checkpoint written right after the skipped record continues past it
    k = next(m["step"] for m in hist if m["skipped_records"])
    cfg2 = _cfg(tmp_path / "b")
    cfg2.rollout.prompts_per_step, cfg2.run.steps, cfg2.run.resume = 2, 3, True
    os.makedirs(cfg2.run.output_dir)
    shutil.copytree(os.path.join(cfg.run.output_dir, f"ckpt-{k:06d}"),
                    os.path.join(cfg2.run.output_dir, f"ckpt-{k:06d}"))
    again = GRPOTrainer(tiny_policy(tiny_vlm_path), recs, cfg2, reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    rest = again.train()
    assert [m["step"] for m in rest] == list(range(k + 1, 4)) and sum(m["skipped_records"] for m in rest) == 0
    assert again.data_pos == tr.data_pos
