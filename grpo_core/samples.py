"""Sample logging: what the policy wrote, beside what it was asked, the gold answer and its rewards.

    rows = train_rows(records, texts, columns, total, advantages, group_size, k=4)   # a GRPO step
    rows = eval_rows(records, result.items, k=8)                                    # an evaluate()
    write_samples("runs/x", step=100, rows=rows)     # appends samples.jsonl, rewrites samples.html

One row (a JSON object per line of ``samples.jsonl``):
    step, split ("train" | "eval"), id, question, options {letter: text}, gold,
    images [paths relative to the run folder], completion,
    rewards {name: value} (train: each reward's unweighted value; eval: accuracy, format_ok),
    total, advantage, group_mean (train only: the weighted reward, its group-relative advantage
    and the mean total of its group of G)

Images: every distinct image is written once as a PNG thumbnail (longest side ≤ 160 px) under
``samples/`` in the run folder, named by a hash of its pixels, and rows point to it by relative
path: the JSONL stays small and the HTML page works wherever the run folder is copied.

The HTML page shows the newest ``MAX_HTML_ROWS`` rows, newest step first; every string from the
data or the model is escaped (``html.escape``): a completion can hold any text, tags included.
Pure functions of their arguments and the files they write; nothing here touches a model.
"""

from __future__ import annotations

import hashlib
import html
import json
import os

from .data.images import load_image

THUMB_PX = 160                 # longest side of an image thumbnail
MAX_HTML_ROWS = 400            # rows shown on samples.html (samples.jsonl keeps every row)


def _gold(rec) -> str:
    return rec.answer_letter if rec.answer_type == "mc" and rec.answer_letter else (rec.answer_text or "")


def _base(rec) -> dict:
    return {"id": rec.id, "question": rec.question, "options": dict(rec.options), "gold": _gold(rec),
            "images": list(rec.images)}


def train_rows(records, texts, columns: dict, total, advantages, group_size: int, k: int = 4) -> list[dict]:
    """Rows of one GRPO step: the first completion of each of the first ``k`` prompts.

    records: the B prompts' records (as shown); texts: the N = B·G completions; columns: reward
    name → (N,) values; total, advantages: (N,). k = 0 gives no rows.
    """
    G, rows = group_size, []
    for b in range(min(k, len(records))):
        i = b * G
        rows.append({**_base(records[b]), "completion": texts[i],
                     "rewards": {n: round(float(c[i]), 4) for n, c in columns.items()},
                     "total": round(float(total[i]), 4), "advantage": round(float(advantages[i]), 4),
                     "group_mean": round(float(total[i: i + G].float().mean()), 4)})
    return rows


def eval_rows(records, items, k: int = 8) -> list[dict]:
    """Rows of an evaluation: records and ``EvalResult.items`` in the same order, the first ``k``."""
    return [{**_base(rec), "completion": it["completion"],
             "rewards": {"accuracy": float(it["accuracy"]), "format_ok": float(it["format_ok"])}}
            for rec, it in list(zip(records, items))[:k]]


def _thumbnail(image, out_dir: str) -> str | None:
    """Save one image (PIL or path) as a PNG thumbnail once; its path relative to ``out_dir``, or
    None when it cannot be read (the row is logged without it: logging never stops a run)."""
    try:
        im = load_image(image).copy()
    except Exception:  # noqa: BLE001 - a bad image is the data checks' business, not the logger's
        return None
    im.thumbnail((THUMB_PX, THUMB_PX))
    name = f"samples/img-{hashlib.sha1(im.tobytes() + str(im.size).encode()).hexdigest()[:16]}.png"
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        im.save(path)
    return name


def write_samples(out_dir: str, step: int, rows: list[dict], split: str = "train") -> str:
    """Append ``rows`` (step, split added; images saved as thumbnails) to ``out_dir/samples.jsonl``
    and rewrite ``out_dir/samples.html`` from the whole file; returns the HTML path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "samples.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            thumbs = [_thumbnail(im, out_dir) for im in r.get("images", [])]
            r = {"step": step, "split": split, **r, "images": [t for t in thumbs if t]}
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return write_html(out_dir, read_samples(path))


def read_samples(path: str) -> list[dict]:
    """Every row of a samples.jsonl (a line cut short by a crash is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


_CSS = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;vertical-align:top;font-size:13px}pre{white-space:pre-wrap;margin:0;max-width:40em}"
        ".ok{background:#e6f4e6}.bad{background:#fbe9e9}img{image-rendering:pixelated}")


def _row_html(r: dict) -> str:
    e = html.escape
    imgs = "".join(f'<img src="{e(p)}" width="{THUMB_PX // 2 * 2}">' for p in r.get("images", []))
    opts = "<br>".join(f"{e(str(k))}) {e(str(v))}" for k, v in r.get("options", {}).items())
    rewards = "<br>".join(f"{e(k)}: {v:g}" for k, v in r.get("rewards", {}).items())
    if "total" in r:
        rewards += (f"<br><b>total {r['total']:g}</b>, group mean {r.get('group_mean', 0):g}, "
                    f"advantage {r.get('advantage', 0):+.3g}")
    good = r.get("rewards", {}).get("accuracy", 0) >= 1
    return (f'<tr class="{"ok" if good else "bad"}"><td>{r["step"]}<br>{e(r["split"])}</td><td>{imgs}</td>'
            f'<td>{e(r.get("question", ""))}<br><small>{opts}</small><br><small>{e(r.get("id", ""))}</small></td>'
            f'<td><pre>{e(r.get("completion", ""))}</pre></td>'
            f'<td>{e(str(r.get("gold", "")))}</td><td>{rewards}</td></tr>')


def write_html(out_dir: str, rows: list[dict]) -> str:
    """samples.html: the newest MAX_HTML_ROWS rows, newest step first; returns its path."""
    shown = sorted(rows[-MAX_HTML_ROWS:], key=lambda r: -r["step"])
    body = "\n".join(_row_html(r) for r in shown)
    page = (f"<!doctype html><meta charset='utf-8'><title>samples: {html.escape(out_dir)}</title><style>{_CSS}</style>"
            f"<h2>Samples of {html.escape(out_dir)}</h2><p>{len(shown)} of {len(rows)} rows (samples.jsonl has all); "
            "green: answer correct. Rewards are unweighted; total is the weighted sum that enters the advantage.</p>"
            "<table><tr><th>step</th><th>image</th><th>question</th><th>completion</th><th>gold</th>"
            "<th>rewards</th></tr>"
            f"\n{body}\n</table>")
    path = os.path.join(out_dir, "samples.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def due(every: int, step: int, evaluated: bool) -> bool:
    """Log samples this step? At each eval, and every ``every`` steps (0 = only at evals)."""
    return evaluated or (every > 0 and step % every == 0)
