"""Build sources: every accepted format is read into the same records, bad input fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from albef.index.errors import SourceError
from albef.index.sources import read_sources
from albef.model.data.annotations import load_pairs
from tests.helpers.index import make_folder, make_image


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
    train = [
        {"image": "a.png", "caption": "first caption", "image_id": "x_1"},
        {"image": "a.png", "caption": "second caption", "image_id": "x_1"},
    ]
    test = [{"image": "a.png", "caption": ["c1", "c2", "c3"]}]
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train.json").write_text(json.dumps(train))
    (tmp_path / "ann" / "test.json").write_text(json.dumps(test))
    recs = list(
        read_sources(
            [tmp_path / "ann" / "train.json", tmp_path / "ann" / "test.json"], image_root=tmp_path / "root"
        )
    )
    assert [r.captions for r in recs] == [["first caption"], ["second caption"], ["c1", "c2", "c3"]]
    assert {r.image for r in recs} == {str((tmp_path / "root" / "a.png").resolve())}
    assert recs[0].metadata == {"image_id": "x_1"} and recs[2].metadata is None


def test_csv_tsv_jsonl_and_caption_lines(tmp_path: Path) -> None:
    make_image(tmp_path / "p.png", 2)
    (tmp_path / "a.csv").write_text(
        'image,caption,metadata\np.png,a red thing,"{""k"": 1}"\n,only a caption,\n'
    )
    (tmp_path / "b.tsv").write_text("path\tmetadata\np.png\t\n")
    (tmp_path / "c.jsonl").write_text(
        '{"image_path": "p.png", "captions": ["x", "y"], "metadata": {"m": [1]}}\n\n{"text": "just text"}\n'
    )
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
        ("obj.json", '{"a": 1}', "expected a JSON list"),
        ("cap.json", '[{"image": "a.png", "caption": 3}]', "caption is not a string or a list"),
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


# ---------------------------------------------------------------------------------------------------
# one reader: what `albef index build` takes, `albef train` takes, as the same (image, caption) rows


def _via_index(sources: list[Path], image_root: Path | None = None) -> list[tuple[str, str]]:
    return [(r.image, c) for r in read_sources(sources, image_root) for c in r.captions]


def _via_training(sources: list[Path], image_root: Path | None = None) -> list[tuple[str, str]]:
    items, problems = load_pairs(sources, image_root)
    assert problems == []
    return [(str(i.image), i.caption) for i in items]


def _same_data(tmp_path: Path, fmt: str) -> tuple[Path, Path | None]:
    """Three images (one nested, one PPM, one absolute in the table) and their captions, as ``fmt``."""
    root = tmp_path / "imgs"
    make_image(root / "b.png", 1)
    make_image(root / "sub" / "a.png", 2)
    Image.open(make_image(tmp_path / "c.png", 3)).save(root / "c.ppm")
    rows = [
        ("b.png", "a red band"),
        ("b.png", "the same band, again"),
        ("sub/a.png", "a nested picture"),
        (str(root / "c.ppm"), "a portable pixmap"),
    ]
    if fmt == "folder":
        (root / "b.txt").write_text("a red band\n\n  the same band, again \n")
        (root / "sub" / "a.txt").write_text("a nested picture\n")
        (root / "c.txt").write_text("a portable pixmap\n")
        return root, None
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(["Image_Path", " Text ", "image_id"])]
        lines += [sep.join([img, f'"{cap}"' if sep in cap else cap, img]) for img, cap in rows]
        path = tmp_path / f"pairs.{fmt}"
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps({"file": img, "caption": cap}) + "\n" for img, cap in rows))
    elif fmt == "json-train":
        path = tmp_path / "train.json"
        path.write_text(json.dumps([{"image": img, "caption": cap, "image_id": img} for img, cap in rows]))
    else:  # json-eval: one entry per image, a list of captions
        path = tmp_path / "test.json"
        path.write_text(
            json.dumps(
                [
                    {"image": "b.png", "caption": ["a red band", "the same band, again"]},
                    {"image": "sub/a.png", "caption": ["a nested picture"]},
                    {"image": str(root / "c.ppm"), "caption": ["a portable pixmap"]},
                ]
            )
        )
    return path, root


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "folder", "json-train", "json-eval"])
def test_index_and_training_read_the_same_rows(tmp_path: Path, fmt: str) -> None:
    source, image_root = _same_data(tmp_path, fmt)
    rows = _via_index([source], image_root)
    assert rows == _via_training([source], image_root)
    img = {name: str((tmp_path / "imgs" / name).resolve()) for name in ("b.png", "sub/a.png", "c.ppm")}
    expected = [
        (img["b.png"], "a red band"),
        (img["b.png"], "the same band, again"),
        (img["sub/a.png"], "a nested picture"),
        (img["c.ppm"], "a portable pixmap"),
    ]
    if fmt == "folder":  # sorted by path relative to the folder
        expected = [expected[0], expected[1], expected[3], expected[2]]
    assert rows == expected


def _bad_folder(tmp_path: Path) -> tuple[Path, str, str]:
    root = tmp_path / "folder"
    make_image(root / "a.png", 1)
    (root / "a.txt").write_text("a good caption\n")
    make_image(root / "z.png", 2)
    (root / "z.txt").write_bytes(b"caf\xe9 latin-1\n")
    return root, f"{root.resolve() / 'z.txt'}:0", "caption file unreadable"


BAD_ROWS = [  # file, content, where (after the file), error
    ("extra.csv", "image,caption\np.png,one\np.png,two,three\n", ":3", "row has more fields than the header"),
    (
        "meta.csv",
        "image,caption,metadata\np.png,one,\np.png,two,{oops}\n",
        ":3",
        "metadata is not valid JSON",
    ),
    ("empty.tsv", "image\tcaption\np.png\tone\n\t\n", ":3", "row has neither an image nor a caption"),
    ("line.jsonl", '{"image": "p.png", "caption": "one"}\n{nope\n', ":2", "not valid JSON"),
    ("list.jsonl", '{"image": "p.png", "caption": "one"}\n[1]\n', ":2", "expected a JSON object, got list"),
    ("cap.json", '[{"image": "p.png", "caption": ["one", 7]}]', ":[0]/caption[1]", "caption is not a string"),
    (
        "img.json",
        '[{"image": "p.png", "caption": "one"}, {"image": 3, "caption": "x"}]',
        ":[1]",
        "image must be a string path",
    ),
]


@pytest.mark.parametrize(("name", "content", "where", "error"), BAD_ROWS + [("folder", None, None, None)])
def test_strict_raises_where_skip_reports(
    tmp_path: Path, name: str, content: str | None, where: str | None, error: str | None
) -> None:
    if content is None:
        path, where, error = _bad_folder(tmp_path)
        good = ["a good caption"]
    else:
        make_image(tmp_path / "p.png", 1)
        path = tmp_path / name
        path.write_text(content)
        where = f"{path.resolve()}{where}"
        good = ["one"]
    with pytest.raises(SourceError) as exc:
        list(read_sources([path]))
    assert str(exc.value).startswith(f"{where}: {error}")
    items, problems = load_pairs([path])
    assert [p["source"] for p in problems] == [where] and error in problems[0]["error"]
    assert [i.caption for i in items] == good  # the good rows around the bad one are kept
