"""tensorflow-datasets image datasets read from a data_dir, offline.

The datasets are real tfds datasets written to disk by tfds itself: a
``GeneratorBasedBuilder`` with the name, version and features (``image``,
``label`` ClassLabel) of the registered dataset prepares ``train`` and ``test``
splits as array_record files (with dataset_info.json and features.json), the
files ``tfds build <name> --file_format array_record`` writes. The generator
yields PNG bytes made with Pillow: tfds encodes a numpy image with TensorFlow,
but stores encoded bytes as they are, so the files are written and read without
TensorFlow. The first pixel of each image is its index in the generator, which
tells which generated example a loaded one is (tfds orders the examples by a
hash of their keys).
"""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
PIL_Image = pytest.importorskip("PIL.Image")

from dgnopt_jax import datasets  # noqa: E402

SPECS = {  # name: (image shape, classes, train examples, test examples)
    "mnist": ((28, 28, 1), 10, 40, 12),
    "cifar10": ((32, 32, 3), 10, 36, 10),
}


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL_Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="png")
  return buffer.getvalue()


def _examples(shape, classes, n, seed):
  """n uint8 images (channel c in [0, 255 - 60 c]) with image[i, 0, 0, 0] == i, and labels."""
  rng = np.random.default_rng(seed)
  top = np.array([256 - 60 * c for c in range(shape[-1])])
  images = (rng.random((n,) + shape) * top).astype(np.uint8)
  images[:, 0, 0, 0] = np.arange(n)
  return images, rng.integers(0, classes, n).astype(np.int32)


def _prepare(data_dir, dataset, shape, classes, n_train, n_test, version=None):
  """Writes ``dataset`` to data_dir with tfds (array_record); returns the generated splits."""
  generated = {"train": _examples(shape, classes, n_train, 0),
               "test": _examples(shape, classes, n_test, 1)}

  class OnDisk(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset
    VERSION = tfds.core.Version(version or str(tfds.builder_cls(dataset).VERSION))

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=shape),
              "label": tfds.features.ClassLabel(num_classes=classes)}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in generated}

    def _generate_examples(self, split):
      images, labels = generated[split]
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": _png(image), "label": int(label)}

  OnDisk(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return generated


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
  tfds.disable_progress_bar()
  generated = {name: _prepare(data_dir, name, *spec) for name, spec in SPECS.items()}
  return str(data_dir), generated


def _recover(x, images_train):
  """The uint8 images behind standardised x (stats of images_train), and their indices."""
  scaled = images_train.astype(np.float64) / 255.0
  mean, std = scaled.mean(axis=(0, 1, 2)), scaled.std(axis=(0, 1, 2))
  raw = np.rint((x.astype(np.float64) * std + mean) * 255.0)
  assert np.abs(raw - (x.astype(np.float64) * std + mean) * 255.0).max() < 0.05
  raw = raw.astype(np.uint8)
  return raw, raw[:, 0, 0, 0].astype(int)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_images_labels_and_standardisation(prepared, name):
  data_dir, generated = prepared
  shape, classes, n_train, n_test = SPECS[name]
  d = datasets.load(name, data_dir=data_dir, images=True)
  assert d.name == name and d.num_classes == classes
  assert d.x_train.shape == (n_train,) + shape and d.x_test.shape == (n_test,) + shape
  assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
  assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
  # Per channel: mean 0 and standard deviation 1 on the training split.
  np.testing.assert_allclose(d.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(d.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  train_images = generated[name]["train"][0]
  for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
    images, labels = generated[name][split]
    raw, index = _recover(x, train_images)
    assert sorted(index) == list(range(len(images)))  # every example once
    np.testing.assert_array_equal(raw, images[index])
    np.testing.assert_array_equal(y, labels[index])
  # The order is tfds's own (that of tfds.data_source).
  source = tfds.data_source(name, data_dir=data_dir, download=False)
  np.testing.assert_array_equal(d.y_train, [e["label"] for e in source["train"]])
  np.testing.assert_array_equal(d.y_test, [e["label"] for e in source["test"]])


def test_flat_inputs_dtype_and_subsets(prepared):
  data_dir, generated = prepared
  full = datasets.load("cifar10", data_dir=data_dir, images=True)
  flat = datasets.load("cifar10", data_dir=data_dir, dtype=np.float64)
  assert flat.x_train.shape == (36, 32 * 32 * 3) and flat.x_test.shape == (10, 32 * 32 * 3)
  assert flat.x_train.dtype == np.float64
  np.testing.assert_allclose(flat.x_train, full.x_train.reshape(36, -1), atol=1e-5)
  np.testing.assert_array_equal(flat.y_test, full.y_test)
  sub = datasets.load("cifar10", data_dir=data_dir, images=True, max_train=7, max_test=3)
  assert sub.x_train.shape == (7, 32, 32, 3) and sub.x_test.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(sub.y_train, full.y_train[:7])
  np.testing.assert_array_equal(sub.y_test, full.y_test[:3])
  # Standardised with the statistics of the examples kept: the first 7 of the full split.
  images = generated["cifar10"]["train"][0]
  _, index = _recover(full.x_train, images)
  first = images[index[:7]].astype(np.float64) / 255.0
  expected = (first - first.mean(axis=(0, 1, 2))) / first.std(axis=(0, 1, 2))
  np.testing.assert_allclose(sub.x_train, expected, atol=1e-5)
  big = datasets.load("mnist", data_dir=data_dir, max_train=1000, max_test=1000)
  assert big.x_train.shape == (40, 784) and big.x_test.shape == (12, 784)
  with pytest.raises(ValueError, match="max_train must be None or >= 1"):
    datasets.load("mnist", data_dir=data_dir, max_train=0)


def test_finds_the_version_present(tmp_path):
  tfds.disable_progress_bar()
  generated = _prepare(tmp_path, "fashion_mnist", (28, 28, 1), 10, 6, 3, version="1.2.3")
  d = datasets.load("fashion_mnist", data_dir=tmp_path, images=True)
  assert d.x_train.shape == (6, 28, 28, 1) and d.num_classes == 10
  assert sorted(d.y_train) == sorted(generated["train"][1])


def test_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    datasets.load("svhn_cropped", data_dir=tmp_path)
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  for part in ("'svhn_cropped'", str(tmp_path), "download=True",
               f"tfds build svhn_cropped --data_dir {tmp_path}", "wine, iris, digits"):
    assert part in message, (part, message)


def test_unknown_name_lists_every_dataset():
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
    datasets.load("imagenet")
  for name in datasets.EMBEDDED + datasets.TFDS:
    assert repr(name) in str(info.value)


def test_missing_tensorflow_datasets(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    datasets.load("mnist")


def test_import_does_not_import_tensorflow_datasets():
  code = ("import sys, dgnopt_jax, dgnopt_jax.datasets, dgnopt_jax.train; "
          "assert 'tensorflow_datasets' not in sys.modules")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_main_job_arguments():
  from dgnopt_jax import train
  args = train.parse_args(["--dataset", "cifar100", "--data-dir", "/data/tfds", "--max-train",
                           "500", "--max-test", "100", "--model", "cnn"])
  assert (args.dataset, args.data_dir, args.max_train, args.max_test) == (
      "cifar100", "/data/tfds", 500, 100)
  defaults = train.parse_args([])
  assert (defaults.data_dir, defaults.max_train, defaults.max_test) == (None, None, None)
