"""Published architecture shapes of the Qwen VL checkpoints the project trains (no download).

Each entry is the part of the checkpoint's ``config.json`` that sizes the model, written in the
same layout (``text_config`` / ``vision_config``), so the same reader serves a real checkpoint's
config.json and a name here (``grpo_core.memory_plan.Arch.from_config``). Values are those of the
Hugging Face model cards' config.json files:

    qwen2-vl-2b     Qwen/Qwen2-VL-2B(-Instruct)        LM 1536 × 28, vision 1280 × 32 (GELU MLP)
    qwen2-vl-7b     Qwen/Qwen2-VL-7B(-Instruct)        LM 3584 × 28, vision 1280 × 32 (GELU MLP)
    qwen2.5-vl-3b   Qwen/Qwen2.5-VL-3B-Instruct        LM 2048 × 36, vision 1280 × 32 (SwiGLU MLP)
    qwen2.5-vl-7b   Qwen/Qwen2.5-VL-7B-Instruct        LM 3584 × 28, vision 1280 × 32 (SwiGLU MLP)

``tests/test_memory_plan.py`` instantiates each on the meta device with transformers and checks
that the planner's parameter count equals the module's, so a typo here cannot go unnoticed.
"""

from __future__ import annotations

_QWEN2_VL_VISION = dict(
    depth=32,
    embed_dim=1280,
    num_heads=16,
    mlp_ratio=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
)
_QWEN2_5_VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)

ARCHITECTURES = {
    "qwen2-vl-2b": dict(
        model_type="qwen2_vl",
        tie_word_embeddings=True,
        text_config=dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
        ),
        vision_config=dict(_QWEN2_VL_VISION, hidden_size=1536),
    ),
    "qwen2-vl-7b": dict(
        model_type="qwen2_vl",
        tie_word_embeddings=False,
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        vision_config=dict(_QWEN2_VL_VISION, hidden_size=3584),
    ),
    "qwen2.5-vl-3b": dict(
        model_type="qwen2_5_vl",
        tie_word_embeddings=True,
        text_config=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        vision_config=dict(_QWEN2_5_VL_VISION, out_hidden_size=2048),
    ),
    "qwen2.5-vl-7b": dict(
        model_type="qwen2_5_vl",
        tie_word_embeddings=False,
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        vision_config=dict(_QWEN2_5_VL_VISION, out_hidden_size=3584),
    ),
}


def architecture(name: str) -> dict:
    """The config.json-shaped dict of a named architecture; the error lists the known names."""
    try:
        return ARCHITECTURES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)} "
            "(or point --config's model.path at a checkpoint with a config.json)"
        ) from None


def hf_config(
    name_or_dict, tokenizer=None, layers: int | None = None, vision_depth: int | None = None
):
    """A transformers config of that architecture (random-weight models for tests and benches).

    ``layers`` / ``vision_depth`` cut the depth (the widths, heads and vocabulary stay the published
    ones); ``tokenizer`` (e.g. the tiny offline one) supplies the special-token ids, so a model
    from this config runs the project's real code path with the tiny tokenizer.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    d = architecture(name_or_dict) if isinstance(name_or_dict, str) else name_or_dict
    text, vision = dict(d["text_config"]), dict(d["vision_config"])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2  # mRoPE sections (t, h, w) of the rotary half-dim
    text.update(
        num_hidden_layers=layers or text["num_hidden_layers"],
        max_position_embeddings=32768,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8],
        },
        tie_word_embeddings=d["tie_word_embeddings"],
        rms_norm_eps=1e-6,
    )
    vision.update(depth=vision_depth or vision["depth"])
    if d["model_type"] == "qwen2_5_vl":
        vision["fullatt_block_indexes"] = [
            i for i in vision["fullatt_block_indexes"] if i < vision["depth"]
        ] or [vision["depth"] - 1]
    ids = {}
    if tokenizer is not None:
        tok = {
            t: tokenizer.convert_tokens_to_ids(t)
            for t in (
                "<|endoftext|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|image_pad|>",
                "<|video_pad|>",
            )
        }
        text.update(
            bos_token_id=tok["<|endoftext|>"],
            eos_token_id=tok["<|im_end|>"],
            pad_token_id=tok["<|endoftext|>"],
        )
        ids = dict(
            image_token_id=tok["<|image_pad|>"],
            video_token_id=tok["<|video_pad|>"],
            vision_start_token_id=tok["<|vision_start|>"],
            vision_end_token_id=tok["<|vision_end|>"],
        )
    cls = Qwen2_5_VLConfig if d["model_type"] == "qwen2_5_vl" else Qwen2VLConfig
    return cls(
        text_config=text, vision_config=vision, tie_word_embeddings=d["tie_word_embeddings"], **ids
    )
