"""Build sources: every accepted format is read into the same records, bad input fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from albef.index.errors import SourceError
from albef.index.sources import read_sources

from tests.index_fixtures import make_folder, make_image


def test_folder_recursive_sorted_with_sidecar_captions(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "notes.md").write_text("ignored")
    recs = list(read_sources([tmp_path / "imgs"]))
    rel = [Path(r.image).relative_to((tmp_path / "imgs").resolve()).as_posix() for r in recs]
    assert rel == ["part0/img000.png", "part0/img002.png", "part1/img001.png", "part1/img003.png"]
    assert recs[0].captions == ["a picture number 0", "another view of item 0"]
    assert recs[2].captions == []


def test_official_annotation_json_train_and_eval_formats(tmp_path: Path) -> None:
    make_image(tmp_path / "root" / "a.png", 1)
    train = [{"image": "a.png", "caption": "first caption", "image_id": "x_1"},
             {"image": "a.png", "caption": "second caption", "image_id": "x_1"}]
    test = [{"image": "a.png", "caption": ["c1", "c2", "c3"]}]
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train.json").write_text(json.dumps(train))
    (tmp_path / "ann" / "test.json").write_text(json.dumps(test))
    recs = list(read_sources([tmp_path / "ann" / "train.json", tmp_path / "ann" / "test.json"],
                             image_root=tmp_path / "root"))
    assert [r.captions for r in recs] == [["first caption"], ["second caption"], ["c1", "c2", "c3"]]
    assert {r.image for r in recs} == {str((tmp_path / "root" / "a.png").resolve())}
    assert recs[0].metadata == {"image_id": "x_1"} and recs[2].metadata is None


def test_csv_tsv_jsonl_and_caption_lines(tmp_path: Path) -> None:
    make_image(tmp_path / "p.png", 2)
    (tmp_path / "a.csv").write_text('image,caption,metadata\np.png,a red thing,"{""k"": 1}"\n,only a caption,\n')
    (tmp_path / "b.tsv").write_text("path\tmetadata\np.png\t\n")
    (tmp_path / "c.jsonl").write_text('{"image_path": "p.png", "captions": ["x", "y"], "metadata": {"m": [1]}}\n\n'
                                      '{"text": "just text"}\n')
    (tmp_path / "d.txt").write_text("line one\n\n  line two  \n")
    recs = list(read_sources([tmp_path / n for n in ("a.csv", "b.tsv", "c.jsonl", "d.txt")]))
    img = str((tmp_path / "p.png").resolve())
    assert [(r.image, r.captions, r.metadata) for r in recs] == [
        (img, ["a red thing"], {"k": 1}),
        (None, ["only a caption"], None),
        (img, [], None),
        (img, ["x", "y"], {"m": [1]}),
        (None, ["just text"], None),
        (None, ["line one"], None),
        (None, ["line two"], None),
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", "image,metadata\np.png,{not json}\n", "metadata is not valid JSON"),
        ("cols.csv", "foo,bar\n1,2\n", "needs an image column"),
        ("bad.json", "[{]", "not valid JSON"),
        ("obj.json", '{"a": 1}', "expected a list"),
        ("cap.json", '[{"image": "a.png", "caption": 3}]', "caption must be a string or a list"),
        ("bad.jsonl", '{"image": "a.png"}\n[1]\n', "bad.jsonl:2: expected a JSON object"),
        ("x.parquet", "", "unknown source type"),
    ],
)
def test_bad_sources_fail_clearly(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(SourceError, match=message):
        list(read_sources([tmp_path / name]))


def test_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="source not found"):
        list(read_sources([tmp_path / "nope"]))
