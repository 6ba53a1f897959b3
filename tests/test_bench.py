"""``python -m bench`` at toy sizes: every figure the performance section quotes is printed."""
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tracking.private_apis import cpu_native_bf16


def test_benchmark_prints_every_figure():
    out = subprocess.run([sys.executable, "-m", "bench", "--images", "32", "--workers", "0", "--rounds", "1", "--overhead-trials", "2", "--overhead-epochs", "1",
                          "--overhead-images", "128", "--gradcam-images", "16", "--corruption-images", "20", "--auth-requests", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for model in ("plain_cnn", "residual_cnn", "se_cnn", "resnet18"):  # 1. stresslab vs reference, with the ratio
        assert re.search(rf"^\s+{model}\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\d$", text, re.M), text
    assert "1b. fp32 vs bf16 autocast on this CPU (" in text  # 1b. each model's loop and bare step in both precisions
    both = r"(\s+\d+\.\d){2}\s+\d+\.\d\d(\s+\d+\.\d){2}\s+\d+\.\d\d$"  # fp32, bf16 and their ratio, for the loop and the bare step
    fp32_only = r"\s+\d+\.\d\s+-\s+-\s+\d+\.\d\s+-\s+-$"
    native = cpu_native_bf16()  # without it, bf16 is emulated (0.08x here on an AVX2 EPYC) and timed on plain_cnn alone
    assert ("no native bf16: trials train in fp32; bf16 (emulated) timed on plain_cnn only" in text) is not native, text
    for model in ("plain_cnn", "residual_cnn", "se_cnn", "resnet18"):
        assert re.search(rf"^\s+{model}{both if native or model == 'plain_cnn' else fp32_only}", text, re.M), text
    assert re.search(r"plain process pool: \d+\.\d s \(\d+\.\d s before the sweep, its processes' start included, \+ \d+\.\d s after; a trial \d+\.\d s", text), text  # 2.
    assert re.search(r"Ray Tune \+ MLflow sweep: \d+\.\d s \(first trial started after \d+\.\d s", text), text
    assert re.search(r"overhead: \d+\.\d% of the sweep's wall time", text), text  # a sweep cannot cost less than the plain pool
    assert len(re.findall(r"^\s+(plain_cnn|resnet18)\s+\d+\.\d images/s$", text, re.M)) == 2, text  # 3. Grad-CAM
    assert "4. model-FLOPs utilisation (FLOPs per training image counted by FlopCounterMode)" in text  # 4. MFU (n/a without CUDA)
    assert "n/a: no CUDA device" in text or "TFLOP/s achieved" in text
    timed = re.findall(r"^\s+([a-z_]+)\s+\d+\.\d\d s", text, re.M)  # 5. every corruption's generation time, then the total
    assert len(timed) == 20 and timed[-1] == "total" and re.search(r"total\s+\d+\.\d\d s\s+\(target <= 30 s for 1,000 images: (met|NOT met)\)", text), text
    # 6. the basic-auth server, without and with stresslab's login cache: a wrong password is refused (401) after the
    # right one was cached; the cached login skips the password hash (about 0.2 s of CPU a check), so requests are
    # many times faster (30x on the development machine), which shows the server read the setting
    served = re.findall(r"^\s+(no login cache \(MLflow's default\)|login cache 3600 s \(stresslab's auth.ini\))\s+(\d+\.\d) ms a request"
                        r"\s+\(a wrong password after it: 401 in \d+ ms\)$", text, re.M)
    assert [label for label, _ in served] == ["no login cache (MLflow's default)", "login cache 3600 s (stresslab's auth.ini)"], text
    assert float(served[0][1]) > 3 * float(served[1][1]), text


def test_an_mlflow_server_that_cannot_start_is_named_with_its_log(tmp_path):
    """bench.servers (the bench's and the tests' MLflow servers): a server that exits is reported with its log, not
    waited for until the timeout, and the servers started beside it are stopped."""
    from bench.servers import Server, mlflow_servers

    good = Server(["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'good.db'}"], log=tmp_path / "good.log")
    bad = Server(["server", "--backend-store-uri", "nosuchscheme://x"], log=tmp_path / "bad.log")
    seen = []
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"`mlflow server --backend-store-uri nosuchscheme://x` did not start at http://127\.0\.0\.1:\d+; its log: .*bad\.log"):
        with mlflow_servers(good, bad, timeout_s=300) as bases:
            seen.extend(bases)
    assert time.monotonic() - start < 120 and not seen
    assert "nosuchscheme" in (tmp_path / "bad.log").read_text()
    import psutil

    left = [proc.pid for proc in psutil.process_iter(["cmdline"]) if any(str(tmp_path) in part for part in proc.info["cmdline"] or [])]
    assert not left, left  # the good server (and its worker) stopped with the bad one
