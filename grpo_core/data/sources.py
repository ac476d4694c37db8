"""Train and held-out records for a ``DataConfig``: the synthetic task, or a dataset on disk.

    train, held = build_records(cfg.data, seed=cfg.run.seed)

- "synthetic": ``train_size`` generated items and ``eval_size`` more from another seed.
- a path: ``load_dataset(source, format, split)``, optionally the first ``limit`` records; the
  held-out records are ``eval_source`` when given, else a seeded random ``eval_size`` of them.
"""

from __future__ import annotations

import torch

from .loaders import load_dataset
from .synthetic import make_synthetic_vqa


def build_records(d, seed: int = 0):
    """(train records, held-out records) for the DataConfig ``d``."""
    if d.source == "synthetic":
        kw = dict(image_size=d.image_size, task=d.synthetic_task, lesion_sigma=d.lesion_sigma,
                  lesion_amplitude=d.lesion_amplitude)
        train = make_synthetic_vqa(d.train_size, seed=seed, **kw)
        held = make_synthetic_vqa(d.eval_size, seed=seed + 1_000_000, **kw)
        return train, held
    records = list(load_dataset(d.source, format=d.format, split=d.split, skip_bad=d.skip_bad))
    if d.limit:
        records = records[: d.limit]
    if d.eval_source:
        held = list(load_dataset(d.eval_source, format=d.format, skip_bad=d.skip_bad))
        return records, held
    if len(records) <= d.eval_size:
        raise ValueError(f"data: {len(records)} records cannot spare data.eval_size={d.eval_size} for held-out eval; "
                         "set data.eval_source or a smaller data.eval_size")
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [records[i] for i in perm[: d.eval_size]]
    train = [records[i] for i in perm[d.eval_size:]]
    return train, held
