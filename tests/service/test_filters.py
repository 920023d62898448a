"""Filtered search through a real server over an 11,000-item index with an ANN factory (HNSW and IVF), against a
brute-force reference over the stored vectors: both directions, with and without re-ranking; the index reader's
ANN path (a FAISS id selector, widened); metadata from every source format; malformed filters as 4xx JSON.

The index is built by the real builder with a real, very small ALBEF (exported here in seconds), so 5,000
images and 6,000 captions encode in about three seconds."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from albef.index.reader import IndexReader
from albef.model.ranking import rank
from tests.helpers import REPO
from tests.helpers.service import index_items, live_server, settings

N_IMAGES = 5000  # each with one caption: 5,000 texts paired with an image
N_CAPTION_ONLY = 1000  # and 1,000 texts of their own
COLOURS = ("red", "green", "blue", "grey")
FACTORIES = ("HNSW16", "IVF64,Flat")


def _meta(i: int) -> dict[str, Any] | None:
    if i % 50 == 7:
        return None
    day = date(2020, 1, 1) + timedelta(days=i % 731)
    offset = ("Z", "+02:00", "-05:00")[i % 3]
    meta: dict[str, Any] = {
        "colour": COLOURS[i % 4],
        "year": 2000 + i % 25,
        "taken": f"{day.isoformat()}T12:00:00{offset}",
        "flag": i % 3 == 0,
        "tags": ["rare", "x"] if i % 700 == 3 else [COLOURS[(i + 1) % 4]],
    }
    if i % 5 == 0:
        meta["score"] = (i % 100) / 100
    return meta


@pytest.fixture(scope="module")
def micro_bundle(tmp_path_factory: pytest.TempPathFactory, vocab_path: Path) -> Path:
    """albef-tiny's structure at toy widths (embed 32, one ViT block at 32 px, two BERT layers), random."""
    import torch

    from albef.model.export import export_bundle
    from albef.model.factory import create_model

    cfg = json.loads((REPO / "model" / "configs" / "albef-tiny.json").read_text())
    cfg.update(name="albef-micro", embed_dim=32)
    cfg["vision"].update(image_res=32, width=32, depth=1, heads=1)
    cfg["text"].update(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=1, intermediate_size=64, fusion_layer=1
    )
    cfg["text"]["encoder_width"] = 32
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("micro") / "bundle"
    export_bundle(create_model(cfg), out, variants=["fp32"], vocab=vocab_path, progress=False)
    return out


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(16)
    rows = []
    for i in range(N_IMAGES):
        p = root / "img" / f"{i:05d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8 + 2 * (i % 3), 3), dtype=np.uint8)).save(p)
        rows.append(
            {
                "image": f"img/{p.name}",
                "caption": f"photo {i} of a {COLOURS[i % 4]} thing",
                "metadata": _meta(i),
            }
        )
    for i in range(N_IMAGES, N_IMAGES + N_CAPTION_ONLY):
        rows.append({"caption": f"a lone caption number {i}", "metadata": _meta(i)})
    (root / "gallery.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "gallery.jsonl"


@pytest.fixture(scope="module")
def indexes(micro_bundle: Path, gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    bundle = Bundle.load(micro_bundle, intra_op_threads=1)
    out = {}
    for factory in FACTORIES:
        path = tmp_path_factory.mktemp("index") / "index"
        opts = BuildOptions(progress=False, workers=2, factory=factory, batch_size=256, text_batch_size=512)
        build(path, bundle, [gallery], opts)
        out[factory] = path
    return out


class Reference:
    """The stored items and ITC vectors of an index, searched by brute force under the ranking rule."""

    def __init__(self, index: Path) -> None:
        images, texts = index_items(index)
        self.items = {it["id"]: it for it in images + texts}
        self.ids: dict[str, np.ndarray] = {}
        self.vectors: dict[str, np.ndarray] = {}
        with IndexReader.open(index) as r:
            for kind, group in (("image", images), ("text", texts)):
                self.ids[kind] = np.array([it["id"] for it in group], np.int64)
                self.vectors[kind] = np.stack([r.vector(kind, it["id"]) for it in group])
            self.manifest = r.manifest

    def search(
        self,
        kind: str,
        query_id: int,
        k: int,
        keep: Callable[[dict[str, Any]], bool],
        exclude: tuple[int, ...] = (),
    ) -> tuple[list[int], list[float]]:
        other = "text" if kind == "image" else "image"
        q = self.vectors[other][int(np.flatnonzero(self.ids[other] == query_id)[0])]
        mask = np.array([keep(self.items[int(i)]) and int(i) not in exclude for i in self.ids[kind]])
        ids, scores = self.ids[kind][mask], self.vectors[kind][mask] @ q
        order = rank(scores, ids, k)
        return ids[order].tolist(), scores[order].tolist()


@pytest.fixture(scope="module")
def refs(indexes: dict[str, Path]) -> dict[str, Reference]:
    return {factory: Reference(path) for factory, path in indexes.items()}


def assert_same_ranking(hits: list[dict[str, Any]], ids: list[int], scores: list[float]) -> None:
    """The same ids in the same order, except that items whose scores agree to 1e-5 may swap (numpy and FAISS
    round the last bits of an inner product differently)."""
    assert len(hits) == len(ids)
    ref = dict(zip(ids, scores, strict=True))
    for hit, want_id, want_score in zip(hits, ids, scores, strict=True):
        assert abs(hit["itc_score"] - want_score) < 1e-5, (hit, want_id, want_score)
        assert hit["id"] == want_id or abs(ref.get(hit["id"], np.inf) - want_score) < 1e-5, (
            hit["id"],
            want_id,
        )


def _m(item: dict[str, Any]) -> dict[str, Any]:
    return item["metadata"] or {}


# (name, filter, the same condition in Python over an item as the index stores it)
FILTERS: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    (
        "colour-and-year",
        {"metadata.colour": "red", "metadata.year": {"gte": 2020}},
        lambda it: _m(it).get("colour") == "red" and _m(it).get("year", 0) >= 2020,
    ),
    ("rare-tag", {"metadata.tags": "rare"}, lambda it: "rare" in _m(it).get("tags", [])),
    (
        "not-grey-or-flag",
        {"or": [{"not": {"metadata.colour": {"in": ["grey", "green"]}}}, {"metadata.flag": True}]},
        lambda it: _m(it).get("colour") not in ("grey", "green") or _m(it).get("flag") is True,
    ),
    (
        "date-range",
        {"metadata.taken": {"gte": "2021-03-01", "lt": "2021-06-01T00:00:00+00:00"}},
        lambda it: (
            "taken" in _m(it)
            and "2021-03-01T00:00:00+00:00" <= _utc(_m(it)["taken"]) < "2021-06-01T00:00:00+00:00"
        ),
    ),
    ("no-score", {"metadata.score": {"exists": False}}, lambda it: "score" not in _m(it)),
    (
        "builtins",
        {
            "and": [
                {"id": {"lt": 8000}},
                {
                    "or": [
                        {"width": {"gte": 12}},
                        {"image_id": {"gte": 4990}},
                        {"caption": "a lone caption number 5001"},
                    ]
                },
            ]
        },
        lambda it: (
            it["id"] < 8000
            and (
                (it["width"] or 0) >= 12
                or (it["image_id"] or 0) >= 4990
                or it["caption"] == "a lone caption number 5001"
            )
        ),
    ),
    ("no-metadata", {"metadata": {"exists": False}}, lambda it: it["metadata"] is None),
    ("nothing", {"metadata.colour": "purple"}, lambda it: False),
]


def _utc(text: str) -> str:
    from datetime import datetime, timezone

    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc).isoformat()


@pytest.mark.parametrize("factory", FACTORIES)
def test_filtered_results_equal_brute_force_both_directions(
    indexes: dict[str, Path], refs: dict[str, Reference], factory: str
) -> None:
    index, ref = indexes[factory], refs[factory]
    assert {ref.manifest["ann"][k]["factory"] for k in ("image", "text")} == {factory}
    assert len(ref.ids["image"]) == N_IMAGES and len(ref.ids["text"]) == N_IMAGES + N_CAPTION_ONLY
    queries = {
        "image": ref.ids["text"][[5, 4321, 5500]].tolist(),
        "text": ref.ids["image"][[0, 2222]].tolist(),
    }
    paths = {"image": "/v1/search/images", "text": "/v1/search/texts"}
    checked = {"partial": 0, "rerank": 0}
    with live_server(settings(index)) as srv, srv.client() as c:
        for name, flt, keep in FILTERS:
            for kind in ("image", "text"):
                n_match = sum(keep(ref.items[int(i)]) for i in ref.ids[kind])
                for qid in queries[kind]:
                    want_ids, want_scores = ref.search(kind, qid, 10, keep)
                    body = {"item_id": qid, "k": 10, "rerank": False, "filter": flt}
                    r = c.post(paths[kind], json=body)
                    assert r.status_code == 200, (name, r.text)
                    got = r.json()
                    assert got["filter"] == {"matched": n_match, "exact": True}, name
                    assert_same_ranking(got["results"], want_ids, want_scores)
                    assert got["candidates"] == len(want_ids) and got["cut"] == {
                        "min_itc_score": 0,
                        "min_match_probability": 0,
                    }
                    checked["partial"] += 0 < n_match < 10

                    # Re-ranking: the rerank_k candidates are the filtered ITC top, and so is the tail after them.
                    head_ids, head_scores = ref.search(kind, qid, 16, keep)
                    r = c.post(paths[kind], json={**body, "rerank": True, "k": 16, "rerank_k": 8})
                    hits = r.json()["results"]
                    assert r.status_code == 200 and len(hits) == len(head_ids), name
                    assert {h["id"] for h in hits[:8]} == set(head_ids[:8])
                    assert [h["id"] for h in hits[8:]] == head_ids[8:]
                    for h in hits:
                        assert keep(ref.items[h["id"]]), (name, h["id"])
                        assert h["itc_rank"] == head_ids.index(h["id"]) + 1
                        assert abs(h["itc_score"] - head_scores[h["itc_rank"] - 1]) < 1e-5
                    logits = [h["itm_score"] for h in hits[:8]]
                    assert logits == sorted(logits, reverse=True) and None not in logits
                    checked["rerank"] += len(hits) > 0
        # A query text, a filter and exclude together: the next matching items fill in.
        flt, keep = FILTERS[0][1], FILTERS[0][2]
        first = c.post(
            paths["image"], json={"text": "photo of a red thing", "k": 5, "rerank": False, "filter": flt}
        )
        top = [h["id"] for h in first.json()["results"]]
        again = c.post(
            paths["image"],
            json={"text": "photo of a red thing", "k": 5, "rerank": False, "filter": flt, "exclude": top[:2]},
        ).json()["results"]
        assert [h["id"] for h in again][:3] == top[2:] and len(again) == 5
        assert all(keep(ref.items[h["id"]]) for h in again)
    assert checked["partial"] >= 4 and checked["rerank"] >= 20  # fewer matches than k, and re-ranked searches


def test_unfiltered_ann_is_approximate_where_filtered_search_is_exact(
    indexes: dict[str, Path], refs: dict[str, Reference]
) -> None:
    """A filter that every image matches ranks by the exact ITC score (the HNSW search without one is as
    approximate as its recorded recall)."""
    index, ref = indexes["HNSW16"], refs["HNSW16"]
    with live_server(settings(index)) as srv, srv.client() as c:
        for qid in ref.ids["text"][::500].tolist():
            want, scores = ref.search("image", qid, 10, lambda it: True)
            body = {"item_id": qid, "k": 10, "rerank": False}
            filtered = c.post("/v1/search/images", json={**body, "filter": {"kind": "image"}}).json()
            assert filtered["filter"] == {"matched": N_IMAGES, "exact": True}
            assert_same_ranking(filtered["results"], want, scores)
            plain = c.post("/v1/search/images", json=body).json()
            assert plain["filter"] is None and plain["candidates"] == 10


@pytest.mark.parametrize("factory", FACTORIES)
def test_reader_ann_path_with_a_selector_and_widening(
    indexes: dict[str, Path], refs: dict[str, Reference], factory: str
) -> None:
    """With ``filter_exact_max=0`` every match set goes through the ANN index with a FAISS id selector."""
    from albef.index import ann
    from albef.index.filters import parse_filter

    index, ref = indexes[factory], refs[factory]
    broad = FILTERS[2]  # about 58% of the items
    rare = FILTERS[1]
    with IndexReader.open(index, filter_exact_max=0) as r:
        entry = r.manifest["ann"]["image"]
        ivf = ann.read(index / "versions" / r.version / entry["file"])
        ann.set_params(ivf, entry["params"])
        recall = []
        for qid in ref.ids["text"][::500].tolist():
            q = r.vector("text", qid)
            hits = r.search_filtered("image", q, 10, parse_filter(broad[1]))
            assert not hits.exact and len(hits.ids) == 10
            assert all(broad[2](ref.items[int(i)]) for i in hits.ids)
            assert list(hits.scores) == sorted(hits.scores, reverse=True)
            want, _ = ref.search("image", qid, 10, broad[2])
            recall.append(len(set(want) & set(hits.ids.tolist())) / 10)
            if factory.startswith("IVF"):
                # IVF with a selector is exactly the IVF's own ranking restricted to the matches: every
                # vector of the probed lists, scored as the unfiltered search scores them.
                _, i_all = ann.search(ivf, q[None, :], N_IMAGES)
                own = [int(i) for i in i_all[0] if i >= 0 and broad[2](ref.items[int(i)])][:10]
                assert hits.ids.tolist() == own
            # Eight matches only: the selector search widens, or brute force takes over; all eight, in order.
            few = r.search_filtered("image", q, 10, parse_filter(rare[1]))
            want_few, scores_few = ref.search("image", qid, 10, rare[2])
            assert few.matched == len(want_few) == 8 and few.ids.tolist() == want_few
            assert np.allclose(few.scores, scores_few, atol=1e-5)
        assert np.mean(recall) >= 0.8, recall
    with IndexReader.open(index) as r:  # the default: brute force up to 50,000 matches
        assert r.search_filtered(
            "image", r.vector("text", int(ref.ids["text"][0])), 3, parse_filter(broad[1])
        ).exact


def test_metadata_from_every_source_format_is_filterable(micro_bundle: Path, tmp_path: Path) -> None:
    from albef.index.builder import BuildOptions, build
    from albef.index.errors import SourceError
    from albef.model.runtime import Bundle

    def image(path: Path, seed: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), seed * 40, np.uint8)).save(path)
        return path

    folder = tmp_path / "photos"
    image(folder / "a.png", 1)
    (folder / "a.json").write_text(json.dumps({"place": "beach", "year": 2019}))
    (folder / "a.txt").write_text("a day at the beach\n")
    image(folder / "sub" / "b.png", 2)
    (folder / "sub" / "b.json").write_text(json.dumps({"place": "city", "tags": ["night"]}))
    image(folder / "c.png", 3)  # no sidecar
    image(tmp_path / "d.png", 4)
    image(tmp_path / "e.png", 5)
    (tmp_path / "table.csv").write_text(
        'image,caption,metadata\nd.png,a red door,"{""place"": ""city"", ""year"": 2021}"\n'
    )
    (tmp_path / "rows.jsonl").write_text(
        json.dumps(
            {"image": "e.png", "caption": "an empty road", "metadata": {"place": "road", "year": 2022}}
        )
        + "\n"
    )
    bundle = Bundle.load(micro_bundle, intra_op_threads=1)
    index = tmp_path / "index"
    build(
        index, bundle, [folder, tmp_path / "table.csv", tmp_path / "rows.jsonl"], BuildOptions(progress=False)
    )
    images, texts = index_items(index)
    by_name = {Path(it["path"]).name: it["id"] for it in images}
    assert {Path(it["path"]).name: it["metadata"] for it in images} == {
        "a.png": {"place": "beach", "year": 2019},
        "b.png": {"place": "city", "tags": ["night"]},
        "c.png": None,
        "d.png": {"place": "city", "year": 2021},
        "e.png": {"place": "road", "year": 2022},
    }
    assert {t["caption"]: t["metadata"]["place"] for t in texts} == {
        "a day at the beach": "beach",  # captions carry their image's metadata
        "a red door": "city",
        "an empty road": "road",
    }
    with live_server(settings(index)) as srv, srv.client() as c:

        def names(flt: dict[str, Any]) -> set[str]:
            r = c.post("/v1/search/images", json={"text": "a place", "k": 10, "filter": flt})
            assert r.status_code == 200, r.text
            return {
                Path(img["path"]).name
                for img in images
                if img["id"] in {h["id"] for h in r.json()["results"]}
            }

        assert names({"metadata.place": "city"}) == {"b.png", "d.png"}
        assert names({"metadata.year": {"gte": 2020}}) == {"d.png", "e.png"}
        assert names({"metadata.tags": "night"}) == {"b.png"}
        assert names({"source": "photos"}) == {"a.png", "b.png", "c.png"}
        assert names({"source": "table.csv", "metadata.place": {"exists": True}}) == {"d.png"}
        assert names({"metadata": {"exists": False}}) == {"c.png"}
        r = c.post(
            "/v1/search/texts",
            json={"item_id": by_name["a.png"], "k": 5, "filter": {"metadata.place": "road"}},
        )
        assert [h["metadata"]["caption"] for h in r.json()["results"]] == ["an empty road"]

    (folder / "c.json").write_text('{"place": "nowhere",\n}')  # a bad sidecar stops a build, naming the file
    with pytest.raises(SourceError, match=r"photos/c\.json:2: metadata file is not valid JSON"):
        build(tmp_path / "index2", bundle, [folder], BuildOptions(progress=False))


BAD: list[tuple[dict[str, Any], int, str, str]] = [
    ({"filter": {"metadata.year": {"gte": "soon"}}}, 422, "invalid_filter", "filter.metadata.year.gte"),
    ({"filter": {"and": [{"kind": "image"}, {"colour": 1}]}}, 422, "invalid_filter", "filter.and[1].colour"),
    ({"filter": {"width": {"between": [1, 2]}}}, 422, "invalid_filter", "filter.width.between"),
    ({"filter": [1, 2]}, 422, "validation_error", "filter"),
    ({"filter": "colour=red"}, 422, "validation_error", "filter"),
    ({"filter": {"metadata.x": 10**30}}, 422, "invalid_filter", "filter.metadata.x"),
]


@pytest.mark.parametrize(("extra", "status", "code", "field"), BAD, ids=[b[3] + b[2] for b in BAD])
def test_malformed_filters_are_4xx_json_naming_the_part(
    extra: dict[str, Any], status: int, code: str, field: str, bad_server: Any
) -> None:
    c = bad_server
    for path, body in (("/v1/search/images", {"text": "a red thing"}), ("/v1/search/texts", {"item_id": 0})):
        r = c.post(path, json={**body, **extra})
        assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
        err = r.json()["error"]
        assert err["code"] == code and err["field"] == field, err
        assert err["message"].startswith(field + ":"), err


@pytest.fixture(scope="module")
def bad_server(service_index: Path):
    with live_server(settings(service_index)) as srv, srv.client() as c:
        yield c


def test_multipart_filter_is_a_json_form_field(indexes: dict[str, Path], refs: dict[str, Reference]) -> None:
    ref = refs["HNSW16"]
    path = ref.items[0]["path"]
    data = Path(path).read_bytes()
    flt = FILTERS[0][1]
    with live_server(settings(indexes["HNSW16"])) as srv, srv.client() as c:
        _multipart(c, data, flt)


def _multipart(c: Any, data: bytes, flt: dict[str, Any]) -> None:
    form = c.post(
        "/v1/search/texts",
        files={"image": ("q.png", data)},
        data={"k": "6", "rerank": "false", "filter": json.dumps(flt)},
    )
    by_item = c.post("/v1/search/texts", json={"item_id": 0, "k": 6, "rerank": False, "filter": flt})
    assert form.status_code == 200, form.text
    assert [h["id"] for h in form.json()["results"]] == [h["id"] for h in by_item.json()["results"]]
    assert form.json()["filter"] == by_item.json()["filter"]
    for value, message in (
        ("{not json", "filter: not valid JSON"),
        ('{"kind": "video"}', "filter.kind: expected"),
    ):
        r = c.post("/v1/search/texts", files={"image": ("q.png", data)}, data={"filter": value})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_filter", r.text
        assert r.json()["error"]["message"].startswith(message)


def test_openapi_describes_filters_and_thresholds(bad_server: Any) -> None:
    spec = bad_server.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    texts = spec["paths"]["/v1/search/texts"]["post"]["requestBody"]["content"]
    for props in (
        schemas["ImageSearchRequest"]["properties"],
        texts["application/json"]["schema"]["properties"],
        texts["multipart/form-data"]["schema"]["properties"],
    ):
        assert {"filter", "min_itc_score", "min_match_probability"} <= set(props)
        assert "Filters" in props["filter"]["description"]
        assert '"maximum": 1' in json.dumps(props["min_match_probability"])
    response = schemas["SearchResponse"]["properties"]
    assert {"cut", "candidates", "filter"} <= set(response)
    assert set(schemas["Cut"]["properties"]) == {"min_itc_score", "min_match_probability"}
    assert set(schemas["FilterInfo"]["properties"]) == {"matched", "exact"}
