"""Index builds end to end on the tiny random bundle: every source format, skipped bad images, de-duplication,
stored features equal to the runtime's output, reader API, add/delete/versions, bundle mismatch, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from albef.cli import main as cli_main
from albef.index import builder, layout
from albef.index.builder import BuildOptions
from albef.index.errors import IndexError_, IndexMismatchError, ResumeError
from albef.index.reader import IndexReader, current_version
from tests.helpers.index import make_folder, make_image

OPTS = dict(batch_size=4, shard_size=5, text_shard_size=4, workers=2, progress=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    imgs = make_folder(root / "imgs", 6)  # img000..img005, captions beside 0, 2, 4
    shutil.copyfile(imgs / "part0" / "img000.png", imgs / "part1" / "copy.png")  # same bytes, other path
    (imgs / "part0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    train = [
        {"image": "imgs/part0/img000.png", "caption": "First caption!", "image_id": "t_0"},
        {"image": "missing.png", "caption": "caption of a missing image"},
    ]
    (root / "train.json").write_text(json.dumps(train))
    make_image(root / "extra" / "e1.png", 101, size=(50, 20))
    make_image(root / "extra" / "e2.png", 102)
    (root / "items.csv").write_text(
        'image,caption,metadata\nextra/e1.png,a red thing,"{""k"": 1}"\n,only a caption,\n'
    )
    (root / "items.jsonl").write_text(
        json.dumps({"image": "extra/e2.png", "captions": ["x y", "A picture number 0."]}) + "\n"
    )
    (root / "captions.txt").write_text("line one\nLine one!!\n")
    return {
        "root": root,
        "folder": imgs,
        "train": root / "train.json",
        "csv": root / "items.csv",
        "jsonl": root / "items.jsonl",
        "txt": root / "captions.txt",
    }


def all_sources(s: dict[str, Path]) -> list[Path]:
    return [s["folder"], s["train"], s["csv"], s["jsonl"], s["txt"]]


@pytest.fixture(scope="module")
def built(sources: dict[str, Path], index_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "index"
    builder.build(out, index_bundle, all_sources(sources), BuildOptions(**OPTS))
    return out


def by_path(reader: IndexReader, path: Path) -> dict:
    want = str(path.resolve())
    hits = [
        it
        for it in reader.items(range(reader.manifest["next_id"]))
        if it["kind"] == "image" and it["path"] == want
    ]
    assert len(hits) == 1, want
    return hits[0]


def texts_by_caption(reader: IndexReader) -> dict[str, dict]:
    return {
        it["caption"]: it for it in reader.items(range(reader.manifest["next_id"])) if it["kind"] == "text"
    }


def test_every_format_bad_images_and_duplicates(built: Path, sources: dict[str, Path]) -> None:
    report = json.loads((built / "versions" / "000001" / "report.json").read_text())
    assert report["images"] == {"planned": 11, "indexed": 8, "duplicates": 1, "failed": 2}
    failed = {Path(f["path"]).name: f["error"] for f in report["failed"]}
    assert failed.keys() == {"broken.png", "missing.png"}
    assert failed["missing.png"].startswith("missing") and failed["broken.png"].startswith("unreadable")
    assert report["texts"] == {"planned": 14, "indexed": 12, "skipped": 2}
    assert sorted(t["reason"] for t in report["skipped_texts"]) == ["duplicate", "duplicate"]
    with IndexReader.open(built) as r:
        assert (r.count("image"), r.count("text")) == (8, 12)
        img0 = by_path(r, sources["folder"] / "part0" / "img000.png")
        assert report["duplicate_images"] == [
            {"path": str((sources["folder"] / "part1" / "copy.png").resolve()), "same_as_id": img0["id"]}
        ]
        # ids: unique, images first, then texts, in plan order
        items = r.items(range(r.manifest["next_id"]))
        assert [it["id"] for it in items] == list(range(20))
        assert [it["kind"] for it in items] == ["image"] * 8 + ["text"] * 12
        # metadata rows
        e1 = by_path(r, sources["root"] / "extra" / "e1.png")
        assert e1["metadata"] == {"k": 1} and (e1["width"], e1["height"]) == (50, 20)
        assert e1["sha256"] == hashlib.sha256((sources["root"] / "extra" / "e1.png").read_bytes()).hexdigest()
        assert e1["caption"] == "a red thing" and e1["source"] == str(sources["csv"].resolve())
        assert img0["metadata"] == {"image_id": "t_0"} and img0["caption"] == "a picture number 0"
        caps = texts_by_caption(r)
        assert set(caps) == {
            "a picture number 0",
            "another view of item 0",
            "a picture number 2",
            "another view of item 2",
            "a picture number 4",
            "another view of item 4",
            "First caption!",
            "a red thing",
            "only a caption",
            "x y",
            "line one",
            "caption of a missing image",
        }
        assert (
            caps["First caption!"]["image_id"] == img0["id"]
            and caps["a picture number 0"]["image_id"] == img0["id"]
        )
        assert caps["only a caption"]["image_id"] is None and caps["line one"]["path"] is None
        assert caps["caption of a missing image"]["image_id"] is None  # its image failed to load
        assert caps["line one"]["sha256"] == hashlib.sha256(b"line one").hexdigest()


def test_stored_vectors_and_features_equal_the_runtime(
    built: Path, sources: dict[str, Path], index_bundle
) -> None:
    path = sources["root"] / "extra" / "e1.png"
    emb, tok = index_bundle.encode_images([path])
    temb, ttok, tmask = index_bundle.encode_texts(["a red thing", "line one"])
    with IndexReader.open(built, bundle_id=index_bundle.bundle_id) as r:
        e1 = by_path(r, path)
        np.testing.assert_allclose(r.vector("image", e1["id"]), emb[0], atol=1e-5)
        stored = r.image_tokens([e1["id"]])
        assert stored.dtype == np.float32 and stored.shape == (1, *index_bundle.image_tokens_shape)
        np.testing.assert_allclose(stored[0], tok[0], rtol=2e-3, atol=2e-3)  # fp16 storage
        caps = texts_by_caption(r)
        ids = [caps["a red thing"]["id"], caps["line one"]["id"]]
        np.testing.assert_allclose(np.stack([r.vector("text", i) for i in ids]), temb, atol=1e-5)
        feats, mask = r.text_features(ids)
        assert mask.dtype == np.int64 and np.array_equal(mask, tmask)
        np.testing.assert_allclose(feats, ttok, rtol=2e-3, atol=2e-3)
        tid, tm = r.text_token_ids(ids)
        assert np.array_equal(tid, index_bundle.tokenize(["a red thing", "line one"])[0]) and np.array_equal(
            tm, tmask
        )
        # every image finds itself first; text->image search with a real text query returns valid ids
        all_imgs = [it["id"] for it in r.items(range(r.manifest["next_id"])) if it["kind"] == "image"]
        q = np.stack([r.vector("image", i) for i in all_imgs])
        scores, found = r.search("image", q, 3)
        assert found[:, 0].tolist() == all_imgs
        assert (np.diff(scores, axis=1) <= 0).all()
        s, f = r.search("text", emb, 50)
        assert (
            (f[0, :12] >= 0).all()
            and (f[0, 12:] == -1).all()
            and set(f[0, :12].tolist()) == set(range(8, 20))
        )


def test_reader_api_edges(built: Path) -> None:
    with IndexReader.open(built) as r:
        assert r.version == "000001" == current_version(built)
        assert r.image_path(0) is not None and r.image_path(0).is_file()
        assert r.image_path(10) is None  # a text item
        assert r.image_path(12345) is None and r.item(12345) is None
        assert [it["id"] for it in r.items([5, 999, 2])] == [5, 2]
        with pytest.raises(KeyError):
            r.image_tokens([0, 10])  # 10 is a text
        with pytest.raises(KeyError):
            r.vector("text", 0)
        with pytest.raises(ValueError, match="kind"):
            r.count("video")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="queries must be"):
            r.search("image", np.zeros((1, 3), np.float32), 2)
        assert r.image_tokens([]).shape == (0, *r.image_tokens_shape)


def test_bundle_mismatch_is_refused(
    built: Path, other_bundle_dir: Path, sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from albef.model.runtime import Bundle

    other = Bundle.load(other_bundle_dir)
    with pytest.raises(IndexMismatchError, match="built with model bundle"):
        IndexReader.open(built, bundle_id=other.bundle_id)
    with pytest.raises(IndexMismatchError):
        builder.add(built, other, [sources["txt"]], BuildOptions(**OPTS))
    rc = cli_main(
        [
            "index",
            "add",
            "--index",
            str(built),
            "--model",
            str(other_bundle_dir),
            "--no-progress",
            str(sources["txt"]),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "albef index add: error:" in err and "built with model bundle" in err
    assert layout.list_versions(built) == ["000001"]


def test_add_delete_versions_and_retention(
    built: Path, sources: dict[str, Path], index_bundle, tmp_path: Path
) -> None:
    idx = tmp_path / "index"
    shutil.copytree(built, idx)
    old = IndexReader.open(idx)
    new_dir = make_folder(tmp_path / "new", 3, seed0=50)
    shutil.copyfile(sources["root"] / "extra" / "e1.png", new_dir / "again.png")  # already indexed
    (tmp_path / "more.txt").write_text("line one\na brand new caption\n")
    res = builder.add(
        idx, index_bundle, [new_dir, tmp_path / "more.txt"], BuildOptions(**OPTS, keep_versions=2)
    )
    assert res.version == "000002" == current_version(idx)
    assert res.report["images"] == {"planned": 4, "indexed": 3, "duplicates": 1, "failed": 0}
    assert res.report["texts"]["indexed"] == 5  # 4 sidecar captions + 1 new line; "line one" is known
    with IndexReader.open(idx) as r:
        assert (r.count("image"), r.count("text")) == (11, 17)
        new_ids = [it["id"] for it in r.items(range(20, 40))]
        assert new_ids == list(range(20, 28))  # ids continue after the first build
        assert r.manifest["segments"] == ["seg-000001", "seg-000002"]
        # a gather across both segments keeps the order asked for; dtype=None gives the stored float16
        imgs = [it["id"] for it in r.items(range(40)) if it["kind"] == "image"]
        mixed = [imgs[-1], imgs[0], imgs[-2], imgs[1]]  # new, old, new, old
        assert r._every_row_live("image")  # no deletions: rows are found by the segments' id arrays
        as_stored = r.image_tokens(mixed, dtype=None)
        assert as_stored.dtype == np.float16
        one_by_one = np.concatenate([r.image_tokens([i]) for i in mixed])
        assert r.image_tokens(mixed).dtype == np.float32
        np.testing.assert_array_equal(r.image_tokens(mixed), one_by_one)
        np.testing.assert_array_equal(as_stored.astype(np.float32), one_by_one)
        texts = [it["id"] for it in r.items(range(40)) if it["kind"] == "text"]
        tok, mask = r.text_features([texts[-1], texts[0]], dtype=None)
        assert tok.dtype == np.float16 and mask.dtype == np.int64
        np.testing.assert_array_equal(tok.astype(np.float32), r.text_features([texts[-1], texts[0]])[0])
    # the reader opened before the add still serves version 1
    assert old.count("image") == 8 and old.item(0) is not None
    # delete one image and one text
    res = builder.delete(idx, [0, 8], keep_versions=2)
    assert res.version == "000003"
    with IndexReader.open(idx) as r:
        assert r.item(0) is None and r.item(8) is None and r.count("image") == 10 and r.count("text") == 16
        _, found = r.search("image", old.vector("image", 0), 11)
        assert 0 not in found[0].tolist()
        _, found = r.search("text", old.vector("image", 0), 20)
        assert 8 not in found[0].tolist()
        assert not r._every_row_live("image")  # a deleted row is in its segment: SQLite says what is live
        with pytest.raises(KeyError):
            r.image_tokens([0])
        alive = [it["id"] for it in r.items(range(20)) if it["kind"] == "image"][:3]
        np.testing.assert_array_equal(r.image_tokens(alive), old.image_tokens(alive))
    old.close()
    # retention: two versions kept, segments still used by them survive
    assert layout.list_versions(idx) == ["000002", "000003"]
    assert sorted(p.name for p in (idx / "segments").iterdir()) == ["seg-000001", "seg-000002"]
    # unknown ids change nothing
    with pytest.raises(IndexError_, match="unknown ids"):
        builder.delete(idx, [1, 424242])
    assert current_version(idx) == "000003"
    with IndexReader.open(idx, version="000002") as r:
        assert r.item(0) is not None  # old versions stay readable by name


def test_int8_tokens_and_id_only_texts(
    sources: dict[str, Path], index_bundle, built: Path, tmp_path: Path
) -> None:
    idx = tmp_path / "small"
    builder.build(
        idx, index_bundle, [sources["folder"]], BuildOptions(**OPTS, token_dtype="int8", text_features="ids")
    )
    with IndexReader.open(idx) as r, IndexReader.open(built) as ref:
        img = by_path(r, sources["folder"] / "part0" / "img002.png")
        ref_img = by_path(ref, sources["folder"] / "part0" / "img002.png")
        q8, f16 = r.image_tokens([img["id"]])[0], ref.image_tokens([ref_img["id"]])[0]
        # symmetric per-token int8: error at most half a step (max|x|/127/2) per token, plus fp16 rounding
        step = np.abs(f16).max(axis=-1, keepdims=True) / 127
        assert (np.abs(q8 - f16) <= step / 2 + 2e-3 * np.abs(f16) + 1e-3).all()
        bpi, ref_bpi = r.manifest["bytes_per_item"], ref.manifest["bytes_per_item"]
        assert bpi["image"]["tokens"] < 0.6 * ref_bpi["image"]["tokens"]
        assert "tokens" not in bpi["text"]
        assert bpi["text"]["total"] < ref_bpi["text"]["total"] - 0.9 * ref_bpi["text"]["tokens"]
        cap = texts_by_caption(r)["a picture number 2"]["id"]
        with pytest.raises(IndexError_, match="encoder"):
            r.text_features([cap])
    with IndexReader.open(idx, encoder=index_bundle) as r:
        feats, mask = r.text_features([cap])
        _, want, wmask = index_bundle.encode_texts(["a picture number 2"])
        np.testing.assert_allclose(feats, want, atol=1e-5)  # re-encoded from the stored ids: exact
        assert np.array_equal(mask, wmask)


def test_factory_override_is_kept_and_hnsw_delete_rebuilds(
    sources: dict[str, Path], index_bundle, tmp_path: Path
) -> None:
    idx = tmp_path / "hnsw"
    res = builder.build(
        idx, index_bundle, [sources["folder"], sources["txt"]], BuildOptions(**OPTS, factory="HNSW8")
    )
    a = res.manifest["ann"]["image"]
    assert (
        a["factory"] == "HNSW8" and a["pinned"] and a["recall_at_k"] is not None and "efSearch" in a["params"]
    )
    res = builder.add(idx, index_bundle, [sources["csv"]], BuildOptions(**OPTS))
    assert (
        res.manifest["ann"]["image"]["factory"] == "HNSW8"
        and res.manifest["ann"]["image"]["update"] == "added"
    )
    res = builder.delete(idx, [0])
    assert res.manifest["ann"]["image"]["update"] == "rebuilt"
    with IndexReader.open(idx) as r:
        assert r.count("image") == 6
        _, found = r.search("image", np.ones((1, r.embed_dim), np.float32), 10)
        assert 0 not in found[0].tolist() and (found[0, :6] >= 0).all()


def test_pending_build_needs_resume_or_restart(
    sources: dict[str, Path], index_bundle, tmp_path: Path
) -> None:
    idx = tmp_path / "pending"
    wdir = idx / "work" / "pending"
    wdir.mkdir(parents=True)
    plan = {
        "base_version": None,
        "bundle_id": index_bundle.bundle_id,
        "sources": ["/elsewhere"],
        "options": BuildOptions(**OPTS).plan_key(),
    }
    (wdir / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ResumeError, match="pass --resume"):
        builder.build(idx, index_bundle, [sources["txt"]], BuildOptions(**OPTS))
    with pytest.raises(ResumeError, match="differs in sources"):
        builder.build(idx, index_bundle, [sources["txt"]], BuildOptions(**OPTS), resume=True)
    res = builder.build(idx, index_bundle, [sources["txt"]], BuildOptions(**OPTS), restart=True)
    assert res.manifest["counts"] == {"image": 0, "text": 1} and not wdir.exists()
    with IndexReader.open(idx) as r:
        s, f = r.search("image", np.ones((2, r.embed_dim), np.float32), 3)
        assert (f == -1).all() and np.isneginf(s).all()


def test_cli_build_info_delete(
    sources: dict[str, Path], index_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-index"
    rc = cli_main(
        [
            "index",
            "build",
            "--model",
            str(index_bundle_dir),
            "--out",
            str(out),
            "--no-progress",
            "--shard-size",
            "3",
            "--workers",
            "2",
            str(sources["folder"]),
            str(sources["txt"]),
        ]
    )
    assert rc == 0
    assert "version 000001: 6 images, 7 texts" in capsys.readouterr().out
    assert cli_main(["index", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "6 images, 7 texts" in info and "Flat" in info and "recall@10 1.0" in info
    assert cli_main(["index", "info", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["bytes_per_item"]["image"]["tokens"] > 0 and manifest["counts"]["image"] == 6
    assert cli_main(["index", "delete", "--index", str(out), "--ids", "1,2"]) == 0
    assert "deleted 2 items" in capsys.readouterr().out
    # add without --model uses the bundle the index records
    assert cli_main(["index", "add", "--index", str(out), "--no-progress", str(sources["csv"])]) == 0
    assert "version 000003: 5 images, 9 texts" in capsys.readouterr().out
    for argv, msg, code in [
        (["index", "delete", "--index", str(out), "--ids", "a,b"], "comma-separated integers", 2),
        (["index", "delete", "--index", str(out), "--ids", "1"], "unknown ids", 1),
        (["index", "info", str(tmp_path / "nothing")], "no index", 1),
        (
            ["index", "build", "--model", str(index_bundle_dir), "--out", str(out), str(sources["txt"])],
            "already holds",
            1,
        ),
        (
            [
                "index",
                "build",
                "--model",
                str(tmp_path / "nobundle"),
                "--out",
                str(tmp_path / "x"),
                str(sources["txt"]),
            ],
            "bundle not found",
            1,
        ),
        (
            [
                "index",
                "build",
                "--model",
                str(index_bundle_dir),
                "--out",
                str(tmp_path / "y"),
                "--max-memory",
                "lots",
                str(sources["txt"]),
            ],
            "bad size",
            2,
        ),
        (
            [
                "index",
                "build",
                "--model",
                str(index_bundle_dir),
                "--out",
                str(tmp_path / "z"),
                str(tmp_path / "nope.csv"),
            ],
            "source not found",
            1,
        ),
    ]:
        assert cli_main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.startswith(f"albef index {argv[1]}: error:"), err
        assert msg in err and err.count("\n") == 1, err


def test_index_package_never_imports_torch(
    built: Path, index_bundle_dir: Path, sources: dict[str, Path], tmp_path: Path
) -> None:
    code = f"""
import sys
from albef.model.runtime import Bundle
from albef.index import builder, IndexReader
from albef.index.builder import BuildOptions
b = Bundle.load({str(index_bundle_dir)!r})
builder.build({str(tmp_path / "t")!r}, b, [{str(sources["txt"])!r}], BuildOptions(progress=False))
r = IndexReader.open({str(built)!r}, bundle_id=b.bundle_id)
r.search("image", b.encode_texts(["x"])[0], 3); r.image_tokens([0]); r.text_features([10])
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_add_and_delete_keep_the_recorded_memory_budget(
    sources: dict[str, Path], index_bundle, tmp_path: Path
) -> None:
    out = tmp_path / "ix"
    builder.build(out, index_bundle, [sources["txt"]], BuildOptions(**OPTS, max_memory="64M"))
    builder.add(
        out, index_bundle, [sources["folder"]], BuildOptions(**OPTS)
    )  # no budget given: the recorded one
    assert layout.read_manifest(layout.version_path(out))["max_memory"] == "64M"
    first_text = min(it["id"] for it in IndexReader.open(out).items(range(3)) if it["kind"] == "text")
    builder.delete(out, [first_text])
    assert layout.read_manifest(layout.version_path(out))["max_memory"] == "64M"
    builder.add(
        out, index_bundle, [sources["csv"]], BuildOptions(**OPTS, max_memory="128M")
    )  # named: that one
    assert layout.read_manifest(layout.version_path(out))["max_memory"] == "128M"
    fresh = tmp_path / "fresh"
    builder.build(fresh, index_bundle, [sources["txt"]], BuildOptions(**OPTS))
    assert layout.read_manifest(layout.version_path(fresh))["max_memory"] == "4G"
