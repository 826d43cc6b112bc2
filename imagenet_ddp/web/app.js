// The page of `python predict.py --serve`: pick or drop an image, see its top classes.
// Plain browser JavaScript, no build step, no other origin: everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let current = null; // the last image chosen: asked again when the language changes

const megabytes = (n) => `${(n / 1e6).toFixed(1)} MB`;

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function start() {
  try {
    const response = await fetch("/api/info");
    info = await response.json();
  } catch (e) {
    say(`The server does not answer (${e.message}).`, true);
    return;
  }
  $("model").textContent = `${info.model}, ${info.num_classes} classes`;
  $("limit").textContent = `Up to ${megabytes(info.max_upload_bytes)}.`;
  for (const [code, name] of Object.entries(info.languages)) {
    $("lang").add(new Option(`${name} (${code})`, code, false, code === info.lang));
  }
}

async function classify(file) {
  current = file;
  $("result").hidden = true;
  if (file.size > info.max_upload_bytes) {
    say(`${file.name} is ${megabytes(file.size)}: larger than the limit of ${megabytes(info.max_upload_bytes)}.`, true);
    return;
  }
  say(`Looking at ${file.name}…`);
  const query = new URLSearchParams({ lang: $("lang").value, topk: info.topk });
  let answer;
  try {
    const response = await fetch(`/api/predict?${query}`, { method: "POST", body: file });
    answer = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  } catch (e) {
    answer = { error: `no answer from the server (${e.message})` };
  }
  if (file !== current) return; // another image was chosen meanwhile
  if (answer.error) {
    say(`${file.name}: ${answer.error}`, true);
    return;
  }
  show(file, answer.top);
}

function show(file, top) {
  say(file.name);
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  const list = $("top");
  list.replaceChildren();
  for (const c of top) {
    const item = document.createElement("li");
    item.dataset.wnid = c.wnid;
    const percent = `${(100 * c.probability).toFixed(1)}%`;
    const line = (cls, text) => Object.assign(document.createElement("span"), { className: cls, textContent: text });
    item.append(line("probability", percent), line("name", c.name));
    if (c.name_en !== c.name) item.append(" ", line("english", c.name_en));
    item.append(" ", line("wnid", c.wnid));
    const bar = document.createElement("div");
    const filled = document.createElement("span");
    filled.style.width = percent; // through the CSSOM: allowed by the page's Content-Security-Policy
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
