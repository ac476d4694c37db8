"""``load_dataset``: one entry point for every supported medical VQA format.

    records = load_dataset("data/PMC-VQA", split="test_clean")          # format detected
    records = load_dataset("Slake1.0", format="slake", split="test", lang="en")
    records = load_dataset("data/PMC-VQA", split="train", check_images="decode", skip_bad=True, progress=True)
    records.report.summary()   # 'loaded 1061; filtered language zh: 1033'

Formats (``format=``): pmc_vqa, omnimedvqa, med_r1, medvlm_r1 (alias huatuo_eval), vqa_rad,
slake, pathvqa, medxpertqa, hf_parquet (any parquet; ``columns=`` maps its column names) and
hf_dataset (a ``save_to_disk`` folder, or a ``datasets.Dataset`` passed as ``path``). Layouts
and quirks of each: docs/FORMATS.md.

Two passes, in chunks of rows:
  1. rows -> records: text checks (question, options, answer letter), UTF-8, image paths inside
     the dataset root, and at ``check_images="exists"`` the files' existence;
  2. at "open" / "decode", ``images.check_dataset`` opens or decodes each distinct image once,
     in threads, under the pixel cap (``max_image_pixels``).
A bad row raises ``BadRowError`` (``ImageLoadError`` for an image) naming the file, the 0-based
data row and the path (pass 1 problems of a chunk surface before its image problems); with
``skip_bad=True`` it is skipped, counted by reason in
``records.report.skipped`` and logged once as a warning. A bad *file* (a required column that
no row has, JSON that does not parse) is always a ``BadFileError``. Rows that repeat an earlier
row (same question, options, answer and images) are kept and counted in ``report.duplicates``;
``build_records`` (sources.py) merges them and keeps train and held-out apart.
"""

from __future__ import annotations

import itertools
import logging
import os

from .files import read_json, walk_files
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_CHECKS,
    check_dataset,
    check_image,
    clear_path_cache,
    image_key,
    progress_bar,
)
from .loaders_hf import (
    check_column_mapping,
    is_hf_dataset_dir,
    is_hf_object,
    iter_hf_dataset,
    iter_hf_parquet,
)
from .loaders_mc import iter_med_r1, iter_medvlm_r1, iter_medxpertqa, iter_omnimedvqa, iter_pmc_vqa
from .loaders_open import iter_pathvqa, iter_slake, iter_vqa_rad
from .record import (
    BadFileError,
    BadRowError,
    Filtered,
    LoadReport,
    RecordList,
    RowProblem,
    check_record,
)

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
    "hf_dataset": iter_hf_dataset,
}
COLUMN_FORMATS = ("hf_parquet", "hf_dataset")    # the formats that take a column mapping
CHUNK = 4096                                     # rows per image-check pass (bounds the work past `limit`)


def load_dataset(path, format=None, split=None, skip_bad=False, check_images="exists", limit=None,
                 max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, allow_outside_root=False, columns=None,
                 threads=None, progress=False, **kwargs) -> RecordList:
    """Load local files of one medical VQA dataset -> list of VQARecord (a RecordList with .report).

    path: a file, the dataset's folder, or a ``datasets.Dataset``/``DatasetDict`` (hf_dataset).
    format: a name in FORMATS or None to detect it. split: the split's name where the format has
    several (file stem, a filter for VQA-RAD JSON, a DatasetDict key). limit: stop after this many
    kept records. check_images: one of IMAGE_CHECKS (images.py). max_image_pixels: the pixel cap
    (None = PIL's own limit only). allow_outside_root: let image paths leave the dataset folder.
    columns: hf_parquet / hf_dataset column mapping. threads / progress: the image check's.
    Other keyword arguments go to the format's loader (image_root=, lang= for SLAKE,
    access=/subsets= for OmniMedVQA, allow_pickle= for PathVQA pkl, dataset= for a name).
    """
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"load_dataset: check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
    fmt, path = _format_and_path(path, format)
    clear_path_cache()                               # folders may have been re-linked since the last load
    if columns is not None:
        if fmt not in COLUMN_FORMATS:
            raise ValueError(f"load_dataset: columns= (data.columns) applies to formats {COLUMN_FORMATS}, not {fmt!r}")
        kwargs["columns"] = check_column_mapping(columns)
    rows = FORMATS[fmt](path, split=split, allow_outside_root=allow_outside_root, **kwargs)
    report, records = LoadReport(), RecordList()
    candidates = _row_pass(rows, check_images == "exists", skip_bad, report)
    heavy, seen = check_images in ("open", "decode"), {}      # seen: image key -> problem, across chunks
    bar = progress_bar(None, f"checking images ({check_images})") if heavy and progress else None
    bad_images: list = []                            # without skip_bad: all of them, then raise
    while limit is None or len(records) < limit:
        chunk = list(itertools.islice(candidates, CHUNK if limit is None else min(CHUNK, limit - len(records))))
        if not chunk:
            break
        if heavy:
            chunk = _image_pass(chunk, check_images, max_image_pixels, threads, bar, skip_bad,
                                report, seen, bad_images)
        records.extend(chunk)
    if bar is not None:
        bar.close()
    if bad_images:
        raise every_bad_image(bad_images)
    _count_duplicates(records, report)
    report.loaded = len(records)
    records.report = report
    name = path if isinstance(path, str) else type(path).__name__
    if report.skipped:
        log.warning("load_dataset(%s, format=%s): %s; first: %s", name, fmt, report.summary(), report.examples[:2])
    else:
        log.info("load_dataset(%s, format=%s): %s", name, fmt, report.summary())
    return records


def _format_and_path(path, format):
    """(format name, path as str or the datasets object); clear errors for absent paths / formats."""
    if is_hf_object(path):
        if format not in (None, "hf_dataset"):
            raise ValueError(f"load_dataset: a {type(path).__name__} object loads with "
                             f"format='hf_dataset', not {format!r}")
        return "hf_dataset", path
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_dataset: {path} does not exist")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"load_dataset: unknown format {fmt!r}; known formats: {sorted(FORMATS)}")
    return fmt, path


def _skip(err, skip_bad: bool, report: LoadReport, cause=None) -> None:
    """Raise ``err`` unless skip_bad; else count it by reason and keep the first few messages."""
    if not skip_bad:
        raise err from cause
    report.skipped[err.reason] += 1
    if len(report.examples) < 5:
        report.examples.append(err.short)


def _row_pass(rows, check_exists: bool, skip_bad: bool, report: LoadReport):
    """Records from ``(file, row, make)`` triples, bad rows raised or counted (pass 1)."""
    for file, index, make in rows:
        try:
            rec = make()
            rec.source_file, rec.source_row = str(file), index
            check_record(rec)
            if check_exists:
                for img in rec.images:
                    _exists(img)
        except Filtered as f:
            report.filtered[f.reason] += 1
            continue
        except RowProblem as p:
            _skip(p.error(file, index), skip_bad, report, p)
            continue
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:   # a cell of an unexpected type
            _skip(BadRowError(file, index, "cannot read row", f"{type(exc).__name__}: {exc}"), skip_bad, report, exc)
            continue
        yield rec


def _exists(img) -> None:
    """check_images="exists": a path is a file; embedded bytes must at least parse as an image header."""
    check_image(img, "open" if isinstance(img, (bytes, bytearray)) else "exists", None)


def _image_pass(chunk, check_images, max_image_pixels, threads, bar, skip_bad, report, seen,
                bad_images: list) -> list:
    """The chunk without the records whose images fail (pass 2): counted with skip_bad, else added
    to ``bad_images`` (load_dataset raises once every image is checked, naming them all)."""
    res = check_dataset(chunk, check_images, max_image_pixels, threads, bar, seen)
    report.images_checked += res.checked
    report.check_seconds += res.seconds
    for _, err in res.bad:
        if skip_bad:
            _skip(err, skip_bad, report)
        else:
            bad_images.append(err)
    bad = {i for i, _ in res.bad}
    return [r for i, r in enumerate(chunk) if i not in bad]


MAX_NAMED = 20                                   # bad images listed by name in one error


def every_bad_image(errors: list) -> Exception:
    """The first bad image's error (its type, path, row), its message followed by every bad image
    found (MAX_NAMED at most, then a count), so one run of the check lists what to fix."""
    first = errors[0]
    if len(errors) == 1:
        return first
    named = "\n".join(f"  - {e.short}" for e in errors[:MAX_NAMED])
    more = f"\n  ... and {len(errors) - MAX_NAMED} more" if len(errors) > MAX_NAMED else ""
    first.args = (f"{len(errors)} records have unusable images:\n{named}{more}\n{first.args[0]}",)
    return first


def record_key(rec) -> tuple:
    """Exact-duplicate identity: question, options, answer and images (images by real path / content)."""
    return (" ".join(rec.question.split()).casefold(), tuple(rec.options.items()), rec.answer_letter,
            " ".join((rec.answer_text or "").split()).casefold(), tuple(image_key(i) for i in rec.images))


def _count_duplicates(records, report: LoadReport) -> None:
    first: dict = {}
    for r in records:
        k = record_key(r)
        if k in first:
            report.duplicates += 1
            if len(report.duplicate_examples) < 5:
                o = first[k]
                report.duplicate_examples.append(f"{r.source_file}, row {r.source_row} repeats "
                                                 f"{o.source_file}, row {o.source_row}")
        else:
            first[k] = r


# ---------------------------------------------------------------------------------------------
# Format detection from file names, extensions and the first record's keys
# ---------------------------------------------------------------------------------------------

def _json_keys(path: str) -> set:
    try:
        data = read_json(path)
    except (OSError, BadFileError):
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
    if is_hf_dataset_dir(path):
        return "hf_dataset"
    if os.path.isdir(j("QA_information")) or os.path.basename(os.path.abspath(path)) == "QA_information":
        return "omnimedvqa"
    if os.path.isfile(j("VQA_RAD Dataset Public.json")):
        return "vqa_rad"
    if os.path.isdir(j("qas")) or os.path.isdir(j("pvqa", "qas")):
        return "pathvqa"
    if os.path.isdir(j("imgs")) and any(os.path.isfile(j(n)) for n in ("train.json", "test.json", "validation.json")):
        return "slake"
    found = {f: _format_of_file(f) for f in walk_files(path, ("*.csv", "*.jsonl", "*.parquet", "*.json"), max_files=50)}
    kinds = sorted({v for v in found.values() if v})
    if len(kinds) == 1:
        return kinds[0]
    raise ValueError(
        f"load_dataset: cannot tell the format of folder {path} "
        f"({'formats seen: ' + str(kinds) if kinds else 'no known files'}); pass format= one of {sorted(FORMATS)}"
    )

