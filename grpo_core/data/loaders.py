"""``load_dataset``: one entry point for every supported medical VQA format.

    records = load_dataset("data/PMC-VQA", split="test_clean")          # format detected
    records = load_dataset("Slake1.0", format="slake", split="test", lang="en")
    records.report.summary()   # 'loaded 1061; filtered language zh: 1033'

Formats (``format=``): pmc_vqa, omnimedvqa, med_r1, medvlm_r1 (alias huatuo_eval), vqa_rad,
slake, pathvqa, medxpertqa, hf_parquet (any parquet with image/question/answer columns).

Bad rows (missing or unreadable image, empty question, unknown answer letter, empty answer, ...)
raise ``BadRowError`` naming the file and 0-based data row; with ``skip_bad=True`` they are
skipped, counted by reason in ``records.report.skipped`` and logged once as a warning.
``check_images``: "exists" (default: the file is there), "open" (PIL can decode it; slow on big
sets), "none" (no check, e.g. OmniMedVQA restricted-access paths you will remap later).
"""

from __future__ import annotations

import glob
import json
import logging
import os

from .loaders_mc import iter_med_r1, iter_medvlm_r1, iter_medxpertqa, iter_omnimedvqa, iter_pmc_vqa
from .loaders_open import iter_hf_parquet, iter_pathvqa, iter_slake, iter_vqa_rad
from .record import BadRowError, Filtered, LoadReport, RecordList, RowProblem, check_record

log = logging.getLogger("grpo_core.data")

FORMATS = {
    "pmc_vqa": iter_pmc_vqa,
    "omnimedvqa": iter_omnimedvqa,
    "med_r1": iter_med_r1,
    "medvlm_r1": iter_medvlm_r1,
    "huatuo_eval": iter_medvlm_r1,
    "vqa_rad": iter_vqa_rad,
    "slake": iter_slake,
    "pathvqa": iter_pathvqa,
    "medxpertqa": iter_medxpertqa,
    "hf_parquet": iter_hf_parquet,
}


def load_dataset(path, format=None, split=None, skip_bad=False, check_images="exists", limit=None, **kwargs) -> RecordList:
    """Load local files of one medical VQA dataset -> list of VQARecord (a RecordList with .report).

    path: a file or the dataset's folder. format: a name in FORMATS or None to detect it.
    split: the split's name where the format has several (file stem, or a filter for VQA-RAD JSON).
    limit: stop after this many kept records. Other keyword arguments go to the format's loader
    (image_root=, lang= for SLAKE, access=/subsets= for OmniMedVQA, allow_pickle= for PathVQA pkl).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_dataset: {path} does not exist")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"load_dataset: unknown format {fmt!r}; known formats: {sorted(FORMATS)}")
    rows = FORMATS[fmt](path, split=split, **kwargs)
    records, report = RecordList(), LoadReport()
    for file, index, make in rows:
        if limit is not None and len(records) >= limit:
            break
        try:
            rec = make()
            check_record(rec, check_images)
        except Filtered as f:
            report.filtered[f.reason] += 1
            continue
        except RowProblem as p:
            err = BadRowError(file, index, p.reason, p.detail)
            if not skip_bad:
                raise err from p
            report.skipped[p.reason] += 1
            if len(report.examples) < 5:
                report.examples.append(str(err).split(". Fix the row")[0])
            continue
        records.append(rec)
    report.loaded = len(records)
    records.report = report
    if report.skipped:
        log.warning("load_dataset(%s, format=%s): %s; first: %s", path, fmt, report.summary(), report.examples[:2])
    else:
        log.info("load_dataset(%s, format=%s): %s", path, fmt, report.summary())
    return records


# ---------------------------------------------------------------------------------------------
# Format detection from file names, extensions and the first record's keys
# ---------------------------------------------------------------------------------------------

def _json_keys(path: str) -> set:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return set()
    first = data[0] if isinstance(data, list) and data else {}
    return set(first) if isinstance(first, dict) else set()


def _format_of_json_keys(keys: set) -> str | None:
    if keys == {"image", "problem", "solution"}:
        return "med_r1"
    if {"gt_answer", "image_path"} <= keys:
        return "omnimedvqa"
    if {"q_lang", "img_name"} <= keys:
        return "slake"
    if {"image_name", "answer_type"} <= keys or "phrase_type" in keys:
        return "vqa_rad"
    if {"image", "options", "answer"} <= keys:
        return "medvlm_r1"
    return None


def _format_of_file(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.readline().lower()
        return "pmc_vqa" if "figure_path" in head.replace(" ", "_") else None
    if ext == ".jsonl":
        return "medxpertqa"
    if ext == ".pkl":
        return "pathvqa"
    if ext == ".parquet":
        low = os.path.abspath(path).lower().replace("_", "-")
        return "pathvqa" if "path-vqa" in low or "pathvqa" in low else "vqa_rad" if "vqa-rad" in low else "hf_parquet"
    if ext == ".json":
        return _format_of_json_keys(_json_keys(path))
    return None


def detect_format(path: str) -> str:
    """Guess the format of a file or dataset folder; raise with what was seen when unsure."""
    if os.path.isfile(path):
        fmt = _format_of_file(path)
        if fmt is None:
            raise ValueError(f"load_dataset: cannot tell the format of {path}; pass format= one of {sorted(FORMATS)}")
        return fmt
    j = lambda *p: os.path.join(path, *p)  # noqa: E731
    if os.path.isdir(j("QA_information")) or os.path.basename(os.path.abspath(path)) == "QA_information":
        return "omnimedvqa"
    if os.path.isfile(j("VQA_RAD Dataset Public.json")):
        return "vqa_rad"
    if os.path.isdir(j("qas")) or os.path.isdir(j("pvqa", "qas")):
        return "pathvqa"
    if os.path.isdir(j("imgs")) and any(os.path.isfile(j(n)) for n in ("train.json", "test.json", "validation.json")):
        return "slake"
    candidates = sorted(glob.glob(j("*.csv")) + glob.glob(j("*.jsonl")) + glob.glob(j("*", "*.jsonl"))
                        + glob.glob(j("*.parquet")) + glob.glob(j("data", "*.parquet")) + glob.glob(j("*.json"))
                        + glob.glob(j("**", "*.json"), recursive=True))
    found = {f: _format_of_file(f) for f in candidates[:50]}
    kinds = sorted({v for v in found.values() if v})
    if len(kinds) == 1:
        return kinds[0]
    raise ValueError(
        f"load_dataset: cannot tell the format of folder {path} "
        f"({'formats seen: ' + str(kinds) if kinds else 'no known files'}); pass format= one of {sorted(FORMATS)}"
    )
