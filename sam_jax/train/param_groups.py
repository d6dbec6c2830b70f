"""Parameter groups by regular expression over parameter paths, as in big_vision.

A parameter's path is its names joined by "/", e.g.
"image_encoder/blocks_0/attn/qkv/kernel"; a pattern must match the whole path
(`re.fullmatch`). `config.freeze` is a preset name, a pattern, or a sequence of
them; `config.optim.lr_mults` and `config.optim.wd_mults` are sequences of
(pattern, multiplier) where the first matching pattern wins. A pattern that
matches no parameter is an error: a typo must not silently freeze nothing.
"""

import re
from typing import Any, Iterable, List, Sequence, Tuple, Union

import jax

# The named freezing modes, as pattern lists.
FREEZE_PRESETS = {
    "full": (),
    "frozen_image_encoder": ("image_encoder/.*",),
    "decoder_only": ("image_encoder/.*", "prompt_encoder/.*"),
}
# Never trained: a random buffer in the reference (PositionEmbeddingRandom).
ALWAYS_FROZEN = (".*/positional_encoding_gaussian_matrix",)


def path_name(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def path_names(params) -> List[str]:
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compile(pattern: str, where: str) -> "re.Pattern":
  if not isinstance(pattern, str):
    raise ValueError(f"{where}: {pattern!r} is not a regular expression string.")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{where}: {pattern!r} is not a valid regular expression ({e}).") from None


def _check_all_match(patterns: Sequence[str], names: Sequence[str], where: str) -> None:
  for pattern in patterns:
    regex = _compile(pattern, where)
    if not any(regex.fullmatch(n) for n in names):
      examples = ", ".join(names[:3])
      raise ValueError(
          f"{where}: the pattern {pattern!r} matches no parameter path (paths look like "
          f"{examples}, ...; a pattern must match a whole path, e.g. 'prompt_encoder/.*').")


def freeze_patterns(freeze: Union[str, Iterable[str]]) -> Tuple[str, ...]:
  """`config.freeze` as patterns: presets expanded, a lone string taken as one item."""
  items = (freeze,) if isinstance(freeze, str) else tuple(freeze or ())
  out = []
  for item in items:
    out.extend(FREEZE_PRESETS.get(item, (item,)))
  return tuple(out)


def frozen_mask(params, freeze) -> Any:
  """True per frozen parameter (those matched by `freeze`, and the random buffer)."""
  names = path_names(params)
  patterns = freeze_patterns(freeze)
  _check_all_match(patterns, names,
                   f"config.freeze={freeze!r} (presets: {sorted(FREEZE_PRESETS)})")
  regexes = [re.compile(p) for p in patterns + ALWAYS_FROZEN]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(r.fullmatch(path_name(path)) for r in regexes), params)


def all_frozen(params, freeze, prefix: str) -> bool:
  """Whether every parameter under `prefix` (e.g. 'image_encoder') is frozen."""
  flat = jax.tree_util.tree_flatten_with_path(frozen_mask(params, freeze))[0]
  under = [f for p, f in flat if path_name(p).startswith(prefix + "/")]
  return bool(under) and all(under)


def stop_frozen_gradients(params, freeze) -> Any:
  """The parameters with frozen ones behind `stop_gradient`: XLA then drops the
  backward pass that only they need (all of it, for a frozen image encoder)."""
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p,
                      params, frozen_mask(params, freeze))


def first_match_values(params, pairs: Sequence[Tuple[str, float]], where: str,
                       default: float) -> Any:
  """The multiplier of the first (pattern, value) whose pattern matches, per parameter."""
  pairs = [tuple(p) for p in (pairs or ())]
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"{where}: {pair!r} is not a (pattern, multiplier) pair.")
  _check_all_match([p for p, _ in pairs], path_names(params), where)
  regexes = [(re.compile(p), float(v)) for p, v in pairs]

  def value(path, _):
    name = path_name(path)
    return next((v for r, v in regexes if r.fullmatch(name)), default)
  return jax.tree_util.tree_map_with_path(value, params)
