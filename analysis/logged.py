"""The analysis kept in MLflow: a run of kind ``analysis`` in the experiment, with the output folder as its artifacts
and its main tables as MLflow tables (``mlflow.load_table`` reads them across runs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import tracking

if TYPE_CHECKING:
    import pandas as pd


def log_analysis_run(uri: str, experiment: str, out: Path, threshold: float, failures: list[dict] | None = None) -> str:
    """Log the output folder as artifacts of an MLflow run of kind ``analysis`` in the same experiment (FAILED if the upload fails)."""
    mlflow_client = tracking.client(uri)
    exp_id = tracking.ensure_experiment(mlflow_client, experiment, "", uri)
    run = tracking.retry(lambda: mlflow_client.create_run(exp_id, run_name=f"analysis-{out.name}", tags={tracking.KIND_TAG: "analysis", **tracking.environment_tags("analysis")}))
    status = "FAILED"
    try:
        mlflow_client.log_param(run.info.run_id, "threshold", threshold)
        for item in sorted(out.iterdir()):
            if item.name.startswith("."):
                continue
            if item.is_dir():
                tracking.retry(lambda: mlflow_client.log_artifacts(run.info.run_id, str(item), item.name))
            else:
                tracking.retry(lambda: mlflow_client.log_artifact(run.info.run_id, str(item)))
        import mlflow

        mlflow.set_tracking_uri(uri)  # log_table resolves the global URI
        for name, table in analysis_tables(out, failures or []).items():  # shown in the run's artifact view; mlflow.load_table reads them across runs
            tracking.retry(lambda: mlflow.log_table(table, f"{TABLES_DIR}/{name}.json", run_id=run.info.run_id))
        status = "FINISHED"
    finally:
        tracking.retry(lambda: mlflow_client.set_terminated(run.info.run_id, status=status))
    return run.info.run_id


TABLES_DIR = "tables"


def analysis_tables(out: Path, failures: list[dict]) -> dict[str, "pd.DataFrame"]:
    """The analysis's main tables, flat, from the JSON files it wrote: ``runs`` (one row per run), ``failures`` (one
    per confident failure, every run: ``failures``, each with its ``run_name`` and ``run_id``; the report folder lists
    only the shown ones), ``comparison_pairs`` (one per baseline/variant pair) and ``comparison_strata``
    (one per architecture stratum and pooled, with the seed churn beside it)."""
    import pandas as pd

    summary = json.loads((out / "summary.json").read_text())
    failures = [{k: v for k, v in f.items() if k != "position"} for f in failures]
    pairs, strata = [], []
    for path in sorted((out / "compare").glob("*/comparison.json")):
        result, comparison = json.loads(path.read_text()), path.parent.name
        pairs += [{"comparison": comparison, **{k: v for k, v in p.items() if k not in ("fixed", "still", "new", "mcnemar")},
                   "fixed": len(p["fixed"]), "still_failing": len(p["still"]), "new": len(p["new"]),
                   **{f"mcnemar_{k}": v for k, v in p["mcnemar"].items()}} for p in result["pairs"]]
        strata += [{"comparison": comparison, "stratum": r["stratum"], "pairs": r["pairs"], "delta_mean": r["delta"][0], "delta_std": r["delta"][1],
                    "delta_ci95_low": r["delta_ci95"][0], "delta_ci95_high": r["delta_ci95"][1], "fixed_mean": r["fixed"][0],
                    "new_mean": r["new"][0], "churn": json.dumps(r["churn"]), "beyond_churn": r["beyond_churn"], "verdict": r["verdict"]}
                   for r in result["strata"]]
    return {name: pd.DataFrame(rows) for name, rows in
            (("runs", summary["runs"]), ("failures", failures), ("comparison_pairs", pairs), ("comparison_strata", strata)) if rows}
