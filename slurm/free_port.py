"""Print a TCP port that is free now and that nothing else is likely to take before the server meant for it binds it.

A port from bind(("", 0)) comes from the kernel's ephemeral range, which every process binding port 0 and every
outgoing connection draws from: Ray's own daemons, starting meanwhile, did take one (measured in tests/test_slurm.py:
the MLflow server, 30 s from start to bind on a loaded machine, found its port held by a Ray gRPC server). So the port
is drawn between Ray's worker ports (10002-19999 by default) and the start of the ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range), where nothing draws ports at random.
"""
import random
import socket

LOW = 20000
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        high = int(f.read().split()[0]) - 1
except (OSError, ValueError, IndexError):
    high = 32767
candidates = random.sample(range(LOW, high + 1), min(200, high + 1 - LOW)) if high >= LOW else []
for port in [*candidates, 0]:  # 0: the kernel's choice, where that range is full or empty
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
