"""A record per launch: each launch writes ``<storage>/<sweep id>/stresslab.json`` (experiment, sweep id, kind, MLflow ids, status), so
``--resume`` finds the newest interrupted *sweep* of exactly that experiment, never a ``--rerun-best`` launch or
an experiment whose name merely starts the same.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from config.errors import InputError

RECORD_FILE = "stresslab.json"
FINISHED = "finished"


def write_record(storage: str, sweep: dict, status: str) -> None:
    """Create or update the launch record of ``sweep`` (atomically: a reader never sees half a file)."""
    folder = Path(storage) / sweep["sweep_id"]
    folder.mkdir(parents=True, exist_ok=True)
    record = {k: sweep[k] for k in ("experiment", "sweep_id", "kind", "tracking_uri", "experiment_id", "parent_run_id")} | {"status": status}
    tmp = folder / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / RECORD_FILE)


def read_records(storage: str) -> list[dict]:
    """Every launch record under ``storage`` with its Ray folder, oldest first (sweep ids carry the start time)."""
    out = []
    for path in Path(storage).glob(f"*/{RECORD_FILE}"):
        try:
            out.append(json.loads(path.read_text()) | {"path": str(path.parent)})
        except (OSError, ValueError):
            continue  # a record being replaced or damaged is not a launch to resume
    return sorted(out, key=lambda r: (r["sweep_id"].rsplit("-", 2)[-2:], r["sweep_id"]))


def sweeps(storage: str, name: str) -> list[dict]:
    """The launch records of the sweeps (not reruns) of experiment ``name`` under ``storage``, oldest first."""
    return [r for r in read_records(storage) if r["experiment"] == name and r["kind"] == "trial"]


def resume_target(storage: str, name: str) -> dict:
    """The newest sweep of experiment ``name`` that did not finish."""
    candidates = [r for r in sweeps(storage, name) if r["status"] != FINISHED]
    if not candidates:
        raise InputError(f"no interrupted sweep of {name!r} under {storage} to resume (launches that finished, --rerun-best launches and "
                         f"other experiments are never resumed); start one without --resume")
    return candidates[-1]
