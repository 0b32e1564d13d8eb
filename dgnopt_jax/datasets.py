"""Embedded datasets: scikit-learn's WINE, IRIS and DIGITS (DDPNOpt Table 3).

Features are standardised with the training split's statistics; the
train/test split is stratified and fixed by a seed. DIGITS is also available
as 8x8x1 images (NHWC) for convolutional games.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

EMBEDDED = ("wine", "iris", "digits")


class Dataset(NamedTuple):
  """A classification dataset split into train and test arrays."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def load(name: str, *, seed: int = 0, test_fraction: float = 0.25, images: bool = False,
         dtype=np.float32) -> Dataset:
  """Loads an embedded dataset.

  Args:
    name: ``"wine"``, ``"iris"`` or ``"digits"``.
    seed: seed of the stratified train/test split.
    test_fraction: share of the samples held out for testing.
    images: DIGITS only: return inputs of shape (N, 8, 8, 1) instead of (N, 64).
    dtype: dtype of the inputs.

  Returns:
    A :class:`Dataset` with standardised inputs and int32 labels.
  """
  try:
    from sklearn import datasets as skdatasets
    from sklearn.model_selection import train_test_split
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the embedded datasets need scikit-learn: pip install scikit-learn") from e
  loaders = {"wine": skdatasets.load_wine, "iris": skdatasets.load_iris,
             "digits": skdatasets.load_digits}
  if name not in loaders:
    raise ValueError(f"unknown embedded dataset {name!r}; embedded datasets are {EMBEDDED}")
  if images and name != "digits":
    raise ValueError(f"images=True is only available for digits, not {name!r}")
  data = loaders[name]()
  x, y = data.data.astype(np.float64), data.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  mean = x_train.mean(axis=0)
  std = x_train.std(axis=0)
  std[std == 0] = 1.0
  x_train = ((x_train - mean) / std).astype(dtype)
  x_test = ((x_test - mean) / std).astype(dtype)
  if images:
    x_train = x_train.reshape(-1, 8, 8, 1)
    x_test = x_test.reshape(-1, 8, 8, 1)
  return Dataset(name, x_train, y_train, x_test, y_test, int(y.max()) + 1)


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
