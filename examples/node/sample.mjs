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

import fs from 'node:fs';
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
  return { attributes, latentDim, height, width, temperatureInput: inputs.includes('temperature'), output };
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
    (row) => Array.isArray(row) && row.length === latentDim && row.every((x) => typeof x === 'number' && Number.isFinite(x)));
  if (!ok) throw new UsageError(`--noise ${file}: expected a JSON array of rows of ${latentDim} finite numbers (the latent size)`);
  return { n: rows.length, noise: Float32Array.from(rows.flat()) };
}

// ---- images ------------------------------------------------------------------------------------

// NumPy's np.round: halves to even (Math.round sends them up).
function roundHalfEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// The model's output as uint8 [n, H, W, 3], exactly as toolkit.sampler makes it from a float export:
// round(clip(x, 0, 1) * 255) in float32 (Math.fround of the product is the float32 product).
function toPixels(tensor, spec, n) {
  const { height, width } = spec;
  const expected = spec.output === 'uint8_nhwc' ? [n, height, width, 3] : [n, 3, height, width];
  if (tensor.dims.join() !== expected.join()) {
    throw new Error(`the model returned images of shape [${tensor.dims}], its metadata says [${expected}]`);
  }
  if (spec.output === 'uint8_nhwc') return Uint8Array.from(tensor.data);
  const pixels = new Uint8Array(n * height * width * 3);
  const plane = height * width;
  for (let image = 0; image < n; image++) {
    for (let c = 0; c < 3; c++) {
      for (let p = 0; p < plane; p++) {
        const x = Math.min(Math.max(tensor.data[(image * 3 + c) * plane + p], 0), 1);
        pixels[(image * plane + p) * 3 + c] = roundHalfEven(Math.fround(x * 255));
      }
    }
  }
  return pixels;
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

// Written beside the target, then renamed: a failed run never leaves half a file under its name.
function writeAtomic(file, bytes) {
  const temporary = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    fs.writeFileSync(temporary, bytes);
    fs.renameSync(temporary, file);
  } catch (error) {
    fs.rmSync(temporary, { force: true });
    throw new UsageError(`cannot write ${file}: ${error.code ?? error.message}`);
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
      args.conditions.push([match[1], Number(match[2])]);
    }
  }
  return args;
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
    const index = spec.attributes.indexOf(name);
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
  const rows = new Float32Array(n * attributes.length);  // the same condition for every image
  for (let i = 0; i < n; i++) rows.set(attributes, i * attributes.length);
  const feed = {
    attributes: new ort.Tensor('float32', rows, [n, attributes.length]),
    noise: new ort.Tensor('float32', noise, [n, spec.latentDim]),
  };
  if (spec.temperatureInput) feed.temperature = new ort.Tensor('float32', Float32Array.of(temperature), [1]);

  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['cpu'] });
  const { images } = await session.run(feed);
  const pixels = toPixels(images, spec, n);
  const columns = Math.min(args.columns ?? 8, n);
  const picture = grid(pixels, n, spec.height, spec.width, columns);

  if (args.raw !== undefined) {
    const data = images.data;
    writeAtomic(args.raw, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  }
  writeAtomic(args.out, encodePng(picture));
  const how = seed === null ? `noise from ${args.noise}` : `seed ${seed}`;
  console.log(`wrote ${args.out}: ${n} image(s) of ${spec.width}x${spec.height} in ${Math.ceil(n / columns)} row(s) x ${columns} `
    + `(${picture.width}x${picture.height} pixels; ${how}, temperature ${temperature})`);
  if (args.raw !== undefined) console.log(`wrote ${args.raw}: the output tensor, ${images.type} [${images.dims}]`);
}

main(process.argv.slice(2)).catch((error) => {
  if (error instanceof UsageError) {
    console.error(`sample.mjs: ${error.message}`);
    process.exit(2);
  }
  console.error(`sample.mjs: ${error.message}`);
  process.exit(1);
});
