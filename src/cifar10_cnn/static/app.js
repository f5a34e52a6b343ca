// The page of `cifar10 serve`: pick, drop or paste images; each is posted to /predict and its top classes
// are drawn as bars, and (torch backend) a Grad-CAM heatmap shows where the evidence for the predicted class
// is; a click on a class bar, or the class menu, fetches another class's map for the same image.
// Plain DOM code, no build step, no external resources.
"use strict";

const $ = (selector) => document.querySelector(selector);
const CIFAR10_CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck";
const state = { maxBytes: 10 * 1024 * 1024, topK: 5, classes: [], explain: false };

function percent(p) {
  return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%";
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function loadModel() {
  try {
    const response = await fetch("model");
    const model = await response.json();
    const accuracy = model.test_accuracy == null ? "" : ` · ${(100 * model.test_accuracy).toFixed(1)}% test accuracy`;
    const params = model.params ? ` · ${(model.params / 1e6).toFixed(2)}M parameters` : "";
    $("#model-info").textContent =
      `${model.name} · ${model.architecture}${params}${accuracy} · ${model.backend} backend`;
    $("#classes").textContent = `The model knows ${model.classes.length} classes: ${model.classes.join(", ")}.`;
    const side = model.image_size || 32;
    $("#input-size").textContent = `${side}×${side}`;
    if (model.classes.join(",") !== CIFAR10_CLASSES) {  // trained on other images: the title says so
      document.title = $("h1").textContent = `Image classifier (${model.classes.length} classes)`;
    }
    state.maxBytes = model.limits.max_upload_mb * 1024 * 1024;
    state.topK = Math.min(model.top_k_default, model.classes.length);
    state.classes = model.classes;
    state.explain = Boolean(model.explain && model.explain.available);
    $("#drop-hint").textContent =
      `PNG, JPEG, WebP, GIF, BMP, … up to ${model.limits.max_upload_mb} MB each — or paste one from the clipboard`;
  } catch (err) {
    $("#model-info").textContent = "The model information could not be loaded.";
  }
}

function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".filename").textContent = file.name || "pasted image";
  const preview = card.querySelector(".preview");
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name || "uploaded image";
  preview.onload = () => {
    if (preview.naturalWidth <= 100) preview.classList.add("pixelated");  // show small images' pixels crisply
  };
  preview.onerror = () => card.classList.add("no-preview");  // not an image, or a format the browser cannot show
  $("#results").prepend(card);
  return card;
}

function fail(card, message) {
  card.dataset.state = "error";
  const status = card.querySelector(".status");
  const name = card.querySelector(".filename").textContent;
  status.textContent = message.startsWith(name + ": ") ? message.slice(name.length + 2) : message;
  status.className = "status error-text";
}

// Show an explanation (from /predict) in the card: the overlay, its class in the caption, the menu and the bar.
function showExplanation(card, explanation) {
  const figure = card.querySelector(".heatmap");
  const img = figure.querySelector(".heatmap-img");
  img.src = explanation.png;
  img.dataset.class = explanation["class"];
  img.alt = `heatmap of the evidence for ${explanation["class"]}`;
  figure.querySelector(".explain-class").value = explanation["class"];
  figure.querySelector(".heatmap-status").textContent = "";
  for (const row of card.querySelectorAll(".bar-row")) {
    row.classList.toggle("explained", row.dataset.class === explanation["class"]);
  }
  figure.hidden = false;
  figure.dataset.state = "done";
}

// Fetch the map of another class for the same file; an answer to an older pick is dropped.
async function explainClass(card, file, name) {
  const figure = card.querySelector(".heatmap");
  const pick = (Number(figure.dataset.pick || 0) + 1).toString();
  figure.dataset.pick = pick;
  figure.dataset.state = "loading";
  figure.querySelector(".heatmap-status").textContent = `Explaining ${name}…`;
  const body = new FormData();
  body.append("file", file, file.name || "pasted.png");
  try {
    const response = await fetch(`predict?top_k=1&explain_class=${encodeURIComponent(name)}`, { method: "POST", body });
    const answer = await response.json().catch(() => ({ detail: `the server answered ${response.status}` }));
    if (figure.dataset.pick !== pick) return;
    if (!response.ok) throw new Error(answer.detail || `The server answered ${response.status}.`);
    showExplanation(card, answer.results[0].explanation);
  } catch (err) {
    if (figure.dataset.pick !== pick) return;
    figure.dataset.state = "error";
    figure.querySelector(".heatmap-status").textContent = err.message || "The server could not be reached.";
  }
}

function setUpExplanation(card, file, explanation) {
  const select = card.querySelector(".explain-class");
  for (const name of state.classes) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.append(option);
  }
  select.addEventListener("change", () => explainClass(card, file, select.value));
  for (const row of card.querySelectorAll(".bar-row")) {
    row.tabIndex = 0;
    row.title = `Show where the evidence for ${row.dataset.class} is`;
    row.setAttribute("role", "button");
    row.addEventListener("click", () => explainClass(card, file, row.dataset.class));
    row.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); explainClass(card, file, row.dataset.class); }
    });
  }
  card.classList.add("explainable");
  showExplanation(card, explanation);
}

function render(card, result, file) {
  const [best] = result.predictions;
  const title = card.querySelector(".top-class");
  title.textContent = best["class"];
  title.hidden = false;
  card.querySelector(".status").textContent = `${percent(best.probability)} probability`;
  if (result.input) {
    card.querySelector(".model-input").src = result.input;
    card.querySelector(".seen").hidden = false;
  }
  const bars = card.querySelector(".bars");
  for (const [i, p] of result.predictions.entries()) {
    const row = document.createElement("li");
    row.className = i === 0 ? "bar-row best" : "bar-row";
    row.dataset.class = p["class"];
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p["class"];
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0.5, 100 * p.probability)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(p.probability);
    row.append(label, track, value);
    bars.append(row);
  }
  if (result.explanation) setUpExplanation(card, file, result.explanation);
  card.dataset.state = "done";
}

async function classify(file) {
  const card = newCard(file);
  if (file.size > state.maxBytes) {
    fail(card, `This file is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${state.maxBytes / 1048576} MB.`);
    return;
  }
  const body = new FormData();
  body.append("file", file, file.name || "pasted.png");
  try {
    const explain = state.explain ? "&explain=true" : "";
    const response = await fetch(`predict?top_k=${state.topK}&include_input=true${explain}`, { method: "POST", body });
    const answer = await response.json().catch(() => ({ detail: `the server answered ${response.status}` }));
    if (!response.ok) {
      fail(card, answer.detail || `The server answered ${response.status}.`);
      return;
    }
    render(card, answer.results[0], file);
  } catch (err) {
    fail(card, "The server could not be reached.");
  }
}

function handle(files) {
  showError("");
  const list = Array.from(files || []);
  if (!list.length) {
    showError("That was not a file. Drop an image file, or choose one.");
    return;
  }
  list.forEach(classify);
}

function setUp() {
  const drop = $("#drop");
  const input = $("#file-input");
  input.addEventListener("change", () => { handle(input.files); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("active"); });
  }
  for (const name of ["dragleave", "dragend"]) {
    drop.addEventListener(name, () => drop.classList.remove("active"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("active");
    handle(e.dataTransfer && e.dataTransfer.files);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  // A file dropped next to the zone should not make the browser navigate away to it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  window.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData ? e.clipboardData.files : []);
    if (files.length) handle(files);
  });
  loadModel();
}

setUp();
