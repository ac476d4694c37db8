"""Prompt → tensors for Qwen2-VL without ``Qwen2VLProcessor`` (it needs torchvision).

Pipeline for B prompts:
    images ─load_image─► RGB PIL ─Qwen2VLImageProcessorPil─► pixel_values (Σ patches, 3·2·14·14),
                                                             image_grid_thw (num_images, 3)
    text ─template (chat | plain)─► tokenize ─► each ``<|image_pad|>`` expanded to
          grid_t·grid_h·grid_w / merge² copies ─► left-pad ─► input_ids (B, P), attention_mask (B, P)

Choices:
- The template is rendered with one placeholder per image, then the placeholder *ids* are
  expanded, so user text can never be split inside an image run. The expanded length is checked
  against ``max_prompt_len``; prompts are never truncated (a cut image run breaks the model).
- Images: transparency is composited on white (as transformers' ``convert_to_rgb``), 16-bit and
  float greyscale (common in medical PNG/DICOM exports) are min–max scaled to 8 bits, palettes
  and greyscale become RGB. Tiny images are upscaled and huge ones downscaled by the processor's
  ``smart_resize`` (min_pixels / max_pixels); very large inputs are first reduced by an integer
  factor so the bicubic resize does not crawl.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class Qwen2VLEncoded:
    """B encoded prompts. Image tensors are in per-image order, prompt after prompt."""

    input_ids: torch.Tensor             # (B, P) int64, left-padded with pad_token_id
    attention_mask: torch.Tensor        # (B, P) int64, 0 on left padding
    position_ids: torch.Tensor          # (K, B, P) int64 rope positions: K=3 (mRoPE t,h,w) or K=1 (text)
    rope_deltas: torch.Tensor           # (B, 1) int64: next text position − real prompt length
    num_images: torch.Tensor            # (B,) int64 images per prompt
    prompt_index: torch.Tensor          # (B,) int64 row in the list given to encode (select: picks)
    pixel_values: torch.Tensor | None = None     # (Σ patches, C·t·p·p) fp32, or None without images
    image_grid_thw: torch.Tensor | None = None   # (num_images, 3) int64 (t, h, w) in patches

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """(B,) real (unpadded) prompt lengths."""
        return self.attention_mask.sum(-1)

    def to(self, device) -> "Qwen2VLEncoded":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Qwen2VLEncoded(**{k: (v.to(device) if v is not None else None) for k, v in moved.items()})

    def select(self, prompt_idx: Sequence[int] | torch.Tensor) -> "Qwen2VLEncoded":
        """Rows ``prompt_idx`` (repeats allowed), with each prompt's images and patches kept with it."""
        idx = torch.as_tensor(prompt_idx, dtype=torch.long, device=self.input_ids.device)
        out = replace(
            self, input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx],
            position_ids=self.position_ids[:, idx], rope_deltas=self.rope_deltas[idx],
            num_images=self.num_images[idx], prompt_index=self.prompt_index[idx],
        )
        if self.image_grid_thw is None:
            return out
        n_img = self.num_images.tolist()
        first_img = np.concatenate([[0], np.cumsum(n_img)])             # (B+1,) image offsets per prompt
        n_patch = self.image_grid_thw.prod(-1).tolist()
        first_patch = np.concatenate([[0], np.cumsum(n_patch)])         # (I+1,) patch offsets per image
        img_rows = [i for b in idx.tolist() for i in range(first_img[b], first_img[b + 1])]
        if not img_rows:
            return replace(out, pixel_values=None, image_grid_thw=None)
        patch_rows = [p for i in img_rows for p in range(first_patch[i], first_patch[i + 1])]
        dev = self.image_grid_thw.device
        out.image_grid_thw = self.image_grid_thw[torch.tensor(img_rows, device=dev)]
        out.pixel_values = self.pixel_values[torch.tensor(patch_rows, device=self.pixel_values.device)]
        return out


# ---------------------------------------------------------------------------------------------
# images

def _describe(obj) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return f"'{os.fspath(obj)}'"
    if isinstance(obj, dict):
        return f"'{obj.get('path')}'" if obj.get("path") else "dict image"
    return type(obj).__name__


def _open(obj):
    """PIL image from a PIL image, path, bytes, numpy array or HF-datasets dict {bytes, path}."""
    from PIL import Image

    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, dict):
        obj = obj.get("bytes") or obj.get("path")
    if isinstance(obj, (bytes, bytearray)):
        return Image.open(io.BytesIO(obj))
    if isinstance(obj, (str, os.PathLike)):
        if not os.path.isfile(obj):
            raise FileNotFoundError(f"no such image file {os.fspath(obj)!r}")
        return Image.open(obj)
    if isinstance(obj, np.ndarray):
        return Image.fromarray(obj)
    raise TypeError(f"unsupported image type {type(obj).__name__} (use a PIL image, path, bytes or array)")


def _to_rgb(img):
    """RGB PIL image: alpha composited on white, high-bit-depth greyscale min–max scaled to 8 bits."""
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(obj, where: str = "image", max_pixels: int | None = None):
    """Decode and convert one image to RGB; any failure names ``where`` and the source."""
    try:
        img = _open(obj)
        img.load()  # force decoding now: truncated/corrupt files fail here, not deep in the processor
        img = _to_rgb(img)
    except Exception as exc:  # noqa: BLE001 - re-raised with the image named
        raise ValueError(f"{where} ({_describe(obj)}): cannot load image: {exc}. "
                         "Fix or drop this record.") from exc
    w, h = img.size
    if min(w, h) < 1 or max(w, h) / min(w, h) > 200:
        raise ValueError(f"{where} ({_describe(obj)}): size {w}×{h} has aspect ratio > 200, which Qwen2-VL's "
                         "resize cannot handle; crop or pad the image.")
    if max_pixels and w * h > 16 * max_pixels:  # cheap integer reduce first; smart_resize finishes
        img = img.reduce(int((w * h / (4 * max_pixels)) ** 0.5))
    return img


def process_images(image_processor, images: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RGB PIL images → pixel_values (Σ patches, D) fp32, image_grid_thw (num_images, 3) int64."""
    if not images:
        return None, None
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"].long()


# ---------------------------------------------------------------------------------------------
# text

def render_prompt(tokenizer, text: str, num_images: int, system: str | None, template: str,
                  chat_template: str | None = None) -> str:
    """The prompt string with one ``IMAGE_PLACEHOLDER`` per image, before the text.

    "chat": the tokenizer's chat template (instruct models) with a generation prompt.
    "plain": ``[system\\n] <images> text\\n`` with no chat markers (base models).
    """
    if template == "plain":
        head = f"{system}\n" if system else ""
        return head + IMAGE_PLACEHOLDER * num_images + text + "\n"
    if template != "chat":
        raise ValueError(f"template must be 'chat' or 'plain', got {template!r}")
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=chat_template)


def expand_image_pads(ids: list[int], image_pad_id: int, tokens_per_image: list[int], where: str) -> list[int]:
    """Replace the k-th ``<|image_pad|>`` id by ``tokens_per_image[k]`` copies of it."""
    n_pads = sum(1 for t in ids if t == image_pad_id)
    if n_pads != len(tokens_per_image):
        raise ValueError(f"{where}: the templated prompt holds {n_pads} image placeholders for "
                         f"{len(tokens_per_image)} images; remove literal '<|image_pad|>' from the text "
                         "or check the chat template.")
    out, k = [], 0
    for t in ids:
        if t == image_pad_id:
            out.extend([image_pad_id] * tokens_per_image[k])
            k += 1
        else:
            out.append(t)
    return out


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists → input_ids (B, P), attention_mask (B, P), padded on the left."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask
