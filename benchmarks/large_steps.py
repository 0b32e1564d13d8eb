"""Large steps: does the feedback ever make training diverge where the same curvature without it does not?

    python benchmarks/large_steps.py --fast          # a few minutes on 2 cores
    python benchmarks/large_steps.py                 # the whole grid (about an hour on 2 cores)
    python benchmarks/large_steps.py --unchecked     # the same with trust_region=False beside
    python benchmarks/large_steps.py --ranks projected,outer,exact

Every cell is one (dataset, network, curvature, learning rate): 600 steps of
batch 16 from each seed's initial params, on the same batches, for the open-loop
baseline ``olne(game, lr, curvature)`` (DGNOpt Theorem 6: exactly
``optax.sgd`` / ``optax.rmsprop`` / ``optax.adam`` for the identity, RMSprop
and Adam curvatures; plain K-FAC / EKFAC for the Kronecker ones) and for the
feedback solvers ``fne`` / ``gr`` with the same curvature and their defaults.
A run *diverges* when its final full-train loss is above the initial one or
not finite, or when max|theta| has grown more than 100-fold. The table counts,
per cell, the runs where the feedback solver diverged and the baseline did
not (``fb-only``) and the reverse (``base-only``), beside the mean final
train loss and test accuracy of both.

Data: the embedded sets (WINE, IRIS, DIGITS; :mod:`dgnopt_jax.datasets`), the
breast-cancer set that ships with scikit-learn (30 features, 2 classes), and
three synthetic sets drawn with a fixed seed (``make_moons``,
``make_circles``, a 4-class ``make_classification``), standardised with the
training split's statistics. Networks: 4 x Dense(16, tanh) and
4 x Dense(32, relu), each with a linear head. All seeds and learning rates of
one (dataset, network, optimizer) are trained in one compiled program
(``vmap`` over them, ``lax.scan`` over the steps).
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

import timing

G = dgnopt.games

LEARNING_RATES = {"identity": (0.1, 0.5, 1.0, 1.5), "rmsprop": (1e-3, 1e-2, 3e-2),
                  "adam": (1e-3, 1e-2, 3e-2), "kfac": (0.05, 0.2, 0.5),
                  "ekfac": (0.05, 0.2, 0.5)}
NETWORKS = {"tanh16": (16, "tanh"), "relu32": (32, "relu")}  # "tanh16x2": every player split in 2
SYNTHETIC = ("moons", "circles", "classes", "cancer")
GROWTH = 100.0  # max|theta| growing more than this many times is a divergence


def load(name: str) -> datasets.Dataset:
  """An embedded dataset, or a synthetic one drawn with a fixed seed (75/25 split)."""
  if name in datasets.EMBEDDED:
    return datasets.load(name)
  from sklearn import datasets as sk
  from sklearn.model_selection import train_test_split
  if name == "moons":
    x, y = sk.make_moons(600, noise=0.25, random_state=0)
  elif name == "circles":
    x, y = sk.make_circles(600, noise=0.1, factor=0.5, random_state=0)
  elif name == "classes":
    x, y = sk.make_classification(800, n_features=20, n_informative=8, n_classes=4,
                                  n_clusters_per_class=2, random_state=0)
  elif name == "cancer":
    x, y = sk.load_breast_cancer(return_X_y=True)
  else:
    raise SystemExit(f"unknown dataset {name!r}: {datasets.EMBEDDED + SYNTHETIC}")
  x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                      stratify=y)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-8
  as_x = lambda a: ((a - mean) / std).astype(np.float32)
  return datasets.Dataset(name, as_x(x_train), y_train.astype(np.int32), as_x(x_test),
                          y_test.astype(np.int32), int(y.max()) + 1)


def make_game(data: datasets.Dataset, network: str) -> G.Game:
  """The network; a name ``<network>x<N>`` splits every player into N fictitious ones.

  Split players (DGNOpt eq. 16) give stages of N players, where gr's
  cooperative solve differs from fne's per-player one.
  """
  name, _, players = network.partition("x")
  if name not in NETWORKS or (players and not players.isdigit()):
    raise SystemExit(f"unknown network {network!r}: one of {sorted(NETWORKS)}, "
                     "optionally with x<N> for N fictitious players per layer")
  width, activation = NETWORKS[name]
  game = G.sequential([G.Dense(width, activation) for _ in range(4)] + [G.Dense(data.num_classes)],
                      data.x_train.shape[1:], loss="softmax_cross_entropy")
  return G.fictitious(game, int(players)) if players else game


def make_transformation(solver: str, game: G.Game, lr, curvature: str, rank: str,
                        checked: bool, vxx_reg: float):
  if solver == "olne":
    return dgnopt.olne(game, lr, curvature)
  make = dgnopt.fne if solver == "fne" else dgnopt.gr
  return make(game, lr, curvature, vxx_reg=vxx_reg, vxx_rank=rank, trust_region=checked)


def train_runs(data, game, solver, curvature, rank, checked, lrs, seeds, steps, batch, vxx_reg):
  """Final train loss, initial train loss, test accuracy, divergence: arrays (seeds, lrs)."""
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  draws = np.stack([np.random.RandomState(1000 + s).randint(0, len(x), (steps, batch))
                    for s in seeds])
  inits = jax.tree.map(lambda *a: jnp.stack(a), *[game.init(jax.random.PRNGKey(s)) for s in seeds])

  def train_loss(params):
    return game.loss_value(params, x, y)

  def largest(params):
    return optax.tree.max(jax.tree.map(jnp.abs, params))

  def one(params, lr, indices):
    tx = make_transformation(solver, game, lr, curvature, rank, checked, vxx_reg)

    def step(carry, i):
      p, s = carry
      updates, s = tx.update(None, s, p, batch=(x[i], y[i]))
      return (optax.apply_updates(p, updates), s), None

    final, _ = jax.lax.scan(step, (params, tx.init(params)), indices)[0]
    accuracy = jnp.mean(jnp.argmax(game.apply(final, x_test), -1) == y_test)
    return train_loss(params), train_loss(final), largest(params), largest(final), accuracy

  runs = jax.jit(jax.vmap(jax.vmap(one, (None, 0, None)), (0, None, 0)))
  first, last, big0, big1, accuracy = map(np.asarray, runs(inits, jnp.asarray(lrs, jnp.float32),
                                                           jnp.asarray(draws)))
  diverged = ~np.isfinite(last) | (last > first) | ~(big1 <= GROWTH * big0)
  return {"loss": last, "initial": first, "accuracy": accuracy, "diverged": diverged}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--datasets", default="wine,iris,digits,cancer,moons,circles,classes")
  p.add_argument("--networks", default="tanh16,relu32",
                 help="tanh16, relu32; <name>x<N>: every layer split into N fictitious players")
  p.add_argument("--curvatures", default="identity,rmsprop,adam,kfac,ekfac")
  p.add_argument("--solvers", default="fne,gr", help="feedback solvers beside olne")
  p.add_argument("--ranks", default="projected", help="vxx_rank values to run")
  p.add_argument("--unchecked", action="store_true",
                 help="also run the feedback solvers with trust_region=False")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--vxx-reg", type=float, default=1e-4)
  p.add_argument("--lrs", default=None, help="one list for every curvature (default: per curvature)")
  p.add_argument("--fast", action="store_true",
                 help="wine, cancer, moons; identity, adam, kfac; fne; 3 seeds")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  if args.fast:
    args.datasets, args.curvatures, args.solvers, args.seeds = ("wine,cancer,moons",
                                                                "identity,adam,kfac", "fne", 3)
  if args.seeds < 1 or args.steps < 1 or args.batch < 1:
    raise SystemExit("--seeds, --steps and --batch must be positive")
  # The Kronecker curvatures' eigendecompositions run on the host LAPACK:
  # one thread, as in the main job and the other benchmarks.
  dgnopt.limit_lapack_threads()
  seeds = list(range(args.seeds))
  variants = [(solver, rank, True) for solver, rank in
              itertools.product(args.solvers.split(","), args.ranks.split(","))]
  if args.unchecked:
    variants += [(solver, rank, False) for solver, rank, _ in variants]
  _, machine = timing.device_and_machine("cpu")
  print(f"{machine}; {args.seeds} seeds, {args.steps} steps of batch {args.batch}, "
        f"vxx_reg {args.vxx_reg:g}", flush=True)

  cells, totals, start = [], {}, time.perf_counter()
  header = ("| data | net | curvature | lr | variant | fb-only | base-only | diverged fb/base "
            "| train loss fb / base | test acc fb / base |")
  print("\n" + header + "\n|" + "---|" * 10, flush=True)
  for name in args.datasets.split(","):
    data = load(name)
    for network in args.networks.split(","):
      game = make_game(data, network)
      for curvature in args.curvatures.split(","):
        lrs = ([float(v) for v in args.lrs.split(",")] if args.lrs
               else list(LEARNING_RATES[curvature]))
        common = (lrs, seeds, args.steps, args.batch, args.vxx_reg)
        base = train_runs(data, game, "olne", curvature, "projected", False, *common)
        for solver, rank, checked in variants:
          fb = train_runs(data, game, solver, curvature, rank, checked, *common)
          variant = f"{solver} {rank}" + ("" if checked else " unchecked")
          for j, lr in enumerate(lrs):
            fb_only = int(np.sum(fb["diverged"][:, j] & ~base["diverged"][:, j]))
            base_only = int(np.sum(base["diverged"][:, j] & ~fb["diverged"][:, j]))
            total = totals.setdefault(variant, [0, 0, 0])
            total[0] += fb_only
            total[1] += base_only
            total[2] += len(seeds)
            cell = {"dataset": name, "network": network, "curvature": curvature, "lr": lr,
                    "variant": variant, "fb_only": fb_only, "base_only": base_only,
                    "diverged": [int(fb["diverged"][:, j].sum()),
                                 int(base["diverged"][:, j].sum())],
                    "loss": [float(np.mean(fb["loss"][:, j])),
                             float(np.mean(base["loss"][:, j]))],
                    "accuracy": [float(np.mean(fb["accuracy"][:, j])),
                                 float(np.mean(base["accuracy"][:, j]))]}
            cells.append(cell)
            print(f"| {name} | {network} | {curvature} | {lr:g} | {variant} | {fb_only} | "
                  f"{base_only} | {cell['diverged'][0]}/{cell['diverged'][1]} | "
                  f"{cell['loss'][0]:.3g} / {cell['loss'][1]:.3g} | "
                  f"{100 * cell['accuracy'][0]:.1f} / {100 * cell['accuracy'][1]:.1f} |",
                  flush=True)

  minutes = (time.perf_counter() - start) / 60
  print(f"\nTotals over every cell ({minutes:.1f} min): runs where the feedback solver "
        "diverged and the baseline did not / the reverse / runs")
  for variant, (fb_only, base_only, runs) in totals.items():
    print(f"  {variant:24s} {fb_only:4d} / {base_only:4d} / {runs}")
  timing.write_record(args.out, "large_steps.json",
                      {"machine": machine, "args": vars(args), "cells": cells,
                       "totals": totals, "minutes": minutes})


if __name__ == "__main__":
  main()
