# `python -m sam_jax.train`; its --help shows sam_jax.train.main's docstring, which absl
# reads from the __main__ module.
from sam_jax.train.main import __doc__, main  # noqa: F401

main()
