"""The configs shipped with combo_jax; installed as ``combo_jax.configs`` and named by ``--config NAME``."""
