"""Loaders for the yes/no + open-answer sources: VQA-RAD (official JSON, HF parquet), SLAKE,
PathVQA (HF parquet, original pkl). Layouts and quirks: /work/shared/FORMATS.md §4–6.

Answer types: a closed question whose answer is yes/no (any case, SLAKE's Chinese forms too)
becomes "yesno"; every other answer is "open" — SLAKE/VQA-RAD CLOSED answers such as "Left" or
"T2" stay "open" with ``extra["closed"] = True`` (a closed set, but not yes/no).

PathVQA's original ``*_qa.pkl`` files are Python pickles: unpickling can run arbitrary code, so
they are read only with ``allow_pickle=True`` (use the HF parquet files when you can).
"""

from __future__ import annotations

import glob
import os
from functools import partial

from .loaders_mc import pick_files, read_json_list, split_of
from .record import (
    Filtered,
    RowProblem,
    VQARecord,
    clean_cell,
    open_image_bytes,
    resolve_image,
    yes_no,
)


def _answer_type(answer: str, closed: bool | None) -> str:
    """'yesno' for yes/no answers (when the source says closed, or says nothing), else 'open'."""
    return "yesno" if (closed is not False and yes_no(answer) is not None) else "open"


# ---------------------------------------------------------------------------------------------
# VQA-RAD official JSON (§4)
# ---------------------------------------------------------------------------------------------

_RAD_SPLITS = {"train": {"freeform", "para"}, "test": {"test_freeform", "test_para"}}


def iter_vqa_rad(path, split=None, image_root=None, **_):
    if path.endswith(".parquet") or (os.path.isdir(path) and not glob.glob(os.path.join(path, "*.json"))):
        yield from iter_hf_parquet(path, split=split, image_root=image_root, dataset="VQA-RAD")
        return
    if split is not None and split not in _RAD_SPLITS:
        raise ValueError(f"vqa_rad: split must be one of {list(_RAD_SPLITS)} or None, got {split!r}")
    f = path
    if os.path.isdir(path):
        named = os.path.join(path, "VQA_RAD Dataset Public.json")
        f = named if os.path.isfile(named) else pick_files(path, "*.json", None, "vqa_rad")[0]
    d = os.path.dirname(os.path.abspath(f))
    roots = [image_root] if image_root else [os.path.join(d, "VQA_RAD Image Folder"), d]
    for i, raw in enumerate(read_json_list(f)):
        yield f, i, partial(_rad_row, raw, roots, split, i)


def _rad_row(raw, roots, split, i):
    phrase = clean_cell(raw.get("phrase_type")).lower()
    if split is not None and phrase not in _RAD_SPLITS[split]:
        raise Filtered(f"not in split {split}")
    answer = clean_cell(raw.get("answer"))                  # may be a number: str() it (HF script does)
    closed = clean_cell(raw.get("answer_type")).upper()
    return VQARecord(
        id=f"vqa_rad/{clean_cell(raw.get('qid')) or i}", images=[resolve_image(clean_cell(raw.get("image_name")), roots)],
        question=clean_cell(raw.get("question")), answer_text=answer,
        answer_type=_answer_type(answer, {"CLOSED": True, "OPEN": False}.get(closed)),
        question_type=clean_cell(raw.get("question_type")).upper(), dataset="VQA-RAD",
        extra={"organ": clean_cell(raw.get("image_organ")).upper(), "phrase_type": phrase,
               "closed": closed == "CLOSED", "qid_linked_id": clean_cell(raw.get("qid_linked_id"))},
    )


# ---------------------------------------------------------------------------------------------
# HF parquet (flaviagiammarino/vqa-rad, path-vqa): image {bytes, path}, question, answer
# ---------------------------------------------------------------------------------------------

def iter_hf_parquet(path, split=None, image_root=None, dataset=None, **_):
    import pandas as pd

    files = pick_files(path, "*.parquet", split, "parquet")
    for f in files:
        df = pd.read_parquet(f)
        missing = {"image", "question", "answer"} - set(df.columns)
        if missing:
            raise ValueError(f"{f}: parquet lacks columns {sorted(missing)} (has {list(df.columns)})")
        name = dataset or _guess_name(f)
        roots = [image_root or os.path.dirname(os.path.abspath(f))]
        sp = split_of(f) or "data"
        for i, row in enumerate(df.to_dict("records")):
            yield f, i, partial(_parquet_row, row, roots, name, sp, i)


def _guess_name(file: str) -> str:
    low = os.path.abspath(file).lower().replace("_", "-")
    return "PathVQA" if "path-vqa" in low or "pathvqa" in low else "VQA-RAD" if "vqa-rad" in low else "parquet"


def _parquet_row(row, roots, name, split, i):
    img = row["image"]
    if isinstance(img, dict) and img.get("bytes") is not None:
        image = open_image_bytes(img["bytes"])
    elif isinstance(img, dict) and img.get("path"):
        image = resolve_image(img["path"], roots)
    elif isinstance(img, (bytes, bytearray)):
        image = open_image_bytes(bytes(img))
    else:
        raise RowProblem("no image", f"image cell is {type(img).__name__}")
    answer = clean_cell(row.get("answer"))
    return VQARecord(id=f"{name}/{split}/{i}", images=[image], question=clean_cell(row.get("question")),
                     answer_text=answer, answer_type=_answer_type(answer, None), dataset=name,
                     extra={"split": split})


# ---------------------------------------------------------------------------------------------
# SLAKE (§5): train/validation(validate)/test.json + imgs/xmlabN/source.jpg; en and zh rows
# ---------------------------------------------------------------------------------------------

def iter_slake(path, split=None, image_root=None, lang="en", **_):
    """lang: "en" (default: the English subset every paper reports), "zh", or None for both."""
    if lang not in ("en", "zh", None):
        raise ValueError(f"slake: lang must be 'en', 'zh' or None (both), got {lang!r}")
    if os.path.isdir(path):
        if split is None:
            raise ValueError(f"slake: {path} is a directory; pass split='train', 'validation' or 'test'")
        names = ["validation.json", "validate.json"] if split in ("validation", "validate", "val") else [f"{split}.json"]
        hits = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not hits:
            raise FileNotFoundError(f"slake: none of {names} in {path}")
        f = hits[0]
    else:
        f = path
    d = os.path.dirname(os.path.abspath(f))
    roots = [image_root] if image_root else [os.path.join(d, "imgs"), d]
    for i, raw in enumerate(read_json_list(f)):
        yield f, i, partial(_slake_row, raw, roots, lang, i)


def _slake_row(raw, roots, lang, i):
    q_lang = clean_cell(raw.get("q_lang")).lower()
    if lang is not None and q_lang != lang:
        raise Filtered(f"language {q_lang or '?'}")
    answer = clean_cell(raw.get("answer"))
    closed = clean_cell(raw.get("answer_type")).upper() == "CLOSED"
    return VQARecord(
        id=f"slake/{clean_cell(raw.get('qid')) or i}", images=[resolve_image(clean_cell(raw.get("img_name")), roots)],
        question=clean_cell(raw.get("question")), answer_text=answer, answer_type=_answer_type(answer, closed),
        modality=clean_cell(raw.get("modality")), question_type=clean_cell(raw.get("content_type")), dataset="SLAKE",
        extra={"q_lang": q_lang, "closed": closed, "location": clean_cell(raw.get("location")),
               "base_type": clean_cell(raw.get("base_type"))},
    )


# ---------------------------------------------------------------------------------------------
# PathVQA (§6): HF parquet, or pvqa/qas/<split>/<split>_qa.pkl + pvqa/images/<split>/<image>.jpg
# ---------------------------------------------------------------------------------------------

def iter_pathvqa(path, split=None, image_root=None, allow_pickle=False, **_):
    pkl = path if path.endswith(".pkl") else None
    if pkl is None and os.path.isdir(path):
        for base in (path, os.path.join(path, "pvqa")):
            if os.path.isdir(os.path.join(base, "qas")):
                if split is None:
                    raise ValueError(f"pathvqa: {base}/qas holds pkl splits; pass split='train', 'val' or 'test'")
                pkl = os.path.join(base, "qas", split, f"{split}_qa.pkl")
    if pkl is None:
        yield from iter_hf_parquet(path, split=split, image_root=image_root, dataset="PathVQA")
        return
    if not allow_pickle:
        raise ValueError(
            f"pathvqa: {pkl} is a Python pickle, and unpickling a file can execute arbitrary code. "
            "Load it only if you trust its source, with load_dataset(..., allow_pickle=True), "
            "or use the HF parquet files (flaviagiammarino/path-vqa) instead."
        )
    import pickle

    with open(pkl, "rb") as fh:
        rows = pickle.load(fh)  # noqa: S301 - explicit opt-in above
    sp = os.path.basename(os.path.dirname(os.path.abspath(pkl)))
    pvqa = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pkl))))
    roots = [image_root or os.path.join(pvqa, "images", sp)]
    for i, raw in enumerate(rows):
        yield pkl, i, partial(_pkl_row, raw, roots, sp, i)


def _pkl_row(raw, roots, split, i):
    if not isinstance(raw, dict):
        raise RowProblem("not a dict", type(raw).__name__)
    stem = clean_cell(raw.get("image"))
    answer = clean_cell(raw.get("answer"))
    return VQARecord(id=f"PathVQA/{split}/{i}", images=[resolve_image(stem if stem.lower().endswith(".jpg") else stem + ".jpg", roots)],
                     question=clean_cell(raw.get("question")), answer_text=answer,
                     answer_type=_answer_type(answer, None), dataset="PathVQA", extra={"split": split})
