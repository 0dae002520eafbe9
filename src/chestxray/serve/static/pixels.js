// chestxray viewer: pixel work (16-bit PNG decoding, the window lookup table, compositing).
// Hand-written: browsers decode PNGs only to 8 bits, and a 70-line decoder on the built-in
// DecompressionStream is lighter than vendoring an imaging library.
"use strict";

window.ChestxrayPixels = (() => {
  const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // A non-interlaced 16-bit grayscale PNG -> {width, height, values: Uint16Array}.
  async function decodePng16(buffer) {
    const data = new Uint8Array(buffer);
    const view = new DataView(buffer);
    if (!SIGNATURE.every((b, i) => data[i] === b)) throw new Error("not a PNG");
    let pos = 8, width = 0, height = 0;
    const parts = [];
    while (pos + 8 <= data.length) {
      const length = view.getUint32(pos);
      const type = String.fromCharCode(...data.subarray(pos + 4, pos + 8));
      const body = data.subarray(pos + 8, pos + 8 + length);
      if (type === "IHDR") {
        width = view.getUint32(pos + 8);
        height = view.getUint32(pos + 12);
        if (body[8] !== 16 || body[9] !== 0 || body[12] !== 0) throw new Error("not a 16-bit grayscale PNG");
      } else if (type === "IDAT") {
        parts.push(body);
      } else if (type === "IEND") {
        break;
      }
      pos += 12 + length;
    }
    const raw = await inflate(new Blob(parts));
    const bpp = 2, stride = width * 2;
    if (raw.length < height * (stride + 1)) throw new Error("truncated PNG");
    const out = new Uint8Array(height * stride);
    for (let y = 0; y < height; y++) {
      const filter = raw[y * (stride + 1)];
      const src = y * (stride + 1) + 1, row = y * stride, prev = row - stride;
      for (let i = 0; i < stride; i++) {
        const a = i >= bpp ? out[row + i - bpp] : 0;
        const b = y > 0 ? out[prev + i] : 0;
        const c = i >= bpp && y > 0 ? out[prev + i - bpp] : 0;
        let v = raw[src + i];
        if (filter === 1) v += a;
        else if (filter === 2) v += b;
        else if (filter === 3) v += (a + b) >> 1;
        else if (filter === 4) {
          const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
          v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
        }
        out[row + i] = v & 255;
      }
    }
    const values = new Uint16Array(width * height);
    for (let i = 0; i < values.length; i++) values[i] = (out[2 * i] << 8) | out[2 * i + 1];
    return { width, height, values };
  }

  // DICOM's LINEAR window (PS3.3 C.11.2.1.2) on stored values, the server's window_lut.
  function buildLut(centre, width, invert, lut = new Uint8Array(65536)) {
    for (let x = 0; x < 65536; x++) {
      const y = width > 1 ? (x - (centre - 0.5)) / (width - 1) + 0.5 : (x > centre - 0.5 ? 1 : 0);
      const v = Math.min(255, Math.max(0, Math.floor(y * 255 + 0.5)));
      lut[x] = invert ? 255 - v : v;
    }
    return lut;
  }

  // Cumulative histogram of the values, for image-relative window presets.
  function histogram(values) {
    const cum = new Float64Array(65536);
    for (let i = 0; i < values.length; i++) cum[values[i]] += 1;
    for (let i = 1; i < 65536; i++) cum[i] += cum[i - 1];
    return (q) => {  // the smallest value with at least q of the pixels at or below it
      const target = q * values.length;
      let lo = 0, hi = 65535;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (cum[mid] >= target) hi = mid; else lo = mid + 1; }
      return lo;
    };
  }

  // Windowed image, with the heat layer blended at `a` (opacity x the server's alpha):
  // at opacity 1 this is the server's overlay of the same map (viewer_routes.blend).
  function compose(image, lut, heat, a, out) {
    const { values } = image;
    const px = out.data;
    const mix = heat && a > 0;
    for (let i = 0, j = 0; i < values.length; i++, j += 4) {
      const g = lut[values[i]];
      if (mix) {
        px[j] = Math.floor((1 - a) * g + a * heat[j] + 0.5);
        px[j + 1] = Math.floor((1 - a) * g + a * heat[j + 1] + 0.5);
        px[j + 2] = Math.floor((1 - a) * g + a * heat[j + 2] + 0.5);
      } else {
        px[j] = px[j + 1] = px[j + 2] = g;
      }
      px[j + 3] = 255;
    }
    return out;
  }

  return { decodePng16, buildLut, histogram, compose };
})();
