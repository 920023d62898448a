"""The filter grammar of searches: JSON -> a typed tree (:func:`parse_filter`) -> one SQLite condition over the
``items`` table (:func:`to_sql`). Pure Python (no torch, numpy or faiss): the service parses with it, the index
reader evaluates with it. The grammar, as service/API.md documents it::

    filter    := {entry, ...}                  every entry holds (an empty object matches every item)
    entry     := "and": [filter, ...]          each of one or more filters holds
               | "or":  [filter, ...]          at least one of one or more filters holds
               | "not": filter                 the filter does not hold
               | FIELD: SCALAR                 shorthand for FIELD: {"eq": SCALAR}
               | FIELD: {OP: operand, ...}     every operator holds
    FIELD     := id | kind | source | caption | width | height | image_id    (built-in columns)
               | metadata                      (the whole user object; "exists" only)
               | metadata.KEY[.KEY...]         (a value inside the user JSON, by object keys)
    OP        := eq | ne (a scalar) | in | nin (a list of scalars) | gt | gte | lt | lte (a number, or an
                 ISO 8601 date or date-time string) | exists (true or false)

Semantics (the SQL of :func:`to_sql` implements exactly these; tests/index/test_filters.py checks them):

- Types are strict: a string equals only a string, a number only a number (``3`` equals ``3.0``), a boolean
  only a boolean. ``null`` is not an operand: ``exists`` asks whether a field has a value.
- On a metadata value that is a JSON array, ``eq``/``in`` and the ranges hold when some element satisfies
  them (all range bounds of one condition by the same element); ``ne``/``nin`` are their negations (no
  element equals). An object value satisfies no comparison (address its keys with a longer path).
- ``ne``, ``nin`` and ``not`` also hold for items that lack the field; ``exists: true`` holds when the field
  is present and not null.
- Ranges with a number compare numbers only; with a date they compare only string values that parse as ISO
  8601 dates (:func:`parse_time`: ``YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|+HH:MM]``; a time without an offset
  is UTC, a date alone is its midnight UTC), as instants. One condition cannot mix number and date bounds.
- ``source`` (the file or folder the item was indexed from, recorded resolved) equals a value that is its
  whole path or a trailing part of it at a ``/`` (``"captions.jsonl"``, ``"data/captions.jsonl"``).
- ``kind`` is ``"image"`` or ``"text"``; ``id``, ``width``, ``height``, ``image_id`` are integers (texts have
  no width/height; ``image_id`` is a text's paired image); ``caption`` is the caption as indexed.

Errors are :class:`FilterError` with the JSON path of the bad part (``filter.and[1].metadata.year.gte``) and
what was expected there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

__all__ = [
    "And",
    "Compare",
    "Exists",
    "Field",
    "Filter",
    "FilterError",
    "LIMITS",
    "Not",
    "Or",
    "Range",
    "parse_filter",
    "parse_time",
    "to_sql",
    "TIME_FUNCTION",
]

Scalar = str | int | float | bool
CompareOp = Literal["eq", "ne", "in", "nin"]
RangeOp = Literal["gt", "gte", "lt", "lte"]

BUILTIN: dict[str, str] = {  # built-in field -> its type
    "id": "int",
    "kind": "kind",
    "source": "source",
    "caption": "str",
    "width": "int",
    "height": "int",
    "image_id": "int",
}
OPERATORS = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "exists")
_RANGE_SQL = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
LIMITS = {"depth": 8, "conditions": 64, "values": 1000, "key_chars": 200}
INT64 = (-(2**63), 2**63 - 1)
TIME_FUNCTION = "albef_time"  # the SQLite function :func:`parse_time` is registered as (albef.index.metadata)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ISO_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?(Z|z|[+-]\d{2}:?\d{2})?)?\Z",
    re.ASCII,
)


class FilterError(ValueError):
    """A malformed filter: ``path`` is where in the JSON (``filter.and[0].width.gte``), ``problem`` what."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class Field:
    """A built-in column (``name``) or a value inside the user metadata (``name == "metadata"``, ``keys``)."""

    name: str
    keys: tuple[str, ...] = ()

    @property
    def is_metadata(self) -> bool:
        return self.name == "metadata"

    def __str__(self) -> str:
        return ".".join((self.name, *self.keys))


@dataclass(frozen=True)
class Compare:
    """``eq``/``in`` (some value equals) or ``ne``/``nin`` (none does)."""

    field: Field
    op: CompareOp
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Range:
    """All ``bounds`` hold (for an array, by one element). ``dates``: the bounds are instants (seconds since
    the epoch, UTC) compared with string values that parse as ISO 8601."""

    field: Field
    bounds: tuple[tuple[RangeOp, float], ...]
    dates: bool = False


@dataclass(frozen=True)
class Exists:
    field: Field
    present: bool


@dataclass(frozen=True)
class And:
    parts: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    parts: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    part: Filter


Filter = And | Or | Not | Compare | Range | Exists


# -- parsing ---------------------------------------------------------------------------------------------------
def parse_time(value: Any) -> float | None:
    """An ISO 8601 date (``2019-05-01``) or date-time (``2019-05-01T12:30``, seconds and a fraction
    optional, ``T`` or a space, then an optional ``Z``/``+HH:MM``/``-HHMM`` offset) -> seconds since
    1970-01-01 UTC; None for anything else. A time without an offset is taken as UTC, a date alone is its
    midnight UTC. The one parser of dates, for operands and stored values alike (the same on every Python)."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    m = _ISO_TIME.match(value)
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, offset = m.groups()
    tz = timezone.utc
    if offset and offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[-2:])
        if hours > 23 or minutes > 59:
            return None
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        dt = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((frac or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:  # month 13, February 30, hour 24, ...
        return None
    return (dt - _EPOCH).total_seconds()


class _Parser:
    def __init__(self) -> None:
        self.conditions = 0
        self.values = 0

    def filter(self, obj: Any, path: str, depth: int) -> Filter:
        if not isinstance(obj, dict):
            raise FilterError(path, f"expected a JSON object, got {_kind(obj)}")
        if depth > LIMITS["depth"]:
            raise FilterError(path, f"nested deeper than {LIMITS['depth']} levels")
        parts: list[Filter] = []
        for key, value in obj.items():
            sub = _at(path, key)
            if key in ("and", "or"):
                if not isinstance(value, list) or not value:
                    raise FilterError(sub, "expected a non-empty list of filters")
                items = tuple(self.filter(v, f"{sub}[{i}]", depth + 1) for i, v in enumerate(value))
                parts.append(And(items) if key == "and" else Or(items))
            elif key == "not":
                parts.append(Not(self.filter(value, sub, depth + 1)))
            else:
                parts.extend(self.condition(_field(key, sub), value, sub))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def condition(self, field: Field, value: Any, path: str) -> list[Filter]:
        if not isinstance(value, dict):
            ops: dict[str, Any] = {"eq": value}
            at = {"eq": path}  # the shorthand: errors name the field itself
        else:
            if not value:
                raise FilterError(path, f"no operator (one or more of {', '.join(OPERATORS)})")
            ops = value
            at = {op: _at(path, op) for op in ops}
        out: list[Filter] = []
        bounds: list[tuple[RangeOp, float]] = []
        kinds: set[str] = set()
        for op, operand in ops.items():
            self.conditions += 1
            if self.conditions > LIMITS["conditions"]:
                raise FilterError(at[op], f"more than {LIMITS['conditions']} conditions in one filter")
            if op in ("eq", "ne"):
                out.append(Compare(field, op, (self.scalar(field, operand, at[op]),)))
            elif op in ("in", "nin"):
                if not isinstance(operand, list):
                    raise FilterError(at[op], f"expected a list of values, got {_kind(operand)}")
                vals = tuple(self.scalar(field, v, f"{at[op]}[{i}]") for i, v in enumerate(operand))
                out.append(Compare(field, op, vals))
            elif op in _RANGE_SQL:
                bound, kind = self.bound(field, operand, at[op])
                if kinds and kind not in kinds:
                    raise FilterError(at[op], "mixes number and date bounds in one condition")
                kinds.add(kind)
                bounds.append((op, bound))  # type: ignore[arg-type]
            elif op == "exists":
                if not isinstance(operand, bool):
                    raise FilterError(at[op], f"expected true or false, got {_kind(operand)}")
                out.append(Exists(field, operand))
            else:
                raise FilterError(at[op], f"unknown operator (expected one of {', '.join(OPERATORS)})")
        if bounds:
            out.append(Range(field, tuple(bounds), dates=kinds == {"date"}))
        return out

    def scalar(self, field: Field, value: Any, path: str) -> Scalar:
        self.values += 1
        if self.values > LIMITS["values"]:
            raise FilterError(path, f"more than {LIMITS['values']} values in one filter")
        if field.keys == () and field.name == "metadata":
            raise FilterError(path, "the whole metadata object takes only 'exists'; name a key: metadata.KEY")
        kind = BUILTIN.get(field.name, "any")
        if value is None:
            raise FilterError(path, 'null is not a value to compare with; use {"exists": false}')
        if isinstance(value, bool):
            if kind != "any":
                raise FilterError(path, f"expected {_expects(kind)}, got a boolean")
            return value
        if isinstance(value, int | float):
            if kind in ("str", "source", "kind"):
                raise FilterError(path, f"expected {_expects(kind)}, got a number")
            return _number(value, path)
        if isinstance(value, str):
            _unicode(value, path)
            if kind == "int":
                raise FilterError(path, f"expected {_expects(kind)}, got a string")
            if kind == "kind" and value not in ("image", "text"):
                raise FilterError(path, f"expected 'image' or 'text', got {value[:40]!r}")
            return value
        raise FilterError(path, f"expected {_expects(kind)}, got {_kind(value)}")

    def bound(self, field: Field, value: Any, path: str) -> tuple[float, str]:
        self.values += 1
        kind = BUILTIN.get(field.name, "any")
        if field.is_metadata and not field.keys:
            raise FilterError(path, "the whole metadata object takes only 'exists'; name a key: metadata.KEY")
        if kind in ("str", "source", "kind"):
            raise FilterError(path, f"ranges need a number or date field; {field} is a string field")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _number(value, path), "number"
        if kind == "any" and isinstance(value, str):
            t = parse_time(value)
            if t is not None:
                return t, "date"
        expected = "a number or an ISO 8601 date" if kind == "any" else "a number"
        shown = repr(value[:40]) if isinstance(value, str) else _kind(value)
        raise FilterError(path, f"expected {expected}, got {shown}")


def parse_filter(obj: Any, path: str = "filter") -> Filter:
    """The typed tree of a filter given as parsed JSON, or :class:`FilterError` naming the bad part."""
    return _Parser().filter(obj, path, 1)


def _field(key: str, path: str) -> Field:
    if key in BUILTIN:
        return Field(key)
    if key == "metadata":
        return Field("metadata")
    if key.startswith("metadata."):
        keys = tuple(key[len("metadata.") :].split("."))
        for k in keys:
            # SQLite's JSON paths match a key as stored; json.dumps escapes quotes, backslashes, control and
            # non-ASCII characters, so only keys of printable ASCII can be addressed.
            if not k or len(k) > LIMITS["key_chars"] or any(c in '"\\' or not " " <= c <= "~" for c in k):
                raise FilterError(
                    path,
                    "a metadata key in a filter must be 1-200 printable ASCII characters without '\"' or '\\'",
                )
        return Field("metadata", keys)
    known = ", ".join(BUILTIN)
    raise FilterError(path, f"unknown field (expected and, or, not, {known}, metadata or metadata.KEY)")


def _unicode(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") that JSON can carry but UTF-8 cannot
        raise FilterError(path, "the string is not valid Unicode (a lone surrogate)") from exc


def _number(value: int | float, path: str) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(path, "expected a finite number")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise FilterError(path, "integer out of the 64-bit range")
    return value


def _expects(kind: str) -> str:
    return {
        "int": "an integer",
        "str": "a string",
        "source": "a string (a source file or folder)",
        "kind": "'image' or 'text'",
        "any": "a string, a number or a boolean",
    }[kind]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _at(path: str, key: str) -> str:
    return f"{path}.{key}"


# -- SQL -------------------------------------------------------------------------------------------------------
def to_sql(flt: Filter) -> tuple[str, list[Any]]:
    """A condition over the ``items`` table (never NULL: 1 or 0) and its positional parameters. Date ranges
    call the SQLite function :data:`TIME_FUNCTION` (:func:`parse_time`), which the connection must have."""
    params: list[Any] = []
    return _sql(flt, params), params


def _sql(flt: Filter, params: list[Any]) -> str:
    if isinstance(flt, And):
        return "(" + " AND ".join(_sql(p, params) for p in flt.parts) + ")" if flt.parts else "1"
    if isinstance(flt, Or):
        return "(" + " OR ".join(_sql(p, params) for p in flt.parts) + ")"
    if isinstance(flt, Not):
        return f"(NOT {_sql(flt.part, params)})"
    if flt.field.is_metadata:
        return _metadata_sql(flt, params)
    return _column_sql(flt, params)


def _column_sql(flt: Compare | Range | Exists, params: list[Any]) -> str:
    col = flt.field.name
    if isinstance(flt, Exists):
        return f"({col} IS {'NOT ' if flt.present else ''}NULL)"
    if isinstance(flt, Range):
        params.extend(b for _, b in flt.bounds)
        test = " AND ".join(f"{col} {_RANGE_SQL[op]} ?" for op, _ in flt.bounds)
        return f"IFNULL(({test}), 0)"
    if not flt.values:
        hit = "0"
    elif col == "source":
        tests = []
        for v in flt.values:
            params.extend((v, len(v) + 1, "/" + str(v)))
            tests.append("source = ? OR substr(source, -?) = ?")
        hit = f"IFNULL(({' OR '.join(tests)}), 0)"
    else:
        params.extend(flt.values)
        hit = f"IFNULL({col} IN ({', '.join('?' * len(flt.values))}), 0)"
    return f"(NOT {hit})" if flt.op in ("ne", "nin") else hit


def _metadata_sql(flt: Compare | Range | Exists, params: list[Any]) -> str:
    path = "$" + "".join(f'."{k}"' for k in flt.field.keys)
    if isinstance(flt, Exists):
        params.append(path)
        test = "IFNULL(json_type(metadata, ?) NOT IN ('null'), 0)"
        return test if flt.present else f"(NOT {test})"
    if isinstance(flt, Compare) and not flt.values:
        return "1" if flt.op == "nin" else "0"
    # json_each over the path yields a scalar itself, or each element of an array (or the members of an
    # object, which the type check leaves out; a missing path yields nothing): one test of (e.type, e.atom).
    params.extend((path, path))
    if isinstance(flt, Range):
        v = f"{TIME_FUNCTION}(e.atom)" if flt.dates else "e.atom"
        types = "e.type = 'text'" if flt.dates else "e.type IN ('integer', 'real')"
        test = " AND ".join([types, *(f"{v} {_RANGE_SQL[op]} ?" for op, _ in flt.bounds)])
        params.extend(b for _, b in flt.bounds)
    else:
        test = _equals_sql(flt.values, params)
    sql = (
        "(json_type(metadata, ?) IS NOT 'object' AND EXISTS "
        f"(SELECT 1 FROM json_each(metadata, ?) AS e WHERE IFNULL(({test}), 0)))"
    )
    return f"(NOT {sql})" if isinstance(flt, Compare) and flt.op in ("ne", "nin") else sql


def _equals_sql(values: Sequence[Scalar], params: list[Any]) -> str:
    """Some value equals ``(e.type, e.atom)``: one test per JSON type group (strings, numbers, true, false)."""
    strings = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    tests = []
    if strings:
        tests.append(f"(e.type = 'text' AND e.atom IN ({', '.join('?' * len(strings))}))")
        params.extend(strings)
    if numbers:
        tests.append(f"(e.type IN ('integer', 'real') AND e.atom IN ({', '.join('?' * len(numbers))}))")
        params.extend(numbers)
    for b in (True, False):
        if any(v is b for v in values):
            tests.append(f"e.type = '{'true' if b else 'false'}'")
    return " OR ".join(tests)
