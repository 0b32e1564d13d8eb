"""Datasets: scikit-learn's embedded WINE, IRIS, DIGITS and tensorflow-datasets images.

The embedded datasets (DDPNOpt Table 3) ship with scikit-learn: features are
standardised with the training split's statistics; the train/test split is
stratified and fixed by a seed. DIGITS is also available as 8x8x1 images (NHWC)
for convolutional games.

The image classification datasets of tensorflow-datasets (``TFDS``: MNIST,
Fashion-MNIST, SVHN, CIFAR-10, CIFAR-100) are read from a tfds ``data_dir``
with their own train and test splits, through ``tfds.data_source`` (array_record
files, no TensorFlow needed). Nothing is downloaded unless asked for.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Iterator, NamedTuple

import numpy as np

EMBEDDED = ("wine", "iris", "digits")
TFDS = ("mnist", "fashion_mnist", "svhn_cropped", "cifar10", "cifar100")


class Dataset(NamedTuple):
  """A classification dataset split into train and test arrays."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


class DatasetNotFoundError(FileNotFoundError, ValueError):
  """A tensorflow-datasets dataset is not prepared in the data_dir searched."""


def load(name: str, *, seed: int = 0, test_fraction: float = 0.25, images: bool = False,
         dtype=np.float32, data_dir: str | os.PathLike | None = None,
         max_train: int | None = None, max_test: int | None = None,
         download: bool = False) -> Dataset:
  """Loads an embedded dataset or a tensorflow-datasets image dataset.

  Args:
    name: an embedded dataset, ``"wine"``, ``"iris"`` or ``"digits"`` (see
      ``EMBEDDED``), or a tensorflow-datasets name, ``"mnist"``,
      ``"fashion_mnist"``, ``"svhn_cropped"``, ``"cifar10"`` or ``"cifar100"``
      (see ``TFDS``).
    seed: seed of the stratified train/test split (embedded datasets; the tfds
      datasets have fixed splits).
    test_fraction: share of the samples held out for testing (embedded
      datasets).
    images: return images (N, H, W, C) instead of flat features (N, H*W*C).
      Among the embedded datasets only DIGITS has images (8x8x1).
    dtype: dtype of the inputs.
    data_dir: the tfds data directory to read from (default: tfds's own,
      ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Unused by the embedded
      datasets.
    max_train: keep only the first ``max_train`` training examples (all if
      None); the standardisation uses the examples kept.
    max_test: keep only the first ``max_test`` test examples (all if None).
    download: tfds datasets: let tfds download and prepare the dataset into
      ``data_dir`` when it is not there (needs network access; preparing the
      image files needs TensorFlow). By default nothing is downloaded.

  Returns:
    A :class:`Dataset` with standardised inputs and int32 labels. tfds images
    are scaled to [0, 1], then standardised per channel with the training
    split's mean and standard deviation.

  Raises:
    ValueError: an unknown name, or ``images=True`` for WINE or IRIS.
    ImportError: a tfds name without tensorflow-datasets installed.
    DatasetNotFoundError: (a FileNotFoundError and a ValueError) a tfds dataset
      that is not prepared in ``data_dir`` and ``download`` is False.
  """
  for arg, value in (("max_train", max_train), ("max_test", max_test)):
    if value is not None and value < 1:
      raise ValueError(f"{arg} must be None or >= 1, got {value}")
  if name in TFDS:
    return _load_tfds(name, images=images, dtype=dtype, data_dir=data_dir,
                      max_train=max_train, max_test=max_test, download=download)
  if name not in EMBEDDED:
    raise ValueError(f"unknown dataset {name!r}; embedded datasets are {EMBEDDED} (no download "
                     f"needed), tensorflow-datasets datasets are {TFDS}")
  try:
    from sklearn import datasets as skdatasets
    from sklearn.model_selection import train_test_split
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the embedded datasets need scikit-learn: pip install scikit-learn") from e
  loaders = {"wine": skdatasets.load_wine, "iris": skdatasets.load_iris,
             "digits": skdatasets.load_digits}
  if images and name != "digits":
    raise ValueError(f"images=True is only available for digits, not {name!r}")
  data = loaders[name]()
  x, y = data.data.astype(np.float64), data.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  x_train, y_train = x_train[:max_train], y_train[:max_train]
  x_test, y_test = x_test[:max_test], y_test[:max_test]
  mean = x_train.mean(axis=0)
  std = x_train.std(axis=0)
  std[std == 0] = 1.0
  x_train = ((x_train - mean) / std).astype(dtype)
  x_test = ((x_test - mean) / std).astype(dtype)
  if images:
    x_train = x_train.reshape(-1, 8, 8, 1)
    x_test = x_test.reshape(-1, 8, 8, 1)
  return Dataset(name, x_train, y_train, x_test, y_test, int(y.max()) + 1)


def _load_tfds(name: str, *, images: bool, dtype, data_dir, max_train: int | None,
               max_test: int | None, download: bool) -> Dataset:
  """Reads the train and test splits of a tfds image dataset (see :func:`load`)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f"dataset {name!r} needs tensorflow-datasets: pip install "
                      "tensorflow-datasets (or pip install 'dgnopt-jax[data]')") from e
  root = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else \
      os.path.expanduser(tfds.core.constants.DATA_DIR)
  versions = _prepared_versions(tfds, root, name)
  if not versions and download:
    # Prepared here as array_record files (tfds's prepared copies are TFRecord files).
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    tfds.builder(name, data_dir=root, file_format="array_record").download_and_prepare(
        download_config=config)
    versions = _prepared_versions(tfds, root, name)
  if not versions:
    raise DatasetNotFoundError(
        f"tensorflow-datasets dataset {name!r} was not found in data_dir {root!r} (no "
        f"{os.path.join(root, name, '<version>', 'dataset_info.json')}). Get it with "
        f"datasets.load({name!r}, data_dir=..., download=True) on a machine with network "
        f"access, or with `tfds build {name} --data_dir {root} --file_format array_record`, "
        f"then pass that data_dir. The embedded datasets are {', '.join(EMBEDDED)} and need "
        "no download.")
  default = str(tfds.builder_cls(name).VERSION)
  version = default if default in versions else versions[-1]
  limits = {"train": max_train, "test": max_test}
  try:
    source = tfds.data_source(f"{name}:{version}", data_dir=root, download=False)
  except NotImplementedError:  # files without random access (TFRecord): read through tf.data
    splits, info = _read_tf_data(tfds, name, version, root, limits)
  else:
    splits = {split: _read_source(source[split], limits[split]) for split in limits}
    info = source["train"].dataset_info
  num_classes = int(info.features["label"].num_classes)
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  mean, std = _channel_stats(x_train)
  x_train = _standardise(x_train, mean, std, dtype)
  x_test = _standardise(x_test, mean, std, dtype)
  if not images:
    x_train = x_train.reshape(len(x_train), -1)
    x_test = x_test.reshape(len(x_test), -1)
  return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def _prepared_versions(tfds, root: str, name: str) -> list[str]:
  """The versions of ``name`` prepared under ``root`` (with a dataset_info.json), oldest first."""
  from etils import epath  # a dependency of tensorflow-datasets (local and cloud paths)
  folder = epath.Path(root) / name
  if not folder.is_dir():
    return []
  found = [path.name for path in folder.iterdir() if tfds.core.Version.is_valid(path.name)
           and (path / "dataset_info.json").is_file()]
  return sorted(found, key=tfds.core.Version)


def _read_source(source, limit: int | None, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The first ``limit`` (uint8 images, int32 labels) of a tfds data source, in its order."""
  n = len(source) if limit is None else min(limit, len(source))
  x = y = None
  for start in range(0, n, chunk):
    keys = list(range(start, min(start + chunk, n)))
    examples = source.__getitems__(keys)
    if x is None:
      x = np.empty((n,) + np.shape(examples[0]["image"]), np.uint8)
      y = np.empty((n,), np.int32)
    x[start:start + len(keys)] = np.stack([e["image"] for e in examples])
    y[start:start + len(keys)] = [e["label"] for e in examples]
  if x is None:
    raise ValueError(f"the {source.split!r} split of {source.dataset_info.name!r} is empty")
  return x, y


def _read_tf_data(tfds, name: str, version: str, root: str,
                  limits: dict[str, int | None]) -> tuple[dict, object]:
  """Both splits through ``tfds.as_numpy`` (TFRecord files need TensorFlow to read)."""
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError(
        f"dataset {name!r} in {root!r} is stored as TFRecord files, which need TensorFlow to "
        f"read: pip install tensorflow, or rebuild it as array_record files (read without "
        f"TensorFlow): `tfds build {name} --data_dir <empty dir> --file_format array_record`"
    )
  builder = tfds.builder(f"{name}:{version}", data_dir=root)
  splits = {}
  for split, limit in limits.items():
    spec = split if limit is None else f"{split}[:{limit}]"
    arrays = tfds.as_numpy(builder.as_dataset(split=spec, batch_size=-1, shuffle_files=False))
    splits[split] = (np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32))
  return splits, builder.info


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of uint8 NHWC images scaled to [0, 1]."""
  total = np.zeros(x.shape[-1])
  squares = np.zeros(x.shape[-1])
  for start in range(0, len(x), chunk):
    part = x[start:start + chunk].reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    total += part.sum(axis=0)
    squares += np.square(part).sum(axis=0)
  count = x.size // x.shape[-1]
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
  std[std == 0] = 1.0
  return mean, std


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray, dtype) -> np.ndarray:
  """(x / 255 - mean) / std in ``dtype``, one chunk of images at a time."""
  out = np.empty(x.shape, dtype)
  scale = (1.0 / (255.0 * std)).astype(dtype)
  shift = (mean / std).astype(dtype)
  for start in range(0, len(x), 4096):
    out[start:start + 4096] = x[start:start + 4096].astype(dtype) * scale - shift
  return out


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0,
            epochs: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled mini-batches of a fixed size, epoch after epoch (forever if epochs is None).

  The last incomplete batch of each epoch is dropped so every batch has the
  same shape (one compilation of the train step).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if batch_size > len(x):
    raise ValueError(f"batch_size {batch_size} exceeds the {len(x)} samples")
  rng = np.random.default_rng(seed)
  epoch = 0
  while epochs is None or epoch < epochs:
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield x[idx], y[idx]
    epoch += 1
