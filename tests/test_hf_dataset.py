"""``data.format: hf_dataset``: save_to_disk folders and in-memory datasets.Dataset, through a column mapping.

Tiny datasets are built here with ``datasets.Dataset.from_dict`` (images as PIL, bytes and paths).
"""

import os
import subprocess
import sys

import pytest
from fixtures.integrity import image_bytes, small_image, zero_byte
from PIL import Image

from grpo_core.data import (
    BadFileError,
    BadRowError,
    ImageLoadError,
    build_records,
    detect_format,
    load_dataset,
    load_image,
)

datasets = pytest.importorskip("datasets")

MAP = {"question": "problem", "answer": "solution", "image": "img", "options": "choices"}


def mc_dataset():
    """Three multiple-choice rows: answer as a letter, as option text, and one with bad image bytes."""
    pil = Image.new("RGB", (10, 8), (200, 10, 10))
    return datasets.Dataset.from_dict({
        "img": [pil, pil, pil],
        "problem": ["Which modality?", "Which organ?", "Which plane?"],
        "choices": [["CT", "MRI"], ["Liver", "Lung", "Heart"], ["Axial", "Coronal"]],
        "solution": ["B", "Lung", "A"],
        "qid": ["q0", "q1", "q2"],
    }).cast_column("img", datasets.Image())


def test_saved_dataset_with_column_mapping(tmp_path):
    mc_dataset().save_to_disk(str(tmp_path / "ds"))
    assert detect_format(str(tmp_path / "ds")) == "hf_dataset"
    recs = load_dataset(str(tmp_path / "ds"), columns=dict(MAP, id="qid"), check_images="decode")
    assert [r.id for r in recs] == ["q0", "q1", "q2"]
    assert [r.answer_letter for r in recs] == ["B", "B", "A"]          # a letter, and option text -> its letter
    assert recs[1].options == {"A": "Liver", "B": "Lung", "C": "Heart"} and recs[1].answer_text == "Lung"
    assert isinstance(recs[0].images[0], bytes)                        # kept encoded, decoded per use
    assert load_image(recs[0].images[0]).getpixel((0, 0)) == (200, 10, 10)
    assert recs[0].source_file == str(tmp_path / "ds") and recs[2].source_row == 2


def test_in_memory_dataset_and_datasetdict_split(tmp_path):
    recs = load_dataset(mc_dataset(), columns=MAP)
    assert len(recs) == 3 and recs[0].dataset == "hf_dataset"
    dd = datasets.DatasetDict({"train": mc_dataset(), "test": mc_dataset().select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_dataset(str(tmp_path / "dd"), format="hf_dataset", split="test", columns=MAP)) == 1
    with pytest.raises(ValueError, match=r"holds splits \['train', 'test'\]; pass split="):
        load_dataset(str(tmp_path / "dd"), columns=MAP)
    with pytest.raises(ValueError, match="single Dataset without splits"):
        load_dataset(mc_dataset(), split="train", columns=MAP)


def test_default_column_names_yes_no_and_open_answers():
    ds = datasets.Dataset.from_dict({
        "image": [image_bytes(1), image_bytes(2)], "question": ["Is there a mass?", "Where is it?"],
        "answer": ["Yes", "left lung"]})                               # raw bytes column, no mapping needed
    yes, open_ = load_dataset(ds)
    assert (yes.answer_type, yes.answer_text, yes.options) == ("yesno", "Yes", {})
    assert (open_.answer_type, open_.answer_text) == ("open", "left lung")


def test_list_valued_text_cells_flatten_or_are_refused_naming_the_row(tmp_path):
    """A one-item list is its item; longer / empty lists are bad rows, never "['...']" as text."""
    ds = datasets.Dataset.from_dict({
        "image": [image_bytes(1)] * 3, "question": [["Is there a lesion?"], ["Q1?", "Q2?"], []],
        "answer": [["yes"], ["no"], ["no"]]})
    one = load_dataset(ds.select([0]))[0]
    assert (one.question, one.answer_text) == ("Is there a lesion?", "yes")
    assert one.answer_type == "yesno"
    with pytest.raises(BadRowError, match=r"row 1: list in a text cell \(2 items \['Q1\?', 'Q2\?'"):
        load_dataset(ds)
    recs = load_dataset(ds, skip_bad=True)
    assert [r.source_row for r in recs] == [0]
    assert dict(recs.report.skipped) == {"list in a text cell": 2}
    ds.to_parquet(str(tmp_path / "train.parquet"))                    # parquet lists: numpy arrays
    with pytest.raises(BadRowError, match=r"row 1: list in a text cell \(2 items"):
        load_dataset(str(tmp_path / "train.parquet"), format="hf_parquet")


def test_image_paths_inside_the_saved_folder_and_lists_of_images(tmp_path):
    root = tmp_path / "ds"
    small_image(str(root / "images" / "a.png"), 1)
    small_image(str(root / "images" / "b.png"), 2)
    small_image(str(tmp_path / "outside.png"), 3)
    datasets.Dataset.from_dict({
        "images": [["images/a.png", "images/b.png"], ["../outside.png"]],
        "question": ["Compare the two views?", "Is this normal?"], "answer": ["no", "yes"],
        "options": [{"A": "yes", "B": "no"}, None],
    }).save_to_disk(str(root))
    with pytest.raises(ImageLoadError, match=r"ds, row 1: image outside dataset root .*'\.\./outside\.png'"):
        load_dataset(str(root))
    two, = load_dataset(str(root), skip_bad=True)
    assert [os.path.basename(p) for p in two.images] == ["a.png", "b.png"] and two.answer_letter == "B"
    assert len(load_dataset(str(root), allow_outside_root=True, check_images="decode")) == 2


def test_in_memory_paths_need_an_image_root(tmp_path):
    small_image(str(tmp_path / "a.png"))
    ds = datasets.Dataset.from_dict({"image": ["a.png"], "question": ["Q?"], "answer": ["yes"]})
    with pytest.raises(ImageLoadError, match="outside any image_root"):
        load_dataset(ds)
    assert load_dataset(ds, image_root=str(tmp_path))[0].images[0] == str(tmp_path / "a.png")


def test_bad_image_bytes_and_files_are_named_rows(tmp_path):
    zero = zero_byte(str(tmp_path / "ds" / "z.png"))
    good = image_bytes(1)
    ds = datasets.Dataset.from_dict({"image": [good, b"\x00garbage", good[: len(good) // 2], good],
                                     "question": ["Q0?", "Q1?", "Q2?", "Q3?"], "answer": ["yes"] * 4})
    with pytest.raises(ImageLoadError, match=r"row 1: unreadable image \(embedded image \(8 bytes\): not an image"):
        load_dataset(ds)
    recs = load_dataset(ds, skip_bad=True, check_images="decode")
    assert [r.source_row for r in recs] == [0, 3] and dict(recs.report.skipped) == {"unreadable image": 2}
    ds = datasets.Dataset.from_dict({"image": ["z.png"], "question": ["Q?"], "answer": ["no"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ImageLoadError) as ei:
        load_dataset(str(tmp_path / "ds"), check_images="open")
    assert ei.value.path == zero and ei.value.row == 0 and "empty (0 bytes)" in str(ei.value)


def test_column_mapping_errors_name_the_column_and_list_the_found_ones(tmp_path):
    ds = mc_dataset()
    with pytest.raises(BadFileError, match=r"needs column 'question'; columns found: \['img', 'problem', 'choices', "
                                           r"'solution', 'qid'\]"):
        load_dataset(ds)
    with pytest.raises(BadFileError, match=r"data\.columns\.options needs column 'opts'; columns found"):
        load_dataset(ds, columns=dict(MAP, options="opts"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['question_text'\]; known keys"):
        load_dataset(ds, columns={"question_text": "problem"})
    with pytest.raises(ValueError, match="must be a mapping"):
        load_dataset(ds, columns="problem")
    with pytest.raises(ValueError, match="applies to formats"):
        load_dataset(os.path.join(os.path.dirname(__file__), "fixtures", "pmc_vqa", "test_2.csv"), columns=MAP)
    bad = datasets.Dataset.from_dict({"img": [image_bytes(1)], "problem": ["Q?"],
                                      "choices": [["x", "y"]], "solution": ["z"]})
    with pytest.raises(BadRowError, match=r"row 0: unknown answer letter .*'z' matches no single option"):
        load_dataset(bad, columns=MAP)


def test_build_records_from_config(tmp_path):
    from grpo_core.config import load_config

    mc = mc_dataset()
    datasets.concatenate_datasets([mc] * 4).map(lambda r, i: {"problem": f"{r['problem']} #{i}"}, with_indices=True) \
        .save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(None, [f"data.source={tmp_path / 'ds'}", "data.format=hf_dataset", "data.eval_size=3",
                             "data.columns={question: problem, answer: solution, image: img, options: choices}"])
    train, held = build_records(cfg.data, seed=0)
    # the same image bytes, decoded once
    assert len(train) == 9 and len(held) == 3 and train.report.images_checked == 1
    assert not {r.question for r in train} & {r.question for r in held}


def test_datasets_is_imported_only_by_this_format():
    code = ("import sys; from grpo_core.data import load_dataset; import os; "
            "load_dataset(os.path.join('tests', 'fixtures', 'vqa_rad_hf'), split='train', skip_bad=True); "
            "import grpo_core.trainer, grpo_core.config; print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_med_r1_arrow_rows_with_inline_options():
    ds = datasets.Dataset.from_dict({
        "image": [image_bytes(1), image_bytes(2)],
        "problem": ["Which modality is this? A)CT, B)MRI, C)X-ray, left view", "Is there a tumour?"],
        "solution": ["<answer> C </answer>", "no"]})
    mc, yn = load_dataset(ds, columns={"question": "problem", "answer": "solution"})
    assert mc.question == "Which modality is this?" and mc.answer_letter == "C"
    assert mc.options == {"A": "CT", "B": "MRI", "C": "X-ray, left view"} and mc.answer_text == "X-ray, left view"
    assert (yn.answer_type, yn.options, yn.question) == ("yesno", {}, "Is there a tumour?")
