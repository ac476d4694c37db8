"""The run's metrics.jsonl: one strict-JSON object per step, each step once, also across resumes.

    {"step": 3, "loss": 0.12, "accuracy": null, ...}        one line per step, steps increasing

Strict JSON: NaN and ±inf (a metric with no value this step, e.g. accuracy without an accuracy
reward, or a diverged loss) are written as ``null``, and ``json.dumps(allow_nan=False)`` refuses
anything else a strict parser would reject. Python's ``json`` would otherwise write the bare
literals ``NaN`` / ``Infinity``, which jq, JavaScript and most non-Python readers reject.

Resume: the lines after the checkpoint's step were logged by steps that the resumed run does
again, so ``MetricsLog(path, start_step=k)`` keeps the lines with step ≤ k and drops the rest
(and a torn last line left by a kill mid-write) before appending; each step then appears once.
``append`` refuses a step that is not after the last logged one, so a caller that forgot to pass
``start_step`` gets an error, not a silently repeated step. Lines are flushed as written: a killed
process loses at most the line it was writing.

``read_metrics`` reads any metrics.jsonl, including ones written before this module (NaN literals,
repeated steps after a resume: the later run's lines win, as the resumed run continued from there).
"""

from __future__ import annotations

import json
import math
import os


def to_strict_json(value, key: str = "metrics"):
    """``value`` with every non-finite float replaced by None and tensors/NumPy scalars unwrapped."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()                         # 0-d tensor / NumPy scalar → Python number
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): to_strict_json(v, f"{key}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"metrics: {key} is a {type(value).__name__}, which JSON cannot hold; log a number or a string")


def _parse_line(line: str):
    """A dict, or None for a line that is not a JSON object (a torn write). NaN/Infinity read as None."""
    try:
        obj = json.loads(line, parse_constant=lambda _: None)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def read_metrics(path: str, missing=None) -> list[dict]:
    """The steps of the run logged in ``path``, each once, in order; ``missing`` replaces null
    (e.g. ``math.nan`` for plotting). When a step number comes again (a resume under the old
    logger), the earlier lines from that step on are dropped: the later run superseded them."""
    rows: list[dict] = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            obj = _parse_line(line) if line.strip() else None
            if obj is None or not isinstance(obj.get("step"), int):
                continue
            while rows and rows[-1]["step"] >= obj["step"]:
                rows.pop()
            rows.append(obj)
    if missing is not None:
        rows = [{k: missing if v is None else v for k, v in r.items()} for r in rows]
    return rows


class MetricsLog:
    """Append-only metrics.jsonl writer (one process writes: rank 0).

    ``start_step``: the step the run starts after (0 for a new run, k when resuming from
    ``ckpt-k``); lines with a greater step are dropped first. None: keep every step. Either way
    the file is rewritten clean (strict JSON, no torn line for the next line to be glued onto).
    """

    def __init__(self, path: str, start_step: int | None = None):
        self.path = path
        self.last_step = -1
        self.truncate_after(math.inf if start_step is None else start_step)

    def truncate_after(self, step: float) -> int:
        """Keep the lines with step ≤ ``step`` (rewritten as strict JSON), atomically; return how
        many lines were dropped."""
        if not os.path.exists(self.path):
            self.last_step = -1
            return 0
        with open(self.path) as f:
            n_lines = sum(1 for line in f if line.strip())
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(to_strict_json(r), allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.last_step = keep[-1]["step"] if keep else -1
        return n_lines - len(keep)

    def append(self, metrics: dict) -> None:
        """Write one step's metrics as one strict-JSON line; ``metrics["step"]`` must be an int
        greater than the last logged step."""
        step = metrics.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"MetricsLog.append: metrics need an integer 'step', got {step!r}")
        if step <= self.last_step:
            raise ValueError(f"MetricsLog.append: step {step} is not after the last logged step {self.last_step} "
                             f"in {self.path}; open the log with MetricsLog(path, start_step=<resume step>)")
        line = json.dumps(to_strict_json(metrics), allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        self.last_step = step
