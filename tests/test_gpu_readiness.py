"""What can be proven about the GPU path without a GPU: no host-device traffic per training step, FLOPs counted
per model, GPU requests checked per node, the GPU proof's command, and trials scheduled on declared GPUs."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAULT_SUMMARY, ROOT, TINY, mlflow_service, write_experiments

# Every Python-level way a training step could wait for the device (counted wherever called, torch included) ...
SYNCS = {torch.Tensor: ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")}
# ... or move data between host and device (counted where stresslab calls them: torch's own ``norm.to(first_device)``
# in clip_grad_norm_ moves between tensors already on one device).
MOVES = {torch.Tensor: ("to", "cpu", "cuda", "pin_memory"), torch: ("tensor", "as_tensor", "from_numpy")}


def ours(filename: str) -> bool:
    return filename.startswith(str(ROOT)) and not filename.startswith((str(ROOT / ".venv"), str(ROOT / "tests")))


class TransferCounter:
    """Counts calls of SYNCS (anywhere) and MOVES (from the project's code) while active, by name."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for table, anywhere in ((SYNCS, True), (MOVES, False)):
            for owner, names in table.items():
                for name in names:
                    monkeypatch.setattr(owner, name, self._counted(getattr(owner, name), name, anywhere))

    def _counted(self, fn, name, anywhere):
        counter = self

        def wrapper(*args, **kwargs):
            if anywhere or ours(sys._getframe(1).f_code.co_filename):
                counter.calls.append(name)
            return fn(*args, **kwargs)

        return wrapper


def config(**overrides):
    from config.settings import TrialConfig
    from config.schema import build

    problems: list = []
    base = {k: v for k, v in TINY.items() if k not in ("resources", "max_failures")}
    cfg = build(TrialConfig, {**base, **overrides}, "", problems)
    assert not problems, problems
    return cfg


@pytest.mark.parametrize("augment", ["cutout", "none"])
def test_a_training_step_moves_nothing_between_host_and_device(monkeypatch, augment):
    """train_epoch as the trial runs it (schedule, grad clip, crop/flip/cutout): the host-device calls of an epoch do
    not grow with its steps (4 vs 8 steps), so a step makes none; the epoch reads its loss and accuracy once."""
    from data_zoo import Augmenter, load_bundle
    from training.engine import Precision, build_optimizer, build_scheduler, epoch_generator, train_epoch
    from model_zoo import create_model

    counts = {}
    for n_train in (256, 512):
        cfg = config(batch_size=64, augment=augment, grad_clip=1.0, data={"name": "synthetic", "n_train": n_train, "n_test": 32, "val_fraction": 0.0})
        bundle = load_bundle(dataclasses.asdict(cfg.data))
        model = create_model(cfg.arch, 10, **cfg.model)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, len(bundle.train))
        augmenter = Augmenter(cfg.augment, fill=bundle.black())
        augmenter(bundle.normalise(bundle.train.x[:2]), epoch_generator(0, 9))  # the fill's one-off placement on the device
        with monkeypatch.context() as patch:
            counter = TransferCounter(patch)
            train_epoch(model, bundle, cfg, optimizer, Precision(None, None), epoch_generator(0, 0), augmenter, torch.device("cpu"), scheduler)
        counts[n_train] = sorted(counter.calls)
    assert counts[256] == counts[512], counts  # 4 and 8 steps: the same calls, so none per step
    assert counts[256] == ["item", "item"], counts  # loss and accuracy, once per epoch


def test_epoch_generator_lives_on_the_training_device_and_replays_exactly():
    from data_zoo import Augmenter
    from training.engine import epoch_generator

    assert epoch_generator(1, 2).device.type == "cpu"
    x = torch.randn(16, 3, 32, 32)
    aug = Augmenter("cutout")
    assert torch.equal(aug(x, epoch_generator(1, 2)), aug(x, epoch_generator(1, 2)))
    assert not torch.equal(aug(x, epoch_generator(1, 2)), aug(x, epoch_generator(1, 3)))


def test_counted_flops_match_the_published_resnet18_cost():
    """CIFAR ResNet-18: 0.56 GMACs = 1.11 GFLOPs forward per 32x32 image, about 3x that per training image."""
    from bench.__main__ import training_flops

    forward, train = training_flops("resnet18")
    assert forward == pytest.approx(1.11e9, rel=0.01)
    assert train == pytest.approx(3.33e9, rel=0.01)


def test_gpu_proof_documents_itself_and_refuses_to_run_without_a_gpu(capsys):
    from bench.gpu_proof import main as gpu_proof

    helped = subprocess.run([sys.executable, "-m", "bench", "--gpu-proof", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--gpu-proof" in helped.stdout and "cifar10-jpeg.tar.gz" in helped.stdout
    assert gpu_proof([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err  # (in this process: the entry point is shown above)


def test_local_stores_are_named_as_visible_to_one_node_only(tmp_path):
    from launch.checks import filesystem_type, shared_storage_warnings

    assert filesystem_type(Path("/proc/self")) == "proc"
    warnings = shared_storage_warnings(f"sqlite:///{tmp_path}/mlruns/mlflow.db", str(tmp_path / "ray"))
    assert len(warnings) == 2 and "a local SQLite MLflow store" in warnings[0] and "--storage" in warnings[1]
    assert shared_storage_warnings("http://head:5000", "s3://bucket/ray") == []


# --- A cifar10-stress-shaped grid on a two-node Ray cluster that declares GPUs, logged to a real MLflow server ---

GRID = {"arch": ["plain_cnn", "residual_cnn"], "augment": ["none", "cutout"], "seed": [1]}
TRIALS = 4
GPU_PER_TRIAL = 0.5


@pytest.fixture(scope="module")
def declared_gpu_sweep(tmp_path_factory):
    """Two Ray nodes of 1 CPU and 2 declared GPUs each (ray.cluster_utils.Cluster); `mlflow server` with SQLite and
    proxied artifacts; the CLI sweep through --address, then the analysis through the server's URL."""
    import mlflow
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("gpus")
    cluster_file = Path("/tmp/ray/ray_current_cluster")
    before = cluster_file.read_text() if cluster_file.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2})
    try:
        cluster.add_node(num_cpus=1, num_gpus=2)
        cluster.wait_for_nodes()
        path = write_experiments(tmp / "e.yaml", {"stress": {"resources": {"cpu": 0.5, "gpu": GPU_PER_TRIAL}, "log_model": True, "grid": GRID},
                                                  "too-big": {"resources": {"cpu": 0.25, "gpu": 3}}})
        with mlflow_service("server", f"sqlite:///{tmp / 'server.db'}", artifacts=tmp / "artifacts") as base:
            env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "xdg")}  # the analyses' artifact cache: tmp/xdg/stresslab/artifacts
            cli = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
            common = ["--config", str(path), "--address", cluster.address, "--tracking-uri", base, "--storage", str(tmp / "ray")]
            swept = cli("sweep.py", "--experiment", "stress", *common)
            refused = cli("sweep.py", "--experiment", "too-big", *common)
            analyse = lambda out: cli("-m", "analysis", "--experiment", "stress", "--tracking-uri", base, "--out", str(tmp / out), "--no-log",
                                      "--corruption-images", "0", "--road-images", "4", "--max-cams", "2", "--adversarial-images", "0")
            analysed, again = analyse("report"), analyse("report-2")
            client = mlflow.MlflowClient(base)
            runs = client.search_runs([client.get_experiment_by_name("stress").experiment_id], "tags.`stresslab.kind` = 'trial'")
            yield {"swept": swept, "refused": refused, "analysed": analysed, "again": again, "client": client, "runs": runs, "tmp": tmp}
    finally:
        cluster.shutdown()
        if before is None:
            cluster_file.unlink(missing_ok=True)
        else:
            cluster_file.write_text(before)


def test_every_trial_finishes_on_the_server_with_its_metrics_and_artifacts(declared_gpu_sweep):
    from tracking import metrics

    s = declared_gpu_sweep
    assert s["swept"].returncode == 0, s["swept"].stdout[-3000:] + s["swept"].stderr[-3000:]
    assert len(s["runs"]) == TRIALS and all(r.info.status == "FINISHED" for r in s["runs"])
    missing = 0
    for run in s["runs"]:
        for key in metrics.EPOCH_METRICS:
            missing += [m.step for m in s["client"].get_metric_history(run.info.run_id, key)] != [1, 2]
        missing += sum(key not in run.data.metrics for key in metrics.FINAL_METRICS)
        assert "predictions.npz" in {a.path for a in s["client"].list_artifacts(run.info.run_id)}
    models = s["client"].search_logged_models([s["runs"][0].info.experiment_id])  # each trial's model, proxied by the server
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in s["runs"])
    assert missing == 0
    FAULT_SUMMARY.append(f"{TRIALS} concurrent trials, 2 nodes, MLflow server   trials affected: {TRIALS}  metrics counted: "
                         f"{TRIALS * (2 * len(metrics.EPOCH_METRICS) + len(metrics.FINAL_METRICS))}  results lost: {missing}")
    assert "--storage" in s["swept"].stderr and "visible to this node only" in s["swept"].stderr


def test_trials_pack_at_most_one_over_gpu_per_declared_gpu_and_spread_over_gpus_and_nodes(declared_gpu_sweep):
    runs = declared_gpu_sweep["runs"]
    placements = []
    for run in runs:
        tags = run.data.tags
        assert tags["ray.gpu_ids"] and tags["ray.node_id"] and tags["ray.host"], tags
        for gpu in tags["ray.gpu_ids"].split(","):
            placements.append(((tags["ray.node_id"], gpu), run.info.start_time, run.info.end_time))
    assert len(placements) == len(runs)  # half a GPU each: one id per trial
    for gpu in {p[0] for p in placements}:  # at every trial start, count the trials running on that GPU
        spans = [(start, end) for g, start, end in placements if g == gpu]
        assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 1 / GPU_PER_TRIAL
    assert len({p[0] for p in placements}) >= 2  # spread over the declared GPUs
    assert len({p[0][0] for p in placements}) == 2  # and over both nodes


def test_a_trial_larger_than_any_node_is_refused_though_the_cluster_total_would_fit(declared_gpu_sweep):
    refused = declared_gpu_sweep["refused"]
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "3 GPU per trial but the largest node of this cluster has 2" in refused.stderr


def test_analysis_runs_against_the_tracking_server_and_a_second_one_downloads_nothing(declared_gpu_sweep):
    """Through the server, artifacts are downloaded once into the user cache ($XDG_CACHE_HOME/stresslab/artifacts), never
    into --out; a second analysis into another --out reads them all from the cache."""
    tmp = declared_gpu_sweep["tmp"]
    for key, out in (("analysed", "report"), ("again", "report-2")):
        done = declared_gpu_sweep[key]
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp / out / "report.html").stat().st_size > 0
        assert not [p for p in (tmp / out).rglob("*") if p.suffix in (".pt", ".pt2") or p.name.startswith(".artifacts")], out
    def counts(stdout: str) -> dict[str, int]:  # "artifacts: 0 read in place (0.0 MB), 5 from the cache (1.2 MB), 12 downloaded (3.4 MB); cache ..."
        line = next(line for line in stdout.splitlines() if "artifacts: " in line and " downloaded (" in line)
        return {how: int(n) for n, how in re.findall(r"(\d+) (read in place|from the cache|downloaded) \(", line)}

    first, second = counts(declared_gpu_sweep["analysed"].stdout), counts(declared_gpu_sweep["again"].stdout)
    assert first["read in place"] == second["read in place"] == 0  # the server's proxied artifacts are not a local folder
    assert first["downloaded"] == TRIALS * 3, first  # each trial's config, predictions and logged model, once
    assert second["downloaded"] == 0 and second["from the cache"] >= TRIALS * 3, second
    pt2 = list((tmp / "xdg" / "stresslab" / "artifacts" / "models").rglob("model.pt2"))
    assert len(pt2) == TRIALS
