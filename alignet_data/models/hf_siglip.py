"""SigLIP image towers in Hugging Face's safetensors layout <-> our big_vision layout, through a name map.

Hugging Face ports of SigLIP (`google/siglip-so400m-patch14-384`, ...) store PyTorch-layout tensors under
`vision_model.` (a `SiglipModel`) or no prefix (a `SiglipVisionModel` saved by transformers >= 5). The map is
exact: `tests/test_hf_parity.py` checks that our Flax ViT on mapped random weights equals `transformers`'
`SiglipVisionModel` (pooler output = our MAP-head `pre_logits`) to 1e-4. Layout differences it undoes:
- Linear weights are (out, in); Flax kernels are (in, out), and attention kernels split heads:
  query/key/value (width, heads, head_dim), out (heads, head_dim, width).
- The patch conv is (out, in, kh, kw) in PyTorch, (kh, kw, in, out) in Flax.
- The MAP head's attention is `torch.nn.MultiheadAttention`: q, k, v stacked in one `in_proj_weight`.
- Position embeddings are an `nn.Embedding` (N, width); big_vision's are (1, N, width).

The safetensors format (8-byte header length, JSON header, raw little-endian buffers) is read and written here
with numpy and fsspec, so loading needs neither torch nor the `safetensors` package, and works on gs:// URLs.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import fsspec
import numpy as np

from alignet_data.models import checkpoints
from alignet_data.models.checkpoints import CheckpointMismatchError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MARKER = "embeddings.patch_embedding.weight"
# Not parameters: an arange of positions that older transformers saved with the weights.
_BUFFERS = ("embeddings.position_ids",)


def _np_dtype(name: str) -> np.dtype:
  if name == "BF16":
    import ml_dtypes  # A JAX dependency; bfloat16 checkpoints are common for SigLIP.
    return np.dtype(ml_dtypes.bfloat16)
  if name not in _DTYPES:
    raise ValueError(f"Unsupported safetensors dtype {name!r}; supported: {sorted(_DTYPES) + ['BF16']}")
  return np.dtype(_DTYPES[name])


def read_safetensors(path_or_url: str) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file as numpy arrays (bfloat16 stays bfloat16)."""
  with fsspec.open(path_or_url, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise ValueError(f"{path_or_url} is not a safetensors file (only {len(data)} bytes)")
  (n,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + n])
  except ValueError as e:
    raise ValueError(f"{path_or_url} is not a safetensors file (bad JSON header: {e})") from e
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    begin, end = meta["data_offsets"]
    dtype = _np_dtype(meta["dtype"]).newbyteorder("<")
    out[name] = np.frombuffer(data[8 + n + begin:8 + n + end], dtype=dtype).reshape(meta["shape"]).copy()
  return out


def write_safetensors(path_or_url: str, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes a `.safetensors` file (readable by `safetensors` and `transformers`); same tensors, same bytes."""
  names = {np.dtype(v).name: k for k, v in _DTYPES.items()}
  header, buffers, offset = {}, [], 0
  for key in sorted(tensors):
    a = np.ascontiguousarray(tensors[key])
    dtype = "BF16" if a.dtype.name == "bfloat16" else names.get(a.dtype.name)
    if dtype is None:
      raise ValueError(f"Cannot write {key!r}: unsupported dtype {a.dtype}")
    raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
    header[key] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
    buffers.append(raw)
    offset += len(raw)
  header["__metadata__"] = {"format": "pt"}
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # The reference writer aligns the data buffer to 8 bytes.
  with fsspec.open(path_or_url, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(buffers))


def find_prefix(hf: Mapping[str, np.ndarray]) -> str:
  """The prefix of the vision tower's keys ("" or "vision_model." ...); error naming the keys if none."""
  hits = sorted(k[:-len(_MARKER)] for k in hf if k.endswith(_MARKER) and "text" not in k)
  if not hits:
    sample = ", ".join(sorted(hf)[:8])
    raise CheckpointMismatchError(f"No SigLIP vision tower: no key ends with {_MARKER!r}; first keys: {sample}")
  return min(hits, key=len)


def _linear(hf: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
  return hf[f"{name}.weight"].T, hf[f"{name}.bias"]


def _attention(q: tuple, k: tuple, v: tuple, out: tuple, num_heads: int, prefix: str) -> dict[str, np.ndarray]:
  flat = {}
  for name, (w, b) in (("query", q), ("key", k), ("value", v)):  # w: (in, out) after the transpose.
    width = w.shape[0]
    flat[f"{prefix}{name}/kernel"] = w.reshape(width, num_heads, -1)
    flat[f"{prefix}{name}/bias"] = b.reshape(num_heads, -1)
  w, b = out
  flat[f"{prefix}out/kernel"] = w.reshape(num_heads, -1, w.shape[-1])
  flat[f"{prefix}out/bias"] = b
  return flat


def _norm(hf: Mapping[str, np.ndarray], name: str, prefix: str) -> dict[str, np.ndarray]:
  return {f"{prefix}scale": hf[f"{name}.weight"], f"{prefix}bias": hf[f"{name}.bias"]}


def _mlp(hf: Mapping[str, np.ndarray], name: str, prefix: str) -> dict[str, np.ndarray]:
  flat = {}
  for i, fc in enumerate(("fc1", "fc2")):
    w, b = _linear(hf, f"{name}.{fc}")
    flat[f"{prefix}Dense_{i}/kernel"], flat[f"{prefix}Dense_{i}/bias"] = w, b
  return flat


class _Used(dict):
  """A dict that remembers which keys were read: vision tensors the name map never reads are reported."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.used: set[str] = set()

  def __getitem__(self, key: str) -> np.ndarray:
    self.used.add(key)
    return super().__getitem__(key)


def to_big_vision(hf: Mapping[str, np.ndarray], num_heads: int, prefix: str | None = None,
                  source: str = "SigLIP safetensors checkpoint") -> dict[str, np.ndarray]:
  """HF SigLIP vision tensors -> flat big_vision names ("Transformer/encoderblock_0/..."), float32.

  Keys outside the vision tower (text tower, logit_scale) are left out with an INFO line naming them; a missing
  tensor, or a vision-tower tensor the map does not use (it would be dropped), raises CheckpointMismatchError
  naming it.
  """
  p = find_prefix(hf) if prefix is None else prefix
  sub = _Used({k: np.asarray(v, np.float32) for k, v in checkpoints.select_tower(hf, p, source, sep=".").items()})
  sub.used.update(k for k in _BUFFERS if k in sub)
  try:
    flat = {"embedding/kernel": sub["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
            "embedding/bias": sub["embeddings.patch_embedding.bias"],
            "pos_embedding": sub["embeddings.position_embedding.weight"][None]}
    depth = len({k.split(".")[2] for k in sub if k.startswith("encoder.layers.")})
    for i in range(depth):
      hp, bp = f"encoder.layers.{i}.", f"Transformer/encoderblock_{i}/"
      flat.update(_norm(sub, hp + "layer_norm1", bp + "LayerNorm_0/"))
      flat.update(_norm(sub, hp + "layer_norm2", bp + "LayerNorm_1/"))
      flat.update(_attention(*(_linear(sub, hp + f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")),
                             num_heads, bp + "MultiHeadDotProductAttention_0/"))
      flat.update(_mlp(sub, hp + "mlp", bp + "MlpBlock_0/"))
    flat.update(_norm(sub, "post_layernorm", "Transformer/encoder_norm/"))
    if "head.probe" in sub:  # SigLIP's MAP head (vision_use_head).
      flat["MAPHead_0/probe"] = sub["head.probe"]
      qkv_w, qkv_b = sub["head.attention.in_proj_weight"], sub["head.attention.in_proj_bias"]
      qkv = [(w.T, b) for w, b in zip(np.split(qkv_w, 3), np.split(qkv_b, 3), strict=True)]
      flat.update(_attention(*qkv, _linear(sub, "head.attention.out_proj"), num_heads,
                             "MAPHead_0/MultiHeadDotProductAttention_0/"))
      flat.update(_norm(sub, "head.layernorm", "MAPHead_0/LayerNorm_0/"))
      flat.update(_mlp(sub, "head.mlp", "MAPHead_0/MlpBlock_0/"))
  except KeyError as e:
    raise CheckpointMismatchError(f"SigLIP safetensors checkpoint lacks {p}{e.args[0]} (keys under {p!r}: "
                                  f"{len(sub)}); is it a SigLIP vision tower?") from e
  unused = sorted(set(sub) - sub.used)
  if unused:
    raise CheckpointMismatchError(
        f"{source}: {len(unused)} vision-tower tensor(s) have no place in our ViT and would be dropped: "
        + ", ".join(p + k for k in unused[:20]) + (" ..." if len(unused) > 20 else ""))
  return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def from_big_vision(flat: Mapping[str, np.ndarray], prefix: str = "vision_model.") -> dict[str, np.ndarray]:
  """Flat big_vision names -> HF SigLIP vision tensors (the inverse of `to_big_vision`), for export and tests."""
  f = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  hf: dict[str, np.ndarray] = {}

  def linear(name: str, w: np.ndarray, b: np.ndarray) -> None:
    hf[f"{name}.weight"], hf[f"{name}.bias"] = np.ascontiguousarray(w.T), b

  def norm(name: str, bp: str) -> None:
    hf[f"{name}.weight"], hf[f"{name}.bias"] = f[bp + "scale"], f[bp + "bias"]

  def attn_in(bp: str, n: str) -> tuple[np.ndarray, np.ndarray]:  # -> (in, out) kernel, (out,) bias.
    k = f[f"{bp}{n}/kernel"]
    return k.reshape(k.shape[0], -1), f[f"{bp}{n}/bias"].reshape(-1)

  def attn_out(bp: str) -> tuple[np.ndarray, np.ndarray]:
    k = f[f"{bp}out/kernel"]
    return k.reshape(-1, k.shape[-1]), f[f"{bp}out/bias"]

  def mlp(name: str, bp: str) -> None:
    linear(f"{name}.fc1", f[bp + "Dense_0/kernel"], f[bp + "Dense_0/bias"])
    linear(f"{name}.fc2", f[bp + "Dense_1/kernel"], f[bp + "Dense_1/bias"])

  hf["embeddings.patch_embedding.weight"] = np.ascontiguousarray(f["embedding/kernel"].transpose(3, 2, 0, 1))
  hf["embeddings.patch_embedding.bias"] = f["embedding/bias"]
  hf["embeddings.position_embedding.weight"] = f["pos_embedding"][0]
  depth = len({k.split("/")[1] for k in f if k.startswith("Transformer/encoderblock_")})
  for i in range(depth):
    hp, bp = f"encoder.layers.{i}.", f"Transformer/encoderblock_{i}/"
    norm(hp + "layer_norm1", bp + "LayerNorm_0/")
    norm(hp + "layer_norm2", bp + "LayerNorm_1/")
    ap = bp + "MultiHeadDotProductAttention_0/"
    for n, hn in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      linear(hp + f"self_attn.{hn}", *attn_in(ap, n))
    linear(hp + "self_attn.out_proj", *attn_out(ap))
    mlp(hp + "mlp", bp + "MlpBlock_0/")
  norm("post_layernorm", "Transformer/encoder_norm/")
  if "MAPHead_0/probe" in f:
    ap = "MAPHead_0/MultiHeadDotProductAttention_0/"
    qkv = [attn_in(ap, n) for n in ("query", "key", "value")]
    hf["head.probe"] = f["MAPHead_0/probe"]
    hf["head.attention.in_proj_weight"] = np.ascontiguousarray(np.concatenate([w.T for w, _ in qkv]))
    hf["head.attention.in_proj_bias"] = np.concatenate([b for _, b in qkv])
    linear("head.attention.out_proj", *attn_out(ap))
    norm("head.layernorm", "MAPHead_0/LayerNorm_0/")
    mlp("head.mlp", "MAPHead_0/MlpBlock_0/")
  return {prefix + k: np.ascontiguousarray(v) for k, v in hf.items()}
