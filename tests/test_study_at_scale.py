"""Acceptance for the main study at its real size: the 36-trial cifar10-stress grid on synthetic data, 1 epoch, on a
local Ray that declares 4 GPUs (four trials share each), output not a terminal; then its report.

About 10 minutes on 2 cores (nine ResNet-18 trials), so marked ``slow``: ``pytest -m slow tests/test_study_at_scale.py``."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
SETTINGS = ["data.name=synthetic", "data.n_train=256", "data.n_test=128", "epochs=1", "resources.cpu=0.5", "schedule.milestones=[]",
            "robustness_images=20", "adversarial_images=20"]  # the trials' stress tests on 2 images a class (ResNet-18 on 2 cores: ~80 images/s)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2, "GPU": 4})}
    command = [sys.executable, str(ROOT / "sweep.py"), "--experiment", "cifar10-stress", "--tracking-uri", uri, "--storage", str(tmp / "ray"),
               *(arg for s in SETTINGS for arg in ("--set", s))]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(f"36-trial sweep: {time.perf_counter() - start:.0f} s")
    return done, uri, tmp


def test_the_driver_prints_a_compact_view_and_logs_rays_output(study):
    done, uri, tmp = study
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) <= 150, f"{len(lines)} lines:\n" + "\n".join(lines[:200])
    finished = [line for line in lines if re.match(r"\[\d+/36\] \S+  done", line)]
    assert len(finished) == 36 and finished[-1].startswith("[36/36]")
    assert "36/36 trials finished" in done.stdout
    status = [line for line in lines if line.startswith("sweep: ")]
    assert status and all("done" in line and "pending" in line for line in status)
    (log,) = (tmp / "ray").glob("cifar10-stress-*/launch.log")
    text = log.read_text()
    assert "Checkpoint successfully created" in text or "Trial status" in text, text[:2000]  # Ray's own output went here
    assert f"Ray's own output (trial tables, worker logs): {log}" in done.stdout


def test_the_final_hint_opens_the_runs_table(study):
    import mlflow

    done, uri, _ = study
    experiment = mlflow.MlflowClient(uri).get_experiment_by_name("cifar10-stress")
    assert f"then open http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs" in done.stdout
    # The route exists in the UI this MLflow ships (its router's path table).
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    assert any("experiments/:experimentId/runs" in f.read_text(errors="ignore") for f in bundle.glob("main.*.js"))


@pytest.fixture(scope="module")
def study_report(study):
    from analysis.pipeline import run_analysis

    _, uri, tmp = study
    out = tmp / "report"
    start = time.perf_counter()
    path = run_analysis("cifar10-stress", uri, out)  # the defaults of python -m analysis
    return path, out, time.perf_counter() - start


def test_the_report_of_36_runs_opens_on_its_conclusions(study_report):
    path, out, seconds = study_report
    text = path.read_text()
    weight = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and ".artifacts" not in f.parts)
    print(f"report of 36 runs: {seconds:.0f} s, HTML {len(text) / 1e6:.2f} MB, folder {weight / 1e6:.1f} MB")
    assert weight <= 15e6 and len(text) <= 1e6
    assert text.index("<h2 id='conclusions'>") < text.index("<h2 id='results'>") < text.index("<details id='run-")
    overview = text[text.index("<h2 id='results'>"):text.index("</table>", text.index("<h2 id='results'>"))]
    links = re.findall(r"<a href='#(run-[^']+)'>", overview)
    assert len(links) == 36 and all(f"<details id='{name}'>" in text for name in links)
    assert text.count("<details id='run-") == 36
    robustness = json.loads((out / "robustness.json").read_text())
    assert robustness["measured_in_trials"] == 36 and robustness["images"] == 20  # read from the trials, not recomputed
    attacked = json.loads((out / "adversarial.json").read_text())
    assert attacked["measured_in_trials"] == 36 and attacked["images"] == 20  # likewise


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--virtual-time-budget=10000"]


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="Debian's chromium package is not installed (apt-get install chromium)")
def test_chromium_shows_the_conclusions_on_the_first_screen(study_report, tmp_path):
    path, out, _ = study_report
    probe = out / "first_screen_probe.html"  # the report plus a script that measures where the conclusions end
    probe.write_text(path.read_text().replace("</body>", "<script>const ul = document.querySelector('.conclusions');"
                                              "document.body.dataset.bottom = Math.round(ul.getBoundingClientRect().bottom);</script></body>"))
    flags = [*CHROMIUM, f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    bottom = int(re.search(r'data-bottom="(\d+)"', dom).group(1))
    assert bottom <= 1000, f"the conclusions end at {bottom} px, below a 1000 px screen"
    shot = tmp_path / "report_first_screen.png"
    subprocess.run([*flags, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    if os.environ.get("STRESSLAB_SCREENSHOT_DIR"):
        __import__("shutil").copy(shot, os.environ["STRESSLAB_SCREENSHOT_DIR"])


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="Debian's chromium package is not installed (apt-get install chromium)")
def test_the_printed_url_opens_the_runs_table_in_chromium(study, tmp_path):
    from tests.conftest import mlflow_service

    done, uri, _ = study
    url = re.search(r"then open (http://127\.0\.0\.1:5000/\S+)", done.stdout).group(1)
    with mlflow_service("ui", uri) as base:
        dom = subprocess.run([*CHROMIUM, f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom", url.replace("http://127.0.0.1:5000", base)],
                             capture_output=True, text=True, timeout=120).stdout
    assert "Training runs" in dom and "cifar10-stress-20" in dom, dom[-2000:]  # the runs table, headed by the sweep's parent run
