"""Checkpoint format, verification, recovery, resume semantics and the metrics log, unit by unit.

The save/load tests use a stub policy (a two-layer MLP whose ``save_pretrained`` writes a
config.json and a safetensors file, as transformers does), so each save takes milliseconds; the
real tiny Qwen2-VL goes through the same functions in tests/test_trainer.py and test_faults.py.
Kills at every instant of a save are in tests/test_faults.py.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import grpo_core.checkpoint as C
from grpo_core.config import TrainConfig
from grpo_core.metrics_log import MetricsLog, read_metrics
from grpo_core.optim import lr_factor, make_optimizer, make_scheduler
from grpo_core.resume import (
    FIXED,
    MAY_CHANGE,
    ResumeError,
    classify,
    compare_configs,
    find_resumable_checkpoint,
    flatten,
    plan_resume,
    read_run_config,
    schedule_note,
    set_base_lr,
)


class StubPolicy:
    """What save_checkpoint / load_checkpoint use of a policy: ``.model`` and ``.save_pretrained``."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "stub"}, f)


def trained(seed=0, steps=2, lr=1e-2, total=10, schedule="cosine"):
    """A stub policy with an optimizer and a scheduler that have taken ``steps`` steps."""
    pol = StubPolicy(seed)
    opt = make_optimizer(pol.model, lr, 0.0)
    sch = make_scheduler(opt, 0, total, schedule)
    for _ in range(steps):
        pol.model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sch.step()
        opt.zero_grad()
    return pol, opt, sch


def save(out, step, pol, opt=None, sch=None, keep_last=0, **kw):
    if opt is None:
        opt, sch = make_optimizer(pol.model, 1e-2, 0.0), None
    return C.save_checkpoint(str(out), step, pol, opt, sch, {"data_pos": 2 * step}, keep_last=keep_last, **kw)


def weights(pol):
    return {k: v.clone() for k, v in pol.model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- format and round trip ---------------------------------------------------------------------
def test_layout_and_manifest_checksums(tmp_path):
    path = save(tmp_path, 3, StubPolicy(), config={"run": {"steps": 5}})
    assert os.path.basename(path) == "ckpt-000003" and sorted(os.listdir(tmp_path)) == ["ckpt-000003"]
    man = json.load(open(os.path.join(path, "manifest.json")))
    assert man["step"] == 3 and man["format"] == C.FORMAT
    on_disk = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    assert sorted(man["files"]) == [f for f in on_disk if f != "manifest.json"]
    for rel, meta in man["files"].items():                         # hand-computed sha256 and size
        data = open(os.path.join(path, rel), "rb").read()
        assert meta == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert read_run_config(path) == {"run": {"steps": 5}}


def test_round_trip_restores_weights_optimizer_and_schedule(tmp_path):
    pol, opt, sch = trained(seed=1)
    path = save(tmp_path, 2, pol, opt, sch)
    pol2, opt2, sch2 = trained(seed=2, steps=0)
    state = C.load_checkpoint(path, pol2, opt2, sch2)
    assert state["step"] == 2 and state["data_pos"] == 4
    assert same(weights(pol), weights(pol2))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert sch2.last_epoch == 2 and sch2.get_last_lr() == sch.get_last_lr()


def test_keep_last_prunes_oldest_and_leaves_no_leftovers(tmp_path):
    pol = StubPolicy()
    for step in (1, 2, 3):
        save(tmp_path, step, pol, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000002", "ckpt-000003"]


def test_save_refuses_nonfinite_weights_and_keeps_the_previous(tmp_path):
    pol = StubPolicy()
    good = save(tmp_path, 1, pol, keep_last=1)
    with torch.no_grad():
        pol.model[1].weight[0, 1] = float("nan")
    with pytest.raises(C.CheckpointError, match=r"ckpt-000002.*refusing to save step 2.*'1.weight' \(1 of 6"):
        save(tmp_path, 2, pol, keep_last=1)
    assert os.listdir(tmp_path) == ["ckpt-000001"] and find_resumable_checkpoint(str(tmp_path))[0] == good


def test_a_synced_reference_is_saved_and_restored(tmp_path):
    pol, ref = StubPolicy(0), StubPolicy(7)
    path = save(tmp_path, 1, pol, ref_state=ref.model.state_dict())
    assert "reference.safetensors" in json.load(open(os.path.join(path, "manifest.json")))["files"]
    got = StubPolicy(8)
    C.load_checkpoint(path, StubPolicy(9), ref_model=got.model)
    assert same(weights(got), weights(ref))
    plain = save(tmp_path, 2, pol)                            # a run whose reference stays frozen
    with pytest.raises(C.CheckpointError, match="file reference.safetensors: missing: the run syncs its reference"):
        C.load_checkpoint(plain, StubPolicy(9), ref_model=got.model)
    with torch.no_grad():
        ref.model[0].bias[0] = float("nan")
    with pytest.raises(C.CheckpointError, match=r"refusing to save step 3: reference tensor '0.bias'"):
        save(tmp_path, 3, pol, ref_state=ref.model.state_dict())


# ---- damage is detected and named ------------------------------------------------------------------
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_bit(path, at=0.6):
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def _garbage(path):
    n = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(random.Random(n).randbytes(n))           # same size: only the checksum can tell (seeded)


DAMAGE = {   # name: (file, how, what the error says)
    "truncated weights": ("weights.safetensors", _truncate, "bytes, the manifest says"),
    "bit flip in policy": ("policy/model.safetensors", _flip_bit, "sha256 differs"),
    "garbage trainer state": ("trainer_state.pt", _garbage, "sha256 differs"),
    "missing file": ("trainer_state.pt", os.remove, "missing"),
    "missing manifest": ("manifest.json", os.remove, "manifest.json is missing"),
    "garbage manifest": ("manifest.json", lambda p: open(p, "w").write("{not json"), "unreadable manifest"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_reported_by_checkpoint_and_file(tmp_path, case):
    rel, damage, says = DAMAGE[case]
    path = save(tmp_path, 1, StubPolicy())
    damage(os.path.join(path, rel))
    with pytest.raises(C.CheckpointError, match=says) as e:
        C.verify_checkpoint(path)
    assert e.value.path == path and e.value.file == rel and path in str(e.value) and rel in str(e.value)


def test_unverified_load_of_garbage_names_the_file(tmp_path):
    path = save(tmp_path, 1, StubPolicy())
    _garbage(os.path.join(path, "trainer_state.pt"))
    with pytest.raises(C.CheckpointError, match=r"ckpt-000001, file trainer_state.pt: "
                                                r"cannot be read \(\w+(Error|Exception)?: "):
        C.load_checkpoint(path, StubPolicy(), verify=False)


def test_nan_weights_written_by_an_older_version_are_refused_on_load(tmp_path):
    pol = StubPolicy(0)
    path = save(tmp_path, 1, pol)
    sd = load_file(os.path.join(path, "weights.safetensors"))
    sd["0.bias"][1] = float("inf")
    save_file(sd, os.path.join(path, "weights.safetensors"))
    C.write_manifest(path, 1)                            # sealed: the checksums match, the values do not
    fresh = StubPolicy(5)
    before = weights(fresh)
    with pytest.raises(C.CheckpointError, match=r"ckpt-000001, file weights.safetensors: tensor '0.bias' \(1 of 3"):
        C.load_checkpoint(path, fresh)
    assert same(weights(fresh), before)                  # nothing was loaded into the model


def test_renamed_checkpoint_is_refused(tmp_path):
    path = save(tmp_path, 1, StubPolicy())
    os.rename(path, tmp_path / "ckpt-000007")
    with pytest.raises(C.CheckpointError, match="holds step 1 but is named for step 7"):
        C.verify_checkpoint(str(tmp_path / "ckpt-000007"))


# ---- fallback --------------------------------------------------------------------------------------
def test_find_resumable_falls_back_past_damaged_ones_and_says_so(tmp_path):
    pol = StubPolicy()
    paths = [save(tmp_path, s, pol) for s in (1, 2, 3)]
    _flip_bit(os.path.join(paths[2], "weights.safetensors"))
    os.remove(os.path.join(paths[1], "manifest.json"))
    path, notes = find_resumable_checkpoint(str(tmp_path))
    assert path == paths[0]
    assert len(notes) == 3
    assert paths[2] in notes[0] and "weights.safetensors: sha256 differs" in notes[0] and "skipped" in notes[0]
    assert paths[1] in notes[1] and "manifest.json is missing" in notes[1]
    assert notes[2] == f"falling back to {paths[0]}, the newest checkpoint that verifies"


def test_only_damaged_checkpoints_is_a_clear_error(tmp_path):
    path = save(tmp_path, 1, StubPolicy())
    _truncate(os.path.join(path, "weights.safetensors"))
    with pytest.raises(C.CheckpointError, match=r"no usable checkpoint in .*every one is damaged:\n"
                                                r"  - checkpoint .*ckpt-000001, "
                                                r"file weights.safetensors"):
        find_resumable_checkpoint(str(tmp_path))


def test_no_checkpoint_is_a_new_run(tmp_path):
    assert find_resumable_checkpoint(str(tmp_path / "nothing")) == (None, [])


def test_legacy_copy_without_manifest_is_promoted_then_sealed(tmp_path):
    """The issue's case, written by the old code: ckpt-N half deleted, its whole copy in ckpt-N.tmp."""
    pol = StubPolicy(3)
    path = save(tmp_path, 4, pol)
    os.remove(os.path.join(path, "manifest.json"))       # as the old code wrote it
    os.rename(path, path + ".tmp")
    os.makedirs(os.path.join(path, "policy"))             # what the interrupted rmtree left
    with pytest.raises(C.CheckpointError, match="manifest.json is missing.*--seal"):
        find_resumable_checkpoint(str(tmp_path))       # recovered into place, not yet trusted
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000004"]
    from grpo_app.cli import main
    assert main(["resume-plan", "--seal", path]) == 0
    fresh = StubPolicy(9)
    assert find_resumable_checkpoint(str(tmp_path))[0] == path
    C.load_checkpoint(path, fresh)
    assert same(weights(fresh), weights(pol))


# ---- resume semantics ----------------------------------------------------------------------------
def cfg_dict(**changes):
    cfg = TrainConfig()
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return dataclasses.asdict(cfg)


def test_every_config_key_is_classified_once():
    from grpo_core.resume import NOT_COMPARED, resume_classes

    keys = flatten(dataclasses.asdict(TrainConfig()))
    declared = resume_classes()
    unclassified = [k for k in keys if k not in declared and not k.startswith(NOT_COMPARED)]
    assert not unclassified, f"declare option(..., resume=...) on these config fields: {unclassified}"
    assert not set(FIXED) & set(MAY_CHANGE)
    assert not [k for k in list(FIXED) + list(MAY_CHANGE) if k not in keys], "stale keys"
    assert classify("grpo.clip_low") == "fixed" and FIXED["grpo.clip_low"] == "the objective"
    assert classify("optim.lr") == "may_change" and classify("sft.optim.lr") == "not_compared"
    assert classify("run.resume") == "not_compared" and classify("grpo.new_key") == "fixed"   # safe side


def test_compare_configs_splits_errors_and_changes():
    saved = cfg_dict(model__path="/m/a", optim__lr=1e-6, run__steps=100, run__eval_every=10)
    current = cfg_dict(model__path="/m/b", optim__lr=2e-6, run__steps=100, run__eval_every=5,
                       rollout__group_size=4, run__resume=False)
    errors, changes = compare_configs(saved, current)
    assert errors == ["model.path: '/m/a' in the checkpoint, '/m/b' now (the model the run trains)",
                      "rollout.group_size: 8 in the checkpoint, 4 now "
                      "(the sampling distribution and the shape of a step)"]
    assert changes == ["optim.lr: 1e-06 -> 2e-06 (the new peak LR applies from the resume step on)",
                       "run.eval_every: 10 -> 5 (applies from the resume step on)"]
    assert compare_configs(saved, json.loads(json.dumps(saved))) == ([], [])   # tuples vs JSON lists


def test_compare_configs_unknown_and_new_keys_are_notes_not_errors():
    saved, current = cfg_dict(), cfg_dict()
    saved["grpo"]["old_knob"] = 1
    del saved["grpo"]["dual_clip"], saved["run"]["eval_limit"]
    current["grpo"]["dual_clip"] = 3.0
    errors, changes = compare_configs(saved, current)
    assert errors == []
    assert changes == ["grpo.dual_clip: not in the checkpoint's config (added since); using 3.0",
                       "grpo.old_knob: in the checkpoint's config, unknown to this version (ignored)"]


def test_schedule_note_for_longer_run_hand_computed():
    saved = cfg_dict(run__steps=100, optim__schedule="cosine")
    current = cfg_dict(run__steps=200, optim__schedule="cosine")
    # cosine, no warm-up: step 50 of 100 → ½(1 + cos(π/2)) = 0.5; of 200 → ½(1 + cos(π/4)) = 0.8536
    assert schedule_note(saved, current, 50) == ("cosine schedule re-stretched to 200 steps: at step 50 the LR goes "
                                                 "from 0.500·lr (old plan) to 0.854·lr, then decays to 0 at step 200")
    saved["optim"]["schedule"] = current["optim"]["schedule"] = "linear"       # 1 − 50/100 → 1 − 50/200
    assert "from 0.500·lr (old plan) to 0.750·lr" in schedule_note(saved, current, 50)
    assert schedule_note(cfg_dict(run__steps=100), cfg_dict(run__steps=200), 50) is None   # constant


def test_set_base_lr_applies_a_new_lr_and_is_exact_for_the_same(tmp_path):
    pol, opt, sch = trained(steps=3, lr=1e-2, total=10, schedule="cosine")
    path = save(tmp_path, 3, pol, opt, sch)
    # same settings: the resumed LR is bit-identical to the uninterrupted one
    p2 = StubPolicy()
    o2 = make_optimizer(p2.model, 1e-2, 0.0)
    s2 = make_scheduler(o2, 0, 10, "cosine")
    C.load_checkpoint(path, p2, o2, s2)
    set_base_lr(o2, s2, 1e-2)
    assert o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == sch.get_last_lr()[0]
    # new lr and longer run: lr' · ½(1 + cos(π · 3/20)) = 0.5 · 0.945503...
    p3 = StubPolicy()
    o3 = make_optimizer(p3.model, 5e-1, 0.0)
    s3 = make_scheduler(o3, 0, 20, "cosine")
    C.load_checkpoint(path, p3, o3, s3)
    assert o3.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(3, 0, 10, "cosine"))   # the old code's value
    set_base_lr(o3, s3, 5e-1)
    want = 0.5 * 0.5 * (1 + math.cos(math.pi * 3 / 20))
    assert o3.param_groups[0]["lr"] == pytest.approx(want, rel=1e-15)
    assert s3.get_last_lr()[0] == o3.param_groups[0]["lr"]
    o3.step()
    s3.step()
    assert o3.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 20)), rel=1e-15)


def _run_dir(tmp_path, **cfg_changes):
    out = tmp_path / "run"
    save(out, 2, StubPolicy(), config=cfg_dict(**cfg_changes))
    return str(out)


def test_plan_resume_says_where_from_and_what_changed(tmp_path):
    out = _run_dir(tmp_path, run__steps=10, optim__lr=1e-6)
    plan = plan_resume(out, cfg_dict(run__steps=10, optim__lr=3e-6))
    assert (plan.path, plan.step) == (os.path.join(out, "ckpt-000002"), 2)
    assert plan.notes == [f"resuming from {plan.path} (step 2 done; next step 3 of 10)",
                          "changed: optim.lr: 1e-06 -> 3e-06 (the new peak LR applies from the resume step on)"]


def test_plan_resume_of_a_finished_run_says_so(tmp_path):
    out = _run_dir(tmp_path, run__steps=2)
    note = plan_resume(out, cfg_dict(run__steps=2)).notes[0]
    assert "the run is finished (step 2 of run.steps=2 done)" in note and "raise run.steps" in note
    assert "next step" not in note                                   # was "next step 3 of 2"


def test_plan_resume_refuses_a_changed_model_unless_forced(tmp_path):
    out = _run_dir(tmp_path, model__path="/models/a")
    with pytest.raises(ResumeError) as e:
        plan_resume(out, cfg_dict(model__path="/models/b"))
    msg = str(e.value)
    assert "model.path: '/models/a' in the checkpoint, '/models/b' now" in msg
    assert "run.resume_force=true" in msg and "another run.output_dir" in msg
    plan = plan_resume(out, cfg_dict(model__path="/models/b"), force=True)
    assert plan.step == 2 and plan.notes[-1].startswith("FORCED (run.resume_force=true): model.path")


def test_fresh_start_over_an_earlier_run_is_refused_then_moves_it_aside(tmp_path):
    out = _run_dir(tmp_path)
    open(os.path.join(out, "metrics.jsonl"), "w").write('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(ResumeError, match=r"run.resume=false, but .* holds an earlier run \(ckpt-000002\)"):
        plan_resume(out, cfg_dict(), resume=False)
    plan = plan_resume(out, cfg_dict(), resume=False, force=True)
    assert plan.path is None and "moved to" in plan.notes[0]
    assert sorted(os.listdir(out)) == ["previous-run-1"]
    assert sorted(os.listdir(os.path.join(out, "previous-run-1"))) == ["ckpt-000002", "metrics.jsonl"]
    assert plan_resume(out, cfg_dict(), resume=False).notes == [f"starting a new run in {out}"]


def test_resume_cli_prints_the_plan(tmp_path, capsys):
    from grpo_app.cli import main

    out = _run_dir(tmp_path, run__steps=10)
    assert main(["resume-plan", out, "run.steps=10", "rollout.group_size=4"]) == 2
    assert "rollout.group_size: 8 in the checkpoint, 4 now" in capsys.readouterr().err
    assert main(["resume-plan", out, "run.steps=12"]) == 0
    assert "changed: run.steps: 10 -> 12" in capsys.readouterr().out


# ---- metrics.jsonl ---------------------------------------------------------------------------------
def _strict_lines(path):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def test_metrics_are_strict_json(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"), start_step=0)
    log.append({"step": 1, "loss": float("nan"), "kl": torch.tensor(float("inf")), "acc": 0.5, "tag": "x",
                "nested": {"a": [1.0, float("-inf")]}})
    assert _strict_lines(tmp_path / "m.jsonl") == [{"step": 1, "loss": None, "kl": None, "acc": 0.5, "tag": "x",
                                                    "nested": {"a": [1.0, None]}}]
    with pytest.raises(TypeError, match=r"metrics\['obj'\] is a object"):
        log.append({"step": 2, "obj": object()})


def test_metrics_after_resume_hold_each_step_once(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path, start_step=0)
    for s in (1, 2, 3, 4):
        log.append({"step": s, "loss": float(s)})
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')                       # killed mid-line
    log = MetricsLog(path, start_step=3)                 # resumed from ckpt-000003
    for s in (4, 5):
        log.append({"step": s, "loss": 10.0 * s})
    assert [(m["step"], m["loss"]) for m in _strict_lines(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    with pytest.raises(ValueError, match="step 5 is not after the last logged step 5"):
        log.append({"step": 5})
    assert MetricsLog(path).last_step == 5               # reopened without a start step: keeps all


def test_read_metrics_of_an_old_log_with_nan_and_repeats(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": NaN}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a": 4}\n'
                    '{"step": 4, "a": 44}\n{"step": 5, "a": Infinity}\n')
    rows = read_metrics(str(path))
    assert [(r["step"], r["a"]) for r in rows] == [(1, None), (2, 2), (3, 3), (4, 44), (5, None)]
    assert math.isnan(read_metrics(str(path), missing=math.nan)[0]["a"])
    MetricsLog(str(path))                                # opening rewrites it clean
    assert [r["a"] for r in _strict_lines(path)] == [None, 2, 3, 44, None]


def test_copied_run_dir_still_verifies(tmp_path):
    """A run copied elsewhere (cp -r, rsync) keeps verifying: the manifest holds relative paths."""
    out = _run_dir(tmp_path)
    shutil.copytree(out, tmp_path / "copy")
    assert find_resumable_checkpoint(str(tmp_path / "copy"))[0] == str(tmp_path / "copy" / "ckpt-000002")
