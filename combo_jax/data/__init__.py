"""Datasets: the embedded procedural phantom (phantom.py), real NIfTI volumes (nifti.py) and the grain patch pipeline (pipeline.py)."""
