"""Train and held-out records for a ``DataConfig``: the synthetic task, or a dataset on disk.

    train, held = build_records(cfg.data, seed=cfg.run.seed, progress=True)
    train.split.summary()   # 'groups 176940; merged 8 exact duplicates; train 174940, held-out 2000'

- "synthetic": ``train_size`` generated items and ``eval_size`` more from another seed.
- a path: ``load_dataset(source, format, split, limit, ...)`` with the config's image checks; the
  held-out records are ``eval_source`` (its ``eval_split``) when given, else a seeded
  ``eval_size`` of them.

The split never shows the model a held-out question in training:
  - a *group* is the records with the same question (case and spacing ignored) and the same
    images (same real file, or same bytes); exact duplicates in a group (same options and answer
    too) are merged into the first one;
  - whole groups go to one side: a seeded permutation of the groups fills the held-out set up to
    ``eval_size`` (a group that does not fit goes to train), so no question + image is on both;
  - with ``eval_source``, training records whose group is also in the held-out set are dropped.
Groups whose copies disagree on the answer are kept (and counted): the data says both.
Deviation from a plain random split of records: the held-out set may hold fewer than
``eval_size`` records when large groups do not fit; the report says how many it holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .loaders import load_dataset, record_key
from .record import RecordList
from .synthetic import make_synthetic_vqa

log = logging.getLogger("grpo_core.data")


@dataclass
class SplitReport:
    """What build_records did to keep train and held-out apart."""

    groups: int = 0                 # distinct (question, images) groups
    merged: int = 0                 # exact duplicates removed (same question, options, answer, images)
    conflicting: int = 0            # groups whose records disagree on options or answer (kept, on one side)
    dropped_overlap: int = 0        # training records dropped: same question + images in eval_source
    train: int = 0
    held: int = 0

    def summary(self) -> str:
        parts = [f"groups {self.groups}"]
        if self.merged:
            parts.append(f"merged {self.merged} exact duplicates")
        if self.conflicting:
            parts.append(f"{self.conflicting} groups with differing answers kept on one side")
        if self.dropped_overlap:
            parts.append(f"dropped {self.dropped_overlap} training records also in the held-out set")
        return "; ".join(parts + [f"train {self.train}, held-out {self.held}"])


def group_key(rec) -> tuple:
    """(question, images): what must not be on both sides of a split."""
    k = record_key(rec)
    return k[0], k[-1]


def _groups(records, rep: SplitReport) -> dict:
    """group key -> its records in order, exact duplicates merged (counted in ``rep``)."""
    groups: dict = {}
    for r in records:
        groups.setdefault(group_key(r), {}).setdefault(record_key(r), r)   # first copy wins
    rep.merged += len(records) - sum(len(g) for g in groups.values())
    rep.conflicting += sum(len(g) > 1 for g in groups.values())
    return {k: list(g.values()) for k, g in groups.items()}


def split_records(records, eval_size: int, seed: int = 0):
    """(train, held-out, SplitReport): whole (question, images) groups to one side, seeded."""
    rep = SplitReport()
    groups = list(_groups(records, rep).values())
    rep.groups = len(groups)
    n = sum(len(g) for g in groups)
    if n <= eval_size:
        raise ValueError(f"data: {n} distinct records cannot spare data.eval_size={eval_size} for held-out eval; "
                         "set data.eval_source or a smaller data.eval_size")
    train, held = [], []
    for i in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist():
        (held if len(held) + len(groups[i]) <= eval_size else train).extend(groups[i])
    rep.train, rep.held = len(train), len(held)
    return train, held, rep


def disjoint_records(train_records, held_records):
    """(train, held-out, SplitReport) from separate sources: train loses what held-out also has."""
    rep = SplitReport()
    held_groups = _groups(held_records, rep)
    train_groups = _groups(train_records, rep)
    train = [r for k, g in train_groups.items() if k not in held_groups for r in g]
    held = [r for g in held_groups.values() for r in g]
    rep.dropped_overlap = sum(len(g) for k, g in train_groups.items() if k in held_groups)
    rep.groups = len(train_groups.keys() | held_groups.keys())
    rep.train, rep.held = len(train), len(held)
    return train, held, rep


def build_records(d, seed: int = 0, progress: bool = False):
    """(train records, held-out records) for the DataConfig ``d``; both carry ``.report`` and ``.split``."""
    if d.source == "synthetic":
        kw = dict(image_size=d.image_size, task=d.synthetic_task, lesion_sigma=d.lesion_sigma,
                  lesion_amplitude=d.lesion_amplitude)
        train = make_synthetic_vqa(d.train_size, seed=seed, **kw)
        held = make_synthetic_vqa(d.eval_size, seed=seed + 1_000_000, **kw)
        return train, held
    kw = dict(format=d.format, skip_bad=d.skip_bad, check_images=d.check_images, max_image_pixels=d.max_image_pixels,
              allow_outside_root=d.allow_outside_root, columns=d.columns, progress=progress)
    records = load_dataset(d.source, split=d.split, limit=d.limit, **kw)
    if d.eval_source:
        held_src = load_dataset(d.eval_source, split=d.eval_split, **kw)
        train, held, rep = disjoint_records(records, held_src)
    else:
        train, held, rep = split_records(records, d.eval_size, seed)
    (log.warning if rep.dropped_overlap else log.info)("build_records(%s): %s", d.source, rep.summary())
    out = RecordList(train, records.report), RecordList(held, held_src.report if d.eval_source else records.report)
    for part in out:
        part.split = rep
    return out
