"""The loss study on the phantom (docs/results.md): the demo's 2D set-up, shortened to 600 steps.

    python -m combo_jax.experiments compare --config study --seeds 5 --out results/phantom
    python -m combo_jax.experiments sweep --config study --param loss.beta \
        --values 0.1,0.5,0.9 --seeds 5 --out results/phantom
    python -m combo_jax.experiments sweep --config study --param loss.alpha \
        --values 0.1,0.5,0.9 --seeds 5 --out results/phantom

(or `make study`, which also runs the Combo loss's halves with its class weights and the CT sample). 55 runs:
the beta = 0.5 and alpha = 0.5 points are the compare's combo runs, shared when the three commands use the
same --out.

96 x 96 slices (the phantom scales with the image: the same six organs, 9.6% down to 0.09% of voxels, the
adrenal about 9 voxels per slice), U-Net (8, 16, 32, 64), 600 steps of batch 8, one evaluation at the end on
32 validation cases. 76-230 s per run on a shared 2-core CPU (about 2.5 minutes for the Combo loss); mean
foreground Dice about 0.87 with the Combo loss (adrenal about 0.55; 0 of seeds 0-9 collapsed with its default
class weights, frequency_power 0.25). Without the weights some seeds of every Combo setting collapse at this
budget (an organ painted over the background or never found; see docs/collapse.md); at 128 x 128 and 300 steps
the two smallest organs were not learnt at all.
"""

from combo_jax.configs import default


def get_config(loss: str = "combo"):
    config = default.get_config(loss)
    config.data.shape = (96, 96)
    config.train.num_steps = 600
    config.train.eval_every = 600
    config.train.checkpoint_every = 300
    config.eval.num_predictions = 2
    return config
