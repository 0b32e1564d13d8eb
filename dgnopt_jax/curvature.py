"""Curvatures C ~ Q_theta_theta for the players (DGNOpt eq. 13; DDPNOpt Table 2)."""

from dgnopt_jax._src.curvature import Adam
from dgnopt_jax._src.curvature_base import Curvature
from dgnopt_jax._src.curvature import AdamState
from dgnopt_jax._src.curvature import DenseExact
from dgnopt_jax._src.curvature import Identity
from dgnopt_jax._src.curvature import RMSProp
from dgnopt_jax._src.curvature import RMSPropState
from dgnopt_jax._src.curvature import adam
from dgnopt_jax._src.curvature import dense
from dgnopt_jax._src.curvature import get_curvature
from dgnopt_jax._src.curvature import identity
from dgnopt_jax._src.curvature import rmsprop
from dgnopt_jax._src.kronecker import DiagonalState
from dgnopt_jax._src.kronecker import Kronecker
from dgnopt_jax._src.kronecker import KroneckerState
from dgnopt_jax._src.kronecker import ekfac
from dgnopt_jax._src.kronecker import kfac

__all__ = ["Adam", "AdamState", "Curvature", "DenseExact", "DiagonalState", "Identity", "Kronecker",
           "KroneckerState", "RMSProp", "RMSPropState", "adam", "dense", "ekfac",
           "get_curvature", "identity", "kfac", "rmsprop"]
