"""A Flax residual CNN (or inception network) on DIGITS, trained by DGNOpt through games.from_flax.

    python examples/flax_resnet_digits.py [--model resnet|inception] [--steps 500]
        [--lr 0.001] [--curvature adam] [--solver fne] [--batch-size 32]
        [--eval-every 100] [--batch-norm]

The network is an ordinary Flax module (``dgnopt_jax.models``: a 3x3 stem,
two ResNet basic blocks, the second strided with a projection shortcut,
global average pooling, a dense classifier; with ``--batch-norm`` a
BatchNorm after every convolution) on 8x8x1 DIGITS images; ``--model
inception`` trains ``models.inception_net`` instead (a 3x3 stem, one
four-branch inception block, which is one four-player stage, pooling and a
dense classifier).
``games.from_flax`` turns it into a game on the params ``model.init`` makes,
so both optimizers train the same variables and evaluate them with
``model.apply(variables, x, train=False)``:

* the optax baseline, written the way Flax users write a train step
  (``jax.value_and_grad`` of ``model.apply(..., mutable=["batch_stats"])``);
* the DGNOpt solver (``--solver fne|gr|olne``) with the same curvature
  (``identity`` = SGD, ``adam``), whose update solves the game and whose running
  BatchNorm averages are updated with ``games.update_batch_stats``.

With ``--batch-norm``, DGNOpt's gradient ``Q_theta`` goes through the batch
statistics (it is ``jax.grad`` of the train-mode loss, so ``olne`` is the
optax baseline up to rounding) while its second-order terms hold the
statistics fixed (docs/GAMES.md). Defaults, 500 steps:
optax adam 96.9 %, olne-adam 96.7 %, fne-adam 96.2 % test accuracy.

Prints progress and a markdown table of test accuracy and training loss.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgnopt_jax as dgnopt
from dgnopt_jax import datasets
from dgnopt_jax import models

G = dgnopt.games


def make_model(name: str, batch_norm: bool) -> nn.Module:
  if name == "inception":
    return models.inception_net(10, stem=8, features=4, blocks=1)
  stem = [nn.Conv(8, (3, 3), use_bias=not batch_norm)]
  stem += [nn.BatchNorm(momentum=0.9)] if batch_norm else []
  return models.Chain(stem + [
      nn.relu,
      models.basic_block(8, batch_norm=batch_norm),
      models.basic_block(16, strides=2, in_features=8, batch_norm=batch_norm),
      models.global_average_pool, nn.Dense(10)])


def cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def optax_step(model, tx):
  """The usual Flax train step: gradients of the train-mode loss, batch_stats from the same pass."""

  @jax.jit
  def train_step(variables, opt_state, x, y):
    def loss_fn(params):
      logits, new = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
      return cross_entropy(logits, y), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {**variables, **new, "params": params}, opt_state, loss

  return train_step, lambda variables: tx.init(variables["params"])


def dgnopt_step(game, tx):
  """The DGNOpt train step: the game's update, the running averages as Flax updates them."""

  @jax.jit
  def train_step(variables, opt_state, x, y):
    loss = game.loss_value(variables, x, y)
    updates, opt_state = tx.update(None, opt_state, variables, batch=(x, y))
    variables = G.update_batch_stats(game, variables, x)
    return optax.apply_updates(variables, updates), opt_state, loss

  return train_step, tx.init


def train(name, model, step_and_init, variables, data, args):
  train_step, init = step_and_init
  opt_state = init(variables)
  evaluate = jax.jit(lambda v: jnp.mean(jnp.argmax(model.apply(v, data.x_test, train=False), -1)
                                        == data.y_test))
  stream = datasets.batches(data.x_train, data.y_train, args.batch_size, seed=args.seed)
  start, losses = time.time(), []
  for step in range(1, args.steps + 1):
    variables, opt_state, loss = train_step(variables, opt_state, *next(stream))
    losses.append(float(loss))
    if step % args.eval_every == 0 or step == args.steps:
      print(f"{name:>16}  step {step:4d}  train loss {np.mean(losses[-args.eval_every:]):.4f}  "
            f"test acc {100 * float(evaluate(variables)):.2f}%", flush=True)
  return {"loss": float(np.mean(losses[-args.eval_every:])),
          "acc": float(evaluate(variables)), "time": time.time() - start}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--curvature", choices=["identity", "adam"], default="adam")
  p.add_argument("--solver", choices=["fne", "gr", "olne"], default="fne")
  p.add_argument("--vxx-reg", type=float, default=0.0,
                 help="Tikhonov term eps of the value Hessian")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", choices=["resnet", "inception"], default="resnet")
  p.add_argument("--batch-norm", action="store_true",
                 help="BatchNorm after every convolution (see the note above)")
  args = p.parse_args()

  data = datasets.load("digits", images=True)
  model = make_model(args.model, args.batch_norm)
  x0 = jnp.asarray(data.x_train[:args.batch_size])
  variables = model.init(jax.random.PRNGKey(args.seed), x0)
  game = G.from_flax(model, x0, "softmax_cross_entropy")
  baseline = optax.adam(args.lr) if args.curvature == "adam" else optax.sgd(args.lr)
  solver = {"fne": dgnopt.fne, "gr": dgnopt.gr, "olne": dgnopt.olne}[args.solver]
  runs = {
      f"optax {args.curvature}": optax_step(model, baseline),
      f"{args.solver}-{args.curvature}": dgnopt_step(
          game, solver(game, args.lr, args.curvature, vxx_reg=args.vxx_reg)),
  }
  print(f"{len(game.stages)} stages, {len(game.players)} players, "
        f"{sum(a.size for a in jax.tree.leaves(variables['params']))} params")
  results = {name: train(name, model, run, variables, data, args) for name, run in runs.items()}
  network = "inception network" if args.model == "inception" else "residual CNN"
  print(f"\nDIGITS 8x8x1, Flax {network}{' with BatchNorm' * args.batch_norm}, "
        f"{args.steps} steps, batch "
        f"{args.batch_size}, lr {args.lr}\n")
  print("| optimizer | test acc (%) | train loss | time (s, incl. compile) |")
  print("|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {100 * r['acc']:.2f} | {r['loss']:.4f} | {r['time']:.1f} |")


if __name__ == "__main__":
  main()
