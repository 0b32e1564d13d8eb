"""The fast path never forms a batch x batch array: cost linear in the batch size."""

import jax
import jax.extend as jex
import pytest

import dgnopt_jax as dgnopt
import helpers as h

G = dgnopt.games
BATCH = 13  # no other dimension of these networks is 13


def _sub_jaxprs(value):
  if isinstance(value, jex.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in _sub_jaxprs(param):
        yield from _shapes(sub)


@pytest.mark.parametrize("curvature", ["identity", "rmsprop", "adam"])
@pytest.mark.parametrize("rank", ["outer", "exact"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_no_batch_by_batch_intermediate(curvature, rank, net):
  if net == "mlp":
    game, shape = h.tanh_mlp(widths=(6, 6, 7)), (4,)
  else:
    game, shape = h.relu_cnn(), (4, 4, 1)
  params = h.perturbed_params(game)
  batch = h.classification_batch(shape, BATCH)
  tx = dgnopt.fne(game, 0.1, curvature, vxx_reg=1e-3, vxx_rank=rank)
  jaxpr = jax.make_jaxpr(lambda p, s: tx.update(None, s, p, batch=batch))(params, tx.init(params))
  shapes = list(_shapes(jaxpr.jaxpr))
  assert any(BATCH in s for s in shapes)  # the inspection sees batched arrays
  offenders = [s for s in shapes if sum(d == BATCH for d in s) >= 2]
  assert not offenders, f"batch x batch intermediates: {offenders[:5]}"


def test_the_inspection_catches_a_batch_by_batch_array():
  import jax.numpy as jnp
  x = jnp.ones((BATCH, 4))
  jaxpr = jax.make_jaxpr(lambda x: jax.lax.map(lambda r: r * jnp.sum(x @ x.T), x))(x)
  assert [s for s in _shapes(jaxpr.jaxpr) if sum(d == BATCH for d in s) >= 2]
