#!/usr/bin/env bash
# One Ray node of a stresslab Slurm job: started by slurm/sweep.sbatch with `srun`, one task per node, it runs
# `ray start --block` with this node's CPU and GPU counts from the allocation and a temp dir of its own on node-local
# storage, labelled with its Slurm node name (the batch script waits for every label), and removes that temp dir,
# Ray's cluster-address file included, when Ray stops (SIGTERM from the batch script, scancel or the time limit).
#
#   ray-node.sh head HEAD_IP PORT        the head (GCS on HEAD_IP:PORT, no dashboard)
#   ray-node.sh worker HEAD_IP PORT      a node joining it
#
# Environment from the batch script: STRESSLAB_PYTHON, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, STRESSLAB_TMP.
set -uo pipefail
role=$1 head_ip=$2 port=$3
py=${STRESSLAB_PYTHON:?set by slurm/sweep.sbatch}
node=${SLURMD_NODENAME:-$(hostname -s)}
tmp="${STRESSLAB_TMP:-${TMPDIR:-/tmp}}/ray-${SLURM_JOB_ID:-0}-$node"
free_port() { "$py" "$(dirname "$0")/free_port.py"; }

gpus=0  # the GPUs Slurm gave this job on this node, never every GPU the node has
if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    gpus=$SLURM_GPUS_ON_NODE
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
args=(--block --disable-usage-stats --temp-dir "$tmp" --num-cpus "${SLURM_CPUS_ON_NODE:-1}" --num-gpus "$gpus"
      --labels "slurm-node=$node" --dashboard-agent-listen-port "$(free_port)")
if [ "$role" = head ]; then
    args+=(--head --node-ip-address "$head_ip" --port "$port" --include-dashboard false)
else
    args+=(--address "$head_ip:$port")
fi

rm -rf "$tmp" && mkdir -p "$tmp"  # what a SIGKILLed earlier start of this job left
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0  # no 30 s drain on SIGTERM: the driver has stopped by then (or died with the job)
setsid "$py" -m ray.scripts.scripts start "${args[@]}" &
ray_pid=$!  # leader of its own process group, with Ray's daemons and workers
stop() {    # SIGTERM to the whole group (`ray start --block` shuts Ray down on it), SIGKILL to what is left after 10 s
    local i
    kill -TERM -- "-$ray_pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do kill -0 -- "-$ray_pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL -- "-$ray_pid" 2>/dev/null
}
trap stop TERM INT HUP USR2  # USR2: the batch script's stop (srun forwards it; srun itself kills on SIGTERM)
wait "$ray_pid"
while kill -0 "$ray_pid" 2>/dev/null; do wait "$ray_pid"; done  # a trapped signal ends the first wait early
stop
rm -rf "$tmp"
