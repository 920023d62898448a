"""Annotation formats: official JSON, JSONL, CSV, image folders; bad rows reported; idx; eval sets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from albef.model.data.annotations import EvalSet, PairItem, assign_idx, load_eval_set, load_pairs


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for name in ("a.png", "b.png", "sub/c.jpg"):
        _img(root / name)
    return root


def test_official_train_json_with_bad_rows(tmp_path: Path, images: Path) -> None:
    ann = tmp_path / "ann" / "train.json"
    ann.parent.mkdir()
    rows = [
        {"image": "a.png", "caption": "A red square.", "image_id": "img_a"},
        {"image": "b.png", "caption": "second image", "image_id": 17},
        {"image": "a.png", "caption": "another caption of a", "image_id": "img_a"},
        {"image": "missing.png", "caption": "no file", "image_id": "x"},
        {"image": "b.png", "caption": 42, "image_id": "y"},
        {"image": "b.png"},
        {"caption": "no image"},
        "not an object",
        {"image": "sub/c.jpg", "caption": ["one", 5, "three"]},
    ]
    ann.write_text(json.dumps(rows))
    items, problems = load_pairs([ann], image_root=images)

    assert [(i.image.name, i.caption, i.image_id) for i in items] == [
        ("a.png", "A red square.", "img_a"),
        ("b.png", "second image", "17"),
        ("a.png", "another caption of a", "img_a"),
        ("c.jpg", "one", "sub/c.jpg"),
        ("c.jpg", "three", "sub/c.jpg"),
    ]
    assert all(i.image.is_absolute() and i.image.is_file() for i in items)
    assert items[1].source == f"{ann}:[1]"
    by_source = {p["source"]: p for p in problems}
    assert set(by_source) == {f"{ann}:[{k}]" for k in (3, 4, 5, 6, 7)} | {f"{ann}:[8]/caption[1]"}
    assert by_source[f"{ann}:[3]"]["error"] == "image file not found"
    assert by_source[f"{ann}:[3]"]["path"] == str(images / "missing.png")
    assert "not a string" in by_source[f"{ann}:[4]"]["error"]
    assert "caption" in by_source[f"{ann}:[5]"]["error"]
    assert "image" in by_source[f"{ann}:[6]"]["error"] and by_source[f"{ann}:[6]"]["path"] is None
    assert "not a string" in by_source[f"{ann}:[8]/caption[1]"]["error"]


def test_paths_relative_to_annotation_folder_or_absolute(tmp_path: Path, images: Path) -> None:
    ann = images / "val.json"  # no image_root: relative to the file's folder
    ann.write_text(json.dumps([
        {"image": "a.png", "caption": ["x", "y"]},
        {"image": str(images / "b.png"), "caption": ["z"]},
    ]))  # fmt: skip
    items, problems = load_pairs([ann])
    assert problems == []
    assert [(i.image, i.caption, i.image_id) for i in items] == [
        (images / "a.png", "x", "a.png"),
        (images / "a.png", "y", "a.png"),
        (images / "b.png", "z", str(images / "b.png")),
    ]


def test_folder_of_images_with_caption_files(images: Path) -> None:
    (images / "a.txt").write_text("first caption\n\n  second caption  \n")
    (images / "sub" / "c.txt").write_text("nested\n")
    # b.png has no .txt: skipped for training; a stray .txt without an image is ignored.
    (images / "orphan.txt").write_text("nothing\n")
    items, problems = load_pairs([images])
    assert problems == []
    assert [(i.image.name, i.caption, i.image_id, i.source) for i in items] == [
        ("a.png", "first caption", "a.png", f"{images / 'a.txt'}:1"),
        ("a.png", "second caption", "a.png", f"{images / 'a.txt'}:3"),
        ("c.jpg", "nested", "sub/c.jpg", f"{images / 'sub' / 'c.txt'}:1"),
    ]


def test_csv_with_bad_rows_and_line_numbers(tmp_path: Path, images: Path) -> None:
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "image,caption,image_id\n"
        "a.png,a red thing,A\n"
        '"b.png","a caption, with a comma",\n'
        "gone.png,lost,C\n"
        "a.png,,A\n"
        "a.png,too,many,fields\n"
    )
    items, problems = load_pairs([csv_path], image_root=images)
    assert [(i.image.name, i.caption, i.image_id) for i in items] == [
        ("a.png", "a red thing", "A"),
        ("b.png", "a caption, with a comma", "b.png"),
    ]
    assert items[1].source == f"{csv_path}:3"
    assert [(p["source"], p["error"]) for p in problems] == [
        (f"{csv_path}:4", "image file not found"),
        (f"{csv_path}:5", "missing or empty caption"),
        (f"{csv_path}:6", "row has more fields than the header"),
    ]
    assert problems[0]["path"] == str(images / "gone.png")

    # The column names of the index builder: "file" names the image, "text" the caption.
    aliases = tmp_path / "aliases.csv"
    aliases.write_text("File,Text\na.png,x\n")
    items, problems = load_pairs([aliases], image_root=images)
    assert [(i.image.name, i.caption) for i in items] == [("a.png", "x")] and problems == []
    no_image_col = tmp_path / "captions-only.csv"
    no_image_col.write_text("picture,caption\na.png,x\n")
    items, problems = load_pairs([no_image_col], image_root=images)
    assert items == [] and [(p["source"], p["error"]) for p in problems] == [
        (f"{no_image_col}:2", "missing image")
    ]
    no_column = tmp_path / "bad.csv"
    no_column.write_text("picture,words\na.png,x\n")
    with pytest.raises(ValueError, match="needs an image column"):
        load_pairs([no_column], image_root=images)


def test_jsonl_with_malformed_lines(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"image": "a.png", "caption": "ok one", "image_id": 1}\n'
        "\n"
        "{not json\n"
        '{"image": "b.png", "caption": null}\n'
        '{"image": "sub/c.jpg", "caption": "ok two"}\n'
    )
    items, problems = load_pairs([path], image_root=images)
    assert [(i.caption, i.image_id, i.source) for i in items] == [
        ("ok one", "1", f"{path}:1"),
        ("ok two", "sub/c.jpg", f"{path}:5"),
    ]
    assert [p["source"] for p in problems] == [f"{path}:3", f"{path}:4"]
    assert "not valid JSON" in problems[0]["error"] and "caption" in problems[1]["error"]


def test_several_sources_and_unreadable_ones(tmp_path: Path, images: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text('{"image": "a.png", "caption": "one"}\n')
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"image": "b.png", "caption": "two", "image_id": "b"}]))
    items, problems = load_pairs([a, str(b)], image_root=images)
    assert [i.caption for i in items] == ["one", "two"] and problems == []

    with pytest.raises(ValueError, match="not found"):
        load_pairs([tmp_path / "nope.json"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="a caption file holds no images"):
        load_pairs([tmp_path / "notes.txt"])
    (tmp_path / "pairs.parquet").write_text("x")
    with pytest.raises(ValueError, match="unknown source type"):
        load_pairs([tmp_path / "pairs.parquet"])
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pairs([tmp_path / "broken.json"])
    (tmp_path / "dict.json").write_text('{"image": "a.png"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_pairs([tmp_path / "dict.json"])
    with pytest.raises(ValueError, match="image root"):
        load_pairs([a], image_root=tmp_path / "no-such-root")


def test_assign_idx_contiguous_in_first_seen_order() -> None:
    ids = ["z", "a", "z", "m", "a", "q"]
    items = [PairItem(Path("/x"), "c", i, "s") for i in ids]
    assert assign_idx(items) == [0, 1, 0, 2, 1, 3]
    assert assign_idx([]) == []


def test_load_eval_set_official_layout(
    tmp_path: Path, images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = images / "test.json"
    path.write_text(json.dumps([
        {"image": "b.png", "caption": ["b one", "b two"]},
        {"image": "a.png", "caption": ["a one"]},
        {"image": "sub/c.jpg", "caption": "a single string"},
    ]))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        es = load_eval_set(path)
    assert isinstance(es, EvalSet)
    assert [p.name for p in es.images] == ["b.png", "a.png", "c.jpg"]
    assert es.texts == ["b one", "b two", "a one", "a single string"]  # wrapped, not split into characters
    assert es.img2txt == [[0, 1], [2], [3]]
    assert es.txt2img == [0, 0, 1, 2]
    assert any("issue #72" in r.getMessage() for r in caplog.records)

    sub = es.subset(2)
    assert (
        sub.texts == ["b one", "b two", "a one"] and sub.img2txt == [[0, 1], [2]] and sub.txt2img == [0, 0, 1]
    )

    path.write_text(json.dumps([{"image": "gone.png", "caption": ["x"]}]))
    with pytest.raises(ValueError, match="image file not found"):
        load_eval_set(path)
    path.write_text(json.dumps([{"image": "a.png", "caption": [1, 2]}]))
    with pytest.raises(ValueError, match="list of strings"):
        load_eval_set(path)


def test_load_eval_set_groups_other_formats_by_image_id(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text(
        '{"image": "a.png", "caption": "a1"}\n{"image": "b.png", "caption": "b1"}\n{"image": "a.png", "caption": "a2"}\n'
    )
    es = load_eval_set(path, image_root=images)
    assert es.texts == ["a1", "b1", "a2"] and es.img2txt == [[0, 2], [1]] and es.txt2img == [0, 1, 0]


def test_cli_check_reports_bad_rows(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from albef.cli import main

    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"image": "a.png", "caption": "ok"}, {"image": "zz.png", "caption": "bad"}]))
    assert main(["data", "check", str(ann), "--image-root", str(images)]) == 1
    out = capsys.readouterr().out
    assert "pairs 1" in out and f"{ann}:[1]: image file not found" in out
    assert main(["data", "check", str(tmp_path / "none.csv")]) == 1
    assert "not found" in capsys.readouterr().err
