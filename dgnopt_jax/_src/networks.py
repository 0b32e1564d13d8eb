"""The networks of the main job, the experiments and the benchmarks, by name, as games."""

from __future__ import annotations

from typing import Sequence

from dgnopt_jax._src import games as games_lib

NETWORKS = ("mlp", "cnn", "resnet", "inception")
IMAGE_NETWORKS = ("cnn", "resnet", "inception")  # these take NHWC inputs


def network_from_name(name: str, input_shape: Sequence[int], num_classes: int,
                      alignment: str = "merge", residual_blocks: int = 3) -> games_lib.Game:
  """The network ``name`` as a game with the softmax cross-entropy loss.

  * ``mlp``: DDPNOpt Appendix D.1 (4 tanh layers of width 32, linear head);
  * ``cnn``: 4 conv + 2 dense (DGNOpt Appendix E's fictitious-player net, narrower);
  * ``resnet``: a conv stem and ``residual_blocks`` (3) residual blocks with
    identity shortcuts, 12 feature maps, no normalisation (DGNOpt Appendix E,
    MNIST); ``alignment`` is where each block's shortcut plays
    (:data:`dgnopt_jax.games.RESIDUAL_ALIGNMENTS`);
  * ``inception``: conv, an inception block (a 4-player stage), conv, two dense
    layers (DGNOpt Appendix E).

  Args:
    name: one of :data:`NETWORKS`; those of :data:`IMAGE_NETWORKS` take
      ``input_shape = (height, width, channels)``.
    input_shape: one sample's shape.
    num_classes: the head's outputs.
    alignment, residual_blocks: of ``resnet``.
  """
  G = games_lib
  if name == "mlp":
    layers = [G.Dense(32, "tanh") for _ in range(4)] + [G.Dense(num_classes)]
  elif name == "cnn":
    layers = [G.Conv2D(8, (3, 3), activation="relu") for _ in range(4)]
    layers += [G.AvgPool((2, 2)), G.Dense(32, "relu"), G.Dense(num_classes)]
  elif name == "resnet":
    layers = [G.Conv2D(12, (3, 3), activation="relu")]
    layers += [G.ResidualBlock(12, alignment=alignment) for _ in range(residual_blocks)]
    layers += [G.AvgPool((2, 2)), G.Dense(num_classes)]
  elif name == "inception":
    layers = [G.Conv2D(8, (3, 3), activation="relu"), G.InceptionBlock(4),
              G.Conv2D(8, (3, 3), activation="relu"), G.AvgPool((2, 2)),
              G.Dense(32, "relu"), G.Dense(num_classes)]
  else:
    raise ValueError(f"unknown network {name!r}; choose one of {NETWORKS}")
  return G.sequential(layers, input_shape)
