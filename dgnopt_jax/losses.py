"""Terminal losses and the factors of their Hessians (the start of the value recursion)."""

from dgnopt_jax._src.losses import TerminalLoss
from dgnopt_jax._src.losses import get_loss
from dgnopt_jax._src.losses import sigmoid_binary_cross_entropy
from dgnopt_jax._src.losses import softmax_cross_entropy
from dgnopt_jax._src.losses import squared_error
from dgnopt_jax._src.losses import terminal_value

__all__ = ["TerminalLoss", "get_loss", "sigmoid_binary_cross_entropy",
           "softmax_cross_entropy", "squared_error", "terminal_value"]
