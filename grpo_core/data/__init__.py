"""Medical VQA data: one record type, loaders for the public formats, prompt templates, and a
synthetic task whose answers can only be read off the image.

    from grpo_core.data import load_dataset, record_to_prompt, make_synthetic_vqa
"""

from .loaders import FORMATS, detect_format, load_dataset
from .record import BadRowError, LoadReport, RecordList, VQARecord, load_image, swap_images, yes_no
from .sources import build_records
from .synthetic import make_synthetic_vqa, oracle_answer
from .templates import (
    TEMPLATES,
    make_prompt_fn,
    record_to_prompt,
    records_to_prompts,
    render_options,
    render_text,
    shuffle_record_options,
)

__all__ = [
    "FORMATS", "TEMPLATES", "BadRowError", "LoadReport", "RecordList", "VQARecord", "build_records", "detect_format",
    "load_dataset", "load_image", "make_prompt_fn", "make_synthetic_vqa", "oracle_answer", "record_to_prompt",
    "records_to_prompts", "render_options", "render_text", "shuffle_record_options", "swap_images", "yes_no",
]
