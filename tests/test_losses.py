"""Terminal losses: exact Hessian factors against jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgnopt_jax as dgnopt

L = dgnopt.losses


@pytest.mark.parametrize("loss,target", [
    (L.softmax_cross_entropy, jnp.asarray(2)),
    (L.softmax_cross_entropy, jnp.asarray([0.2, 0.1, 0.3, 0.4])),
    (L.squared_error, jnp.asarray([0.5, -1.0, 2.0, 0.0])),
    (L.sigmoid_binary_cross_entropy, jnp.asarray([1.0, 0.0, 1.0, 0.0])),
    (L.get_loss(lambda o, t: jnp.sum(jnp.cosh(o - t))), jnp.asarray([0.1, 0.2, 0.3, 0.4])),
])
def test_hessian_factor_is_exact(loss, target):
  out = jnp.asarray([0.3, -1.2, 0.7, 2.0])
  factor = loss.hessian_factor(out, target)
  hess = jax.hessian(loss.per_sample)(out, target)
  np.testing.assert_allclose(factor.T @ factor, hess, atol=1e-12)


def test_terminal_value_scaling():
  out = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  y = jnp.arange(5) % 3
  mean, v_x, z = L.terminal_value(L.softmax_cross_entropy, out, y, "outer")
  np.testing.assert_allclose(v_x, jax.grad(lambda o: jnp.mean(
      jax.vmap(L.softmax_cross_entropy.per_sample)(o, y)))(out), atol=1e-14)
  np.testing.assert_allclose(z[:, 0] * np.sqrt(5), v_x * 5, atol=1e-14)
  _, _, z_exact = L.terminal_value(L.softmax_cross_entropy, out, y, "exact")
  assert z_exact.shape == (5, 3, 3)
  assert float(mean) > 0


def test_unknown_loss_name():
  with pytest.raises(ValueError, match="unknown loss 'hinge'"):
    L.get_loss("hinge")
