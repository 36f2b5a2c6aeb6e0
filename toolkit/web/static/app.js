// cvae-tk studio: the exported sampler (and its encoder, if any) run in the browser by onnxruntime-web.
// Static files only: model.json (the export's metadata, written by `cvae-tk web`), the .onnx
// files and ort/ lie beside this page. WebGPU where the browser has an adapter that runs the model
// (see chooseBackend, openModels), else wasm (CPU); `?backend=wasm` forces wasm.
//
// Noise: xoshiro128**, its four words seeded by MurmurHash3's fmix32 of a Weyl sequence from the
// seed (state += 0x9e3779b9), turned into standard normals by
// Box-Muller (both outputs of each pair), as float32, row after row: sample i's noise does not
// depend on how many samples are shown. It is not numpy's generator: the same seed gives other
// images than `cvae-tk sample --seed`.
//
// Test hook: window.cvae (see the end of this file).

const params = new URLSearchParams(location.search);
const $ = (selector) => document.querySelector(selector);
const MANY = 24;  // more attributes than this: a filter box and groups
const MAX_SAMPLES = 64;
const PAD = 2;  // white between tiles, as toolkit.sampler.image_grid draws them

// --- noise --------------------------------------------------------------------------------------

function weylFmix32(state) {
  return () => {
    state = (state + 0x9e3779b9) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
}

function xoshiro128ss(seed) {
  const init = weylFmix32(seed >>> 0);
  const s = [init(), init(), init(), init()];
  return () => {
    const result = Math.imul(((Math.imul(s[1], 5) << 7) | (Math.imul(s[1], 5) >>> 25)), 9) >>> 0;
    const t = (s[1] << 9) >>> 0;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = ((s[3] << 11) | (s[3] >>> 21)) >>> 0;
    for (let i = 0; i < 4; i++) s[i] >>>= 0;
    return result;
  };
}

// `count` standard normal float32 values from `seed` (an integer in [0, 2**32)).
export function normalNoise(seed, count) {
  const next = xoshiro128ss(seed);
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const u1 = (next() + 0.5) / 4294967296;  // in (0, 1): the log never sees 0
    const u2 = (next() + 0.5) / 4294967296;
    const radius = Math.sqrt(-2 * Math.log(u1));
    out[i] = radius * Math.cos(2 * Math.PI * u2);
    if (i + 1 < count) out[i + 1] = radius * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

// --- attribute groups -----------------------------------------------------------------------------

// The group of a name: its prefix before '::' (CUB's has_bill_shape::dagger), "classes" for
// numbered class names (CUB's 001.Black_footed_Albatross), else its prefix before '_'. Groups of
// one name are gathered in "other".
export function groupNames(names) {
  const key = (name) => {
    if (name.includes('::')) return name.slice(0, name.indexOf('::'));
    if (/^\d+[.]/.test(name)) return 'classes';
    return name.includes('_') ? name.slice(0, name.indexOf('_')) : name;
  };
  const groups = new Map();
  names.forEach((name, index) => {
    const k = key(name);
    if (!groups.has(k)) groups.set(k, []);
    groups.get(k).push(index);
  });
  const result = [], other = [];
  for (const [name, members] of groups) (members.length > 1 ? result.push({ name, members }) : other.push(...members));
  if (other.length) result.push({ name: 'other', members: other.sort((a, b) => a - b) });
  return result;
}

// --- the models -------------------------------------------------------------------------------

let ort, model, decoder, encoder, backend;
let queue = Promise.resolve();  // one session.run at a time: onnxruntime-web does not overlap runs

function exclusive(job) {
  const result = queue.then(job);
  queue = result.catch(() => {});
  return result;
}

// WebGPU where the browser gives an adapter that can run the model, else wasm (the CPU). An fp16
// export needs the adapter's 'shader-f16' feature: without it onnxruntime-web opens the session but
// fails its first run ("Cast requires f16 but the device does not support it").
async function chooseBackend() {
  if (params.get('backend') === 'wasm' || !navigator.gpu) return 'wasm';
  try {
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return 'wasm';
    if (model.decoder.metadata.precision === 'fp16' && !adapter.features.has('shader-f16')) {
      console.warn('this WebGPU adapter has no shader-f16, which the fp16 export needs: using wasm');
      return 'wasm';
    }
    return 'webgpu';
  } catch {
    return 'wasm';
  }
}

// One run on inputs of the session's own shapes (zeros): a kernel the WebGPU device cannot run fails
// here, at the first run (opening the session does not find it), not in front of the user.
async function probe(session, file) {
  const [H, W] = model.image_size, A = model.attributes.length, Z = model.latent_dim;
  const shapes = file === model.decoder.file
    ? { attributes: [1, A], noise: [1, Z], temperature: [1] }
    : { images: [1, 3, H, W], attributes: [1, A] };
  const feeds = {};
  for (const name of session.inputNames) {
    const shape = shapes[name];
    feeds[name] = new ort.Tensor('float32', new Float32Array(shape.reduce((a, b) => a * b, 1)), shape);
  }
  await session.run(feeds);
}

// The decoder's and encoder's sessions on `backend`; on WebGPU each is probed, and anything WebGPU
// cannot do (opening or running a model) falls back to wasm for both, so the footer says the truth.
async function openModels() {
  const files = [model.decoder.file, ...(model.encoder ? [model.encoder.file] : [])];
  const open = async (provider, check) => {
    const sessions = [];
    try {
      for (const file of files) {
        sessions.push(await ort.InferenceSession.create(file, { executionProviders: [provider], logSeverityLevel: 3 }));
        if (check) await probe(sessions.at(-1), file);
      }
      return sessions;
    } catch (error) {
      // the GPU memory of those opened (the decoder's, when the encoder fails): wasm opens them again
      await Promise.allSettled(sessions.map((session) => session.release()));
      throw error;
    }
  };
  if (backend === 'webgpu') {
    try {
      return await open('webgpu', true);
    } catch (error) {
      console.warn(`WebGPU cannot run this model here (${error.message}): using wasm`);
      backend = 'wasm';
    }
  }
  return open('wasm', false);
}

// The decoder's raw output for `rows` conditions: Float32Array [B, 3, H, W] (float32_nchw) or
// Uint8Array [B, H, W, 3] (uint8_nhwc). attributes: Float32Array [B * A], noise [B * Z].
async function decode(attributes, noise, rows, temperature = 1) {
  const A = model.attributes.length, Z = model.latent_dim;
  if (!model.temperature_input && temperature !== 1) {
    const t = Math.fround(temperature);  // float32 times float32 is exact in a double: numpy's product
    noise = noise.map((value) => value * t);
  }
  const feeds = {
    attributes: new ort.Tensor('float32', attributes, [rows, A]),
    noise: new ort.Tensor('float32', noise, [rows, Z]),
  };
  if (model.temperature_input) feeds.temperature = new ort.Tensor('float32', Float32Array.of(temperature), [1]);
  const output = await exclusive(() => decoder.run(feeds));
  return output.images.data;
}

// Round half to even, as numpy's np.round does.
function roundHalfEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// images (decode's output) -> one ImageData per image; a float output becomes grey levels exactly as
// toolkit.sampler makes them: round(clip(x, 0, 1) * 255) with the product in float32 (Math.fround of
// the exact double product of two float32 numbers is their float32 product).
function toImages(images, rows) {
  const [H, W] = model.image_size, plane = H * W, result = [];
  const float = model.output !== 'uint8_nhwc';
  for (let b = 0; b < rows; b++) {
    const image = new ImageData(W, H), px = image.data;
    for (let p = 0; p < plane; p++) {
      for (let c = 0; c < 3; c++) {
        px[4 * p + c] = float
          ? roundHalfEven(Math.fround(Math.min(Math.max(images[(b * 3 + c) * plane + p], 0), 1) * 255))
          : images[(b * plane + p) * 3 + c];
      }
      px[4 * p + 3] = 255;
    }
    result.push(image);
  }
  return result;
}

// pixels: Float32Array [3, H, W] in [0, 1]; attributes: Float32Array [A] -> the encoder's outputs.
async function encode(pixels, attributes) {
  const [H, W] = model.image_size, A = model.attributes.length;
  const feeds = {
    images: new ort.Tensor('float32', pixels, [1, 3, H, W]),
    attributes: new ort.Tensor('float32', attributes, [1, A]),
  };
  const output = await exclusive(() => encoder.run(feeds));
  const result = {};
  for (const [name, tensor] of Object.entries(output)) result[name] = Float32Array.from(tensor.data);
  return result;
}

// The noise that makes the decoder produce exactly z under `attributes`: z itself for the standard
// prior; for the learned one, (z - mean_p) / std_p of p(z | attributes), from the encoder's outputs.
async function noiseFor(z, pixels, attributes) {
  if (model.prior !== 'learned') return z;
  const prior = await encode(pixels, attributes);
  return z.map((value, i) => (value - prior.prior_mean[i]) / Math.exp(0.5 * prior.prior_logvar[i]));
}

// --- photo preparation -------------------------------------------------------------------------------

// A photo (Blob) prepared as the encoder's `preprocessing` says: the centred square of `side` pixels
// (a smaller photo is refused, as Sampler.preprocess refuses it), then the canvas's smooth resize to
// the model's size (not PIL's bilinear one: see docs/web/README.md), on white (no transparency).
// Returns {pixels: Float32Array [3, H, W] in [0, 1], image: ImageData}.
async function preparePhoto(blob) {
  const bitmap = await createImageBitmap(blob, { imageOrientation: 'from-image' });
  const [H, W] = model.image_size;
  const crop = model.encoder.metadata.preprocessing.crop;
  let [sx, sy, sw, sh] = [0, 0, bitmap.width, bitmap.height];
  if (crop && crop.kind === 'center') {
    const side = crop.side;
    if (side > Math.min(bitmap.width, bitmap.height)) {
      bitmap.close();
      throw new Error(`the photo is ${bitmap.width}x${bitmap.height}, smaller than the centre crop of ${side} the model's `
        + `shards were made with: give a photo framed as the data set's (at least ${side}x${side})`);
    }
    [sx, sy, sw, sh] = [bitmap.width / 2 - side / 2, bitmap.height / 2 - side / 2, side, side];
  }  // "bbox": the data set's own box, which a photo lacks: the whole photo (crop it beforehand)
  const canvas = new OffscreenCanvas(W, H);
  const context = canvas.getContext('2d', { willReadFrequently: true });
  context.fillStyle = '#fff';
  context.fillRect(0, 0, W, H);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = 'high';
  context.drawImage(bitmap, sx, sy, sw, sh, 0, 0, W, H);
  bitmap.close();
  const image = context.getImageData(0, 0, W, H);
  const pixels = new Float32Array(3 * H * W);
  for (let p = 0; p < H * W; p++) for (let c = 0; c < 3; c++) pixels[c * H * W + p] = image.data[4 * p + c] / 255;
  return { pixels, image };
}

// --- state, rendering ----------------------------------------------------------------------------------

const state = {
  attributes: null,  // Float32Array [A]
  seed: 0,
  temperature: 1,
  count: 8,
  noise: null,  // a test's own noise rows (Float32Array [count * Z]) instead of the seed's
  photo: null,  // {pixels, image, attributes, z, noise} while a photo is edited
  lastNoise: null,
  lastImages: null,
  columns: 1,
};
let renders = 0, dirty = false, running = null;

function schedule() {
  dirty = true;
  if (!running) running = renderLoop().finally(() => { running = null; });
  return running;
}

async function renderLoop() {
  while (dirty) {
    dirty = false;
    try {
      await renderOnce();
      renders++;
    } catch (error) {
      $('#status').textContent = `error: ${error.message}`;
      console.error(error);
    }
  }
}

async function renderOnce() {
  const A = model.attributes.length, Z = model.latent_dim;
  const started = performance.now();
  let tiles, legend;
  if (state.photo) {
    const photo = state.photo;
    const rows = new Float32Array(2 * A);
    rows.set(photo.attributes, 0);
    rows.set(state.attributes, A);
    const noise = new Float32Array(2 * Z);
    noise.set(photo.noise, 0);
    noise.set(await noiseFor(photo.z, photo.pixels, state.attributes), Z);
    state.lastNoise = noise;
    const images = toImages(await decode(rows, noise, 2), 2);
    tiles = [photo.image, ...images];
    legend = 'the photo as the model sees it · its reconstruction · the edit (the current toggles)';
    state.columns = 3;
  } else {
    const n = state.count;
    const rows = new Float32Array(n * A);
    for (let i = 0; i < n; i++) rows.set(state.attributes, i * A);
    const noise = state.noise || normalNoise(state.seed, n * Z);
    state.lastNoise = noise;
    tiles = toImages(await decode(rows, noise, n, state.temperature), n);
    legend = `${n} sample(s) · seed ${state.noise ? '(given noise)' : state.seed} · temperature ${state.temperature.toFixed(2)}`;
    state.columns = n <= 4 ? n : n <= 16 ? 4 : 8;  // near square: the tiles can be shown larger
  }
  state.lastImages = tiles;
  drawGrid(tiles, state.columns);
  $('#legend').textContent = legend;
  $('#status').textContent = `${(performance.now() - started).toFixed(0)} ms`;
  $('#download').disabled = false;
}

function drawGrid(tiles, columns) {
  const [H, W] = model.image_size;
  const rows = Math.ceil(tiles.length / columns);
  const canvas = $('#grid');
  canvas.width = columns * (W + PAD) + PAD;
  canvas.height = rows * (H + PAD) + PAD;
  const context = canvas.getContext('2d', { willReadFrequently: true });
  context.fillStyle = '#fff';
  context.fillRect(0, 0, canvas.width, canvas.height);
  tiles.forEach((tile, i) => context.putImageData(tile, PAD + (i % columns) * (W + PAD), PAD + Math.floor(i / columns) * (H + PAD)));
  // Shown enlarged by a whole factor (pixels stay sharp); the canvas itself keeps the model's pixels.
  const roomWidth = Math.min(canvas.parentElement.clientWidth - 32, 720);
  const roomHeight = Math.max(240, window.innerHeight - 190);
  const scale = Math.max(1, Math.floor(Math.min(roomWidth / canvas.width, roomHeight / canvas.height)));
  canvas.style.width = `${canvas.width * scale}px`;
  // Small images (digits) enlarged as blocks; photos (64 px and up) smoothly, as a viewer shows them.
  canvas.style.imageRendering = Math.min(H, W) < 64 ? 'pixelated' : 'auto';
}

// --- the controls --------------------------------------------------------------------------------------

function attributeToggle(index, grouped = false) {
  const name = model.attributes[index];
  const label = document.createElement('label');
  label.className = 'toggle';
  label.dataset.name = name.toLowerCase();
  const box = document.createElement('input');
  box.type = 'checkbox';
  box.dataset.index = index;
  box.name = name;
  box.addEventListener('change', () => {
    state.attributes[index] = box.checked ? 1 : 0;
    updateCounts();
    schedule();
  });
  label.title = name;
  // inside a group 'has_bill_shape' show 'dagger' for has_bill_shape::dagger; the filter sees the whole name
  label.append(box, document.createTextNode(grouped && name.includes('::') ? name.slice(name.indexOf('::') + 2) : name));
  return label;
}

function buildAttributes() {
  const A = model.attributes.length, root = $('#attributes');
  if (A <= MANY) {
    root.className = 'flat';
    for (let i = 0; i < A; i++) root.append(attributeToggle(i));
    return;
  }
  root.className = 'grouped';
  $('#filter').hidden = false;
  for (const group of groupNames(model.attributes)) {
    const details = document.createElement('details');
    details.className = 'group';
    details.dataset.group = group.name;
    const summary = document.createElement('summary');
    summary.innerHTML = `<span class="group-name"></span> <span class="muted count"></span>`;
    summary.querySelector('.group-name').textContent = group.name;
    const body = document.createElement('div');
    body.className = 'members';
    for (const index of group.members) body.append(attributeToggle(index, true));
    details.append(summary, body);
    root.append(details);
  }
  $('#filter').addEventListener('input', applyFilter);
}

function applyFilter() {
  const text = $('#filter').value.trim().toLowerCase();
  for (const group of document.querySelectorAll('#attributes .group')) {
    let shown = 0;
    for (const label of group.querySelectorAll('.toggle')) {
      const match = !text || label.dataset.name.includes(text);
      label.hidden = !match;
      shown += match;
    }
    group.hidden = shown === 0;
    group.open = Boolean(text) && shown > 0;
  }
}

function updateCounts() {
  const on = state.attributes.reduce((sum, value) => sum + value, 0);
  $('#selected-count').textContent = `${on} of ${model.attributes.length} on`;
  for (const group of document.querySelectorAll('#attributes .group')) {
    const boxes = [...group.querySelectorAll('input')];
    const set = boxes.filter((box) => box.checked).length;
    group.querySelector('.count').textContent = set ? `${set}/${boxes.length}` : `${boxes.length}`;
    group.classList.toggle('has-set', set > 0);
  }
}

// Set the toggles (and state) to `vector` (0/1 per attribute) without a redraw per box.
function setAttributes(vector) {
  state.attributes = Float32Array.from(vector);
  for (const box of document.querySelectorAll('#attributes input')) box.checked = state.attributes[box.dataset.index] === 1;
  updateCounts();
}

function wireControls() {
  const seed = $('#seed'), temperature = $('#temperature'), count = $('#count');
  seed.addEventListener('input', () => {
    const value = Number(seed.value);
    if (Number.isInteger(value) && value >= 0 && value < 4294967296) {
      state.seed = value;
      state.noise = null;
      schedule();
    }
  });
  $('#new-seed').addEventListener('click', () => {
    seed.value = String(Math.floor(Math.random() * 100000));
    seed.dispatchEvent(new Event('input'));
  });
  temperature.addEventListener('input', () => {
    state.temperature = Number(temperature.value);
    $('#temperature-value').textContent = state.temperature.toFixed(2);
    schedule();
  });
  count.addEventListener('input', () => {
    const value = Number(count.value);
    if (Number.isInteger(value) && value >= 1 && value <= MAX_SAMPLES) {
      state.count = value;
      state.noise = null;
      schedule();
    }
  });
  $('#clear').addEventListener('click', () => {
    setAttributes(new Float32Array(model.attributes.length));
    schedule();
  });
  $('#download').addEventListener('click', download);
  if (model.encoder) wirePhoto();
}

function download() {
  $('#grid').toBlob((blob) => {
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = `${model.name}-${state.photo ? 'edit' : `seed${state.seed}`}.png`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, 'image/png');
}

function wirePhoto() {
  $('#photo-panel').hidden = false;
  const drop = $('#drop');
  $('#photo-file').addEventListener('change', (event) => event.target.files[0] && loadPhoto(event.target.files[0]));
  drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    if (event.dataTransfer.files[0]) loadPhoto(event.dataTransfer.files[0]);
  });
  $('#reencode').addEventListener('click', () => state.photo && encodePhoto(state.photo));
  $('#clear-photo').addEventListener('click', () => {
    state.photo = null;
    $('#photo-buttons').hidden = true;
    $('#photo-file').value = '';
    schedule();
  });
}

async function loadPhoto(blob) {
  try {
    const photo = await preparePhoto(blob);
    await encodePhoto(photo);
    $('#photo-buttons').hidden = false;
  } catch (error) {
    $('#status').textContent = `cannot read that photo: ${error.message}`;
  }
}

// The photo's z: the posterior mean given it and the current toggles (taken as its attributes).
async function encodePhoto(photo) {
  photo.attributes = Float32Array.from(state.attributes);
  photo.z = (await encode(photo.pixels, photo.attributes)).mean;
  photo.noise = await noiseFor(photo.z, photo.pixels, photo.attributes);
  state.photo = photo;
  const on = model.attributes.filter((_, i) => photo.attributes[i] === 1);
  $('#photo-info').textContent = `photo's attributes: ${on.join(', ') || 'none'}; toggle to edit it`;
  return schedule();
}

// --- start -----------------------------------------------------------------------------------------

async function start() {
  model = await (await fetch('model.json')).json();
  backend = await chooseBackend();
  ort = await import('./ort/ort.webgpu.min.mjs');
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  // errors only (here and each session's logSeverityLevel): onnxruntime's warnings (which nodes it
  // placed on the CPU) say nothing a user can act on
  ort.env.logLevel = 'error';
  [decoder, encoder = null] = await openModels();
  const meta = model.decoder.metadata;
  $('#model-name').textContent = model.name;
  $('#model-info').textContent = [
    `${model.attributes.length} attributes`, `${model.image_size[0]}x${model.image_size[1]}`, `z ${model.latent_dim}`,
    `${model.prior} prior`, meta.arch, meta.step && `step ${meta.step}`,
    // which variant of the export runs: its precision, and what its graph does other than the plain one
    meta.precision || 'fp32', model.output === 'uint8_nhwc' && 'uint8 output', model.temperature_input && 'temperature input',
    model.encoder ? 'with encoder' : 'no encoder',
  ].filter(Boolean).join(' · ');
  $('#backend').textContent = backend;
  state.attributes = new Float32Array(model.attributes.length);
  buildAttributes();
  updateCounts();
  wireControls();
  await schedule();
}

const ready = start();
ready.catch((error) => {
  $('#status').textContent = `error: ${error.message}`;
  console.error(error);
});

// The test hook: exact inputs in, exact pixels out.
window.cvae = {
  ready: ready.then(() => true),
  get model() { return model; },
  get backend() { return backend; },
  get renders() { return renders; },
  normalNoise: (seed, count) => Array.from(normalNoise(seed, count)),
  groupNames,
  // The raw decoder output (flat, see `decode`) for attribute rows and noise rows.
  async run({ attributes, noise, temperature = 1 }) {
    const data = await decode(Float32Array.from(attributes.flat()), Float32Array.from(noise.flat()), attributes.length, temperature);
    return Array.from(data);
  },
  async encode({ pixels, attributes }) {
    const outputs = await encode(Float32Array.from(pixels), Float32Array.from(attributes));
    return Object.fromEntries(Object.entries(outputs).map(([k, v]) => [k, Array.from(v)]));
  },
  // Redraw the grid with these noise rows (count * Z values) instead of the seed's; null: the seed's.
  setNoise(rows) {
    state.noise = rows ? Float32Array.from(rows.flat()) : null;
    if (rows) $('#count').value = String(state.count = rows.length);
    return schedule();
  },
  setAttributes(vector) { setAttributes(vector); return schedule(); },
  // Resolves once every change so far is drawn.
  async idle() { while (running) await running; return renders; },
  state() {
    return {
      attributes: Array.from(state.attributes), seed: state.seed, temperature: state.temperature, count: state.count,
      noise: state.lastNoise && Array.from(state.lastNoise), columns: state.columns, pad: PAD,
      photo: state.photo && { attributes: Array.from(state.photo.attributes), z: Array.from(state.photo.z), pixels: Array.from(state.photo.pixels) },
    };
  },
  // The grid canvas's RGBA pixels as read back from it.
  grid() {
    const canvas = $('#grid');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let text = '';
    for (let i = 0; i < data.length; i += 0x8000) text += String.fromCharCode(...data.subarray(i, i + 0x8000));
    return { width: canvas.width, height: canvas.height, rgba: btoa(text) };
  },
};
