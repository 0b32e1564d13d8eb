"""What a curvature is: the protocol the solver calls, with its defaults.

A curvature ``C ~ Q_theta_theta`` of one player (DGNOpt eq. 13, Prop. 2;
DDPNOpt Table 2) owns its statistics, its inverse and its quadratic forms.
The solver preconditions every update with ``M = (C + damping I) / eta``::

    open gain      k = M^-1 d          (d = Q_theta, or Adam's first moment)
    feedback gain  K = M^-1 Q_theta_x

and never asks a curvature what kind it is: it calls the methods below.
Subclass :class:`Curvature` and implement the abstract ones; the defaults
serve every curvature whose statistics are one player's own (a diagonal or
a per-player matrix). A curvature with cross terms between the players of a
stage (the cooperative Kronecker factors) overrides :meth:`Curvature.joint`,
:meth:`Curvature.init_joint` and :meth:`Curvature.joint_form`.
"""

from __future__ import annotations

from typing import Any

import jax

from dgnopt_jax._src import quadratic_forms

Params = Any


class Curvature:
  """Base class and protocol of the players' curvatures.

  Class attributes:
    name: the curvature's name (for errors and records).
    needs_value_hessian: :meth:`update` takes the Gauss-Newton product
      ``v -> F_theta^T V~_xx F_theta v + l_theta_theta v`` (the dense
      curvature); otherwise it is passed None.
    needs_statistics: :meth:`update` takes the players' per-sample layer
      inputs and value derivatives (:func:`kronecker.gather_statistics`).
    default_damping: the damping used when none is given.
    needs_damping: the solve is unbounded without damping (``damping <= 0``
      is refused).
  """

  name: str = "curvature"
  needs_value_hessian: bool = False
  needs_statistics: bool = False
  default_damping: float = 0.0
  needs_damping: bool = False

  # -- statistics ----------------------------------------------------------------

  def check(self, player: Any, theta: Params) -> None:
    """Raises a clear error for a player this curvature cannot handle."""
    del player, theta

  def init(self, theta: Params, player: Any = None) -> Any:
    """Fresh statistics of one player (a pytree)."""
    raise NotImplementedError

  def update(self, state: Any, q_theta: Params, ggn_matvec=None, statistics=None):
    """``(new state, step)``: the statistics with this step's ``Q_theta`` taken in.

    ``step`` is what this step's solves need (e.g. a debiased moment, or
    eigenbases and eigenvalues).
    """
    raise NotImplementedError

  def direction(self, step: Any, q_theta: Params) -> Params:
    """The vector ``d`` the open gain preconditions (``Q_theta``, or a moment of it)."""
    del step
    return q_theta

  def solve(self, step: Any, v: Params, damping) -> Params:
    """``(C + damping I)^-1 v``."""
    raise NotImplementedError

  def inverse_diagonal(self, step: Any, damping, like: Params) -> Params | None:
    """``diag((C + damping I)^-1)`` shaped like ``like`` where C is diagonal, else None."""
    del step, damping, like
    return None

  # -- quadratic forms (the value-Hessian factor update and its safeguard) ---------

  def player_form(self, player: Any, f: Any, n: int, factor_next: Any, step: Any,
                  damping) -> quadratic_forms.Form:
    """The per-sample forms ``S = q^T (C + damping I)^-1 q`` of player ``n`` of stage ``f``."""
    return quadratic_forms.player(self, player, f, n, factor_next, step, damping)

  # -- cooperative stages (group rationality with cross terms) ---------------------

  def joint(self, stage: Any, thetas: tuple) -> bool:
    """Whether a stage's players are solved as one system with cross terms."""
    del stage, thetas
    return False

  def init_joint(self, stage: Any, thetas: tuple) -> Any:
    """Fresh statistics of a jointly solved stage."""
    raise NotImplementedError(f"curvature {self.name!r} has no joint statistics")

  def joint_form(self, f: Any, factor_next: Any, step: Any, damping) -> quadratic_forms.Form:
    """The forms of all players of stage ``f`` under one joint curvature."""
    q = f.per_sample_vjp_thetas(factor_next)
    solved = jax.vmap(jax.vmap(lambda v: self.solve(step, v, damping)))(q)
    return quadratic_forms.Form(quadratic_forms.contract(q, solved))
