"""Smoke test of the benchmark suite (bench/run_all.py) and its report arithmetic (bench/report.py).

CI runs the suite's --quick mode on a minimal subset (loss sweep, advantages, training step; the
rollout benchmark has its own tests and is the slowest), in this process, into a temp folder.
No timing is asserted: only that every piece runs, and that the files, ratios and plots are right.
"""

import json
import os

import pytest

from bench import report, run_all


def test_ratios_match_cases_across_providers():
    rows = [
        {"op": "logits", "provider": "torch-eager", "mode": "full", "N": 4, "V": 1024, "ms": 8.0,
         "mem_mb": 4.0, "note": ""},
        {"op": "logits", "provider": "ours", "mode": "full", "N": 4, "V": 1024, "ms": 2.0, "mem_mb": 1.0, "note": "x"},
        {"op": "logits", "provider": "torch-eager", "mode": "full", "N": 8, "V": 1024, "ms": 10.0, "mem_mb": None},
        {"op": "logits", "provider": "ours", "mode": "full", "N": 8, "V": 1024, "ms": 20.0, "mem_mb": None},
        {"op": "logits", "provider": "ours", "mode": "full", "N": 16, "V": 1024, "ms": 5.0,
         "mem_mb": None},  # no reference
    ]
    added = report.add_ratios(rows, "torch-eager")
    assert added == ["speedup_vs_torch-eager", "mem_vs_torch-eager"]
    assert [r.get("speedup_vs_torch-eager") for r in rows] == [1.0, 4.0, 1.0, 0.5, None]
    assert rows[1]["mem_vs_torch-eager"] == 0.25 and "mem_vs_torch-eager" not in rows[3]


def test_roofline_from_bytes_formula_only_on_known_bandwidth():
    rows = [{"provider": "torch", "N": 1000, "ms": 1.0, "GB/s": 2.0}]
    assert "pct_roofline" in report.add_ratios(rows, "torch", peak_bytes_per_s=4e9)
    assert rows[0]["pct_roofline"] == pytest.approx(50.0)
    rows = [{"provider": "torch", "N": 1000, "ms": 1.0, "GB/s": 2.0}]
    assert "pct_roofline" not in report.add_ratios(rows, "torch", peak_bytes_per_s=None)


def test_normalise_accepts_both_result_layouts():
    a = run_all.normalise({"meta": {"title": "t"}, "rows": [{"provider": "p", "ms": 1.0}]}, "a.json")
    b = run_all.normalise({"command": "c", "results": [{"provider": "p", "shape": {"N": 2, "V": 3},
                                                        "ms": 1.0}]}, "b.json")
    assert a["rows"] == [{"provider": "p", "ms": 1.0}] and a["meta"]["title"] == "t"
    assert b["rows"] == [{"provider": "p", "N": 2, "V": 3, "ms": 1.0}] and b["meta"] == {"command": "c"}
    assert run_all.normalise({"something": 1}, "c.json") is None


def test_broken_or_missing_benchmark_is_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "BENCHES", [
        run_all.Bench("missing", "bench.no_such_benchmark", "torch", quick=[[]], full=[[]]),
        run_all.Bench("broken", "bench.report", "torch", quick=[[]], full=[[]]),   # has neither main nor run
        run_all.Bench("advantages", "bench.bench_advantages", "torch", quick=[["--quick"]], full=[[]]),
    ])
    suite = run_all.run_suite(quick=True, out=str(tmp_path))
    status = {k: v["status"] for k, v in suite["benchmarks"].items()}
    assert status == {"missing": "skipped", "broken": "failed", "advantages": "ok"}
    assert "AttributeError" in suite["benchmarks"]["broken"]["error"]
    assert run_all.main(["--quick", "--only", "broken", "--out", str(tmp_path)]) == 1


def test_quick_suite_writes_json_markdown_and_plots(tmp_path, monkeypatch):
    # the suite reads back whatever changes under bench/results while it runs; a private folder
    # keeps a benchmark run elsewhere on this checkout meanwhile out of this test's report
    from bench import common

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path / "results"))
    suite = run_all.run_suite(quick=True, out=str(tmp_path), only="loss,advantages,step")
    paths = suite["paths"]
    assert os.path.dirname(paths["json"]) == os.path.join(str(tmp_path), run_all.device_dir())
    assert paths["json"].endswith("-quick.json")
    with open(paths["json"]) as f:
        saved = json.load(f)
    assert {k: v["status"] for k, v in saved["benchmarks"].items()} == {"loss": "ok", "advantages": "ok", "step": "ok"}

    loss_rows = [r for p in saved["benchmarks"]["loss"]["parts"] for r in p["rows"]]
    assert {(r["T"], r["V"]) for r in loss_rows} == {(32, 4096), (64, 4096), (32, 1024)}   # the N and V sweep
    ref = [r for r in loss_rows if r["provider"] == "torch-eager" and r.get("ms")]
    assert ref and all(r["speedup_vs_torch-eager"] == 1.0 for r in ref)
    ours = [r for r in loss_rows if r["provider"] != "torch-eager" and r.get("ms")]
    assert ours and all(r["speedup_vs_torch-eager"] > 0 for r in ours)     # every fast path matched its case

    step = saved["benchmarks"]["step"]["parts"][0]["rows"]
    assert [r["provider"] for r in step] == ["ours"] and step[0]["s"] > 0 and step[0]["completion_len"] > 0

    with open(paths["md"]) as f:
        md = f.read()
    for needle in ("## loss (ok", "## advantages (ok", "## step (ok", "speedup_vs_torch-eager", "| provider |"):
        assert needle in md, f"markdown report lacks {needle!r}"
    names = sorted(os.path.basename(p) for p in paths["plots"])
    ops = {r["op"] for r in loss_rows}
    assert {n.rsplit("_vs_", 1)[0].rsplit("_", 1)[-1] for n in names} == ops, names   # one plot set per op
    assert sum(n.endswith("_vs_tokens.png") for n in names) == sum(n.endswith("_vs_V.png") for n in names) == len(ops)
    for p in paths["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{p} is not a PNG"
        assert os.path.basename(p) in md


def test_one_results_folder_per_machine_kind(monkeypatch):
    """bench/common.py's naming rule: cpu-<vendor>-<family>, so one machine kind is one folder."""
    import torch

    from bench import common

    for model, want in [("AMD EPYC 7B13 64-Core Processor", "cpu-AMD-EPYC"),
                        ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu-Intel-Xeon")]:
        monkeypatch.setattr(common, "_cpu_model", lambda m=model: m)
        assert common.device_name(torch.device("cpu")) == want
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "bench/results"], cwd=os.path.dirname(common.RESULTS_DIR) + "/..",
                             capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    cpu_dirs = sorted({p.split("/")[2] for p in tracked if p.split("/")[2].startswith("cpu")})
    assert cpu_dirs == ["cpu-AMD-EPYC"], f"one folder per machine kind under bench/results, got {cpu_dirs}"


def test_prefix_train_records_a_paths_out_of_memory(tmp_path, monkeypatch):
    """At 448² the plain path needs ≈ 99 GiB on a GPU: its OOM is that row's result, the other
    paths still run (here the plain path's timing raises the OOM on CPU)."""
    import glob

    import torch

    from bench import bench_prefix_train as bpt

    calls = []

    def fake_ms(step, steps):
        calls.append(bpt.mod.ENABLED)
        if not bpt.mod.ENABLED:                                     # the plain path
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 99.00 GiB")
        return 1.0

    monkeypatch.setattr(bpt, "_cpu_ms", fake_ms)
    bpt.main(["--prompts", "1", "--group", "2", "--out", str(tmp_path)])
    (path,) = glob.glob(str(tmp_path / "*" / "prefix_train.json"))
    rows = {r["path"]: r for r in json.load(open(path))["rows"]}
    assert calls == [False, True, True] and rows["plain"]["ms"] is None
    assert "out of memory" in rows["plain"]["note"]
    assert rows["rows"]["ms"] == rows["grouped"]["ms"] == 1.0


def test_patch_embed_bench_times_conv_and_gemm_on_the_same_weights(tmp_path):
    """Both rows (projection alone, the tiny vision tower) run the stock conv and the GEMM on the
    same weights: the outputs agree to fp32 rounding (a bench on different weights would not),
    and the policy keeps its GEMM afterwards."""
    from bench import bench_patch_embed as bpe

    stem = bpe.main(["--rounds", "1", "--out", str(tmp_path)])
    rows = {r["row"]: r for r in json.load(open(stem + ".json"))["rows"]}
    assert sorted(rows) == ["proj", "vision"]
    for r in rows.values():
        assert r["conv_ms"] > 0 and r["gemm_ms"] > 0 and r["conv_over_gemm"] > 0
        assert r["max_abs_diff"] < 1e-4, r               # outputs are O(1): fp32 rounding only
    assert rows["proj"]["patches"] == 4096 and rows["vision"]["patches"] == 4096
