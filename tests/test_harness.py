"""The run harness keeps work safe (issue #28): divergence, Ctrl-C/SIGTERM, a full disk, two runs.

Each case injects its fault: a diverging lr (1e30) and a rollout with NaN logits; a signal sent
mid-step to a subprocess; a disk that reports no space, and a save failing with ENOSPC; an
output_dir that is a file or read-only; a second process holding the run folder, and a dead one.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import tiny_policy, vowel_reward

import grpo_core.harness as harness_mod
import grpo_core.safeguards as sg
from grpo_core.checkpoint import list_checkpoints
from grpo_core.config import TrainConfig
from grpo_core.data import make_synthetic_vqa
from grpo_core.harness import NonFiniteTrainingError
from grpo_core.rewards import RewardSpec
from grpo_core.rollout import NonFiniteLogitsError
from grpo_core.trainer import GRPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = [RewardSpec("vowels", vowel_reward, 1.0)]


def _cfg(out, steps=2, save_every=1, keep_last=1, lr=1e-3):
    cfg = TrainConfig()
    cfg.data.prompt = "nothink"
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 4, 2, 4
    cfg.grpo.beta, cfg.optim.lr = 0.0, lr
    cfg.run.steps, cfg.run.output_dir, cfg.run.progress = steps, str(out), False
    cfg.run.save_every, cfg.run.keep_last = save_every, keep_last
    return cfg


@pytest.fixture(scope="module")
def records():
    return make_synthetic_vqa(12, seed=3)


def _trainer(path, records, cfg):
    return GRPOTrainer(tiny_policy(path), records, cfg, reward_specs=SPECS)


def _ckpts(out):
    return [os.path.basename(p) for p in list_checkpoints(str(out))]


# ---- a slow divergence never replaces the last good checkpoint ---------------------------------
def test_exploding_weights_are_not_saved_and_the_last_good_checkpoint_is_kept(tiny_vlm_path, records,
                                                                              tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=1)).train()
    assert _ckpts(out) == ["ckpt-000001"]
    tr = _trainer(tiny_vlm_path, records, _cfg(out, steps=3, lr=1e30))   # optim.lr may change
    with pytest.raises(sg.DivergedError, match=r"grpo step 2: the weights' RMS went from .* not saved\. "
                                               r"The last good checkpoint is .*ckpt-000001: the same "
                                               r"command resumes from it") as e:
        tr.train()
    assert e.value.exit_code == 1
    assert _ckpts(out) == ["ckpt-000001"]               # keep_last=1, and still the good one
    assert tr.step_idx == 2                             # stopped at the first save after the jump


def test_weight_health_statistics():
    import torch

    m = torch.nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.fill_(-3.0)
    h = sg.weight_health(m)
    assert h["finite"] and h["max_abs"] == 3.0 and h["rms"] == pytest.approx(((16 + 4 * 9) / 20) ** 0.5)
    assert sg.is_jump(h, h) is None
    assert "RMS went from" in sg.is_jump({"rms": 11 * h["rms"], "max_abs": 3.0}, h)
    assert "largest |weight|" in sg.is_jump({"rms": h["rms"], "max_abs": 301.0}, h)
    with torch.no_grad():
        m.bias[1] = float("inf")
    assert sg.weight_health(m)["bad"] == "bias"


def test_nonfinite_rollouts_count_toward_max_nonfinite_steps(tiny_vlm_path, records, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=1)).train()
    cfg = _cfg(out, steps=5)
    cfg.run.max_nonfinite_steps = 2
    tr = _trainer(tiny_vlm_path, records, cfg)

    def nan_rollout(prompts):
        raise NonFiniteLogitsError("the logits hold NaN")
    monkeypatch.setattr(tr, "rollout", nan_rollout)
    with pytest.raises(NonFiniteTrainingError, match=r"GRPO steps 2..3: .* the weights are those of step "
                                                     r"1\. The last good checkpoint is .*ckpt-000002: the "
                                                     r"same command resumes from it"):
        tr.train()
    assert _ckpts(out) == ["ckpt-000002"]               # step 2 made no update: its weights are step 1's
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["nonfinite_rollout"] == 1   # 3 stopped it


# ---- Ctrl-C and SIGTERM: finish the step, save, one line, non-zero exit --------------------------
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from helpers import tiny_policy, vowel_reward
    from grpo_core.config import TrainConfig
    from grpo_core.data import make_synthetic_vqa
    from grpo_core.rewards import RewardSpec
    from grpo_core.safeguards import RunStopped
    from grpo_core.trainer import GRPOTrainer

    cfg = TrainConfig()
    cfg.data.prompt = "nothink"
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 4, 2, 4
    cfg.grpo.beta = 0.0
    cfg.run.steps, cfg.run.output_dir, cfg.run.progress = 5, {out!r}, False
    tr = GRPOTrainer(tiny_policy({model!r}), make_synthetic_vqa(12, seed=3), cfg,
                     reward_specs=[RewardSpec("v", vowel_reward, 1.0)])
    real = tr.rollout

    def rollout(prompts):                     # the signal arrives in the middle of step 2
        if tr.step_idx == 1:
            for _ in range({times}):
                os.kill(os.getpid(), signal.{sig})
        return real(prompts)
    tr.rollout = rollout
    try:
        tr.train()
    except RunStopped as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
""")


def _run_signalled(tmp_path, tiny_vlm_path, sig="SIGINT", times=1):
    out = tmp_path / "run"
    code = SCRIPT.format(tests=os.path.join(ROOT, "tests"), out=str(out), model=tiny_vlm_path,
                         sig=sig, times=times)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    return p, out


@pytest.mark.parametrize("sig,code", [("SIGINT", 130),
                                      pytest.param("SIGTERM", 143, marks=pytest.mark.slow)])   # ~17 s each
def test_a_signal_mid_step_finishes_the_step_saves_and_exits_nonzero(tmp_path, tiny_vlm_path, sig,
                                                                      code):
    p, out = _run_signalled(tmp_path, tiny_vlm_path, sig)
    assert p.returncode == code, p.stderr[-2000:]
    assert "interrupted at step 2; resume with the same command" in p.stderr
    assert "Traceback" not in p.stderr
    assert _ckpts(out) == ["ckpt-000002"]
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]
    assert not os.path.exists(out / sg.LOCK)            # the lock is released on the way out


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path, tiny_vlm_path):
    p, out = _run_signalled(tmp_path, tiny_vlm_path, "SIGINT", times=2)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "SIGINT again: exiting now, without saving" in p.stderr
    assert _ckpts(out) == []


# ---- a full disk: a clear line, the previous checkpoint kept ----------------------------------
def test_no_space_before_a_save_keeps_the_previous_checkpoint(tiny_vlm_path, records, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "run"
    _trainer(tiny_vlm_path, records, _cfg(out, steps=1)).train()
    real = harness_mod.shutil.disk_usage
    monkeypatch.setattr(harness_mod.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))          # 1000 bytes left
    with pytest.raises(sg.NoSpaceError, match=rf"no space left on {out}: need ~.* MB, have 1000 B; "
                                              rf"the previous checkpoint .*ckpt-000001 is kept"):
        _trainer(tiny_vlm_path, records, _cfg(out, steps=2)).train()
    assert _ckpts(out) == ["ckpt-000001"]


def test_enospc_during_a_save_removes_the_partial_copy(tiny_vlm_path, records, tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = _trainer(tiny_vlm_path, records, _cfg(out, steps=1))

    def full(*a, **k):
        os.makedirs(out / "ckpt-000001.tmp", exist_ok=True)     # what a save leaves half written
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tr, "save", full)
    with pytest.raises(sg.NoSpaceError, match="no space left on .*no earlier checkpoint exists"):
        tr.train()
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]


def test_torch_save_failing_on_a_full_disk_is_recognised():
    assert sg.is_out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                           "661824 vs 661716"))
    assert not sg.is_out_of_space(RuntimeError("other"))


# ---- output_dir: a file, not creatable, read-only -------------------------------------------------
def test_output_dir_errors_are_one_line(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(sg.OutputDirError, match="run.output_dir=.*file' is a file, not a folder"):
        sg.check_output_dir(str(f))
    with pytest.raises(sg.OutputDirError, match="cannot be created: Not a directory"):
        sg.check_output_dir(str(f / "sub"))

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(sg, "open", read_only, raising=False)
    with pytest.raises(sg.OutputDirError, match="is not writable \\(Read-only file system\\)"):
        sg.check_output_dir(str(tmp_path / "ro"))


def test_grpo_train_names_a_bad_output_dir_before_loading_a_model(tmp_path, capsys):
    from grpo_app.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    rc = main(["train", f"run.output_dir={f}", "model.path=/nonexistent/model"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is a file, not a folder" in err


# ---- one run per folder ---------------------------------------------------------------------------
def test_a_live_lock_refuses_and_a_dead_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from grpo_core.safeguards import RunLock
        with RunLock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(sg.RunLocked, match=rf"{out} is in use by another run \(pid {holder.pid} on "):
            with sg.RunLock(str(out)):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(out / sg.LOCK)                # killed: its lock stays behind, stale
    with sg.RunLock(str(out)) as lock:
        assert lock.notes and f"took over the lock of a run that is gone (pid {holder.pid}" in lock.notes[0]
        assert json.load(open(out / sg.LOCK))["pid"] == os.getpid()
        with sg.RunLock(str(out)):                      # re-entrant in one process
            pass
        assert os.path.exists(out / sg.LOCK)
    assert not os.path.exists(out / sg.LOCK)


def test_a_second_run_in_a_locked_folder_is_refused(tiny_vlm_path, records, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / sg.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname(),
                                           "started": "earlier"}))
    with pytest.raises(sg.RunLocked, match="is in use by another run"):
        _trainer(tiny_vlm_path, records, _cfg(out, steps=1)).train()
    assert _ckpts(out) == [] and not os.path.exists(out / "metrics.jsonl")


def test_signal_exit_codes():
    assert sg.Interrupted("x", signal.SIGINT).exit_code == 130
    assert sg.Interrupted("x", signal.SIGTERM).exit_code == 143


def test_the_epoch_permutation_is_drawn_once_per_epoch(monkeypatch):
    """_draw_record: one randperm per epoch (not per record), the same order as drawing it each time."""
    import torch

    import grpo_core.trainer as trainer_mod

    tr = object.__new__(GRPOTrainer)
    tr.records, tr.cfg, tr.data_pos = list(range(7)), TrainConfig(), 0
    calls, real = [], torch.randperm
    monkeypatch.setattr(trainer_mod.torch, "randperm", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = [tr._draw_record() for _ in range(3 * 7 + 2)]
    assert len(calls) == 4                                            # epochs 0, 1, 2, 3
    want = [int(real(7, generator=torch.Generator().manual_seed(17 * e))[i]) for e in range(4) for i in range(7)]
    assert got == want[:23]
