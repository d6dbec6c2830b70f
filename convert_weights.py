"""`python convert_weights.py --checkpoint FILE.pth --output DIR`, from a clone.

The same as `python -m sam_jax.convert_weights` (options and documentation there).
"""

import sys

from sam_jax.convert_weights import main

if __name__ == "__main__":
  sys.exit(main())
