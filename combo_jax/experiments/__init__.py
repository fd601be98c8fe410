"""Studies over many trainings: the loss comparison and the alpha/beta sweeps, with tables, plots and targets.

    python -m combo_jax.experiments compare --config default --seeds 3 --out runs/study
    python -m combo_jax.experiments sweep --config default --param loss.beta \\
        --values 0.1,0.3,0.5,0.7,0.9 --seeds 3 --out runs/study --target "recall>=0.95:pancreas"
    python -m combo_jax.experiments losses      # each loss's default options

The package: ``plan`` (the runs of a study), ``runner`` (devices, subprocesses, resume), ``results`` (reading
runs, statistics over seeds, targets), ``stats`` (collapsed runs, seed-by-seed comparisons), ``report`` (tables
and plots), ``cli`` (the command line).

**Runs.** Every run is an independent ``python -m combo_jax.train --config ... --workdir DIR/runs/NAME
--config.seed=S [--config.KEY=VALUE ...]`` subprocess, so a study is exactly the trainings a user could start by
hand (and it works from an installed package: no file of the repository is needed).
The runs share JAX's persistent compilation cache
(``OUT/jax_cache``; ``--compile-cache``), so only the first run of a setting pays for most compilations.
``compare`` names its runs ``<loss>_seed<S>``; ``sweep`` names them ``<loss>_<param>=<value>_seed<S>``, except
that a point equal to the config's own value (beta = 0.5 for the Combo loss) *is* the compare run
``<loss>_seed<S>`` and is trained once for both, when the two commands share ``--out`` and ``--set``.

**Seeds.** ``--seeds N`` trains seeds 0 .. N-1 (``--first-seed`` shifts them). The seed sets ``config.seed``:
the model's initial parameters and the order of the training batches. ``config.data.seed`` stays fixed, so
every run trains on the same cases and is scored on the same validation cases: the spread over seeds is the
spread of training, not of the data.

**Resume.** A run whose workdir holds ``summary.json`` is finished and skipped; any other run is started again
and resumes from its checkpoints. Before anything trains, each workdir's recorded configuration
(``experiment.json``, written at launch, and ``summary.json``) is compared with the one this command would
train; a mismatch (say, a different ``--set``) is an error naming the run and the fields, never a silent mix.
Ctrl-C or SIGTERM to the study asks every running training to save a checkpoint and stop;
rerunning the command resumes them. After a study, rerunning the same command trains nothing and rewrites the
tables, so ``--target`` can be changed freely on a finished sweep. ``--dry-run`` lists the runs and commands.

**Devices.** ``--parallel P`` runs up to P trainings at once. On GPUs (``--devices auto`` finds them with
``nvidia-smi`` or ``CUDA_VISIBLE_DEVICES``, or give ids: ``--devices 0,1,2,3``) run i gets
``CUDA_VISIBLE_DEVICES`` of one GPU, round-robin; P defaults to the number of GPUs, and with more runs than GPUs
each shares its GPU (memory preallocation is then turned off and each process may take an equal share). On a CPU P defaults to 1, which gives the one
run every core; with P > 1 the cores are split into P disjoint sets and each run is pinned to one set
(``sched_setaffinity``; XLA's CPU thread pools follow that set), so P runs never compete for a core. A
run pinned to fewer cores is slower; whether P runs of c/P cores beat one run of c cores depends on the model
size (small models, whose steps are dominated by per-step overhead, gain). On a TPU host leave P at 1.

**Outputs** in ``--out``: ``compare.md`` / ``compare.csv`` (per organ and loss: Dice mean +- sample std over
seeds, precision, recall, false-positive and false-negative volume in ml, HD95, and the same summarized over
the small organs and over all organs), ``compare_runs.csv`` (one row per run and organ),
``sweep_<param>.md`` / ``.csv`` / ``_runs.csv`` / ``.png`` (false positives, false negatives, precision and
recall per organ against the swept value), ``sweep_<param>_paired.csv`` (every pair of swept values compared seed
by seed, see below), and ``study.json`` (for every invocation: the command, the runs and what happened to each,
the hardware, the wall time). Every row carries the loss name and options that its runs
recorded in their own ``summary.json``; nothing in a table is taken from the command line.

**Collapses and seeds** (``stats``). Each run is also checked per organ: *painted* when its false-positive volume
exceeds 10 times its true volume on the validation split, *missed* when under 10% of its voxels are found; a run
with a painted or missed organ *collapsed*. Every table reports how many seeds of a setting collapsed and which
(``n_collapsed``, ``collapsed_seeds``, ``painted_seeds``, ``missed_seeds`` in the CSVs). A sweep also compares its
values seed by seed (the run of seed s at one value against the run of seed s at another): how many seeds have
more false positives and fewer false negatives at the higher value, a one-sided exact sign test, and a bootstrap
interval of the mean change; the report shows the lowest against the highest value and each value against the
next.

**Targets** (``sweep --target``, repeatable): ``METRIC OP THRESHOLD : SCOPE``, e.g. ``recall>=0.95:pancreas``
or ``fp_ml<=0.5:all``. METRIC is one of ``TARGET_METRICS`` (``fp_ml``/``fn_ml`` are volumes in ml), OP one of
``>= <= > <``, SCOPE an organ name, ``all`` (every organ must meet it) or ``small`` (every organ under the
small-organ share). A swept value meets the target when the mean over seeds of the metric meets it for every
organ in scope. Of the values that meet it the one with the best mean foreground Dice is chosen; if none does,
the one with the smallest worst shortfall (in the metric's units). The report then lists what the choice costs
against the config's own value of the swept key (beta = 0.5 for the Combo loss): the change in Dice, precision,
recall and false-positive and false-negative volume of every organ. A sweep varies one key; to choose beta and
alpha, run the target on each sweep.
"""
