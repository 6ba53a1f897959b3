"""Each private Ray or MLflow API stresslab uses (all in tracking/private_apis.py), pinned: these fail when an upgrade
moves or changes one, where the sweep would otherwise break or degrade silently."""
import inspect
from pathlib import Path

import ray


def test_ray_worker_log_dispatcher_and_printer_are_where_worker_logs_to_expects_them():
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    assert list(inspect.signature(worker.print_worker_logs).parameters)[:2] == ["data", "print_file"]
    assert callable(dispatcher.add_handler) and callable(dispatcher.remove_handler) and isinstance(dispatcher.handlers, list)


def test_ray_gcs_client_answers_internal_kv_get_with_a_timeout():
    from ray._raylet import GcsClient, InnerGcsClient  # GcsClient forwards its calls to the inner client

    assert hasattr(GcsClient, "__getattr__")
    assert list(inspect.signature(InnerGcsClient.internal_kv_get).parameters) == ["self", "key", "namespace", "timeout"]


def test_ray_still_knows_the_system_config_key_a_local_sweep_sets():
    from tracking.private_apis import LOCAL_RAY_SYSTEM_CONFIG

    raylet = next(Path(ray.__file__).parent.glob("_raylet*.so")).read_bytes()  # Ray's C++ config names are compiled in
    for key in LOCAL_RAY_SYSTEM_CONFIG:
        assert key.encode() in raylet, key


def test_mlflow_system_metrics_monitor_takes_what_a_trial_passes():
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    parameters = inspect.signature(SystemMetricsMonitor).parameters
    assert {"run_id", "sampling_interval", "resume_logging", "tracking_uri"} <= set(parameters)
    assert callable(SystemMetricsMonitor.start) and callable(SystemMetricsMonitor.finish)
    for name in ("collect_metrics", "aggregate_metrics", "publish_metrics"):  # finish_system_metrics' last sample
        assert callable(getattr(SystemMetricsMonitor, name)), name
    source = inspect.getsource(SystemMetricsMonitor.__init__)
    assert "self._logging_step" in source and "self.mlflow_logger" in source


def test_torch_still_reports_the_cpus_bf16_support():
    import torch

    from tracking.private_apis import cpu_bf16_unit, cpu_native_bf16

    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool) and isinstance(torch.cpu._is_amx_tile_supported(), bool)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if flags:  # what Linux says of the CPU agrees with what torch says
        assert cpu_native_bf16() == ("avx512_bf16" in flags or "amx_tile" in flags)
        assert cpu_bf16_unit() == ("AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None)
