"""Text rendering of a memory plan (a grpo_core.memory_plan.Plan): ``render(plan, gpu_gib)``."""

from __future__ import annotations

from .memory_plan import advise, gib, micro_batch, prompt_tokens


def render(plan, gpu_gib: float | None = None) -> str:
    """Resident lines, each phase's extra lines and total, the peak, host RAM, fit and advice."""

    a, s, pr = plan.arch, plan.setup, plan.precision
    b, tokens = micro_batch(a, s)
    head = (
        f"memory plan (per GPU, predicted): {a.name or 'model'} {a.params() / 1e9:.2f} B params; "
        f"{s.gpus} GPU(s), dist {s.mode}, {'LoRA r=' + str(s.lora_rank) if s.lora_rank else 'full'}"
        f"{', vision frozen' if s.freeze_vision and not s.lora_rank else ''}, "
        f"checkpointing {'on' if s.checkpointing else 'off'}, "
        f"optimizer {'offloaded' if s.offload_optimizer else 'on GPU'}\n"
        f"  step: {s.local_prompts} prompts × G={s.group} per GPU, "
        f"{prompt_tokens(s, a)} prompt tokens "
        f"({s.image_pixels} px/image), {s.new_tokens} new tokens; micro-batch {b} prompts = "
        f"{tokens} tokens; compute {pr.compute} B, master {pr.master} B"
    )
    rows = [head, f"  {'':<44}{'GiB':>8}  note", "  resident"]
    rows += [f"    {x.what:<42}{gib(x.bytes):>8}  {x.note}" for x in plan.resident]
    for name, lines in plan.phases.items():
        rows.append(f"  + {name}")
        rows += [f"    {x.what:<42}{gib(x.bytes):>8}  {x.note}" for x in lines]
        rows.append(f"    {'= ' + name + ' total':<42}{gib(plan.phase_total(name)):>8}")
    rows.append(f"  PEAK {'(' + plan.peak_phase + ')':<39}{gib(plan.peak):>8}")
    rows.append(
        f"  host RAM per process {'':<22}{gib(plan.host_total):>8}  "
        + "; ".join(f"{x.what} {gib(x.bytes)}" for x in plan.host)
    )
    if gpu_gib:
        if plan.fits(gpu_gib):
            rows.append(f"  fits {gpu_gib:g} GiB (peak ≤ 90 %)")
        else:
            fix = advise(a, s, pr, gpu_gib)
            rows.append(
                f"  DOES NOT FIT {gpu_gib:g} GiB; "
                + (
                    "cheapest change: " + ", ".join(fix)
                    if fix
                    else "no listed change makes it fit: more GPUs with dist.mode=fsdp2, "
                    "or a larger GPU"
                )
            )
    return "\n".join(rows)
