"""Benchmark: GRPO loss from logits and from hidden states, forward / backward / full.

    python -m bench.bench_loss            # GPU defaults: 16 × 1024 = 16,384 tokens, V = 151,936,
                                          # H = 1,536 (Qwen2-VL-2B), bf16
    python -m bench.bench_loss --quick    # CPU: torch providers only, small shapes, < 30 s

Providers, "logits" op (input: logits (N, T, V) that require grad):
    torch-eager     reference token_logprobs + grpo_loss (the plain PyTorch path)
    torch-compile   torch.compile of the same function (GPU, or --compile on CPU)
    ours-torch      fused_grpo_loss(backend="torch") (chunked PyTorch)
    ours-triton     fused_grpo_loss(backend="triton") (GPU only: the interpreter is not timed)
    ours-cuda       fused_grpo_loss(backend="cuda") when grpo_core.kernels.cuda is built and usable
    liger           Liger-Kernel's triton_grpo_loss, when installed (its own loss variant, close to
                    ours with k3 / token_mean; expects (N, T + 1, V) logits)
"linear" op (input: hidden (N, T, H) and lm_head weight (V, H), both require grad):
    torch-eager     hidden @ Wᵀ (full logits) + reference loss
    ours-linear-torch / -triton / -cuda   fused_linear_grpo_loss (cuda: cuBLAS tiles + csrc/ softmax)

Bytes model for the logits op (memory-bound), per logit, e = bytes per element (2 for bf16):
    fwd e (read logits) · bwd 2e (read logits, write d logits) · full 3e (= 6 B/logit in bf16),
    plus ~24 B per token (labels, mask, old, ref, logp, lse). GB/s = bytes / median time and
    % HBM against the device's measured copy bandwidth when GRPO_CORE_MEASURED_BW is set
    (bench/device_check.py measures it first), else its datasheet peak (H100: 3.35 TB/s).
FLOPs model for the linear op (compute-bound): fwd 2·M·V·H, bwd 4·M·V·H, full 6·M·V·H (the
ideal without recompute; ours recomputes the logits in backward, 8·M·V·H actually executed).
"""

import argparse
import importlib

import torch

from bench.common import Result, device_name, fill_throughput, peak_memory, time_ms, write_results
from grpo_core.kernels import dispatch, fused_grpo_loss, fused_linear_grpo_loss
from grpo_core.logprobs import token_logprobs
from grpo_core.loss import grpo_loss

LOSS_KW = dict(clip_low=0.2, clip_high=0.28, beta=0.04, kl="k3", agg="token_mean")
TEMPERATURE = 1.0


def make_inputs(N, T, V, H, dtype, device, seed=0):
    """Random batch: ~90 % of positions valid (ragged completions); old/ref log-probs are random
    (their values do not change the work done)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(int(0.8 * T), T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)            # (N, T)
    labels = torch.randint(0, V, (N, T), generator=g).to(device)              # (N, T)
    logits = (torch.randn(N, T, V, generator=g) * 2).to(device, dtype)        # (N, T, V)
    hidden = torch.randn(N, T, H, generator=g).to(device, dtype)               # (N, T, H)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype)    # (V, H)
    old = (torch.randn(N, T, generator=g) - 9).to(device)                     # (N, T) fp32
    ref = (torch.randn(N, T, generator=g) - 9).to(device)
    adv = torch.randn(N, generator=g).to(device)
    return dict(logits=logits, hidden=hidden, weight=weight, labels=labels, mask=mask, old=old, ref=ref, adv=adv)


# ---------------------------------------------------------------- providers: (inputs) -> loss


def reference_loss(x, labels, old, ref, adv, mask):
    return grpo_loss(token_logprobs(x, labels, TEMPERATURE, mask), old, ref, adv, mask, **LOSS_KW)[0]


def logits_providers(device, compile_ok):
    def ours(backend):
        return lambda d, x: fused_grpo_loss(x, d["labels"], d["old"], d["ref"], d["adv"], d["mask"],
                                            temperature=TEMPERATURE, backend=backend, **LOSS_KW)[0]

    provs = {"torch-eager": lambda d, x: reference_loss(x, d["labels"], d["old"], d["ref"], d["adv"], d["mask"])}
    if compile_ok:
        compiled = torch.compile(reference_loss)
        provs["torch-compile"] = lambda d, x: compiled(x, d["labels"], d["old"], d["ref"], d["adv"], d["mask"])
    provs["ours-torch"] = ours("torch")
    if device.type == "cuda":
        for name in ("triton", "cuda"):
            if dispatch.why_unavailable(name, device) is None:
                provs[f"ours-{name}"] = ours(name)
        liger = _liger(device)
        if liger is not None:
            provs["liger"] = liger
    return provs


def _liger(device):
    """Liger-Kernel's logits GRPO loss (optional); it reads logits[:, :-1] of an (N, T+1, V) input."""
    try:
        mod = importlib.import_module("liger_kernel.transformers.grpo_loss")
    except ImportError:
        return None

    def run(d, x):
        x1 = torch.cat([x, x[:, -1:]], dim=1)                                   # (N, T + 1, V)
        out = mod.triton_grpo_loss(x1, d["old"], d["ref"], d["labels"].clamp(min=0), d["adv"],
                                   d["mask"].int(), temperature=TEMPERATURE, beta=LOSS_KW["beta"],
                                   eps_low=LOSS_KW["clip_low"], eps_high=LOSS_KW["clip_high"], inplace=False)
        per_tok = out[0] if isinstance(out, tuple) else out
        m = d["mask"].float()
        return (per_tok * m).sum() / m.sum()
    return run


def linear_providers(device):
    def naive(d, h, w):
        lp = token_logprobs(h @ w.t(), d["labels"], TEMPERATURE, d["mask"])    # full (N, T, V) logits
        return grpo_loss(lp, d["old"], d["ref"], d["adv"], d["mask"], **LOSS_KW)[0]

    def ours(backend):
        return lambda d, h, w: fused_linear_grpo_loss(h, w, d["labels"], d["old"], d["ref"], d["adv"], d["mask"],
                                                      temperature=TEMPERATURE, backend=backend, **LOSS_KW)[0]

    provs = {"torch-eager": naive, "ours-linear-torch": ours("torch")}
    if device.type == "cuda":
        for name in ("triton", "cuda"):
            if dispatch.why_unavailable(name, device) is None:
                provs[f"ours-linear-{name}"] = ours(name)
    return provs


# ---------------------------------------------------------------- measuring


def measure(op, provider, fn, leaves, shape, device, bytes_by_mode, flops_by_mode, quick=False):
    """fwd / bwd / full timings + peak memory of the full step for one provider."""
    def fwd():
        return fn()

    def clear():
        for t in leaves:
            t.grad = None

    def full():
        clear()
        fn().backward()

    rows = []
    try:
        loss = fn()
        loss.backward(retain_graph=True)                                            # warm-up + check
        modes = {"fwd": fwd, "bwd": lambda: (clear(), loss.backward(retain_graph=True)), "full": full}
        for mode, f in modes.items():
            r = Result(op, provider, mode, shape)
            r.ms, r.ms_q20, r.ms_q80 = time_ms(f, device, **(dict(warmup=1, rep=5, budget_s=0.5) if quick else {}))
            fill_throughput(r, bytes_by_mode.get(mode), device, flops_by_mode.get(mode))
            rows.append(r)
        loss = None                                                                 # free the graph
        mem, kind = peak_memory(full, device)
        rows[-1].mem_mb, rows[-1].mem_kind = mem / 2 ** 20, kind
    except Exception as exc:  # noqa: BLE001 - one broken provider must not sink the table
        rows.append(Result(op, provider, "full", shape, note=f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
    return rows


def _line(r):
    return f"{r.op:7s} {r.provider:20s} {r.mode:4s} {r.ms or float('nan'):9.2f} ms {r.note}"


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    N, T, V, H = args.seqs, args.tokens_per_seq, args.vocab, args.hidden
    d = make_inputs(N, T, V, H, dtype, device)
    e = d["logits"].element_size()
    shape = dict(N=N, T=T, V=V, H=H, dtype=args.dtype)
    per_tok = 24 * N * T
    logit_bytes = {"fwd": N * T * V * e + per_tok, "bwd": 2 * N * T * V * e + per_tok,
                   "full": 3 * N * T * V * e + per_tok}
    M = int(d["mask"].sum())
    lin_flops = {"fwd": 2 * M * V * H, "bwd": 4 * M * V * H, "full": 6 * M * V * H}
    results = []
    compile_ok = (device.type == "cuda" or args.compile) and not args.no_compile
    for name, prov in logits_providers(device, compile_ok).items():
        x = d["logits"].detach().clone().requires_grad_()
        results += measure("logits", name, lambda p=prov, x=x: p(d, x), [x], shape, device, logit_bytes, {}, args.quick)
        print(_line(results[-1]))
        del x
    for name, prov in linear_providers(device).items():
        h = d["hidden"].detach().clone().requires_grad_()
        w = d["weight"].detach().clone().requires_grad_()
        results += measure("linear", name, lambda p=prov, h=h, w=w: p(d, h, w), [h, w], shape,
                           device, {}, lin_flops, args.quick)
        print(_line(results[-1]))
    meta = dict(shape, tokens=N * T, valid_tokens=M, loss=LOSS_KW, temperature=TEMPERATURE,
                command="python -m bench.bench_loss" + (" --quick" if args.quick else ""))
    out = write_results("bench_loss" + ("_quick" if args.quick else ""), results, device, meta, args.out)
    print(f"results in {out} ({device_name(device)})")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU-sized shapes (< 30 s)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--compile", action="store_true", help="also time torch.compile on CPU")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (saves its compile time)")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--tokens-per-seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--out", default=None, help="results root (default bench/results); files go to <out>/<device>/")
    args = p.parse_args(argv)
    if args.quick:
        args.seqs, args.tokens_per_seq, args.vocab, args.hidden = 4, 32, 4096, 64
        if not torch.cuda.is_available() or args.cpu:
            args.dtype = "fp32"  # CPU bf16 kernels are slow and not what the CPU trainer runs
    return args


if __name__ == "__main__":
    run(parse_args())
