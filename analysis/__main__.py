"""``python -m analysis --experiment NAME``: the stress-test report of a finished sweep, from MLflow alone."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tracking
from analysis import GALLERY_CLASSES, ROAD_IMAGES
from config.errors import InputError
from stress.corruptions.published import PublishedArraysError
from config.settings import TrialConfig
from tracking import metrics

EPILOG = """examples:
  python -m analysis --experiment quick
  python -m analysis --experiment cifar10-stress --baseline augment=none --variant augment=cutout --out reports/cutout
  python -m analysis --experiment cifar10-stress --baseline augment=none --variant augment=cutout --layer resnet18=layer3
  python -m analysis --experiment quick --tracking-uri http://127.0.0.1:5000

Without --baseline/--variant, runs are compared augment=none vs every other augmentation (or
plain_cnn vs every other architecture) where the sweep has them. Exit codes: 0 done, 2 bad input."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment (= YAML experiment name)")
    p.add_argument("--baseline", help="selector of the baseline runs, KEY=VALUE on a logged param (e.g. augment=none)")
    p.add_argument("--variant", help="selector of the variant runs, same KEY (e.g. augment=cutout)")
    p.add_argument("--threshold", type=float, default=metrics.CONFIDENCE_THRESHOLD, help="confidence above which an error is a failure (default %(default)s)")
    p.add_argument("--out", help="output folder (default reports/<experiment>)")
    p.add_argument("--layer", help="Grad-CAM target layer by module path, for every architecture (layer3) or per architecture "
                                   "(resnet18=layer3,plain_cnn=stages.1); default: each model's registered layer")
    p.add_argument("--classes", help=f"classes of the Grad-CAM gallery, comma-separated (default: {','.join(GALLERY_CLASSES)} where the "
                                      "data set has them, else its first five)")
    p.add_argument("--max-cams", type=int, default=200, help="failures per run explained with Grad-CAM (default 200)")
    p.add_argument("--corruption-images", type=int, help="class-balanced test images for the corruption stress test (0: skip). Default: the "
                                                          "trials' own test where every run ran it (robustness: true), read from its logs; "
                                                          "else 1000. Runs whose trial tested the same subset are read, not recomputed")
    p.add_argument("--corruption-data", help="folder of the published CIFAR-10-C / -100-C arrays (<corruption>.npy, labels.npy) for the "
                                             "runs this analysis tests; corruptions without a file are generated. Default: the "
                                             "trials' robustness_data")
    p.add_argument("--cache-dir", help="where artifacts downloaded from a tracking server are kept and reused by every later analysis "
                                       "(default $XDG_CACHE_HOME/stresslab/artifacts, else ~/.cache/stresslab/artifacts); a local store "
                                       "is read in place")
    p.add_argument("--road-images", type=int, default=ROAD_IMAGES, help="seeded test images per run on which Grad-CAM's ROAD "
                                                                        "faithfulness is measured, beside a random map's and a centred blob's "
                                                                        "(default %(default)s)")
    p.add_argument("--adversarial-images", type=int, help="class-balanced test images per run attacked with FGSM and PGD at epsilon 1, 2, 4, "
                                                           "8 /255 (0: skip). Default, with --pgd-steps and --pgd-step-size: the trials' own "
                                                           "test where every run ran it with the same settings (adversarial: true), read from "
                                                           f"its logs; else {TrialConfig.adversarial_images} images, {TrialConfig.adversarial_steps} steps of "
                                                           f"{TrialConfig.adversarial_step_size} epsilon")
    p.add_argument("--pgd-steps", type=int, help=f"PGD iterations after the FGSM start (default: the trials', else {TrialConfig.adversarial_steps})")
    p.add_argument("--pgd-step-size", type=float, help=f"PGD step as a fraction of epsilon (default: the trials', else {TrialConfig.adversarial_step_size})")
    p.add_argument("--workers", type=int, help="processes analysing runs in parallel (default: one per usable core, at most one per 8 runs)")
    p.add_argument("--sweep", default="latest", help="which launch: latest (default), all, or a sweep id")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in ./mlruns)")
    p.add_argument("--no-log", action="store_true", help="do not log the report back to MLflow")
    p.add_argument("--allow-data-mismatch", action="store_true", help="analyse runs whose test images or labels differ from the data "
                                                                      "loaded now (refused by default: Grad-CAM would explain other pixels)")
    args = p.parse_args(argv)
    if bool(args.baseline) != bool(args.variant):
        p.error("--baseline and --variant go together")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if not 0 < args.threshold < 1:
        p.error(f"--threshold must be in (0, 1), got {args.threshold}")
    for flag in ("max_cams", "corruption_images", "road_images", "adversarial_images", "pgd_steps"):
        if (value := getattr(args, flag)) is not None and value < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0 (0: none), got {value}")
    if args.pgd_step_size is not None and not 0 < args.pgd_step_size <= 1:
        p.error(f"--pgd-step-size must be in (0, 1] (a fraction of epsilon), got {args.pgd_step_size}")
    gallery = tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes is not None else None
    if gallery == ():
        p.error(f"--classes names no class: {args.classes!r}")
    out = args.out or f"reports/{args.experiment}"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / ".write-test").write_text("")
        (Path(out) / ".write-test").unlink()
    except OSError as err:
        print(f"error: cannot write the report to {out} ({err.strerror}); choose a writable folder with --out", file=sys.stderr)
        return 2
    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_store(uri, creating=False)
        from analysis.pipeline import run_analysis  # (torch, grad-cam, matplotlib: not for --help or a refused flag)

        run_analysis(args.experiment, uri, out, args.threshold,
                     args.baseline, args.variant, args.layer, gallery, args.max_cams, args.sweep, not args.no_log,
                     args.corruption_images, args.road_images, args.workers, args.adversarial_images, args.pgd_steps, args.pgd_step_size,
                     args.allow_data_mismatch, args.corruption_data, args.cache_dir)
    except (InputError, PublishedArraysError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
