"""How trials are launched: ``python sweep.py --config experiments.yaml [--experiment NAME]``.

Validates the whole YAML, creates the MLflow store, experiment and a parent run, then hands the
grid to Ray Tune with ``trainable.train`` as the one trainable. Also resumes interrupted sweeps
and reruns the best trial of an experiment with exactly its config.

Exit codes: 0 every trial finished (a trial a scheduler pruned counts as finished), 1 some trial failed or the sweep
was interrupted (its state is saved: --resume), 2 bad input (nothing started).
"""
from __future__ import annotations

import argparse
import os
import sys

import tracking
from config.errors import ConfigError, InputError
from config.schema import as_dict, resolve, trial_configs
from config.settings import ExperimentConfig
from launch import best, records
from launch.checks import absolute_paths, available_gpus, check_gpus, check_writable
from launch.data_check import prepare_data
from launch.tuner import launch

RESULTS_DIR = tracking.PROJECT_ROOT / "ray_results"
EPILOG = """examples:
  tar xzf ../shared/datasets/cifar10-jpeg.tar.gz   # once, offline: the JPEG copy of CIFAR-10 into ./cifar10-jpeg
  python sweep.py --config experiments.yaml --experiment quick --set data.name=imagefolder --set data.root=cifar10-jpeg
  python sweep.py --experiment cifar10-stress --dry-run
  python sweep.py --experiment quick --resume
  python sweep.py --experiment quick --rerun-best
  python sweep.py --experiment quick --register-best quick-best
  python sweep.py --experiment cifar10-stress --address auto --tracking-uri http://127.0.0.1:5000

exit codes: 0 all trials finished (pruned ones count), 1 some trial failed or the sweep was interrupted, 2 bad input (nothing started)"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments.yaml", help="experiment file (default: experiments.yaml)")
    p.add_argument("--experiment", help="experiment name (default: the file's default_experiment)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting by dotted path, e.g. --set epochs=2 (repeatable)")
    action = p.add_mutually_exclusive_group()  # one thing per call: a dry run, a resume, a rerun or a registration
    action.add_argument("--dry-run", action="store_true", help="validate and print the trial table; start nothing")
    action.add_argument("--resume", action="store_true", help="continue the latest interrupted launch of this experiment")
    p.add_argument("--resume-if-interrupted", action="store_true",
                   help="what a requeued batch job runs (slurm/sweep.sbatch, with a --storage per job): resume this experiment's latest sweep "
                        "under --storage if it was interrupted, exit 0 if it finished, start one if there is none")
    action.add_argument("--rerun-best", action="store_true", help="rerun the best finished trial of the experiment with exactly its config")
    action.add_argument("--register-best", metavar="NAME", help="register the best finished run's model in the MLflow Model Registry as NAME")
    p.add_argument("--alias", default="champion", help="alias --register-best sets on the new version (default: %(default)s; it moves from any older version)")
    p.add_argument("--metric", help="metric that picks the best run for --rerun-best/--register-best (default: the experiment's own metric, "
                                    "val/acc; a test/... metric selects on the test set and prints a warning)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto or ray://head:10001)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in ./mlruns)")
    p.add_argument("--storage", default=str(RESULTS_DIR), help=f"Ray results folder; shared storage on a cluster (default: {RESULTS_DIR})")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output (trial tables, worker logs) instead of sending it to "
                                                          "<storage>/<sweep id>/launch.log")
    args = p.parse_args(argv)
    if args.register_best is not None and (problems := best.registry_problems(args.register_best, args.alias)):
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.address:  # a local Ray binds every server to 127.0.0.1 (read when Ray is imported, so set first)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        name, cfg = resolve(args.config, args.experiment, args.set)
        cfg = absolute_paths(cfg)
        if args.dry_run:
            print_trial_table(name, cfg)
            return 0
        if not args.address:
            check_gpus(name, cfg, available_gpus())
    except ConfigError as err:
        return refuse(args, err)
    try:
        check_writable(args)
        if args.register_best is not None:
            return best.register_best(name, cfg, args)
        if args.resume_if_interrupted and not args.resume:
            latest = (records.sweeps(args.storage, name) or [None])[-1]
            if latest and latest["status"] == records.FINISHED:
                print(f"sweep {latest['sweep_id']} under {args.storage} has finished; nothing to resume")
                return 0
            args.resume = latest is not None
        if not args.resume and not args.rerun_best:  # one download or check by the driver, not one failure per trial
            prepare_data(cfg)  # (a rerun checks the data of the logged config it reruns)
        if args.rerun_best:
            return best.rerun_best(name, cfg, args, launch)
        return launch(name, cfg, args)
    except ConfigError as err:  # found once the cluster is known (a GPU request no node can meet); the launch closed its runs
        return refuse(args, err)
    except (PermissionError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def refuse(args: argparse.Namespace, err: ConfigError) -> int:
    print(f"error: invalid configuration ({args.config}):\n  " + "\n  ".join(err.problems), file=sys.stderr)
    return 2


def print_trial_table(name: str, cfg: ExperimentConfig) -> None:
    trials = trial_configs(cfg)
    print(f"experiment {name}: {len(trials)} trials, {cfg.epochs} epochs, resources per trial {as_dict(cfg.resources)}")
    print(f"{'#':>3}  {'arch':<14}{'augment':<10}{'seed':>6}  {'lr':>9}  {'data':<12}")
    for i, t in enumerate(trials):
        augment = t.augment if isinstance(t.augment, str) else "+".join(t.augment)
        print(f"{i:>3}  {t.arch:<14}{augment:<10}{t.seed:>6}  {t.optimizer.lr:>9.4g}  {t.data.name:<12}")


if __name__ == "__main__":
    sys.exit(main())
