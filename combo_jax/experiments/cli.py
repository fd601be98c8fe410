"""The command line: ``python -m combo_jax.experiments compare|sweep|losses`` (also ``combo-jax-experiments``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from combo_jax import config as config_lib
from combo_jax.experiments import plan, report, results, runner
from combo_jax.experiments.plan import StudyError

def loss_defaults_table() -> str:
    """Markdown table of the options every loss trains with in the shipped configs (``configs/default.py``)."""
    from combo_jax.configs import default

    lines = ["| loss | default options |", "|---|---|"]
    for name in config_lib.LOSSES:
        options = {k: v for k, v in default.loss_config(name).to_dict().items() if k != "name"}
        lines.append(f"| {name} | {report._options_text(options)} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m combo_jax.experiments", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--config", required=True, help="a config as combo_jax.train takes it: a shipped name or a file (NAME[:loss], file.py[:loss])")
        p.add_argument("--seeds", type=int, default=1, help="number of seeds per setting (seeds first-seed .. first-seed+N-1)")
        p.add_argument("--first-seed", type=int, default=0)
        p.add_argument("--out", required=True, help="results folder; runs go to OUT/runs/<name>/")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override for every run (e.g. train.num_steps=400); repeatable")
        p.add_argument("--devices", default="auto", help="'auto', 'cpu', or comma-separated GPU ids")
        p.add_argument("--parallel", type=int, default=None, help="trainings at once (default: GPU count, 1 on a CPU)")
        p.add_argument("--compile-cache", default=None, metavar="DIR",
                       help="JAX compilation cache shared by the runs (default OUT/jax_cache; 'none' to disable)")
        p.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress lines")
        p.add_argument("--dry-run", action="store_true", help="print the runs and their commands; train nothing")

    sub.add_parser("losses", help="print each loss's default options (a markdown table) and exit")
    p = sub.add_parser("compare", help="train each loss with N seeds; per-organ tables")
    common(p)
    p.add_argument("--losses", default=None, help=f"comma-separated (default: all: {','.join(config_lib.LOSSES)})")
    p = sub.add_parser("sweep", help="train each value of one config key with N seeds; FP/FN tables and plot")
    common(p)
    p.add_argument("--param", required=True, help="dotted config key, e.g. loss.beta or loss.alpha")
    p.add_argument("--values", required=True, help="comma-separated values (use ';' to separate tuple values)")
    p.add_argument("--target", action="append", default=[], metavar="METRIC OP X:SCOPE",
                   help="e.g. 'recall>=0.95:pancreas' or 'fp_ml<=0.5:all'; repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m combo_jax.experiments`` and ``combo-jax-experiments``; returns the exit status
    (2 for a study that cannot run, with a one-line error)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "losses":
        print(loss_defaults_table())
        return 0
    if args.seeds < 1:
        raise StudyError(f"--seeds must be at least 1, got {args.seeds}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    try:
        sets = dict(config_lib.split_override(s) for s in args.set)
    except config_lib.ConfigError as err:
        raise StudyError(f"--set: {err}") from err
    if args.command == "compare":
        suffix = args.config.partition(":")[2]
        losses = args.losses.split(",") if args.losses else ([suffix] if suffix else list(config_lib.LOSSES))
        runs = plan.plan_compare(config=args.config, losses=[x.strip() for x in losses], seeds=seeds, out=args.out, sets=sets)
        targets = []
    else:
        separator = ";" if ";" in args.values else ","
        values = [v.strip() for v in args.values.split(separator) if v.strip()]
        runs, base, default, parsed = plan.plan_sweep(config=args.config, param=args.param, values=values, seeds=seeds,
                                                 out=args.out, sets=sets)
        targets = [results.parse_target(t, organs=plan.organ_names(base)) for t in args.target]
    plan.check_workdirs(runs)
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: {'finished' if run.finished else 'to train'}: {shlex.join(run.command())}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    slots = runner.make_slots(devices=args.devices, parallel=args.parallel)
    try:
        cache = os.path.join(args.out, "jax_cache") if args.compile_cache is None else (
            None if args.compile_cache.lower() == "none" else args.compile_cache)
        runner.run_study(runs, slots=slots, out=args.out, argv=argv, progress_every=args.progress_every, compile_cache=cache)
    except KeyboardInterrupt as err:
        print(err, file=sys.stderr)
        return 130
    if args.command == "compare":
        report.write_compare(runs, args.out, argv=argv)
        print(f"wrote {os.path.join(args.out, 'compare.md')} and compare.csv")
    else:
        result = report.write_sweep(runs, args.out, param=args.param, values=parsed, default=default, targets=targets, argv=argv)
        print(f"wrote {result['paths']['.md']}, .csv and .png")
        for choice in result["choices"]:
            best = choice["best"]
            print(f"target {choice['target'].text}: {args.param}={plan.format_value(best['value'])} "
                  f"({'meets it' if choice['met'] else 'no value meets it; the closest'}; mean foreground Dice {report._fmt(best['dice'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
