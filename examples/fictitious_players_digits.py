"""Fictitious players on DIGITS (DGNOpt §5.2, eq. 16, Table 4): steps to a target accuracy per N.

    python examples/fictitious_players_digits.py [--steps 600] [--players 1,2,4]
        [--curvature identity] [--lr 0.05] [--target 0.95]

Every layer of a tanh MLP (hidden width 32, batch size 32) is split into N
fictitious players whose sum is the layer's params; they are trained
cooperatively with DGNOpt-GR and collapsed back by the sum for evaluation. N = 1
is the original network and optimizer. The script prints, per N, the first
step at which the collapsed network reaches the target test accuracy (checked
every ``--eval-every`` steps), the final test accuracy and training loss, as a
markdown table.

With the equal split every player of a layer sees the same statistics, so the
cooperative step has a closed form (``dgnopt_jax/_src/fictitious.py``): with
the identity curvature the network moves as the original one at learning rate
``N * lr``; with ``kfac``/``ekfac`` as the original one with damping
``damping / N``. DGNOpt Table 4's faster convergence for larger N is this
effect.
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

G = dgnopt.games


def train(game, num_players, data, args):
  """Trains ``num_players`` fictitious players per layer; returns the progress record."""
  fg = G.fictitious(game, num_players)
  params = G.split_params(game.init(jax.random.PRNGKey(args.seed)), game, num_players)
  tx = dgnopt.gr(fg, args.lr, args.curvature, vxx_reg=args.vxx_reg)
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, x, y):
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state

  @jax.jit
  def test_accuracy(params):
    logits = game.apply(G.collapse_params(params, game), data.x_test)
    return jnp.mean(jnp.argmax(logits, -1) == data.y_test)

  stream = datasets.batches(data.x_train, data.y_train, args.batch_size, seed=args.seed)
  reached, accuracy = None, float("nan")
  for step in range(1, args.steps + 1):
    params, state = train_step(params, state, *next(stream))
    if step % args.eval_every == 0 or step == args.steps:
      accuracy = float(test_accuracy(params))
      if reached is None and accuracy >= args.target:
        reached = step
  collapsed = G.collapse_params(params, game)
  loss = float(game.loss_value(collapsed, data.x_train, data.y_train))
  return reached, accuracy, loss


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--players", default="1,2,4", help="comma-separated values of N")
  p.add_argument("--curvature", default="identity", help="identity, rmsprop, adam, kfac, ekfac")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--vxx-reg", type=float, default=1e-3)
  p.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  players = [int(n) for n in args.players.split(",")]

  data = datasets.load("digits")
  game = G.sequential([G.Dense(32, "tanh"), G.Dense(32, "tanh"), G.Dense(10)], (64,))
  print(f"DIGITS MLP 64-32-32-10, GR with {args.curvature!r} curvature, lr {args.lr}, "
        f"batch {args.batch_size}, {args.steps} steps, seed {args.seed}\n")
  print(f"| N | steps to {100 * args.target:.0f}% test acc | final test acc (%) "
        "| final train loss |")
  print("|---|---|---|---|")
  for n in players:
    reached, accuracy, loss = train(game, n, data, args)
    steps = str(reached) if reached is not None else f"> {args.steps}"
    print(f"| {n} | {steps} | {100 * accuracy:.2f} | {loss:.4f} |", flush=True)


if __name__ == "__main__":
  main()
