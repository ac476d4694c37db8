"""Plots: a resumed run is read whole, panels with nothing to show are left out, axes carry units,
benchmark plots show ratios measured in one run."""

import json
import math
import os

from grpo_app.plotting import plot_demo, plot_history, plot_study, read_metrics, rolling_mean


def test_read_metrics_keeps_the_last_record_of_each_step_and_tolerates_nan(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "reward": 0.1}\n{"step": 2, "reward": NaN}\n'     # the first run
                 '{"step": 2, "reward": 0.4}\n{"step": 3, "reward": Infinity}\n'   # resumed at step 1
                 '{"step": 4, "rew')                                               # cut short by a crash
    rows = read_metrics(str(p))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["reward"] == 0.4 and not math.isfinite(rows[2]["reward"])   # Infinity: a non-finite float


def test_rolling_mean_by_hand():
    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def _axes_of(monkeypatch):
    """Capture the figure plot_* saves: its axes' labels."""
    import matplotlib.figure

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def spy(fig, path, **kw):
        seen["axes"] = [(a.get_xlabel(), a.get_ylabel()) for a in fig.axes]
        return real(fig, path, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return seen


def test_history_plot_labels_axes_and_drops_the_kl_panel_without_kl(tmp_path, monkeypatch):
    seen = _axes_of(monkeypatch)
    hist = [{"step": s, "reward": s / 10, "accuracy": 0.3, "format_rate": 1.0, "completion_len": 5.0, "kl": 0.0}
            for s in range(1, 11)]
    hist[4]["eval/accuracy"] = 0.5
    assert plot_history(hist, str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    assert len(seen["axes"]) == 3                                   # β = 0: no KL panel, not a flat zero line
    assert all(x == "GRPO step" and y for x, y in seen["axes"])
    assert any("tokens" in y for _, y in seen["axes"])
    for m in hist:
        m["kl"] = 0.01 * m["step"]
    plot_history(hist, str(tmp_path / "b.png"))
    assert len(seen["axes"]) == 4 and "nats" in seen["axes"][3][1]


def test_demo_plot_shows_grpo_the_control_and_the_sft_baseline(tmp_path, monkeypatch):
    seen = _axes_of(monkeypatch)
    result = {"seed": 0, "grpo_seconds": 20.0, "chance": 0.25,
              "curves": {"GRPO": [(0, 0.25), (10, 0.6)], "GRPO, images swapped": [(0, 0.25), (10, 0.27)],
                         "SFT baseline (gold letters)": [(0, 0.25), (10, 0.9)]}}
    path = plot_demo(result, [{"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.4}], str(tmp_path / "d.png"))
    assert os.path.getsize(path) > 1000
    assert seen["axes"][0] == ("training wall time (s, one CPU thread)", "held-out accuracy (fraction correct)")


def test_study_plot(tmp_path):
    row = lambda name, a: {"setting": name, **{k: {"mean": a, "sd": 0.01, "values": [a - 0.01, a + 0.01]}  # noqa: E731
                                                for k in ("accuracy", "format_rate", "reasoning_words")}}
    summary = {"settings": [row("grpo", 0.5), row("sft", 0.7)], "start": {"accuracy": 0.25, "format_rate": 1.0,
                                                                          "reasoning_words": 4.0}}
    assert os.path.getsize(plot_study(summary, str(tmp_path / "s.png"))) > 1000


def test_bench_loss_plot_shows_same_run_ratios_not_times(tmp_path, monkeypatch):
    from bench.report import add_ratios, plot_loss

    seen = _axes_of(monkeypatch)
    rows = []
    for V, t_ref, t_ours in ((1024, 2.0, 1.0), (4096, 8.0, 2.0)):
        for prov, t, mem in (("torch-eager", t_ref, 4.0), ("ours", t_ours, 1.0)):
            rows.append({"op": "linear", "provider": prov, "mode": "full", "ms": t, "mem_mb": mem,
                         "N": 4, "T": 32, "V": V, "H": 64})
    assert plot_loss([dict(r) for r in rows], str(tmp_path / "x"), "t") == []   # no ratio columns: nothing
    add_ratios(rows, "torch-eager")
    assert [r["speedup_vs_torch-eager"] for r in rows if r["provider"] == "ours"] == [2.0, 4.0]   # by hand
    paths = plot_loss(rows, str(tmp_path / "x"), "t")
    assert [os.path.basename(p) for p in paths] == ["x_linear_vs_V.png"]
    assert seen["axes"][0][1].startswith("speedup over torch-eager") and "memory" in seen["axes"][1][1]
    json.dumps(rows)
