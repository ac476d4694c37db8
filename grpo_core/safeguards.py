"""What keeps a run's work safe: the run folder, signals, the disk, divergence.

    check_output_dir(path)   one-line error for an output_dir that is a file, cannot be created
                             or is read-only; before the model loads (grpo train) and by the harness
    RunLock(path)            <output_dir>/.lock = {pid, host, started}: a second run in the same
                             folder is refused while the first lives; a lock whose process is dead
                             (same host) is taken over with a note
    StopRequest              SIGINT/SIGTERM → "stop after this step" (the harness saves, then raises
                             Interrupted: exit 130/143); a second signal exits at once (no save)
    checkpoint_estimate()    before each save (the harness): need ≈ the previous checkpoint's size
                             (or an estimate from the parameters) free, else NoSpaceError
                             (no_space); the previous checkpoint is kept
    weight_health(model)     cheap statistics of the weights (one pass): all finite, global RMS
                             and max |w|; ``is_jump(now, good)``: RMS > JUMP_RMS × or max |w| >
                             JUMP_MAX × those of the last good checkpoint (or of the run's start)

Every error here derives from ``RunStopped`` and says in one line what happened, where, and what to
do; the CLI prints it without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import signal
import socket
import sys
import threading

import torch

JUMP_RMS = 10.0        # global RMS of the weights grew > 10× since the last good checkpoint
JUMP_MAX = 100.0       # or the largest |w| grew > 100× (AdamW moves each weight by ≈ lr per step)
LOCK = ".lock"


class RunStopped(RuntimeError):
    """A run ended early on purpose; ``exit_code`` is what the process should exit with."""

    exit_code = 1


class OutputDirError(RunStopped):
    """run.output_dir cannot hold the run (a file, read-only, not creatable)."""

    exit_code = 2


class RunLocked(RunStopped):
    """Another live process holds the run folder."""

    exit_code = 2


class NoSpaceError(RunStopped):
    """Not enough free space for the next checkpoint; the previous one is kept."""

    exit_code = 1


class DivergedError(RunStopped):
    """The weights went non-finite or jumped in magnitude; the last good checkpoint is kept."""

    exit_code = 1


class Interrupted(RunStopped):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---- the run folder ------------------------------------------------------------------------------
def check_output_dir(path: str) -> None:
    """Create ``path`` if needed and make sure the run can write there; OutputDirError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"run.output_dir={path!r} is a file, not a folder; point "
                             "run.output_dir at a folder (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"run.output_dir={path!r} cannot be created: {e.strerror}; point "
                             "run.output_dir at a writable place") from None
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OutputDirError(f"run.output_dir={path!r} is not writable ({e.strerror}); point "
                             "run.output_dir at a writable place") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                          # exists, owned by someone else
    return True


class RunLock:
    """``with RunLock(output_dir):`` one run per folder (module doc). Re-entrant in one process."""

    _held: dict = {}                         # realpath → depth, for this process

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, LOCK)
        self.key, self.enabled, self.notes = os.path.realpath(self.path), enabled, []

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        if self.key in RunLock._held:
            RunLock._held[self.key] += 1
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            RunLock._held[self.key] = 1
            return self
        raise RunLocked(f"{os.path.dirname(self.path)} is being taken by another run at this "
                        "moment; use another run.output_dir")

    def _take_over_if_stale(self, host: str) -> None:
        try:
            with open(self.path) as f:
                other = json.load(f)
        except (OSError, ValueError):
            other = {}                       # torn or unreadable: its writer died mid-write
        pid, where = other.get("pid"), other.get("host")
        folder = os.path.dirname(self.path)
        if isinstance(pid, int) and where == host and _alive(pid):
            raise RunLocked(f"{folder} is in use by another run (pid {pid} on {where}, started "
                            f"{other.get('started', '?')}); wait for it to end, stop it, or use "
                            "another run.output_dir")
        if isinstance(pid, int) and where != host:
            raise RunLocked(f"{folder} is locked by pid {pid} on host {where} (started "
                            f"{other.get('started', '?')}), which this host cannot check; if that "
                            f"run has ended, delete {self.path} and run again")
        self.notes.append(f"took over the lock of a run that is gone (pid {pid} on {where}, "
                          f"started {other.get('started', '?')})")
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def __exit__(self, *exc) -> None:
        if not self.enabled or self.key not in RunLock._held:
            return
        RunLock._held[self.key] -= 1
        if RunLock._held[self.key] == 0:
            del RunLock._held[self.key]
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


# ---- signals -------------------------------------------------------------------------------------
class StopRequest:
    """``with StopRequest() as stop:`` SIGINT/SIGTERM set ``stop.signum`` (the loop finishes its
    step, saves and stops); a second signal exits the process at once with 128 + signum. Outside
    the main thread (signal handlers cannot be installed there) it does nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.signum, self._old = enabled, None, {}

    def __enter__(self) -> "StopRequest":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\ngrpo: {name} again: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\ngrpo: {name}: finishing this step, then saving a checkpoint "
              "(send it again to exit at once, without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


# ---- disk space ----------------------------------------------------------------------------------
def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def checkpoint_estimate(model: torch.nn.Module, previous: str | None) -> int:
    """Bytes the next checkpoint needs: the previous one's size, else weights twice (weights +
    policy/) + AdamW's two fp32 moments per trainable weight; 10 % margin either way."""
    if previous and os.path.isdir(previous):
        return int(_size(previous) * 1.1)
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = sum(2 * 4 * p.numel() for p in params if p.requires_grad)
    return int((2 * weights + moments) * 1.1)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def no_space(output_dir: str, need: int, have: int, previous: str | None) -> NoSpaceError:
    kept = (f"the previous checkpoint {previous} is kept" if previous
            else "no earlier checkpoint exists")
    return NoSpaceError(f"no space left on {output_dir}: need ~{_human(need)}, have "
                        f"{_human(have)}; {kept}. Free space (or move run.output_dir), then run "
                        "the same command to resume")


def is_out_of_space(e: BaseException) -> bool:
    """An error a full disk raises: ENOSPC/EDQUOT, or torch.save's zip writer failing mid-file."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, RuntimeError) and "unexpected pos" in str(e)


# ---- weight health -------------------------------------------------------------------------------
def weight_health(model: torch.nn.Module) -> dict:
    """{"finite", "rms", "max_abs", "bad"}: global statistics of every floating parameter, one pass
    (sums in float64); ``bad`` names the first non-finite tensor."""
    sq, n, mx, bad = 0.0, 0, 0.0, None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            a = p.detach().abs()
            if bad is None and not bool(torch.isfinite(a).all()):
                bad = name
                continue
            sq += float(a.double().pow(2).sum())
            n += p.numel()
            mx = max(mx, float(a.max())) if p.numel() else mx
    return {"finite": bad is None, "rms": math.sqrt(sq / max(n, 1)), "max_abs": mx, "bad": bad}


def is_jump(now: dict, good: dict) -> str | None:
    """Why ``now`` jumped against the last good statistics ``good`` (None: it did not)."""
    if now["rms"] > JUMP_RMS * max(good["rms"], 1e-12):
        return f"the weights' RMS went from {good['rms']:.3g} to {now['rms']:.3g} (> {JUMP_RMS:g}×)"
    if now["max_abs"] > JUMP_MAX * max(good["max_abs"], 1e-12):
        return (f"the largest |weight| went from {good['max_abs']:.3g} to {now['max_abs']:.3g} "
                f"(> {JUMP_MAX:g}×)")
    return None
