"""Every use of a private Ray, MLflow or torch API, in one place, each with why no public one does, and each pinned by
``tests/test_private_apis.py``, which fails when an upgrade moves or changes it (rather than the sweep, silently).

- ``worker_logs_to``: Ray routes the trials' forwarded output through a handler ``ray.init`` installs; no public API
  redirects it (``log_to_driver=False`` drops it instead).
- ``refuses_token``: whether a cluster refuses this driver's token, asked in one RPC; ``ray.init`` retries a refused
  token for minutes and then says only "failed to connect".
- ``LOCAL_RAY_SYSTEM_CONFIG``: Ray prestarts a worker per CPU for the first driver; a sweep's runtime_env makes its
  trial actors need workers of their own, so those would boot and exit beside them (~2 CPU-s on 2 cores). Only
  ``ray.init``'s private ``_system_config`` turns it off.
- ``cpu_bf16_unit``, ``cpu_native_bf16``: which unit of this CPU computes bf16 natively (AMX or AVX512-BF16), if any,
  as torch's own CPU dispatch sees it; torch answers only through ``torch.cpu._is_*_supported`` (``get_cpu_capability`` says AVX512, not BF16).
- ``system_metrics_monitor``, ``finish_system_metrics``: MLflow's public switch (``log_system_metrics=True``) works for
  fluent runs started in the process; a trial logs to a run the driver created, through ``MlflowClient``, so the monitor
  is started directly. Its loop publishes a sample only after a whole sampling interval, and drops the one in hand on
  shutdown: a trial shorter than that would log none, so the finish publishes one last sample where none was.
"""
from __future__ import annotations

from pathlib import Path

LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}


def worker_logs_to(log: Path) -> None:
    """The trials' output that Ray forwards to this driver goes to ``log``, every line (no "[repeated Nx]"
    folding), for as long as Ray runs: its last lines arrive after the sweep has returned, when stdout is the terminal
    again, and Ray printed its folded lines there at shutdown. No public API routes them: this swaps the handler
    ray.init(log_to_driver=True) installs."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # (log_to_driver=False, or no Ray yet)
        return

    def to_log(data: dict) -> None:
        try:
            with open(log, "a") as sink:
                ray_worker.print_worker_logs(data, sink)
        except OSError:  # the launch's folder is gone (a sweep into a temporary folder, then deleted): nothing to keep
            pass

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_log)


def refuses_token(address: str) -> bool:
    """Whether the GCS at ``address`` answers this process's token with InvalidAuthToken (one RPC, seconds at most)."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address).internal_kv_get(b"stresslab-probe", None, timeout=5)
    except AuthenticationError:
        return True
    except Exception:  # any other outcome: not a token problem
        return False
    return False


def system_metrics_monitor(run_id: str, interval: float, resume: bool, tracking_uri: str):
    """A started MLflow system-metrics monitor (CPU, memory, GPU where available) logging to ``run_id``."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=tracking_uri)
    monitor._start_step = monitor._logging_step  # (where a resumed trial's steps go on from)
    monitor.start()
    return monitor


def cpu_bf16_unit() -> str | None:
    """The unit of this CPU that computes bf16 natively as torch sees it: ``AMX`` (tiles: Sapphire Rapids and later),
    ``AVX512-BF16`` (Zen 4, Cooper Lake and later), or None, where bf16 autocast is emulated and slower than fp32."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    return "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else None


def cpu_native_bf16() -> bool:
    """Whether torch sees native bf16 on this CPU (``cpu_bf16_unit``)."""
    return cpu_bf16_unit() is not None


def finish_system_metrics(monitor) -> None:
    """Stop the monitor; where it published nothing yet (a trial shorter than one sampling interval), one sample now."""
    started_at = getattr(monitor, "_start_step", 0)
    monitor.finish()
    if monitor._logging_step == started_at:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
