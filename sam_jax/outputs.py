"""Writing an output directory whole or not at all.

Files are written into a temporary sibling, which replaces the output only
once everything in it is written: a failure leaves nothing behind. An
existing output is replaced only with `overwrite`, and only when every entry
in it is one this writer makes, so that an overwrite never deletes a file
that the program did not create.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Iterable, Iterator


class OutputError(ValueError):
  """An output path that cannot be written without losing something."""


def check_output(output: str, overwrite: bool, names: Iterable[str]) -> None:
  """Raises OutputError unless `output` may be (re)written by a writer of `names`."""
  if not os.path.lexists(output):
    return
  if not overwrite:
    raise OutputError(f"{output} exists already; choose another path or pass --overwrite.")
  if not os.path.isdir(output) or os.path.islink(output):
    raise OutputError(f"{output} exists and is not a directory; --overwrite only replaces a "
                      "directory that this command wrote. Remove it yourself or choose another path.")
  foreign = sorted(set(os.listdir(output)) - set(names))
  if foreign:
    raise OutputError(
        f"{output} holds files this command does not write ({', '.join(foreign[:5])}"
        f"{', ...' if len(foreign) > 5 else ''}); --overwrite will not delete them. "
        "Remove them yourself or choose another path.")


@contextlib.contextmanager
def staged_directory(output: str, overwrite: bool, names: Iterable[str]) -> Iterator[str]:
  """Yields a temporary directory that becomes `output` when the block succeeds."""
  names = tuple(names)
  output = os.path.abspath(output)
  check_output(output, overwrite, names)
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(output), dir=parent)
  try:
    yield tmp
    written = sorted(set(os.listdir(tmp)) - set(names))
    assert not written, f"the writer made files it does not declare: {written}"
    check_output(output, overwrite, names)  # unchanged while we wrote?
    if os.path.lexists(output):
      shutil.rmtree(output)
    os.replace(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
