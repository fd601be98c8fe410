"""Datasets: the embedded procedural phantom and (later) real NIfTI volumes."""
