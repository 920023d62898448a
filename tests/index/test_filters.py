"""The filter grammar (albef.index.filters) evaluated by real SQLite over a real ``items`` table: every operator
on hand-picked items, random filters against an independent Python reading of the documented semantics, and
the errors, each naming the JSON path of the bad part."""

from __future__ import annotations

import math
import operator
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from albef.index import filters, metadata
from albef.index.filters import And, Compare, Exists, Field, FilterError, Not, Or, Range, parse_filter

IMAGES: dict[int, dict[str, Any]] = {
    0: {
        "width": 640,
        "height": 480,
        "caption": "a red car",
        "source": "/data/photos",
        "metadata": {
            "colour": "red",
            "year": 2019,
            "tags": ["car", "red"],
            "taken": "2019-05-01T10:00:00Z",
            "flag": True,
            "score": 0.5,
            "nested": {"a": {"b": 1}},
        },
    },
    1: {
        "width": 64,
        "height": 64,
        "source": "/data/photos",
        "metadata": {
            "colour": "blue",
            "year": 2021,
            "tags": ["sky"],
            "taken": "2021-01-01",
            "flag": False,
            "nested": {"a": {"b": 2}},
            "n": None,
        },
    },
    2: {
        "width": 100,
        "source": "/data/photos",
        "metadata": {"colour": "Red", "year": "2019", "tags": [], "taken": "not a date", "flag": 1},
    },
    3: {"source": "/data/other/photos", "metadata": None},
    4: {
        "source": "/data/photos",
        "metadata": {
            "year": 2019.0,
            "taken": "2019-05-01T12:00:00+02:00",
            "tags": "red",
            "obj": {"colour": "red"},
        },
    },
}
TEXTS: dict[int, dict[str, Any]] = {
    10: {
        "caption": "a red car",
        "image_id": 0,
        "metadata": {"colour": "red"},
        "source": "/data/captions.jsonl",
    },
    11: {"caption": "blue sky", "source": "/data/captions.jsonl"},
}
ALL = set(IMAGES)


def _rows(items: dict[int, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        {"kind": kind, "sha256": f"{kind}{i}", "segment": "seg-000001", "row": n, "id": i, **it}
        for n, (i, it) in enumerate(items.items())
    ]


def _db(path: Path, rows: list[dict[str, Any]]) -> Any:
    conn = metadata.create(path)
    metadata.insert(conn, rows)
    conn.commit()
    conn.close()
    return metadata.connect_readonly(path)


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory):
    c = _db(tmp_path_factory.mktemp("filters") / "meta.sqlite", _rows(IMAGES, "image") + _rows(TEXTS, "text"))
    yield c
    c.close()


def matches(conn: Any, flt: Any, kind: str = "image") -> set[int]:
    return {i for i, _, _ in metadata.matching(conn, kind, parse_filter(flt))}


CASES: list[tuple[dict[str, Any], set[int]]] = [
    ({}, ALL),
    ({"metadata.colour": "red"}, {0}),  # "Red" is another string
    ({"metadata.colour": {"eq": "red"}}, {0}),
    ({"metadata.colour": {"in": ["red", "Red"]}}, {0, 2}),
    ({"metadata.colour": {"ne": "red"}}, {1, 2, 3, 4}),  # items without the field too
    ({"metadata.colour": {"nin": ["red", "blue"]}}, {2, 3, 4}),
    ({"metadata.year": 2019}, {0, 4}),  # 2019.0 equals 2019; the string "2019" does not
    ({"metadata.year": "2019"}, {2}),
    ({"metadata.year": {"gte": 2019, "lt": 2021}}, {0, 4}),
    ({"metadata.year": {"gt": 2019}}, {1}),
    ({"metadata.year": {"in": [2021, "2019"]}}, {1, 2}),
    ({"metadata.score": {"lte": 0.5}}, {0}),
    ({"metadata.tags": "red"}, {0, 4}),  # an array containing it, or the scalar itself
    ({"metadata.tags": {"in": ["sky", "car"]}}, {0, 1}),
    ({"metadata.tags": {"nin": ["red"]}}, {1, 2, 3}),
    ({"metadata.tags": {"exists": True}}, {0, 1, 2, 4}),  # an empty list is a value
    ({"metadata.taken": {"gte": "2019-05-01", "lt": "2019-05-02"}}, {0, 4}),  # 12:00+02:00 is 10:00Z
    ({"metadata.taken": {"lt": "2019-05-01T10:00:00Z"}}, set()),
    ({"metadata.taken": {"lte": "2019-05-01 10:00Z"}}, {0, 4}),
    ({"metadata.taken": {"gte": "2020-01-01T00:00:00+00:00"}}, {1}),  # "not a date" never matches
    ({"metadata.taken": {"gt": 0}}, set()),  # a number bound compares numbers only
    ({"metadata.flag": True}, {0}),
    ({"metadata.flag": False}, {1}),
    ({"metadata.flag": 1}, {2}),  # a number is not a boolean
    ({"metadata.n": {"exists": True}}, set()),  # present but null
    ({"metadata.n": {"exists": False}}, ALL),
    ({"metadata.score": {"exists": True}}, {0}),
    ({"metadata": {"exists": False}}, {3}),
    ({"metadata.nested.a.b": 2}, {1}),
    ({"metadata.nested.a.b": {"gte": 1}}, {0, 1}),
    ({"metadata.obj": "red"}, set()),  # an object matches no comparison ...
    ({"metadata.obj": {"ne": "red"}}, ALL),
    ({"metadata.obj.colour": "red"}, {4}),  # ... its keys do
    ({"metadata.colour.x": "red"}, set()),  # a path through a string
    ({"width": {"gte": 100}}, {0, 2}),
    ({"width": 64, "height": 64}, {1}),
    ({"height": {"exists": False}}, {2, 3, 4}),
    ({"width": {"ne": 64}}, {0, 2, 3, 4}),
    ({"source": "photos"}, {0, 1, 2, 3, 4}),  # a trailing part at a "/"
    ({"source": "other/photos"}, {3}),
    ({"source": "/data/photos"}, {0, 1, 2, 4}),
    ({"source": "hotos"}, set()),
    ({"source": {"nin": ["other/photos"]}}, {0, 1, 2, 4}),
    ({"caption": "a red car"}, {0}),
    ({"caption": {"exists": True}}, {0}),
    ({"kind": "text"}, set()),
    ({"kind": {"in": ["image", "text"]}}, ALL),
    ({"id": {"in": [1, 3, 99]}}, {1, 3}),
    ({"id": {"gt": 1, "lte": 3}}, {2, 3}),
    ({"metadata.colour": {"in": []}}, set()),
    ({"metadata.colour": {"nin": []}}, ALL),
    ({"id": {"in": []}}, set()),
    ({"or": [{"metadata.colour": "blue"}, {"metadata.year": "2019"}]}, {1, 2}),
    ({"not": {"metadata.colour": "red"}}, {1, 2, 3, 4}),
    ({"and": [{"metadata.year": {"gte": 2019}}, {"not": {"metadata.tags": "red"}}]}, {1}),
    ({"metadata.year": 2019, "width": {"gte": 600}}, {0}),
    ({"or": [{"and": [{"width": 64}, {"metadata.flag": False}]}, {"metadata": {"exists": False}}]}, {1, 3}),
    ({"not": {"not": {"width": {"exists": True}}}}, {0, 1, 2}),
]


@pytest.mark.parametrize(("flt", "want"), CASES, ids=[str(c[0]) for c in CASES])
def test_each_operator_on_images(conn: Any, flt: dict[str, Any], want: set[int]) -> None:
    assert matches(conn, flt) == want


def test_text_items_and_their_builtins(conn: Any) -> None:
    assert matches(conn, {"image_id": 0}, "text") == {10}
    assert matches(conn, {"image_id": {"exists": False}}, "text") == {11}
    assert matches(conn, {"metadata.colour": "red"}, "text") == {10}
    assert matches(conn, {"caption": {"in": ["blue sky", "a red car"]}}, "text") == {10, 11}
    assert matches(conn, {"source": "captions.jsonl", "width": {"exists": False}}, "text") == {10, 11}
    assert matches(conn, {"kind": "text"}, "text") == {10, 11}
    assert matches(conn, {"metadata.year": 2019}, "text") == set()


def test_parse_builds_the_typed_tree() -> None:
    flt = parse_filter(
        {
            "metadata.year": {"gte": 2019, "lt": 2022},
            "or": [{"kind": "image"}, {"not": {"metadata.tags": {"in": ["a", 1, True]}}}],
            "width": {"exists": True},
            "metadata.taken": {"gt": "1970-01-02"},
        }
    )
    year = Field("metadata", ("year",))
    assert flt == And(
        (
            Range(year, (("gte", 2019), ("lt", 2022))),
            Or(
                (
                    Compare(Field("kind"), "eq", ("image",)),
                    Not(Compare(Field("metadata", ("tags",)), "in", ("a", 1, True))),
                )
            ),
            Exists(Field("width"), True),
            Range(Field("metadata", ("taken",)), (("gt", 86400.0),), dates=True),
        )
    )
    assert parse_filter({"id": 3}) == Compare(Field("id"), "eq", (3,))  # one entry: no And around it


def test_dates_parse_as_instants() -> None:
    t = filters.parse_time
    utc = timezone.utc
    assert t("2019-05-01") == datetime(2019, 5, 1, tzinfo=utc).timestamp()
    assert t("2019-05-01T12:00:00+02:00") == t("2019-05-01T10:00:00Z") == t("2019-05-01 10:00")
    assert (
        t("2019-05-01T10:00:00.250-0130") == datetime(2019, 5, 1, 11, 30, 0, 250000, tzinfo=utc).timestamp()
    )
    assert t("0001-01-01") < t("1969-12-31") < 0
    for bad in (
        "2019",
        "2019-13-01",
        "2019-02-30",
        "2019-05-01T24:00",
        "2019-05-01Z",
        "soon",
        "",
        2019,
        None,
    ):
        assert t(bad) is None, bad


ERRORS: list[tuple[Any, str]] = [
    ([], "filter: expected a JSON object, got a list"),
    ({"colour": "red"}, "filter.colour: unknown field (expected and, or, not, id, kind, source, caption"),
    ({"and": {}}, "filter.and: expected a non-empty list of filters"),
    ({"or": []}, "filter.or: expected a non-empty list of filters"),
    ({"and": [{"width": 1}, 3]}, "filter.and[1]: expected a JSON object, got a number"),
    (
        {"and": [{"width": 1}, {"metadata.year": {"gte": "soon"}}]},
        "filter.and[1].metadata.year.gte: expected a number or an ISO 8601 date, got 'soon'",
    ),
    ({"width": {"gte": "2019-01-01"}}, "filter.width.gte: expected a number, got '2019-01-01'"),
    ({"metadata.x": {"foo": 1}}, "filter.metadata.x.foo: unknown operator (expected one of eq, ne, in"),
    ({"metadata.x": {}}, "filter.metadata.x: no operator (one or more of eq, ne"),
    ({"metadata.x": None}, 'filter.metadata.x: null is not a value to compare with; use {"exists": false}'),
    ({"metadata.x": [1, 2]}, "filter.metadata.x: expected a string, a number or a boolean, got a list"),
    (
        {"metadata.x": {"eq": {"a": 1}}},
        "filter.metadata.x.eq: expected a string, a number or a boolean, got an",
    ),
    ({"metadata.x": {"in": "a"}}, "filter.metadata.x.in: expected a list of values, got a string"),
    ({"metadata.x": {"nin": [1, {}]}}, "filter.metadata.x.nin[1]: expected a string, a number or a boolean"),
    ({"kind": "video"}, "filter.kind: expected 'image' or 'text', got 'video'"),
    ({"kind": {"in": ["image", 2]}}, "filter.kind.in[1]: expected 'image' or 'text', got a number"),
    ({"width": True}, "filter.width: expected an integer, got a boolean"),
    ({"id": "3"}, "filter.id: expected an integer, got a string"),
    (
        {"caption": {"gt": 1}},
        "filter.caption.gt: ranges need a number or date field; caption is a string field",
    ),
    ({"metadata.x": {"exists": 1}}, "filter.metadata.x.exists: expected true or false, got a number"),
    ({"metadata.x": {"gte": 1, "lt": "2020-01-01"}}, "filter.metadata.x.lt: mixes number and date bounds"),
    ({"metadata.x": 2**70}, "filter.metadata.x: integer out of the 64-bit range"),
    ({"metadata.x": {"lt": math.inf}}, "filter.metadata.x.lt: expected a finite number"),
    ({"metadata.x": math.nan}, "filter.metadata.x: expected a finite number"),
    ({"metadata..x": 1}, "filter.metadata..x: a metadata key in a filter must be 1-200 printable ASCII"),
    ({'metadata.a"b': 1}, 'filter.metadata.a"b: a metadata key in a filter must be'),
    ({"metadata.\u00e9t\u00e9": 1}, "filter.metadata.\u00e9t\u00e9: a metadata key in a filter must be"),
    ({"metadata": "x"}, "filter.metadata: the whole metadata object takes only 'exists'"),
    ({"metadata": {"gte": 1}}, "filter.metadata.gte: the whole metadata object takes only 'exists'"),
    ({"not": [1]}, "filter.not: expected a JSON object, got a list"),
    ({"caption": {"in": ["ok", "\ud800"]}}, "filter.caption.in[1]: the string is not valid Unicode"),
    (
        {"not": {"not": {"not": {"not": {"not": {"not": {"not": {"not": {}}}}}}}}},
        "filter.not.not.not.not.not",
    ),
    ({"metadata.x": {"in": list(range(1001))}}, "filter.metadata.x.in[1000]: more than 1000 values"),
    ({"or": [{"id": i} for i in range(65)]}, "filter.or[64].id: more than 64 conditions in one filter"),
]


@pytest.mark.parametrize(
    ("flt", "message"), ERRORS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(ERRORS)]
)
def test_malformed_filters_name_the_json_path(flt: Any, message: str) -> None:
    with pytest.raises(FilterError) as err:
        parse_filter(flt)
    assert str(err.value).startswith(message), str(err.value)
    assert str(err.value) == f"{err.value.path}: {err.value.problem}"


def test_too_deep_names_the_limit() -> None:
    deep: dict[str, Any] = {"id": 1}
    for _ in range(7):
        deep = {"not": deep}
    assert isinstance(parse_filter(deep), Not)  # the id condition is the eighth object down
    with pytest.raises(FilterError, match=r"^filter(\.not){8}: nested deeper than 8 levels$"):
        parse_filter({"not": deep})


# -- random filters against an independent reading of the semantics ------------------------------------------
_MISSING = object()


def _get(item: dict[str, Any], field: str) -> Any:
    if not field.startswith("metadata"):
        value = item.get(field)
        return _MISSING if value is None else value
    value: Any = item.get("metadata")
    for key in field.split(".")[1:]:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return _MISSING if value is None else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) is str and a == b


def _elements(value: Any) -> list[Any]:
    if value is _MISSING or isinstance(value, dict):
        return []
    return value if isinstance(value, list) else [value]


def _in_range(v: Any, bounds: dict[str, Any]) -> bool:
    date = isinstance(next(iter(bounds.values())), str)
    if date:
        if not isinstance(v, str) or filters.parse_time(v) is None:
            return False
        v = filters.parse_time(v)
        bounds = {op: filters.parse_time(b) for op, b in bounds.items()}
    elif isinstance(v, bool) or not isinstance(v, int | float):
        return False
    ops = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
    return all(ops[op](v, b) for op, b in bounds.items())


def _holds(flt: dict[str, Any], item: dict[str, Any]) -> bool:
    for key, cond in flt.items():
        if key == "and" and not all(_holds(f, item) for f in cond):
            return False
        if key == "or" and not any(_holds(f, item) for f in cond):
            return False
        if key == "not" and _holds(cond, item):
            return False
        if key in ("and", "or", "not"):
            continue
        value = _get(item, key)
        ops = cond if isinstance(cond, dict) else {"eq": cond}
        bounds = {op: b for op, b in ops.items() if op in ("gt", "gte", "lt", "lte")}
        if bounds and not any(_in_range(e, bounds) for e in _elements(value)):
            return False
        for op, operand in ops.items():
            wanted = [operand] if op in ("eq", "ne") else operand
            hit = (
                any(_same(e, w) for e in _elements(value) for w in wanted)
                if op in ("eq", "ne", "in", "nin")
                else None
            )
            if (op in ("eq", "in") and not hit) or (op in ("ne", "nin") and hit):
                return False
            if op == "exists" and operand != (value is not _MISSING):
                return False
    return True


_VALUES: list[Any] = [
    "red",
    "blue",
    "Red",
    1,
    2,
    2.5,
    2019,
    True,
    False,
    "2019-05-01",
    "2020-02-03T04:05:06Z",
]


def _random_value(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.15:
        return None
    if r < 0.3:
        return [rng.choice(_VALUES) for _ in range(rng.randint(0, 3))]
    if r < 0.35:
        return {"x": rng.choice(_VALUES)}
    return rng.choice(_VALUES)


def _random_filter(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    r = rng.random()
    if depth < 3 and r < 0.15:
        return {rng.choice(["and", "or"]): [_random_filter(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if depth < 3 and r < 0.25:
        return {"not": _random_filter(rng, depth + 1)}
    field = rng.choice(["metadata.a", "metadata.b", "metadata.c.x", "width"])
    numeric = field == "width"
    scalar = (lambda: rng.randint(0, 3)) if numeric else (lambda: rng.choice(_VALUES))
    op = rng.choice(["eq", "ne", "in", "nin", "range", "exists", "short"])
    if op == "short":
        return {field: scalar()}
    if op in ("eq", "ne"):
        return {field: {op: scalar()}}
    if op in ("in", "nin"):
        return {field: {op: [scalar() for _ in range(rng.randint(0, 3))]}}
    if op == "exists":
        return {field: {"exists": rng.random() < 0.5}}
    if numeric or rng.random() < 0.5:
        lo = rng.choice([0, 1, 2, 2.5])
        return {
            field: {rng.choice(["gt", "gte"]): lo, rng.choice(["lt", "lte"]): lo + rng.choice([0, 1, 100])}
        }
    return {
        field: {
            rng.choice(["gt", "gte", "lt", "lte"]): rng.choice(["2019-05-01", "2019-05-01T00:00:01+01:00"])
        }
    }


def test_random_filters_agree_with_the_documented_semantics(tmp_path: Path) -> None:
    rng = random.Random(16)
    items: dict[int, dict[str, Any]] = {}
    for i in range(150):
        meta = {key: _random_value(rng) for key in ("a", "b", "c") if rng.random() < 0.8}
        items[i] = {"width": rng.choice([None, 0, 1, 2, 3]), "metadata": meta if rng.random() < 0.9 else None}
    conn = _db(tmp_path / "meta.sqlite", _rows(items, "image"))
    try:
        tried = 0
        sizes = set()
        for _ in range(400):
            flt = _random_filter(rng)
            want = {i for i, it in items.items() if _holds(flt, it)}
            assert matches(conn, flt) == want, flt
            sizes.add(len(want))
            tried += 1
        assert tried == 400 and len(sizes) > 20  # the filters were not all trivially empty or full
    finally:
        conn.close()


# -- metadata beside an image (folder sources) ---------------------------------------------------------------
def test_sidecar_json_holds_an_images_metadata(tmp_path: Path) -> None:
    from albef.index.sources import read_sources
    from tests.helpers.index import make_image

    make_image(tmp_path / "g" / "a.png", 1)
    (tmp_path / "g" / "a.json").write_text('{"place": "beach", "tags": ["sea"]}')
    (tmp_path / "g" / "a.txt").write_text("a beach\n")
    make_image(tmp_path / "g" / "sub" / "b.jpg", 2)
    (tmp_path / "g" / "sub" / "b.json").write_text('{"year": 2020}')
    make_image(tmp_path / "g" / "c.png", 3)
    recs = {Path(r.image).name: r for r in read_sources([tmp_path / "g"])}
    assert recs["a.png"].metadata == {"place": "beach", "tags": ["sea"]} and recs["a.png"].captions == [
        "a beach"
    ]
    assert recs["b.jpg"].metadata == {"year": 2020} and recs["c.png"].metadata is None
    (single,) = read_sources([tmp_path / "g" / "a.png"])  # a single image file reads its sidecar too
    assert single.metadata == {"place": "beach", "tags": ["sea"]}


@pytest.mark.parametrize(
    ("content", "where", "error"),
    [
        (b'{"a": 1,\n "b": }', "a.json:2", "metadata file is not valid JSON"),
        (b"[1, 2]", "a.json:0", "metadata file must hold a JSON object (of a.png), got list"),
        (b'{"a": "\xff"}', "a.json:0", "metadata file unreadable"),
    ],
)
def test_a_bad_sidecar_names_its_file(tmp_path: Path, content: bytes, where: str, error: str) -> None:
    from albef.index.errors import SourceError
    from albef.index.sources import read_sources
    from albef.model.data import formats
    from tests.helpers.index import make_image

    make_image(tmp_path / "g" / "a.png", 1)
    make_image(tmp_path / "g" / "b.png", 2)
    (tmp_path / "g" / "a.json").write_bytes(content)
    side = tmp_path / "g" / where
    with pytest.raises(SourceError) as err:  # the index build's strict policy
        list(read_sources([tmp_path / "g"]))
    assert str(err.value).startswith(f"{side.parent / where}: {error}"), str(err.value)
    problems: list[formats.Problem] = []  # training's skip policy: the image is left out and reported
    rows = list(formats.read_source(tmp_path / "g", policy="skip", problems=problems))
    assert [Path(r.image).name for r in rows] == ["b.png"]
    assert [(p.where, p.path) for p in problems] == [
        (str(side.parent / where), str(tmp_path / "g" / "a.png"))
    ]
