"""Image sources: every odd image kind decodes to the right RGB pixels; ImageNet folders get the standard class
ids; the THINGS folder gives one image per concept in THINGS' canonical order."""
import importlib.util
import io
import os
import pickle

import fsspec
import numpy as np
import pytest
from PIL import Image

from alignet_data.teacher import image_sources

_Y, _X = np.mgrid[:6, :5]
RGB = np.stack([_Y * 40 + 20, _X * 50 + 10, 230 - _Y * 20 - _X * 10], -1).astype(np.uint8)  # Smooth: lossy codecs
# stay close, and each channel differs, so a channel swap (CMYK, BGR) would show.


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def test_odd_image_kinds_decode_to_rgb_uint8():
  gray = RGB[..., 0]
  rgba = np.concatenate([RGB, np.full((6, 5, 1), 7, np.uint8)], axis=-1)
  cases = {  # name: (encoded bytes, exact expected pixels or None where the codec is lossy)
      "rgb.png": (_encode(Image.fromarray(RGB), "PNG"), RGB),
      "rgba.png": (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), RGB),  # Alpha dropped, colours kept.
      "gray.png": (_encode(Image.fromarray(gray, "L"), "PNG"), np.repeat(gray[..., None], 3, -1)),
      "gray_alpha.png": (_encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"), np.repeat(gray[..., None], 3, -1)),
      "gray16.png": (_encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), np.repeat(gray[..., None], 3, -1)),
      "palette.png": (_encode(Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"),
                      None),
      "lossless.webp": (_encode(Image.fromarray(RGB), "WEBP", lossless=True), RGB),
      "lossy.webp": (_encode(Image.fromarray(RGB), "WEBP", quality=90), None),
      "cmyk.jpg": (_encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95), None),
      "gray.jpg": (_encode(Image.fromarray(gray, "L"), "JPEG", quality=95), None),
  }
  for name, (data, want) in cases.items():
    got = image_sources.decode_image(data)
    assert got.dtype == np.uint8 and got.shape == (6, 5, 3), name
    if want is not None:
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:  # Lossy or palette: close to the source colours, in the right channel order.
      ref = np.repeat(gray[..., None], 3, -1) if "gray" in name else RGB
      assert np.abs(got.astype(int) - ref).mean() < 25, name
  assert image_sources.decode_image(cases["cmyk.jpg"][0]).mean() == pytest.approx(RGB.mean(), abs=10)


def test_bad_bytes_give_reasons():
  jpeg = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
  for data, reason in [(b"", "empty file"), (b"hello", "not a known image format"),
                       (jpeg[:len(jpeg) // 2], "truncated"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot decode")]:
    with pytest.raises(ValueError, match=reason):
      image_sources.decode_image(data)


def test_imagenet_synset_folders_get_the_standard_class_ids(shared_data):
  fs = fsspec.filesystem("memory")
  png = _encode(Image.fromarray(RGB), "PNG")
  fs.pipe({"/inet/n15075141/a.png": png, "/inet/n01440764/b.png": png, "/inet/n02119789/c.png": png})
  src = image_sources.parse("files:memory://inet/**/*.png")
  assert src.metadata()["label_scheme"] == "imagenet2012"
  assert dict(zip([src.file_name(p) for p in src.paths], src.labels.tolist(), strict=True)) == {
      "n01440764/b.png": 0, "n02119789/c.png": 278, "n15075141/a.png": 999}  # tench, kit fox, toilet tissue.
  (task,) = src.tasks("train", 10)
  block, _ = src.read(pickle.loads(pickle.dumps(task)))
  assert block.labels.tolist() == [0, 278, 999]
  # Cross-check every class against the real lists: ../shared/data's synset file is in the ILSVRC devkit order
  # (WordNet names: kit_fox.n.01 first); TFDS' imagenet_resized labels give the devkit order's synset ids; the
  # class names file is in standard class-id order. Each synset's class id must name the same object.
  import ast
  devkit_names = (shared_data / "imagenet" / "imagenet1000_synset.txt").read_text().split()
  class_names = ast.literal_eval((shared_data / "imagenet" / "imagenet1000_classes.txt").read_text())
  tfds_root = importlib.util.find_spec("tensorflow_datasets").submodule_search_locations[0]
  with open(os.path.join(tfds_root, "image_classification", "imagenet_resized_labels.txt")) as f:
    devkit_ids = f.read().split()
  index = {s: i for i, s in enumerate(image_sources.imagenet_synsets())}
  assert len(index) == len(devkit_ids) == len(devkit_names) == 1000
  for synset, wordnet_name in zip(devkit_ids, devkit_names, strict=True):
    lemma = wordnet_name.rsplit(".", 2)[0].replace("_", " ").lower()
    assert lemma in [n.strip().lower() for n in class_names[index[synset]].split(",")], (synset, wordnet_name)


def test_folders_that_are_not_all_synsets_are_numbered_by_name():
  scheme, names, labels = image_sources.folder_labels(["n01440764", "cats", "n01440764"])
  assert (scheme, names, labels.tolist()) == ("folders", ["cats", "n01440764"], [1, 0, 1])
  scheme, _, labels = image_sources.folder_labels(["n99999999", "n01440764"])  # Not an ILSVRC-2012 class.
  assert scheme == "folders" and labels.tolist() == [1, 0]


def test_things_folder_one_image_per_concept_in_canonical_order(shared_data):
  concepts = (shared_data / "things" / "unique_id.txt").read_text().split()
  files = (shared_data / "things" / "file_names_THINGS.txt").read_text().split()
  fs = fsspec.filesystem("memory")
  # The real THINGS layout and file names (images are not shipped: tiny stand-ins, one readable per concept).
  by_concept: dict[str, list[str]] = {}
  for name in files:
    by_concept.setdefault(name.rsplit("_", 1)[0], []).append(name)
  picked = [c for c in (concepts[0], concepts[1000], concepts[-1]) if c in by_concept]
  png = _encode(Image.fromarray(RGB), "PNG")
  fs.pipe({f"/things_test/object_images/{c}/{n}": png if c in picked else b"" for c in concepts
           for n in by_concept.get(c, [f"{c}_01b.jpg"])})
  src = image_sources.parse("things:memory://things_test/object_images")
  assert len(src) == len(concepts) == 1854 and src.label_names == concepts  # Sorted folders = canonical order.
  for c in picked:
    i = concepts.index(c)
    assert src.file_name(src.paths[i]) == f"{c}/{sorted(by_concept[c])[0]}"
    (task,) = [t for t in src.tasks("things", 100) if t.start <= i < t.stop]
    block, failures = src.read(task)
    row = block.ids.tolist().index(i)
    assert block.labels[row] == i and block.images[row].shape == (6, 5, 3)
  every = image_sources.parse("things:memory://things_test/object_images:all")
  assert len(every) == len(files) and every.spec.endswith(":all")
  assert every.labels[every.paths.index(f"/things_test/object_images/{concepts[-1]}/{files[-1]}")] == 1853
  with pytest.raises(ValueError, match="mode must be one of"):
    image_sources.ThingsSource("memory://things_test/object_images", "some")


def test_tfds_falls_back_to_tfrecord_range_reads_with_the_same_ids(monkeypatch):
  import types

  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=9):
    ds = tfds.data_source("imagenet2012", split="train")
    records = [ds[i] for i in range(9)]

  class TfrecordOnlyBuilder:
    """A TFRecord-prepared split: sequential reads through absolute ReadInstructions, no random access."""
    info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=9)})
    reads = []

    def as_dataset(self, split, shuffle_files):
      assert not shuffle_files
      (a,) = split.to_absolute(self.info.splits)
      self.reads.append((a.from_ or 0, 9 if a.to is None else a.to))  # None: to the end.
      import tensorflow as tf
      part = records[slice(*self.reads[-1])]
      return tf.data.Dataset.from_generator(lambda: iter(part), output_signature={
          "image": tf.TensorSpec((None, None, 3), tf.uint8), "label": tf.TensorSpec((), tf.int64),
          "file_name": tf.TensorSpec((), tf.string)})

  def no_random_access(*args, **kwargs):
    raise NotImplementedError("Random access data source for file format tfrecord is not supported")
  monkeypatch.setattr(tfds, "data_source", no_random_access)
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: TfrecordOnlyBuilder())
  src = image_sources.parse("tfds:imagenet2012:train[2:5]+train[7:9]")
  assert len(src) == 5
  blocks = [src.read(t)[0] for t in src.tasks("train", 2)]
  assert TfrecordOnlyBuilder.reads == [(2, 4), (4, 5), (7, 8), (8, 9)]  # Range reads, each piece of the split.
  got = [im for b in blocks for im in b.images]
  np.testing.assert_array_equal(np.concatenate([b.ids for b in blocks]), np.arange(5))
  for im, i in zip(got, [2, 3, 4, 7, 8], strict=True):
    np.testing.assert_array_equal(im, records[i]["image"])
  assert [n for b in blocks for n in b.file_names] == [records[i]["file_name"] for i in [2, 3, 4, 7, 8]]
