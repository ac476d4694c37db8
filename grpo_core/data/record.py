"""One record type for every medical VQA source, plus the row-level checks the loaders share.

A loader turns one raw row into a ``VQARecord``; ``check_record`` then decides whether the row is
usable (question present, answer letter among the options). A bad row raises ``BadRowError``
naming the file and the 0-based data row (the CSV header is not counted), or, with
``skip_bad=True``, is counted in a ``LoadReport`` by reason — never dropped silently. A problem
with a whole file (a required column missing, JSON that does not parse) is one ``BadFileError``.
Image checks (paths inside the dataset root, decoding, the pixel cap) live in images.py.

Text cells: ``clean_cell`` decodes bytes cells as UTF-8 (never ``str(b'...')``) and rejects text
holding invalid bytes (kept as U+DC80–U+DCFF by files.py), so the row that has them is named.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ANSWER_TYPES = ("mc", "yesno", "open")
LETTERS = string.ascii_uppercase[:10]          # A–J: the most options any source uses (MedXpertQA Text)

# Closed answers that mean yes / no (English and SLAKE's Chinese).
YES_WORDS = frozenset({"yes", "y", "true", "是", "是的", "包含", "有", "对"})
NO_WORDS = frozenset({"no", "n", "false", "不是", "不包含", "没有", "否", "无", "不"})


@dataclass
class VQARecord:
    """One visual question with its gold answer, whatever the source format."""

    id: str                                            # unique within the dataset (source id or file:row)
    images: list                                       # image paths (str), encoded image bytes or PIL images, in order
    question: str                                      # question stem only (options live in `options`)
    options: dict = field(default_factory=dict)        # letter -> option text, in display order
    answer_letter: str | None = None                   # gold letter (mc), else None
    answer_text: str | None = None                     # gold option text / free answer
    answer_type: str = "mc"                            # "mc" | "yesno" | "open"
    modality: str = ""                                 # e.g. "CT", "MR", "X-Ray"; "" when unknown
    question_type: str = ""                            # source's question category; "" when unknown
    dataset: str = ""                                  # source dataset name
    extra: dict = field(default_factory=dict)          # everything else the source carried
    source_file: str = ""                              # file the record was read from ("" = built in code)
    source_row: int | None = None                      # its 0-based data row there (None = unknown)


SKIP_HINT = ("Fix the row, or pass skip_bad=True to load_dataset (data.skip_bad: true) to skip "
             "such rows (they are counted)")


class BadRowError(ValueError):
    """A row that cannot become a usable record; ``reason`` is a short category for counting."""

    def __init__(self, file: str, row: Any, reason: str, detail: str = "", hint: str = SKIP_HINT):
        self.file, self.row, self.reason, self.detail = str(file), row, reason, detail
        self.where = f"{file}, row {row}" if row is not None else str(file)
        self.short = f"{self.where}: {reason}" + (f" ({detail})" if detail else "")   # without the hint
        super().__init__(f"{self.short}. {hint}.")


class BadFileError(ValueError):
    """A whole file that cannot be read as the format says (a missing column, broken JSON)."""

    def __init__(self, file: str, problem: str, hint: str = ""):
        self.file, self.problem = str(file), problem
        super().__init__(f"{file}: {problem}" + (f". {hint[0].upper()}{hint[1:]}." if hint else "."))


class RowProblem(ValueError):
    """Raised inside a row converter; the driver adds the file and row and turns it into BadRowError."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def error(self, file: str, row: Any) -> BadRowError:
        """This problem as the BadRowError of ``file`` / ``row`` (subclasses pick a subclass)."""
        return BadRowError(file, row, self.reason, self.detail)


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
    # kept rows repeating an earlier one (same question, options, answer, images)
    duplicates: int = 0
    duplicate_examples: list = field(default_factory=list)   # first few "file, row 7 repeats file, row 2"
    images_checked: int = 0                                  # distinct images opened/decoded (check_images open|decode)
    check_seconds: float = 0.0                               # wall time of that image check

    def summary(self) -> str:
        parts = [f"loaded {self.loaded}"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))
        if self.filtered:
            parts.append("filtered " + ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered.items())))
        if self.duplicates:
            parts.append(f"duplicates kept: {self.duplicates}")
        if self.images_checked:
            parts.append(f"images checked: {self.images_checked} in {self.check_seconds:.1f} s")
        return "; ".join(parts)


class RecordList(list):
    """A plain list of VQARecord that also carries the LoadReport of how it was loaded."""

    report: LoadReport
    split: Any = None                                        # sources.SplitReport when build_records made it

    def __init__(self, items=(), report: LoadReport | None = None):
        super().__init__(items)
        self.report = report if report is not None else LoadReport(loaded=len(self))


# ---------------------------------------------------------------------------------------------
# Small text helpers shared by the loaders
# ---------------------------------------------------------------------------------------------

_STRIP_CHARS = " \t\r\n\"'\xa0\u200a\u200b\u3000"


def clean_cell(value: Any) -> str:
    """Any cell -> str with padding, quotes, NBSP and hair spaces stripped; None/NaN -> "".

    Bytes (binary parquet / pickle cells) are decoded as UTF-8; text that is not valid UTF-8 is a
    RowProblem("invalid UTF-8") naming the byte, never its Python repr "b'...'" passed on as text.
    A list cell (HF Sequence, parquet list, numpy array) of one item is that item; an empty or
    longer list, or a dict, is a RowProblem("list in a text cell"), never its repr "['...']".
    """
    value = _single_item(value)
    if value is None:
        return ""
    if isinstance(value, float) and value != value:   # NaN
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowProblem("invalid UTF-8", f"byte 0x{value[exc.start]:02x} at offset {exc.start} of the "
                                              f"bytes cell {value[:60]!r}") from None
    text = str(value)
    bad = bad_byte_at(text)
    if bad is not None:                                # an invalid byte kept by surrogateescape (files.py)
        raise RowProblem("invalid UTF-8", f"byte 0x{ord(text[bad]) - 0xDC00:02x} in {escape(text)}")
    return text.strip(_STRIP_CHARS)


def _single_item(value: Any) -> Any:
    """A one-item list / tuple / 1-D array cell -> its item; other containers -> RowProblem."""
    if isinstance(value, dict):
        raise RowProblem("list in a text cell", f"a mapping {_short_repr(value)} where text "
                         "belongs; map a text column (data.columns)")
    if getattr(value, "ndim", 0) >= 1 and hasattr(value, "tolist"):         # numpy / pandas arrays
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != 1:
        raise RowProblem("list in a text cell", f"{len(value)} items {_short_repr(value)} where "
                         "one text belongs; map a text column (data.columns) or make each cell "
                         "one string")
    return _single_item(value[0])


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def bad_byte_at(text: str) -> int | None:
    """Index of the first invalid byte kept by surrogateescape (U+DC80–U+DCFF) in ``text``, or None."""
    if text.isascii():
        return None
    m = _ESCAPED_BYTE.search(text)
    return m.start() if m else None


def escape(text: str, limit: int = 60) -> str:
    """A printable preview of text that may hold escaped invalid bytes: 'Qu\\xe9?'."""
    return "'" + text.encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "backslashreplace") + "'"


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

def check_record(rec: VQARecord) -> None:
    """Raise RowProblem when the record's text cannot be used for training or evaluation."""
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
