"""Building blocks shared by the three SAM components."""

from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x * Phi(x), as torch.nn.GELU (Flax defaults to the tanh form).

  Written with erf, as torch does: `jax.nn.gelu(approximate=False)` uses erfc,
  which is as accurate here and slower on a CPU (BENCHMARKS.md, the mask decoder).
  """
  return x * (1 + jax.lax.erf(x * _SQRT_HALF.astype(x.dtype))) / 2


def layer_norm(eps: float, name: str, dtype=jnp.float32) -> nn.LayerNorm:
  # Flax's default "fast variance" E[x^2] - E[x]^2 loses digits that the
  # reference's two-pass variance keeps; parity needs the two-pass form.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def layer_norm_2d(name: str, dtype=jnp.float32) -> nn.LayerNorm:
  """SAM's LayerNorm2d: a channel LayerNorm (eps 1e-6); channels are last here."""
  return layer_norm(1e-6, name, dtype)


class MLPBlock(nn.Module):
  """Two linear layers with an activation between them (`lin1`, `lin2`)."""
  mlp_dim: int
  act: Callable = gelu
  dtype: jnp.dtype = jnp.float32
  # Logical axis names of the hidden activation (e.g. ("batch", None, None,
  # "mlp")), for tensor parallelism under a mesh; None leaves it to XLA.
  hidden_names: Optional[Tuple[Optional[str], ...]] = None

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="lin1")(x)
    if self.hidden_names is not None:
      x = nn.with_logical_constraint(x, self.hidden_names)
    return nn.Dense(dim, dtype=self.dtype, name="lin2")(self.act(x))
