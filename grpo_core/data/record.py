"""One record type for every medical VQA source, plus the row-level checks the loaders share.

A loader turns one raw row into a ``VQARecord``; ``check_record`` then decides whether the row is
usable (question present, answer letter among the options, images exist / open). A bad row raises
``BadRowError`` naming the file and the 0-based data row (the CSV header is not counted), or, with
``skip_bad=True``, is counted in a ``LoadReport`` by reason — never dropped silently.
"""

from __future__ import annotations

import io
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

ANSWER_TYPES = ("mc", "yesno", "open")
LETTERS = string.ascii_uppercase[:10]          # A–J: the most options any source uses (MedXpertQA Text)
IMAGE_CHECKS = ("exists", "open", "none")

# Closed answers that mean yes / no (English and SLAKE's Chinese).
YES_WORDS = frozenset({"yes", "y", "true", "是", "是的", "包含", "有", "对"})
NO_WORDS = frozenset({"no", "n", "false", "不是", "不包含", "没有", "否", "无", "不"})


@dataclass
class VQARecord:
    """One visual question with its gold answer, whatever the source format."""

    id: str                                            # unique within the dataset (source id or file:row)
    images: list                                       # image paths (str) or PIL images, in order
    question: str                                      # question stem only (options live in `options`)
    options: dict = field(default_factory=dict)        # letter -> option text, in display order
    answer_letter: str | None = None                   # gold letter (mc), else None
    answer_text: str | None = None                     # gold option text / free answer
    answer_type: str = "mc"                            # "mc" | "yesno" | "open"
    modality: str = ""                                 # e.g. "CT", "MR", "X-Ray"; "" when unknown
    question_type: str = ""                            # source's question category; "" when unknown
    dataset: str = ""                                  # source dataset name
    extra: dict = field(default_factory=dict)          # everything else the source carried


class BadRowError(ValueError):
    """A row that cannot become a usable record; ``reason`` is a short category for counting."""

    def __init__(self, file: str, row: Any, reason: str, detail: str = ""):
        self.file, self.row, self.reason, self.detail = str(file), row, reason, detail
        msg = f"{file}, row {row}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(
            msg + ". Fix the row, or pass skip_bad=True to load_dataset to skip such rows (they are counted)."
        )


class RowProblem(ValueError):
    """Raised inside a row converter; the driver adds the file and row and turns it into BadRowError."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Filtered(Exception):
    """Raised by a row converter for a row the caller asked to leave out (counted, not an error)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class LoadReport:
    """What a load kept, skipped (by reason) and filtered on purpose (e.g. SLAKE language)."""

    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)        # reason -> count (skip_bad=True)
    filtered: Counter = field(default_factory=Counter)       # reason -> count (requested filters)
    examples: list = field(default_factory=list)             # first few skipped-row messages

    def summary(self) -> str:
        parts = [f"loaded {self.loaded}"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))
        if self.filtered:
            parts.append("filtered " + ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered.items())))
        return "; ".join(parts)


class RecordList(list):
    """A plain list of VQARecord that also carries the LoadReport of how it was loaded."""

    report: LoadReport

    def __init__(self, items=(), report: LoadReport | None = None):
        super().__init__(items)
        self.report = report if report is not None else LoadReport(loaded=len(self))


# ---------------------------------------------------------------------------------------------
# Small text helpers shared by the loaders
# ---------------------------------------------------------------------------------------------

_STRIP_CHARS = " \t\r\n\"'\xa0\u200a\u200b\u3000"


def clean_cell(value: Any) -> str:
    """Any cell -> str with padding, quotes, NBSP and hair spaces stripped; None/NaN -> ""."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:   # NaN
        return ""
    return str(value).strip(_STRIP_CHARS)


_LETTER_PREFIX = re.compile(r"^(?:\(([A-J])\)|([A-J])\s*[:)])\s*")


def strip_letter_prefix(text: Any) -> str:
    """'B:Focal uptake' / ' B) x' / '(B) x' -> 'Focal uptake'; text without such a prefix is kept.

    Any letter A–J is stripped: PMC-VQA has rows whose prefix letter does not match the column;
    the column decides the letter, the prefix is only noise.
    """
    t = clean_cell(text)
    return clean_cell(_LETTER_PREFIX.sub("", t, count=1))


def yes_no(text: str | None) -> str | None:
    """Normalise a closed answer to "yes"/"no"; None when it is neither."""
    if text is None:
        return None
    t = str(text).strip().lower().strip(" .!?。！？,，")
    if t in YES_WORDS:
        return "yes"
    if t in NO_WORDS:
        return "no"
    return None


def letters_for(n: int) -> list[str]:
    if n > len(LETTERS):
        raise RowProblem("too many options", f"{n} options; at most {len(LETTERS)} (A–J) are supported")
    return list(LETTERS[:n])


# ---------------------------------------------------------------------------------------------
# Row checks
# ---------------------------------------------------------------------------------------------

def resolve_image(rel: str, roots: list[str]) -> str:
    """First existing ``root/rel``; if none exists, the first candidate (the check reports it)."""
    rel = str(rel)
    if os.path.isabs(rel):
        return rel
    candidates = [os.path.join(r, rel) for r in roots if r is not None]
    for c in candidates:
        if os.path.exists(c):
            return c
    return candidates[0] if candidates else rel


def open_image_bytes(data: bytes) -> Image.Image:
    """Embedded image bytes (HF parquet `{bytes, path}`) -> PIL image (header parsed, lazy pixels)."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for corrupt data
        raise RowProblem("unreadable image", f"embedded bytes: {type(exc).__name__}: {exc}") from exc


def _check_image(img: Any, check: str) -> None:
    if check == "none":
        return
    if isinstance(img, Image.Image):
        if check == "open":
            try:
                img.load()
            except Exception as exc:  # noqa: BLE001
                raise RowProblem("unreadable image", f"{type(exc).__name__}: {exc}") from exc
        return
    path = str(img)
    if not os.path.isfile(path):
        raise RowProblem("missing image file", path)
    if check == "open":
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as exc:  # noqa: BLE001
            raise RowProblem("unreadable image", f"{path}: {type(exc).__name__}: {exc}") from exc


def check_record(rec: VQARecord, check_images: str = "exists") -> None:
    """Raise RowProblem when the record cannot be used for training or evaluation."""
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
    if rec.answer_type not in ANSWER_TYPES:
        raise RowProblem("unknown answer type", repr(rec.answer_type))
    if not rec.question or not rec.question.strip():
        raise RowProblem("empty question")
    if not rec.images:
        raise RowProblem("no image")
    if rec.answer_type == "mc":
        if len(rec.options) < 2:
            raise RowProblem("too few options", f"{len(rec.options)} option(s)")
        if rec.answer_letter not in rec.options:
            raise RowProblem(
                "unknown answer letter", f"{rec.answer_letter!r} not among options {list(rec.options)}"
            )
    elif not (rec.answer_text or "").strip():
        raise RowProblem("empty answer")
    for img in rec.images:
        _check_image(img, check_images)


def load_image(img: Any) -> Image.Image:
    """Path or PIL image -> RGB PIL image (what Prompt.images holds)."""
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    with Image.open(str(img)) as im:
        return im.convert("RGB")


def swap_images(records, seed: int = 0) -> list:
    """Copies of the records with their images permuted among items (a derangement when n ≥ 2).

    Answers stay with their questions, so a model that really reads the image drops to chance:
    the check that the image is needed.
    """
    import dataclasses
    import random

    n = len(records)
    perm = list(range(n))
    if n >= 2:
        rng = random.Random(seed)
        while any(i == p for i, p in enumerate(perm)):
            rng.shuffle(perm)
    return [dataclasses.replace(r, images=list(records[p].images), extra=dict(r.extra, image_from=records[p].id))
            for r, p in zip(records, perm)]
