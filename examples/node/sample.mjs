#!/usr/bin/env node
// Sample a cvae-tk export (sampler/1) with onnxruntime-node and write a PNG grid: no Python, no
// cvae-tk, no npm package but onnxruntime-node (the PNG is encoded here with node's own zlib).
//
//   node examples/node/sample.mjs export/digits.onnx digit_3=1 -n 8 --seed 0 --out threes.png
//
// Options: NAME=0|1 (unnamed attributes are 0), -n N (images, default 8), --seed S (integer >= 0;
// default: a random one, printed), --temperature T (default 1), --columns C (default min(n, 8)),
// --noise FILE.json (exact noise: [[z_1..z_Z], ...], one row per image; replaces -n and --seed, so
// the images equal those Python makes from the same array), --raw FILE (also write the model's
// output tensor as it came: little-endian float32 [n, 3, H, W], or uint8 [n, H, W, 3] for a --uint8
// export), --out FILE.png (default sample.png).
//
// The metadata (attribute names, latent size, ...) is read from the .onnx file itself: onnxruntime-node
// does not expose an ONNX file's metadata_props, but they are a top-level field of the file's protobuf,
// which a 30-line reader finds (readMetadata below), so any export works alone, with no sidecar file.

import { constants as bufferConstants } from 'node:buffer';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';

class UsageError extends Error {}

// onnxruntime-node is imported when the model is run, not at the top: without it installed, a static
// import fails before any line runs, with Node's stack trace instead of what to install.
async function importOrt() {
  try {
    return (await import('onnxruntime-node')).default;
  } catch (error) {
    if (error.code !== 'ERR_MODULE_NOT_FOUND') throw error;
    throw new UsageError('onnxruntime-node is not installed where this script can import it: '
      + 'npm install onnxruntime-node (in cvae-tk: bash scripts/setup-js.sh)');
  }
}

// ---- the export's metadata_props, straight from the protobuf ----------------------------------

// ModelProto field 14 is `repeated StringStringEntryProto metadata_props` (key = 1, value = 2). Only
// the top level is walked: the graph (field 7, nearly all of the file) is skipped by its length.
function readMetadata(bytes) {
  let pos = 0;
  const varint = (end) => {
    let value = 0;
    for (let scale = 1; ; scale *= 128) {  // multiplication, not shifts: lengths may pass 2^31
      if (pos >= end) throw new UsageError('not an ONNX file (the protobuf ends inside a number)');
      const byte = bytes[pos++];
      value += (byte & 0x7f) * scale;
      if (byte < 0x80) return value;
    }
  };
  // Calls visit(field, start, end) for each length-delimited field of bytes[start, end); skips the rest.
  const fields = (start, end, visit) => {
    pos = start;
    while (pos < end) {
      const tag = varint(end);
      const field = Math.floor(tag / 8);
      const wire = tag % 8;
      if (wire === 0) varint(end);
      else if (wire === 1) pos += 8;
      else if (wire === 5) pos += 4;
      else if (wire === 2) {
        const length = varint(end);
        const from = pos;
        pos += length;
        if (pos > end) throw new UsageError('not an ONNX file (a field runs past its end)');
        const after = pos;
        visit(field, from, pos);
        pos = after;
      } else throw new UsageError(`not an ONNX file (protobuf wire type ${wire})`);
    }
    if (pos !== end) throw new UsageError('not an ONNX file (a field runs past its end)');
  };
  const text = (start, end) => new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(start, end));
  const metadata = {};
  fields(0, bytes.length, (field, start, end) => {
    if (field !== 14) return;
    let key = '';
    let value = '';
    fields(start, end, (inner, from, to) => {
      if (inner === 1) key = text(from, to);
      else if (inner === 2) value = text(from, to);
    });
    metadata[key] = value;
  });
  return metadata;
}

// What this script needs of the sampler/1 contract (export/README.md), checked with one-line errors.
function contract(metadata, file) {
  const format = metadata['cvae_tk.format'];
  if (format !== 'sampler/1') {
    const what = format === undefined ? 'has no cvae_tk.format metadata' : `is a ${format} file`;
    throw new UsageError(`${file} ${what}: expected a cvae-tk sampler export (cvae_tk.format = sampler/1)`);
  }
  const json = (key) => {
    try {
      return JSON.parse(metadata[key]);
    } catch {
      throw new UsageError(`${file}: metadata '${key}' is not valid JSON: ${metadata[key]}`);
    }
  };
  const attributes = json('attributes');
  const latentDim = Number(metadata.latent_dim);
  const [height, width] = json('image_size');
  const inputs = metadata.inputs === undefined ? ['attributes', 'noise'] : json('inputs');
  const output = metadata.output ?? 'float32_nchw';
  if (!Array.isArray(attributes) || !(latentDim >= 1) || !(height >= 1 && width >= 1)) {
    throw new UsageError(`${file}: metadata attributes / latent_dim / image_size are not as sampler/1 says`);
  }
  if (output !== 'float32_nchw' && output !== 'uint8_nhwc') throw new UsageError(`${file}: unknown output layout ${output}`);
  return { file, attributes, latentDim, height, width, temperatureInput: inputs.includes('temperature'), output };
}

// ---- noise: a seeded PRNG and Box-Muller ------------------------------------------------------

// mulberry32: 32-bit state, uniform in [0, 1). Not NumPy's generator: a seed gives other images
// here than in Python; --noise gives the same.
function uniform(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function normalNoise(count, seed) {
  const next = uniform(seed);
  const noise = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const radius = Math.sqrt(-2 * Math.log(1 - next()));  // 1 - u is in (0, 1]: no log(0)
    const angle = 2 * Math.PI * next();
    noise[i] = radius * Math.cos(angle);
    if (i + 1 < count) noise[i + 1] = radius * Math.sin(angle);
  }
  return noise;
}

function noiseFromFile(file, latentDim) {
  let rows;
  try {
    rows = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (error) {
    throw new UsageError(`--noise ${file}: ${error.code === 'ENOENT' ? 'no such file' : 'not valid JSON'}`);
  }
  const ok = Array.isArray(rows) && rows.length >= 1 && rows.every(
    // finite as float32, which the model takes (1e300 is infinite there), as toolkit.sampler checks its noise
    (row) => Array.isArray(row) && row.length === latentDim && row.every((x) => typeof x === 'number' && Number.isFinite(Math.fround(x))));
  if (!ok) {
    throw new UsageError(`--noise ${file}: expected a JSON array of rows of ${latentDim} finite numbers (the latent size; `
      + 'as float32, which ends at 3.4e38)');
  }
  return { n: rows.length, noise: Float32Array.from(rows.flat()) };
}

// ---- images ------------------------------------------------------------------------------------

// NumPy's np.round: halves to even (Math.round sends them up).
function roundHalfEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// The model's output for `rows` images as uint8 [rows, H, W, 3], written into `pixels` from image
// `first` on, exactly as toolkit.sampler makes it from a float export: round(clip(x, 0, 1) * 255) in
// float32 (Math.fround of the product is the float32 product).
function toPixels(tensor, spec, rows, pixels, first) {
  const { height, width } = spec;
  const expected = spec.output === 'uint8_nhwc' ? [rows, height, width, 3] : [rows, 3, height, width];
  if (tensor.dims.join() !== expected.join()) {
    throw new Error(`the model returned images of shape [${tensor.dims}], its metadata says [${expected}]`);
  }
  const plane = height * width;
  if (spec.output === 'uint8_nhwc') {
    pixels.set(tensor.data, first * plane * 3);
    return;
  }
  // As toolkit.sampler checks every batch: NaN (which clipping made pixel 0, black, without a word) and
  // values outside the metadata's value_range [0, 1] are the file's fault, refused in one line.
  let low = Infinity;
  let high = -Infinity;
  for (const x of tensor.data) {
    if (x < low) low = x;
    if (x > high) high = x;
    if (Number.isNaN(x)) {  // as np.min and np.max give it
      low = NaN;
      break;
    }
  }
  if (!(Number.isFinite(low) && Number.isFinite(high))) {
    throw new Error(`${spec.file}: the graph returned NaN or infinite pixels (broken weights, or inputs far outside the prior's range?)`);
  }
  if (low < -1e-3 || high > 1 + 1e-3) {
    throw new Error(`${spec.file}: the graph's images range from ${low.toPrecision(3)} to ${high.toPrecision(3)}, but its metadata's value_range is [0, 1]`);
  }
  for (let image = 0; image < rows; image++) {
    const to = (first + image) * plane;
    for (let c = 0; c < 3; c++) {
      for (let p = 0; p < plane; p++) {
        const x = Math.min(Math.max(tensor.data[(image * 3 + c) * plane + p], 0), 1);
        pixels[(to + p) * 3 + c] = roundHalfEven(Math.fround(x * 255));
      }
    }
  }
}

// As toolkit.sampler.image_grid: `columns` per row, 2 white pixels around and between the images.
function grid(pixels, n, height, width, columns, padding = 2) {
  const rows = Math.ceil(n / columns);
  const gridWidth = columns * (width + padding) + padding;
  const gridHeight = rows * (height + padding) + padding;
  const out = new Uint8Array(gridWidth * gridHeight * 3).fill(255);
  for (let image = 0; image < n; image++) {
    const top = padding + Math.floor(image / columns) * (height + padding);
    const left = padding + (image % columns) * (width + padding);
    for (let y = 0; y < height; y++) {
      const from = ((image * height + y) * width) * 3;
      out.set(pixels.subarray(from, from + width * 3), ((top + y) * gridWidth + left) * 3);
    }
  }
  return { data: out, width: gridWidth, height: gridHeight };
}

// ---- PNG: signature, IHDR, IDAT (zlib), IEND; each chunk with its CRC-32 ----------------------

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([length, body, crc]);
}

function encodePng({ data, width, height }) {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8;  // bits per sample
  header[9] = 2;  // colour type: RGB
  // [10..12] = 0: deflate, adaptive filtering, no interlace
  const stride = width * 3;
  const raw = Buffer.alloc((stride + 1) * height);  // each row: filter type 0 (none), then its pixels
  for (let y = 0; y < height; y++) raw.set(data.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', header),
    chunk('IDAT', zlib.deflateSync(raw, { level: 9 })),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

// `.<name>.<pid>.tmp` beside `file`, <name> cut (by UTF-8 bytes, whole characters) where the whole would
// pass the 255 bytes a file name may have: a final name of 250 bytes is legal (toolkit/atomic.py cuts so too).
function temporaryBeside(file) {
  const suffix = `.${process.pid}.tmp`;
  let name = path.basename(file);
  while (Buffer.byteLength(`.${name}${suffix}`) > 255) name = Array.from(name).slice(0, -1).join('');
  return path.join(path.dirname(file), `.${name}${suffix}`);
}

// Both outputs or neither: each written beside its target, then (every write done) renamed onto it;
// a failed write removes the temporaries and leaves the targets as they were, and a failed rename
// removes what the earlier ones put in place, so --raw never stays without the --out PNG it came
// with. `outputs` are [target (outputTarget's: a link's, not the link itself), bytes, name] each.
function writeOutputs(outputs) {
  const staged = [];
  const renamed = [];
  const cleanUp = (files) => {
    for (const file of files) {
      try {
        fs.rmSync(file, { force: true });
      } catch {
        // nothing was created there
      }
    }
  };
  let current;
  try {
    for (const [target, bytes, name] of outputs) {
      current = name;
      const temporary = temporaryBeside(target);
      staged.push(temporary);
      fs.writeFileSync(temporary, bytes);
    }
    for (const [index, [target, , name]] of outputs.entries()) {
      current = name;
      fs.renameSync(staged[index], target);
      renamed.push(target);
    }
  } catch (error) {
    cleanUp(staged);
    cleanUp(renamed);
    const others = outputs.map(([, , name]) => name).filter((name) => name !== current);
    const kept = others.length ? `; ${others.join(', ')} not written either` : '';
    throw new UsageError(`cannot write ${current}: ${error.code ?? error.message}${kept}`);
  }
}

// The file an output name will replace, checked before any work, as cvae-tk checks its outputs
// (toolkit/atomic.py): a name that is a link is written through it, as the shell's `>` does (the
// target replaced, the link kept; renaming onto the link would replace the link itself); a link to
// nothing and a folder are refused.
function outputTarget(file, flag) {
  const folder = path.dirname(path.resolve(file));
  let folderStat;
  try {
    folderStat = fs.statSync(folder);
  } catch (error) {
    const why = error.code === 'ENOENT' ? `the folder ${path.dirname(file)} does not exist` : error.code;
    throw new UsageError(`cannot write ${flag} ${file}: ${why}`);
  }
  if (!folderStat.isDirectory()) throw new UsageError(`cannot write ${flag} ${file}: ${path.dirname(file)} is a file, not a folder`);
  let stat;
  try {
    stat = fs.lstatSync(file);
  } catch (error) {
    if (error.code === 'ENOENT') return path.resolve(file);  // a new file
    throw new UsageError(`cannot write ${flag} ${file}: ${error.code}`);
  }
  let target = path.resolve(file);
  if (stat.isSymbolicLink()) {
    try {
      target = fs.realpathSync(file);
    } catch {
      throw new UsageError(`cannot write ${flag} ${file}: it is a link to ${fs.readlinkSync(file)}, which does not exist; create it or remove the link`);
    }
  }
  if (fs.statSync(target).isDirectory()) throw new UsageError(`cannot write ${flag} ${file}: it is a folder, expected a file name`);
  return target;
}

// Whether two names are one file: the same inode (through links and hard links), or, for names
// that do not exist yet, the same path once their folders' links are resolved.
function sameFile(a, b) {
  const statOf = (file) => {
    try {
      return fs.statSync(file);
    } catch {
      return null;
    }
  };
  const [sa, sb] = [statOf(a), statOf(b)];
  if (sa && sb) return sa.dev === sb.dev && sa.ino === sb.ino;
  if (sa || sb) return false;
  const canonical = (file) => {
    try {
      return path.join(fs.realpathSync(path.dirname(path.resolve(file))), path.basename(file));
    } catch {
      return path.resolve(file);
    }
  };
  return canonical(a) === canonical(b);
}

// ---- memory ------------------------------------------------------------------------------------

const BATCH = 256;  // images per session.run, as toolkit.sampler's default batch_size: ONNX Runtime's buffers stay bounded

// What this process may still allocate: the machine's available memory, or a container's room
// (cgroup v2 or v1) when that is less (as toolkit/memory.py).
function availableBytes() {
  // MemAvailable on Linux, read directly: os.freemem() gives it only from Node 20 on (MemFree before,
  // which a large page cache makes small)
  let available = os.freemem();
  try {
    const line = fs.readFileSync('/proc/meminfo', 'utf8').match(/^MemAvailable:\s+(\d+) kB$/m);
    if (line) available = Number(line[1]) * 1024;
  } catch {
    // not Linux: os.freemem() is the best guess
  }
  for (const [limitFile, usageFile] of [
    ['/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'],
    ['/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory/memory.usage_in_bytes'],
  ]) {
    try {
      const limit = fs.readFileSync(limitFile, 'utf8').trim();
      const usage = Number(fs.readFileSync(usageFile, 'utf8').trim());
      if (/^\d+$/.test(limit) && Number(limit) < 2 ** 60) available = Math.min(available, Math.max(Number(limit) - usage, 0));
      break;
    } catch {
      // no such cgroup file: the next kind, or the machine's figure
    }
  }
  return available;
}

const gib = (bytes) => (bytes >= 2 ** 30 / 10 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`);

// n images, their grid and its PNG are held at once (and the output tensor with --raw): refused
// before anything is allocated when they would not fit (the kernel's OOM killer ended the process
// at -n 200000000; at 2000000 ONNX Runtime failed to allocate a 131 GB buffer), or when one of them
// is more than a Node.js buffer holds.
function checkMemory(spec, n, columns, raw, source) {
  const { height, width, latentDim, attributes } = spec;
  const values = height * width * 3;
  const gridWidth = columns * (width + 2) + 2;
  const gridHeight = Math.ceil(n / columns) * (height + 2) + 2;
  const buffers = {
    'the pixels': n * values,
    'the grid': gridWidth * gridHeight * 3,
    "the grid's PNG data": (gridWidth * 3 + 1) * gridHeight,
    'the output tensor (--raw)': raw ? n * values * (spec.output === 'uint8_nhwc' ? 1 : 4) : 0,
  };
  const what = `${n} image(s) of ${width}x${height}`;
  for (const [name, bytes] of Object.entries(buffers)) {
    if (bytes > bufferConstants.MAX_LENGTH) {
      throw new UsageError(`${source.flag}: ${name} of ${what} would be ${gib(bytes)}, more than a Node.js buffer holds (${gib(bufferConstants.MAX_LENGTH)}): ${source.advice}`);
    }
  }
  const needed = Object.values(buffers).reduce((a, b) => a + b)
    + buffers["the grid's PNG data"]  // its compressed copy
    + n * 4 * (latentDim + attributes.length)  // the noise and the attribute rows
    + Math.min(n, BATCH) * values * 5;  // one batch in flight
  const available = availableBytes();
  if (needed > available) {
    throw new UsageError(`${source.flag}: ${what} need ${gib(needed)} of memory, but only ${gib(available)} is available: ${source.advice}`);
  }
}

// ---- command line -------------------------------------------------------------------------------

function parseArgs(argv) {
  const args = { conditions: [], out: 'sample.png' };
  const integer = (flag, text, min) => {
    if (!/^\d+$/.test(text ?? '') || Number(text) < min || Number(text) > 2 ** 32 - 1) {
      throw new UsageError(`${flag} must be an integer >= ${min}, got ${text ?? 'nothing'}`);
    }
    return Number(text);
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '-n') args.n = integer('-n', value(), 1);
    else if (arg === '--seed') args.seed = integer('--seed', value(), 0);
    else if (arg === '--columns') args.columns = integer('--columns', value(), 1);
    else if (arg === '--temperature') {
      const text = value();
      args.temperature = Number(text);
      if (text.trim() === '' || !(args.temperature >= 0 && args.temperature <= 1000)) {
        throw new UsageError(`--temperature must be a number from 0 to 1000, got ${text}`);
      }
    } else if (arg === '--noise') args.noise = value();
    else if (arg === '--raw') args.raw = value();
    else if (arg === '--out') args.out = value();
    else if (arg === '-h' || arg === '--help') args.help = true;
    else if (arg.startsWith('-')) throw new UsageError(`unknown option ${arg} (see --help)`);
    else if (args.model === undefined) args.model = arg;
    else {
      const match = /^(.+)=([01])$/.exec(arg);
      if (!match) throw new UsageError(`expected an attribute as NAME=0 or NAME=1, got ${arg}`);
      const [name, value] = [match[1], Number(match[2])];
      const earlier = args.conditions.find(([given]) => given.normalize('NFC') === name.normalize('NFC'));
      if (earlier && earlier[1] !== value) {  // which one was meant cannot be told (cvae-tk sample --attr refuses it too)
        throw new UsageError(`${name} is set twice, to ${earlier[1]} and to ${value}: give it once`);
      }
      if (!earlier) args.conditions.push([name, value]);
    }
  }
  return args;
}

// The column of an attribute name as typed: the name itself, or the one name that is the same text in
// Unicode's NFC ('é' typed as 'e' + a combining accent, as macOS keyboards give it), as toolkit.sampler matches.
function attributeIndex(names, name) {
  const exact = names.indexOf(name);
  if (exact >= 0) return exact;
  const text = name.normalize('NFC');
  const found = names.flatMap((other, index) => (other.normalize('NFC') === text ? [index] : []));
  return found.length === 1 ? found[0] : -1;
}

const HELP = `usage: node sample.mjs EXPORT.onnx [NAME=0|1 ...] [-n N] [--seed S] [--temperature T]
                      [--columns C] [--noise FILE.json] [--raw FILE] [--out FILE.png]`;

async function main(argv) {
  const args = parseArgs(argv);
  if (args.help) {
    console.log(HELP);
    return;
  }
  if (args.model === undefined) throw new UsageError(`name the export to sample\n${HELP}`);
  if (!args.out.toLowerCase().endsWith('.png')) throw new UsageError(`--out must name a .png file, got ${args.out}`);
  // The outputs, before any work: a link is written through; an output that is an input (the
  // export, the --noise file: --raw export/digits.onnx replaced the model with the tensor) or
  // the other output is refused.
  const outputs = [['--out', args.out]];
  if (args.raw !== undefined) outputs.push(['--raw', args.raw]);
  const inputs = [['the export', args.model], ['--noise', args.noise]].filter(([, file]) => file !== undefined);
  for (const [flag, file] of outputs) {
    for (const [what, input] of inputs) {
      if (sameFile(file, input)) {
        throw new UsageError(`cannot write ${flag} ${file}: it is ${input}, ${what} this command reads; write it to another file`);
      }
    }
  }
  if (args.raw !== undefined && sameFile(args.out, args.raw)) {
    throw new UsageError(`--out ${args.out} and --raw ${args.raw} are one file: give them different names`);
  }
  const targets = Object.fromEntries(outputs.map(([flag, file]) => [flag, outputTarget(file, flag)]));
  let bytes;
  try {
    bytes = fs.readFileSync(args.model);
  } catch (error) {
    throw new UsageError(`cannot read ${args.model}: ${error.code === 'ENOENT' ? 'no such file' : error.code}`);
  }
  let metadata;
  try {
    metadata = readMetadata(bytes);
  } catch (error) {
    throw new UsageError(`${args.model} is ${error.message}`);
  }
  const spec = contract(metadata, args.model);

  const attributes = new Float32Array(spec.attributes.length);
  for (const [name, value] of args.conditions) {
    const index = attributeIndex(spec.attributes, name);
    if (index < 0) throw new UsageError(`unknown attribute '${name}': valid attributes: ${spec.attributes.join(', ')}`);
    attributes[index] = value;
  }

  let n;
  let noise;
  let seed = null;
  if (args.noise !== undefined) {
    if (args.seed !== undefined) throw new UsageError('give --noise or --seed, not both');
    ({ n, noise } = noiseFromFile(args.noise, spec.latentDim));
    if (args.n !== undefined && args.n !== n) throw new UsageError(`-n ${args.n} but --noise ${args.noise} has ${n} rows`);
  } else {
    n = args.n ?? 8;
  }
  const columns = Math.min(args.columns ?? 8, n);
  const source = args.noise !== undefined
    ? { flag: `--noise ${args.noise}`, advice: 'give fewer rows of noise' }
    : { flag: `-n ${n}`, advice: 'ask for fewer images (-n)' };
  checkMemory(spec, n, columns, args.raw !== undefined, source);  // before the noise is drawn
  if (noise === undefined) {
    seed = args.seed ?? Math.floor(Math.random() * 2 ** 32);
    noise = normalNoise(n * spec.latentDim, seed);
  }
  const temperature = args.temperature ?? 1;
  if (!spec.temperatureInput && temperature !== 1) {
    // The same as the graph's own temperature input (and toolkit.sampler): noise * T, in float32.
    const t = Math.fround(temperature);
    for (let i = 0; i < noise.length; i++) noise[i] *= t;
  }

  const ort = await importOrt();
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['cpu'] });
  const pixels = new Uint8Array(n * spec.height * spec.width * 3);
  const values = spec.height * spec.width * 3;
  const raw = args.raw === undefined ? null : spec.output === 'uint8_nhwc' ? new Uint8Array(n * values) : new Float32Array(n * values);
  let type;
  let dims;
  for (let first = 0; first < n; first += BATCH) {  // batch by batch, as toolkit.sampler runs it
    const rows = Math.min(BATCH, n - first);
    const conditions = new Float32Array(rows * attributes.length);  // the same condition for every image
    for (let i = 0; i < rows; i++) conditions.set(attributes, i * attributes.length);
    const feed = {
      attributes: new ort.Tensor('float32', conditions, [rows, attributes.length]),
      noise: new ort.Tensor('float32', noise.subarray(first * spec.latentDim, (first + rows) * spec.latentDim), [rows, spec.latentDim]),
    };
    if (spec.temperatureInput) feed.temperature = new ort.Tensor('float32', Float32Array.of(temperature), [1]);
    const { images } = await session.run(feed);
    toPixels(images, spec, rows, pixels, first);
    if (raw !== null) raw.set(images.data, first * values);
    type = images.type;
    dims = [n, ...images.dims.slice(1)];
  }
  const picture = grid(pixels, n, spec.height, spec.width, columns);

  const written = [[targets['--out'], encodePng(picture), args.out]];
  if (raw !== null) written.push([targets['--raw'], Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength), args.raw]);
  writeOutputs(written);
  const how = seed === null ? `noise from ${args.noise}` : `seed ${seed}`;
  console.log(`wrote ${args.out}: ${n} image(s) of ${spec.width}x${spec.height} in ${Math.ceil(n / columns)} row(s) x ${columns} `
    + `(${picture.width}x${picture.height} pixels; ${how}, temperature ${temperature})`);
  if (args.raw !== undefined) console.log(`wrote ${args.raw}: the output tensor, ${type} [${dims}]`);
}

main(process.argv.slice(2)).catch((error) => {
  if (error instanceof UsageError) {
    console.error(`sample.mjs: ${error.message}`);
    process.exit(2);
  }
  console.error(`sample.mjs: ${error.message}`);
  process.exit(1);
});
