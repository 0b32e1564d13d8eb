"""Embedded datasets: standardised, stratified, seeded, offline."""

import numpy as np
import pytest

from dgnopt_jax import datasets


@pytest.mark.parametrize("name,classes,features", [("wine", 3, 13), ("iris", 3, 4),
                                                   ("digits", 10, 64)])
def test_embedded(name, classes, features):
  d = datasets.load(name, seed=1)
  assert d.num_classes == classes and d.x_train.shape[1] == features
  assert abs(float(d.x_train.mean())) < 1e-5
  np.testing.assert_allclose(d.x_train.std(axis=0)[d.x_train.std(axis=0) > 0], 1.0, atol=1e-4)
  assert set(np.unique(d.y_test)) == set(range(classes))
  again = datasets.load(name, seed=1)
  np.testing.assert_array_equal(d.x_test, again.x_test)
  assert not np.array_equal(d.x_test, datasets.load(name, seed=2).x_test)


def test_digits_images():
  d = datasets.load("digits", images=True)
  assert d.x_train.shape[1:] == (8, 8, 1)
  with pytest.raises(ValueError, match="only available for digits"):
    datasets.load("wine", images=True)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="embedded datasets are"):
    datasets.load("imagenette")


def test_batches_shapes_and_epochs():
  x = np.arange(10)[:, None].astype(np.float32)
  y = np.arange(10)
  seen = list(datasets.batches(x, y, 3, epochs=2))
  assert len(seen) == 6 and all(b[0].shape == (3, 1) for b in seen)
  np.testing.assert_array_equal(seen[0][0][:, 0], seen[0][1])
