"""``GET /v1/index``: the served index version, its counts, the model bundle and the FAISS choice."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from albef.service.deps import ReaderDep, StateDep
from albef.service.schemas import ErrorResponse, IndexInfo

router = APIRouter(prefix="/v1", tags=["index"])


@router.get("/index", response_model=IndexInfo, responses={503: {"model": ErrorResponse}})
async def get_index(state: StateDep, reader: ReaderDep) -> Any:
    m = reader.manifest
    bundle = state.bundle
    ann = m.get("ann", {})
    return IndexInfo(
        version=reader.version,
        counts={kind: reader.count(kind) for kind in ("image", "text")},
        model={
            "bundle_id": bundle.bundle_id,
            "name": bundle.config.name,
            "variant": bundle.variant,
            "embed_dim": bundle.embed_dim,
            "image_res": bundle.image_res,
            "max_tokens": bundle.max_tokens,
        },
        factory={kind: (ann.get(kind) or {}).get("factory") for kind in ("image", "text")},
        ann={
            kind: {
                key: (ann.get(kind) or {}).get(key)
                for key in ("family", "recall_at_k", "k", "params", "ntotal")
            }
            for kind in ("image", "text")
        },
        created=m.get("created"),
    )
