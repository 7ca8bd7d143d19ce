// The page of `mtlvision serve`: upload an image, draw every task's output, toggle tasks, show the latency.
// Plain JavaScript, nothing loaded from outside the service. Boxes and bars are drawn from the JSON of
// /predict; masks, depth, normals and edges come as pictures drawn by the tasks themselves (view=1).
"use strict";

const state = { model: null, hidden: new Set() };
const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function colour(index) {  // distinct hues, one per class
  return `hsl(${(index * 137.508) % 360}, 75%, 50%)`;
}

function bars(entries, chosen) {
  const box = element("div", { class: "bars" });
  for (const [name, value] of entries) {
    const fill = element("div", { class: "fill" });
    fill.style.width = `${(100 * value).toFixed(1)}%`;  // through the CSSOM: the page's policy refuses style attributes
    const row = element("div", { class: chosen.has(name) ? "bar chosen" : "bar" },
      element("span", {}, name), element("div", { class: "track" }, fill),
      element("span", { class: "value" }, value.toFixed(2)));
    box.append(row);
  }
  return box;
}

function drawBoxes(canvas, result, size) {
  canvas.width = size[1];
  canvas.height = size[0];
  const pen = canvas.getContext("2d");
  pen.lineWidth = Math.max(1, Math.round(size[1] / 200));
  pen.font = `${Math.max(10, Math.round(size[1] / 30))}px sans-serif`;
  result.boxes.forEach(([x1, y1, x2, y2], i) => {
    pen.strokeStyle = pen.fillStyle = colour(result.labels[i] + 1);
    pen.strokeRect(x1, y1, x2 - x1, y2 - y1);
    pen.fillText(`${result.class_names[i]} ${result.scores[i].toFixed(2)}`, x1, Math.max(10, y1 - 2));
  });
}

function drawKeypoints(canvas, result, size) {
  canvas.width = size[1];
  canvas.height = size[0];
  const pen = canvas.getContext("2d");
  const radius = Math.max(2, Math.round(size[1] / 150));
  result.boxes.forEach(([x1, y1, x2, y2], i) => {
    pen.strokeStyle = "rgb(160, 160, 160)";
    pen.strokeRect(x1, y1, x2 - x1, y2 - y1);
    result.keypoints[i].forEach(([x, y], k) => {
      pen.fillStyle = colour(k + 1);
      pen.beginPath();
      pen.arc(x, y, radius, 0, 2 * Math.PI);
      pen.fill();
    });
  });
}

const OVERLAYS = { boxes: drawBoxes, keypoints: drawKeypoints };  // kinds drawn over the input from the JSON

const RENDER = {  // per target kind: the panel showing one task's result
  label(name, result) {
    const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 10);
    return [`${result.class_name} (${result.score.toFixed(2)})`, bars(entries, new Set([result.class_name]))];
  },
  labels(name, result) {
    const entries = Object.entries(result.scores).sort((a, b) => b[1] - a[1]).slice(0, 10);
    return [result.labels.length ? result.labels.join(", ") : "(none)", bars(entries, new Set(result.labels))];
  },
  mask(name, result) {
    const classes = Object.entries(result.class_histogram).sort((a, b) => b[1] - a[1]).map(([c]) => c);
    return [classes.slice(0, 4).join(", "), element("img", { src: result.view, alt: `${name} mask` })];
  },
  depth(name, result) {
    const range = result.min === null ? "" : `${result.min.toFixed(2)} – ${result.max.toFixed(2)}`;
    return [range, element("img", { src: result.view, alt: `${name} depth` })];
  },
  normals(name, result) {
    return ["(n + 1) / 2 as RGB", element("img", { src: result.view, alt: `${name} normals` })];
  },
  edges(name, result) {
    return [`${result.edge_pixels} edge pixels`, element("img", { src: result.view, alt: `${name} edges` })];
  },
};

function show(file, reply, roundTrip) {
  const results = $("results");
  results.replaceChildren();
  const image = reply.images[0];
  const stage = element("div", { class: "stage" });
  const picture = element("img", { src: URL.createObjectURL(file), alt: "input" });
  stage.append(picture);
  results.append(element("section", { class: "panel", "data-task": "input" },
    element("h2", {}, `input `, element("small", {}, `${image.size[1]} × ${image.size[0]}`)), stage));
  for (const [name, task] of Object.entries(state.model.tasks)) {
    const result = image.tasks[name];
    const overlay = OVERLAYS[task.target_kind];
    if (overlay) {
      const canvas = element("canvas", { class: "layer", "data-task": name, "data-rendered": "1" });
      overlay(canvas, result, image.size);
      stage.append(canvas);
      continue;
    }
    const render = RENDER[task.target_kind];
    const [summary, body] = render ? render(name, result)
      : ["", element("pre", {}, JSON.stringify(result).slice(0, 400))];
    results.append(element("section", { class: "panel", "data-task": name, "data-rendered": "1" },
      element("h2", {}, `${name} `, element("small", {}, `${task.kind}: ${summary}`)), body));
  }
  applyToggles();
  const t = image.timings_ms;
  setStatus(`server ${reply.timings_ms.total.toFixed(1)} ms (model ${t.model.toFixed(1)} ms in a batch of ` +
    `${t.batch_size}, queue ${t.queue.toFixed(1)} ms) · round trip ${roundTrip.toFixed(1)} ms`);
  document.body.dataset.state = "done";
}

async function predict(file) {
  document.body.dataset.state = "busy";
  setStatus(`predicting ${file.name}…`);
  const form = new FormData();
  form.append("image", file, file.name);
  const started = performance.now();
  try {
    const response = await fetch("/predict?view=1&masks=none&maps=none", { method: "POST", body: form });
    const reply = await response.json();
    if (!response.ok) throw new Error(reply.error ? reply.error.message : response.statusText);
    show(file, reply, performance.now() - started);
  } catch (error) {
    setStatus(`error: ${error.message}`, true);
    document.body.dataset.state = "error";
  }
}

function applyToggles() {
  for (const node of document.querySelectorAll("[data-task]")) {
    node.classList.toggle("hidden", state.hidden.has(node.dataset.task));
  }
}

function buildToggles() {
  const nav = $("toggles");
  for (const [name, task] of Object.entries(state.model.tasks)) {
    const box = element("input", { type: "checkbox", checked: "", "data-toggle": name });
    box.addEventListener("change", () => {
      if (box.checked) state.hidden.delete(name); else state.hidden.add(name);
      applyToggles();
    });
    nav.append(element("label", {}, box, ` ${name} (${task.kind})`));
  }
}

async function start() {
  const response = await fetch("/model");
  state.model = await response.json();
  $("run").textContent = state.model.run;
  const size = state.model.input_size ? state.model.input_size.join(" × ") : "any size";
  $("about").textContent = `${Object.keys(state.model.tasks).length} tasks · input ${size} · ` +
    `${state.model.backend} on ${state.model.device} · batches of up to ${state.model.batching.max_batch}`;
  buildToggles();
  const input = $("file");
  input.addEventListener("change", () => input.files.length && predict(input.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) predict(event.dataTransfer.files[0]);
  });
  setStatus("choose or drop an image");
  document.body.dataset.state = "ready";
}

start().catch((error) => { setStatus(`error: ${error.message}`, true); document.body.dataset.state = "error"; });
