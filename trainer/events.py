"""Log files of a run on any fsspec URL, and a minimal TensorBoard event-file writer (scalars only, no TensorFlow).

`LogFile` grows a file as training goes: appended to on local disks, rewritten whole on object stores (gs://,
memory://), which cannot append. An event file is a TFRecord file (length, masked crc32c, data, masked crc32c)
of serialised `tensorflow.Event` protos. The few fields we write are encoded by hand (protobuf wire format), so
logging costs no 8 s TensorFlow import per run. TensorBoard (and `tf.compat.v1.train.summary_iterator`) read the
files as usual:
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
"""
from __future__ import annotations

import itertools
import os
import posixpath
import socket
import struct
import time
from collections.abc import Mapping

from alignet_data import artifacts

# Rewrites of a file on an object store are a round trip each: at most one per this many seconds, unless forced.
from alignet_data.dataset import shards

REMOTE_FLUSH_SECONDS = 10.0

_SERIAL = itertools.count()  # Two writers of one process in one second must not share a file name.


class LogFile:
  """A file written from the start and then grown, on any fsspec URL.

  Local files are opened once, appended to and flushed, so a killed run keeps everything flushed. Object stores
  cannot append: the content is kept in memory and the whole file rewritten on `flush` (at most every
  `REMOTE_FLUSH_SECONDS`, or at once with `force`) and on `close`.
  """

  def __init__(self, url: str, initial: bytes = b""):
    self.url = url
    self._fs, self._path = artifacts.url_to_fs(url)
    self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
    self._local = artifacts.is_local(self._fs)
    self._buffer = bytearray(initial)
    self._f = self._fs.open(self._path, "wb") if self._local else None
    self._last_flush = float("-inf")
    self.flush(force=True)

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self, force: bool = False) -> None:
    if self._f is not None:  # Local: append what was written since the last flush.
      self._f.write(bytes(self._buffer))
      self._buffer.clear()
      self._f.flush()
      return
    now = time.monotonic()
    if force or now - self._last_flush >= REMOTE_FLUSH_SECONDS:
      with self._fs.open(self._path, "wb") as f:
        f.write(bytes(self._buffer))
      self._last_flush = now

  def close(self) -> None:
    self.flush(force=True)
    if self._f is not None:
      self._f.close()
      self._f = None

  def __enter__(self) -> LogFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 on the wire: negatives as 10-byte two's complement.
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """One serialised `Event` proto: a file-version header or a summary of scalar values."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) +
                                   struct.pack("<f", float(value)))
                      for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


class EventWriter:
  """Writes scalar summaries to a new `events.out.tfevents.*` file in `logdir` (any fsspec URL; one file per
  run/resume)."""

  def __init__(self, logdir: str):
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_SERIAL)}"
            ".alignet")
    self.path = artifacts.join(logdir, name)
    header = shards.frame_records([encode_event(time.time(), 0, file_version="brain.Event:2")])
    self._file = LogFile(self.path, header)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Write the scalars of one step (None values are skipped) and flush, so a killed run keeps them."""
    values = {k: float(v) for k, v in values.items() if v is not None}
    if values:
      self._file.write(shards.frame_records([encode_event(time.time(), step, scalars=values)]))
      self._file.flush()

  def flush(self, force: bool = False) -> None:
    self._file.flush(force)

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
