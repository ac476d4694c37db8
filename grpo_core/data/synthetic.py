"""Synthetic medical-like VQA: procedural grey "scans" whose answer can only be read off the image.

Each image (default 56×56 = 2×2 merged Qwen2-VL tokens at patch 14 / merge 2: one token per
quadrant) is: background noise, a body ellipse with a brighter outline and soft texture, and one
or more bright Gaussian "lesions", then a modality style (contrast gamma, noise level, body
brightness: CT-, MR- and X-ray-like). Tasks:

  quadrant    where is the lesion?      A) upper left  B) upper right  C) lower left  D) lower right
  laterality  which side of the image?  A) left  B) right
  size        how large is the lesion?  A) small  B) large
  count       how many lesions?         A) 1  B) 2  C) 3  D) 4          (lesions in distinct quadrants)
  presence    is there a lesion?        yes / no                        (answer_type "yesno")

Design choices:
  - Answers are balanced (each answer equally often, ±1) and drawn from their own random stream;
    question phrasings and modality come from other streams, so the text carries no information
    about the answer. ``oracle_answer`` reads the answer from the pixels alone (the tests use it to
    show that swapping images permutes the answers).
  - Options are in a fixed A–D order (docs/DESIGN.md: per-item shuffling was unlearnable for the tiny
    demo model); shuffle later with templates.record_to_prompt(shuffle_options=True) if wanted.
  - "Left"/"right" mean the image's left/right, not the patient's (no radiological convention).
  - Everything is deterministic in ``seed``; item i's image depends only on (seed, i).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .record import VQARecord

QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
STYLES = {  # body brightness, outline boost, pixel noise std, gamma, background level
    "CT": dict(body=0.38, ring=0.10, noise=0.04, gamma=1.0, bg=0.02),
    "MR": dict(body=0.45, ring=0.08, noise=0.06, gamma=0.75, bg=0.05),
    "X-ray": dict(body=0.30, ring=0.12, noise=0.03, gamma=1.3, bg=0.10),
}
TASKS = {
    "quadrant": (list(QUADRANTS), ["Where is the bright lesion in this {m} image?",
                                   "In which quadrant of this {m} scan is the lesion located?"]),
    "laterality": (["left", "right"], ["On which side of this {m} image is the lesion?",
                                       "Is the lesion in this {m} scan on the left or the right side of the image?"]),
    "size": (["small", "large"], ["How large is the lesion in this {m} image?",
                                  "Is the lesion in this {m} scan small or large?"]),
    "count": (["1", "2", "3", "4"], ["How many lesions are visible in this {m} image?",
                                     "Count the bright lesions in this {m} scan."]),
    "presence": (["yes", "no"], ["Is there a lesion in this {m} image?",
                                 "Does this {m} scan show a bright lesion?"]),
}
_SIGMA = {"small": 0.025, "normal": 0.036, "large": 0.07}    # lesion std as a fraction of the size
_AMPLITUDE = 0.5


def _balanced(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k)                   # (n,) each label n//k or n//k + 1 times


def _lesion_center(quadrant: int, size: int, rng: np.random.Generator) -> tuple[float, float]:
    """A point well inside the quadrant and inside the body: radius 0.17–0.32·size, angle 25–65°."""
    r = rng.uniform(0.17, 0.32) * size
    a = np.deg2rad(rng.uniform(25, 65))
    dy, dx = r * np.sin(a), r * np.cos(a)
    sy = -1 if quadrant in (0, 1) else 1                        # upper → smaller row index
    sx = -1 if quadrant in (0, 2) else 1                        # left → smaller column index
    c = (size - 1) / 2
    return c + sy * dy, c + sx * dx


def _render(size: int, lesions: list, style: dict, rng: np.random.Generator,
            amplitude: float = _AMPLITUDE) -> Image.Image:
    """lesions: [(cy, cx, sigma_px)] -> 8-bit grey PIL image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)      # (S, S) each
    c = (size - 1) / 2
    ry, rx = size * rng.uniform(0.43, 0.47), size * rng.uniform(0.40, 0.46)
    d = np.sqrt(((yy - c) / ry) ** 2 + ((xx - c) / rx) ** 2)    # (S, S) 1 on the body outline
    img = np.full((size, size), style["bg"])
    img[d <= 1] = style["body"]
    img += style["ring"] * np.exp(-(((d - 1) * min(ry, rx) / 1.2) ** 2))   # bright outline, ~1 px wide
    img += 0.04 * np.sin(xx / size * rng.uniform(4, 9) + rng.uniform(0, 6)) * (d <= 1)  # soft texture
    for cy, cx, s in lesions:
        img += amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    img = np.clip(img, 0, 1) ** style["gamma"]
    img += rng.normal(0, style["noise"], img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), mode="L")


def _item(task: str, label: int, size: int, rng: np.random.Generator, sigma_frac: float = _SIGMA["normal"]):
    """-> (lesions, answer text) for one item of the task with answer index ``label``."""
    answers = TASKS[task][0]
    sigma = sigma_frac * size
    if task == "quadrant":
        quads = [label]
    elif task == "laterality":
        quads = [int(rng.choice([0, 2]) if label == 0 else rng.choice([1, 3]))]
    elif task == "size":
        quads, sigma = [int(rng.integers(4))], _SIGMA[answers[label]] * size
    elif task == "count":
        quads = sorted(rng.permutation(4)[: label + 1].tolist())
    else:  # presence
        quads = [int(rng.integers(4))] if answers[label] == "yes" else []
    lesions = [(*_lesion_center(q, size, rng), sigma) for q in quads]
    return lesions, answers[label]


def make_synthetic_vqa(n: int, seed: int = 0, image_size: int = 56, task: str = "quadrant",
                       modalities=("CT", "MR", "X-ray"), lesion_sigma: float = _SIGMA["normal"],
                       lesion_amplitude: float = _AMPLITUDE) -> list[VQARecord]:
    """n balanced synthetic VQA records (deterministic in seed) with PIL 'L' images in memory.

    lesion_sigma: lesion std as a fraction of the image size (the "size" task picks its own);
    lesion_amplitude: peak brightness added by a lesion (0–1 scale). Bigger, brighter lesions are
    easier for a tiny random vision tower to pick up (the CPU demo uses 0.07 and 0.7).
    """
    if not (0 < lesion_sigma <= 0.2 and 0 < lesion_amplitude <= 1):
        raise ValueError(f"make_synthetic_vqa: need 0 < lesion_sigma <= 0.2 and 0 < lesion_amplitude <= 1, "
                         f"got {lesion_sigma}, {lesion_amplitude}")
    if task not in TASKS:
        raise ValueError(f"make_synthetic_vqa: task must be one of {sorted(TASKS)}, got {task!r}")
    if image_size < 16:
        raise ValueError(f"make_synthetic_vqa: image_size must be >= 16 px, got {image_size}")
    unknown = [m for m in modalities if m not in STYLES]
    if unknown or not modalities:
        raise ValueError(f"make_synthetic_vqa: modalities must be a non-empty subset of "
                         f"{list(STYLES)}, got {list(modalities)}")
    answers, phrasings = TASKS[task]
    labels = _balanced(n, len(answers), np.random.default_rng([seed, 0]))           # answer stream
    text_rng = np.random.default_rng([seed, 1])                                       # text/modality stream
    is_mc = task != "presence"
    records = []
    for i in range(n):
        modality = modalities[int(text_rng.integers(len(modalities)))]
        question = phrasings[int(text_rng.integers(len(phrasings)))].format(m=modality)
        img_rng = np.random.default_rng([seed, 2, i])
        lesions, answer = _item(task, int(labels[i]), image_size, img_rng, lesion_sigma)
        image = _render(image_size, lesions, STYLES[modality], img_rng, lesion_amplitude)
        options = {L: a for L, a in zip("ABCDEFGHIJ", answers)} if is_mc else {}
        records.append(VQARecord(
            id=f"synthetic/{task}/{seed}/{i}", images=[image], question=question, options=options,
            answer_letter="ABCDEFGHIJ"[int(labels[i])] if is_mc else None, answer_text=answer,
            answer_type="mc" if is_mc else "yesno", modality=modality, question_type=task, dataset="synthetic",
            extra={"lesions": [tuple(round(v, 2) for v in les) for les in lesions]},
        ))
    return records


# ---------------------------------------------------------------------------------------------
# Reading the answer back from the pixels (for tests and sanity checks, not for training)
# ---------------------------------------------------------------------------------------------

def _smooth(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, 1, mode="edge")
    return sum(p[1 + dy: 1 + dy + a.shape[0], 1 + dx: 1 + dx + a.shape[1]]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9


def oracle_answer(image, task: str) -> str:
    """The task's answer text computed from the image alone (box-smoothed peaks vs body level)."""
    a = _smooth(np.asarray(image.convert("L"), dtype=np.float64) / 255)   # (S, S)
    S = a.shape[0]
    h = S // 2
    body = float(np.median(a[S // 4: 3 * S // 4, S // 4: 3 * S // 4]))
    quads = [a[:h, :h], a[:h, h:], a[h:, :h], a[h:, h:]]
    peaks = np.array([q.max() for q in quads])
    top = int(peaks.argmax())
    if task == "quadrant":
        return QUADRANTS[top]
    if task == "laterality":
        return "left" if top in (0, 2) else "right"
    if task == "count":
        return str(int((peaks > body + 0.5 * (peaks.max() - body)).sum()))
    if task == "presence":
        return "yes" if peaks.max() - body > 0.25 else "no"
    if task == "size":
        half = body + 0.5 * (peaks.max() - body)
        return "large" if int((quads[top] > half).sum()) > 0.012 * S * S else "small"
    raise ValueError(f"oracle_answer: unknown task {task!r}")
