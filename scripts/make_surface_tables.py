"""Writes combo_jax/_surface_tables.py: the surface elements of every 2x2 (2D) and 2x2x2 (3D) neighbourhood code.

    pip install scikit-image && python scripts/make_surface_tables.py

Surface metrics weighted by area (Nikolov et al. 2021, "Clinically applicable segmentation of head and neck
anatomy for radiotherapy") place the boundary of a binary mask on the grid of voxel corners: each corner sees the
2x2x2 voxels around it, an 8-bit code, and the boundary inside that cell is the marching-cubes isosurface at 0.5
between the voxel centres. This script triangulates every code once with scikit-image's classic (Lorensen)
marching cubes (a code with more than four voxels inside takes the boundary of its complement, with the
orientation reversed, as the classic case table does) and stores each triangle's area vector (half the cross product of two edges, in voxel units), so
the package can weigh surface elements at any voxel spacing without scikit-image: a triangle's area at spacing
(s0, s1, s2) is the norm of (s1 s2 n0, s0 s2 n1, s0 s1 n2). In 2D the contour of each 2x2 code is a set of
segments between the midpoints of the cell edges whose two corners differ (marching squares; the two saddle
codes get two segments, and either pairing gives the same lengths); they are computed here directly.

Code bits: bit i of a 3D code is the voxel at offset (i >> 2 & 1, i >> 1 & 1, i & 1) from the cell's first
corner; in 2D, bit i is the voxel at (i >> 1 & 1, i & 1).
"""

import os

import numpy as np
from skimage import measure


def triangles_3d() -> list[list[tuple[float, float, float]]]:
    table = {}
    for code in range(256):
        if bin(code).count("1") > 4 or code == 0:
            continue
        cell = np.zeros((2, 2, 2))
        for i in range(8):
            if code >> i & 1:
                cell[i >> 2 & 1, i >> 1 & 1, i & 1] = 1.0
        verts, faces, _, _ = measure.marching_cubes(cell, 0.5, method="lorensen")
        table[code] = [tuple(float(round(v, 6)) for v in 0.5 * np.cross(verts[b] - verts[a], verts[c] - verts[a]))
                       for a, b, c in faces]
    table[0] = []
    # Classic marching cubes: a code with more than four voxels inside has the boundary of its complement.
    for code in range(256):
        if code not in table:
            table[code] = [tuple(-v for v in n) for n in table[255 - code]]
    return [table[code] for code in range(256)]


def segments_2d() -> list[list[tuple[float, float]]]:
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]  # bit i: (i >> 1 & 1, i & 1)
    edges = [((0, 0), (0, 1)), ((0, 1), (1, 1)), ((1, 1), (1, 0)), ((1, 0), (0, 0))]  # around the cell
    table = []
    for code in range(16):
        inside = {c for i, c in enumerate(corners) if code >> i & 1}
        crossings = [tuple((np.add(a, b) / 2).tolist()) for a, b in edges if (a in inside) != (b in inside)]
        # Consecutive crossings around the cell pair up into segments (the saddles give four, two segments).
        if len(crossings) == 4 and ((0, 0) in inside) == ((0, 1) in inside):
            crossings = crossings[1:] + crossings[:1]
        pairs = [(crossings[i], crossings[i + 1]) for i in range(0, len(crossings), 2)]
        table.append([tuple(float(q - p) for p, q in zip(a, b)) for a, b in pairs])
    return table


def main():
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "combo_jax", "_surface_tables.py")
    lines = ['"""Surface elements of every neighbourhood code: written by scripts/make_surface_tables.py (see there);',
             'do not edit."""', "", "# SEGMENTS_2D[code]: the (d0, d1) vector of each contour segment, in voxel units.",
             "SEGMENTS_2D = ("]
    lines += [f"    {tuple(s)!r}," for s in segments_2d()]
    lines += [")", "", "# TRIANGLES_3D[code]: the area vector (n0, n1, n2) of each surface triangle, in voxel units.",
              "TRIANGLES_3D = ("]
    lines += [f"    {tuple(t)!r}," for t in triangles_3d()]
    lines += [")", ""]
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
