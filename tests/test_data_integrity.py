"""Data integrity (issue #15 §1): each observation of the issue, built in a real format, and the promised behaviour.

Files are made in tmp_path by tests/fixtures/integrity.py (nothing large is committed).
"""

import json
import os
import pickle
import threading

import pandas as pd
import pytest
from fixtures.integrity import (
    huge_png,
    image_bytes,
    pmc_csv,
    py2_pickle,
    small_image,
    truncated_jpeg,
    zero_byte,
)
from PIL import Image, ImageFile

from grpo_core.data import (
    BadFileError,
    BadRowError,
    ImageLoadError,
    build_records,
    check_dataset,
    detect_format,
    load_dataset,
    make_prompt_fn,
    record_to_prompt,
)
from grpo_core.data.images import load_image
from grpo_core.data.sources import split_records

# The 13000² PNG is over PIL's own warning threshold (89 M pixels); the loader refuses it itself.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture
def bad_pmc(tmp_path):
    """PMC-VQA v1: rows 0 ok, 1 zero-byte, 2 truncated JPEG, 3 huge PNG (13000²), 4 ok."""
    img = tmp_path / "images"
    small_image(str(img / "ok1.jpg"), 1)
    zero_byte(str(img / "zero.jpg"))
    truncated_jpeg(str(img / "trunc.jpg"))
    huge_png(str(img / "huge.png"))
    small_image(str(img / "ok2.png"), 2)
    rows = [("ok1.jpg", "Q0?", "A"), ("zero.jpg", "Q1?", "A"), ("trunc.jpg", "Q2?", "A"), ("huge.png", "Q3?", "A"),
            ("ok2.png", "Q4?", "A")]
    return pmc_csv(str(tmp_path / "train.csv"), rows)


def skipped(recs):
    return dict(recs.report.skipped)


# ---------------------------------------------------------------------------------------------
# Images: zero-byte, truncated, huge; check levels and the pixel cap
# ---------------------------------------------------------------------------------------------

def test_huge_png_is_tiny_on_disk(tmp_path):
    p = huge_png(str(tmp_path / "h.png"))
    assert os.path.getsize(p) < 200_000
    with Image.open(p) as im:
        assert im.size == (13000, 13000)


def test_check_levels_keep_and_skip_what_they_promise(bad_pmc):
    ex = load_dataset(bad_pmc, skip_bad=True, check_images="exists")
    assert len(ex) == 5 and not ex.report.skipped                     # existence only
    op = load_dataset(bad_pmc, skip_bad=True, check_images="open")
    assert [os.path.basename(r.images[0]) for r in op] == ["ok1.jpg", "trunc.jpg", "ok2.png"]   # truncation passes open
    assert skipped(op) == {"unreadable image": 1, "image too large": 1}
    de = load_dataset(bad_pmc, skip_bad=True, check_images="decode")
    assert [os.path.basename(r.images[0]) for r in de] == ["ok1.jpg", "ok2.png"]
    assert skipped(de) == {"unreadable image": 2, "image too large": 1}
    assert de.report.images_checked == 5


def test_bad_image_errors_name_file_row_and_path(bad_pmc):
    for row, name, what in [(1, "zero.jpg", "empty (0 bytes)"), (2, "trunc.jpg", "image file is truncated"),
                            (3, "huge.png", "13000×13000 = 169,000,000 pixels > max_image_pixels=40,000,000")]:
        recs = load_dataset(bad_pmc, check_images="none")
        (index, e), = check_dataset([recs[row]], "decode").bad
        assert isinstance(e, ImageLoadError) and isinstance(e, BadRowError)
        assert e.file == bad_pmc and e.row == row and e.path.endswith(name)
        assert f"train.csv, row {row}: " in str(e) and what in str(e) and name in str(e)
    with pytest.raises(ImageLoadError, match=r"train\.csv, row 1: unreadable image .*zero\.jpg: empty"):
        load_dataset(bad_pmc, check_images="decode")                  # without skip_bad: the first bad row


def test_one_check_names_every_bad_image_with_progress_lines(bad_pmc, capsys):
    with pytest.raises(ImageLoadError) as ei:
        load_dataset(bad_pmc, check_images="decode", progress=True)
    msg, err = str(ei.value), capsys.readouterr().err
    assert msg.startswith("3 records have unusable images:\n  - ") and ei.value.row == 1
    for row, name in ((1, "zero.jpg"), (2, "trunc.jpg"), (3, "huge.png")):
        assert f"train.csv, row {row}: " in msg and name in msg
    assert err.startswith("checking images (decode): ") and "\r" not in err   # a line, no redraw


def test_the_documented_preflight_is_grpo_trains_check(bad_pmc, monkeypatch):
    """docs/TRAINING.md's pre-flight command, run on a folder with a truncated JPEG, fails as
    `grpo train` would (build_records, check_images: decode); `exists` would have approved it."""
    root = os.path.join(os.path.dirname(__file__), "..")
    doc = open(os.path.join(root, "docs", "TRAINING.md"), encoding="utf-8").read()
    code = doc.split('python -c "\nfrom grpo_core.config', 1)[1].split('"\n```', 1)[0]
    code = "from grpo_core.config" + code
    assert "build_records" in code and "/data/PMC-VQA" in code
    monkeypatch.chdir(root)
    assert len(load_dataset(bad_pmc, check_images="exists", split="train")) == 5
    with pytest.raises(ImageLoadError, match=r"(?s)trunc\.jpg.*image file is truncated"):
        exec(code.replace("/data/PMC-VQA", os.path.dirname(bad_pmc)), {})


def test_pixel_cap_is_checked_before_decoding(bad_pmc, monkeypatch):
    recs = load_dataset(bad_pmc, check_images="none")

    def no_decode(self):
        raise AssertionError("pixels decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    res = check_dataset([recs[3]], "decode")                          # the 13000² PNG
    assert res.bad[0][1].reason == "image too large"
    with pytest.raises(ImageLoadError, match="image too large"):
        record_to_prompt(recs[3])                                     # at run time too


def test_pixel_cap_boundary(tmp_path):
    p10x10 = small_image(str(tmp_path / "a.png"), size=(10, 10))
    p10x11 = small_image(str(tmp_path / "b.png"), size=(10, 11))
    assert load_image(p10x10, max_pixels=100).size == (10, 10)        # 100 pixels: at the cap
    with pytest.raises(ImageLoadError, match="10×11 = 110 pixels > max_image_pixels=100"):
        load_image(p10x11, max_pixels=100)
    assert load_image(p10x11, max_pixels=None).size == (10, 11)


def test_check_dataset_checks_each_distinct_image_once(tmp_path):
    small_image(str(tmp_path / "images" / "a.jpg"))
    zero_byte(str(tmp_path / "images" / "z.jpg"))
    rows = [("a.jpg", f"Q{i}?", "A") for i in range(6)] + [("z.jpg", "Qz?", "A"), ("z.jpg", "Qz2?", "B")]
    recs = load_dataset(pmc_csv(str(tmp_path / "t.csv"), rows), check_images="none")
    res = check_dataset(recs, "decode", threads=3, progress=True)
    assert res.checked == 2
    assert [(i, e.row) for i, e in res.bad] == [(6, 6), (7, 7)]       # record order, each named


def test_load_checks_each_image_once_across_chunks(tmp_path, monkeypatch):
    import grpo_core.data.loaders as L

    for i in range(3):
        small_image(str(tmp_path / "images" / f"{i}.jpg"), i)
    zero_byte(str(tmp_path / "images" / "z.jpg"))
    rows = [(f"{i % 3}.jpg", f"Q{i}?", "A") for i in range(10)] + [("z.jpg", "Qz?", "A")] * 2
    monkeypatch.setattr(L, "CHUNK", 4)                                # 12 rows in 3 chunks
    recs = load_dataset(pmc_csv(str(tmp_path / "t.csv"), rows), check_images="decode", skip_bad=True, progress=True)
    assert recs.report.images_checked == 4 and len(recs) == 10        # 3 good images + 1 bad, each once
    assert skipped(recs) == {"unreadable image": 2}


def test_runtime_skip_pieces(tmp_path):
    """What the trainer's picker uses: an image broken after the pre-check raises one typed error."""
    img = tmp_path / "images"
    for i in range(4):
        small_image(str(img / f"{i}.png"), i)
    path = pmc_csv(str(tmp_path / "train.csv"), [(f"{i}.png", f"Q{i}?", "A") for i in range(4)])
    recs = load_dataset(path, check_images="decode")
    assert len(recs) == 4
    zero_byte(str(img / "1.png"))                                     # broken after the check
    prompt_fn = make_prompt_fn("nothink", max_image_pixels=1000)
    kept, errors = [], []
    for r in recs:                                                    # one record at a time: skip, take the next
        try:
            prompts, shown = prompt_fn([r])
            kept.append(shown[0].source_row)
        except ImageLoadError as e:
            errors.append(e)
    assert kept == [0, 2, 3] and len(errors) == 1
    e = errors[0]
    assert (e.file, e.row, e.reason) == (path, 1, "unreadable image") and e.path.endswith("1.png")
    assert str(e).startswith(f"{path}, row 1: unreadable image") and "data.check_images: decode" in str(e)
    prompts, _ = prompt_fn([recs[0]])
    assert prompts[0].images[0].mode == "RGB" and prompts[0].images[0].size == (12, 10)


# ---------------------------------------------------------------------------------------------
# Paths: ../, absolute, symlinks out of the root; folder loops; each file once
# ---------------------------------------------------------------------------------------------

def test_paths_outside_the_dataset_root(tmp_path):
    ds, outside = tmp_path / "ds", tmp_path / "elsewhere"
    small_image(str(ds / "images" / "ok.jpg"))
    secret = small_image(str(outside / "secret.jpg"))
    os.symlink(secret, ds / "images" / "link.jpg")                    # a link inside pointing out
    rows = [("ok.jpg", "Q0?", "A"), ("../../elsewhere/secret.jpg", "Q1?", "A"), (secret, "Q2?", "A"),
            ("link.jpg", "Q3?", "A")]
    path = pmc_csv(str(ds / "train.csv"), rows)
    with pytest.raises(ImageLoadError) as ei:
        load_dataset(path)
    e = ei.value
    assert (e.row, e.reason) == (1, "image outside dataset root") and "../../elsewhere/secret.jpg" in str(e)
    assert "data.allow_outside_root: true" in str(e) and os.path.realpath(secret) in str(e)
    recs = load_dataset(path, skip_bad=True)
    assert [r.source_row for r in recs] == [0] and skipped(recs) == {"image outside dataset root": 3}
    assert len(load_dataset(path, allow_outside_root=True, check_images="decode")) == 4
    # image_root is a root too: only the absolute path
    assert len(load_dataset(path, image_root=str(outside), skip_bad=True)) == 1


def test_symlink_loops_do_not_repeat_or_hang(tmp_path):
    """Med-R1 Splits with a link to itself and a link to its parent: each file once, no hang."""
    root = tmp_path / "med_r1"
    small_image(str(root / "Images" / "a.png"))
    test_dir = root / "Splits" / "modality" / "test"
    test_dir.mkdir(parents=True)
    rec = {"image": "Images/a.png", "problem": "Which modality? A)CT, B)MR", "solution": "<answer> A </answer>"}
    (test_dir / "CT_test.json").write_text(json.dumps([rec]))
    os.symlink(".", test_dir / "self")                               # glob("**") followed this 40 times
    os.symlink("..", test_dir / "up")                                 # two links: glob never finished
    os.symlink("CT_test.json", test_dir / "CT_copy_test.json")        # the same file under another name
    out = {}
    worker = threading.Thread(target=lambda: out.update(
        recs=load_dataset(str(root / "Splits"), format="med_r1", split="test"),
        fmt=detect_format(str(root / "Splits"))),
        daemon=True)
    worker.start()
    worker.join(timeout=60)                                           # a looping walk fails here instead of hanging CI
    assert not worker.is_alive(), "the folder walk did not finish"
    assert len(out["recs"]) == 1 and out["recs"][0].answer_letter == "A" and out["fmt"] == "med_r1"


def test_omnimedvqa_linked_json_loaded_once(tmp_path):
    root = tmp_path / "OmniMedVQA"
    small_image(str(root / "Images" / "X" / "a.png"))
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "X.json").write_text(json.dumps([{"question_id": "x1", "question": "Q?", "gt_answer": "CT",
                                            "image_path": "Images/X/a.png", "option_A": "CT", "option_B": "MR"}]))
    os.symlink("X.json", qa / "X copy.json")
    assert [r.id for r in load_dataset(str(root))] == ["x1"]


# ---------------------------------------------------------------------------------------------
# Text: non-UTF-8 bytes, binary cells, missing columns
# ---------------------------------------------------------------------------------------------

def test_non_utf8_csv_row_is_named_and_skippable(tmp_path):
    small_image(str(tmp_path / "images" / "a.jpg"))
    path = str(tmp_path / "train.csv")
    with open(path, "wb") as f:
        f.write(b"Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
                b"a.jpg,Q0?,Bone,A:Bone,B:Lung,C:Heart,D:Brain,A\n"
                b"a.jpg,Qu\xe9 est-ce?,Bone,A:Bone,B:Lung,C:Heart,D:Brain,A\n"
                b"a.jpg,Q2?,Bone,A:Bone,B:Lung,C:Heart,D:Brain,A\n")
    with pytest.raises(BadRowError, match=r"train\.csv, row 1: invalid UTF-8 \(byte 0xe9 in 'Qu\\xe9 est-ce\?'\)"):
        load_dataset(path)
    recs = load_dataset(path, skip_bad=True)
    assert [r.source_row for r in recs] == [0, 2] and skipped(recs) == {"invalid UTF-8": 1}
    with open(path, "wb") as f:
        f.write(b"Figure_path,Questi\xf3n,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n")
    with pytest.raises(BadFileError, match=r"train\.csv: the header line has invalid UTF-8 bytes"):
        load_dataset(path, skip_bad=True)


def test_non_utf8_json_row_or_byte_offset(tmp_path):
    small_image(str(tmp_path / "imgs" / "xmlab1" / "source.jpg"))
    row = '{"img_name": "xmlab1/source.jpg", "question": "%s", "answer": "Yes", "q_lang": "en", "qid": %d}'
    good, bad = (row % ("Is this a CT?", 1)).encode(), (row % ("Is this a CT", 2)).encode().replace(b"CT", b"CT\xff", 1)
    (tmp_path / "train.json").write_bytes(b"[" + good + b", " + bad + b"]")
    with pytest.raises(BadRowError, match=r"train\.json, row 1: invalid UTF-8 \(byte 0xff"):
        load_dataset(str(tmp_path), format="slake", split="train")
    recs = load_dataset(str(tmp_path), format="slake", split="train", skip_bad=True)
    assert [r.id for r in recs] == ["slake/1"] and skipped(recs) == {"invalid UTF-8": 1}
    (tmp_path / "train.json").write_bytes(b"[" + good + b"\xff]")      # a bad byte outside any string
    with pytest.raises(BadFileError, match=r"train\.json: not valid JSON at byte %d " % (1 + len(good))):
        load_dataset(str(tmp_path), format="slake", split="train", skip_bad=True)


def test_non_utf8_jsonl_line(tmp_path):
    small_image(str(tmp_path / "images" / "a.png"))
    line = {"id": "MM-1", "question": "Q?", "options": {"A": "x", "B": "y"}, "label": "A", "images": ["a.png"]}
    ok = json.dumps(line).encode() + b"\n"
    (tmp_path / "test.jsonl").write_bytes(ok + ok.replace(b"Q?", b"Q\xc3?").replace(b"MM-1", b"MM-2"))
    with pytest.raises(BadRowError, match=r"test\.jsonl, row 1: invalid UTF-8 \(byte 0xc3 at file byte %d\)"
                       % (len(ok) + ok.index(b"Q?") + 1)):
        load_dataset(str(tmp_path / "test.jsonl"))
    assert [r.id for r in load_dataset(str(tmp_path / "test.jsonl"), skip_bad=True)] == ["MM-1"]


def test_binary_parquet_cells_are_decoded_not_repr(tmp_path):
    d = tmp_path / "vqa-rad" / "data"
    d.mkdir(parents=True)
    df = pd.DataFrame({"image": [{"bytes": image_bytes(1), "path": None}] * 3,
                       "question": [b"is there a mass?", "caf\u00e9 sign?".encode(), b"bad \xff cell"],
                       "answer": [b"yes", b"no", b"no"]})
    df.to_parquet(d / "train-00000-of-00001.parquet")
    recs = load_dataset(str(tmp_path / "vqa-rad"), format="hf_parquet", skip_bad=True)
    assert [r.question for r in recs] == ["is there a mass?", "café sign?"]
    assert [r.answer_text for r in recs] == ["yes", "no"] and not any("b'" in r.question for r in recs)
    assert skipped(recs) == {"invalid UTF-8": 1}
    with pytest.raises(BadRowError, match=r"row 2: invalid UTF-8 \(byte 0xff at offset 4 of the bytes cell"):
        load_dataset(str(tmp_path / "vqa-rad"), format="hf_parquet")


def test_binary_pkl_cells_python2_pickle(tmp_path):
    pvqa = tmp_path / "pvqa"
    small_image(str(pvqa / "images" / "train" / "train_0001.jpg"))
    rows = [{b"image": b"train_0001", b"question": b"what is present?", b"answer": b"granuloma"},
            {b"image": b"train_0001", b"question": b"caf\xe9?", b"answer": b"no"},      # Latin-1, not UTF-8
            {b"image": b"train_0001", b"question": "n\u00e9crose?".encode(), b"answer": b"yes"}]
    (pvqa / "qas" / "train").mkdir(parents=True)
    (pvqa / "qas" / "train" / "train_qa.pkl").write_bytes(py2_pickle(rows))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(py2_pickle(rows))                                # what a plain Python 3 load does
    recs = load_dataset(str(tmp_path), format="pathvqa", split="train", allow_pickle=True, skip_bad=True)
    assert [r.question for r in recs] == ["what is present?", "nécrose?"] and recs[0].answer_text == "granuloma"
    assert skipped(recs) == {"invalid UTF-8": 1} and "row 1: invalid UTF-8" in recs.report.examples[0]
    # a Python 3 pickle whose cells are bytes: decoded too, never "b'...'"
    (pvqa / "qas" / "train" / "train_qa.pkl").write_bytes(pickle.dumps([{"image": b"train_0001",
                                                                         "question": b"is it?", "answer": b"yes"}]))
    assert load_dataset(str(tmp_path), format="pathvqa", split="train", allow_pickle=True)[0].question == "is it?"


def test_missing_question_column_is_one_file_error(tmp_path):
    small_image(str(tmp_path / "images" / "a.jpg"))
    header = "Figure_path,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
    path = str(tmp_path / "train.csv")
    with open(path, "w") as f:
        f.write(header + "a.jpg,Bone,A:Bone,B:Lung,C:Heart,D:Brain,A\n" * 3)
    for skip in (False, True):                                        # a file problem is never skipped
        with pytest.raises(BadFileError) as ei:
            load_dataset(path, skip_bad=skip)
        msg = str(ei.value)
        assert msg.startswith(f"{path}: a PMC-VQA v1 CSV needs column 'Question'; columns found: ['Figure_path',")
        assert "'Answer_label']" in msg and "row" not in msg


def test_missing_json_key_is_one_file_error(tmp_path):
    small_image(str(tmp_path / "imgs" / "x" / "source.jpg"))
    (tmp_path / "train.json").write_text(json.dumps([{"img_name": "x/source.jpg", "query": "Q?", "answer": "Yes",
                                                      "q_lang": "en"}] * 2))
    with pytest.raises(BadFileError, match=r"a SLAKE file needs column 'question'; columns found: \['answer', "
                                           r"'img_name', 'q_lang', 'query'\]"):
        load_dataset(str(tmp_path), format="slake", split="train", skip_bad=True)


# ---------------------------------------------------------------------------------------------
# Duplicates: counted at load, merged and kept on one side by the split
# ---------------------------------------------------------------------------------------------

def dup_dataset(tmp_path, n=12):
    """n questions on n images, each row twice; plus question 0 on image 1 (same text, other image)
    and question 1 on image 1 with another answer (same question + image, different answer)."""
    for i in range(n):
        small_image(str(tmp_path / "images" / f"{i}.png"), i)
    rows = [(f"{i}.png", f"Question {i}?", "A") for i in range(n) for _ in range(2)]
    rows += [("1.png", "Question 0?", "A"), ("1.png", "question  1?", "B")]
    return pmc_csv(str(tmp_path / "train.csv"), rows)


def test_duplicates_counted_at_load(tmp_path):
    recs = load_dataset(dup_dataset(tmp_path))
    assert len(recs) == 26 and recs.report.duplicates == 12            # each of the 12 repeats counted once
    assert recs.report.duplicate_examples[0].endswith(
        "train.csv, row 1 repeats " + str(tmp_path / "train.csv") + ", row 0")
    assert "duplicates kept: 12" in recs.report.summary()


@pytest.mark.parametrize("seed", range(5))
def test_split_never_puts_question_and_image_on_both_sides(tmp_path, seed):
    recs = load_dataset(dup_dataset(tmp_path))
    train, held, rep = split_records(recs, eval_size=4, seed=seed)
    key = lambda r: (r.question.lower().replace("  ", " "), os.path.realpath(r.images[0]))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert rep.merged == 12 and rep.conflicting == 1 and rep.groups == 13
    assert len(train) + len(held) == 14 and len(held) <= 4 and rep.held == len(held)
    assert len({(key(r), r.answer_letter) for r in train + held}) == 14   # exact repeats merged, no other loss


def test_build_records_reports_and_drops_eval_source_overlap(tmp_path):
    from grpo_core.config import DataConfig

    train_csv = dup_dataset(tmp_path)
    held_csv = pmc_csv(str(tmp_path / "test.csv"), [("3.png", "QUESTION 3?", "A"), ("5.png", "Question 99?", "A")])
    d = DataConfig(source=train_csv, format="pmc_vqa", eval_source=held_csv, check_images="decode")
    train, held = build_records(d, seed=0)
    assert len(held) == 2 and train.split.dropped_overlap == 1 and train.split.merged == 12
    assert "Question 3?" not in {r.question for r in train}
    assert train.report.images_checked == 12 and held.split is train.split
    d = DataConfig(source=train_csv, format="pmc_vqa", eval_size=4)
    train, held = build_records(d, seed=1)
    assert train.split.summary() == (f"groups 13; merged 12 exact duplicates; 1 groups with differing answers kept "
                                     f"on one side; train {len(train)}, held-out {len(held)}")


def test_unexpected_cell_types_are_named_rows(tmp_path):
    small_image(str(tmp_path / "images" / "a.png"))
    ok = {"id": "MM-1", "question": "Q?", "options": {"A": "x", "B": "y"}, "label": "A", "images": ["a.png"]}
    odd = dict(ok, id="MM-2", options=["x", "y"])                     # a list where a {letter: text} dict belongs
    (tmp_path / "test.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(odd) + "\n")
    with pytest.raises(BadRowError, match=r"test\.jsonl, row 1: cannot read row \(AttributeError: 'list' object"):
        load_dataset(str(tmp_path / "test.jsonl"))
    recs = load_dataset(str(tmp_path / "test.jsonl"), skip_bad=True)
    assert [r.id for r in recs] == ["MM-1"] and skipped(recs) == {"cannot read row": 1}


def test_config_checks_the_new_data_options():
    from grpo_core.config import load_config

    with pytest.raises(ValueError, match=r"data\.check_images='full' is not one of "
                                         r"\('none', 'exists', 'open', 'decode'\)"):
        load_config(None, ["data.check_images=full"])
    with pytest.raises(ValueError, match=r"data\.max_image_pixels must be ≥ 1, got 0"):
        load_config(None, ["data.max_image_pixels=0"])
    cfg = load_config(None, ["data.columns={question: q, answer: a, image: img}", "data.allow_outside_root=true"])
    assert cfg.data.columns == {"question": "q", "answer": "a", "image": "img"} and cfg.data.check_images == "decode"
