// The page of `python predict.py --serve`: pick or drop an image, see its top classes.
// Plain browser JavaScript, no build step, no other origin: everything comes from this server.
// It speaks the language of its picker, in its own words (STRINGS, web/i18n.js) and in the class names:
// the language chosen on an earlier visit (localStorage), else the browser's first one that the page
// speaks, else the server's --lang. The server's errors come with a code, worded here.
"use strict";

const $ = (id) => document.getElementById(id);
const SAVED = "imagenet-ddp.lang"; // the localStorage key of the chosen language
const WORDED = new Set(["empty", "not_an_image", "damaged", "timeout", "busy"]); // codes told with the name alone
let info = null;
let lang = "en";
let current = null; // the last image chosen: asked again when the language changes
let asked = 0; // requests sent: an answer to an older one is dropped
let shown = null; // the status line, {text: () => string, isError}: said again when the language changes

function t(key, params = {}) {
  return (STRINGS[lang] || STRINGS.en)[key].replace(/\{(\w+)\}/g, (_, name) => params[name]);
}

const number = (x, options) => new Intl.NumberFormat(lang, options).format(x);
const megabytes = (n) => `${number(n / 1e6, { minimumFractionDigits: 1, maximumFractionDigits: 1 })}\u00a0MB`;

function say(text, isError = false) {
  shown = { text, isError };
  $("status").textContent = text();
  $("status").className = isError ? "error" : "";
}

function saved() {
  try {
    return localStorage.getItem(SAVED);
  } catch {
    return null; // storage turned off: nothing is remembered
  }
}

function preferred() {
  const choice = saved();
  if (choice && Object.hasOwn(STRINGS, choice)) return choice;
  for (const tag of navigator.languages || [navigator.language]) {
    const code = tag.toLowerCase().split("-")[0];
    if (Object.hasOwn(STRINGS, code)) return code;
  }
  return null;
}

function setLanguage(code) {
  lang = code;
  document.documentElement.lang = code;
  document.title = t("title");
  for (const element of document.querySelectorAll("[data-i18n]")) element.textContent = t(element.dataset.i18n);
  $("model").textContent = info ? t("model", { model: info.model, count: number(info.num_classes) }) : t("loading");
  if (info) {
    $("limit").textContent = t("limit", { size: megabytes(info.max_upload_bytes) });
    $("top-title").textContent = t("top", { count: number(info.topk) });
    $("lang").value = code;
  }
  if (shown) say(shown.text, shown.isError);
}

async function start() {
  setLanguage(preferred() || "en"); // before the first paint: no English flashes by
  try {
    const response = await fetch("/api/info");
    if (!response.ok) throw new Error(response.status);
    info = await response.json();
  } catch {
    say(() => t("no_server"), true);
    return;
  }
  for (const [code, name] of Object.entries(info.languages)) $("lang").add(new Option(name, code));
  const choice = preferred();
  setLanguage(choice && Object.hasOwn(info.languages, choice) ? choice : info.lang);
}

// What went wrong with `file`, in the page's words: by the server's error code, never its English.
function failure(file, code, status) {
  const name = file.name;
  if (code === "too_large") {
    return () => t(code, { name, size: megabytes(file.size), limit: megabytes(info.max_upload_bytes) });
  }
  if (code === "too_many_pixels") {
    return () => t(code, { name, limit: number(info.max_pixels / 1e6, { maximumSignificantDigits: 3 }) });
  }
  if (WORDED.has(code)) return () => t(code, { name });
  if (code === "network") return () => t(code);
  return () => t("server_error", { name, status });
}

async function classify(file) {
  current = file;
  const request = ++asked;
  $("result").hidden = true;
  if (file.size > info.max_upload_bytes) {
    say(failure(file, "too_large"), true);
    return;
  }
  say(() => t("looking", { name: file.name }));
  const query = new URLSearchParams({ lang, topk: info.topk });
  let status = 0;
  let answer;
  try {
    const response = await fetch(`/api/predict?${query}`, { method: "POST", body: file });
    status = response.status;
    answer = await response.json().catch(() => ({})); // not this server's JSON (a proxy's page)
  } catch {
    answer = { code: "network" };
  }
  if (request !== asked) return; // another image or language was chosen meanwhile
  if (status !== 200 || !answer.top) {
    say(failure(file, answer.code, status), true);
    return;
  }
  show(file, answer.top);
}

function show(file, top) {
  say(() => file.name);
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  const list = $("top");
  list.replaceChildren();
  const percent = { style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 1 };
  for (const c of top) {
    const item = document.createElement("li");
    item.dataset.wnid = c.wnid;
    const line = (cls, text) => Object.assign(document.createElement("span"), { className: cls, textContent: text });
    item.append(line("probability", number(c.probability, percent)), line("name", c.name));
    if (c.name_en !== c.name) item.append(" ", line("english", c.name_en));
    item.append(" ", line("wnid", c.wnid));
    const bar = document.createElement("div");
    const filled = document.createElement("span");
    filled.style.width = `${(100 * c.probability).toFixed(1)}%`; // through the CSSOM: allowed by the page's CSP
    bar.className = "bar";
    bar.append(filled);
    item.append(bar);
    list.append(item);
  }
  $("result").hidden = false;
}

$("file").addEventListener("change", () => {
  if ($("file").files.length) classify($("file").files[0]);
});
$("lang").addEventListener("change", () => {
  setLanguage($("lang").value);
  try {
    localStorage.setItem(SAVED, lang);
  } catch {
    // storage turned off: the choice lasts as long as the page
  }
  if (current) classify(current);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
start();
