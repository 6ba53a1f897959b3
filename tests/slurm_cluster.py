"""A real two-node Slurm on this one machine, for the tests of ``slurm/sweep.sbatch``.

slurmctld and two ``slurmd -N n1`` / ``slurmd -N n2`` daemons (Debian's packages), both nodes at 127.0.0.1 on their
own ports, a munged of its own (own socket) for authentication; every daemon is started in its own process group and
stopped by that group, after the jobs still queued have been cancelled and have ended.
``python tests/slurm_cluster.py`` starts one and waits, for trying the script by hand (Ctrl-C stops it).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.servers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "mungekey")


def missing() -> list[str]:
    """The Slurm and munge programs this machine lacks (empty where the test cluster can run)."""
    return [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]


def write_conf(folder: Path, cpus: int) -> Path:
    ctld, n1, n2 = free_port(), free_port(), free_port()
    conf = f"""\
ClusterName=stresslabtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=20
MinJobAge=600
SchedulerParameters=sched_interval=1
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1} CPUs={cpus} RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""
    (folder / "state").mkdir(parents=True, exist_ok=True)
    path = folder / "slurm.conf"
    path.write_text(conf)
    for node in ("n1", "n2"):
        (folder / f"spool-{node}").mkdir(exist_ok=True)
    return path


def _start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def slurm_cluster(folder: Path, cpus: int = 1):
    """Yield the environment (SLURM_CONF set) in which sbatch/squeue/scontrol talk to a fresh two-node cluster."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLURM_CONF": str(write_conf(folder, cpus))}
    procs = []
    try:
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "-c"], check=True)
        procs.append(_start(["munged", "--foreground", "--force", f"--socket={folder}/munge.socket", f"--pid-file={folder}/munged.pid",
                             f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"], folder / "munged.out", env))
        procs.append(_start(["slurmctld", "-D", "-i"], folder / "slurmctld.out", env))
        for node in ("n1", "n2"):
            procs.append(_start(["slurmd", "-D", "-N", node], folder / f"slurmd-{node}.out", env))
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env).stdout
            if sorted(line.split()[1] for line in out.splitlines() if line.strip()) == ["idle", "idle"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test Slurm did not come up (sinfo: {out!r}); logs in {folder}")
            time.sleep(0.5)
        yield env
    finally:
        if len(procs) == 4:  # jobs still there (a failed test) run their own cleanup before the daemons go
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=env, capture_output=True)
            deadline = time.monotonic() + 60
            while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)
        for proc in reversed(procs):
            _stop(proc)


if __name__ == "__main__":
    import sys
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the daemons on kill as on Ctrl-C
    with slurm_cluster(Path(tempfile.mkdtemp(prefix="slurm-"))) as env:
        print(f"export SLURM_CONF={env['SLURM_CONF']}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
