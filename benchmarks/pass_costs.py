"""The layer work a DGNOpt step cannot skip, timed beside optax.sgd: floors for the step ratios.

    python benchmarks/pass_costs.py                       # residual CNN, batch 128
    python benchmarks/pass_costs.py --models mlp,resnet --rounds 21
    python benchmarks/pass_costs.py --device gpu

A step of Alg. 1 (FNE or GR, the default rank-one value-Hessian factor ``Z``)
makes, for every dense or conv player:

* the forward pass, and the rollout's forward pass with the new params
  (Alg. 1 lines 10-11);
* two pullbacks to the layer's input, one for ``V_x`` and one for the
  factor's column ``Z`` (DGNOpt eq. 9-10: ``Q_x = F_x^T V_x'``,
  ``Q_xx = F_x^T Z' Z'^T F_x``);
* one pullback to the kernel, ``Q_theta = F_theta^T V_x'``;
* for a conv player, the per-sample gradients ``q_i = F_theta^(i)T Z'^(i) =
  sum_p a_ip g_ip^T``: ``S^(i) = q_i^T M^-1 q_i`` updates ``Z`` and ``q``
  gives the rollout's feedback. (A dense player's ``S`` comes from
  ``|a_i|^2 |g_i|^2``, whose cost is negligible here.)

optax.sgd's step makes the forward pass and backprop's two pullbacks. A
Kronecker curvature (KFAC) takes ``Q_theta`` from its statistics instead of
the kernel pullback and adds, every step, the layer inputs (a convolution's
image patches), ``Q_theta = sum a g^T`` and the per-sample gradients in the
factors' eigenbasis (``U_A^T q_i U_G``), every ``statistics_every`` steps the
factors ``E[a a^T]``, ``E[g g^T]`` (5 by default; here 1, the step timed is
``gr-kfac/1``), and every ``inverse_every`` steps (10, the default) the
factors' eigendecompositions.

Each pass is one jit-compiled program over every player of the network, at
the layer inputs of the network's forward pass (the cotangents are a fixed
function of the layer output), timed in interleaved rounds with the
optax.sgd, fne-sgd and gr-kfac/1 train steps of ``step_time.py``. The floors
are sums of passes::

    fne floor     = 2 forward + 2 input pullbacks + kernel pullback + per-sample q
    gr-kfac floor = 2 forward + 2 input pullbacks + Kronecker statistics + eigh / 10

Elementwise work (activations, residual sums, pooling, the loss, the update)
is in no floor; optax.sgd's step has it as well. The passes run as separate
programs, which on a CPU run less efficiently than the same ops within one
step (launches, less overlap): the row "sgd's passes" (forward + input
pullback + kernel pullback, what optax.sgd's step computes) against the sgd
step shows by how much. The column "/ sgd's passes" compares like with
like: a floor over sgd's passes is the least a solver's step can cost
relative to optax.sgd's if its passes run as efficiently as sgd's do.

Prints the table of steps, passes and floors; writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from dgnopt_jax import games
from dgnopt_jax._src import layer_taps

import step_time
import timing

INVERSE_EVERY = 10  # the Kronecker curvatures' default refresh period


def player_layers(game: games.Game, params, x) -> list:
  """``(layer, theta, layer input)`` of every dense/conv player, on the forward pass."""
  found = []
  state = jnp.asarray(x)
  for stage in game.stages:
    thetas = tuple(games.get_path(params, p.path) for p in stage.players)
    if stage.players:
      taps = layer_taps.tapped_layers(stage.fn, state, thetas, tuple(range(stage.num_players)))
      found += [(layer, thetas[n], layer_x) for n, (layer, layer_x) in sorted(taps.items())]
    state = stage.fn(state, thetas)
  return found


def _per_position(g: jax.Array) -> jax.Array:
  """(B, ..., O) -> (B, 1, P, O): one factor column, output positions flattened."""
  return g.reshape(g.shape[0], 1, -1, g.shape[-1])


def _factor_products(layer, x: jax.Array, g: jax.Array) -> tuple:
  """The augmented layer inputs (B, P, Ka) and ``(sum a a^T, sum g g^T, sum a g^T)``."""
  rows = layer_taps.kernel_rows(layer, x, bias_column=True)
  flat_a, flat_g = rows.reshape(-1, rows.shape[-1]), g.reshape(-1, g.shape[-1])
  return rows, (flat_a.T @ flat_a, flat_g.T @ flat_g, flat_a.T @ flat_g)


def make_passes(layers: list) -> dict:
  """``name -> (fn, args)``: one program per pass over all players."""
  kinds = [layer for layer, _, _ in layers]
  thetas = [theta for _, theta, _ in layers]
  inputs = [layer_x for _, _, layer_x in layers]
  cotangents = [jnp.cos(layer(theta, layer_x)) for layer, theta, layer_x in layers]

  def forward(thetas, inputs):
    return [layer(t, x) for layer, t, x in zip(kinds, thetas, inputs)]

  def input_pullback(thetas, inputs, cts):
    return [jax.vjp(lambda z, layer=layer, t=t: layer(t, z), x)[1](g)[0]
            for layer, t, x, g in zip(kinds, thetas, inputs, cts)]

  def kernel_pullback(thetas, inputs, cts):
    return [jax.vjp(lambda s, layer=layer, x=x: layer(s, x), t)[1](g)[0]
            for layer, t, x, g in zip(kinds, thetas, inputs, cts)]

  def per_sample_q(inputs, cts):
    return [layer_taps.per_sample_kernel_gradients(layer, x, _per_position(g))
            for layer, x, g in zip(kinds, inputs, cts) if layer.kind == "conv"]

  def factors(inputs, cts):
    return [_factor_products(layer, x, g)[1][:2] for layer, x, g in zip(kinds, inputs, cts)]

  def eigh(factor_values):
    return [(jnp.linalg.eigh(a), jnp.linalg.eigh(g)) for a, g in factor_values]

  factor_values = jax.jit(factors)(inputs, cotangents)
  bases = [(a.eigenvectors, g.eigenvectors) for a, g in jax.jit(eigh)(factor_values)]

  def kronecker_statistics(inputs, cts, bases):
    """Every step: inputs, factors, Q_theta = sum a g^T and q in the eigenbasis."""
    out = []
    for layer, x, g, (input_basis, output_basis) in zip(kinds, inputs, cts, bases):
      rows, stats = _factor_products(layer, x, g)  # rows: (B, P, Ka)
      g = _per_position(g)  # (B, 1, P, O)
      if rows.shape[1] == 1:  # dense: q_i = a_i g_i^T is rank one, rotated as factors
        rotated = (rows[:, 0] @ input_basis, g[:, :, 0] @ output_basis)
      else:
        plain = jnp.einsum("bpk,brpo->brko", rows, g)
        rotated = jnp.einsum("kj,brko->brjo", input_basis, plain) @ output_basis
      out.append((stats, rotated))
    return out

  return {
      "forward": (forward, (thetas, inputs)),
      "input pullback": (input_pullback, (thetas, inputs, cotangents)),
      "kernel pullback": (kernel_pullback, (thetas, inputs, cotangents)),
      "per-sample q (conv)": (per_sample_q, (inputs, cotangents)),
      "Kronecker statistics": (kronecker_statistics, (inputs, cotangents, bases)),
      "eigh of the factors": (eigh, (factor_values,)),
  }


# The train steps timed beside the passes: gr-kfac with the statistics of
# every step (``statistics_every=1``), the work its floor counts.
STEPS = ("sgd", "fne-sgd", "gr-kfac/1")


def floors(t: dict) -> dict:
  """The sums of passes (seconds) that each step must at least take."""
  two_way = 2 * t["forward"] + 2 * t["input pullback"]
  return {
      "sgd's passes": t["forward"] + t["input pullback"] + t["kernel pullback"],
      "fne floor": two_way + t["kernel pullback"] + t["per-sample q (conv)"],
      "gr-kfac floor": (two_way + t["Kronecker statistics"] +
                        t["eigh of the factors"] / INVERSE_EVERY),
  }


def run_model(model: str, batch: int, rounds: int, per_round: int, device) -> dict:
  game, params, x, y = step_time.problem(model, batch, 64)
  params, x, y = jax.device_put((params, x, y), device)
  layers = player_layers(game, params, x)
  cases = {}
  for name in STEPS:
    compiled, state, _, _ = step_time.compiled_step(name, game, params, x, y)
    cases[name] = (compiled, params, state, x, y)
  for name, (fn, args) in make_passes(layers).items():
    program = jax.jit(fn)
    run = lambda p, s, a, b, program=program, args=args: (p, s, program(*args))
    cases[name] = (run, params, None, x, y)
  times = timing.interleaved_step_times(cases, rounds, per_round)
  sums = floors(times)
  return {"model": model, "batch": batch, "players": len(layers), "times_s": times,
          "floors_s": sums}


def table(result: dict) -> str:
  t, sums = result["times_s"], result["floors_s"]
  sgd, passes = t["sgd"], sums["sgd's passes"]
  lines = [f"{result['model']}, batch {result['batch']}, {result['players']} dense/conv players",
           "", "| | ms | / optax.sgd step | / sgd's passes |", "|---|---|---|---|"]
  for name in STEPS:
    lines.append(f"| {name} step | {t[name] * 1e3:.2f} | {t[name] / sgd:.2f} | |")
  for name, value in t.items():
    if name not in STEPS:
      lines.append(f"| pass: {name} | {value * 1e3:.2f} | {value / sgd:.2f} | "
                   f"{value / passes:.2f} |")
  for name, value in sums.items():
    lines.append(f"| **{name}** | {value * 1e3:.2f} | {value / sgd:.2f} | "
                 f"{value / passes:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="resnet", help="comma-separated: mlp, cnn, resnet, inception")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--steps", type=int, default=10, help="steps (or passes) per round")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/...)")
  args = p.parse_args(argv)
  device, machine = timing.device_and_machine(args.device)
  results = []
  for model in args.models.split(","):
    print(f"{model}: {args.rounds} rounds of {args.steps} steps", flush=True)
    with jax.default_device(device):
      results.append(run_model(model, args.batch, args.rounds, args.steps, device))
    print(f"\n{table(results[-1])}\n", flush=True)
  print(machine)
  timing.write_record(args.out, f"pass_costs_{args.device}.json",
                      {"machine": machine, "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
