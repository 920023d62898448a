// albef-search web page: plain JavaScript, no build step, no external requests.
// Talks to the REST API of the same origin: /readyz, /v1/index, /v1/search/images, /v1/search/texts,
// /v1/explain, /v1/items/{id}/image. With an API key set on the service, the key typed into the page is kept in
// sessionStorage and sent as X-API-Key; images are then fetched with the header and shown from blob: URLs.
"use strict";

(() => {
  const KEY_STORAGE = "albef-search.api-key";
  const $ = (id) => document.getElementById(id);
  const el = {
    info: $("index-info"), form: $("text-form"), query: $("query"), submit: $("text-submit"),
    file: $("file-input"), drop: $("dropzone"), preview: $("drop-preview"),
    k: $("k"), rerank: $("rerank"), rerankK: $("rerank-k"),
    keyBox: $("key-box"), key: $("api-key"), keyForget: $("key-forget"),
    title: $("results-title"), status: $("status"), timings: $("timings"), results: $("results"), empty: $("empty"),
  };

  let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
  let lastQuery = null;      // what to re-run when the options change: {kind: "text"|"image"|"item", ...}
  let lastOptions = "";      // the options it ran with (JSON)
  let sequence = 0;          // only the latest request may render
  let blobUrls = [];         // object URLs of the current results (images fetched with the key)
  let previewUrl = null;
  let limits = { maxK: 100, maxRerankK: 256 };

  // -- HTTP -------------------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (apiKey) h["X-API-Key"] = apiKey;
    return h;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    let response;
    try {
      response = await fetch(path, opts);
    } catch (err) {
      throw new ApiError(0, "network", "The service cannot be reached.");
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) {
      const e = (body && body.error) || {};
      throw new ApiError(response.status, e.code || "http_" + response.status,
                         e.message || "The service answered " + response.status + ".");
    }
    return body;
  }

  // -- status line, timings ---------------------------------------------------------------------------------
  function setStatus(text, isError) {
    el.status.textContent = text;
    el.status.classList.toggle("error", Boolean(isError));
  }

  function fmtMs(ms) {
    return (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2)) + " ms";
  }

  function showTimings(t) {
    for (const dd of el.timings.querySelectorAll("dd")) dd.textContent = fmtMs(Number(t[dd.dataset.stage] || 0));
    el.timings.hidden = false;
  }

  function handleError(err) {
    if (err.status === 401) {
      el.keyBox.open = true;
      setStatus(apiKey ? "The API key was refused. Check it and search again."
                       : "This service needs an API key: enter it under “API key”.", true);
      el.key.focus();
    } else {
      setStatus(err.message || String(err), true);
    }
  }

  // -- readiness and index information ----------------------------------------------------------------------
  function setInfo(text, state) {
    el.info.textContent = "";
    const dot = document.createElement("span");
    dot.className = "dot";
    dot.setAttribute("aria-hidden", "true");
    el.info.append(dot, text);
    el.info.classList.toggle("ready", state === "ready");
    el.info.classList.toggle("error", state === "error");
  }

  async function waitReady() {
    for (;;) {
      try {
        const r = await fetch("/readyz", { cache: "no-store" });
        if (r.ok) return;
        setInfo("Loading the model and the index…", "loading");
      } catch (err) {
        setInfo("The service cannot be reached; retrying…", "error");
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  async function loadInfo() {
    try {
      const info = await api("/v1/index");
      const n = (x) => Number(x || 0).toLocaleString("en");
      setInfo(`${info.model.name || "model"} · index ${info.version} · ${n(info.counts.image)} images · `
              + `${n(info.counts.text)} captions`, "ready");
      el.info.title = `bundle ${String(info.model.bundle_id).slice(0, 12)}…, FAISS ${info.factory.image || "-"}`;
    } catch (err) {
      if (err.status === 401) setInfo("Ready · API key needed", "loading");
      else setInfo("Index information unavailable: " + err.message, "error");
      if (err.status === 401) el.keyBox.open = true;
    }
  }

  // -- options ----------------------------------------------------------------------------------------------
  function intOption(input, fallback, max) {
    const v = Number.parseInt(input.value, 10);
    if (!Number.isFinite(v) || v < 1) return fallback;
    return Math.min(v, max);
  }

  function options() {
    const k = intOption(el.k, 12, limits.maxK);
    const rerank = el.rerank.checked;
    const rerankK = intOption(el.rerankK, 32, limits.maxRerankK);
    return { k, rerank, rerank_k: rerankK };
  }

  // -- searches ---------------------------------------------------------------------------------------------
  async function run(query) {
    lastQuery = query;
    const seq = ++sequence;
    const opts = options();
    lastOptions = JSON.stringify(opts);
    el.results.classList.add("loading");
    el.results.setAttribute("aria-busy", "true");
    setStatus("Searching…");
    try {
      let response, direction;
      if (query.kind === "text") {
        direction = "images";
        response = await api("/v1/search/images", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify(Object.assign({ text: query.text }, opts)),
        });
      } else if (query.kind === "image") {
        direction = "texts";
        const form = new FormData();
        form.append("image", query.file, query.file.name || "query");
        for (const [name, value] of Object.entries(opts)) form.append(name, String(value));
        response = await api("/v1/search/texts", { method: "POST", body: form });
      } else {
        direction = query.target;
        response = await api("/v1/search/" + query.target, {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify(Object.assign({ item_id: query.id }, opts)),
        });
      }
      if (seq !== sequence) return;
      render(direction, query, response);
    } catch (err) {
      if (seq !== sequence) return;
      handleError(err);
    } finally {
      if (seq === sequence) {
        el.results.classList.remove("loading");
        el.results.removeAttribute("aria-busy");
      }
    }
  }

  function searchText(text) {
    const q = text.trim();
    if (!q) {
      setStatus("Type a description first.", true);
      el.query.focus();
      return;
    }
    run({ kind: "text", text: q });
  }

  function searchFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(`“${file.name}” is not an image.`, true);
      return;
    }
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    el.preview.src = previewUrl;
    el.preview.alt = "Query image: " + (file.name || "pasted image");
    el.preview.hidden = false;
    run({ kind: "image", file, name: file.name || "pasted image" });
  }

  // -- rendering --------------------------------------------------------------------------------------------
  function clearBlobs() {
    for (const u of blobUrls) URL.revokeObjectURL(u);
    blobUrls = [];
  }

  // Without a key the browser loads thumbnails itself (lazily, cached); with one it cannot send the header
  // for an <img>, so the image is fetched with it and shown from a blob: URL.
  function loadImage(img, url) {
    if (!apiKey) {
      img.src = url;
      return;
    }
    fetch(url, { headers: headers() })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
      .then((blob) => {
        const u = URL.createObjectURL(blob);
        blobUrls.push(u);
        img.src = u;
      })
      .catch(() => img.classList.add("broken"));
  }

  function fmt(x, digits) {
    return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
  }

  function node(tag, className, text) {
    const n = document.createElement(tag);
    if (className) n.className = className;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function scoreBlock(hit) {
    const frag = document.createDocumentFragment();
    const p = hit.match_probability;
    const prob = node("div", "prob");
    prob.append(node("span", "label", "match"));
    const bar = node("span", "bar");
    bar.setAttribute("aria-hidden", "true");
    const fill = node("span");
    fill.style.width = p === null || p === undefined ? "0%" : (100 * p).toFixed(1) + "%";
    bar.append(fill);
    if (p !== null && p !== undefined) bar.classList.add(p >= 0.66 ? "high" : p >= 0.33 ? "mid" : "low");
    prob.append(bar, node("span", "value", p === null || p === undefined ? "—" : (100 * p).toFixed(1) + "%"));
    prob.dataset.score = "match_probability";
    const dl = node("dl", "scores");
    for (const [label, value, key, title] of [
      ["ITC", fmt(hit.itc_score, 3), "itc_score", "cosine similarity of the ITC embeddings"],
      ["ITM", fmt(hit.itm_score, 2), "itm_score", "ITM logit of the class “match”"],
    ]) {
      const d = node("div");
      d.title = title;
      const dd = node("dd", null, value);
      dd.dataset.score = key;
      d.append(node("dt", null, label), dd);
      dl.append(d);
    }
    if (hit.itm_score !== null && hit.itm_score !== undefined) frag.append(prob, dl, moveBadge(hit));
    else frag.append(prob, dl);
    return frag;
  }

  // The compare view: where ITC alone had put this result, and how far the ITM head moved it.
  function moveBadge(hit) {
    const moved = hit.itc_rank - hit.rank;
    const badge = node("p", "move " + (moved > 0 ? "up" : moved < 0 ? "down" : "same"));
    badge.dataset.move = String(moved);
    badge.dataset.itcRank = String(hit.itc_rank);
    badge.title = "position in the ITC order before re-ranking, and the ITM head's move";
    badge.textContent = `ITC #${hit.itc_rank} → #${hit.rank} `
      + (moved > 0 ? `▲ ${moved}` : moved < 0 ? `▼ ${-moved}` : "= same");
    return badge;
  }

  function describe(hit) {
    const p = hit.match_probability;
    const moved = hit.itm_score === null ? "" : `, ITC rank ${hit.itc_rank}`;
    return `Rank ${hit.rank}${moved}` + (p === null || p === undefined ? "" : `, match ${(100 * p).toFixed(0)}%`)
      + `, ITC ${fmt(hit.itc_score, 3)}` + (hit.itm_score === null ? "" : `, ITM ${fmt(hit.itm_score, 2)}`);
  }

  // -- explain a match: the Grad-CAM heat map of POST /v1/explain over the thumbnail ---------------------------
  // matplotlib's "jet", as the service draws its overlay: per channel, [x, value] stops, linear between them.
  const JET = [
    [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
    [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
    [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]],
  ];

  function jet(v) {
    return JET.map((stops) => {
      for (let i = 1; i < stops.length; i++) {
        const [x0, y0] = stops[i - 1];
        const [x1, y1] = stops[i];
        if (v <= x1) return 255 * (y0 + ((v - x0) / (x1 - x0)) * (y1 - y0));
      }
      return 255 * stops[stops.length - 1][1];
    });
  }

  // One word's grid as a transparent PNG of the overlay's size: the map normalised, coloured, and as opaque
  // as the service's overlay blends it (map ** 0.7), so the thumbnail shows through where it is low.
  function wordMapUrl(grid, width, height) {
    const side = grid.length;
    const flat = grid.flat();
    const lo = Math.min(...flat);
    const span = Math.max(...flat) - lo;
    const small = document.createElement("canvas");
    small.width = side;
    small.height = side;
    const ctx = small.getContext("2d");
    const data = ctx.createImageData(side, side);
    flat.forEach((x, i) => {
      const v = span > 0 ? (x - lo) / span : 0;
      const [r, g, b] = jet(v);
      data.data.set([r, g, b, 255 * Math.pow(v, 0.7)], 4 * i);
    });
    ctx.putImageData(data, 0, 0);
    const big = document.createElement("canvas");
    big.width = width;
    big.height = height;
    const bctx = big.getContext("2d");
    bctx.imageSmoothingEnabled = true;
    bctx.drawImage(small, 0, 0, width, height);
    return big.toDataURL("image/png");
  }

  function showExplanation(card, response, text) {
    const thumb = card.querySelector(".thumb");
    let overlay = thumb.querySelector("img.heatmap");
    if (!overlay) {
      overlay = node("img", "heatmap");
      thumb.append(overlay);
    }
    const whole = "data:image/png;base64," + response.overlay_png_base64;
    overlay.alt = `Heat map: where “${text}” matched in this image`;
    overlay.src = whole;
    overlay.hidden = false;
    overlay.dataset.word = "";
    const old = card.querySelector(".words");
    if (old) old.remove();
    const words = node("div", "words");
    words.setAttribute("role", "group");
    words.setAttribute("aria-label", "Heat map per word");
    const chips = [];
    const choose = (chip, src, word) => {
      for (const c of chips) c.setAttribute("aria-pressed", String(c === chip));
      overlay.src = src;
      overlay.dataset.word = word;
    };
    const all = node("button", "chip word", "all words");
    all.type = "button";
    all.addEventListener("click", () => choose(all, whole, ""));
    chips.push(all);
    for (const w of response.words || []) {
      const chip = node("button", "chip word", w.token);
      chip.type = "button";
      chip.title = `where “${w.token}” matched`;
      chip.addEventListener("click", () => choose(
        chip, wordMapUrl(w.grid, response.overlay_width, response.overlay_height), w.token));
      chips.push(chip);
    }
    all.setAttribute("aria-pressed", "true");
    for (const c of chips.slice(1)) c.setAttribute("aria-pressed", "false");
    words.append(...chips);
    const prob = (100 * response.match_probability).toFixed(1);
    words.append(node("span", "hint", `layer ${response.layer.encoder_layer}, match ${prob}%`));
    card.querySelector(".body").insertBefore(words, card.querySelector(".body .more"));
  }

  async function explainHit(card, hit, text, button) {
    const overlay = card.querySelector("img.heatmap");
    if (overlay && !overlay.hidden) {  // the button toggles the heat map once it is there
      overlay.hidden = true;
      card.querySelector(".words").hidden = true;
      button.textContent = "Explain";
      return;
    }
    if (overlay) {
      overlay.hidden = false;
      card.querySelector(".words").hidden = false;
      button.textContent = "Hide heat map";
      return;
    }
    button.disabled = true;
    button.textContent = "Explaining…";
    try {
      const response = await api("/v1/explain", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text, item_id: hit.id, per_word: true }),
      });
      showExplanation(card, response, text);
      button.textContent = "Hide heat map";
      setStatus(`Heat map of image ${hit.id} for “${text}” in ${fmtMs(Number(response.timings_ms.total))}`);
    } catch (err) {
      button.textContent = "Explain";
      handleError(err);
    } finally {
      button.disabled = false;
    }
  }

  function imageCard(hit, explainText) {
    const item = hit.metadata;
    const card = node("article", "result image-result");
    card.tabIndex = 0;
    card.dataset.id = String(hit.id);
    card.setAttribute("aria-label", `${describe(hit)}: image ${hit.id}`);
    const thumb = node("div", "thumb");
    const img = node("img");
    img.alt = item.caption ? item.caption : `Image ${hit.id}`;
    img.decoding = "async";
    if (item.width && item.height) { img.width = item.width; img.height = item.height; }
    if (item.image_url) loadImage(img, item.image_url);
    else if (item.uri) img.src = item.uri;
    thumb.append(img, node("span", "rank", "#" + hit.rank));
    const body = node("div", "body");
    body.append(scoreBlock(hit));
    if (explainText) {  // a text query: show where it matched
      const explain = node("button", "more explain", "Explain");
      explain.type = "button";
      explain.title = "Grad-CAM heat map: where the query text matched in this image";
      explain.addEventListener("click", () => explainHit(card, hit, explainText, explain));
      body.append(explain);
    }
    const more = node("button", "more", "Captions for this image");
    more.type = "button";
    more.addEventListener("click", () => run({ kind: "item", target: "texts", id: hit.id,
                                               label: `image ${hit.id}` }));
    body.append(more);
    card.append(thumb, body);
    return card;
  }

  function textCard(hit) {
    const item = hit.metadata;
    const card = node("article", "result text-result");
    card.tabIndex = 0;
    card.dataset.id = String(hit.id);
    card.setAttribute("aria-label", `${describe(hit)}: “${item.caption || ""}”`);
    if (item.image_id !== null && item.image_id !== undefined) {
      const thumb = node("div", "thumb");
      const img = node("img");
      img.alt = "";  // decorative: the image this caption was indexed with
      img.title = `indexed with image ${item.image_id}`;
      loadImage(img, `/v1/items/${item.image_id}/image`);
      thumb.append(img);
      card.append(thumb);
    }
    const body = node("div", "body");
    const head = node("div", "caption-head");
    head.append(node("span", "rank", "#" + hit.rank), node("p", "caption", item.caption || ""));
    body.append(head, scoreBlock(hit));
    const more = node("button", "more", "Images for this caption");
    more.type = "button";
    more.addEventListener("click", () => run({ kind: "item", target: "images", id: hit.id,
                                               label: `“${item.caption}”`, text: item.caption }));
    body.append(more);
    card.append(body);
    return card;
  }

  function render(direction, query, response) {
    clearBlobs();
    const hits = response.results || [];
    el.results.textContent = "";
    el.results.classList.toggle("texts", direction === "texts");
    for (const hit of hits) {
      const li = node("li");
      li.append(direction === "images" ? imageCard(hit, query.text) : textCard(hit));
      el.results.append(li);
    }
    const what = query.kind === "text" ? `“${query.text}”`
      : query.kind === "image" ? (query.name ? `“${query.name}”` : "your image") : query.label;
    el.title.textContent = direction === "images" ? `Images for ${what}` : `Captions for ${what}`;
    el.empty.hidden = hits.length > 0;
    el.empty.textContent = "No results.";
    const noun = direction === "images" ? "image" : "caption";
    const t = response.timings_ms || {};
    const how = response.rerank ? `re-ranked top ${response.rerank_k} by ITM` : "ITC order, no re-ranking";
    setStatus(`${hits.length} ${noun}${hits.length === 1 ? "" : "s"} in ${fmtMs(Number(t.total || 0))} (${how})`);
    showTimings(t);
  }

  // -- wiring -----------------------------------------------------------------------------------------------
  el.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    searchText(el.query.value);
  });

  for (const chip of document.querySelectorAll("[data-example]")) {
    chip.addEventListener("click", () => {
      el.query.value = chip.dataset.example;
      searchText(el.query.value);
    });
  }

  el.drop.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", () => {
    if (el.file.files && el.file.files[0]) searchFile(el.file.files[0]);
    el.file.value = "";  // choosing the same file again still searches
  });
  for (const type of ["dragenter", "dragover"]) {
    el.drop.addEventListener(type, (ev) => {
      ev.preventDefault();
      if (ev.dataTransfer) ev.dataTransfer.dropEffect = "copy";
      el.drop.classList.add("dragging");
    });
  }
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("dragging"));
  el.drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    el.drop.classList.remove("dragging");
    const files = ev.dataTransfer && ev.dataTransfer.files;
    if (files && files.length) searchFile(files[0]);
    else setStatus("Drop an image file.", true);
  });
  // A file dropped next to the zone should not make the browser navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  document.addEventListener("paste", (ev) => {
    const items = (ev.clipboardData && ev.clipboardData.files) || [];
    if (items.length && items[0].type.startsWith("image/")) {
      ev.preventDefault();
      searchFile(items[0]);
    }
  });

  // Changing an option re-runs the last query, so rerank on/off can be compared at once.
  function rerunIfChanged() {
    if (lastQuery && JSON.stringify(options()) !== lastOptions) run(lastQuery);
  }
  for (const input of [el.k, el.rerank, el.rerankK]) {
    input.addEventListener("change", rerunIfChanged);
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") {
        ev.preventDefault();
        if (lastQuery) rerunIfChanged();
        else searchText(el.query.value);
      }
    });
  }
  el.rerankK.disabled = !el.rerank.checked;
  el.rerank.addEventListener("change", () => { el.rerankK.disabled = !el.rerank.checked; });

  el.key.value = apiKey;
  if (apiKey) el.keyBox.open = true;
  el.key.addEventListener("change", () => {
    if (el.key.value.trim() === apiKey) return;
    apiKey = el.key.value.trim();
    if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadInfo();
    if (lastQuery) run(lastQuery);
  });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    el.key.dispatchEvent(new Event("change"));
  });
  el.keyForget.addEventListener("click", () => {
    el.key.value = "";
    el.key.dispatchEvent(new Event("change"));
    el.key.focus();
  });

  (async () => {
    setInfo("Connecting…", "loading");
    await waitReady();
    await loadInfo();
    document.body.dataset.ready = "true";
  })();
})();
