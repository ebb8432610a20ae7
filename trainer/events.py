"""A minimal TensorBoard event-file writer: scalars only, no TensorFlow or tensorboard package needed.

An event file is a TFRecord file (length, masked crc32c, data, masked crc32c) of serialised `tensorflow.Event`
protos. The few fields we write are encoded by hand (protobuf wire format), so logging costs no 8 s TensorFlow
import per run. TensorBoard (and `tf.compat.v1.train.summary_iterator`) read the files as usual:
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
"""
from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping

from alignet_data import shards


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
  """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir` (one file per run/resume)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.alignet"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "wb")
    self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    self._f.write(shards.frame_records([event]))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Write the scalars of one step (NaN/None values are skipped) and flush, so a killed run keeps them."""
    values = {k: float(v) for k, v in values.items() if v is not None}
    if values:
      self._write(encode_event(time.time(), step, scalars=values))
      self._f.flush()

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
