"""Images of VQA records: where a path may point, how many pixels may be decoded, one typed error.

An image source is a path (str), encoded bytes (HF parquet / ``datasets`` cells), or a PIL image.

Checks (``check_images``), cheapest first; each includes the ones before it:
  - "none":   nothing (e.g. OmniMedVQA restricted-access paths you will remap later)
  - "exists": the path is a regular file (after symlinks)
  - "open":   PIL parses the header (and PNG chunk CRCs), and width·height ≤ ``max_image_pixels``
  - "decode": every pixel decodes. Only this catches a truncated JPEG: its header is intact, and
              ``verify()`` does not read the compressed data.
The pixel cap is checked from the header, before anything is decoded. A 13000×13000 PNG is
0.16 MB on disk and ~0.5 GB once decoded to RGB (more while PIL converts). The default cap,
40 M pixels, is ~100× what Qwen2-VL is fed in the study (~400 k pixels) and above the largest
images of the supported datasets. PIL's own limit (``Image.MAX_IMAGE_PIXELS``, an error above
2 × 89 M pixels) still applies on top of it.

Roots: ``ImageRoots.resolve`` turns a dataset's relative image path into a file path and requires
its real path (symlinks resolved) to lie inside one of the dataset's image folders. ``../`` or an
absolute path that leaves them is an "image outside dataset root" problem unless
``allow_outside_root`` (e.g. an images folder linked from another disk).

Errors: ``ImageLoadError`` (a ``BadRowError``) names the record's file, row and the image path.
``load_image`` / ``record_images`` raise it at run time, and ``check_dataset`` collects it per
record before training. Deviation from a plain ``Image.open(path).convert("RGB")``: nothing is
decoded past the cap. Loaders keep embedded images as bytes, not PIL images: a PIL image decodes
in place, and its pixels would stay cached on the record for the whole run (a PIL image a caller
puts in a record is decoded in place, once).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .record import BadRowError, RowProblem, clean_cell

IMAGE_CHECKS = ("none", "exists", "open", "decode")
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
IMAGE_HINT = ("Fix or remove the image, or check every image before training (data.check_images: decode) "
              "and skip bad rows (data.skip_bad: true)")


class ImageLoadError(BadRowError):
    """An image that cannot be used: missing, undecodable, over the pixel cap, or outside the root."""

    def __init__(self, file: str, row: Any, reason: str, detail: str = "", path: str = ""):
        super().__init__(file, row, reason, detail, hint=IMAGE_HINT)
        self.path = path


class ImageProblem(RowProblem):
    """A RowProblem about one image; the driver turns it into an ImageLoadError."""

    def __init__(self, reason: str, detail: str = "", path: str = ""):
        super().__init__(reason, detail)
        self.path = path

    def error(self, file: str, row: Any) -> ImageLoadError:
        return ImageLoadError(file, row, self.reason, self.detail, self.path)


# ---------------------------------------------------------------------------------------------
# Where a path may point
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _real_dir(folder: str) -> str:
    return os.path.realpath(folder)


def clear_path_cache() -> None:
    """Forget the folders' cached real paths (load_dataset calls it first: links may have changed since)."""
    _real_dir.cache_clear()


def real_path(path: str) -> str:
    """os.path.realpath(path), with each folder's real path cached: one lstat per file, not per part.

    A dataset has ~10⁵ images in a few hundred folders; realpath of each path walks every part.
    """
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    real = os.path.join(_real_dir(folder or "."), name)
    return os.path.realpath(real) if os.path.islink(real) else real


@dataclass(frozen=True)
class ImageRoots:
    """The folders a dataset's relative image paths are looked up in, and must stay inside."""

    folders: tuple                                     # searched in order
    allow_outside: bool = False                        # True: follow ../, absolute paths and links anywhere
    real: tuple = field(default=(), compare=False)     # realpaths of `folders` (filled in __post_init__)

    def __post_init__(self):
        object.__setattr__(self, "real", tuple(os.path.realpath(f) for f in self.folders))   # not cached: may change

    @classmethod
    def of(cls, image_root: str | None, defaults, allow_outside: bool = False) -> "ImageRoots":
        """The user's ``image_root`` if given, else the format's default folders."""
        return cls(tuple([image_root] if image_root else [d for d in defaults if d]), allow_outside)

    def contains(self, path: str) -> bool:
        real = real_path(path)
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.real)

    def resolve(self, rel: Any) -> str:
        """The first existing ``folder/rel`` inside the roots; ImageProblem if it leaves them."""
        rel = clean_cell(os.fspath(rel) if isinstance(rel, os.PathLike) else rel)
        if not rel:
            raise ImageProblem("no image", "empty image path")
        cands = [rel] if os.path.isabs(rel) or not self.folders else [os.path.join(f, rel) for f in self.folders]
        existing = [c for c in cands if os.path.exists(c)]
        if self.allow_outside:
            return (existing or cands)[0]
        inside = [c for c in (existing or cands) if self.contains(c)]
        if not inside:
            where = (f"the dataset's image folders {list(self.folders)}" if self.folders
                     else "any image_root (none given)")
            raise ImageProblem(
                "image outside dataset root",
                f"{rel!r} resolves to {real_path((existing or cands)[0])}, outside {where}; if that is "
                "intended, set data.allow_outside_root: true (load_dataset(..., allow_outside_root=True))",
                path=(existing or cands)[0])
        return inside[0]


# ---------------------------------------------------------------------------------------------
# Opening and decoding under the pixel cap
# ---------------------------------------------------------------------------------------------

def describe(src: Any) -> str:
    """How an image source is named in messages."""
    if isinstance(src, (bytes, bytearray)):
        return f"embedded image ({len(src)} bytes)"
    if isinstance(src, Image.Image):
        return f"in-memory {src.mode} image {src.size[0]}×{src.size[1]}"
    return str(src)


def image_key(src: Any) -> str:
    """Identity of an image: the real path of a file, a hash of bytes or of in-memory pixels."""
    if isinstance(src, (bytes, bytearray)):
        return "sha1:" + hashlib.sha1(src).hexdigest()
    if isinstance(src, Image.Image):
        h = hashlib.sha1(f"{src.mode}{src.size}".encode())
        h.update(src.tobytes())
        return "pixels:" + h.hexdigest()
    return "file:" + real_path(str(src))


def open_image(src: Any, max_pixels: int | None) -> Image.Image:
    """PIL image with only its header read; ImageProblem when missing, unreadable or over the cap."""
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (bytes, bytearray)):
            fp = io.BytesIO(src)
        elif not os.path.isfile(str(src)):
            raise ImageProblem("missing image file", str(src), path=str(src))
        else:
            fp = str(src)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as exc:
            raise ImageProblem("image too large", f"{describe(src)}: {exc}", path=_path_of(src)) from None
        except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad data
            raise ImageProblem("unreadable image", f"{describe(src)}: {_why_unopened(src, exc)}",
                               path=_path_of(src)) from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageProblem("image too large", f"{describe(src)} is {w}×{h} = {w * h:,} pixels > max_image_pixels="
                           f"{max_pixels:,}; downscale the file or raise data.max_image_pixels", path=_path_of(src))
    return img


def _why_unopened(src: Any, exc: Exception) -> str:
    """Why PIL could not open ``src``: empty, not an image format it knows (first bytes), or its error."""
    if isinstance(src, (bytes, bytearray)):
        head = bytes(src[:8])
    else:
        with open(str(src), "rb") as f:
            head = f.read(8)
    if not head:
        return "empty (0 bytes)"
    if isinstance(exc, Image.UnidentifiedImageError):
        return f"not an image format PIL knows (starts with {head!r})"
    return f"{type(exc).__name__}: {exc}"


def _path_of(src: Any) -> str:
    return "" if isinstance(src, (bytes, bytearray, Image.Image)) else str(src)


def decode_image(src: Any, max_pixels: int | None) -> Image.Image:
    """Fully decoded PIL image; ImageProblem on any failure."""
    img = open_image(src, max_pixels)
    try:
        img.load()
        return img
    except Exception as exc:  # noqa: BLE001 - truncated data: OSError; broken streams: SyntaxError, ValueError
        raise ImageProblem("unreadable image", f"{describe(src)}: {type(exc).__name__}: {exc}",
                           path=_path_of(src)) from None


def check_image(src: Any, check: str, max_pixels: int | None) -> None:
    """Raise ImageProblem when ``src`` fails the ``check`` level (see the module docstring)."""
    if check not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check!r}")
    if check == "none":
        return
    if check == "exists":
        if not isinstance(src, (bytes, bytearray, Image.Image)) and not os.path.isfile(str(src)):
            raise ImageProblem("missing image file", str(src), path=str(src))
        return
    if check == "decode":
        img = decode_image(src, max_pixels)
        if img is not src:
            img.close()
        return
    img = open_image(src, max_pixels)
    if img is not src:                       # "open": header + integrity check that decodes nothing
        try:
            img.verify()
        except Exception as exc:  # noqa: BLE001
            raise ImageProblem("unreadable image", f"{describe(src)}: {type(exc).__name__}: {exc}",
                               path=_path_of(src)) from None
        finally:
            img.close()


def load_image(src: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, file: str | None = None,
               row: Any = None) -> Image.Image:
    """RGB PIL image (what ``Prompt.images`` holds); ImageLoadError naming ``file``/``row`` and the path."""
    try:
        img = decode_image(src, max_pixels)
    except ImageProblem as p:
        raise p.error(file or describe(src), row) from None
    return img if img.mode == "RGB" else img.convert("RGB")


def record_images(record, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list:
    """The record's images as RGB PIL images; ImageLoadError names its source file, row and path."""
    file = record.source_file or f"record {record.id!r}"
    return [load_image(src, max_pixels, file, record.source_row) for src in record.images]


# ---------------------------------------------------------------------------------------------
# The pre-check over a whole dataset: each distinct image once, in threads
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageCheckReport:
    checked: int = 0                                   # distinct images checked
    bad: list = field(default_factory=list)            # (record index, ImageLoadError), in record order
    seconds: float = 0.0                               # wall time


def default_threads() -> int:
    """One thread per usable core, at most 32: PIL releases the GIL while it decodes."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, n))


def check_dataset(records, check_images: str = "decode", max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  threads: int | None = None, progress=False, seen: dict | None = None) -> ImageCheckReport:
    """Check every record's images at level ``check_images``; each distinct image is checked once.

    Returns the bad records as (index, ImageLoadError) in record order (a record is named by its
    first bad image); the caller decides whether to raise the first or drop them all. ``seen``
    (image key -> ImageProblem or None) carries results over between calls on parts of one
    dataset, so an image shared by many rows is still checked once. ``progress``: True for a bar
    of this call, or a tqdm-like object (``.update(n)``) shared by several calls.
    """
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
    t0 = time.perf_counter()
    seen = {} if seen is None else seen
    keys = [[_check_key(src) for src in r.images] for r in records]
    unique = {k: src for r, ks in zip(records, keys) for k, src in zip(ks, r.images) if k not in seen}

    def one(key):
        try:
            check_image(unique[key], check_images, max_image_pixels)
            seen[key] = None
        except ImageProblem as p:
            seen[key] = p

    own_bar = progress is True and bool(unique)
    shared = not any(progress is v for v in (True, False, None))       # a tqdm: its bool() and == are its own
    bar = progress_bar(len(unique), f"checking images ({check_images})") if own_bar else (progress if shared else None)
    with ThreadPoolExecutor(threads or default_threads()) as ex:
        for fut in as_completed([ex.submit(one, k) for k in unique]):
            fut.result()
            if bar is not None:
                bar.update(1)
    if own_bar:
        bar.close()
    report = ImageCheckReport(checked=len(unique), seconds=time.perf_counter() - t0)
    for i, (r, ks) in enumerate(zip(records, keys)):
        first = next((seen[k] for k in ks if seen[k] is not None), None)
        if first is not None:
            report.bad.append((i, first.error(r.source_file or f"record {r.id!r}", r.source_row)))
    return report


def _check_key(src: Any) -> str:
    """Identity for the check: image_key (real path, hash of bytes), but a PIL image by object."""
    return f"pil:{id(src)}" if isinstance(src, Image.Image) else image_key(src)


def progress_bar(total: int | None, desc: str):
    from ..progress import bar

    return bar(total, desc, "img")
