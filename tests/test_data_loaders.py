"""Loaders on the hand-written fixtures in tests/fixtures/<format>/ (quirks from FORMATS.md)."""

import os
import shutil
import sys

import pytest
from PIL import Image

from grpo_core.data import BadRowError, VQARecord, detect_format, load_dataset, load_image

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def fx(*p):
    return os.path.join(FIX, *p)


def by_id(records):
    return {r.id: r for r in records}


def assert_images_exist(records):
    for r in records:
        for img in r.images:
            assert isinstance(img, (bytes, Image.Image)) or os.path.isfile(img), img


@pytest.mark.parametrize("path, fmt", [
    ("pmc_vqa/train.csv", "pmc_vqa"), ("pmc_vqa/test_2.csv", "pmc_vqa"), ("omnimedvqa/OmniMedVQA", "omnimedvqa"),
    ("omnimedvqa/OmniMedVQA/QA_information/Open-access/ACRIMA.json", "omnimedvqa"),
    ("med_r1/Splits", "med_r1"), ("med_r1/Splits/modality/test/CT_test.json", "med_r1"),
    ("medvlm_r1/MRI_CT_XRAY_300each_dataset.json", "medvlm_r1"), ("vqa_rad", "vqa_rad"),
    ("vqa_rad_hf", "vqa_rad"), ("slake", "slake"), ("slake/train.json", "slake"), ("pathvqa", "pathvqa"),
    ("path-vqa", "pathvqa"), ("medxpertqa/MM/test.jsonl", "medxpertqa"), ("medxpertqa", "medxpertqa"),
])
def test_detect_format(path, fmt):
    assert detect_format(fx(path)) == fmt


def test_detect_format_unknown_says_what_to_do(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="pass format="):
        detect_format(str(tmp_path))


def test_pmc_vqa_v1_quirks_and_bad_rows():
    with pytest.raises(BadRowError, match=r"train\.csv, row 3: unknown answer letter"):
        load_dataset(fx("pmc_vqa/train.csv"))
    recs = load_dataset(fx("pmc_vqa/train.csv"), skip_bad=True)
    rep = recs.report
    assert rep.loaded == len(recs) == 4
    assert dict(rep.skipped) == {"unknown answer letter": 1, "missing image file": 1, "empty question": 1}
    r0, r1, r2 = recs[0], recs[1], recs[2]
    assert r0.options["B"] == "Focal uptake pattern"                 # padded cell, "B:" prefix stripped
    assert r0.answer_letter == "B" and r0.answer_text == "Focal uptake pattern"
    assert r1.options == {"A": "Liver", "B": "Spleen"} and r1.answer_letter == "A"   # missing C/D, padded label
    assert r1.question == "Which organ is shown?"
    assert r2.options["C"] == "MRI" and r2.answer_letter == "C"     # prefix letter "D:" in column C
    assert r2.images[0].endswith("PMC3 F3.png")                       # space in the file name
    assert_images_exist(recs)


def test_pmc_vqa_unreadable_image_only_with_open_check():
    recs = load_dataset(fx("pmc_vqa/train.csv"), skip_bad=True, check_images="open")
    assert recs.report.skipped["unreadable image"] == 1 and len(recs) == 3


def test_pmc_vqa_v2_letter_answers_nbsp_and_text_answer():
    recs = load_dataset(fx("pmc_vqa/test_2.csv"))
    assert [r.answer_letter for r in recs] == ["B", "A", "B"]
    assert recs[0].options["B"] == "Left Anterior Descending"
    assert recs[1].options["A"] == "Axial"                             # NBSP / hair space stripped
    assert recs[2].answer_text == "Right"                               # Answer given as text → letter B
    assert recs[0].extra["caption"].startswith("Coronary") and "figures" in recs[0].images[0]


def test_pmc_vqa_directory_needs_split():
    with pytest.raises(ValueError, match="pass split="):
        load_dataset(fx("pmc_vqa"), format="pmc_vqa")
    assert len(load_dataset(fx("pmc_vqa"), format="pmc_vqa", split="test_2")) == 3


def test_omnimedvqa_open_access():
    recs = by_id(load_dataset(fx("omnimedvqa/OmniMedVQA"), skip_bad=True))
    assert set(recs) == {"Chest CT Scan_0001", "Chest CT Scan_0002", "ACRIMA_0001", "ACRIMA_0002", "BUSI_0001"}
    assert recs["Chest CT Scan_0001"].answer_letter == "C"
    assert recs["Chest CT Scan_0002"].modality == "CT(Computed Tomography)"   # one-off key `modality`
    assert recs["Chest CT Scan_0002"].options == {"A": "Yes.", "B": "No"}       # 2 options, no C/D
    assert recs["ACRIMA_0001"].answer_letter == "B"                            # "no." vs option "No."
    assert recs["ACRIMA_0002"].options["C"] == "3" and recs["ACRIMA_0002"].answer_letter == "C"  # ints
    assert recs["BUSI_0001"].options == {"A": "malignant", "B": "benign"}       # empty option_C dropped
    assert recs["BUSI_0001"].images[0].endswith("benign (1)..JPG")
    assert recs["Chest CT Scan_0001"].question_type == "Modality Recognition"
    assert_images_exist(recs.values())


def test_omnimedvqa_gt_answer_matching_no_option_is_bad_row():
    with pytest.raises(BadRowError, match=r"ACRIMA\.json, row 2: unknown answer letter.*Cataract"):
        load_dataset(fx("omnimedvqa/OmniMedVQA"))


def test_omnimedvqa_restricted_access_images_missing():
    with pytest.raises(BadRowError, match="missing image file"):
        load_dataset(fx("omnimedvqa/OmniMedVQA"), access="restricted")
    recs = load_dataset(fx("omnimedvqa/OmniMedVQA"), access="restricted", check_images="none")
    assert [r.id for r in recs] == ["Hidden_0001"] and recs[0].extra["access"] == "Restricted-access"


def test_med_r1_option_split_and_names():
    recs = load_dataset(fx("med_r1/Splits"), split="test", skip_bad=True)
    assert dict(recs.report.skipped) == {"unknown answer letter": 1, "cannot parse options": 1}
    ct = [r for r in recs if r.modality == "CT"]
    assert ct[0].options == {"A": "Yes.", "B": "No"} and ct[0].answer_letter == "B"
    # commas inside an option, and an "A)" inside the question itself
    assert ct[1].question == "What is the diagnosis of this lung A) lesion?"
    assert ct[1].options["A"] == "Adenocarcinoma, left lower lobe, T2 N0 M0, Stage Ib"
    assert list(ct[1].options) == ["A", "B", "C", "D"]
    qt = [r for r in recs if r.question_type == "Modality Recognition"]
    assert len(qt) == 1 and qt[0].modality == ""
    assert_images_exist(recs)
    train = load_dataset(fx("med_r1/Splits"), split="train")
    assert len(train) == 1 and train[0].answer_letter == "A"


def test_medvlm_r1_and_huatuo_eval():
    recs = load_dataset(fx("medvlm_r1/MRI_CT_XRAY_300each_dataset.json"), skip_bad=True)
    assert recs.report.skipped["answer mismatch"] == 1
    assert recs[0].answer_letter == "C" and recs[0].answer_text == "x_ray." and recs[0].modality == "X-Ray"
    hua = load_dataset(fx("medvlm_r1/medical_multimodel_evaluation_data.json"), format="huatuo_eval")
    assert hua[0].answer_letter == "D"                                 # no solution: letter from answer text
    assert hua[1].answer_type == "open" and hua[1].options == {}       # image given as a bare string
    assert hua[2].question == "Is this a CT image?"                    # question rebuilt from problem
    assert_images_exist(list(recs) + list(hua))


def test_vqa_rad_official_json():
    recs = load_dataset(fx("vqa_rad"), skip_bad=True)
    assert recs.report.skipped["missing image file"] == 1
    r = by_id(recs)
    assert r["vqa_rad/1"].answer_type == "yesno"
    assert r["vqa_rad/2"].answer_text == "2" and r["vqa_rad/2"].answer_type == "open"   # int answer → "2"
    assert r["vqa_rad/2"].question_type == "COUNT" and r["vqa_rad/2"].extra["organ"] == "HEAD"
    assert r["vqa_rad/3"].answer_type == "open" and r["vqa_rad/3"].extra["closed"]      # CLOSED, not yes/no
    test = load_dataset(fx("vqa_rad"), split="test")
    assert [x.id for x in test] == ["vqa_rad/3", "vqa_rad/4"]
    assert test.report.filtered["not in split test"] == 3
    assert_images_exist(recs)


def test_hf_parquet_embedded_bytes_and_corrupt_row():
    with pytest.raises(BadRowError, match=r"train-00000.*row 2: unreadable image"):
        load_dataset(fx("vqa_rad_hf"), split="train")
    recs = load_dataset(fx("vqa_rad_hf"), split="train", skip_bad=True)
    assert len(recs) == 2 and recs.report.skipped["unreadable image"] == 1
    assert isinstance(recs[0].images[0], bytes)                        # kept encoded: decoded per use
    assert load_image(recs[0].images[0]).size == (8, 8)
    assert recs[0].answer_type == "yesno" and recs[1].answer_type == "open" and recs[0].dataset == "VQA-RAD"
    path = load_dataset(fx("path-vqa"))
    assert [r.answer_type for r in path] == ["open", "yesno"] and path[0].dataset == "PathVQA"


def test_slake_language_filter_and_quirks():
    en = load_dataset(fx("slake"), split="train", skip_bad=True)
    assert en.report.filtered["language zh"] == 2 and en.report.skipped["empty answer"] == 1
    r = by_id(en)
    assert r["slake/3"].answer_type == "yesno" and r["slake/3"].modality == "MRI"
    assert r["slake/1700"].answer_type == "open" and r["slake/1700"].extra["closed"]   # CLOSED "Left"
    both = by_id(load_dataset(fx("slake"), split="train", lang=None, skip_bad=True))
    assert both["slake/5000"].answer_type == "yesno"                    # 是的 is a yes
    assert both["slake/4920"].answer_text == "腹部" and both["slake/4920"].answer_type == "open"
    zh = load_dataset(fx("slake"), split="train", lang="zh")
    assert {x.id for x in zh} == {"slake/4920", "slake/5000"}
    with pytest.raises(BadRowError, match=r"train\.json, row 5: empty answer"):
        load_dataset(fx("slake"), split="train")


def test_pathvqa_pickle_needs_explicit_opt_in():
    with pytest.raises(ValueError, match="arbitrary code"):
        load_dataset(fx("pathvqa"), split="train")
    recs = load_dataset(fx("pathvqa"), split="train", allow_pickle=True)
    assert len(recs) == 3 and recs[2].answer_type == "yesno"
    assert recs[0].images[0].endswith(os.path.join("images", "train", "train_0001.jpg"))
    assert_images_exist(recs)


def test_medxpertqa_options_out_of_question():
    recs = load_dataset(fx("medxpertqa/MM/test.jsonl"), skip_bad=True)
    assert recs.report.skipped["unknown answer letter"] == 1
    a, b = recs
    assert "Answer Choices" not in a.question and a.question.endswith("most likely diagnosis?")
    assert list(a.options) == list("ABCDE") and a.answer_letter == "A"
    assert len(b.images) == 2 and b.answer_text == "Normal" and b.question_type == "Understanding"
    assert_images_exist(recs)


def test_limit_and_unknown_format_and_missing_path(tmp_path):
    assert len(load_dataset(fx("pmc_vqa/test_2.csv"), limit=2)) == 2
    with pytest.raises(ValueError, match="unknown format"):
        load_dataset(fx("pmc_vqa/test_2.csv"), format="nope")
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "absent"))


def test_image_root_override(tmp_path):
    shutil.copytree(fx("pmc_vqa", "figures"), tmp_path / "elsewhere")
    shutil.copy(fx("pmc_vqa", "test_2.csv"), tmp_path / "test_2.csv")
    recs = load_dataset(str(tmp_path / "test_2.csv"), image_root=str(tmp_path / "elsewhere"))
    assert all(r.images[0].startswith(str(tmp_path / "elsewhere")) for r in recs)


def test_skip_bad_is_logged(caplog):
    with caplog.at_level("WARNING", logger="grpo_core.data"):
        load_dataset(fx("medxpertqa/MM/test.jsonl"), skip_bad=True)
    assert "skipped unknown answer letter: 1" in caplog.text


def test_records_are_vqarecords():
    assert all(isinstance(r, VQARecord) for r in load_dataset(fx("pmc_vqa/test_2.csv")))


def test_build_records_eval_split_reads_the_official_test_set():
    from grpo_core.config import DataConfig
    from grpo_core.data import build_records

    d = DataConfig(source=fx("vqa_rad"), format="vqa_rad", split="train", eval_source=fx("vqa_rad"),
                   eval_split="test", skip_bad=True)
    train, held = build_records(d)
    assert sorted(r.id for r in held) == ["vqa_rad/3", "vqa_rad/4"]   # test_freeform / test_para rows
    assert {r.extra["phrase_type"] for r in train} <= {"freeform", "para"} and len(train) == 2
    assert train.split.dropped_overlap == 0 and train.report.skipped["missing image file"] == 1


@pytest.mark.parametrize("fmt,missing", [("hf_parquet", "pandas"), ("hf_parquet", "pyarrow"),
                                         ("hf_dataset", "datasets")])
def test_data_extra_missing_names_the_extra(monkeypatch, tmp_path, fmt, missing):
    """datasets / pandas / pyarrow are setup.py's optional 'data' extra: a loader that needs one
    says so, with the install line, instead of a bare ModuleNotFoundError."""
    from grpo_core.data import loaders_hf

    monkeypatch.setitem(sys.modules, missing, None)                  # import → ImportError
    read = loaders_hf.iter_hf_parquet if fmt == "hf_parquet" else loaders_hf.iter_hf_dataset
    with pytest.raises(ImportError, match=rf"{fmt} needs '{missing}'.*pip install -e '\.\[data\]'"):
        list(read(str(tmp_path)))
