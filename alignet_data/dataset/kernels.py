"""Compiled (numba) kernels of the hot loops: triplet similarities, tf.train.Example encoding, TFRecord scans.

Imported lazily by `labelling` and `shards` (numba's import and the first call's cache load cost ~1 s), and
compiled once per machine (cached next to this file). Each replaces a numpy/Python path that allocated or looped
per element: see bench/imagenet_scale.py for the figures.
"""
from __future__ import annotations

import functools

import numba
import numpy as np

jit = functools.partial(numba.njit, cache=True, boundscheck=False, nogil=True)


# ------------------------------------------------------------------------------------------ Triplet similarities

# Each triplet's three embedding rows are read once, straight from the matrix, and its three dot products are
# accumulated together: no gathered (m, 3, d) copy, no temporaries. On ImageNet-sized data this is memory bound
# (random rows of a 5.9 GB matrix), so four triplets go through the loop together: twelve independent row streams
# keep more cache misses in flight (1.4x the triplets/s of one at a time on this machine). The last group repeats
# the last triplet instead of taking another code path, so every triplet is computed by the same instructions
# wherever it sits in a block or a thread's chunk: the same bytes for any block size or thread count (tested).
# Products of float32 are exact in float64 and each sum is rounded to float32 once, so the (vectorised,
# reassociated) summation order moves a result by far less than a float32 ulp: almost always the same bytes on
# another CPU too.
@numba.njit(fastmath={"reassoc", "contract", "nsz"}, boundscheck=False, nogil=True, cache=True)
def pair_dots(vectors, positions, out):  # pragma: no cover (compiled)
  d = vectors.shape[1]
  m = positions.shape[0]
  for t in range(0, m, 4):
    a0, b0, c0 = positions[t, 0], positions[t, 1], positions[t, 2]
    u = min(t + 1, m - 1)
    a1, b1, c1 = positions[u, 0], positions[u, 1], positions[u, 2]
    u = min(t + 2, m - 1)
    a2, b2, c2 = positions[u, 0], positions[u, 1], positions[u, 2]
    u = min(t + 3, m - 1)
    a3, b3, c3 = positions[u, 0], positions[u, 1], positions[u, 2]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = s10 = s11 = 0.0
    for i in range(d):
      x0, y0, z0 = numba.float64(vectors[a0, i]), numba.float64(vectors[b0, i]), numba.float64(vectors[c0, i])
      x1, y1, z1 = numba.float64(vectors[a1, i]), numba.float64(vectors[b1, i]), numba.float64(vectors[c1, i])
      x2, y2, z2 = numba.float64(vectors[a2, i]), numba.float64(vectors[b2, i]), numba.float64(vectors[c2, i])
      x3, y3, z3 = numba.float64(vectors[a3, i]), numba.float64(vectors[b3, i]), numba.float64(vectors[c3, i])
      s0 += x0 * y0
      s1 += x0 * z0
      s2 += y0 * z0
      s3 += x1 * y1
      s4 += x1 * z1
      s5 += y1 * z1
      s6 += x2 * y2
      s7 += x2 * z2
      s8 += y2 * z2
      s9 += x3 * y3
      s10 += x3 * z3
      s11 += y3 * z3
    out[t, 0], out[t, 1], out[t, 2] = s0, s1, s2
    if t + 1 < m:
      out[t + 1, 0], out[t + 1, 1], out[t + 1, 2] = s3, s4, s5
    if t + 2 < m:
      out[t + 2, 0], out[t + 2, 1], out[t + 2, 2] = s6, s7, s8
    if t + 3 < m:
      out[t + 3, 0], out[t + 3, 1], out[t + 3, 2] = s9, s10, s11


# ------------------------------------------------------------------------------------------ tf.train.Example

# protobuf's deterministic serialisation of tf.train.Example written byte by byte (map entries sorted by key,
# packed numeric lists, as protobuf does), with the TFRecord framing and crc32c in the same pass.
_KIND_TAG = (0x1A, 0x12, 0x0A)  # Feature.int64_list, .float_list, .bytes_list (kind codes 0, 1, 2)


@jit
def vlen(v):  # pragma: no cover (compiled)
  n = 1
  while v >= 128:
    v >>= 7
    n += 1
  return n


@jit
def put(buf, pos, v):  # pragma: no cover
  while v >= 128:
    buf[pos] = (v & 0x7F) | 0x80
    v >>= 7
    pos += 1
  buf[pos] = v
  return pos + 1


@jit
def crc_table():  # pragma: no cover
  """crc32c slicing-by-8 tables (8, 256): row 0 is the byte-wise table; a record's crc reads 8 bytes a step
  with 8 independent lookups (the byte-wise loop's dependent lookups made the crc most of the encoding time)."""
  table = np.empty((8, 256), np.uint32)
  for i in range(256):
    c = np.uint32(i)
    for _ in range(8):
      c = (c >> np.uint32(1)) ^ np.uint32(0x82F63B78) if c & np.uint32(1) else c >> np.uint32(1)
    table[0, i] = c
  for k in range(1, 8):
    for i in range(256):
      prev = table[k - 1, i]
      table[k, i] = (prev >> np.uint32(8)) ^ table[0, prev & np.uint32(0xFF)]
  return table


@jit
def crc32c(buf, start, stop, table):  # pragma: no cover
  """crc32c of buf[start:stop] (slicing-by-8)."""
  c = np.uint32(0xFFFFFFFF)
  i = start
  while i + 8 <= stop:
    one = c ^ (np.uint32(buf[i]) | (np.uint32(buf[i + 1]) << np.uint32(8)) | (np.uint32(buf[i + 2]) << np.uint32(16))
               | (np.uint32(buf[i + 3]) << np.uint32(24)))
    c = (table[7, one & np.uint32(0xFF)] ^ table[6, (one >> np.uint32(8)) & np.uint32(0xFF)]
         ^ table[5, (one >> np.uint32(16)) & np.uint32(0xFF)] ^ table[4, one >> np.uint32(24)]
         ^ table[3, buf[i + 4]] ^ table[2, buf[i + 5]] ^ table[1, buf[i + 6]] ^ table[0, buf[i + 7]])
    i += 8
  while i < stop:
    c = table[0, (c ^ np.uint32(buf[i])) & np.uint32(0xFF)] ^ (c >> np.uint32(8))
    i += 1
  return c ^ np.uint32(0xFFFFFFFF)


@jit
def masked_crc(buf, start, stop, table):  # pragma: no cover
  c = crc32c(buf, start, stop, table)
  return (((c >> np.uint32(15)) | (c << np.uint32(17))) + np.uint32(0xA282EAD8)) & np.uint32(0xFFFFFFFF)


@jit
def sizes(r, ints, floats, str_len, n_str, kinds, widths, cols, key_len, fe, el):  # pragma: no cover
  total = 0
  for f in range(kinds.shape[0]):
    k, w, c = kinds[f], widths[f], cols[f]
    if k == 0:
      p = 0
      for j in range(w):
        p += vlen(ints[r, c + j])
      body = 1 + vlen(p) + p
    elif k == 1:
      body = 1 + vlen(4 * w) + 4 * w
    else:
      body = 0
      for j in range(w):
        n = str_len[r * n_str + c + j]
        body += 1 + vlen(n) + n
    fe[f] = 1 + vlen(body) + body
    el[f] = 2 + key_len[f] + 1 + vlen(fe[f]) + fe[f]
    total += 1 + vlen(el[f]) + el[f]
  return total


@jit
def encode_examples(ints, floats, str_bytes, str_off, n_str, kinds, widths, cols, keys, key_off, framed):
  m = ints.shape[0]
  nf = kinds.shape[0]
  key_len = key_off[1:] - key_off[:-1]
  str_len = str_off[1:] - str_off[:-1]
  fe = np.empty(nf, np.int64)
  el = np.empty(nf, np.int64)
  lengths = np.empty(m, np.int64)
  extra = 16 if framed else 0
  total = 0
  for r in range(m):
    features = sizes(r, ints, floats, str_len, n_str, kinds, widths, cols, key_len, fe, el)
    lengths[r] = 1 + vlen(features) + features
    total += lengths[r] + extra
  buf = np.empty(total, np.uint8)
  table = crc_table()
  pos = 0
  for r in range(m):
    features = sizes(r, ints, floats, str_len, n_str, kinds, widths, cols, key_len, fe, el)
    if framed:
      n = lengths[r]
      for b in range(8):
        buf[pos + b] = (n >> (8 * b)) & 0xFF
      crc = masked_crc(buf, pos, pos + 8, table)
      for b in range(4):
        buf[pos + 8 + b] = (crc >> np.uint32(8 * b)) & np.uint32(0xFF)
      pos += 12
    start = pos
    buf[pos] = 0x0A
    pos = put(buf, pos + 1, features)
    for f in range(nf):
      k, w, c = kinds[f], widths[f], cols[f]
      buf[pos] = 0x0A
      pos = put(buf, pos + 1, el[f])
      buf[pos] = 0x0A
      buf[pos + 1] = key_len[f]
      pos += 2
      for j in range(key_len[f]):
        buf[pos + j] = keys[key_off[f] + j]
      pos += key_len[f]
      buf[pos] = 0x12
      pos = put(buf, pos + 1, fe[f])
      buf[pos] = _KIND_TAG[k]
      if k == 0:
        p = 0
        for j in range(w):
          p += vlen(ints[r, c + j])
        pos = put(buf, pos + 1, 1 + vlen(p) + p)
        buf[pos] = 0x0A
        pos = put(buf, pos + 1, p)
        for j in range(w):
          pos = put(buf, pos, ints[r, c + j])
      elif k == 1:
        pos = put(buf, pos + 1, 1 + vlen(4 * w) + 4 * w)
        buf[pos] = 0x0A
        pos = put(buf, pos + 1, 4 * w)
        for j in range(w):
          bits = floats[r, c + j]
          for b in range(4):
            buf[pos + b] = (bits >> np.uint32(8 * b)) & np.uint32(0xFF)
          pos += 4
      else:
        body = 0
        for j in range(w):
          n = str_len[r * n_str + c + j]
          body += 1 + vlen(n) + n
        pos = put(buf, pos + 1, body)
        for j in range(w):
          s = r * n_str + c + j
          buf[pos] = 0x0A
          pos = put(buf, pos + 1, str_len[s])
          for b in range(str_len[s]):
            buf[pos + b] = str_bytes[str_off[s] + b]
          pos += str_len[s]
    if framed:
      crc = masked_crc(buf, start, pos, table)
      for b in range(4):
        buf[pos + b] = (crc >> np.uint32(8 * b)) & np.uint32(0xFF)
      pos += 4
  return buf, lengths


@jit
def ascii_utf8(codes):  # pragma: no cover (compiled)
  """UTF-8 of NUL-padded UTF-32 strings (n, width) when all are ASCII: (flat bytes, offsets (n + 1,), True); else
  (empty, empty, False). One pass to size, one to copy: no (n, width) temporaries."""
  n, width = codes.shape
  offsets = np.empty(n + 1, np.int64)
  offsets[0] = 0
  for i in range(n):
    length = 0
    for j in range(width):
      c = codes[i, j]
      if c >= 128:
        return np.empty(0, np.uint8), np.empty(0, np.int64), False
      if c != 0:
        length = j + 1  # numpy strips trailing NULs only.
    offsets[i + 1] = offsets[i] + length
  flat = np.empty(offsets[n], np.uint8)
  for i in range(n):
    start = offsets[i]
    for j in range(offsets[i + 1] - start):
      flat[start + j] = codes[i, j]
  return flat, offsets, True


@jit
def scan_tfrecord(buf):  # pragma: no cover (compiled)
  """Walk the framing, checking both crc32c of every record: (records, error code, byte of the error)."""
  table = crc_table()
  pos = 0
  count = 0
  n_bytes = buf.shape[0]
  while pos < n_bytes:
    if pos + 12 > n_bytes:
      return count, 1, pos
    masked = masked_crc(buf, pos, pos + 8, table)
    stored = np.uint32(0)
    for b in range(4):
      stored |= np.uint32(buf[pos + 8 + b]) << np.uint32(8 * b)
    if masked != stored:
      return count, 2, pos
    n = 0
    for b in range(8):
      n |= np.int64(buf[pos + b]) << (8 * b)
    if n < 0 or pos + 16 + n > n_bytes:
      return count, 3, pos
    masked = masked_crc(buf, pos + 12, pos + 12 + n, table)
    stored = np.uint32(0)
    for b in range(4):
      stored |= np.uint32(buf[pos + 12 + n + b]) << np.uint32(8 * b)
    if masked != stored:
      return count, 4, pos
    pos += 16 + n
    count += 1
  return count, 0, pos
