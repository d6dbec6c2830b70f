"""Writing outputs safely: refuse to replace what we did not write, and swap atomically.

Every writer (checkpoints, converted `.pth` files, AMG results) goes through
`atomic_output`: the new output is written beside the target under a name of
its own (`.NAME.sam_jax-tmp`), then swapped in. An existing target is only
replaced with `overwrite` and only when `replaceable` recognises it as one of
ours; anything else is refused with a message, never deleted.
"""

import contextlib
import os
import shutil
from typing import Callable, Iterator, Optional


class OutputError(ValueError):
  """An output that may not be written or replaced; the message says why and what to do."""


def _sibling(path: str, tag: str) -> str:
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.sam_jax-{tag}")


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _recover(path: str) -> None:
  """Undoes what a run killed mid-swap left: its temporary output and the displaced old one."""
  tmp, old = _sibling(path, "tmp"), _sibling(path, "old")
  _remove(tmp)  # named after this output: only a sam_jax writer makes it
  if os.path.lexists(old):
    if os.path.lexists(path):
      _remove(old)
    else:  # killed between the two renames: the old output goes back
      os.rename(old, path)


def check_output(path: str, overwrite: bool, replaceable: Callable[[str], Optional[str]],
                 what: str = "output") -> None:
  """Raises OutputError unless `path` is free, or may be replaced (see `atomic_output`)."""
  if os.path.lexists(path):
    if not overwrite:
      raise OutputError(f"{path} exists already; choose another path or pass --overwrite.")
    why = replaceable(path)
    if why is not None:
      raise OutputError(f"Refusing to replace {path}: {why}. --overwrite only replaces a "
                        f"{what} that sam_jax wrote; move it away or choose another path.")


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool, replaceable: Callable[[str], Optional[str]],
                  what: str = "output") -> Iterator[str]:
  """Yields a temporary path to write `path`'s new content to; swaps it in on success.

  `replaceable(path)` returns None when an existing `path` is one of ours (so
  `overwrite` may replace it), else the reason it is not. On an error nothing
  is left behind and an existing `path` is untouched.
  """
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OutputError(f"Cannot create the folder {parent} for the {what}: {e.strerror}.") from e
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"Cannot write the {what} {path}: {parent} is not writable.")
  _recover(path)
  check_output(path, overwrite, replaceable, what)
  tmp = _sibling(path, "tmp")
  try:
    yield tmp
    if os.path.lexists(path):
      old = _sibling(path, "old")
      os.rename(path, old)
      os.rename(tmp, path)
      _remove(old)
    else:
      os.rename(tmp, path)
  finally:
    _remove(tmp)


def empty_dir(path: str) -> Optional[str]:
  """None for an empty folder, else why it is not one."""
  if not os.path.isdir(path) or os.path.islink(path):
    return "it is not a folder"
  return None if not os.listdir(path) else "it is a folder that is not empty"


def folder_of(names, what: str) -> Callable[[str], Optional[str]]:
  """A `replaceable` for a folder that a writer fills with `names`: None when the
  folder holds nothing else (so none of its files is one we did not write)."""
  names = frozenset(names)

  def replaceable(path: str) -> Optional[str]:
    if not os.path.isdir(path) or os.path.islink(path):
      return "it is not a folder"
    foreign = sorted(set(os.listdir(path)) - names)
    if foreign:
      return (f"it holds files that a {what} does not ({', '.join(foreign[:5])}"
              f"{', ...' if len(foreign) > 5 else ''})")
    return None
  return replaceable
