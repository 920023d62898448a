"""Request and response models of the HTTP API (pydantic v2). Requests reject unknown fields.

Static bounds live here; the limits that come from the settings (``max_k``, ``max_rerank_k``,
``max_text_chars``) are checked by the routes, which answer 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ImageSearchRequest",
    "TextSearchRequest",
    "Hit",
    "Item",
    "SearchResponse",
    "Cut",
    "FilterInfo",
    "Timings",
    "IndexInfo",
    "ErrorResponse",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, description="number of results (default ALBEF_DEFAULT_K)")
    rerank: bool = Field(True, description="re-rank the top rerank_k ITC candidates with the ITM head")
    rerank_k: int | None = Field(
        None,
        ge=1,
        description="ITC candidates re-ranked by ITM (default ALBEF_DEFAULT_RERANK_K); when k > "
        "rerank_k the results after the re-ranked ones follow in ITC order",
    )
    # le: ids are SQLite/FAISS int64; a larger number would overflow the lookup instead of being "not found".
    item_id: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="query with an indexed item (its stored vector and features) instead of new content",
    )
    exclude: list[int] = Field(
        default_factory=list,
        max_length=1000,
        description="item ids to leave out of the results (nothing is excluded by default)",
    )
    filter: dict[str, Any] | None = Field(
        None,
        description="only items this filter holds for are candidates (before re-ranking), e.g. "
        '{"metadata.year": {"gte": 2019}, "or": [{"width": {"gte": 640}}, {"metadata.tags": "red"}]}. '
        "Fields: id, kind, source, caption, width, height, image_id, metadata, metadata.KEY[.KEY]; operators "
        "eq, ne, in, nin, gt, gte, lt, lte (numbers or ISO 8601 dates), exists; and/or/not. The grammar: "
        "service/API.md, Filters",
        examples=[{"metadata.colour": "red", "width": {"gte": 64}}],
    )
    min_itc_score: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="drop candidates whose ITC cosine is below this (before re-ranking); cut.min_itc_score "
        "counts them",
    )
    min_match_probability: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="drop results whose match probability (softmax of the ITM logits, not calibrated) is "
        "below this; needs rerank=true; results after the re-ranked head have none and are dropped too",
    )


class ImageSearchRequest(_Request):
    """Text -> images: a query text, or ``item_id`` of an indexed text."""

    text: str | None = Field(None, min_length=1, description="the query text")

    @model_validator(mode="after")
    def _one_query(self) -> ImageSearchRequest:
        if (self.text is None) == (self.item_id is None):
            raise ValueError("give exactly one of 'text' and 'item_id'")
        return self


class TextSearchRequest(_Request):
    """Image -> texts: an image (base64 in JSON, or a multipart upload), or ``item_id`` of an indexed image."""

    image_base64: str | None = Field(None, min_length=1, description="the query image, base64-encoded")

    @model_validator(mode="after")
    def _one_query(self) -> TextSearchRequest:
        if (self.image_base64 is None) == (self.item_id is None):
            raise ValueError("give exactly one of 'image_base64' (or a multipart 'image') and 'item_id'")
        return self


class Item(BaseModel):
    """An indexed item. Local file paths are never exposed; images are fetched with ``image_url``."""

    id: int
    kind: Literal["image", "text"]
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str
    image_id: int | None = Field(None, description="for a text: the image it was indexed with, if any")
    image_url: str | None = Field(None, description="for an image held as a local file: where to GET it")
    uri: str | None = Field(None, description="for an image held by URI: that URI")
    metadata: Any = Field(None, description="the user metadata stored with the item")


class Hit(BaseModel):
    id: int
    rank: int = Field(description="1-based position in the results")
    itc_rank: int = Field(
        description="1-based position in the ITC order of the candidates, before re-ranking "
        "(rank - itc_rank is how far the ITM head moved it)"
    )
    itc_score: float = Field(description="cosine similarity of the ITC embeddings")
    itm_score: float | None = Field(None, description="ITM logit of class 'match' (None if not re-ranked)")
    match_probability: float | None = Field(
        None,
        description="softmax of the two ITM logits, class 'match' (None if not re-ranked): a score, not a "
        "calibrated likelihood",
    )
    metadata: Item


class Timings(BaseModel):
    encode: float = Field(description="query encoding (decode + encoder, or the stored-item lookup), ms")
    ann: float = Field(description="FAISS search, ms")
    rerank: float = Field(description="feature fetch + ITM head, ms")
    total: float = Field(description="whole request, ms")
    model: float = Field(
        0.0,
        description="of the total, the model calls (query encoder, ITM head), ms; a call shared with other "
        "searches (micro-batching) counts whole",
    )


class Cut(BaseModel):
    min_itc_score: int = Field(0, description="candidates dropped for an ITC score below min_itc_score")
    min_match_probability: int = Field(
        0,
        description="candidates dropped by min_match_probability: re-ranked ones below it, and those after "
        "the re-ranked head (they have no probability)",
    )


class FilterInfo(BaseModel):
    matched: int = Field(description="items of the searched kind that the filter holds for")
    exact: bool = Field(
        description="true: ranked by the exact ITC score among the matches; false: by the ANN index "
        "searched with the matching ids as a selector (as approximate as an unfiltered search)"
    )


class SearchResponse(BaseModel):
    results: list[Hit]
    timings_ms: Timings
    k: int
    rerank: bool
    rerank_k: int
    candidates: int = Field(
        0, description="ITC candidates the results were drawn from (after the filter and exclude)"
    )
    cut: Cut = Field(default_factory=Cut, description="how many candidates each threshold dropped")
    filter: FilterInfo | None = Field(None, description="with a filter: how many items it matched")
    query: dict[str, Any] = Field(description="what was searched with (kind, item_id or text)")
    index_version: str
    bundle_id: str


class IndexInfo(BaseModel):
    version: str
    counts: dict[str, int]
    model: dict[str, Any]
    factory: dict[str, str | None]
    ann: dict[str, Any]
    created: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: list[dict[str, str]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- POST /v1/explain (issue 16, part 3) ---------------------------------------------------------------------
class ExplainRequest(BaseModel):
    """Why a text matches an image: the text, and the image as ``item_id`` (an indexed image) or
    ``image_base64`` (or a multipart ``image`` upload)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="the text whose match is explained")
    item_id: int | None = Field(
        None, ge=0, le=2**63 - 1, description="an indexed image (its stored features)"
    )
    image_base64: str | None = Field(None, min_length=1, description="an image, base64-encoded")
    per_word: bool = Field(False, description="also return one heat map per WordPiece of the text")
    overlay: bool = Field(True, description="also return the heat map over the image as a PNG (base64)")

    @model_validator(mode="after")
    def _one_image(self) -> ExplainRequest:
        if (self.image_base64 is None) == (self.item_id is None):
            raise ValueError("give exactly one of 'item_id' and 'image_base64' (or a multipart 'image')")
        return self


class WordHeatmap(BaseModel):
    token: str = Field(description="the WordPiece ('##' marks the continuation of a word)")
    position: int = Field(description="its position in the model's input (0 is [CLS])")
    grid: list[list[float]] = Field(description="its Grad-CAM map, side x side, rows top to bottom")


class ExplainLayer(BaseModel):
    fusion_layer: int = Field(
        description="the explained fusion layer, counted from 0 among the fusion layers"
    )
    encoder_layer: int = Field(description="the same layer in the text encoder's numbering (8 in ALBEF-base)")


class ExplainTimings(BaseModel):
    encode: float = Field(description="text and image encoding (or the stored-item lookup), ms")
    explain: float = Field(description="the explain graph (attention and its gradient) and Grad-CAM, ms")
    render: float = Field(description="the PNG overlay, ms")
    total: float = Field(description="whole request, ms")


class ExplainResponse(BaseModel):
    side: int = Field(description="the patch grid is side x side (image_res / patch size)")
    grid: list[list[float]] = Field(
        description="the Grad-CAM heat map over the image patches, side x side, rows top to bottom: cross-"
        "attention times its clamped gradient w.r.t. the ITM match logit, averaged over heads and tokens"
    )
    tokens: list[str] = Field(description="the text's WordPieces as the model saw them (after [CLS])")
    words: list[WordHeatmap] | None = Field(None, description="with per_word: one map per entry of tokens")
    itm_score: float = Field(description="ITM logit of class 'match' of this pair")
    match_probability: float = Field(description="softmax of the two ITM logits, class 'match'")
    layer: ExplainLayer
    overlay_png_base64: str | None = Field(
        None, description="with overlay: the heat map over the image, a PNG, base64 (no data: prefix)"
    )
    overlay_width: int | None = None
    overlay_height: int | None = None
    overlay_on: Literal["image", "heatmap"] | None = Field(
        None,
        description="'image': drawn over the image; 'heatmap': the map alone (an indexed image held by URI "
        "or no longer readable)",
    )
    query: dict[str, Any] = Field(description="what was explained (text, and item_id or the upload's bytes)")
    timings_ms: ExplainTimings
    index_version: str
    bundle_id: str


__all__ += ["ExplainRequest", "WordHeatmap", "ExplainLayer", "ExplainTimings", "ExplainResponse"]
