"""Medical VQA data: one record type, loaders for the public formats, image checks, prompt templates,
and a synthetic task whose answers can only be read off the image.

    from grpo_core.data import load_dataset, record_to_prompt, make_synthetic_vqa
"""

from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_CHECKS,
    ImageCheckReport,
    ImageLoadError,
    check_dataset,
    load_image,
    record_images,
)
from .loaders import FORMATS, detect_format, load_dataset
from .record import (
    BadFileError,
    BadRowError,
    LoadReport,
    RecordList,
    VQARecord,
    swap_images,
    yes_no,
)
from .sources import SplitReport, build_records, split_records
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
    "DEFAULT_MAX_IMAGE_PIXELS", "FORMATS", "IMAGE_CHECKS", "TEMPLATES", "BadFileError", "BadRowError",
    "ImageCheckReport", "ImageLoadError", "LoadReport", "RecordList", "SplitReport", "VQARecord", "build_records",
    "check_dataset", "detect_format", "load_dataset", "load_image", "make_prompt_fn", "make_synthetic_vqa",
    "oracle_answer", "record_images", "record_to_prompt", "records_to_prompts", "render_options", "render_text",
    "shuffle_record_options", "split_records", "swap_images", "yes_no",
]
