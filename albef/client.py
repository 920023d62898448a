"""A Python client of the albef-search REST API: ``Client`` (blocking) and ``AsyncClient`` (asyncio), on httpx.

Responses are the server's own pydantic models (:mod:`albef.service.schemas`), so a client and a server of the
same version agree on every field. What the two classes share lives here once: building each request, reading
each response, turning an error body into :class:`ApiError`, and the retry rule (a 503 is retried up to
``retries`` times, waiting what its ``Retry-After`` says, capped at ``max_retry_wait`` seconds; other errors are
raised at once).

    from albef.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        hits = c.search_images("a red circle left of a blue square", k=8, filter={"metadata.year": {"gte": 2020}})
        for hit in hits.results:
            print(hit.rank, hit.itc_rank, hit.match_probability, hit.metadata.image_url)
        captions = c.search_texts("photo.png")  # a path, bytes, a file object or a PIL image
        why = c.explain("a red circle", item_id=hits.results[0].id, per_word=True)  # or an image, as above
        print(why.side, why.grid, [w.token for w in why.words], why.overlay_on)  # overlay_png_base64: a PNG

Needs httpx (``pip install 'albef-search[client]'``); torch-free.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx
from pydantic import BaseModel

from albef.service.schemas import ExplainResponse, IndexInfo, Item, SearchResponse

__all__ = ["ApiError", "AsyncClient", "Client", "ImageInput"]

# An image to search with: a path, its bytes, an open binary file, or a PIL image (sent as PNG).
ImageInput = str | Path | bytes | BinaryIO | Any

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """A 4xx/5xx answer: the HTTP status and the server's error body (``code``, ``message``, ``field``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        details: list[dict[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.field = status, code, message, field
        self.details, self.retry_after = details, retry_after


@dataclass(frozen=True)
class _Call:
    """One request, built once for both clients."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if hasattr(image, "read"):
        return image.read()
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image is a path, bytes, a binary file or a PIL image, not {type(image).__name__}")


def _options(
    k: int | None,
    rerank: bool,
    rerank_k: int | None,
    exclude: Sequence[int],
    filter: Mapping[str, Any] | None = None,
    min_itc_score: float | None = None,
    min_match_probability: float | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"rerank": rerank}
    if k is not None:
        out["k"] = k
    if rerank_k is not None:
        out["rerank_k"] = rerank_k
    if exclude:
        out["exclude"] = [int(i) for i in exclude]
    if filter is not None:
        out["filter"] = dict(filter)
    if min_itc_score is not None:
        out["min_itc_score"] = float(min_itc_score)
    if min_match_probability is not None:
        out["min_match_probability"] = float(min_match_probability)
    return out


def _images_call(text: str | None, item_id: int | None, **options: Any) -> _Call:
    if (text is None) == (item_id is None):
        raise ValueError("give exactly one of text and item_id")
    body = {"text": text} if text is not None else {"item_id": item_id}
    return _Call("POST", "/v1/search/images", json={**body, **_options(**options)})


def _form(fields: Mapping[str, Any]) -> dict[str, str]:
    """Fields as multipart form values: booleans as true/false, floats exactly (repr), sequences (``exclude``)
    comma-separated, mappings (``filter``) as a JSON string."""
    out: dict[str, str] = {}
    for key, v in fields.items():
        if isinstance(v, bool):
            out[key] = "true" if v else "false"
        elif isinstance(v, float):
            out[key] = repr(v)
        elif isinstance(v, Mapping):
            out[key] = json.dumps(v)
        elif isinstance(v, list | tuple):
            out[key] = ",".join(str(i) for i in v)
        else:
            out[key] = str(v)
    return out


def _image_call(path: str, image: ImageInput | None, item_id: int | None, fields: dict[str, Any]) -> _Call:
    """A route that takes an image or the id of an indexed one: the id in a JSON body, the image as the file
    part ``image`` of a multipart form with ``fields`` as form fields."""
    if (image is None) == (item_id is None):
        raise ValueError("give exactly one of image and item_id")
    if item_id is not None:
        return _Call("POST", path, json={**fields, "item_id": item_id})
    return _Call(
        "POST",
        path,
        files={"image": ("query", _image_bytes(image), "application/octet-stream")},
        data=_form(fields),
    )


def _texts_call(image: ImageInput | None, item_id: int | None, **options: Any) -> _Call:
    return _image_call("/v1/search/texts", image, item_id, _options(**options))


def _explain_call(
    text: str, image: ImageInput | None, item_id: int | None, per_word: bool, overlay: bool
) -> _Call:
    fields = {"text": text, "per_word": bool(per_word), "overlay": bool(overlay)}
    return _image_call("/v1/explain", image, item_id, fields)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        err = {"code": "http_error", "message": response.text[:500] or response.reason_phrase}
    raise ApiError(
        response.status_code,
        err.get("code", "http_error"),
        err.get("message", ""),
        err.get("field"),
        err.get("details"),
        _retry_after(response),
    )


def _parse(response: httpx.Response, model: type[M]) -> M:
    _raise_for_error(response)
    return model.model_validate(response.json())


class _Base:
    def __init__(
        self, base_url: str, *, api_key: str | None, timeout: float, retries: int, max_retry_wait: float
    ) -> None:
        if retries < 0 or max_retry_wait < 0:
            raise ValueError("retries and max_retry_wait must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.timeout, self.retries, self.max_retry_wait = timeout, retries, max_retry_wait

    def _wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying ``response``, or None to give up (not a 503, or out of retries)."""
        if response.status_code != 503 or attempt >= self.retries:
            return None
        after = _retry_after(response)
        return min(1.0 if after is None else after, self.max_retry_wait)  # no header: 1 s; "0" means now


class Client(_Base):
    """Blocking client. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, timeout=timeout, retries=retries, max_retry_wait=max_retry_wait
        )
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            r = self._http.request(call.method, call.path, json=call.json, files=call.files, data=call.data)
            wait = self._wait(r, attempt)
            if wait is None:
                return r
            time.sleep(wait)
            attempt += 1

    def search_images(
        self,
        text: str | None = None,
        *,
        item_id: int | None = None,
        k: int | None = None,
        rerank: bool = True,
        rerank_k: int | None = None,
        exclude: Sequence[int] = (),
        filter: Mapping[str, Any] | None = None,
        min_itc_score: float | None = None,
        min_match_probability: float | None = None,
    ) -> SearchResponse:
        """Text -> images: a query text, or the id of an indexed text. ``filter`` (the grammar of
        service/API.md, Filters) narrows the candidates; ``min_itc_score``/``min_match_probability`` drop weaker
        results (the response's ``cut`` counts them)."""
        call = _images_call(
            text,
            item_id,
            k=k,
            rerank=rerank,
            rerank_k=rerank_k,
            exclude=exclude,
            filter=filter,
            min_itc_score=min_itc_score,
            min_match_probability=min_match_probability,
        )
        return _parse(self._send(call), SearchResponse)

    def search_texts(
        self,
        image: ImageInput | None = None,
        *,
        item_id: int | None = None,
        k: int | None = None,
        rerank: bool = True,
        rerank_k: int | None = None,
        exclude: Sequence[int] = (),
        filter: Mapping[str, Any] | None = None,
        min_itc_score: float | None = None,
        min_match_probability: float | None = None,
    ) -> SearchResponse:
        """Image -> texts: an image (path, bytes, file, PIL image), or the id of an indexed image; the filter and
        the thresholds as for :meth:`search_images` (in a multipart upload the filter goes as a JSON string)."""
        call = _texts_call(
            image,
            item_id,
            k=k,
            rerank=rerank,
            rerank_k=rerank_k,
            exclude=exclude,
            filter=filter,
            min_itc_score=min_itc_score,
            min_match_probability=min_match_probability,
        )
        return _parse(self._send(call), SearchResponse)

    def explain(
        self,
        text: str,
        image: ImageInput | None = None,
        *,
        item_id: int | None = None,
        per_word: bool = False,
        overlay: bool = True,
    ) -> ExplainResponse:
        """Where in an image ``text`` matched (``POST /v1/explain``): an image (path, bytes, file, PIL image) or
        the id of an indexed image. The Grad-CAM grid, with ``per_word`` one grid per WordPiece, and with
        ``overlay`` the heat map over the image as a base64 PNG. A bundle without the explain graph: ApiError
        409 ``explain_unavailable``."""
        call = _explain_call(text, image, item_id, per_word, overlay)
        return _parse(self._send(call), ExplainResponse)

    def item(self, item_id: int) -> Item:
        return _parse(self._send(_Call("GET", f"/v1/items/{int(item_id)}")), Item)

    def item_image(self, item_id: int) -> bytes:
        r = self._send(_Call("GET", f"/v1/items/{int(item_id)}/image"))
        _raise_for_error(r)
        return r.content

    def index_info(self) -> IndexInfo:
        return _parse(self._send(_Call("GET", "/v1/index")), IndexInfo)

    def ready(self) -> bool:
        """True when the server answers /readyz with 200 (no retries: a probe)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncClient(_Base):
    """asyncio client with the same methods as :class:`Client` (awaitable). Use ``async with`` or ``aclose``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, timeout=timeout, retries=retries, max_retry_wait=max_retry_wait
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            r = await self._http.request(
                call.method, call.path, json=call.json, files=call.files, data=call.data
            )
            wait = self._wait(r, attempt)
            if wait is None:
                return r
            await asyncio.sleep(wait)
            attempt += 1

    async def search_images(
        self,
        text: str | None = None,
        *,
        item_id: int | None = None,
        k: int | None = None,
        rerank: bool = True,
        rerank_k: int | None = None,
        exclude: Sequence[int] = (),
        filter: Mapping[str, Any] | None = None,
        min_itc_score: float | None = None,
        min_match_probability: float | None = None,
    ) -> SearchResponse:
        call = _images_call(
            text,
            item_id,
            k=k,
            rerank=rerank,
            rerank_k=rerank_k,
            exclude=exclude,
            filter=filter,
            min_itc_score=min_itc_score,
            min_match_probability=min_match_probability,
        )
        return _parse(await self._send(call), SearchResponse)

    async def search_texts(
        self,
        image: ImageInput | None = None,
        *,
        item_id: int | None = None,
        k: int | None = None,
        rerank: bool = True,
        rerank_k: int | None = None,
        exclude: Sequence[int] = (),
        filter: Mapping[str, Any] | None = None,
        min_itc_score: float | None = None,
        min_match_probability: float | None = None,
    ) -> SearchResponse:
        call = _texts_call(
            image,
            item_id,
            k=k,
            rerank=rerank,
            rerank_k=rerank_k,
            exclude=exclude,
            filter=filter,
            min_itc_score=min_itc_score,
            min_match_probability=min_match_probability,
        )
        return _parse(await self._send(call), SearchResponse)

    async def explain(
        self,
        text: str,
        image: ImageInput | None = None,
        *,
        item_id: int | None = None,
        per_word: bool = False,
        overlay: bool = True,
    ) -> ExplainResponse:
        call = _explain_call(text, image, item_id, per_word, overlay)
        return _parse(await self._send(call), ExplainResponse)

    async def item(self, item_id: int) -> Item:
        return _parse(await self._send(_Call("GET", f"/v1/items/{int(item_id)}")), Item)

    async def item_image(self, item_id: int) -> bytes:
        r = await self._send(_Call("GET", f"/v1/items/{int(item_id)}/image"))
        _raise_for_error(r)
        return r.content

    async def index_info(self) -> IndexInfo:
        return _parse(await self._send(_Call("GET", "/v1/index")), IndexInfo)

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
