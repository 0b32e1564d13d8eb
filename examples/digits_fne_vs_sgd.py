"""DDPNOpt's DIGITS network trained with DDP-SGD (fne) and SGD side by side.

    python examples/digits_fne_vs_sgd.py [--lr 0.1] [--vxx-reg 1e-3] [--seeds 3]

The network is DDPNOpt Appendix D.1's: fully connected, tanh, hidden width 32,
batch size 8 on sklearn's DIGITS. Both optimizers see the same batches; the
script prints the test accuracy of each, per seed and on average. At large
learning rates (DDPNOpt Tables 9-10: 0.4-0.8) the feedback policy is expected
to help most.
"""

import argparse

import jax
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

G = dgnopt.games


def train(tx, game, data, seed, steps, batch_size):
  params = game.init(jax.random.PRNGKey(seed))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, x, y):
    updates, state = tx.update(None, state, params, batch=(x, y))
    return optax.apply_updates(params, updates), state

  stream = datasets.batches(data.x_train, data.y_train, batch_size, seed=seed)
  for _ in range(steps):
    params, state = train_step(params, state, *next(stream))
  logits = game.apply(params, data.x_test)
  return float(np.mean(np.argmax(logits, -1) == data.y_test))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--vxx-reg", type=float, default=1e-3)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--seeds", type=int, default=3)
  args = p.parse_args()

  data = datasets.load("digits")
  game = G.sequential([G.Dense(32, "tanh") for _ in range(4)] + [G.Dense(10)], (64,))
  optimizers = {
      "SGD": dgnopt.olne(game, args.lr),  # exactly optax.sgd (DGNOpt Theorem 6)
      "DDP-SGD (fne)": dgnopt.fne(game, args.lr, vxx_reg=args.vxx_reg),
  }
  results = {name: [] for name in optimizers}
  for seed in range(args.seeds):
    for name, tx in optimizers.items():
      acc = train(tx, game, data, seed, args.steps, batch_size=8)
      results[name].append(acc)
      print(f"seed {seed}  {name:>14}: test accuracy {100 * acc:.2f}%", flush=True)
  print(f"\nlearning rate {args.lr}, V_xx regularisation {args.vxx_reg}, {args.seeds} seeds")
  for name, accs in results.items():
    print(f"  {name:>14}: {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} %")


if __name__ == "__main__":
  main()
