"""Loaders for the multiple-choice sources: PMC-VQA, OmniMedVQA, Med-R1 Splits, MedVLM-R1 /
HuatuoGPT-Vision eval JSON, MedXpertQA MM. Layouts and quirks: docs/FORMATS.md.

Every ``iter_*`` function yields ``(file, row_index, make)``: ``make()`` builds one VQARecord or
raises RowProblem; the driver in loaders.py adds the file/row and applies skip_bad. File-level
problems (missing file, a column no row has, JSON that does not parse) raise at once as
BadFileError: they are not row problems. Image paths go through ``ImageRoots.resolve``, which
keeps them inside the dataset's image folders unless ``allow_outside_root``.
"""

from __future__ import annotations

import glob
import os
import re
from functools import partial

from .files import (
    pick_files,
    read_csv,
    read_json_list,
    read_jsonl,
    require_columns,
    require_json_keys,
    unique_files,
)
from .images import ImageRoots
from .record import (
    LETTERS,
    RowProblem,
    VQARecord,
    clean_cell,
    letters_for,
    strip_letter_prefix,
    yes_no,
)


def _norm(text) -> str:
    """Loose form for matching an answer text to an option: lowercase, no punctuation/space."""
    return re.sub(r"[\W_]+", "", clean_cell(text).lower())


def letter_of_option(answer, options: dict) -> str:
    """The letter whose option text equals ``answer`` (exact after cleaning, then loose)."""
    a = clean_cell(answer)
    for L, t in options.items():
        if t == a:
            return L
    hits = [L for L, t in options.items() if _norm(t) == _norm(a)]
    if len(hits) == 1:
        return hits[0]
    raise RowProblem("unknown answer letter", f"answer {a!r} matches no single option of {list(options.values())}")


def one_letter(value) -> str | None:
    """'B' / ' b ' / 'B:Focal' / '<answer> B </answer>' -> 'B'; None when it is not a letter."""
    t = clean_cell(value)
    m = re.fullmatch(r"(?is)<answer>\s*(.*?)\s*</answer>", t)
    if m:
        t = m.group(1)
    m = re.match(r"^\(?([A-Ja-j])\)?(?:\s*[:).]|\s*$)", t)
    return m.group(1).upper() if m else None


# ---------------------------------------------------------------------------------------------
# PMC-VQA (§1): v1 = 8 columns with Answer_label; v2 = 10 columns, Answer is the letter.
# ---------------------------------------------------------------------------------------------

def _col_key(name: str) -> str:
    return re.sub(r"[\s_]+", "", str(name)).lower().replace("anwser", "answer")


_PMC_V2_ORDER = ["index", "figurepath", "caption", "question", "choicea", "choiceb", "choicec",
                 "choiced", "answer", "split"]
_PMC_NAMES = {"figurepath": "Figure_path", "question": "Question", "answer": "Answer", "answerlabel": "Answer_label",
              "choicea": "Choice A", "choiceb": "Choice B"}


def iter_pmc_vqa(path, split=None, image_root=None, allow_outside_root=False, **_):
    if os.path.isdir(path):
        if split is None:
            found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.csv")))
            raise ValueError(f"pmc_vqa: {path} is a directory; pass split= one of the CSV stems {found}")
        path = os.path.join(path, f"{split}.csv")
    header, rows = read_csv(path)
    cols = {_col_key(c): c for c in header}
    v1 = "answerlabel" in cols
    if not v1 and not {"figurepath", "question", "answer"} <= set(cols) and len(header) == 10:
        cols = dict(zip(_PMC_V2_ORDER, header))          # v2 header spelled differently: go by position
    need = ("figurepath", "question", "answerlabel", "choicea", "choiceb") if v1 else \
        ("figurepath", "question", "answer", "choicea", "choiceb")
    require_columns(path, header, [_PMC_NAMES[k] for k in need if k not in cols],
                    f"a PMC-VQA {'v1' if v1 else 'v2'} CSV")
    root = os.path.dirname(os.path.abspath(path))
    folders = [os.path.join(root, d) for d in (("images", "figures") if v1 else ("figures", "images"))] + [root]
    roots = ImageRoots.of(image_root, folders, allow_outside_root)
    stem = os.path.splitext(os.path.basename(path))[0]
    for i, row in enumerate(rows):
        yield path, i, partial(_pmc_row, row, cols, v1, roots, stem, i)


def _pmc_row(row, cols, v1, roots, stem, i):
    cells = {k: clean_cell(row.get(c)) for k, c in cols.items()}      # each cell cleaned once
    get = lambda k: cells.get(k, "")  # noqa: E731
    options = {L: strip_letter_prefix(get(f"choice{L.lower()}")) for L in "ABCD"}
    options = {L: t for L, t in options.items() if t}
    if v1:
        letter, answer_text = one_letter(get("answerlabel")), get("answer")
    else:
        letter = one_letter(get("answer"))
        letter = letter or (letter_of_option(get("answer"), options) if get("answer") else None)
        answer_text = options.get(letter)
    extra = {"figure_path": get("figurepath")}
    if get("caption"):
        extra["caption"] = get("caption")
    if get("split"):
        extra["split"] = get("split")
    if v1 and letter in options and _norm(options[letter]) != _norm(answer_text):
        extra["answer_mismatch"] = True       # 31 train rows: the label decides (docs/FORMATS.md)
    rid = get("index") or str(i)
    return VQARecord(
        id=f"pmc_vqa/{stem}/{rid}", images=[roots.resolve(get("figurepath"))], question=get("question"),
        options=options, answer_letter=letter, answer_text=answer_text or options.get(letter),
        answer_type="mc", dataset="PMC-VQA", extra=extra,
    )


# ---------------------------------------------------------------------------------------------
# OmniMedVQA (§2): QA_information/<access>/<Dataset>.json, gt_answer is the option text.
# ---------------------------------------------------------------------------------------------

_ACCESS = {"open": ["Open-access"], "restricted": ["Restricted-access"], "all": ["Open-access", "Restricted-access"]}


def _omni_root(path: str) -> str:
    p = os.path.abspath(path)
    while True:
        if os.path.isdir(os.path.join(p, "QA_information")):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            raise FileNotFoundError(f"omnimedvqa: no QA_information/ folder at or above {path}")
        p = parent


def iter_omnimedvqa(path, split=None, image_root=None, access="open", subsets=None, allow_outside_root=False, **_):
    if access not in _ACCESS:
        raise ValueError(f"omnimedvqa: access must be one of {list(_ACCESS)}, got {access!r}")
    root = _omni_root(path)
    if os.path.isfile(path):
        files = [path]
    else:
        files = [f for a in _ACCESS[access]
                 for f in sorted(glob.glob(os.path.join(root, "QA_information", a, "*.json")))]
    if subsets is not None:
        files = [f for f in files if os.path.splitext(os.path.basename(f))[0] in set(subsets)]
    if not files:
        raise FileNotFoundError(f"omnimedvqa: no QA JSON files under {root}/QA_information for access={access!r}")
    roots = ImageRoots.of(image_root, [root], allow_outside_root)
    for f in unique_files(files):
        acc = os.path.basename(os.path.dirname(f))
        rows = read_json_list(f)
        require_json_keys(f, rows, ["question", "gt_answer", "image_path"], "an OmniMedVQA QA file")
        for i, raw in enumerate(rows):
            yield f, i, partial(_omni_row, raw, roots, acc, f, i)


def _omni_row(raw, roots, access, file, i):
    if not isinstance(raw, dict):
        raise RowProblem("not a JSON object", type(raw).__name__)
    options = {L: clean_cell(raw[f"option_{L}"]) for L in LETTERS if clean_cell(raw.get(f"option_{L}"))}
    stem = os.path.splitext(os.path.basename(file))[0]
    return VQARecord(
        id=str(raw.get("question_id") or f"{stem}/{i}"),
        images=[roots.resolve(raw.get("image_path"))],
        question=clean_cell(raw.get("question")), options=options,
        answer_letter=letter_of_option(raw.get("gt_answer"), options), answer_text=clean_cell(raw.get("gt_answer")),
        answer_type="mc",
        modality=clean_cell(raw.get("modality_type", raw.get("modality"))),   # one file says `modality`
        question_type=clean_cell(raw.get("question_type")),
        dataset=clean_cell(raw.get("dataset")) or stem, extra={"access": access},
    )


# ---------------------------------------------------------------------------------------------
# Med-R1 Splits (§3a): {"image","problem","solution"}; options inline "A)x, B)y".
# ---------------------------------------------------------------------------------------------

_OPT_SPLIT = re.compile(r", (?=[B-J]\))")


def split_inline_options(problem: str) -> tuple[str, dict]:
    """'Q? A)Yes., B)No' -> ('Q?', {'A': 'Yes.', 'B': 'No'}). Commas inside options are kept.

    Tries each 'A)' that starts a word, last first, and keeps the first whose tail splits into
    consecutive letters A, B, C, ... on ', X)'.
    """
    starts = [m.start(1) for m in re.finditer(r"(?:^|\s)(A\))", problem)]
    for pos in reversed(starts):
        parts = _OPT_SPLIT.split(problem[pos:])
        if len(parts) >= 2 and all(p.startswith(L + ")") for L, p in zip(LETTERS, parts)):
            return problem[:pos].strip(), {L: p[2:].strip() for L, p in zip(LETTERS, parts)}
    raise RowProblem("cannot parse options", f"no 'A)..., B)...' list in {problem[-120:]!r}")


def _image_root_for(json_file: str, first_part: str) -> str:
    """Closest ancestor of the JSON file holding ``first_part`` (e.g. 'Images'); else its folder."""
    p = os.path.dirname(os.path.abspath(json_file))
    for _ in range(6):
        if os.path.exists(os.path.join(p, first_part)):
            return p
        p = os.path.dirname(p)
    return os.path.dirname(os.path.abspath(json_file))


def iter_med_r1(path, split=None, image_root=None, allow_outside_root=False, **_):
    for f in pick_files(path, "*.json", split, "med_r1"):
        rows = read_json_list(f)
        require_json_keys(f, rows, ["image", "problem", "solution"], "a Med-R1 split file")
        name = re.sub(r"_(train|test)$", "", os.path.splitext(os.path.basename(f))[0])
        by_type = "question_type" in os.path.abspath(f).split(os.sep)
        first = str(rows[0].get("image", "")).split("/")[0] if rows and isinstance(rows[0], dict) else ""
        roots = ImageRoots.of(image_root, [_image_root_for(f, first)], allow_outside_root)
        for i, raw in enumerate(rows):
            yield f, i, partial(_med_r1_row, raw, roots, name, by_type, f, i)


def _med_r1_row(raw, roots, name, by_type, file, i):
    if not isinstance(raw, dict):
        raise RowProblem("not a JSON object", type(raw).__name__)
    question, options = split_inline_options(clean_cell(raw.get("problem")))
    letter = one_letter(raw.get("solution"))
    return VQARecord(
        id=f"med_r1/{os.path.basename(file)}/{i}", images=[roots.resolve(raw.get("image"))],
        question=question, options=options, answer_letter=letter, answer_text=options.get(letter),
        answer_type="mc", modality="" if by_type else name, question_type=name if by_type else "",
        dataset="OmniMedVQA", extra={"source_file": os.path.basename(file)},
    )


# ---------------------------------------------------------------------------------------------
# MedVLM-R1 / HuatuoGPT-Vision evaluation JSON (§3b): options list, answer = option text.
# ---------------------------------------------------------------------------------------------

def iter_medvlm_r1(path, split=None, image_root=None, allow_outside_root=False, **_):
    for f in pick_files(path, "*.json", None, "medvlm_r1"):
        roots = ImageRoots.of(image_root, [os.path.dirname(os.path.abspath(f))], allow_outside_root)
        rows = read_json_list(f)
        require_json_keys(f, rows, [("question", "problem"), ("image", "images"), ("answer", "solution")],
                          "a MedVLM-R1 / HuatuoGPT-Vision eval file")
        for i, raw in enumerate(rows):
            yield f, i, partial(_medvlm_row, raw, roots, f, i)


def _medvlm_row(raw, roots, file, i):
    if not isinstance(raw, dict):
        raise RowProblem("not a JSON object", type(raw).__name__)
    images = raw.get("image") or raw.get("images") or []
    images = [images] if isinstance(images, (str, bytes)) else list(images)
    opts = raw.get("options") or []
    question = clean_cell(raw.get("question"))
    if not question and raw.get("problem"):                     # "Q\nA) x\nB) y"
        question = clean_cell(re.split(r"\n\s*A\)", str(raw["problem"]))[0])
    options = {L: clean_cell(t) for L, t in zip(letters_for(len(opts)), opts)}
    answer = clean_cell(raw.get("answer"))
    common = dict(id=f"{os.path.basename(file)}/{i}", images=[roots.resolve(p) for p in images], question=question,
                  modality=clean_cell(raw.get("subset")), dataset=clean_cell(raw.get("dataset")),
                  extra={"subset": clean_cell(raw.get("subset"))})
    if not options:                                             # free-text item (HuatuoGPT eval data)
        return VQARecord(**common, answer_text=answer, answer_type="yesno" if yes_no(answer) else "open")
    letter = one_letter(raw.get("solution")) if raw.get("solution") is not None else None
    if answer and letter is None:
        letter = letter_of_option(answer, options)
    elif answer and letter in options and _norm(options[letter]) != _norm(answer):
        raise RowProblem("answer mismatch", f"solution {letter!r} is {options[letter]!r} but answer is {answer!r}")
    return VQARecord(**common, options=options, answer_letter=letter, answer_text=options.get(letter), answer_type="mc")


# ---------------------------------------------------------------------------------------------
# MedXpertQA MM (§7): JSONL, options dict, stem carries "Answer Choices: (A) ..." too.
# ---------------------------------------------------------------------------------------------

def iter_medxpertqa(path, split=None, image_root=None, allow_outside_root=False, **_):
    files = pick_files(path, "*.jsonl", split, "medxpertqa")
    for f in files:
        d = os.path.dirname(os.path.abspath(f))
        folders = [os.path.join(d, "images"), os.path.join(os.path.dirname(d), "images"), d]
        roots = ImageRoots.of(image_root, folders, allow_outside_root)
        lines = read_jsonl(f)                        # [(line index, object or RowProblem)]
        require_json_keys(f, [o for _, o in lines], ["question", "options", "label", "images"], "a MedXpertQA MM file")
        for i, obj in lines:
            yield f, i, partial(_medxpert_row, obj, roots, f, i)


def _medxpert_row(raw, roots, file, i):
    if isinstance(raw, RowProblem):                  # a line that is not UTF-8 or not JSON
        raise raw
    if not isinstance(raw, dict):
        raise RowProblem("not a JSON object", type(raw).__name__)
    full = clean_cell(raw.get("question"))
    stem = clean_cell(re.split(r"\s*Answer Choices:", full)[0])
    opts = raw.get("options") or {}
    options = {str(k).strip().upper(): clean_cell(v) for k, v in sorted(opts.items())}
    images = raw.get("images") or []
    letter = one_letter(raw.get("label"))
    return VQARecord(
        id=clean_cell(raw.get("id")) or f"{os.path.basename(file)}/{i}",
        images=[roots.resolve(p) for p in ([images] if isinstance(images, str) else images)],
        question=stem, options=options, answer_letter=letter, answer_text=options.get(letter), answer_type="mc",
        question_type=clean_cell(raw.get("question_type")), dataset="MedXpertQA",
        extra={k: raw[k] for k in ("medical_task", "body_system") if k in raw} | {"question_full": full},
    )
