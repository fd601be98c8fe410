"""Train a segmentation U-Net: python train.py --config tiny --workdir runs/tiny [--config.KEY=VALUE ...]

The repository's entry point; the same command as ``python -m combo_jax.train`` and the installed
``combo-jax-train`` script (see that module for the flags, config names and exit status).
"""

from combo_jax.train import main

if __name__ == "__main__":
    main()
