"""bench/bench_rollout.py at smoke size on CPU: the row it writes (tokens/s of both sides, the
decode step's bound and the fraction of it reached) and the CUDA-graph run's failure being
recorded, not fatal (the device check must keep the run's other numbers). No timing asserted
beyond sanity: a forward cannot beat its own compute bound."""

import pytest

from bench import bench_rollout

SMOKE = dict(hidden=64, layers=2, image=112, prompts=1, G=2, new=4, reps=1, device="cpu")


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    return bench_rollout.run_config("tiny", dict(SMOKE), 1, str(tmp_path_factory.mktemp("b")))


def test_row_has_both_sides_and_the_bound(row):
    assert row["hf_tokens_per_s"] > 0 and row["ours_tokens_per_s"] > 0
    assert row["bound_by"] == "compute" and row["bandwidth_GBps"] is None   # CPU: FLOPs only
    assert row["bound_flops"] > 0 and row["bound_bytes"] > 0
    assert 0 < row["fraction_of_bound"] < 1, row
    rate = row["matmul_TFLOPs"] * 1e12
    assert row["bound_ms"] == pytest.approx(1e3 * row["bound_flops"] / rate)


def test_graph_run_failure_is_recorded(tmp_path):
    """On CPU ``graphs: on`` is refused with a clear error: the helper returns it as a field."""
    from grpo_core.sampling import SamplingConfig

    policy = bench_rollout.tiny_policy(dict(SMOKE), str(tmp_path))
    enc = policy.encode([bench_rollout.Prompt("What is shown?", bench_rollout._images(1, 112))])
    got = bench_rollout._graph_run(policy, enc, 2, SamplingConfig(max_new_tokens=4), reps=1)
    assert list(got) == ["graphs_error"] and "needs a CUDA device" in got["graphs_error"]


def test_graph_run_times_capture_and_memory_with_a_fake_cuda(tmp_path, monkeypatch):
    """The CUDA branch's bookkeeping, on CPU: the graph step through the fake CUDA graph of
    test_rollout.py, CUDA's synchronize and memory counters stubbed; the row gets tokens/s, time
    per forward, capture time and peak memory (what the device check's one GPU run reports)."""
    import torch
    from test_rollout import _fake_cuda

    from grpo_core.sampling import SamplingConfig
    from grpo_models import step_runner

    _fake_cuda(monkeypatch)
    monkeypatch.setattr(step_runner, "resolve", lambda graphs, compile, device: "graph")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    policy = bench_rollout.tiny_policy(dict(SMOKE), str(tmp_path))
    enc = policy.encode([bench_rollout.Prompt("What is shown?", bench_rollout._images(1, 112))])
    got = bench_rollout._graph_run(bench_rollout.NoEos(policy), enc, 2,
                                   SamplingConfig(max_new_tokens=4), reps=2)
    assert "graphs_error" not in got, got
    assert got["ours_graph_tokens_per_s"] > 0 and got["ours_graph_ms_per_forward"] > 0
    assert got["ours_graph_capture_ms"] > 0 and got["ours_graph_peak_GiB"] == 3.0
    assert step_runner.StepRunner._capture.__name__ != "timed_capture"   # the wrapper is undone
