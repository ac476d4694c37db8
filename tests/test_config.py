"""Config loading: YAML + overrides, and clear errors for unknown keys and bad values."""

import pytest

from grpo_core.config import load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "grpo:\n  beta: 0.0\n  agg: constant\nrollout:\n  group_size: 4\n")
    cfg = load_config(path, ["optim.lr=3e-4", "grpo.dual_clip=3", "model.template=plain"])
    assert cfg.grpo.beta == 0.0 and cfg.grpo.agg == "constant" and cfg.rollout.group_size == 4
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.grpo.dual_clip == 3.0
    assert cfg.model.template == "plain"


@pytest.mark.parametrize(
    "text,match",
    [
        ("grpo:\n  betta: 0.1\n", r"unknown key 'grpo.betta' \(did you mean 'beta'\?\)"),
        ("grpoo:\n  beta: 0.1\n", "unknown key 'grpoo'"),
        ("grpo:\n  agg: mean\n", "grpo.agg='mean' is not one of"),
        ("rollout:\n  group_size: two\n", "rollout.group_size must be an integer"),
        ("rollout:\n  group_size: 1\n", "rollout.group_size must be ≥ 2"),   # no group baseline: trains nothing
        ("grpo:\n  dual_clip: 0.5\n", "dual_clip must be > 1"),
        ("run:\n  progress: 3\n", "run.progress must be true/false"),
        ("grpo:\n  kl_placement: reward\n  beta: 0\n", "needs grpo.beta > 0"),
        ("grpo: 3\n", "grpo must be a mapping"),
        ("grpo:\n  agg: token_meen\n", "did you mean 'token_mean'"),
        ("run:\n  time_budget_s: -1\n", "run.time_budget_s must be ≥ 0"),
        ("data:\n  eval_size: -5\n", "data.eval_size must be ≥ 1"),
        ("optim:\n  lr: .inf\n", "optim.lr must be a finite number"),
        ("optim:\n  betas: [0.9]\n", "optim.betas must hold 2 values"),
        ("optim:\n  betas: [0.9, 1.5]\n", r"optim.betas\[1\] must be ≥ 0 and < 1"),
        ("grpo:\n  micro_batch_prompts: -1\n", "grpo.micro_batch_prompts must be ≥ 0"),
        ("rollout:\n  min_p: 1.0\n", "rollout.min_p must be ≥ 0 and < 1"),
        ("grpo:\n  agg: constant\n  max_len: 8\nrollout:\n  max_new_tokens: 16\n",
         "shorter than rollout.max_new_tokens"),
        ("sft:\n  optim:\n    lr: 0\n", "sft.optim.lr must be > 0"),
        # absurd or mistyped values: refused at load, not as raw errors after the model loads
        ("model:\n  device: gpu\n", r"model.device='gpu' is not a device; write auto .* cuda:N"),
        ("optim:\n  betas: [0.9, '0.99']\n", r"optim.betas\[1\] must be a number \(≥ 0 and < 1\)"),
        ("run:\n  seed: -1\n", r"run.seed must be ≥ 0 and ≤ 4294967295"),
        ("run:\n  seed: 4294967296\n", r"run.seed must be ≥ 0 and ≤ 4294967295"),
        ("data:\n  image_size: 1000000\n", r"data.image_size must be ≥ 28 and ≤ 1024"),
        ("rollout:\n  max_new_tokens: 1000000000\n", r"max_new_tokens must be ≥ 1 and ≤ 131072"),
        ("data:\n  train_size: 2000000\n  image_size: 1024\n", r"would hold 5\d\d\d GiB of images"),
    ],
)
def test_bad_config_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, text))


def test_cuda_backend_serves_the_training_path(tmp_path):
    """grpo.backend: cuda has a real fused-linear path (grpo_core/kernels/cuda_linear.py), so it
    loads; what the kernels check at load time is grpo_core.kernels.dispatch.check_backend."""
    assert load_config(_write(tmp_path, "grpo:\n  backend: cuda\n")).grpo.backend == "cuda"


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["grpo.beta"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, ["grpo.nope=1"])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_on_off_switches_survive_yaml_booleans(tmp_path):
    """YAML 1.1 reads on/off as booleans: ``compile: on`` (as the docs write it) is the word "on",
    in a file and as an override; a boolean for a field without on/off choices is still refused."""
    cfg = load_config(_write(tmp_path, "rollout:\n  compile: on\n  graphs: off\n"))
    assert (cfg.rollout.compile, cfg.rollout.graphs) == ("on", "off")
    cfg = load_config(None, ["rollout.compile=off", "rollout.graphs=auto"])
    assert (cfg.rollout.compile, cfg.rollout.graphs) == ("off", "auto")
    with pytest.raises(ValueError, match="model.template must be a string, got True"):
        load_config(None, ["model.template=on"])
