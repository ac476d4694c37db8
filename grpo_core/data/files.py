"""Reading dataset files safely: folder walks that cannot loop, UTF-8 text with locations, columns.

- ``walk_files``: every file under a folder whose name matches, each *real* file once. Symlinked
  folders are followed (datasets are often assembled from links), but a folder reached twice, by
  a link to itself or to an ancestor, is not entered again. (``glob("**")`` follows such a link
  until the path is too long: one self-link loads each file 41 times; two hang the walk.)
- Text is read as UTF-8 with ``surrogateescape``: an invalid byte becomes a lone surrogate
  (U+DC80–U+DCFF) inside the string instead of failing the whole file. ``record.clean_cell``
  turns such a string into a row problem, so the row is named (and skippable with
  ``skip_bad``); bytes that break the file's structure are a ``BadFileError`` with a byte offset.
- ``require_columns``: a column every row needs, missing from the whole file, is one file-level
  error that names it and lists the columns found, not the same row error on every row.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os

from .record import BadFileError, RowProblem, bad_byte_at, escape

ENCODING = "utf-8"
ERRORS = "surrogateescape"          # invalid bytes survive as U+DC80–U+DCFF, found later per row


# ---------------------------------------------------------------------------------------------
# Folder walks
# ---------------------------------------------------------------------------------------------

def walk_files(root: str, patterns, max_files: int | None = None) -> list[str]:
    """Sorted files under ``root`` whose name matches ``patterns`` (one or a tuple); each real file once, no loops."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    seen_dirs, seen_files, out = set(), set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:          # reached again through a link: skip it
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(n for n in filenames if any(fnmatch.fnmatch(n, p) for p in patterns)):
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real in seen_files or not os.path.isfile(path):
                continue
            seen_files.add(real)
            out.append(path)
            if max_files is not None and len(out) >= max_files:
                return sorted(out)
    return sorted(out)


def unique_files(paths) -> list[str]:
    """The paths in order with repeats of the same real file (links, ``a/../a``) removed."""
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out


def split_of(file: str) -> str | None:
    """'test' for test.json, CT_test.json, test-0000.parquet, test/x.json; None when unknown."""
    stem = os.path.splitext(os.path.basename(file))[0].lower()
    for s in ("train", "validation", "validate", "val", "test", "dev"):
        if stem == s or stem.endswith("_" + s) or stem.startswith(s + "-") or stem.startswith(s + "_"):
            return "validation" if s in ("validate", "val") else s
    parent = os.path.basename(os.path.dirname(file)).lower()
    return parent if parent in ("train", "test", "validation", "dev") else None


def pick_files(path: str, pattern: str, split: str | None, what: str) -> list[str]:
    """A file path as is, or the files under a directory matching ``pattern`` (and ``split``)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    files = walk_files(path, pattern)
    if split is not None:
        files = [f for f in files if split_of(f) == split]
    if not files:
        raise FileNotFoundError(f"{what}: no {pattern} files under {path}" + (f" for split={split!r}" if split else ""))
    return files


# ---------------------------------------------------------------------------------------------
# Text: UTF-8, invalid bytes kept as surrogates, errors with a location
# ---------------------------------------------------------------------------------------------

def read_text(path: str) -> str:
    with open(path, encoding=ENCODING, errors=ERRORS) as f:
        return f.read()


def byte_offset(text: str, char_pos: int) -> int:
    """Byte offset in the file of character ``char_pos`` of its surrogateescape-decoded text."""
    return len(text[:char_pos].encode(ENCODING, ERRORS))


def read_json(path: str):
    """Parsed JSON; a syntax error (invalid bytes outside strings included) names the byte offset."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadFileError(path, f"not valid JSON at byte {byte_offset(text, exc.pos)} (line {exc.lineno}, "
                           f"column {exc.colno}): {exc.msg}", "check the file is complete and UTF-8 encoded") from None


def read_json_list(path: str) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise BadFileError(path, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def read_jsonl(path: str) -> list:
    """One entry per non-blank line: (line index, parsed object or the RowProblem of that line)."""
    out, offset = [], 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            start, offset = offset, offset + len(raw)
            if raw.strip():
                out.append((i, _json_line(raw, start)))
    return out


def _json_line(raw: bytes, start: int):
    try:
        line = raw.decode(ENCODING)
    except UnicodeDecodeError as exc:
        return RowProblem("invalid UTF-8", f"byte 0x{raw[exc.start]:02x} at file byte {start + exc.start}")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return RowProblem("invalid JSON line", f"{exc.msg} at file byte {start + len(line[:exc.pos].encode())}")


def read_csv(path: str) -> tuple[list[str], list[dict]]:
    """(header, rows as {column: cell}); blank lines skipped; row i is the i-th data row (0-based).

    A row with more or fewer cells than the header keeps its cells and gets ``None`` for the
    missing ones (csv.DictReader's rule); the loader's row checks then decide.
    """
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise BadFileError(path, "empty CSV file (no header line)")
        bad = [h for h in header if bad_byte_at(h) is not None]
        if bad:
            raise BadFileError(path, f"the header line has invalid UTF-8 bytes in {[escape(h) for h in bad]}",
                               "save the file as UTF-8")
        rows = [dict(zip(header, cells + [None] * (len(header) - len(cells)))) for cells in reader if cells]
    return header, rows


# ---------------------------------------------------------------------------------------------
# Required columns
# ---------------------------------------------------------------------------------------------

def require_json_keys(file: str, rows: list, required, what: str) -> None:
    """require_columns for a list of JSON objects: a key counts as present if any row has it.

    Keys may be absent from some rows (OmniMedVQA's option_C/D), so only a key no row has is a
    file-level error; an empty list has no rows to be wrong.
    """
    objs = [r for r in rows if isinstance(r, dict)]
    if objs:
        require_columns(file, sorted({k for r in objs for k in r}), required, what)


def require_columns(file: str, found, required, what: str) -> None:
    """One BadFileError when a required column is absent from the whole file.

    ``required``: names, or tuples of alternative names (any one will do).
    """
    found = list(found)
    missing = [r for r in required if not (set(r) if isinstance(r, tuple) else {r}) & set(found)]
    if missing:
        names = [" or ".join(m) if isinstance(m, tuple) else m for m in missing]
        raise BadFileError(file, f"{what} needs column {', '.join(repr(n) for n in names)}; columns found: {found}",
                           "rename the column, or check that this is the right file and format")
