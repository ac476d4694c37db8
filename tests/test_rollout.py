"""generate_groups against a toy policy (fast, exact) and the real tiny Qwen2-VL.

The toy policy (examples/toy_policy.py, BigramPolicy) is a position-aware bigram LM that
implements the full Policy protocol: hidden(prev token, position) = E[prev] + P[position],
logits = hidden @ W.T. Its decode state is just each row's position, so prefill / expand /
decode_step / completion_hidden are exact and cheap, and every rollout property (layout, masks,
EOS, log-probs, chunking, seeds) can be checked without a transformer.

Real-model comparisons (vs HF generate, vs teacher forcing) use the float64 tiny model, so greedy
argmax ties and reduction-order rounding cannot flip a token on another CPU; the sampler's own
log-probs are fp32 by contract and are held to fp32 rounding (tests/numerics.py).
"""


import pytest
import torch
from helpers import img
from numerics import assert_close, tol

from examples.toy_policy import BigramPolicy
from grpo_core.policy import Prompt
from grpo_core.rollout import Rollout, generate_groups
from grpo_core.sampling import SamplingConfig

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

NEG = float("-inf")


PROMPTS = [Prompt("what is shown?"), Prompt("a"), Prompt("which lobe is affected here"), Prompt("ct or mri")]


def fp32_logprob_tol(want: torch.Tensor) -> float:
    """fp32 log-softmax of logits of size ~|logp|: a handful of fp32 roundings at that size."""
    return tol(torch.float32, 1.0 + float(want.abs().max()), k=16)


def recompute_logprobs(policy, ro: Rollout, T: float, eos_shift: float = 0.0) -> torch.Tensor:
    """Teacher-forced log_softmax((hidden @ W.T + bias) / T)[c_j] (what the trainer computes);
    ``eos_shift``: what ``EosLeaning`` added to the EOS logits."""
    with torch.no_grad():
        h = policy.completion_hidden(ro.encoded, ro.completion_ids, ro.completion_mask, ro.group_size)
        z = policy._head(h) if hasattr(policy, "_head") else h.float() @ policy.lm_head_weight.float().T
        z[..., list(policy.eos_token_ids)] += eos_shift
        if policy.lm_head_bias is not None:
            z = z + policy.lm_head_bias.to(z.device)
        lp = torch.log_softmax(z / T, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    return lp * ro.completion_mask


def check_layout(policy, ro: Rollout, B: int, G: int, max_new: int):
    """Invariants every rollout must satisfy: shapes, EOS/pad/mask, finished/truncated."""
    N, C = ro.completion_ids.shape
    assert N == B * G and C <= max_new and ro.logprobs.shape == (N, C) and ro.completion_mask.shape == (N, C)
    assert ro.encoded.input_ids.shape[0] == B and len(ro.texts) == N
    eos = torch.tensor(policy.eos_token_ids)
    is_eos = torch.isin(ro.completion_ids, eos) & ro.completion_mask.bool()
    assert (is_eos.sum(-1) <= 1).all(), "a row counts tokens after its EOS"
    for i in range(N):
        m, ids = ro.completion_mask[i].bool(), ro.completion_ids[i]
        n_tok = int(m.sum())
        assert m[:n_tok].all() and not m[n_tok:].any(), f"row {i}: mask is not a prefix"
        assert (ids[n_tok:] == policy.pad_token_id).all(), f"row {i}: not pad after the end"
        assert (ro.logprobs[i, n_tok:] == 0).all() and (ro.logprobs[i, :n_tok] <= 0).all()
        if not ro.truncated[i]:
            assert int(ids[n_tok - 1]) in policy.eos_token_ids, f"row {i}: finished but last token is not EOS"
            assert not ro.truncated[i]
        else:
            assert ro.truncated[i] and n_tok == max_new and not is_eos[i].any()
    assert ro.stats["tokens"] == int(ro.completion_mask.sum())
    assert not torch.isin(ro.completion_ids, torch.tensor(getattr(policy, "suppressed", []), dtype=torch.long)).any()


# ── toy-policy tests ────────────────────────────────────────────────────────────────────────────

def test_prefill_once_per_prompt_and_layout():
    pol = BigramPolicy(eos_logit=2.0)
    ro = generate_groups(pol, PROMPTS, 5, SamplingConfig(max_new_tokens=12, seed=0))
    assert pol.prefill_rows == [4], "each prompt must be prefilled once, not G times"
    check_layout(pol, ro, 4, 5, 12)
    assert (~ro.truncated).any() and ro.truncated.any(), "eos_logit should give a mix of stopped and truncated rows"
    for b in range(4):  # the G samples of a group differ
        rows = ro.completion_ids[b * 5:(b + 1) * 5]
        assert len({tuple(r.tolist()) for r in rows}) > 1


@pytest.mark.parametrize("cfg", [SamplingConfig(max_new_tokens=10, seed=1),
                                 SamplingConfig(max_new_tokens=10, seed=1, temperature=0.6),
                                 SamplingConfig(max_new_tokens=10, seed=1, temperature=1.3, top_k=5, top_p=0.9)])
def test_logprobs_match_teacher_forced_recomputation(cfg):
    pol = BigramPolicy(eos_logit=1.0)
    ro = generate_groups(pol, PROMPTS, 3, cfg)
    want = recompute_logprobs(pol, ro, cfg.temperature)
    assert_close(ro.logprobs, want, "log-probs vs teacher forcing", atol=fp32_logprob_tol(want))


def test_seed_reproducible_and_seed_sensitive():
    pol = BigramPolicy(eos_logit=1.0)
    a = generate_groups(pol, PROMPTS, 4, SamplingConfig(max_new_tokens=8, seed=3))
    b = generate_groups(pol, PROMPTS, 4, SamplingConfig(max_new_tokens=8, seed=3))
    c = generate_groups(pol, PROMPTS, 4, SamplingConfig(max_new_tokens=8, seed=4))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_all_rows_stop_early_when_eos_is_certain():
    pol = BigramPolicy(eos_logit=60.0)
    ro = generate_groups(pol, PROMPTS, 2, SamplingConfig(max_new_tokens=16, seed=0))
    assert ro.completion_ids.shape[1] == 1 and (~ro.truncated).all() and ro.completion_ids.eq(1).all()
    assert ro.stats["steps"] == 1 and ro.texts == [""] * 8
    pol = BigramPolicy(eos_logit=-60.0)  # never stops: every row truncated at the budget
    ro = generate_groups(pol, PROMPTS, 2, SamplingConfig(max_new_tokens=7, seed=0))
    assert ro.completion_ids.shape[1] == 7 and ro.truncated.all() and ro.completion_mask.all()


@pytest.mark.parametrize("cap", [1, 3, 4, 7])
def test_chunking_matches_one_batch_for_greedy(cap):
    pol = BigramPolicy(eos_logit=3.0)
    cfg = SamplingConfig(max_new_tokens=12, greedy=True)
    one = generate_groups(pol, PROMPTS, 3, cfg)
    pol.prefill_rows.clear()
    many = generate_groups(pol, PROMPTS, 3, SamplingConfig(max_new_tokens=12, greedy=True, max_batch_sequences=cap))
    assert sum(pol.prefill_rows) == 4 and max(pol.prefill_rows) == max(1, cap // 3)
    for f in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(one, f), getattr(many, f)), f
    # matmuls of different batch sizes may round differently: log-probs agree to fp32 rounding
    assert_close(many.logprobs, one.logprobs, "chunked vs one batch", atol=fp32_logprob_tol(one.logprobs))
    assert one.texts == many.texts and many.stats["chunks"] == len(pol.prefill_rows)


def test_accepts_encoded_and_progress_hook():
    pol = BigramPolicy()
    enc = pol.encode(PROMPTS[:2])
    seen = []
    ro = generate_groups(pol, enc, 2, SamplingConfig(max_new_tokens=5, seed=0),
                         progress=lambda s, t: seen.append((s, t)))
    assert ro.encoded is enc and seen[-1][1] == 5 and [s for s, _ in seen] == list(range(1, len(seen) + 1))


def test_bad_group_size_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        generate_groups(BigramPolicy(), PROMPTS, 0, SamplingConfig(max_new_tokens=2))


# ── real tiny Qwen2-VL (random weights, images, CPU fp32) ───────────────────────────────────────

def _vlm_prompts():
    """Different image sizes (4, 12, 6 image tokens) and text lengths → ragged left padding."""
    return [
        Prompt("What is shown in this scan? A. CT B. MRI C. X-ray D. PET", [img(56, 56, 1)]),
        Prompt("Where is the lesion?", [img(84, 112, 2)]),
        Prompt("Which organ?", [img(90, 70, 3)]),
    ]


def _hf_generate(policy, enc, max_new, num_return_sequences=1, also_suppress=()):
    """HF ``generate`` on exactly our encoded tensors, greedy, vision tokens suppressed.

    Our sampler never emits the vision special tokens (lm_head_bias = −inf there); a random model
    happily would, so HF gets the same suppression via ``suppress_tokens`` (its processor sets those
    logits to −inf) — otherwise the two would legitimately differ at the first such token.
    ``min_new_tokens`` is not set: both sides stop at EOS and pad after it. HF refuses
    ``num_return_sequences > 1`` with do_sample=False, so for G > 1 it samples with top_k=1, which
    is argmax too but goes through generate's input expansion (what our fan-out must equal).
    """
    never = torch.isinf(policy.lm_head_bias).nonzero().flatten().tolist() + list(also_suppress)
    greedy = {"do_sample": False} if num_return_sequences == 1 else {"do_sample": True, "top_k": 1}
    out = policy.model.generate(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=enc.pixel_values,
        image_grid_thw=enc.image_grid_thw, mm_token_type_ids=(enc.input_ids == policy.image_token_id).int(),
        **greedy, max_new_tokens=max_new, num_return_sequences=num_return_sequences,
        suppress_tokens=never, eos_token_id=list(policy.eos_token_ids), pad_token_id=policy.pad_token_id,
    )
    return out[:, enc.input_ids.shape[1]:]                                # (N, ≤ max_new) completions


def _check_vlm_layout(policy, ro, B, G, max_new):
    check_layout(policy, ro, B, G, max_new)
    never = torch.isinf(policy.lm_head_bias).nonzero().flatten()
    assert not torch.isin(ro.completion_ids, never).any(), "sampled a suppressed vision token"


@pytest.mark.parametrize("G", [1, 2])
def test_vlm_greedy_matches_hf_generate(tiny_vlm_policy64, G):
    pol = tiny_vlm_policy64
    enc = pol.encode(_vlm_prompts())
    assert len(set(enc.attention_mask.sum(-1).tolist())) == 3, "prompts should need different left padding"
    ro = generate_groups(pol, enc, G, SamplingConfig(max_new_tokens=10, greedy=True))
    _check_vlm_layout(pol, ro, 3, G, 10)
    with torch.no_grad():
        want = _hf_generate(pol, enc, 10, num_return_sequences=G)
    C = max(want.shape[1], ro.completion_ids.shape[1])
    got = torch.nn.functional.pad(ro.completion_ids, (0, C - ro.completion_ids.shape[1]), value=pol.pad_token_id)
    want = torch.nn.functional.pad(want, (0, C - want.shape[1]), value=pol.pad_token_id)
    assert torch.equal(got, want), f"greedy differs from HF generate:\nours {got}\nhf   {want}"


def test_vlm_sampled_groups_differ_and_logprobs_match_teacher_forcing(tiny_vlm_policy64):
    pol = tiny_vlm_policy64
    enc = pol.encode(_vlm_prompts())
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.8, seed=0)
    ro = generate_groups(pol, enc, 4, cfg)
    _check_vlm_layout(pol, ro, 3, 4, 8)
    assert ro.encoded is enc and ro.stats["tokens"] > 0 and ro.stats["prefill_s"] > 0
    for b in range(3):
        rows = ro.completion_ids[b * 4:(b + 1) * 4]
        assert len({tuple(r.tolist()) for r in rows}) > 1, f"group {b}: all G samples identical"
    want = recompute_logprobs(pol, ro, cfg.temperature)
    assert_close(ro.logprobs, want, "rollout log-probs vs teacher forcing", atol=fp32_logprob_tol(want))


def test_vlm_seed_reproducible(tiny_vlm_policy):
    pol = tiny_vlm_policy
    enc = pol.encode(_vlm_prompts()[:2])
    run = lambda seed: generate_groups(pol, enc, 3, SamplingConfig(max_new_tokens=6, seed=seed))  # noqa: E731
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


class EosLeaning:
    """Wraps a policy and adds ``shift`` to its EOS logits, so real-model rows stop early."""

    def __init__(self, policy, shift):
        self._p, self._shift = policy, shift

    def __getattr__(self, name):
        return getattr(self._p, name)

    def _lean(self, logits):
        logits[:, list(self._p.eos_token_ids)] += self._shift
        return logits

    def prefill(self, enc):
        logits, state = self._p.prefill(enc)
        return self._lean(logits), state

    def decode_step(self, state, tokens):
        logits, state = self._p.decode_step(state, tokens)
        return self._lean(logits), state


def test_vlm_eos_stops_rows_and_chunking_matches(tiny_vlm_policy64):
    pol = EosLeaning(tiny_vlm_policy64, shift=4.0)
    enc = pol.encode(_vlm_prompts())
    ro = generate_groups(pol, enc, 4, SamplingConfig(max_new_tokens=12, seed=2))
    _check_vlm_layout(pol, ro, 3, 4, 12)
    assert (~ro.truncated).any() and ro.truncated.any(), "expected both early-stopped and truncated rows"
    assert ro.lengths[~ro.truncated].min() < 12
    for text, ids, m in zip(ro.texts, ro.completion_ids, ro.completion_mask):
        assert text == tiny_vlm_policy64.decode(ids[None], m[None])[0]
    # greedy, one prompt per chunk (cap 5 // G 4 = 1) == one batch
    greedy = SamplingConfig(max_new_tokens=12, greedy=True)
    one = generate_groups(pol, enc, 4, greedy)
    many = generate_groups(pol, enc, 4, SamplingConfig(max_new_tokens=12, greedy=True, max_batch_sequences=5))
    assert many.stats["chunks"] == 3
    assert torch.equal(one.completion_ids, many.completion_ids)
    assert torch.equal(one.completion_mask, many.completion_mask)
    assert_close(many.logprobs, one.logprobs, "chunked vs one batch", atol=fp32_logprob_tol(one.logprobs))


def test_vlm_long_greedy_outgrows_the_kv_buffer(tiny_vlm_policy64):
    """60+ steps on a ~30-token prompt (more than the 64 spare columns a plain expand reserves;
    the rollout sizes the buffer for the budget): still == HF."""
    pol = tiny_vlm_policy64
    enc = pol.encode([Prompt("Short.", [img(56, 56, 7)])])
    no_eos = EosLeaning(pol, shift=-1e4)  # HF side: EOS suppressed as well, so both run 60 steps
    ro = generate_groups(no_eos, enc, 1, SamplingConfig(max_new_tokens=60 + enc.input_ids.shape[1], greedy=True))
    assert ro.truncated.all() and ro.completion_ids.shape[1] > 64
    with torch.no_grad():
        want = _hf_generate(pol, enc, ro.completion_ids.shape[1], also_suppress=pol.eos_token_ids)
    assert torch.equal(ro.completion_ids, want)


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_shared_prefix_decode_matches_fanned_out_cache(tiny_vlm_path, tmp_path, dtype, backbone):
    """grpo_models.prefix_decode (prompt KV shared per group) vs HF's forward on a fanned-out cache.

    fp64 model: the fp32 logits equal to fp32 rounding. bf16: its error against the fp64 reference is
    at most twice the error of the plain bf16 path (HF forward on the fanned-out cache) — the
    project's bf16 rule.
    """
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    from grpo_models import policy_utils as pu
    from grpo_models import prefix_decode

    def logits_over_steps(pol, shared, G=3, steps=4):
        enc = pol.encode(_vlm_prompts())
        ids = torch.randint(10, 400, (len(enc) * G, steps), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, state = pol.prefill(enc)
            state = pol.expand(state, G) if shared else pu.expand_state(state, G)
            assert isinstance(state, prefix_decode.PrefixDecodeState) == shared
            out = []
            for j in range(steps):
                logits, state = pol.decode_step(state, ids[:, j])
                out.append(logits)
        return torch.stack(out, 1)                                       # (N, steps, V)

    if backbone == "qwen2_5_vl":                                         # the same text layers
        from grpo_models.tiny import build_tiny_qwen2_5_vl
        tiny_vlm_path = build_tiny_qwen2_5_vl(str(tmp_path / "q25"))
    ref = logits_over_steps(Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float64, device="cpu"), False)
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=dtype, device="cpu")
    assert prefix_decode.supported(pol._lm), f"{backbone}: shared-prefix decode not taken"
    ours = logits_over_steps(pol, True)
    err = (ours - ref).abs()
    if dtype == torch.float64:
        assert_close(ours, ref, "shared-prefix decode vs fanned-out cache",
                     atol=tol(torch.float32, ref.abs().max(), k=2))
    else:
        plain = (logits_over_steps(pol, False) - ref).abs()
        assert err.max() <= 2 * plain.max() + 1e-3, (
            f"bf16 shared-prefix error max {err.max():.3g} (mean {err.mean():.3g}) > 2× plain bf16 "
            f"error max {plain.max():.3g} (mean {plain.mean():.3g})")


class NaNAfter:
    """Wraps a policy; from decode step ``k`` on, rows ``rows`` get NaN logits (a diverged model)."""

    def __init__(self, policy, k, rows, value=float("nan")):
        self._p, self._k, self._rows, self._value, self._t = policy, k, rows, value, 0

    def __getattr__(self, name):
        return getattr(self._p, name)

    def prefill(self, enc):
        self._t = 0
        return self._p.prefill(enc)

    def decode_step(self, state, tokens):
        logits, state = self._p.decode_step(state, tokens)
        self._t += 1
        if self._t >= self._k:
            logits = logits.clone()
            logits[self._rows] = self._value
        return logits, state


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("greedy", [False, True])
def test_non_finite_logits_are_a_clear_error(value, greedy):
    from grpo_core.rollout import NonFiniteLogitsError

    pol = NaNAfter(BigramPolicy(eos_logit=-60.0), k=3, rows=[5], value=value)
    with pytest.raises(NonFiniteLogitsError, match=r"decode step 3 in rows \[5\] \(prompts \[1\]"):
        generate_groups(pol, PROMPTS, 3, SamplingConfig(max_new_tokens=8, seed=0, greedy=greedy))


# ── batch-independent sampling ───────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("cap", [1, 3, 7])
def test_sampled_tokens_do_not_depend_on_the_batch(cap):
    """Each row's draws are keyed by (seed, prompt, sample, position): chunking changes nothing."""
    pol = BigramPolicy(eos_logit=1.0)
    cfg = SamplingConfig(max_new_tokens=12, seed=11, temperature=1.2)
    one = generate_groups(pol, PROMPTS, 3, cfg)
    capped = SamplingConfig(**{**cfg.__dict__, "max_batch_sequences": cap})
    many = generate_groups(pol, PROMPTS, 3, capped)
    assert many.stats["chunks"] > 1 and (~one.truncated).any()
    for f in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(one, f), getattr(many, f)), f
    assert_close(many.logprobs, one.logprobs, "chunked vs one batch",
                 atol=fp32_logprob_tol(one.logprobs))
    # the prompt a row belongs to keys its stream: the same prompt alone gives the same rows
    alone = generate_groups(pol, PROMPTS[:1], 3, cfg)
    assert torch.equal(alone.completion_ids, one.completion_ids[:3, :alone.completion_ids.shape[1]])


def test_vlm_sampled_tokens_do_not_depend_on_chunking(tiny_vlm_policy64):
    """float64 model: logits of other batch shapes differ in the last fp64 bits: no draw flips."""
    pol = EosLeaning(tiny_vlm_policy64, shift=3.0)
    enc = pol.encode(_vlm_prompts())
    cfg = SamplingConfig(max_new_tokens=10, seed=4)
    one = generate_groups(pol, enc, 4, cfg)
    capped = SamplingConfig(max_new_tokens=10, seed=4, max_batch_sequences=5)
    many = generate_groups(pol, enc, 4, capped)
    assert many.stats["chunks"] == 3 and (~one.truncated).any() and one.truncated.any()
    assert torch.equal(one.completion_ids, many.completion_ids)
    assert torch.equal(one.completion_mask, many.completion_mask)


# ── finished rows leave the batch (compaction) and the fixed-shape decode step ──────────────────

def test_compaction_changes_no_token():
    pol = BigramPolicy(eos_logit=2.5)
    base = dict(max_new_tokens=16, seed=5)
    off = generate_groups(pol, PROMPTS, 4, SamplingConfig(**base, compact_below=0.0))
    on = generate_groups(pol, PROMPTS, 4, SamplingConfig(**base, compact_below=1.0))
    assert off.stats["compactions"] == 0 and on.stats["compactions"] >= 2
    assert on.stats["rows_decoded"] < off.stats["rows_decoded"]
    for f in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(off, f), getattr(on, f)), f
    assert_close(on.logprobs, off.logprobs, "compacted vs not", atol=fp32_logprob_tol(off.logprobs))
    check_layout(pol, on, 4, 4, 16)


def test_compaction_plan_keeps_live_rows_prompt_major():
    from grpo_core.rollout import _compaction

    alive = torch.tensor([0, 1, 0, 1,   0, 0, 0, 0,   1, 0, 0, 0], dtype=torch.bool)  # b 3, g 4
    keep, slots, g2 = _compaction(alive, 4, 3, 0.75)
    assert keep.tolist() == [0, 2] and g2 == 2
    assert slots.tolist() == [1, 3, 8, 9]                                # 9: filler (finished)
    assert _compaction(alive, 4, 3, 0.3) is None                         # 4 slots > 0.3 · 12


def _static_mode(monkeypatch, mode="static"):
    """Make the Qwen2-VL policy run every decode step through the fixed-shape path."""
    from grpo_models import step_runner

    monkeypatch.setattr(step_runner, "resolve", lambda graphs, compile, device: mode)


@pytest.mark.parametrize("static", [False, True])
def test_vlm_compaction_and_fixed_shapes_change_no_token(tiny_vlm_policy64, monkeypatch, static):
    """float64: compaction on/off and eager/fixed-shape steps give the same tokens; log-probs ==
    teacher forcing; greedy == HF generate."""
    if static:
        _static_mode(monkeypatch)
    pol = EosLeaning(tiny_vlm_policy64, shift=3.5)
    enc = pol.encode(_vlm_prompts())
    cfg = dict(max_new_tokens=14, seed=9)
    off = generate_groups(pol, enc, 4, SamplingConfig(**cfg, compact_below=0.0))
    on = generate_groups(pol, enc, 4, SamplingConfig(**cfg, compact_below=0.9))
    assert on.stats["compactions"] >= 1 and (~on.truncated).any() and on.truncated.any()
    assert torch.equal(off.completion_ids, on.completion_ids)
    assert torch.equal(off.completion_mask, on.completion_mask)
    want = recompute_logprobs(tiny_vlm_policy64, on, 1.0, eos_shift=3.5)
    assert_close(on.logprobs, want, "compacted rollout log-probs vs teacher forcing",
                 atol=fp32_logprob_tol(want))
    greedy_cfg = SamplingConfig(max_new_tokens=10, greedy=True)
    greedy = generate_groups(tiny_vlm_policy64, enc, 2, greedy_cfg)
    with torch.no_grad():
        hf = _hf_generate(tiny_vlm_policy64, enc, 10, num_return_sequences=2)
    C = max(hf.shape[1], greedy.completion_ids.shape[1])
    fill = tiny_vlm_policy64.pad_token_id
    pad = lambda x: torch.nn.functional.pad(x, (0, C - x.shape[1]), value=fill)  # noqa: E731
    assert torch.equal(pad(greedy.completion_ids), pad(hf))


def _steps_logits(pol, enc, G, ids, mode=None, compact_at=None):
    """Prefill + expand + len(ids[0]) decode steps of given tokens → logits (N', steps, V) fp32.

    ``mode``: the fixed-shape runner (None: eager); ``compact_at``: before that step, drop prompt 1
    and keep 2 rows of every other prompt (as the rollout's compaction would)."""
    from grpo_models import step_runner

    rows = torch.arange(ids.shape[0])
    with torch.no_grad():
        logits, state = pol.prefill(enc)
        state = pol.expand(state, G)
        real = step_runner.resolve
        step_runner.resolve = lambda graphs, compile, device: mode
        try:
            state = pol.plan_decode(state, ids.shape[1], "off", "off")
        finally:
            step_runner.resolve = real
        assert (state.runner is None) == (mode is None)
        out = []
        for j in range(ids.shape[1]):
            if j == compact_at:
                keep = torch.tensor([b for b in range(len(enc)) if b != 1])
                slots = (keep[:, None] * G + torch.tensor([G - 1, 0])).flatten()
                state = pol.compact_state(state, keep, slots, 2)
                rows = rows[slots]
                out = [o[slots] for o in out]
            logits, state = pol.decode_step(state, ids[rows, j])
            out.append(logits.clone())
    return torch.stack(out, 1), rows


@pytest.mark.parametrize("compact_at", [None, 2])
def test_fixed_shape_step_matches_eager(tiny_vlm_policy64, compact_at):
    pol = tiny_vlm_policy64
    enc = pol.encode(_vlm_prompts())
    ids = torch.randint(10, 400, (len(enc) * 3, 5), generator=torch.Generator().manual_seed(1))
    eager, rows = _steps_logits(pol, enc, 3, ids, None, compact_at)
    static, rows2 = _steps_logits(pol, enc, 3, ids, "static", compact_at)
    assert torch.equal(rows, rows2) and static.dtype == torch.float32
    assert_close(static, eager, "fixed-shape vs eager decode",
                 atol=tol(torch.float32, eager.abs().max(), k=2))
    if compact_at is not None:                  # compaction changes no row's logits
        full, _ = _steps_logits(pol, enc, 3, ids, None, None)
        assert_close(eager, full[rows], "compacted vs full",
                     atol=tol(torch.float32, full.abs().max(), k=2))


def test_decode_under_bf16_autocast(tiny_vlm_path):
    """fp32 weights, bf16 compute (the trainer's autocast): logits come back fp32; eager and
    fixed-shape agree; the error against the fp64 model is at most 2× that of HF's own forward
    under the same autocast (the plain bf16 path)."""
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    from grpo_models import policy_utils as pu

    ref_pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float64, device="cpu")
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float32, device="cpu")
    enc = pol.encode(_vlm_prompts())
    ids = torch.randint(10, 400, (len(enc) * 2, 4), generator=torch.Generator().manual_seed(2))
    ref, _ = _steps_logits(ref_pol, enc, 2, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, _ = _steps_logits(pol, enc, 2, ids)
        static, _ = _steps_logits(pol, enc, 2, ids, "static")
        with torch.no_grad():                   # plain path: HF forward on a fanned-out cache
            logits, state = pol.prefill(enc)
            state = pu.expand_state(state, 2)
            plain = []
            for j in range(ids.shape[1]):
                logits, state = pol.decode_step(state, ids[:, j])
                plain.append(logits)
    plain = torch.stack(plain, 1)
    assert eager.dtype == static.dtype == torch.float32
    err, plain_err = (eager - ref).abs().max(), (plain - ref).abs().max()
    assert err <= 2 * plain_err + 1e-3, f"autocast error {err:.3g} > 2× plain {plain_err:.3g}"
    assert (static - ref).abs().max() <= 2 * plain_err + 1e-3


class _FakeGraph:
    """CPU stand-in for torch.cuda.CUDAGraph: capture records the step; replay re-runs it into the
    captured output buffer (what a real replay does to the same addresses)."""

    runner = None                                        # the StepRunner capturing now

    def __init__(self):
        self.fn, self.out = None, None

    def replay(self):
        self.out.copy_(self.fn())


def _fake_cuda(monkeypatch):
    import contextlib

    from grpo_models import step_runner

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def graph(g):                                        # a real capture runs no kernel: undo it
        runner = _FakeGraph.runner
        before = [t.clone() for t in runner._mutable]
        yield
        for t, b in zip(runner._mutable, before):
            t.copy_(b)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    orig = step_runner.StepRunner._capture

    def capture(self, tokens):                           # after the real capture logic, bind replay
        _FakeGraph.runner = self
        orig(self, tokens)
        self._graph.fn, self._graph.out = (lambda: self._fn(self._tokens)), self._logits

    monkeypatch.setattr(step_runner.StepRunner, "_capture", capture)


def test_graph_runner_protocol_with_a_fake_cuda_graph(tiny_vlm_policy64, monkeypatch):
    """The CUDA-graph runner's bookkeeping (warm-up and capture leave the state as it was; static
    input/output buffers; a new graph after compaction), on CPU with a stand-in for the graph."""
    pol = EosLeaning(tiny_vlm_policy64, shift=3.5)
    enc = pol.encode(_vlm_prompts())
    cfg = SamplingConfig(max_new_tokens=14, seed=9, compact_below=0.9)
    want = generate_groups(pol, enc, 4, cfg)
    _fake_cuda(monkeypatch)
    _static_mode(monkeypatch, "graph")
    got = generate_groups(pol, enc, 4, cfg)
    assert got.stats["compactions"] >= 1
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert_close(got.logprobs, want.logprobs, "graph runner vs eager",
                 atol=fp32_logprob_tol(want.logprobs))



def test_vlm_plain_cache_fallback_is_not_compacted(tiny_vlm_policy64, monkeypatch):
    """Where the shared-prefix decode is not taken, the policy cannot compact: the rollout goes on
    with full batches and draws the same tokens."""
    from grpo_models import prefix_decode

    pol = EosLeaning(tiny_vlm_policy64, shift=3.5)
    enc = pol.encode(_vlm_prompts())
    cfg = SamplingConfig(max_new_tokens=10, seed=3, compact_below=1.0)
    shared = generate_groups(pol, enc, 4, cfg)
    monkeypatch.setattr(prefix_decode, "supported", lambda lm: False)
    plain = generate_groups(pol, enc, 4, cfg)
    assert shared.stats["compactions"] >= 1 and plain.stats["compactions"] == 0
    assert torch.equal(shared.completion_ids, plain.completion_ids)


def test_fixed_shape_state_is_freed_without_gc(tiny_vlm_policy64, monkeypatch):
    """No state ↔ runner reference cycle: on a GPU a chunk's K/V buffers and graph would else
    live until the next garbage collection."""
    import gc
    import weakref

    _static_mode(monkeypatch)
    pol = tiny_vlm_policy64
    with torch.no_grad():
        _, state = pol.prefill(pol.encode(_vlm_prompts()[:1]))
        state = pol.plan_decode(pol.expand(state, 2), 4, "off", "off")
    assert state.runner is not None
    gone = weakref.ref(state)
    gc.disable()
    try:
        del state
        assert gone() is None, "the decode state is kept alive by a reference cycle"
    finally:
        gc.enable()


@pytest.mark.slow
def test_compiled_step_traces_and_changes_no_token(tiny_vlm_policy64, monkeypatch):
    """rollout.compile=on: the fixed-shape step goes through torch.compile. Dynamo traces it with
    the ``aot_eager`` backend here (same graph capture, no C++ codegen: seconds instead of
    minutes on CPU); tokens equal the eager reference, with compaction re-tracing new shapes."""
    import torch._dynamo

    from grpo_models import step_runner

    monkeypatch.setattr(step_runner, "_compiled", lambda fn: torch.compile(fn, backend="aot_eager"))
    pol = EosLeaning(tiny_vlm_policy64, shift=3.5)
    enc = pol.encode(_vlm_prompts())
    cfg = dict(max_new_tokens=10, seed=9, compact_below=0.9)
    want = generate_groups(pol, enc, 4, SamplingConfig(**cfg))
    torch._dynamo.reset()
    got = generate_groups(pol, enc, 4, SamplingConfig(**cfg, compile="on"))
    torch._dynamo.reset()
    assert got.stats["compactions"] >= 1
    assert torch.equal(got.completion_ids, want.completion_ids)


@pytest.mark.parametrize("static", [False, True])
def test_vlm_lora_adapters_apply_in_every_decode_path(tiny_vlm_path, monkeypatch, static):
    """LoRA (non-zero adapters, fp64): recorded log-probs == the teacher-forced forward with the
    adapters on (and ≠ with them off), for the eager and the fixed-shape step, with compaction."""
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    if static:
        _static_mode(monkeypatch)
    lora = {"r": 4, "lora_alpha": 16, "init_lora_weights": False}
    base = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float64, device="cpu",
                                         lora=lora)
    pol = EosLeaning(base, shift=3.5)
    enc = pol.encode(_vlm_prompts())
    ro = generate_groups(pol, enc, 4, SamplingConfig(max_new_tokens=10, seed=2, compact_below=0.9))
    assert ro.stats["compactions"] >= 1
    want = recompute_logprobs(base, ro, 1.0, eos_shift=3.5)
    assert_close(ro.logprobs, want, "LoRA rollout vs teacher forcing", atol=fp32_logprob_tol(want))
    with base.disable_adapters():
        off = recompute_logprobs(base, ro, 1.0, eos_shift=3.5)
    assert (off - want).abs().max() > 1e-3, "adapters change nothing: the test cannot fail"
