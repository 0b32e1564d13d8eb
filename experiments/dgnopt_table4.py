"""DGNOpt Table 4 at DIGITS scale: fictitious players, steps to a target accuracy for N = 1, 2, 4, 6.

    python experiments/dgnopt_table4.py [--players 1,2,4,6] [--seeds 4] [--steps 800] [--lr 0.05]
        [--target 95] [--curvature identity] [--dataset digits]
        [--out runs/experiments/dgnopt_table4]

DGNOpt §5.2 splits every layer's params into N fictitious players whose sum
is the layer (eq. 16) and trains them cooperatively (GR); Table 4 reports the
training steps to reach 80 % on SVHN and 60 % on CIFAR-10 with SGD's
preconditioner for N = 1, 2, 4, 6 (SVHN: 5.14k, 2.31k, 1.25k, 0.8k). Here the
main job's CNN (4 conv + 2 dense, ReLU; ``dgnopt_jax.games.network_from_name("cnn",
...)``, narrower than the paper's 32 feature maps), batch 32, ``gr`` with the given
curvature on ``games.fictitious(game, N)``, evaluated on the collapsed
network every ``--eval-every`` steps; ``optax.sgd`` at the same learning rate
for reference. N = 1 is the network's own game (DDP-SGD).

With the equal split the cooperative step has a closed form
(``dgnopt_jax/_src/fictitious.py``, tested): with the identity curvature the
network moves as with N = 1 at learning rate ``N * lr``. Writes ``<out>.md`` and
``<out>.json``.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import dgnopt_jax as dgnopt

from common import (accuracy_on, add_data_arguments, batch_streams, evaluate, load_data,
                    make_curve_run, make_update, mean_std, steps_to, transform_update,
                    write_outputs)

G = dgnopt.games
PAPER = {"SVHN (80 %)": {1: 5140, 2: 2310, 4: 1250, 6: 800},
         "CIFAR-10 (60 %)": {1: 3620, 2: 2970, 4: 2980, 6: 5830}}


def steps_cell(values: list[float]) -> str:
  """``mean ± std`` of the seeds that reached the target, and how many did not."""
  reached = [v for v in values if np.isfinite(v)]
  if not reached:
    return f"not reached ({len(values)} of {len(values)})"
  tail = f" ({len(values) - len(reached)} not reached)" if len(reached) < len(values) else ""
  return f"{np.mean(reached):.0f} ± {np.std(reached):.0f}{tail}"


def markdown(results: dict, players: list[int], args, seconds: float) -> str:
  lines = [f"CNN (4 conv + 2 dense) on {args.dataset}, gr-{args.curvature} on N fictitious "
           f"players per layer, lr {args.lr:g}, batch {args.batch_size}, {args.steps} steps, "
           f"{args.seeds} seeds, evaluated every {args.eval_every} steps; mean ± std. "
           f"{platform.machine()} CPU, "
           f"jax {jax.__version__}, {seconds / 60:.1f} min.", "",
           f"| run | steps to {args.target:g} % test acc | final test acc (%) | final train loss "
           "| paper: steps, SVHN 80 % / CIFAR-10 60 % |", "|---|---|---|---|---|"]
  for key in ["SGD"] + players:
    r = results[key]
    paper = ("—" if key == "SGD" else
             " / ".join(f"{v[key] / 1000:.2f}k" for v in PAPER.values()))
    name = "optax.sgd" if key == "SGD" else f"N = {key}"
    lines.append(f"| {name} | {steps_cell(r['steps'])} | {mean_std(r['accuracy'], 2)} | "
                 f"{mean_std(r['loss'], 4)} | {paper} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--players", default="1,2,4,6")
  p.add_argument("--curvature", default="identity")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--vxx-reg", type=float, default=0.0)
  p.add_argument("--target", type=float, default=95.0, help="test accuracy (%) to reach")
  p.add_argument("--dataset", default="digits")
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--out", default="runs/experiments/dgnopt_table4")
  add_data_arguments(p)
  args = p.parse_args(argv)
  if args.steps % args.eval_every:
    raise SystemExit("--steps must be a multiple of --eval-every")
  players = [int(n) for n in args.players.split(",") if n]

  start = time.time()
  data = load_data(args.dataset, args, images=True)
  game = G.network_from_name("cnn", data.x_train.shape[1:], data.num_classes)
  streams = batch_streams(data, args.batch_size, args.steps, args.seeds)
  accuracy = accuracy_on(game, data)
  results = {}
  for key in ["SGD"] + players:
    if key == "SGD":
      run = make_curve_run(*make_update(game, "sgd", args.lr), accuracy, args.eval_every)
      split = collapse = lambda params: params
    else:
      tx = dgnopt.gr(G.fictitious(game, key), args.lr, args.curvature, vxx_reg=args.vxx_reg)
      collapse = lambda params: G.collapse_params(params, game)
      run = make_curve_run(*transform_update(tx),
                           lambda params, collapse=collapse: accuracy(collapse(params)),
                           args.eval_every)
      split = lambda params, n=key: G.split_params(params, game, n)
    r = results[key] = {"steps": [], "accuracy": [], "loss": [], "curve": []}
    for seed, stream in enumerate(streams):
      params, _, curve, _ = run(split(game.init(jax.random.PRNGKey(seed))), stream)
      curve = 100 * np.asarray(curve)
      acc, loss = evaluate(game, collapse(params), data)
      r["steps"].append(steps_to(curve, args.target, args.eval_every))
      r["accuracy"].append(acc)
      r["loss"].append(loss)
      r["curve"].append(curve.tolist())
    print(f"{'optax.sgd' if key == 'SGD' else f'N = {key}':>9}: steps to {args.target:g} % "
          f"{steps_cell(r['steps'])}  test acc {mean_std(r['accuracy'], 2)} %  "
          f"({time.time() - start:.0f} s)", flush=True)

  write_outputs(args.out, markdown(results, players, args, time.time() - start), args,
                [{"run": k, **r} for k, r in results.items()])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
