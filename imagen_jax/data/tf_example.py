"""tf.train.Example bytes features, encoded and decoded without importing TensorFlow.

Importing TensorFlow for its `example_pb2` costs seconds of CPU in every process that reads
or writes record shards (each `imagen-data convert` process, each training host). The
messages involved are small (tensorflow/core/example/{example,feature}.proto):

  Example  { Features features = 1; }
  Features { map<string, Feature> feature = 1; }   // map entry: key = 1, value = 2
  Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                          Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }

so this writes and reads the protobuf wire format directly (varint tags, length-delimited
fields; https://protobuf.dev/programming-guides/encoding/). Fields it does not need are
skipped, as protobuf parsers do; a key repeated in the map keeps its last value, as in
protobuf. The tests check both directions against TensorFlow's own `example_pb2`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class DecodeError(ValueError):
  """The bytes are not a well-formed protobuf message."""


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= len(data) or shift > 63:
      raise DecodeError("truncated or overlong varint")
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos += 1
    if not byte & 0x80:
      return value, pos
    shift += 7


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited field."""
  return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _fields(data: bytes) -> Iterator[tuple[int, bytes | None]]:
  """(field number, payload) of each field; payload None for non-length-delimited ones."""
  pos = 0
  while pos < len(data):
    tag, pos = _read_varint(data, pos)
    number, wire_type = tag >> 3, tag & 7
    if wire_type == _VARINT:
      _, pos = _read_varint(data, pos)
      yield number, None
    elif wire_type in (_FIXED64, _FIXED32):
      pos += 8 if wire_type == _FIXED64 else 4
      yield number, None
    elif wire_type == _LEN:
      length, pos = _read_varint(data, pos)
      if pos + length > len(data):
        raise DecodeError("a field runs past the end of the message")
      yield number, data[pos:pos + length]
      pos += length
    else:
      raise DecodeError(f"unsupported wire type {wire_type}")
  if pos != len(data):
    raise DecodeError("the last field runs past the end of the message")


def encode(features: Mapping[str, bytes]) -> bytes:
  """A serialized Example whose features are one-value BytesLists."""
  entries = b"".join(
      _field(1, _field(1, key.encode("utf-8")) +
             _field(2, _field(1, _field(1, value))))  # Feature.bytes_list.value
      for key, value in features.items())
  return _field(1, entries)


def decode(record: bytes) -> dict[str, list[bytes]]:
  """{key: values} of every bytes_list feature of a serialized Example (others skipped)."""
  out: dict[str, list[bytes]] = {}
  for number, features in _fields(record):
    if number != 1 or features is None:
      continue
    for entry_number, entry in _fields(features):
      if entry_number != 1 or entry is None:
        continue
      key, values = "", None
      for part_number, part in _fields(entry):
        if part_number == 1 and part is not None:
          key = part.decode("utf-8")
        elif part_number == 2 and part is not None:
          values = [value for kind, bytes_list in _fields(part)
                    if kind == 1 and bytes_list is not None
                    for n, value in _fields(bytes_list) if n == 1 and value is not None]
      if values is not None:
        out[key] = values
  return out
