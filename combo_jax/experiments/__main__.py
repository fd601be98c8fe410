"""``python -m combo_jax.experiments``: see :mod:`combo_jax.experiments`."""

import sys

from combo_jax.experiments.cli import main

sys.exit(main())
