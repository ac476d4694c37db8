"""Sample logging (grpo_core.samples) and where the numbers go (grpo_core.reporting)."""

import json
import os
import sys

import pytest
import torch
from PIL import Image

from grpo_core import samples
from grpo_core.config import load_config
from grpo_core.data import VQARecord
from grpo_core.reporting import Reporters, check_report_to, progress_bar


def _rec(i, image):
    return VQARecord(id=f"r{i}", images=[image], question=f"Where is it <b>{i}</b>?",
                     options={"A": "left", "B": "right"}, answer_letter="A", answer_text="left")


def test_train_rows_take_the_first_completion_of_each_prompt():
    img = Image.new("L", (56, 56), 128)
    recs = [_rec(0, img), _rec(1, img), _rec(2, img)]
    texts = [f"c{i}" for i in range(6)]                       # B = 3 prompts, G = 2
    total = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0])
    cols = {"accuracy": torch.tensor([1.0, 0, 0, 0, 0, 1]), "format": torch.tensor([1.0, 1, 1, 1, 0, 1])}
    adv = torch.tensor([0.7, -0.7, 0.0, 0.0, -0.7, 0.7])
    rows = samples.train_rows(recs, texts, cols, total, adv, group_size=2, k=2)
    assert [r["completion"] for r in rows] == ["c0", "c2"]
    assert rows[0]["rewards"] == {"accuracy": 1.0, "format": 1.0} and rows[0]["total"] == 1.0
    assert rows[0]["advantage"] == 0.7 and rows[0]["group_mean"] == 0.5
    assert rows[1]["group_mean"] == 0.5 and rows[1]["gold"] == "A"
    assert samples.train_rows(recs, texts, cols, total, adv, group_size=2, k=0) == []


def test_write_samples_appends_escapes_and_stores_each_image_once(tmp_path):
    img = Image.new("L", (300, 200), 40)
    img.putpixel((10, 10), 255)
    recs = [_rec(0, img), _rec(1, img)]
    rows = [{**samples._base(r), "completion": "<script>alert(1)</script><answer>A</answer>",
             "rewards": {"accuracy": 1.0}} for r in recs]
    samples.write_samples(str(tmp_path), 5, rows)
    page = samples.write_samples(str(tmp_path), 10, rows[:1], split="eval")
    lines = open(tmp_path / "samples.jsonl").read().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5, 5, 10]
    assert json.loads(lines[2])["split"] == "eval"
    pngs = os.listdir(tmp_path / "samples")
    assert len(pngs) == 1                                            # one distinct image, written once
    assert json.loads(lines[0])["images"] == [f"samples/{pngs[0]}"]   # relative to the run folder
    thumb = Image.open(tmp_path / "samples" / pngs[0])
    assert max(thumb.size) == samples.THUMB_PX
    html = open(page).read()
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;0&lt;/b&gt;" in html
    assert html.index(">10<br>") < html.index(">5<br>")              # newest step first
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"step": 11, "cut sho')                              # a line cut short by a crash
    assert len(samples.read_samples(str(tmp_path / "samples.jsonl"))) == 3


def test_samples_are_due_at_evals_and_every_n_steps():
    assert samples.due(0, 7, evaluated=True) and not samples.due(0, 7, evaluated=False)
    assert samples.due(5, 10, False) and not samples.due(5, 11, False)


def test_unknown_or_repeated_reporter_is_a_config_error():
    with pytest.raises(ValueError, match="run.report_to has 'tensorbord'"):
        load_config(None, ["run.report_to=[tensorbord]"])
    with pytest.raises(ValueError, match="twice"):
        check_report_to(["wandb", "wandb"])
    assert load_config(None, ["run.report_to=[wandb]"]).run.report_to == ["wandb"]


def test_a_missing_reporter_package_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)                  # import wandb → ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[wandb\]'"):
        Reporters(["wandb"], str(tmp_path))


def test_tensorboard_reporter_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    r = Reporters(["tensorboard"], str(tmp_path))
    r.log({"reward": 0.5, "note": "text is skipped", "bad": float("nan")}, step=1)
    r.close()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_wandb_reporter_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = Reporters(["wandb"], str(tmp_path), config={"run": {"seed": 3}})
    r.log({"reward": 0.25, "accuracy": 0.5}, step=1)
    r.log({"reward": 0.75}, step=2)
    r.close()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))


def test_time_bar_counts_seconds_and_reaches_100_percent():
    bar = progress_bar(total_steps=1000, time_budget_s=50.0, enabled=True)
    assert bar.bar.total == 50 and bar.bar.unit == "s"
    bar.step({"reward": "0.1"}, elapsed=20.0)
    assert bar.bar.n == 20.0
    bar.step(elapsed=80.0)                                            # never past the budget
    assert bar.bar.n == 50
    bar.close()
    assert bar.bar.n == bar.bar.total


def test_step_bar_reaches_100_percent_when_the_loop_ends_early():
    bar = progress_bar(total_steps=10, start=4, enabled=True)
    bar.step()
    assert bar.bar.n == 5 and bar.bar.total == 10
    bar.close()                                                       # the loop ended normally
    assert bar.bar.n == 10
    quiet = progress_bar(total_steps=10, enabled=False)
    quiet.step()
    quiet.close()
    assert quiet.bar is None and quiet.steps == 1
