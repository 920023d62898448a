"""The web page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, against the
real service (uvicorn on 127.0.0.1) over the demo's index: the shipped tiny model and a small synthetic gallery.

Every check compares the page with the REST API's answer for the same query, so the page shows what the service
ranks. Screenshots go to test-artifacts/ (demo-search.png: a text query; demo-captions.png: an uploaded image;
demo-explain.png: the heat map of an explained result).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.demo import ARTIFACTS, PreparedDemo
from tests.helpers.service import live_server, settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUERY = "a small red triangle above a large red circle"  # a caption of the gallery
API_KEY = "s3cret-demo-key"
# The page's defaults (index.html): k=12, rerank on, rerank_k=32.
PAGE_OPTIONS = {"k": 12, "rerank": True, "rerank_k": 32}
ALL_IMAGES_LOADED = """() => {
  const imgs = [...document.querySelectorAll('#results img')];
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(prepared_demo: PreparedDemo) -> Iterator[Any]:
    res = prepared_demo.result
    with live_server(settings(res.index, bundle=res.bundle)) as srv:
        yield srv


@pytest.fixture(scope="module")
def gallery(prepared_demo: PreparedDemo) -> list[Path]:
    data = prepared_demo.result.data
    return [data / e["image"] for e in json.loads((data / "test.json").read_text())]


class Page:
    """A browser tab on the service, recording every request it makes and every script error."""

    def __init__(self, browser: Any, base_url: str, scheme: str = "light") -> None:
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 900}, color_scheme=scheme, base_url=base_url
        )
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        # Listening from the start turns on file-chooser interception before any click can open a picker.
        self.choosers: list[Any] = []
        self.page.on("filechooser", lambda fc: self.choosers.append(fc))
        self.base_url = base_url

    def open(self) -> Any:
        response = self.page.goto("/")
        assert response is not None and response.status == 200
        self.page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        return self.page

    def cards(self) -> list[dict[str, Any]]:
        return self.page.eval_on_selector_all(
            "#results article",
            """cards => cards.map(c => ({
            id: Number(c.dataset.id),
            itc: c.querySelector('[data-score=itc_score]').textContent,
            itm: c.querySelector('[data-score=itm_score]').textContent,
            prob: c.querySelector('[data-score=match_probability] .value').textContent,
            caption: (c.querySelector('.caption') || {}).textContent || null,
            label: c.getAttribute('aria-label'),
        }))""",
        )

    def timings(self) -> dict[str, str]:
        return self.page.eval_on_selector_all(
            "#timings dd", "dds => Object.fromEntries(dds.map(d => [d.dataset.stage, d.textContent]))"
        )

    def close(self) -> None:
        self.context.close()
        foreign = [
            u for u in self.requests if not (u.startswith(self.base_url) or u.startswith(("blob:", "data:")))
        ]
        assert not foreign, f"the page loaded something from elsewhere: {foreign}"
        assert not self.errors, f"script errors: {self.errors}"


@pytest.fixture
def tab(browser: Any, server: Any) -> Iterator[Page]:
    p = Page(browser, server.url)
    yield p
    p.close()


def assert_cards_match(cards: list[dict[str, Any]], api: dict[str, Any]) -> None:
    """Same ids in the same order as the API, and each card's scores equal the API's (as displayed)."""
    hits = api["results"]
    assert [c["id"] for c in cards] == [h["id"] for h in hits]
    for card, hit in zip(cards, hits, strict=True):
        assert abs(float(card["itc"]) - hit["itc_score"]) <= 0.0005 + 1e-9
        if hit["itm_score"] is None:
            assert card["itm"] == "—" and card["prob"] == "—"
        else:
            assert abs(float(card["itm"]) - hit["itm_score"]) <= 0.005 + 1e-9
            assert abs(float(card["prob"].rstrip("%")) - 100 * hit["match_probability"]) <= 0.05 + 1e-9
        assert card["label"].startswith(f"Rank {hit['rank']}")


def assert_timings_shown(tab: Page) -> None:
    timings = tab.timings()
    assert set(timings) == {"encode", "ann", "rerank", "total"}
    assert all(re.fullmatch(r"\d+(\.\d+)? ms", v) for v in timings.values()), timings
    assert tab.page.is_visible("#timings")


def test_text_query_shows_image_results_with_scores(
    tab: Page, server: Any, prepared_demo: PreparedDemo
) -> None:
    test_split = json.loads((prepared_demo.result.data / "test.json").read_text())
    assert any(QUERY in e["caption"] for e in test_split)  # the query describes an image of the gallery
    page = tab.open()
    with server.client() as api:
        index = api.get("/v1/index").json()
        expected = api.post("/v1/search/images", json={"text": QUERY, **PAGE_OPTIONS}).json()
        expected_itc = api.post(
            "/v1/search/images", json={"text": QUERY, **PAGE_OPTIONS, "rerank": False}
        ).json()
    info = page.text_content("#index-info")
    assert f"{index['counts']['image']} images" in info and f"{index['counts']['text']} captions" in info

    page.fill("#query", QUERY)
    page.press("#query", "Enter")  # Enter submits
    page.wait_for_selector("#results article")
    page.wait_for_function(ALL_IMAGES_LOADED)
    cards = tab.cards()
    assert len(cards) == PAGE_OPTIONS["k"]
    assert_cards_match(cards, expected)
    assert_timings_shown(tab)
    assert page.text_content("#results-title") == f"Images for “{QUERY}”"
    srcs = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => new URL(i.src).pathname)")
    assert srcs == [f"/v1/items/{h['id']}/image" for h in expected["results"]]
    # The compare view: each re-ranked card shows its ITC rank and the ITM head's move, as the API says.
    moves = page.eval_on_selector_all(
        "#results article .move", "ms => ms.map(m => [Number(m.dataset.itcRank), Number(m.dataset.move)])"
    )
    assert moves == [[h["itc_rank"], h["itc_rank"] - h["rank"]] for h in expected["results"]]
    itc_ids = [h["id"] for h in expected_itc["results"]]
    assert all(itc_ids.index(h["id"]) + 1 == h["itc_rank"] for h in expected["results"] if h["id"] in itc_ids)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-search.png"), full_page=True)

    # Results are focusable and described for screen readers.
    page.focus("#results article")
    assert page.evaluate("() => document.activeElement.dataset.id") == str(expected["results"][0]["id"])

    # Re-ranking off: the options re-run the query; ITC order, no ITM scores.
    page.click("label[for=rerank]")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('no re-ranking')")
    assert_cards_match(tab.cards(), expected_itc)
    assert page.is_disabled("#rerank-k")
    assert page.eval_on_selector_all("#results article .move", "ms => ms.length") == 0  # nothing was moved


def test_image_upload_and_drop_show_captions(tab: Page, server: Any, gallery: list[Path]) -> None:
    page = tab.open()
    upload, dropped = gallery[3], gallery[7]
    with server.client() as api:

        def texts_for(path: Path) -> dict[str, Any]:
            form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in PAGE_OPTIONS.items()}
            r = api.post(
                "/v1/search/texts", files={"image": (path.name, path.read_bytes(), "image/png")}, data=form
            )
            assert r.status_code == 200, r.text
            return r.json()

        expected_upload, expected_drop = texts_for(upload), texts_for(dropped)

    # The drop zone is a focusable button: Enter opens the file picker.
    assert page.evaluate("() => document.getElementById('dropzone').tagName") == "BUTTON"
    page.focus("#dropzone")
    page.keyboard.press("Enter")
    for _ in range(100):
        if tab.choosers:
            break
        page.wait_for_timeout(100)
    assert len(tab.choosers) == 1, "Enter on the drop zone did not open the file picker"
    tab.choosers[0].set_files(str(upload))
    page.wait_for_function(
        f"() => document.getElementById('results-title').textContent.includes({json.dumps(upload.name)})"
    )
    page.wait_for_selector("#results.texts article")
    page.wait_for_function(ALL_IMAGES_LOADED)  # each caption shows the image it was indexed with
    cards = tab.cards()
    assert_cards_match(cards, expected_upload)
    assert [c["caption"] for c in cards] == [h["metadata"]["caption"] for h in expected_upload["results"]]
    assert page.evaluate("() => document.getElementById('drop-preview').naturalWidth") > 0
    assert_timings_shown(tab)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-captions.png"), full_page=True)

    # Drag and drop of a file onto the zone.
    page.evaluate(
        """([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        const zone = document.getElementById('dropzone');
        for (const type of ['dragenter', 'dragover', 'drop'])
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""",
        [base64.b64encode(dropped.read_bytes()).decode(), "dropped-" + dropped.name],
    )
    page.wait_for_function("() => document.getElementById('results-title').textContent.includes('dropped-')")
    page.wait_for_function("() => !document.getElementById('results').classList.contains('loading')")
    cards = tab.cards()
    assert_cards_match(cards, expected_drop)

    # "Images for this caption": search with the indexed text's stored features.
    first = expected_drop["results"][0]
    with server.client() as api:
        expected_item = api.post("/v1/search/images", json={"item_id": first["id"], **PAGE_OPTIONS}).json()
    page.click("#results article >> text=Images for this caption")
    page.wait_for_selector("#results:not(.texts) article")
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert_cards_match(tab.cards(), expected_item)


def test_page_works_with_an_api_key(browser: Any, prepared_demo: PreparedDemo) -> None:
    res = prepared_demo.result
    with live_server(settings(res.index, bundle=res.bundle, api_key=API_KEY)) as srv:
        with httpx.Client(base_url=srv.url) as anon:
            assert anon.get("/").status_code == 200  # the page and its assets are public...
            assert anon.get("/static/app.js").status_code == 200
            assert anon.get("/v1/index").status_code == 401  # ...the data are not
        tab = Page(browser, srv.url)
        try:
            page = tab.open()
            page.wait_for_function(
                "() => document.getElementById('index-info').textContent.includes('API key')"
            )
            assert page.evaluate("() => document.getElementById('key-box').open")
            page.fill("#query", QUERY)
            page.press("#query", "Enter")
            page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
            assert "API key" in page.text_content("#status")
            assert page.evaluate("() => document.activeElement.id") == "api-key"

            page.fill("#api-key", API_KEY)
            page.press("#api-key", "Enter")  # stores the key and re-runs the query with it
            page.wait_for_selector("#results article")
            page.wait_for_function(ALL_IMAGES_LOADED)  # fetched with X-API-Key, shown from blob: URLs
            assert page.eval_on_selector_all(
                "#results img", "imgs => imgs.every(i => i.src.startsWith('blob:'))"
            )
            with srv.client(headers={"X-API-Key": API_KEY}) as api:
                expected = api.post("/v1/search/images", json={"text": QUERY, **PAGE_OPTIONS}).json()
            assert_cards_match(tab.cards(), expected)
            assert page.evaluate("() => sessionStorage.getItem('albef-search.api-key')") == API_KEY
            page.wait_for_function(
                "() => document.getElementById('index-info').textContent.includes('images')"
            )
        finally:
            tab.errors = [e for e in tab.errors if "401" not in e]  # the refused request before the key
            tab.close()


def test_explain_shows_the_heat_map_of_a_result(tab: Page, server: Any) -> None:
    """ "Explain" on an image result asks POST /v1/explain for the query text and that item, and shows the
    service's PNG overlay over the thumbnail (the very bytes the API returns); a word chip shows that word's
    map (drawn from the API's per-word grid); the button hides the heat map again."""
    import io

    import numpy as np
    from PIL import Image

    page = tab.open()
    page.fill("#query", QUERY)
    page.press("#query", "Enter")
    page.wait_for_selector("#results article")
    page.wait_for_function(ALL_IMAGES_LOADED)
    card = page.locator("#results li").first
    item_id = int(card.locator("article").get_attribute("data-id"))
    with server.client() as api:
        r = api.post("/v1/explain", json={"text": QUERY, "item_id": item_id, "per_word": True})
    assert r.status_code == 200, r.text
    expected = r.json()

    with page.expect_response(lambda resp: resp.url.endswith("/v1/explain")) as response:
        card.locator("button.explain").click()
    assert response.value.status == 200
    assert json.loads(response.value.request.post_data) == {
        "text": QUERY,
        "item_id": item_id,
        "per_word": True,
    }
    heatmap = card.locator("img.heatmap")
    heatmap.wait_for()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=heatmap.element_handle())
    assert heatmap.get_attribute("src") == "data:image/png;base64," + expected["overlay_png_base64"]
    size = heatmap.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert (
        size == [expected["overlay_width"], expected["overlay_height"]] and expected["overlay_on"] == "image"
    )
    assert QUERY in heatmap.get_attribute("alt")
    chips = card.locator(".words .chip")
    assert chips.all_text_contents() == ["all words", *expected["tokens"]]
    assert f"layer {expected['layer']['encoder_layer']}" in card.locator(".words").text_content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-explain.png"), full_page=True)

    # One word: its own map, transparent where the word's grid is low, opaque where it is high.
    word = expected["words"][2]
    chips.nth(3).click()
    assert (
        chips.nth(3).get_attribute("aria-pressed") == "true"
        and chips.nth(0).get_attribute("aria-pressed") == "false"
    )
    page.wait_for_function(
        "([i, w]) => i.dataset.word === w && i.complete && i.naturalWidth > 0",
        arg=[heatmap.element_handle(), word["token"]],
    )
    src = heatmap.get_attribute("src")
    assert (
        src.startswith("data:image/png;base64,")
        and src != "data:image/png;base64," + expected["overlay_png_base64"]
    )
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert img.size == (expected["overlay_width"], expected["overlay_height"]) and img.mode == "RGBA"
    alpha = np.asarray(img)[..., 3].astype(float)
    grid = np.asarray(word["grid"])
    side = len(grid)

    def at_centre(flat: int) -> float:
        row, col = divmod(flat, side)
        return alpha[int((row + 0.5) * img.size[1] / side), int((col + 0.5) * img.size[0] / side)]

    assert at_centre(int(grid.argmax())) > 200 and at_centre(int(grid.argmin())) < 60
    chips.nth(0).click()  # back to the whole text
    assert heatmap.get_attribute("src") == "data:image/png;base64," + expected["overlay_png_base64"]

    # The button toggles the heat map (without asking again).
    n_requests = sum(u.endswith("/v1/explain") for u in tab.requests)
    card.locator("button.explain").click()
    assert heatmap.is_hidden() and card.locator(".words").is_hidden()
    assert card.locator("button.explain").text_content() == "Explain"
    card.locator("button.explain").click()
    assert heatmap.is_visible() and sum(u.endswith("/v1/explain") for u in tab.requests) == n_requests
