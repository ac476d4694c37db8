"""Tiny offline models: a local tokenizer, a random-weight Qwen2-VL and a text-only Qwen2.

Everything here is built from code (no hub download), deterministic by seed, and saved with
``save_pretrained`` so the real loading path (``from_pretrained``) is what tests exercise.

- ``build_tiny_tokenizer(path)``: byte-level BPE (~1.2k tokens) trained on an in-code corpus of
  medical-VQA-like sentences, with Qwen2-VL's special tokens, a Qwen-style chat template, the
  reasoning tags ``<think> </think> <answer> </answer>`` as single (non-special) added tokens, and
  the option letters ``A``–``D`` / ``" A"``–``" D"`` as single tokens.
- ``build_tiny_qwen2_vl(path, ...)``: ``Qwen2VLForConditionalGeneration`` with a small vision
  tower (patch 14, merge 2: a 56×56 image is 4×4 patches → 2×2 = 4 image tokens) + tokenizer +
  ``Qwen2VLImageProcessorPil`` config.
- ``build_tiny_qwen2_5_vl(path, ...)``: the same at Qwen2.5-VL (windowed vision attention).
- ``build_tiny_qwen2(path, ...)``: text-only ``Qwen2ForCausalLM`` with the same tokenizer (a tiny
  LLM judge in reward tests, and a text policy).
- ``qwen2_vl_2b_config()``: the real Qwen2-VL-2B shapes (for GPU benches with random weights).

Deviation from the real checkpoints: the vocabulary is tiny (V ≈ 1.2k instead of 151,936) and the
special-token ids differ; code must read ids from the tokenizer/config, never hard-code them.
"""

from __future__ import annotations

import itertools
import os

import torch
from grpo_models.policy_utils import CHAT_TEMPLATE

SPECIAL_TOKENS = [  # Qwen2-VL's own special tokens, in Qwen's order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # plain text in Qwen; single tokens here

def _corpus() -> list[str]:
    """Medical-VQA-like sentences, answers and reasoning, generated from small word lists."""
    modalities = ["CT", "MRI", "X-ray", "ultrasound", "PET", "microscopy", "fundus photograph", "dermoscopy"]
    organs = ["brain", "lung", "liver", "kidney", "heart", "spine", "chest", "abdomen", "breast", "bone"]
    findings = ["a lesion", "a mass", "a nodule", "an effusion", "a fracture", "edema", "a tumor",
                "calcification", "hemorrhage", "no abnormality", "an infarct", "a cyst"]
    quadrants = ["upper left", "upper right", "lower left", "lower right"]
    lines = []
    for mod, organ, finding in itertools.product(modalities, organs, findings):
        lines.append(f"What abnormality is seen in this {mod} image of the {organ}? The image shows {finding}.")
        lines.append(f"Question: Which modality is used? Options: A. {mod} B. MRI C. CT D. X-ray")
    for i, (q, letter) in enumerate(itertools.product(quadrants, "ABCD")):
        lines.append("Where is the lesion located? A. upper left B. upper right C. lower left D. lower right")
        lines.append(f"<think>The lesion appears in the {q} quadrant of the scan.</think><answer>{letter}</answer>")
        lines.append(f"The answer is {letter}. The correct option is {letter}. Answer: {letter}")
        lines.append(f"Yes, the reasoning is clinically sound. No, it is not. Score: {i % 2}")
        lines.append("Is the reasoning clinically sound? Yes. Is the answer wrong? No. Judge: Yes No")
    terms = ("pneumonia pneumothorax atelectasis cardiomegaly consolidation opacity infiltrate emphysema "
             "glioma meningioma aneurysm stenosis thrombosis embolism carcinoma adenoma metastasis lymphoma "
             "hepatomegaly splenomegaly cirrhosis steatosis hydronephrosis nephrolithiasis appendicitis "
             "diverticulitis cholecystitis pancreatitis osteoporosis osteomyelitis arthritis scoliosis "
             "melanoma nevus keratosis psoriasis eczema retinopathy glaucoma cataract macular degeneration "
             "histopathology biopsy staining nucleus cytoplasm mitosis necrosis inflammation fibrosis "
             "axial coronal sagittal contrast enhanced weighted hyperintense hypointense hyperdense hypodense "
             "anterior posterior medial lateral superior inferior proximal distal bilateral unilateral "
             "diagnosis treatment patient clinical finding likely most least which following shown "
             "ventricle atrium aorta artery vein trachea bronchus diaphragm pleura pericardium colon "
             "stomach bladder prostate uterus ovary thyroid pancreas spleen gallbladder femur tibia skull").split()
    for a, b in zip(terms, terms[7:] + terms[:7]):
        lines.append(f"The scan shows {a} with {b}; the most likely diagnosis is {a}.")
        lines.append(f"Which of the following is seen? A. {a} B. {b} C. normal D. artifact")
    lines += [
        "Answer with the option's letter from the given choices directly.",
        "Think step by step inside <think> tags and give the final letter inside <answer> tags.",
        "You are a helpful assistant. You are a medical expert judging a radiology answer.",
        "The patient presents with chest pain, fever, cough and shortness of breath since 3 days.",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 . , ; : ? ! ( ) [ ] { } - + = / * % # @ & ' \" \n\n",
    ]
    return lines


def build_tiny_tokenizer(path: str, vocab_size: int = 1200):
    """Train a byte-level BPE on the in-code corpus, save it as a HF tokenizer at ``path``.

    Returns the loaded tokenizer (``AutoTokenizer.from_pretrained(path)``). Deterministic.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    # Option letters must be single tokens: add any that BPE did not learn as plain added tokens.
    missing = [t for t in ["A", "B", "C", "D", " A", " B", " C", " D"]
               if tok.token_to_id(tok.pre_tokenizer.pre_tokenize_str(t)[0][0]) is None]
    if missing:
        tok.add_tokens([AddedToken(t, normalized=False) for t in missing])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _image_processor(min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )


def tiny_qwen2_vl_config(tokenizer, hidden=64, layers=2, heads=4, kv_heads=2, vision_depth=2, vision_dim=32,
                         vision_heads=2, tie_word_embeddings=True):
    """Qwen2-VL config at toy scale; token ids come from ``tokenizer``. head_dim = hidden / heads."""
    from transformers import Qwen2VLConfig

    head_dim = hidden // heads
    half = head_dim // 2  # mRoPE splits the rotary half-dim into (temporal, height, width) sections
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer) + (-len(tokenizer)) % 64  # padded rows, like the real lm_head (151,936)
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    vision = dict(
        depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=vision_heads, mlp_ratio=2,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
    )
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_qwen2_vl(path: str, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                        kv_heads: int = 2, vision_depth: int = 2, vision_dim: int = 32, vision_heads: int = 2,
                        tie_word_embeddings: bool = True, min_pixels: int = 56 * 56,
                        max_pixels: int = 224 * 224) -> str:
    """Random-weight Qwen2-VL + tokenizer + image processor config saved at ``path``; returns path.

    Default: text hidden 64 × 2 layers, vision 32-wide × 2 blocks; max_pixels 224² (≤ 64 image
    tokens) keeps CPU tests fast. Same seed → same weights.
    """
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer(path)
    config = tiny_qwen2_vl_config(tokenizer, hidden, layers, heads, kv_heads, vision_depth, vision_dim,
                                  vision_heads, tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    _image_processor(min_pixels, max_pixels).save_pretrained(path)
    return path


def build_tiny_qwen2_5_vl(path: str, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                          kv_heads: int = 2, vision_depth: int = 2, vision_dim: int = 32, vision_heads: int = 2,
                          min_pixels: int = 56 * 56, max_pixels: int = 224 * 224) -> str:
    """Random-weight Qwen2.5-VL (windowed vision attention, SwiGLU vision MLP) saved at ``path``.

    Same tokenizer and image processor as ``build_tiny_qwen2_vl``; the last vision block uses full
    attention, the others 56-pixel windows (real model: 112-pixel windows, full at 7/15/23/31).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer(path)
    base = tiny_qwen2_vl_config(tokenizer, hidden, layers, heads, kv_heads, vision_depth, vision_dim, vision_heads)
    text = {k: getattr(base.text_config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rope_parameters", "bos_token_id", "eos_token_id",
        "pad_token_id", "tie_word_embeddings")}
    vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_heads=vision_heads,
                  out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[vision_depth - 1], patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=base.image_token_id, video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id, vision_end_token_id=base.vision_end_token_id,
        tie_word_embeddings=base.tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    _image_processor(min_pixels, max_pixels).save_pretrained(path)
    return path


def build_tiny_qwen2(path: str, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, tie_word_embeddings: bool = True) -> str:
    """Random-weight text-only ``Qwen2ForCausalLM`` + the tiny tokenizer saved at ``path``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer(path)
    vocab = len(tokenizer) + (-len(tokenizer)) % 64
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path


def qwen2_vl_2b_config():
    """The Qwen2-VL-2B architecture (values from its published config.json); never downloads.

    Use with random weights for GPU benchmarks: ``Qwen2VLForConditionalGeneration(qwen2_vl_2b_config())``.
    """
    from transformers import Qwen2VLConfig

    text = dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True, use_sliding_window=False,
    )
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True,
    )
