"""Fault injection: kill a save at every instant, damage files, break images and inject NaN mid-run.

What each test promises (docs/CHECKPOINTS.md has the table):
  - a kill at any instant of a save (a new step, a re-save of the same step with keep_last=1, the
    pruning after it) leaves, after the next start's recovery, exactly one checkpoint directory per
    step, and the newest one loads with either the old or the new weights: nothing is lost;
  - a damaged newest checkpoint is named (path and file) and the run falls back to the previous one;
  - a bad image or a NaN mid-run stops the run with an error, the last good checkpoint stays, and
    resuming from it (images fixed / no NaN) is bit-identical to an uninterrupted run.

The kill matrix uses the stub policy of test_checkpoint.py (milliseconds per save); the end-to-end
tests train the tiny Qwen2-VL through the public trainer API, two steps each. Bit-identical means
torch.equal: resume recomputes the same operations in the same order on the same machine (seeds
per step, see grpo_core/checkpoint.py), so no tolerance is needed or allowed. (Not marked
``numerics``: resume-equals-uninterrupted under other kernel paths is test_trainer.py's job.)
"""

import os
import shutil

import pytest
import torch
from helpers import tiny_policy, vowel_reward
from test_checkpoint import StubPolicy, _flip_bit, same, save, weights

import grpo_core.checkpoint as C
import grpo_core.trainer as trainer_mod
from grpo_core.config import TrainConfig
from grpo_core.data import make_synthetic_vqa
from grpo_core.resume import ResumeError, find_resumable_checkpoint
from grpo_core.rewards import RewardSpec
from grpo_core.trainer import GRPOTrainer, NonFiniteTrainingError

# The operations a save performs that change the disk; a kill lands just before one of them.
KILL_POINTS = [(os, "replace"), (os, "fsync"), (os, "unlink"), (os, "rmdir"), (torch, "save"), (C, "save_file")]


class Killer:
    """Count the calls to KILL_POINTS (and ``extra`` methods); raise KeyboardInterrupt before call ``at``."""

    def __init__(self, monkeypatch, at=None, only=None, extra=()):
        self.at, self.calls = at, []
        for obj, name in [*KILL_POINTS, *extra]:
            if only is None or name in only:
                monkeypatch.setattr(obj, name, self._wrap(getattr(obj, name), name))

    def _wrap(self, fn, name):
        def op(*args, **kw):
            if len(self.calls) == self.at:
                raise KeyboardInterrupt(f"killed before {name} (operation {self.at})")
            self.calls.append(name)
            return fn(*args, **kw)
        return op


def _kill_save_at(monkeypatch, k, out, step, pol, keep_last):
    """Run one save with a kill before operation ``k`` (None: count them); return the operations run."""
    with monkeypatch.context() as m:
        killer = Killer(m, at=k, extra=[(pol, "save_pretrained")])
        try:
            save(out, step, pol, keep_last=keep_last)
        except KeyboardInterrupt:
            assert k is not None
    return killer.calls


@pytest.mark.parametrize("scenario", ["new step", "re-save same step"])
def test_kill_at_every_instant_of_a_save_loses_nothing(tmp_path, monkeypatch, scenario):
    old_pol, new_pol = StubPolicy(1), StubPolicy(2)
    old_step, new_step = (1, 2) if scenario == "new step" else (1, 1)
    base = tmp_path / "base"
    save(base, old_step, old_pol, keep_last=1)
    count = tmp_path / "count"
    shutil.copytree(base, count)
    n_ops = len(_kill_save_at(monkeypatch, None, count, new_step, new_pol, keep_last=1))
    assert n_ops >= 15                        # writes, fsyncs, renames, deletions: every one is a kill point
    outcomes = []
    for k in range(n_ops):
        out = tmp_path / f"kill{k}"
        shutil.copytree(base, out)
        _kill_save_at(monkeypatch, k, out, new_step, new_pol, keep_last=1)
        path, notes = find_resumable_checkpoint(str(out))     # the next start: recover, verify
        assert path is not None, f"kill before operation {k}: no checkpoint left ({os.listdir(out)})"
        left = sorted(os.listdir(out))                  # no .tmp/.old/.del; an unpruned older one may stay
        assert left in ([os.path.basename(path)], ["ckpt-000001", "ckpt-000002"]), f"kill before operation {k}: {left}"
        got = StubPolicy(9)
        state = C.load_checkpoint(path, got)
        outcome = "new" if same(weights(got), weights(new_pol)) else "old"
        assert same(weights(got), weights(new_pol if outcome == "new" else old_pol))
        assert state["step"] == (new_step if outcome == "new" else old_step)
        outcomes.append(outcome)
        save(out, new_step, new_pol, keep_last=1)                # and the run can save again
        assert find_resumable_checkpoint(str(out)) == (C.checkpoint_path(str(out), new_step), [])
        assert os.listdir(out) == [f"ckpt-{new_step:06d}"]
    # kills before the swap keep the old checkpoint, kills after it the new one, in that order
    assert outcomes == sorted(outcomes, key=lambda o: o == "new") and set(outcomes) == {"old", "new"}


def test_kill_while_pruning_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    pol = StubPolicy(1)
    for step in (1, 2):
        save(tmp_path, step, pol, keep_last=0)
    with monkeypatch.context() as m:
        Killer(m, at=3, only=("unlink",))                       # mid-way through deleting ckpt-000001
        with pytest.raises(KeyboardInterrupt):
            save(tmp_path, 3, pol, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000001.del", "ckpt-000002", "ckpt-000003"]
    path, notes = find_resumable_checkpoint(str(tmp_path))
    assert path.endswith("ckpt-000003")
    assert notes == ["finished deleting ckpt-000001.del (an interrupted prune of old checkpoints)"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000002", "ckpt-000003"]


# ---- end to end, through the trainer -------------------------------------------------------------
SPECS = [RewardSpec("v", vowel_reward, 1.0)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Synthetic records whose images are PNG files (so a test can break them on disk)."""
    d = tmp_path_factory.mktemp("images")
    recs = make_synthetic_vqa(8, seed=3)
    for i, r in enumerate(recs):
        path = str(d / f"img{i}.png")
        r.images[0].save(path)
        r.images = [path]
    return recs


def _cfg(out, steps=2, save_every=0, keep_last=0, resume=False):
    cfg = TrainConfig()
    cfg.data.prompt = "nothink"
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 4, 2, 4
    cfg.grpo.beta, cfg.optim.lr = 0.0, 1e-3
    cfg.run.steps, cfg.run.output_dir, cfg.run.progress, cfg.run.resume = steps, str(out), False, resume
    cfg.run.save_every, cfg.run.keep_last = save_every, keep_last
    return cfg


def _trainer(tiny_vlm_path, records, cfg):
    return GRPOTrainer(tiny_policy(tiny_vlm_path), records, cfg, reward_specs=SPECS)


@pytest.fixture(scope="module")
def uninterrupted(tiny_vlm_path, records, tmp_path_factory):
    """Weights and metrics of 2 steps run in one go: what every resumed run must reproduce."""
    tr = _trainer(tiny_vlm_path, records, _cfg(tmp_path_factory.mktemp("uninterrupted"), steps=2))
    hist = tr.train()
    return weights(tr.policy), hist


def _resume_to_step_2(tiny_vlm_path, records, out, uninterrupted):
    """The next start: recover, pick a checkpoint, resume it and run to step 2; compare with one go."""
    path, notes = find_resumable_checkpoint(str(out))
    tr = _trainer(tiny_vlm_path, records, _cfg(out, steps=2))
    tr.resume(path)
    hist = tr.train()
    want_w, want_hist = uninterrupted
    assert same(weights(tr.policy), want_w), "resumed weights differ from the uninterrupted run"
    assert [m["loss"] for m in hist] == [m["loss"] for m in want_hist[-len(hist):]]
    return path, notes, hist


def test_kill_between_the_renames_of_a_resave_then_resume_is_bit_identical(tiny_vlm_path, records, tmp_path,
                                                                          monkeypatch, uninterrupted):
    """The issue's case: the final save re-saves the step just saved, keep_last=1, killed mid-swap."""
    out = tmp_path / "run"
    tr = _trainer(tiny_vlm_path, records, _cfg(out, steps=1, save_every=1, keep_last=1))
    tr.train()
    with monkeypatch.context() as m:
        Killer(m, at=1, only=("replace",))                      # after ckpt-1 → .old, before .tmp → ckpt-1
        with pytest.raises(KeyboardInterrupt):
            tr.save()
    assert sorted(os.listdir(out)) == ["ckpt-000001.old", "ckpt-000001.tmp", "metrics.jsonl"]
    path, notes, hist = _resume_to_step_2(tiny_vlm_path, records, out, uninterrupted)
    assert path.endswith("ckpt-000001") and [m["step"] for m in hist] == [2]
    assert notes == [f"recovered {path} from ckpt-000001.tmp, left by an interrupted save",
                     "removed ckpt-000001.old, the leftover of an interrupted save (a duplicate)"]


def test_damaged_newest_checkpoint_falls_back_then_resume_is_bit_identical(tiny_vlm_path, records, tmp_path,
                                                                         uninterrupted):
    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=2, save_every=1)).train()
    _flip_bit(os.path.join(out, "ckpt-000002", "weights.safetensors"))
    path, notes, hist = _resume_to_step_2(tiny_vlm_path, records, out, uninterrupted)
    assert path.endswith("ckpt-000001") and [m["step"] for m in hist] == [2]
    assert "ckpt-000002, file weights.safetensors: sha256 differs" in notes[0]
    assert notes[-1] == f"falling back to {path}, the newest checkpoint that verifies"


def test_nan_mid_run_stops_and_keeps_the_last_finite_checkpoint(tiny_vlm_path, records, tmp_path, monkeypatch,
                                                                uninterrupted):
    real, calls = trainer_mod.fused_linear_grpo_loss, []

    def nan_at_step_2(*args, **kw):                     # one loss call per step here (μ = 1, one micro-batch)
        calls.append(1)
        loss, m = real(*args, **kw)
        return (loss * float("nan"), m) if len(calls) == 2 else (loss, m)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "fused_linear_grpo_loss", nan_at_step_2)
        cfg = _cfg(out, steps=3, save_every=1, keep_last=1)
        cfg.run.max_nonfinite_steps = 1                 # stop at the first step that cannot update
        tr = _trainer(tiny_vlm_path, records, cfg)
        with pytest.raises(NonFiniteTrainingError, match="GRPO steps 2..2: the loss or gradient was NaN/inf"):
            tr.train()
    assert len(calls) == 2                              # stopped at step 2, never reached step 3
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt")) == ["ckpt-000001"]
    path, _, hist = _resume_to_step_2(tiny_vlm_path, records, out, uninterrupted)
    assert path.endswith("ckpt-000001") and [m["step"] for m in hist] == [2]


def test_bad_image_mid_run_stops_then_resume_is_bit_identical(tiny_vlm_path, records, tmp_path, uninterrupted):
    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=1, save_every=1)).train()
    files = [r.images[0] for r in records]
    good = {f: open(f, "rb").read() for f in files}
    try:
        for f in files:                                  # the images go bad between step 1 and step 2
            open(f, "wb").write(b"not a png")
        tr = _trainer(tiny_vlm_path, records, _cfg(out, steps=2))
        tr.resume(find_resumable_checkpoint(str(out))[0])
        with pytest.raises(Exception) as e:
            tr.train()
        assert any(os.path.basename(f) in str(e.value) for f in files), f"the error names no image: {e.value}"
        assert tr.step_idx == 1 and sorted(d for d in os.listdir(out) if d.startswith("ckpt")) == ["ckpt-000001"]
    finally:
        for f, data in good.items():
            open(f, "wb").write(data)
    _, _, hist = _resume_to_step_2(tiny_vlm_path, records, out, uninterrupted)
    assert [m["step"] for m in hist] == [2]


# ---- end to end, waiting for the trainer to call grpo_core.resume / grpo_core.metrics_log -----------
def test_metrics_jsonl_after_a_resume_holds_each_step_once_in_strict_json(tiny_vlm_path, records, tmp_path):
    import json

    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=3, save_every=2)).train()    # logs 1..3, ckpt at 2
    _trainer(tiny_vlm_path, records, _cfg(out, steps=4, resume=True)).train()     # resumes at 2, logs 3, 4

    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")
    rows = [json.loads(line, parse_constant=refuse) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["accuracy"] is None                 # no accuracy reward: null, not NaN


def test_a_changed_fixed_setting_is_refused_on_resume(tiny_vlm_path, records, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, steps=1, save_every=1)
    cfg.model.path = "/models/a"
    _trainer(tiny_vlm_path, records, cfg).train()
    cfg = _cfg(out, steps=2, resume=True)
    cfg.model.path = "/models/b"
    with pytest.raises(ResumeError, match="model.path: '/models/a' in the checkpoint, '/models/b' now"):
        _trainer(tiny_vlm_path, records, cfg).train()


def test_a_changed_lr_takes_effect_on_resume(tiny_vlm_path, records, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=1, save_every=1)).train()
    cfg = _cfg(out, steps=2, resume=True)
    cfg.optim.lr = 3e-3
    hist = _trainer(tiny_vlm_path, records, cfg).train()
    assert [m["step"] for m in hist] == [2] and hist[0]["lr"] == 3e-3      # constant schedule


def test_a_fresh_run_over_an_earlier_one_is_refused(tiny_vlm_path, records, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=1, save_every=1)).train()
    with pytest.raises(ResumeError, match="run.resume=false, but .* holds an earlier run"):
        _trainer(tiny_vlm_path, records, _cfg(out, steps=1)).train()
