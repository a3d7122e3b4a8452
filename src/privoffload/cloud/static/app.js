// The browser client: obfuscate here (ONNX Runtime Web, WebAssembly), upload only the 8-bit O(x) to the
// cloud's OIP v2 route, show the answer and what the attacker rebuilds from the upload. Nothing else leaves
// the page: the picture is read into memory, obfuscated, and only the rounded upload is sent.
import * as ort from "./ort/ort.wasm.bundle.min.mjs";

ort.env.wasm.numThreads = 1; // one core, as on a phone; no cross-origin isolation needed
ort.env.wasm.wasmPaths = { wasm: new URL("./ort/ort-wasm-simd-threaded.wasm", import.meta.url).href };

const TOKEN_KEY = "privoffload-token"; // sessionStorage: gone when the tab closes; never in the page's source
const $ = (id) => document.getElementById(id);
const state = { ready: false, models: null, obfuscator: null, attack: null, served: [], results: [] };
let secret = sessionStorage.getItem(TOKEN_KEY) || "";

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (secret) headers.Authorization = `Bearer ${secret}`;
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: reported below */ }
  if (!response.ok) {
    const error = new Error(body && body.error ? `${response.status}: ${body.error}` : `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---------------------------------------------------------------- pixels

/** A picture as uint8 [C, H, W], the obfuscator's own size (resized if it is not), RGB or grey as Pillow does. */
async function readPixels(file, [c, h, w]) {
  let bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  if (bitmap.width !== w || bitmap.height !== h) {
    const resized = await createImageBitmap(bitmap, { resizeWidth: w, resizeHeight: h, resizeQuality: "high" });
    bitmap.close();
    bitmap = resized;
  }
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = context.getImageData(0, 0, w, h).data;
  const n = h * w;
  const out = new Uint8Array(c * n);
  for (let i = 0; i < n; i++) {
    const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
    if (c === 3) {
      out[i] = r; out[n + i] = g; out[2 * n + i] = b;
    } else {
      out[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16; // Pillow's convert("L")
    }
  }
  return out;
}

/** Floats in [0, 1] -> 8-bit pixels exactly as the Python client rounds them (float32 product, half to even). */
function quantize(y) {
  const out = new Uint8Array(y.length);
  for (let i = 0; i < y.length; i++) {
    const v = Math.fround(Math.min(Math.max(y[i], 0), 1) * 255);
    let r = Math.round(v);
    if (r - v === 0.5 && (r & 1)) r -= 1;
    out[i] = r;
  }
  return out;
}

function toFloats(pixels) {
  return Float32Array.from(pixels, (v) => v / 255);
}

function picture(pixels, [c, h, w], title) {
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  canvas.title = title;
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  const n = h * w;
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 3; k++) image.data[4 * i + k] = pixels[(c === 3 ? k * n : 0) + i];
    image.data[4 * i + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  return canvas;
}

// ---------------------------------------------------------------- the networks and the cloud

async function run(session, floats, shape) {
  const out = await session.run({ x: new ort.Tensor("float32", floats, shape) });
  return out.y.data;
}

async function obfuscate(pixels, shape) {
  const floats = toFloats(pixels);
  const started = performance.now();
  const y = await run(state.obfuscator, floats, shape);
  return { upload: quantize(y), ms: (performance.now() - started) / shape[0] };
}

/** The OIP v2 request: a JSON header, then the upload's bytes (binary tensor data extension); a JSON answer. */
async function infer(model, upload, shape) {
  const head = new TextEncoder().encode(JSON.stringify({
    inputs: [{ name: "images", datatype: "UINT8", shape, parameters: { binary_data_size: upload.length } }],
    parameters: { binary_data_output: false },
  }));
  const body = new Uint8Array(head.length + upload.length);
  body.set(head);
  body.set(upload, head.length);
  const answer = await call(`/v2/models/${encodeURIComponent(model.name)}/infer`, {
    method: "POST", body,
    headers: { "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": String(head.length) },
  });
  const probabilities = answer.outputs.find((o) => o.name === "probabilities").data;
  const top5 = [...probabilities.keys()].sort((a, b) => probabilities[b] - probabilities[a]).slice(0, 5)
    .map((i) => ({ class: i, label: model.classes[i] ?? `class ${i}`, probability: probabilities[i] }));
  return { version: answer.model_version, top5 };
}

async function connect() {
  const index = await call("/v2/repository/index", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ready: true }),
  });
  const want = state.models.obfuscator.image.join("x");
  state.served = [];
  for (const entry of index) {
    const meta = await call(`/v2/models/${encodeURIComponent(entry.name)}`);
    if (meta.inputs[0].shape.slice(1).join("x") === want) {
      state.served.push({ name: entry.name, version: entry.version, classes: (meta.parameters || {}).classes || [] });
    }
  }
  $("model").replaceChildren(...state.served.map((m) => new Option(`${m.name} (version ${m.version})`, m.name)));
  if (!state.served.length) {
    status(`No served model takes ${want} images, the obfuscator's.`, true);
    return;
  }
  $("file").disabled = false;
  state.ready = true;
  status("Connected. Choose pictures: they are obfuscated here, and only the uploads are sent.");
}

// ---------------------------------------------------------------- the page

function cell(...children) {
  const div = document.createElement("div");
  div.append(...children);
  return div;
}

function answerCell(result) {
  const list = document.createElement("ol");
  list.className = "top5";
  for (const t of result.top5) {
    const item = document.createElement("li");
    const bar = document.createElement("meter");
    bar.value = t.probability;
    item.append(`${t.label} `, bar, ` ${(100 * t.probability).toFixed(1)} %`);
    list.append(item);
  }
  const note = document.createElement("p");
  note.className = "note";
  note.textContent = `${result.model} version ${result.version}; obfuscated in ${result.ms.toFixed(2)} ms`;
  return cell(list, note);
}

async function classify(file) {
  const shape = [1, ...state.models.obfuscator.image];
  const row = document.createElement("div");
  row.className = "row";
  row.dataset.file = file.name;
  $("results").append(row);
  try {
    const pixels = await readPixels(file, state.models.obfuscator.image);
    const { upload, ms } = await obfuscate(pixels, shape);
    const model = state.served.find((m) => m.name === $("model").value);
    const { version, top5 } = await infer(model, upload, shape);
    const rebuilt = state.attack ? quantize(await run(state.attack, toFloats(upload), shape)) : null;
    const result = { file: file.name, model: model.name, version, top5, ms };
    row.append(cell(picture(pixels, shape.slice(1), file.name)), cell(picture(upload, shape.slice(1), "upload")),
      answerCell(result),
      cell(rebuilt ? picture(rebuilt, shape.slice(1), "reconstruction") : "no attack.onnx in the web folder"));
    state.results.push(result);
    row.dataset.state = "done";
  } catch (e) {
    row.append(cell(file.name), cell(`failed: ${e.message}`));
    row.dataset.state = "failed";
    state.results.push({ file: file.name, error: e.message });
  }
}

/** The obfuscator's own timing in this page, per image: one image at a time and in batches. Each figure is the
 * median of 5 loops of `runs` calls timed together, which the browser's coarse clock (0.1 ms) cannot blur. */
async function benchmark(runs = 50, batch = 64) {
  const image = state.models.obfuscator.image;
  const size = image.reduce((a, b) => a * b);
  const timed = async (n, calls) => {
    const floats = Float32Array.from({ length: n * size }, () => Math.random());
    const shape = [n, ...image];
    for (let i = 0; i < 3; i++) await run(state.obfuscator, floats, shape); // warm up
    const loops = [];
    for (let loop = 0; loop < 5; loop++) {
      const started = performance.now();
      for (let i = 0; i < calls; i++) await run(state.obfuscator, floats, shape);
      loops.push((performance.now() - started) / (calls * n));
    }
    return loops.sort((a, b) => a - b)[2];
  };
  return { one: await timed(1, runs), batch: await timed(batch, Math.max(2, Math.round(runs / 10))), runs, batch_size: batch };
}

async function start() {
  try {
    state.models = await call("models.json");
    const o = state.models.obfuscator;
    state.obfuscator = await ort.InferenceSession.create(o.url, { executionProviders: ["wasm"] });
    const a = state.models.attack;
    if (a) state.attack = await ort.InferenceSession.create(a.url, { executionProviders: ["wasm"] });
    $("about").textContent = `Obfuscator: ${o.arch} width ${o.width}, ${o.image.join("x")} images, weights sha256 `
      + `${o.sha256.slice(0, 16)}…; ` + (a ? `attack: ${a.arch} width ${a.width}, sha256 ${a.sha256.slice(0, 16)}…`
        : "no attack.onnx: no reconstruction shown");
  } catch (e) {
    status(`Cannot load the obfuscator: ${e.message}`, true);
    return;
  }
  status("Obfuscator loaded. Type the inference token and Connect.");
  if (secret) await tryConnect();
}

async function tryConnect() {
  try {
    await connect();
  } catch (e) {
    status(e.status === 401 || e.status === 403 ? `The service refused the token (${e.message}); type it again.`
      : `Cannot reach the service: ${e.message}`, true);
  }
}

$("connect").addEventListener("submit", async (event) => {
  event.preventDefault();
  secret = $("token").value;
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, secret);
  await tryConnect();
});

$("file").addEventListener("change", async (event) => {
  for (const file of event.target.files) await classify(file);
});

window.privoffload = { state, benchmark };
start();
