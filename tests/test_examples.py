"""Every example command of the README, of docs/ and of the ``--help`` texts, run as written on a fresh copy of the checkout.

The copy holds the tracked files only (what a fresh clone has), with ``../shared`` beside it, so the README's own
unpack step provides the data. Commands that need what this machine lacks are listed with the reason instead
(a GPU, the network, a Ray cluster, a long-running server, an earlier state). One change is made to the copy: the
``quick`` experiment trains 1 epoch on 300 images (its YAML budget cut to toy size), so the sweep, its analysis,
rerun and registration run in minutes; the command lines themselves are not changed. Slow (minutes): ``pytest -m slow``.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, SHARED_JPEG_TAR

pytestmark = pytest.mark.slow

# (pattern, what the command needs that this test does not have), first match wins
NOT_HERE = [
    (r"pip install|-m venv", "setup: CI's own first step"),
    (r"-m pytest", "the test suite itself"),
    (r"--gpu-proof|gpu-proof/", "a CUDA GPU"),
    (r"^sbatch ", "a Slurm cluster (tests/test_slurm.py submits slurm/sweep.sbatch to a two-node test Slurm)"),
    (r"--address|HEAD|(^|\s|=)/shared/|ssh ", "a Ray cluster and shared storage"),
    (r"^source \.venv/bin/activate$", "the environment: the commands run with the test's own interpreter"),
    (r"mlflow (ui|server)", "a long-running server (the UI is rendered in tests/test_mlflow_native.py)"),
    (r"--tracking-uri http", "a running tracking server"),
    (r"--resume", "an interrupted sweep (tests/test_faults.py interrupts and resumes one)"),
    (r"-m analysis --experiment cifar10-stress", "a finished cifar10-stress sweep (a GPU study)"),
    (r"sweep.py --config experiments.yaml$|sweep.py .*--experiment quick$", "the network (torchvision downloads CIFAR-10)"),
]


def readme_commands() -> list[str]:
    """The shell commands of the README and of every page in docs/, in that order."""
    text = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in logical_lines(block)]


def help_commands() -> list[str]:
    found = []
    for module in (["sweep.py"], ["-m", "analysis"], ["-m", "data_zoo"], ["-m", "bench"]):
        out = subprocess.run([sys.executable, *module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
        found += [line for line in logical_lines(out) if re.match(r"(tar |python )", line)]
    return found


def logical_lines(block: str) -> list[str]:
    """Command lines of a shell block: continuations joined, comments and optional [..] parts dropped."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line.strip()) if not line.strip().startswith("#") else ""
        line = re.sub(r"\s*\[[^\]]*\]", "", re.sub(r"\s+", " ", line)).strip()
        if line:
            lines.append(line)
    return lines


def reason_not_run(command: str) -> str | None:
    return next((why for pattern, why in NOT_HERE if re.search(pattern, command)), None)


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    if not SHARED_JPEG_TAR.exists():
        pytest.skip(f"{SHARED_JPEG_TAR} not present")
    tmp = tmp_path_factory.mktemp("fresh")
    copy = tmp / "stresslab"
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    (tmp / "shared").symlink_to(ROOT.parent / "shared")
    experiments = yaml.safe_load((copy / "experiments.yaml").read_text())
    quick = experiments["experiments"]["quick"]
    quick.update(epochs=1, robustness_images=50, data={**quick.get("data", {}), "subset": 300, "test_subset": 200})
    (copy / "experiments.yaml").write_text(yaml.safe_dump(experiments, sort_keys=False))
    return copy


def test_every_example_command_runs_as_written(fresh_copy):
    same = lambda c: re.sub(r"^(\.venv/bin/)?python3? ", "python ", c)  # the README's .venv/bin/python is the help texts' python
    firsts: dict[str, str] = {}
    for command in readme_commands() + help_commands():
        firsts.setdefault(same(command), command)
    commands = list(firsts.values())
    ran, skipped, failed = [], [], []
    env = {**os.environ, "HOME": str(fresh_copy.parent / "home")}  # what a command writes under ~ (a login, Ray's token) stays here
    for command in commands:
        why = reason_not_run(command)
        if why:
            skipped.append(f"{command}  [needs {why}]")
            continue
        argv = re.sub(r"^(\.venv/bin/)?python3? ", f"{sys.executable} ", command)
        out = subprocess.run(argv, shell=True, cwd=fresh_copy, capture_output=True, text=True, timeout=900, env=env)
        (ran if out.returncode == 0 else failed).append(command)
        if out.returncode:
            failed[-1] += f"  -> exit {out.returncode}: {(out.stderr or out.stdout)[-1500:]}"
    print("ran:", *ran, "not run here:", *skipped, sep="\n  ")
    assert not failed, "\n".join(failed)
    assert any("--experiment quick --set data.name=imagefolder" in c for c in ran) and any("tar xzf" in c for c in ran)
    assert any("-m analysis --experiment quick" == c.split("python ")[-1] for c in ran) and any("--rerun-best" in c for c in ran)
