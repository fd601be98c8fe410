"""Real anatomy check: the abdominal CT sample in ../shared/data/totalsegmentator_ct, seven organs, a 2D U-Net.

    python -m combo_jax.train --config configs/totalseg_ct.py --workdir runs/totalseg_ct

One patient (122 x 101 x 30 voxels at 3 mm, TotalSegmentator pseudo-labels): liver 10.5% of voxels, spleen 2.6%,
kidneys about 1% each, pancreas 0.17%, adrenal glands about 0.05% each; every other structure is background.
Training uses axial slices 0-12 and 19-29, validation the slab of slices 13-18 (the only slices holding all seven
organs). This checks the real-volume pipeline end to end on real anatomy; one patient supports no claim about
generalization. Runtime: about 2 minutes on one core of a 2-core CPU
(600 steps); see docs/results.md for the loss study on it.
"""

from combo_jax.configs import msd

def get_config(loss: str = "combo"):
    config = msd.get_config(loss)
    d = config.data
    d.root = msd.sample_root("totalsegmentator_ct")  # empty when the repository's ../shared/data is not beside it
    d.cases = (("example_ct_sm.nii.gz", "example_seg.nii.gz"),)
    d.organs = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "adrenal_gland_right", "adrenal_gland_left")
    d.label_ids = (5, 1, 2, 3, 7, 8, 9)  # TotalSegmentator ids (labels.json)
    d.modality = "CT"
    d.num_val = 0
    d.val_slab = (13, 19)
    d.spatial_dims = 2
    d.shape = (96, 96)
    d.slice_axis = 2
    d.num_train = 512
    config.model.features = (8, 16, 32, 64)
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.num_steps = 600
    config.train.eval_every = 300
    config.train.checkpoint_every = 300
    config.eval.window = (96, 96)
    config.eval.nsd_tolerance_mm = 3.0  # one voxel
    return config
