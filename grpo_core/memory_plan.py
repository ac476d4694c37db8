"""Memory planner: what one GPU (and its host process) holds during a GRPO step, before anything
loads.

    arch = Arch.from_config(json.load(open(f"{model.path}/config.json")))   # sizes only, no weights
    plan = plan_memory(arch, cfg, gpus=8)                                  # cfg: a TrainConfig
    print(memory_plan_table.render(plan, gpu_gib=80))

Inputs are numbers: the architecture's sizes (``Arch``, read from a checkpoint's config.json or a
named architecture the app layer supplies) and the config. The result is a list of ``Line``s
(GiB per GPU) grouped by phase, the peak over the phases, the host RAM, and ``advise``: the
cheapest change (gradient checkpointing, smaller micro-batches, frozen vision, offloaded optimizer
states, FSDP2, ...) after which the peak fits.

Precision (the design of issue #22): every trainable parameter is kept in fp32 (master weight,
4 B) with an fp32 gradient (4 B) and AdamW's two fp32 moments (8 B); compute runs in bf16
(``compute`` = 2 B), so a bf16 copy of each weight exists while it is used (autocast's cast
cache: the whole trainable model for one micro-batch's forward+backward; FSDP2's
``MixedPrecisionPolicy(param_dtype=bf16)``: the gathered units). Frozen parameters (the LoRA base,
a frozen vision tower) stay in the compute dtype; the reference keeps its matmul weights in the
compute dtype and its embedding (a tied lm_head) in the master dtype (precision.store_for_compute_,
so it computes exactly what the policy did). ``Precision(4, 4)`` plans an
fp32 CPU run (no copies), which is what ``bench/bench_memory_plan.py`` measures.

Phases (the peak is the largest):
  rollout   resident state + KV cache of one rollout chunk + prefill / decode temporaries
            (FSDP2: every unit gathered in the compute dtype for the whole rollout)
  backward  resident state + gradients + the activations one micro-batch saves + loss buffers
  optimizer resident state + gradients + AdamW moments + one fp32 temporary of its foreach step

Activations, per token and per decoder layer (counted from what autograd saves in
grpo_models.prefix_train's layer step and HF's Qwen2 RMSNorm; c = compute bytes, kv = kv_heads·d):
    2 RMSNorms   2 · (4H + 2cH)       fp32 upcast of the input, the normalised value, the output
    attention    c · (2H + 2kv)       rope'd q, k; v; sdpa output (= o_proj's input: no copy)
    MLP          c · 4I               gate, silu(gate), up, silu(gate)·up (= down_proj's input)
  + the completion rows' [prompt K/V ; own K/V] concatenations (c · 2kv per key, per layer)
  with gradient checkpointing: c·H per token per layer (each layer's input) + one layer's set.
Vision block, per patch (Qwen2-VL: LayerNorm, QuickGELU MLP of width M):
    c · (4D + 7D + 3M)                norms' inputs/outputs; qkv, rope'd q/k, sdpa out, proj input;
                                      fc1 out, sigmoid, product
  Qwen2.5-VL (RMSNorm, SwiGLU): 2 · (4D + 2cD) + c · (7D + 4M).
A frozen tower (LoRA, ``model.freeze_vision``) saves nothing: no gradient flows into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GiB = 1024**3
QWEN_DEFAULT_MAX_PIXELS = 12845056  # Qwen2-VL image processor's default max_pixels (16k tokens)
LOSS_TILE_BYTES = {
    "gpu": 2 * (1 << 29),
    "cpu": 3 * 4 * (1 << 22),
}  # fused loss: fp32 logit tiles alive
OPTIM_STATE_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32
HOST_RUNTIME_BYTES = {
    "gpu": 4 * GiB,
    "cpu": 0,
}  # python + torch + CUDA context per process (approx.)


@dataclass(frozen=True)
class Arch:
    """The sizes of a Qwen2-VL-style model (language model + vision tower); counts, not weights."""

    vocab: int
    hidden: int  # H
    intermediate: int  # I (LM MLP width)
    layers: int  # L
    heads: int
    kv_heads: int
    tied: bool  # lm_head shares the embedding matrix
    v_depth: int  # vision blocks
    v_dim: int  # D
    v_mlp: int  # M (vision MLP width)
    v_heads: int
    v_glu: bool = False  # Qwen2.5-VL: RMSNorm + SwiGLU vision blocks (no norm bias)
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    in_channels: int = 3
    name: str = ""

    @classmethod
    def from_config(cls, cfg: dict, name: str = "") -> "Arch":
        """From a Qwen2-VL / Qwen2.5-VL config.json dict (nested ``text_config`` or flat fields)."""
        t = cfg.get("text_config") or cfg
        v = cfg.get("vision_config")
        if not v:
            raise ValueError(
                f"memory plan: config {name or ''} has no vision_config; the planner "
                "knows Qwen2-VL / Qwen2.5-VL layouts"
            )
        glu = "intermediate_size" in v and "mlp_ratio" not in v
        dim = v.get("embed_dim") or v["hidden_size"]
        mlp = v["intermediate_size"] if glu else int(dim * v.get("mlp_ratio", 4))
        return cls(
            vocab=t["vocab_size"],
            hidden=t["hidden_size"],
            intermediate=t["intermediate_size"],
            layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"],
            kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            tied=bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            v_depth=v["depth"],
            v_dim=dim,
            v_mlp=mlp,
            v_heads=v["num_heads"],
            v_glu=glu,
            patch=v.get("patch_size", 14),
            merge=v.get("spatial_merge_size", 2),
            temporal=v.get("temporal_patch_size", 2),
            in_channels=v.get("in_channels", 3),
            name=name,
        )

    # ---- parameter counts (tests compare them with the transformers modules) ----
    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def lm_layer_params(self) -> int:
        """q/k/v (with bias), o (no bias), gate/up/down, two RMSNorm weights."""
        H, kv, i = self.hidden, self.kv_dim, self.intermediate
        return H * H + H + 2 * (H * kv + kv) + H * H + 3 * H * i + 2 * H

    def embed_params(self) -> int:
        """Embedding (+ an untied lm_head) + the final norm: FSDP2's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def vision_block_params(self) -> int:
        D, M = self.v_dim, self.v_mlp
        norms = 2 * D if self.v_glu else 4 * D  # RMSNorm weight | LayerNorm w + b
        mlp = 3 * D * M + 2 * M + D if self.v_glu else 2 * D * M + M + D
        return norms + 3 * D * D + 3 * D + D * D + D + mlp

    def vision_params(self) -> int:
        """Patch embedding (conv, no bias) + blocks + merger (norm, 4D→4D, 4D→H)."""
        D, m2 = self.v_dim, self.merge**2
        patch = self.in_channels * self.temporal * self.patch**2 * D
        merger = (
            (D if self.v_glu else 2 * D)
            + (m2 * D) ** 2
            + m2 * D
            + m2 * D * self.hidden
            + self.hidden
        )
        return patch + self.v_depth * self.vision_block_params() + merger

    def params(self) -> int:
        return self.embed_params() + self.layers * self.lm_layer_params() + self.vision_params()

    def lora_params(self, rank: int) -> int:
        """LoRA A (r × in) + B (out × r) on q, k, v, o, gate, up, down of every decoder layer."""
        H, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = (H + H) + 2 * (H + kv) + (H + H) + 2 * (H + i) + (i + H)
        return self.layers * rank * per_layer


@dataclass(frozen=True)
class Precision:
    compute: int = 2  # bytes of the dtype the matmuls run in (bf16)
    master: int = 4  # bytes of a trainable weight / its gradient (fp32)


@dataclass(frozen=True)
class Setup:
    """Everything the plan depends on, from the config and the command line."""

    gpus: int = 1
    mode: str = "none"  # dist.mode: none | ddp | fsdp2
    lora_rank: int = 0
    freeze_vision: bool = False
    checkpointing: bool = False
    offload_optimizer: bool = False
    reference: bool = True  # a frozen reference copy (β > 0 and no LoRA adapters-off)
    prompts: int = 8  # rollout.prompts_per_step (global)
    group: int = 8  # G
    new_tokens: int = 512  # C = rollout.max_new_tokens
    micro_prompts: int = 0  # grpo.micro_batch_prompts (0 = all of the rank's prompts)
    micro_tokens: int = 0  # grpo.micro_batch_tokens (0 = off)
    rollout_rows: int = 256  # rollout.max_batch_sequences
    prompt_text_tokens: int = 200  # question + options + template (not in the config)
    images: int = 1  # images per prompt
    image_pixels: int = 401408  # model.max_pixels (the worst case per image)
    device: str = "gpu"  # "gpu" | "cpu": which loss tiles / runtime overhead apply

    @property
    def shard(self) -> int:
        return self.gpus if self.mode == "fsdp2" else 1

    @property
    def local_prompts(self) -> int:
        return max(1, self.prompts // max(self.gpus, 1))


@dataclass
class Line:
    what: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    arch: Arch
    setup: Setup
    precision: Precision
    resident: list = field(default_factory=list)  # held for the whole run
    phases: dict = field(default_factory=dict)  # phase → [Line] on top of resident
    host: list = field(default_factory=list)

    def phase_total(self, name: str) -> float:
        return sum(x.bytes for x in self.resident) + sum(x.bytes for x in self.phases[name])

    @property
    def peak(self) -> float:
        return max(self.phase_total(p) for p in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def host_total(self) -> float:
        return sum(x.bytes for x in self.host)

    def fits(self, gpu_gib: float, headroom: float = 0.9) -> bool:
        """Peak ≤ 90 % of the card: allocator fragmentation and CUDA workspaces need the rest."""
        return self.peak <= headroom * gpu_gib * GiB


# ---- the plan ------------------------------------------------------------------------------
def image_patches(s: Setup, a: Arch) -> int:
    """Vision patches of one image at ``image_pixels`` (14×14 px each; 4 merge into a token)."""
    return max(a.merge**2, s.image_pixels // (a.patch**2))


def prompt_tokens(s: Setup, a: Arch) -> int:
    """LM tokens of one prompt: its text + each image's merged patches."""
    return s.prompt_text_tokens + s.images * image_patches(s, a) // (a.merge**2)


def trainable_params(a: Arch, s: Setup) -> int:
    if s.lora_rank:
        return a.lora_params(s.lora_rank)
    return a.params() - (a.vision_params() if s.freeze_vision else 0)


def micro_batch(a: Arch, s: Setup) -> tuple[int, int]:
    """(prompts, tokens) of the largest micro-batch: whole groups, by count or by token budget."""
    per_group = s.group * s.new_tokens + prompt_tokens(s, a)
    b = s.micro_prompts or s.local_prompts
    if s.micro_tokens:
        b = min(b, max(1, s.micro_tokens // per_group))
    b = min(b, s.local_prompts)
    return b, b * per_group


def lm_token_bytes(a: Arch, c: int) -> float:
    """Saved activations per token per decoder layer (module doc)."""
    H, kv, i = a.hidden, a.kv_dim, a.intermediate
    return 2 * (4 * H + 2 * c * H) + c * (2 * H + 2 * kv) + c * 4 * i


def vision_patch_bytes(a: Arch, c: int) -> float:
    """Saved activations per patch per vision block (module doc)."""
    D, M = a.v_dim, a.v_mlp
    if a.v_glu:
        return 2 * (4 * D + 2 * c * D) + c * (7 * D + 4 * M)
    return c * (11 * D + 3 * M)


def activations(a: Arch, s: Setup, c: int) -> list:
    """What one micro-batch's forward saves for its backward (LM, K/V copies, vision, output)."""
    b, _ = micro_batch(a, s)
    p, n, C = prompt_tokens(s, a), b * s.group, s.new_tokens
    tokens = b * p + n * C
    per_layer = lm_token_bytes(a, c)
    grouped = s.group * C <= p  # prefix_train.use_grouped
    kv_keys = b * (p + s.group * C) if grouped else n * (p + C)  # [prompt ; own] keys per layer
    kv = a.layers * kv_keys * 2 * a.kv_dim * c
    lm_on = tokens * a.layers * a.hidden * c + tokens * per_layer + kv / a.layers
    lm_off = tokens * a.layers * per_layer + kv
    alt = "without" if s.checkpointing else "with"
    other = f"; {gib(lm_off if s.checkpointing else lm_on)} GiB {alt} checkpointing"
    lm_note = (
        f"{tokens} tokens × {a.layers} layer inputs + one layer recomputed"
        if s.checkpointing
        else f"{tokens} tokens × {a.layers} layers × {per_layer / 1024:.0f} KiB"
    ) + other
    out = [Line("activations: language model", lm_on if s.checkpointing else lm_off, lm_note)]
    if not (s.lora_rank or s.freeze_vision):
        patches = b * s.images * image_patches(s, a)
        pb = vision_patch_bytes(a, c)
        v_on, v_off = patches * (a.v_depth * a.v_dim * c + pb), patches * a.v_depth * pb
        out.append(
            Line(
                "activations: vision tower",
                v_on if s.checkpointing else v_off,
                f"{patches} patches × {a.v_depth} blocks; "
                f"{gib(v_off if s.checkpointing else v_on)} GiB {alt} checkpointing",
            )
        )
    masks = c * (b * p * p + (b * s.group * C * (p + s.group * C) if grouped else n * C * (p + C)))
    out.append(
        Line(
            "attention masks + final hidden",
            masks + 3 * n * C * a.hidden * c,
            "prefix_train's additive masks; (N, C, H) normed output",
        )
    )
    return out


def weights(a: Arch, s: Setup, pr: Precision) -> list:
    """Resident weights per GPU: fp32 masters of the trainable part, the rest in compute dtype."""
    P, Pt = a.params(), trainable_params(a, s)
    frozen = P - (0 if s.lora_rank else Pt)
    k = s.shard
    out = [
        Line(
            "weights: trainable (master)",
            Pt * pr.master / k,
            f"{Pt / 1e6:,.0f} M params × {pr.master} B" + (f" / {k} shards" if k > 1 else ""),
        )
    ]
    if frozen:
        out.append(
            Line(
                "weights: frozen",
                frozen * pr.compute / k,
                f"{frozen / 1e6:,.0f} M params × {pr.compute} B"
                + (" (LoRA base)" if s.lora_rank else " (vision tower)"),
            )
        )
    if s.reference:
        out.append(
            Line(
                "reference (frozen copy)",
                (P * pr.compute + a.vocab * a.hidden * (pr.master - pr.compute)) / k,
                "β > 0, no LoRA: matmul weights in compute dtype, embedding as the master",
            )
        )
    return out


def compute_copies(a: Arch, s: Setup, pr: Precision) -> list:
    """Transient compute-dtype weights during forward/backward (none when compute = master)."""
    if pr.compute == pr.master:
        return []
    Pt = trainable_params(a, s)
    if s.mode == "fsdp2":
        unit = max(a.lm_layer_params(), a.vision_block_params())
        full = a.embed_params() + 3 * unit  # root + current, prefetched, grads
        return [
            Line(
                "weights: gathered units (bf16)",
                full * pr.compute,
                "root unit + 2 units + 1 unit's grads",
            )
        ]
    head = 0 if s.lora_rank else a.vocab * a.hidden * pr.compute  # lm_head.to(h.dtype) in the loss
    return [
        Line(
            "weights: compute copies",
            Pt * pr.compute + head,
            "autocast's bf16 cast of every trainable weight + the loss's lm_head cast",
        )
    ]


def gradients(a: Arch, s: Setup, pr: Precision) -> Line:
    Pt = trainable_params(a, s)
    return Line(
        "gradients",
        Pt * pr.master / s.shard,
        f"fp32, {Pt / 1e6:,.0f} M" + (f" / {s.shard}" if s.shard > 1 else ""),
    )


def optimizer(a: Arch, s: Setup) -> list:
    Pt = trainable_params(a, s) / s.shard
    if s.offload_optimizer:
        return [
            Line(
                "optimizer states",
                0.0,
                f"offloaded: {Pt * OPTIM_STATE_BYTES / GiB:.1f} GiB in host RAM",
            )
        ]
    if s.device == "cpu":  # torch's AdamW runs per tensor on CPU: sqrt(v) and its quotient
        big = a.lora_params(s.lora_rank) / a.layers / 7 if s.lora_rank else a.vocab * a.hidden
        temp = Line(
            "optimizer step temporary",
            2 * big * 4,
            "per-tensor AdamW: 2 fp32 copies of the largest",
        )
    else:  # foreach AdamW (CUDA): one fp32 tensor list as large as all parameters
        temp = Line(
            "optimizer step temporary", Pt * 4, "foreach AdamW: one fp32 tensor per parameter"
        )
    return [Line("optimizer states", Pt * OPTIM_STATE_BYTES, "AdamW m, v in fp32"), temp]


def loss_buffers(a: Arch, s: Setup, pr: Precision) -> Line:
    """Fused linear loss: its fp32 logit tiles, plus the lm_head's fp32 dW accumulator (V, H), which
    every backend allocates and fills even when the lm_head is frozen (LoRA: then it is dropped)."""
    return Line(
        "loss: logit tiles + lm_head dW",
        LOSS_TILE_BYTES[s.device] + a.vocab * a.hidden * 4,
        "the (M, V) logits never exist whole; dW even if frozen",
    )


def rollout(a: Arch, s: Setup, pr: Precision) -> list:
    """One rollout chunk: shared-prefix KV cache (prompts once, G rows each) + temporaries."""
    c, p = pr.compute, prompt_tokens(s, a)
    b = min(s.local_prompts, max(1, s.rollout_rows // s.group))
    n, cap = b * s.group, s.new_tokens + max(64, s.new_tokens // 4)
    kv = a.layers * 2 * a.kv_dim * c * (b * p + n * cap)
    out = [Line("KV cache", kv, f"{b} prompts × {p} + {n} rows × {cap} slots, {a.layers} layers")]
    prefill = b * p * (4 * a.hidden + 3 * a.intermediate) * c  # one layer's working set
    vis = b * s.images * image_patches(s, a) * (4 * a.v_dim + 2 * a.v_mlp) * c
    out.append(
        Line(
            "prefill / decode temporaries",
            max(prefill, vis) + 3 * n * a.vocab * 4,
            "one layer's working set; fp32 logits of a decode step",
        )
    )
    if s.mode == "fsdp2":
        out.append(
            Line("weights: all units gathered", a.params() * c, "FSDP2 gathered() for the rollout")
        )
    elif pr.compute != pr.master and not s.lora_rank:
        out.append(
            Line("weights: compute copies", a.lm_layer_params() * c, "one layer's cast at a time")
        )
    return out


def host(a: Arch, s: Setup, pr: Precision) -> list:
    Pt = trainable_params(a, s) / s.shard
    out = [Line("runtime (python, torch, CUDA context)", HOST_RUNTIME_BYTES[s.device])]
    if s.offload_optimizer:
        out += [
            Line("optimizer states (offloaded)", Pt * OPTIM_STATE_BYTES, "fp32 m, v"),
            Line("gradients + master copy for the CPU step", Pt * 2 * 4, "fp32"),
        ]
    P, full = a.params(), trainable_params(a, s)
    frozen = P - (0 if s.lora_rank else full)
    out.append(
        Line(
            "checkpoint save (rank 0)",
            full * (pr.master + OPTIM_STATE_BYTES) + frozen * pr.compute,
            "full model + optimizer state dicts gathered to the host",
        )
    )
    return out


def plan(a: Arch, s: Setup, pr: Precision = Precision()) -> Plan:
    res = weights(a, s, pr)
    if s.offload_optimizer:
        res += optimizer(a, s)[:1]
    else:
        res.append(optimizer(a, s)[0])
    grads = gradients(a, s, pr)
    backward = [
        grads,
        *compute_copies(a, s, pr),
        *activations(a, s, pr.compute),
        loss_buffers(a, s, pr),
    ]
    step = [grads] + ([] if s.offload_optimizer else optimizer(a, s)[1:])
    return Plan(
        a,
        s,
        pr,
        res,
        {"rollout": rollout(a, s, pr), "backward": backward, "optimizer": step},
        host(a, s, pr),
    )


def setup_from_config(
    cfg,
    gpus: int | None = None,
    prompt_text_tokens: int = 200,
    images: int = 1,
    device: str = "gpu",
    checkpoint_max_pixels: int | None = None,
) -> Setup:
    """A Setup from a TrainConfig (``gpus`` defaults to 1; dist.mode none with gpus > 1 = ddp).

    Pixels per image: model.max_pixels, else the checkpoint's image processor bound
    (``checkpoint_max_pixels``), else Qwen's default; synthetic images are image_size² at most.
    """
    m, r, g = cfg.model, cfg.rollout, cfg.grpo
    pixels = m.max_pixels or checkpoint_max_pixels or QWEN_DEFAULT_MAX_PIXELS
    if cfg.data.source == "synthetic":
        pixels = min(pixels, cfg.data.image_size**2)
    n = gpus or 1
    mode = cfg.dist.mode if cfg.dist.mode != "none" or n == 1 else "ddp"
    ref_copy = g.beta > 0 and (g.ref == "copy" or (g.ref == "auto" and m.lora_rank == 0))
    return Setup(
        gpus=n,
        mode=mode,
        lora_rank=m.lora_rank,
        freeze_vision=m.freeze_vision,
        checkpointing=m.gradient_checkpointing,
        offload_optimizer=bool(getattr(cfg.optim, "offload_states", False)),
        reference=ref_copy,
        prompts=r.prompts_per_step,
        group=r.group_size,
        new_tokens=r.max_new_tokens,
        micro_prompts=g.micro_batch_prompts,
        micro_tokens=int(getattr(g, "micro_batch_tokens", 0) or 0),
        rollout_rows=r.max_batch_sequences,
        prompt_text_tokens=prompt_text_tokens,
        images=images,
        image_pixels=pixels,
        device=device,
    )


# ---- what to change when it does not fit --------------------------------------------------
def _halve_micro(a, s):
    b, _ = micro_batch(a, s)
    return replace(s, micro_prompts=max(1, b // 2), micro_tokens=0) if b > 1 else None


CHANGES = (  # cheapest first: (config key = value as a user writes it, how to apply, what it costs)
    (
        "model.gradient_checkpointing=true",
        lambda a, s: None if s.checkpointing else replace(s, checkpointing=True),
        "≈ +30 % update time",
    ),
    ("grpo.micro_batch_prompts=", _halve_micro, "more, smaller forward/backward passes"),
    (
        "optim.offload_states=true",
        lambda a, s: None if s.offload_optimizer else replace(s, offload_optimizer=True),
        "AdamW steps on the CPU (slower step, host RAM)",
    ),
    (
        "dist.mode=fsdp2",
        lambda a, s: None if s.mode == "fsdp2" or s.gpus == 1 else replace(s, mode="fsdp2"),
        "shards weights, grads, states over the GPUs",
    ),
    (
        "rollout.max_batch_sequences=",
        lambda a, s: (
            replace(s, rollout_rows=max(s.group, s.rollout_rows // 2))
            if s.rollout_rows > s.group
            else None
        ),
        "rollout in more chunks",
    ),
    (
        "model.freeze_vision=true",
        lambda a, s: None if s.freeze_vision or s.lora_rank else replace(s, freeze_vision=True),
        "the vision tower is not trained",
    ),
    (
        "model.lora_rank=64",
        lambda a, s: None if s.lora_rank else replace(s, lora_rank=64, reference=False),
        "LoRA instead of full fine-tuning (another method)",
    ),
    (
        "model.max_pixels=",
        lambda a, s: (
            replace(s, image_pixels=s.image_pixels // 2) if s.image_pixels > 200704 else None
        ),
        "smaller images (less detail)",
    ),
)


def advise(a: Arch, s: Setup, pr: Precision, gpu_gib: float) -> list[str] | None:
    """The cheapest changes after which the plan fits: [] if it fits already, None if nothing
    listed does. Greedy in CHANGES order (each taken if it lowers the peak), then every change
    the fit does not need is dropped again (last taken first)."""
    taken: list[tuple[str, Setup]] = []  # (label, setup after this change)
    cur = s
    for _ in range(64):
        if plan(a, cur, pr).fits(gpu_gib):
            break
        for key, apply, cost in CHANGES:
            t = apply(a, cur)
            if t is not None and plan(a, t, pr).peak < plan(a, cur, pr).peak:
                taken.append((key, cost))
                cur = t
                break
        else:
            return None
    else:
        return None
    keys = [k for k, _ in taken]
    for drop in reversed(sorted(set(keys), key=keys.index)):
        rest = [k for k in keys if k != drop]
        if rest != keys and plan(a, _apply_all(a, s, rest), pr).fits(gpu_gib):
            keys = rest
    final = _apply_all(a, s, keys)
    values = {
        "grpo.micro_batch_prompts=": final.micro_prompts,
        "rollout.max_batch_sequences=": final.rollout_rows,
        "model.max_pixels=": final.image_pixels,
    }
    costs = dict(taken)
    return [f"{k}{values.get(k, '')} ({costs[k]})" for k in sorted(set(keys), key=keys.index)]


def _apply_all(a: Arch, s: Setup, keys: list[str]) -> Setup:
    """Apply the listed CHANGES in order (a key listed k times is applied k times)."""
    table = {k: f for k, f, _ in CHANGES}
    for k in keys:
        s = table[k](a, s) or s
    return s


def gib(x: float) -> str:
    return (
        f"{x / GiB:.1f}"
        if x >= 0.05 * GiB or x == 0
        else f"{x / GiB:.2f}"
        if x >= 0.005 * GiB
        else "<0.01"
    )


__all__ = [
    "Arch",
    "Precision",
    "Setup",
    "Plan",
    "Line",
    "plan",
    "setup_from_config",
    "advise",
    "GiB",
    "gib",
    "image_patches",
    "prompt_tokens",
    "micro_batch",
    "trainable_params",
]
