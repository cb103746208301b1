// The SIA playground: a form over the REST API of this origin (docs/playground.md).
// Nothing the server sends is inserted as HTML: text goes in through textContent.
"use strict";

const KEY_STORAGE = "sia-api-key";
// The server's own limits (sia.validation), checked here only to fail before an upload.
const MAX_FILES = 14;
const MAX_FILE_BYTES = 10 * 1024 * 1024;
const MAX_TOTAL_BYTES = 32 * 1024 * 1024;
// Inputs an error's `param` may name; an error about anything else goes to the banner.
const FIELDS = ["prompt", "model", "size", "n", "images", "key"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);
const form = $("form");
const keyInput = $("key");
const gallery = $("gallery");
const statusLine = $("status");
const banner = $("banner");

let busy = false;
// The task the gallery shows, and the indexes of its images already there: a stream
// or an answer about another task (the user opened one meanwhile) is dropped.
let current = null;
let shown = new Set();

class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

// The key lives as long as this tab: sessionStorage, never localStorage or a URL.
keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("input", () => {
  const key = keyInput.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
});
$("key-form").addEventListener("submit", (event) => event.preventDefault());
// The key's error stays until the new key is tried: clearing it here would move the
// page under a pointer on its way to the Generate button.
keyInput.addEventListener("change", () => {
  loadModels();
  refreshTasks();
});

async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = keyInput.value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...init, headers, cache: "no-store" });
  } catch {
    throw new ApiError(0, "Cannot reach the server.", null);
  }
  if (response.ok) return response;
  if (response.status === 401) {
    const message = key
      ? "This API key was refused: check it."
      : "Enter an API key: this server needs one.";
    throw new ApiError(401, message, "key");
  }
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  const message = error.message || `${response.status} ${response.statusText}`;
  throw new ApiError(response.status, message, error.param);
}

function clearErrors() {
  FIELDS.forEach(clearError);
  banner.textContent = "";
}

function clearError(name) {
  $(name).removeAttribute("aria-invalid");
  $(`${name}-error`).textContent = "";
}

// Next to the input the error names (described by it, and focused), else in the banner.
function showError(error, { focus = true } = {}) {
  const param = error instanceof ApiError && FIELDS.includes(error.param) ? error.param : null;
  if (param === null) {
    banner.textContent = error.message;
    return;
  }
  const input = $(param);
  input.setAttribute("aria-invalid", "true");
  // "size: 99x99 is …" under the Size label need not say "size" again.
  let text = error.message;
  if (text.startsWith(`${param}: `)) text = text.slice(param.length + 2);
  $(`${param}-error`).textContent = text.charAt(0).toUpperCase() + text.slice(1);
  if (focus) input.focus();
}

async function loadModels() {
  try {
    const { data } = await (await api("/v1/models")).json();
    const select = $("model");
    const chosen = select.value;
    const options = data.map((model) => new Option(model.id, model.id));
    select.replaceChildren(new Option("Server default", ""), ...options);
    select.value = data.some((model) => model.id === chosen) ? chosen : "";
    clearError("key"); // the key, if any, was taken
  } catch (error) {
    showError(error, { focus: false });
  }
}

function setBusy(value) {
  busy = value;
  // aria-disabled rather than disabled: a disabled button would drop the keyboard focus.
  $("generate").setAttribute("aria-disabled", String(value));
  form.setAttribute("aria-busy", String(value));
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    form.requestSubmit();
  }
});

async function generate() {
  if (busy) return;
  clearErrors();
  setBusy(true);
  try {
    const count = $("n").value.trim();
    const body = {
      prompt: $("prompt").value,
      response_format: "url",
      n: count === "" ? 1 : Number(count),
      images: await readImages($("images").files),
    };
    const model = $("model").value;
    const size = $("size").value.trim();
    if (model) body.model = model;
    if (size) body.size = size;
    statusLine.textContent = "Submitting…";
    const init = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    };
    const task = await (await api("/v1/tasks", init)).json();
    showFrom(task.id);
    showTask(task);
    await follow(task.id);
  } catch (error) {
    statusLine.textContent = "";
    showError(error);
  } finally {
    setBusy(false);
    refreshTasks();
  }
}

async function readImages(files) {
  if (files.length > MAX_FILES) {
    throw new ApiError(0, `${files.length} files; at most ${MAX_FILES}.`, "images");
  }
  let total = 0;
  for (const file of files) {
    if (file.size > MAX_FILE_BYTES) {
      throw new ApiError(0, `${file.name} is over 10 MB.`, "images");
    }
    total += file.size;
  }
  if (total > MAX_TOTAL_BYTES) {
    throw new ApiError(0, "The files are over 32 MB together.", "images");
  }
  return Promise.all(Array.from(files, (file) => new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); // a data URI, as the API takes them
    reader.onerror = () => reject(new ApiError(0, `Cannot read ${file.name}.`, "images"));
    reader.readAsDataURL(file);
  })));
}

// EventSource cannot send an Authorization header, so the stream is read with fetch:
// events are blocks of `field: value` lines, each block ended by a blank line.
async function follow(id) {
  const path = `/v1/tasks/${encodeURIComponent(id)}/events`;
  const response = await api(path, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (current === id) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      onEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
  reader.cancel(); // another task is shown now: stop listening to this one
}

function onEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    const value = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (data.length === 0) return;
  const payload = JSON.parse(data.join("\n"));
  if (type === "task") showTask(payload);
  else if (type === "error") {
    showError(new ApiError(0, payload.error?.message || "The event stream failed.", null));
  }
}

function showFrom(id) {
  current = id;
  shown = new Set();
  gallery.replaceChildren();
  for (const button of document.querySelectorAll(".task")) markCurrent(button);
}

function markCurrent(button) {
  if (button.dataset.id === current) button.setAttribute("aria-current", "true");
  else button.removeAttribute("aria-current");
}

// Adds the images the gallery lacks, the moment an event or answer shows them.
function showTask(task) {
  if (task.id !== current) return;
  for (const image of task.images) {
    if (shown.has(image.index)) continue;
    shown.add(image.index);
    gallery.append(galleryItem(task, image));
  }
  const made = task.images.filter((image) => !image.error).length;
  const texts = {
    queued: "Queued…",
    running: `Running: ${made} of ${task.n} images`,
    succeeded: `Succeeded: ${made} of ${task.n} images`,
    failed: "Failed.",
    cancelled: "Cancelled.",
  };
  statusLine.textContent = texts[task.status] || task.status;
  if (task.status === "failed" && task.error) {
    showError(new ApiError(0, `The task failed: ${task.error.message}`, null), { focus: false });
  }
}

function galleryItem(task, image) {
  const item = document.createElement("li");
  const name = `Image ${image.index + 1} of ${task.n}`;
  if (image.error) {
    item.className = "failed";
    item.textContent = `${name} failed: ${image.error.message}`;
    return item;
  }
  const src = image.url || `data:${image.content_type};base64,${image.b64_json}`;
  const img = document.createElement("img");
  img.src = src;
  img.alt = `${name}, ${image.size}`;
  const [width, height] = String(image.size).split("x").map(Number);
  if (width && height) Object.assign(img, { width, height }); // no jump as it loads
  const open = document.createElement("a");
  open.href = src;
  open.target = "_blank";
  open.rel = "noopener";
  open.append(img);
  const download = document.createElement("a");
  download.href = src;
  // Ignored by browsers when the image is on another origin (S3, another PUBLIC_URL).
  download.download = `${task.id}-${image.index + 1}.${(image.content_type || "").split("/")[1] || "img"}`;
  download.textContent = "Download";
  download.setAttribute("aria-label", `Download image ${image.index + 1}`);
  const caption = document.createElement("figcaption");
  const label = document.createElement("span");
  label.textContent = `${image.index + 1} · ${image.size}`;
  caption.append(label, download);
  const figure = document.createElement("figure");
  figure.append(open, caption);
  item.append(figure);
  return item;
}

async function refreshTasks() {
  const list = $("tasks");
  try {
    const { data } = await (await api("/v1/tasks?page_size=10")).json();
    list.replaceChildren(...data.map(taskItem));
    if (data.length === 0) list.append(note("No tasks yet."));
  } catch (error) {
    if (error.status === 401) showError(error, { focus: false });
    list.replaceChildren(note(`Cannot list tasks: ${error.message}`));
  }
}

function note(text) {
  const item = document.createElement("li");
  item.className = "empty";
  item.textContent = text;
  return item;
}

function taskItem(task) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "task";
  button.dataset.id = task.id;
  markCurrent(button);
  const summary = document.createElement("span");
  const created = new Date(task.created_at);
  const today = created.toDateString() === new Date().toDateString();
  const when = today ? created.toLocaleTimeString() : created.toLocaleString();
  summary.textContent = `${task.status} · ${task.images.length} of ${task.n} · ${when}`;
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = task.id;
  button.append(summary, id);
  button.addEventListener("click", () => openTask(task.id));
  const item = document.createElement("li");
  item.append(button);
  return item;
}

// Shows a past task's images, and follows it when it is still going.
async function openTask(id) {
  clearErrors();
  showFrom(id);
  try {
    const task = await (await api(`/v1/tasks/${encodeURIComponent(id)}`)).json();
    showTask(task);
    if (!FINAL.has(task.status)) await follow(id);
  } catch (error) {
    showError(error);
  }
}

$("refresh").addEventListener("click", refreshTasks);
loadModels();
refreshTasks();
