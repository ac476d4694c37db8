"""Hugging Face layouts: parquet files (``hf_parquet``) and ``datasets`` saved with ``save_to_disk``
or passed as a ``datasets.Dataset`` (``hf_dataset``), read through one column mapping.

    load_dataset("runs/my_vqa", format="hf_dataset", split="train",
                 columns={"question": "problem", "answer": "solution", "image": "image"})
    load_dataset(ds, columns={...})                     # a datasets.Dataset / DatasetDict in memory

Column mapping (``columns`` / ``data.columns``): record field -> column name. ``question``,
``answer`` and ``image`` are required; they default to columns of those names (``image`` also
to ``images``). ``options``, ``id``, ``answer_type``, ``modality``, ``question_type`` are used when
mapped, or when a column of that name exists. A mapped or required column that the file lacks is
one file-level error listing the columns found.

Cells: an image is an HF Image cell ``{bytes, path}``, a list of them, a path string (resolved
under the dataset folder or ``image_root``, and kept inside it), a list of paths, or raw bytes.
Image features are read undecoded (``Image(decode=False)``): records keep the encoded bytes, and
the pixels are decoded per use under the pixel cap (images.py). Options are a list (lettered
A, B, …) or a {letter: text} dict; the answer is then a letter or an option's text. Without an
options column, a question that carries its options inline ("Q? A)x, B)y", Med-R1's Arrow data:
``problem`` / ``solution`` = "<answer> B </answer>") with a letter answer is split into stem and
options; other rows without options are yes/no or open questions.

``datasets``, ``pandas`` and ``pyarrow`` (setup.py's ``data`` extra) are imported only here, and
only when these formats are used: the engine runs without them (``_import_extra``).
"""

from __future__ import annotations

import copy
import importlib
import os
from functools import partial

from .files import pick_files, require_columns, split_of
from .images import ImageProblem, ImageRoots
from .loaders_mc import letter_of_option, one_letter, split_inline_options
from .record import ANSWER_TYPES, RowProblem, VQARecord, clean_cell, letters_for, yes_no

COLUMN_KEYS = ("question", "answer", "image", "options", "id", "answer_type", "modality", "question_type")
REQUIRED = ("question", "answer", "image")
_DEFAULT_NAMES = {"image": ("image", "images")}


def _import_extra(module: str, fmt: str):
    """``import module``, or an ImportError naming the format and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"data.format {fmt} needs {module!r}, which is not installed: it comes "
                          "with the optional 'data' extra (pip install -e '.[data]', or "
                          "pip install datasets pandas pyarrow)") from exc


def check_column_mapping(columns) -> dict:
    """``data.columns`` as a dict (None -> {}); ValueError naming what is wrong with it."""
    if columns is None:
        return {}
    if not isinstance(columns, dict):
        raise ValueError(f"data.columns must be a mapping like {{question: q, answer: a, image: img}}, got {columns!r}")
    unknown = sorted(set(columns) - set(COLUMN_KEYS))
    if unknown:
        raise ValueError(f"data.columns: unknown key(s) {unknown}; known keys: {list(COLUMN_KEYS)}")
    bad = {k: v for k, v in columns.items() if not isinstance(v, str) or not v}
    if bad:
        raise ValueError(f"data.columns: each value must be a column name (a non-empty string), got {bad}")
    return dict(columns)


def resolve_columns(columns, found, file: str) -> dict:
    """Record field -> column present in ``found``; one BadFileError for a missing column."""
    mapping, found = check_column_mapping(columns), list(found)
    out = {}
    for key in COLUMN_KEYS:
        if key in mapping:
            require_columns(file, found, [mapping[key]], f"data.columns.{key}")
            out[key] = mapping[key]
            continue
        names = _DEFAULT_NAMES.get(key, (key,))
        hit = next((n for n in names if n in found), None)
        if hit is not None:
            out[key] = hit
        elif key in REQUIRED:
            require_columns(file, found, [names if len(names) > 1 else names[0]],
                            f"a {key} column (map another name with data.columns.{key})")
    return out


# ---------------------------------------------------------------------------------------------
# One mapped row -> VQARecord
# ---------------------------------------------------------------------------------------------

def _image_sources(cell, roots: ImageRoots) -> list:
    """An image cell (HF {bytes, path}, path, bytes, or a list of them) -> paths / bytes."""
    cells = list(cell) if isinstance(cell, (list, tuple)) else [cell]
    out = []
    for c in cells:
        if isinstance(c, dict) and c.get("bytes") is not None:
            out.append(bytes(c["bytes"]))
        elif isinstance(c, dict) and c.get("path"):
            out.append(roots.resolve(c["path"]))
        elif isinstance(c, (bytes, bytearray)):
            out.append(bytes(c))
        elif isinstance(c, str) and c.strip():
            out.append(roots.resolve(c))
        elif c is not None and not isinstance(c, dict):
            raise ImageProblem("no image", f"image cell is {type(c).__name__}, not an HF image, path or bytes")
    if not out:
        raise RowProblem("no image", "the image cell is empty")
    return out


def _options(cell) -> dict:
    """A list -> {A: .., B: ..}; a {letter: text} dict as given; None / empty -> {}."""
    if cell is None:
        return {}
    if isinstance(cell, dict):
        opts = {clean_cell(k).upper(): clean_cell(v) for k, v in cell.items() if clean_cell(v)}
        if not all(len(k) == 1 and k.isalpha() for k in opts):
            return {L: t for L, t in zip(letters_for(len(opts)), opts.values())}
        return dict(sorted(opts.items()))
    if isinstance(cell, (list, tuple)) or hasattr(cell, "tolist"):
        items = [clean_cell(t) for t in (cell.tolist() if hasattr(cell, "tolist") else cell)]
        return dict(zip(letters_for(len(items)), items))
    raise RowProblem("cannot parse options",
                     f"options cell is {type(cell).__name__}; use a list or a letter->text dict")


def _inline_options(question: str, answer: str) -> tuple[str, dict]:
    """Med-R1's Arrow rows: options inside the question ("Q? A)x, B)y") and a letter answer."""
    if one_letter(answer) is None:
        return question, {}
    try:
        return split_inline_options(question)
    except RowProblem:
        return question, {}


def mapped_row(row: dict, cols: dict, roots: ImageRoots, name: str, split: str, i: int) -> VQARecord:
    get = lambda k: clean_cell(row.get(cols[k])) if k in cols else ""  # noqa: E731
    question, answer = get("question"), get("answer")
    if "options" in cols:
        options = _options(row.get(cols["options"]))
    else:
        question, options = _inline_options(question, answer)
    given = get("answer_type").lower()
    if given and given not in ANSWER_TYPES:
        raise RowProblem("unknown answer type", f"{given!r}; use one of {ANSWER_TYPES}")
    common = dict(id=get("id") or f"{name}/{split}/{i}", images=_image_sources(row.get(cols["image"]), roots),
                  question=question, modality=get("modality"), question_type=get("question_type"),
                  dataset=name, extra={"split": split})
    if options:
        letter = one_letter(answer)
        if letter not in options and answer:
            letter = letter_of_option(answer, options)
        return VQARecord(**common, options=options, answer_letter=letter, answer_text=options.get(letter),
                         answer_type=given or "mc")
    kind = given or ("yesno" if yes_no(answer) is not None else "open")
    return VQARecord(**common, answer_text=answer, answer_type=kind)


# ---------------------------------------------------------------------------------------------
# hf_parquet: any parquet with image / question / answer columns (VQA-RAD and PathVQA on HF)
# ---------------------------------------------------------------------------------------------

def iter_hf_parquet(path, split=None, image_root=None, dataset=None, columns=None, allow_outside_root=False, **_):
    pd = _import_extra("pandas", "hf_parquet")
    _import_extra("pyarrow", "hf_parquet")                              # pandas' parquet engine
    for f in pick_files(path, "*.parquet", split, "parquet"):
        df = pd.read_parquet(f)
        cols = resolve_columns(columns, df.columns, f)
        name = dataset or _guess_name(f)
        roots = ImageRoots.of(image_root, [os.path.dirname(os.path.abspath(f))], allow_outside_root)
        sp = split_of(f) or "data"
        for i, row in enumerate(df.to_dict("records")):
            yield f, i, partial(mapped_row, row, cols, roots, name, sp, i)


def _guess_name(file: str) -> str:
    low = os.path.abspath(file).lower().replace("_", "-")
    return "PathVQA" if "path-vqa" in low or "pathvqa" in low else "VQA-RAD" if "vqa-rad" in low else "parquet"


# ---------------------------------------------------------------------------------------------
# hf_dataset: save_to_disk folders and in-memory datasets.Dataset / DatasetDict
# ---------------------------------------------------------------------------------------------

def is_hf_dataset_dir(path: str) -> bool:
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def is_hf_object(obj) -> bool:
    """A datasets.Dataset / DatasetDict, recognised without importing ``datasets``."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def _open_hf(path, split):
    """(datasets.Dataset, name for messages, folder or None) for a save_to_disk folder or an object."""
    datasets = _import_extra("datasets", "hf_dataset")

    if is_hf_object(path):
        obj, where, folder = path, f"<datasets.{type(path).__name__}>", None
    else:
        if not is_hf_dataset_dir(path):
            raise FileNotFoundError(f"hf_dataset: {path} is not a folder written by save_to_disk "
                                    "(no state.json + dataset_info.json, nor dataset_dict.json)")
        obj, where, folder = datasets.load_from_disk(path), path, os.path.abspath(path)
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise ValueError(f"hf_dataset: {where} holds splits {list(obj)}; pass split= one of them (data.split)"
                             + (f", not {split!r}" if split is not None else ""))
        return obj[split], f"{where}[{split}]", folder     # image paths are relative to the dict's folder
    if split is not None:
        raise ValueError(f"hf_dataset: {where} is a single Dataset without splits; remove split={split!r}")
    return obj, where, folder


def _undecoded(feature):
    """The feature with every datasets.Image set to decode=False (lists of images included)."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, list) and feature:
        return [_undecoded(feature[0])]
    if hasattr(feature, "feature"):                     # List / LargeList / Sequence of a feature
        new = copy.copy(feature)
        new.feature = _undecoded(feature.feature)
        return new
    return feature


def iter_hf_dataset(path, split=None, image_root=None, dataset=None, columns=None, allow_outside_root=False, **_):
    ds, where, folder = _open_hf(path, split)
    cols = resolve_columns(columns, ds.column_names, where)
    feat = ds.features[cols["image"]]
    if _undecoded(feat) != feat:
        ds = ds.cast_column(cols["image"], _undecoded(feat))
    roots = ImageRoots.of(image_root, [folder] if folder else [], allow_outside_root)
    name = dataset or (os.path.basename(os.path.normpath(path)) if folder else "hf_dataset")
    sp = split or (str(ds.split) if ds.split is not None else "data")
    for i, row in enumerate(ds):
        yield where, i, partial(mapped_row, row, cols, roots, name, sp, i)
