"""Issue 9.5: publishing new index versions (``albef index add`` then ``albef index delete``) while the
service is under load drops no request, and every answer is exactly the reference answer of the version
that the response reports.

Four client threads send text->image searches (with ITM re-ranking) back to back during the whole run. The
references of each version are computed offline (the runtime bundle and a reader pinned to that version,
:func:`tests.helpers.reliability.reference_answers`). The delete removes the top hit of a query, so the
answers really change between versions.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx

from albef.cli import main as cli_main
from tests.helpers.index import make_folder
from tests.helpers.reliability import answer, reference_answers, same_answer
from tests.helpers.service import copy_index, index_items, live_server, settings

K, RERANK_K = 5, 8
CLIENTS = 4
MIN_PER_VERSION = 12  # responses on a version before the next change is published
PHASE_TIMEOUT_S = 60.0


def test_publishing_under_load_drops_nothing_and_answers_follow_the_switch(
    service_index: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    index_dir = copy_index(service_index, tmp_path / "index")
    queries = [t["caption"] for t in index_items(index_dir)[1][:6]]
    new_images = make_folder(tmp_path / "new", 6, seed0=500)
    refs: dict[str, dict[str, list[tuple[int, float]]]] = {
        "000001": reference_answers(index_dir, "000001", tiny_bundle, queries, k=K, rerank_k=RERANK_K)
    }

    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(cid: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            i = cid
            while not stop.is_set():
                q = queries[i % len(queries)]
                i += 1
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/search/images", json={"text": q, "k": K, "rerank_k": RERANK_K})
                    rec = {
                        "cid": cid,
                        "q": q,
                        "t0": t0,
                        "t1": time.monotonic(),
                        "status": r.status_code,
                        "body": r.json() if r.status_code == 200 else r.text,
                    }
                except httpx.HTTPError as exc:  # a dropped connection is a failure, recorded as such
                    rec = {
                        "cid": cid,
                        "q": q,
                        "t0": t0,
                        "t1": time.monotonic(),
                        "status": None,
                        "body": repr(exc),
                    }
                with lock:
                    records.append(rec)

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while time.monotonic() < deadline:
            with lock:
                n = sum(1 for r in records if r["status"] == 200 and r["body"]["index_version"] == version)
            if n >= MIN_PER_VERSION:
                return
            time.sleep(0.05)
        raise AssertionError(
            f"fewer than {MIN_PER_VERSION} answers on version {version} in {PHASE_TIMEOUT_S} s"
        )

    started: dict[str, float] = {}  # when the command that publishes each version began
    s = settings(index_dir, reload_interval_s=0.1, batch_max_size=8, queue_max=64)
    with live_server(s) as srv:
        threads = [
            threading.Thread(target=client_loop, args=(i, srv.url), daemon=True) for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        try:
            wait_for("000001")
            started["000002"] = time.monotonic()
            assert (
                cli_main(
                    [
                        "index",
                        "add",
                        "--index",
                        str(index_dir),
                        "--model",
                        str(tiny_bundle),
                        "--threads",
                        "1",
                        "--workers",
                        "1",
                        "--no-progress",
                        str(new_images),
                    ]
                )
                == 0
            )
            wait_for("000002")
            victim = refs["000001"][queries[0]][0][0]  # the top image of the first query
            started["000003"] = time.monotonic()
            assert cli_main(["index", "delete", "--index", str(index_dir), "--ids", str(victim)]) == 0
            wait_for("000003")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert srv.state.reader.version == "000003"

    for v in ("000002", "000003"):
        refs[v] = reference_answers(index_dir, v, tiny_bundle, queries, k=K, rerank_k=RERANK_K)
    assert victim not in [i for i, _ in refs["000003"][queries[0]]]
    assert not same_answer(refs["000002"][queries[0]], refs["000003"][queries[0]])

    # no request dropped or refused
    bad = [r for r in records if r["status"] != 200]
    assert not bad, bad[:3]
    seen: dict[str, int] = {}
    for r in records:
        v = r["body"]["index_version"]
        seen[v] = seen.get(v, 0) + 1
        # the answer is the reference answer of the version the response reports
        assert same_answer(answer(r["body"]), refs[v][r["q"]]), (
            v,
            r["q"],
            answer(r["body"]),
            refs[v][r["q"]],
        )
        # and no answer comes from a version before its command ran
        if v in started:
            assert r["t1"] > started[v]
    assert set(seen) == {"000001", "000002", "000003"}, seen
    # each client sees versions in order: no answer from an older version after a newer one
    for cid in range(CLIENTS):
        versions = [
            r["body"]["index_version"] for r in sorted(records, key=lambda r: r["t0"]) if r["cid"] == cid
        ]
        assert versions == sorted(versions), (cid, versions)
