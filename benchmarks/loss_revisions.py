"""The losses of this checkout against those of earlier git revisions, timed in one process.

On a shared CPU, timings of separate runs drift by tens of percent; two implementations called alternately
in one process see the same load. For each revision, its ``combo_jax`` losses are extracted with
``git archive`` into a temporary package (imports renamed) and each loss's jitted forward + backward is timed
alternately with this checkout's, pair by pair: median and best wall time, and the process CPU time per
call (the sum over XLA's threads, which holds when the machine is busy). Prints ratios (this checkout /
revision) and writes JSON.

    python benchmarks/loss_revisions.py --revs 91b622e,7beb6f9
    python benchmarks/loss_revisions.py --revs 91b622e --shapes 2x16x16x16x105 --losses combo_loss
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import jax
import numpy as np

from combo_jax import losses
from timing import interleaved  # benchmarks/timing.py, beside this script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_revision(rev: str, root: str):
    """``combo_jax.losses`` of git revision ``rev`` as a module of a package renamed ``combo_jax_<rev>``."""
    name = f"combo_jax_{rev}".replace("-", "_").replace(".", "_")
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "combo_jax"], check=True, capture_output=True).stdout
    target = os.path.join(root, name)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = [m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith(".py")]
        tar.extractall(root, members=members, filter="data")
    os.rename(os.path.join(root, "combo_jax"), target)
    for file in os.listdir(target):
        path = os.path.join(target, file)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write("" if file == "__init__.py" else text.replace("combo_jax", name))
    sys.path.insert(0, root)
    return importlib.import_module(f"{name}.losses")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revs", required=True, help="comma-separated git revisions to compare against")
    parser.add_argument("--shapes", default="2x64x64x64x6,16x128x128x6", help="comma-separated B x spatial x K")
    parser.add_argument("--losses", default="combo_loss,dice_ce_loss,dice_loss")
    parser.add_argument("--iters", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/loss_revisions.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as root:
        revisions = {rev: load_revision(rev, root) for rev in args.revs.split(",")}
        for shape_text in args.shapes.split(","):
            shape = tuple(int(v) for v in shape_text.split("x"))
            rng = np.random.default_rng(0)
            x = jax.numpy.asarray(rng.standard_normal(shape, dtype=np.float32))
            y = jax.numpy.asarray(rng.integers(0, shape[-1], shape[:-1]).astype(np.int32))
            for name in args.losses.split(","):
                ours = jax.jit(jax.value_and_grad(getattr(losses, name)))
                for rev, module in revisions.items():
                    theirs = jax.jit(jax.value_and_grad(getattr(module, name)))
                    t = interleaved({"ours": lambda: jax.block_until_ready(ours(x, y)),
                                     "theirs": lambda: jax.block_until_ready(theirs(x, y))},
                                    args.iters, args.warmup)
                    (m, b, c), (m0, b0, c0) = ((t[k]["median_ms"], t[k]["best_ms"], t[k]["cpu_ms"])
                                               for k in ("ours", "theirs"))
                    rows.append({"shape": shape_text, "loss": name, "revision": rev, "ms": round(m, 3),
                                 "best_ms": round(b, 3), "cpu_ms": round(c, 3), "revision_ms": round(m0, 3),
                                 "revision_best_ms": round(b0, 3), "revision_cpu_ms": round(c0, 3)})
                    print(f"{shape_text:>16} {name:<14} vs {rev:<9} median {m:7.2f} / {m0:7.2f} ms ({m / m0:4.2f}x)  "
                          f"best {b:7.2f} / {b0:7.2f} ({b / b0:4.2f}x)  cpu {c:7.2f} / {c0:7.2f} ({c / c0:4.2f}x)",
                          flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "jax": jax.__version__, "iters": args.iters,
                   "load_average": os.getloadavg(), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
