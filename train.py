# `python train.py --config configs/demo.py --workdir /tmp/sam_demo` from a clone: the same as
# `python -m sam_jax.train` (flags and documentation in sam_jax/train/main.py; absl prints
# the __main__ module's docstring for --help).
from sam_jax.train.main import __doc__, main  # noqa: F401

if __name__ == "__main__":
  main()
