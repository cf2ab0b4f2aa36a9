// mmrag's page: search, generate and chat over the memory through the JSON API.
// No framework, no external assets; untrusted text is only ever set with textContent.
"use strict";

const TOKEN_KEY = "mmrag-token";
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  stats: null,
  queryImage: null,
  chatImage: null,
  chat: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

// --- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, { method = "GET", json, form } = {}) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, `the server cannot be reached (${err.message})`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && typeof data.detail === "string" ? data.detail : response.statusText;
    throw new ApiError(response.status, detail);
  }
  return data;
}

function setStatus(id, message, isError = false) {
  const node = $(id);
  node.textContent = message;
  node.classList.toggle("error", isError);
}

function describeError(err) {
  if (err.status === 501) return `Not available yet: ${err.message}`;
  if (err.status === 401) return `${err.message} (set the access token above)`;
  return err.status ? `Error ${err.status}: ${err.message}` : err.message;
}

// Images: plain URLs when reads are open; with a token, fetched with it and shown as blobs.
function showImage(img, url) {
  if (!state.token || (state.stats && state.stats.server.open_reads)) {
    img.src = url;
    return;
  }
  fetch(url, { headers: { Authorization: `Bearer ${state.token}` } })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.alt = `${img.alt} (image unavailable)`; });
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function checkImageFile(file) {
  if (!file.type.startsWith("image/")) return `${file.name} is not an image`;
  const limit = state.stats ? state.stats.server.limits.max_upload_bytes : Infinity;
  if (file.size > limit) return `${file.name} is over the ${Math.round(limit / 1048576)} MB limit`;
  return null;
}

// --- results --------------------------------------------------------------------------------

function hitCard(hit, rank) {
  const caption = hit.text || "(no text)";
  const figure = el("figure", { class: "card" });
  if (hit.images.length) {
    const img = el("img", {
      class: "thumb",
      alt: hit.text || `image of document ${hit.id}`,
      loading: "lazy",
      decoding: "async",
      width: "256",
      height: "256",
    });
    showImage(img, hit.images[0].thumbnail_url);
    figure.append(img);
  } else {
    figure.append(el("div", { class: "no-image", "aria-hidden": "true", text: "text only" }));
  }
  const meta = Object.entries(hit.metadata)
    .slice(0, 4)
    .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(" · ");
  figure.append(
    el("figcaption", {}, [
      el("span", { class: "caption", text: caption }),
      el("span", { class: "meta" }, [
        el("span", { class: "score", text: `#${rank} · score ${hit.score.toFixed(3)}` }),
        document.createTextNode(` · ${hit.id.slice(0, 10)}`),
      ]),
      meta ? el("span", { class: "meta", text: meta }) : null,
    ]),
  );
  return el("li", { class: "result" }, [figure]);
}

function renderHits(listId, hits) {
  const list = $(listId);
  list.replaceChildren(...hits.map((hit, i) => hitCard(hit, i + 1)));
}

// --- search ---------------------------------------------------------------------------------

function parseFilters(text) {
  const filters = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`filter "${line}": expected key=value`);
    const key = line.slice(0, at).trim();
    let value = line.slice(at + 1).trim();
    try { value = JSON.parse(value); } catch { /* a plain string */ }
    if (key in filters) filters[key] = [].concat(filters[key], value);
    else filters[key] = value;
  }
  return filters;
}

async function runSearch(event) {
  event.preventDefault();
  const text = $("q").value.trim();
  const k = Number($("k").value);
  if (!text && !state.queryImage) {
    setStatus("search-status", "Type a query or add an image.", true);
    return;
  }
  let filters;
  try {
    filters = parseFilters($("filters").value);
  } catch (err) {
    setStatus("search-status", err.message, true);
    return;
  }
  setStatus("search-status", "Searching…");
  const button = event.target.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    let data;
    if (state.queryImage) {
      const form = new FormData();
      if (text) form.append("text", text);
      form.append("k", String(k));
      form.append("filters", JSON.stringify(filters));
      form.append("image", state.queryImage, state.queryImage.name || "query.png");
      data = await api("/search", { method: "POST", form });
    } else {
      data = await api("/search", { method: "POST", json: { text, k, filters } });
    }
    renderHits("results", data.results);
    const what = [text && `“${text}”`, state.queryImage && "the image"].filter(Boolean).join(" + ");
    setStatus(
      "search-status",
      `${data.results.length} results for ${what} among ${data.count} documents (${Math.round(data.took_ms)} ms)`,
    );
  } catch (err) {
    setStatus("search-status", describeError(err), true);
  } finally {
    button.disabled = false;
  }
}

function setQueryImage(file) {
  const problem = file && checkImageFile(file);
  if (problem) {
    setStatus("search-status", problem, true);
    return;
  }
  state.queryImage = file || null;
  const preview = $("image-preview");
  preview.hidden = !file;
  if (file) {
    preview.querySelector("img").src = URL.createObjectURL(file);
    $("image-name").textContent = file.name || "pasted image";
  } else {
    $("image").value = "";
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  $("image").addEventListener("change", (e) => setQueryImage(e.target.files[0]));
  $("image-clear").addEventListener("click", () => setQueryImage(null));
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (e.dataTransfer.files.length) setQueryImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    if ($("panel-search").hidden) return;
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) setQueryImage(item.getAsFile());
  });
}

// --- generate -------------------------------------------------------------------------------

function generateMode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function showGenerateMode() {
  const mode = generateMode();
  $("prompt-field").hidden = mode !== "image";
  $("caption-field").hidden = mode !== "caption";
  showCapability("generate-capability", mode === "image" ? "image_generation" : "captioning");
}

async function runGenerate(event) {
  event.preventDefault();
  const mode = generateMode();
  const k = Number($("evidence-k").value);
  const button = event.target.querySelector("button[type=submit]");
  let request;
  if (mode === "image") {
    const prompt = $("prompt").value.trim();
    if (!prompt) return setStatus("generate-status", "Write a caption first.", true);
    request = api("/generate/image", { method: "POST", json: { prompt, k } });
  } else {
    const file = $("caption-image").files[0];
    if (!file) return setStatus("generate-status", "Choose an image first.", true);
    const problem = checkImageFile(file);
    if (problem) return setStatus("generate-status", problem, true);
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("k", String(k));
    request = api("/generate/caption", { method: "POST", form });
  }
  setStatus("generate-status", "Generating…");
  button.disabled = true;
  try {
    const data = await request;
    const output = $("generation-output");
    if (mode === "image") {
      const img = el("img", {
        alt: `Generated for: ${$("prompt").value.trim()}`,
        src: `data:image/png;base64,${data.image.data_base64}`,
        width: String(data.image.width),
        height: String(data.image.height),
      });
      output.replaceChildren(img, el("figcaption", { text: $("prompt").value.trim() }));
    } else {
      const file = $("caption-image").files[0];
      const img = el("img", { alt: "The image captioned", src: URL.createObjectURL(file) });
      output.replaceChildren(img, el("figcaption", { text: data.caption }));
    }
    renderHits("evidence", data.evidence);
    $("generation").hidden = false;
    setStatus("generate-status", `Done, with ${data.evidence.length} evidence documents.`);
  } catch (err) {
    setStatus("generate-status", describeError(err), true);
  } finally {
    button.disabled = false;
  }
}

// --- chat -----------------------------------------------------------------------------------

function chatBubble(role, nodes) {
  const who = { user: "You", assistant: "mmrag", system: "Notice" }[role];
  return el("li", { class: `message ${role}` }, [el("p", { class: "who", text: who }), ...nodes]);
}

function assistantNodes(parts) {
  return parts.map((part) => {
    if (part.type === "text") return el("p", { text: part.text || "" });
    const img = el("img", { alt: part.document_id ? `retrieved document ${part.document_id}` : "generated image" });
    if (part.generated) img.src = `data:image/png;base64,${part.generated.data_base64}`;
    else if (part.image) showImage(img, part.image.thumbnail_url);
    return img;
  });
}

async function runChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  const file = state.chatImage;
  if (!text && !file) return setStatus("chat-status", "Write a message or attach an image.", true);
  const parts = [];
  const shown = [];
  if (file) {
    parts.push({ image_base64: await fileToBase64(file) });
    shown.push(el("img", { alt: file.name || "attached image", src: URL.createObjectURL(file) }));
  }
  if (text) {
    parts.push({ text });
    shown.push(el("p", { text }));
  }
  const log = $("chat-log");
  log.append(chatBubble("user", shown));
  const messages = [...state.chat, { role: "user", parts }];
  setStatus("chat-status", "Thinking…");
  try {
    const data = await api("/chat", { method: "POST", json: { messages } });
    state.chat = [...messages, { role: "assistant", parts: data.message.parts.filter((p) => p.type === "text").map((p) => ({ text: p.text })) }];
    const evidence = el("details", {}, [
      el("summary", { text: `Evidence (${data.evidence.length} documents)` }),
      el("ol", { class: "grid small", "aria-label": "Evidence documents" }, data.evidence.map((hit, i) => hitCard(hit, i + 1))),
    ]);
    log.append(chatBubble("assistant", [...assistantNodes(data.message.parts), evidence]));
    $("chat-input").value = "";
    setChatImage(null);
    setStatus("chat-status", `Answered with ${data.evidence.length} evidence documents.`);
  } catch (err) {
    log.append(chatBubble("system", [el("p", { text: describeError(err) })]));
    setStatus("chat-status", "The message was not answered; see the notice above.", true);
  }
}

function setChatImage(file) {
  const problem = file && checkImageFile(file);
  if (problem) return setStatus("chat-status", problem, true);
  state.chatImage = file || null;
  $("chat-attachment").textContent = file ? `attached: ${file.name}` : "";
  if (!file) $("chat-image").value = "";
}

// --- tabs, stats, token ----------------------------------------------------------------------

function selectTab(tab, focus = true) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length]);
    });
  });
}

function showCapability(id, name) {
  const node = $(id);
  const available = state.stats && state.stats.server.capabilities[name];
  node.hidden = !state.stats || available;
  node.textContent = "Not available yet on this server: the endpoint exists and answers 501 until the model is built and configured.";
}

async function loadStats() {
  try {
    state.stats = await api("/stats");
    const s = state.stats;
    const writes = s.server.writable ? "writable with a token" : "read-only";
    $("memory-info").textContent = `${s.count.toLocaleString()} documents · ${s.images.toLocaleString()} images · encoder ${s.encoder.name} (${s.encoder.dim}-d) · ${writes}`;
    showGenerateMode();
    showCapability("chat-capability", "chat");
  } catch (err) {
    $("memory-info").textContent = describeError(err);
  }
}

function setUpToken() {
  $("token").value = state.token;
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    loadStats();
  });
  $("token-clear").addEventListener("click", () => {
    state.token = "";
    $("token").value = "";
    sessionStorage.removeItem(TOKEN_KEY);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpTabs();
  setUpToken();
  setUpDropZone();
  $("search-form").addEventListener("submit", runSearch);
  $("generate-form").addEventListener("submit", runGenerate);
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", showGenerateMode);
  $("chat-form").addEventListener("submit", runChat);
  $("chat-image").addEventListener("change", (e) => setChatImage(e.target.files[0]));
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  loadStats();
});
