"""DDPNOpt Tables 9-10 on DIGITS: SGD against DDP-SGD at large learning rates.

    python experiments/ddpnopt_lr_ablation.py [--lrs 0.4,0.6,0.7,0.8]
        [--vxx-regs 5e-5,1e-4,5e-4,1e-3] [--seeds 5] [--steps 2000]
        [--dataset digits] [--vxx-rank outer] [--unchecked]
        [--out runs/experiments/ddpnopt_lr_ablation]

DDPNOpt (ICLR 2021) Appendix, Tables 9 (training loss) and 10 (test accuracy):
on DIGITS, the feedforward tanh network of its Appendix D.1 (4 hidden layers of
width 32, batch 8) trained by SGD and by DDPNOpt with the identity curvature
``M_t = I`` (here ``dgnopt_jax.fne(game, lr, "identity", vxx_reg=eps)``, the
Tikhonov term ``eps`` on ``V_xx``) over learning rates 0.4-0.8; the paper
reports that the feedback policy helps more the larger the step (its Fig. 4a).

Every run of a seed starts from the same params and sees the same batches for
every optimizer (a loop of jit-compiled steps). ``--dataset`` takes a
tensorflow-datasets name (with ``--data-dir``) to run the same grid on MNIST
and the others, flattened, when the data is present. The SGD
baseline is ``optax.sgd`` on ``jax.grad`` of the loss (independent of the
solvers). Reported per cell: mean ± std over seeds of the test accuracy and of
the final training loss (the mean cross-entropy over the whole training set),
the paper's value (mean of 10 seeds) beside ours. Writes a markdown table
(``<out>.md``) and the per-seed figures (``<out>.json``).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets

from common import (add_data_arguments, batch_streams, load_data, make_run, mean_std, seeds_of,
                    write_outputs)

G = dgnopt.games

# DDPNOpt Appendix Table 10 (test accuracy, %) and Table 9 (training loss):
# learning rate -> (SGD, DDPNOpt at V_xx regularisation 5e-5, 1e-4, 5e-4, 1e-3).
PAPER_VXX = (5e-5, 1e-4, 5e-4, 1e-3)
PAPER_ACCURACY = {0.4: (91.46, 91.98, 92.71, 92.90, 93.12),
                  0.6: (81.73, 83.64, 84.09, 88.39, 89.39),
                  0.7: (70.48, 73.42, 75.44, 80.62, 82.87),
                  0.8: (55.76, 57.70, 62.82, 70.23, 65.01)}
PAPER_LOSS = {0.4: (0.1974, 0.1662, 0.1444, 0.1322, 0.1067),
              0.6: (0.5809, 0.4989, 0.4867, 0.3263, 0.2764),
              0.7: (1.0493, 0.9034, 0.8240, 0.6592, 0.5381),
              0.8: (1.7801, 1.6898, 1.4597, 1.1784, 1.3166)}


def make_game(data: datasets.Dataset) -> G.Game:
  """DDPNOpt Appendix D.1's DIGITS network: 4 tanh layers of width 32, a linear head."""
  return G.sequential([G.Dense(32, "tanh") for _ in range(4)] + [G.Dense(data.num_classes)],
                      data.x_train.shape[1:], loss="softmax_cross_entropy")


def paper(table: dict, lr: float, column: int, digits: int) -> str:
  return f"{table[lr][column]:.{digits}f}" if lr in table else "–"


def markdown(results: dict, lrs: list[float], vxx_regs: list[float], args, seconds: float) -> str:
  variant = ((f", {args.vxx_rank}" if args.vxx_rank else "") +
             (", unchecked" if args.unchecked else ""))
  names = ["SGD"] + [f"DDP-SGD{variant} ε={v:g}" for v in vxx_regs]
  columns = [None] + list(vxx_regs)

  def paper_column(v):
    if v is None:
      return 0
    return PAPER_VXX.index(v) + 1 if v in PAPER_VXX else None

  lines = [f"{args.dataset}, DDPNOpt Appendix D.1 network (4 × 32 tanh), batch {args.batch_size}, "
           f"{args.steps} steps, {args.seeds} seeds (mean ± std); paper: DDPNOpt Tables 9-10 "
           f"(10 seeds) in brackets. {platform.machine()} CPU, jax {jax.__version__}, "
           f"{seconds / 60:.1f} min.", ""]
  for title, key, table, digits in (("Test accuracy (%)", "accuracy", PAPER_ACCURACY, 2),
                                    ("Final training loss", "loss", PAPER_LOSS, 4)):
    lines += [f"**{title}**", "", "| η | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for lr in lrs:
      cells = []
      for v in columns:
        ours = mean_std(results[(lr, v)][key], digits)
        col = paper_column(v)
        cells.append(ours + (f" [{paper(table, lr, col, digits)}]" if col is not None and
                             lr in table else ""))
      lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["**DDP-SGD against SGD** (mean test accuracy, ours):", ""]
  for lr in lrs:
    sgd = np.mean(results[(lr, None)]["accuracy"])
    above = [v for v in vxx_regs if np.mean(results[(lr, v)]["accuracy"]) > sgd]
    lines.append(f"* η = {lr:g}: DDP-SGD above SGD ({sgd:.2f} %) at "
                 f"{len(above)} of {len(vxx_regs)} regularisations"
                 + (f" (ε = {', '.join(f'{v:g}' for v in above)})" if above else ""))
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lrs", default="0.4,0.6,0.7,0.8")
  p.add_argument("--vxx-regs", default="5e-5,1e-4,5e-4,1e-3")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--dataset", default="digits")
  p.add_argument("--vxx-rank", default=None, choices=("projected", "outer", "exact"),
                 help="DDP-SGD's value-Hessian factor (default: fne's)")
  p.add_argument("--unchecked", action="store_true",
                 help="DDP-SGD without the trust region (trust_region=False)")
  p.add_argument("--out", default="runs/experiments/ddpnopt_lr_ablation")
  add_data_arguments(p)
  args = p.parse_args(argv)
  lrs = [float(v) for v in args.lrs.split(",")]
  vxx_regs = [float(v) for v in args.vxx_regs.split(",")]

  data = load_data(args.dataset, args, images=False)
  game = make_game(data)
  streams = batch_streams(data, args.batch_size, args.steps, args.seeds)

  start = time.time()
  results = {}
  for lr in lrs:
    for v in [None] + vxx_regs:
      run = (make_run(game, "sgd", lr) if v is None else
             make_run(game, "fne-sgd", lr, v, args.vxx_rank, not args.unchecked))
      name = "SGD" if v is None else f"DDP-SGD eps={v:g}"
      results[(lr, v)] = r = seeds_of(game, run, streams, data)
      print(f"lr {lr:g}  {name:>18}: test acc {mean_std(r['accuracy'], 2)} %  "
            f"train loss {mean_std(r['loss'], 4)}  ({time.time() - start:.0f} s)", flush=True)

  write_outputs(args.out, markdown(results, lrs, vxx_regs, args, time.time() - start), args,
                [{"lr": lr, "vxx_reg": v, **r} for (lr, v), r in results.items()])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
