"""Loaders for the yes/no + open-answer sources: VQA-RAD (official JSON, HF parquet), SLAKE,
PathVQA (HF parquet, original pkl). Layouts and quirks: docs/FORMATS.md.

Answer types: a closed question whose answer is yes/no (any case, SLAKE's Chinese forms too)
becomes "yesno"; every other answer is "open" — SLAKE/VQA-RAD CLOSED answers such as "Left" or
"T2" stay "open" with ``extra["closed"] = True`` (a closed set, but not yes/no).

PathVQA's original ``*_qa.pkl`` files are Python pickles: unpickling can run arbitrary code, so
they are read only with ``allow_pickle=True`` (use the HF parquet files when you can). A pickle
written by Python 2 holds byte strings: it is re-read with ``encoding="bytes"`` and its cells are
decoded as UTF-8 per row (record.clean_cell), so a bad cell names its row.
"""

from __future__ import annotations

import glob
import os
from functools import partial

from .files import pick_files, read_json_list, require_json_keys
from .images import ImageRoots
from .loaders_hf import iter_hf_parquet
from .record import (
    Filtered,
    RowProblem,
    VQARecord,
    clean_cell,
    yes_no,
)


def _answer_type(answer: str, closed: bool | None) -> str:
    """'yesno' for yes/no answers (when the source says closed, or says nothing), else 'open'."""
    return "yesno" if (closed is not False and yes_no(answer) is not None) else "open"


# ---------------------------------------------------------------------------------------------
# VQA-RAD official JSON (§4)
# ---------------------------------------------------------------------------------------------

_RAD_SPLITS = {"train": {"freeform", "para"}, "test": {"test_freeform", "test_para"}}


def iter_vqa_rad(path, split=None, image_root=None, allow_outside_root=False, **_):
    if path.endswith(".parquet") or (os.path.isdir(path) and not glob.glob(os.path.join(path, "*.json"))):
        yield from iter_hf_parquet(path, split=split, image_root=image_root, dataset="VQA-RAD",
                                   allow_outside_root=allow_outside_root)
        return
    if split is not None and split not in _RAD_SPLITS:
        raise ValueError(f"vqa_rad: split must be one of {list(_RAD_SPLITS)} or None, got {split!r}")
    f = path
    if os.path.isdir(path):
        named = os.path.join(path, "VQA_RAD Dataset Public.json")
        f = named if os.path.isfile(named) else pick_files(path, "*.json", None, "vqa_rad")[0]
    d = os.path.dirname(os.path.abspath(f))
    roots = ImageRoots.of(image_root, [os.path.join(d, "VQA_RAD Image Folder"), d], allow_outside_root)
    rows = read_json_list(f)
    require_json_keys(f, rows, ["question", "answer", "image_name"], "a VQA-RAD JSON file")
    for i, raw in enumerate(rows):
        yield f, i, partial(_rad_row, raw, roots, split, i)


def _rad_row(raw, roots, split, i):
    if not isinstance(raw, dict):
        raise RowProblem("not a JSON object", type(raw).__name__)
    phrase = clean_cell(raw.get("phrase_type")).lower()
    if split is not None and phrase not in _RAD_SPLITS[split]:
        raise Filtered(f"not in split {split}")
    answer = clean_cell(raw.get("answer"))                  # may be a number: str() it (HF script does)
    closed = clean_cell(raw.get("answer_type")).upper()
    return VQARecord(
        id=f"vqa_rad/{clean_cell(raw.get('qid')) or i}", images=[roots.resolve(raw.get("image_name"))],
        question=clean_cell(raw.get("question")), answer_text=answer,
        answer_type=_answer_type(answer, {"CLOSED": True, "OPEN": False}.get(closed)),
        question_type=clean_cell(raw.get("question_type")).upper(), dataset="VQA-RAD",
        extra={"organ": clean_cell(raw.get("image_organ")).upper(), "phrase_type": phrase,
               "closed": closed == "CLOSED", "qid_linked_id": clean_cell(raw.get("qid_linked_id"))},
    )


# ---------------------------------------------------------------------------------------------
# SLAKE (§5): train/validation(validate)/test.json + imgs/xmlabN/source.jpg; en and zh rows
# ---------------------------------------------------------------------------------------------

def iter_slake(path, split=None, image_root=None, lang="en", allow_outside_root=False, **_):
    """lang: "en" (default: the English subset every paper reports), "zh", or None for both."""
    if lang not in ("en", "zh", None):
        raise ValueError(f"slake: lang must be 'en', 'zh' or None (both), got {lang!r}")
    if os.path.isdir(path):
        if split is None:
            raise ValueError(f"slake: {path} is a directory; pass split='train', 'validation' or 'test'")
        names = (["validation.json", "validate.json"] if split in ("validation", "validate", "val")
                 else [f"{split}.json"])
        hits = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not hits:
            raise FileNotFoundError(f"slake: none of {names} in {path}")
        f = hits[0]
    else:
        f = path
    d = os.path.dirname(os.path.abspath(f))
    roots = ImageRoots.of(image_root, [os.path.join(d, "imgs"), d], allow_outside_root)
    rows = read_json_list(f)
    require_json_keys(f, rows, ["question", "answer", "img_name"], "a SLAKE file")
    for i, raw in enumerate(rows):
        yield f, i, partial(_slake_row, raw, roots, lang, i)


def _slake_row(raw, roots, lang, i):
    if not isinstance(raw, dict):
        raise RowProblem("not a JSON object", type(raw).__name__)
    q_lang = clean_cell(raw.get("q_lang")).lower()
    if lang is not None and q_lang != lang:
        raise Filtered(f"language {q_lang or '?'}")
    answer = clean_cell(raw.get("answer"))
    closed = clean_cell(raw.get("answer_type")).upper() == "CLOSED"
    return VQARecord(
        id=f"slake/{clean_cell(raw.get('qid')) or i}", images=[roots.resolve(raw.get("img_name"))],
        question=clean_cell(raw.get("question")), answer_text=answer, answer_type=_answer_type(answer, closed),
        modality=clean_cell(raw.get("modality")), question_type=clean_cell(raw.get("content_type")), dataset="SLAKE",
        extra={"q_lang": q_lang, "closed": closed, "location": clean_cell(raw.get("location")),
               "base_type": clean_cell(raw.get("base_type"))},
    )


# ---------------------------------------------------------------------------------------------
# PathVQA (§6): HF parquet, or pvqa/qas/<split>/<split>_qa.pkl + pvqa/images/<split>/<image>.jpg
# ---------------------------------------------------------------------------------------------

def iter_pathvqa(path, split=None, image_root=None, allow_pickle=False, allow_outside_root=False, **_):
    pkl = path if path.endswith(".pkl") else None
    if pkl is None and os.path.isdir(path):
        for base in (path, os.path.join(path, "pvqa")):
            if os.path.isdir(os.path.join(base, "qas")):
                if split is None:
                    raise ValueError(f"pathvqa: {base}/qas holds pkl splits; pass split='train', 'val' or 'test'")
                pkl = os.path.join(base, "qas", split, f"{split}_qa.pkl")
    if pkl is None:
        yield from iter_hf_parquet(path, split=split, image_root=image_root, dataset="PathVQA",
                                   allow_outside_root=allow_outside_root)
        return
    if not allow_pickle:
        raise ValueError(
            f"pathvqa: {pkl} is a Python pickle, and unpickling a file can execute arbitrary code. "
            "Load it only if you trust its source, with load_dataset(..., allow_pickle=True), "
            "or use the HF parquet files (flaviagiammarino/path-vqa) instead."
        )
    rows = _read_pickle(pkl)
    if not isinstance(rows, list):
        raise ValueError(f"pathvqa: {pkl} holds a {type(rows).__name__}, expected a list of dicts")
    require_json_keys(pkl, rows, ["image", "question", "answer"], "a PathVQA pkl file")
    sp = os.path.basename(os.path.dirname(os.path.abspath(pkl)))
    pvqa = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pkl))))
    roots = ImageRoots.of(image_root, [os.path.join(pvqa, "images", sp)], allow_outside_root)
    for i, raw in enumerate(rows):
        yield pkl, i, partial(_pkl_row, raw, roots, sp, i)


def _read_pickle(pkl: str):
    """The unpickled object; Python 2 byte strings as bytes (dict keys decoded), never mis-decoded."""
    import pickle

    with open(pkl, "rb") as fh:
        try:
            return pickle.load(fh)  # noqa: S301 - explicit opt-in above
        except UnicodeDecodeError:       # a Python 2 str that is not ASCII: read every str as bytes
            fh.seek(0)
            rows = pickle.load(fh, encoding="bytes")  # noqa: S301
    key = lambda k: k.decode("utf-8", "replace") if isinstance(k, bytes) else k  # noqa: E731
    if not isinstance(rows, list):
        return rows
    return [{key(k): v for k, v in r.items()} if isinstance(r, dict) else r for r in rows]


def _pkl_row(raw, roots, split, i):
    if not isinstance(raw, dict):
        raise RowProblem("not a dict", type(raw).__name__)
    stem = clean_cell(raw.get("image"))
    answer = clean_cell(raw.get("answer"))
    image = roots.resolve(stem if stem.lower().endswith(".jpg") else stem + ".jpg")
    return VQARecord(id=f"PathVQA/{split}/{i}", images=[image],
                     question=clean_cell(raw.get("question")), answer_text=answer,
                     answer_type=_answer_type(answer, None), dataset="PathVQA", extra={"split": split})
