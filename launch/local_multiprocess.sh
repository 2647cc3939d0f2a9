#!/usr/bin/env bash
# Run N copies of a command as one multi-process JAX job on this machine (CPU, gloo).
#
#   launch/local_multiprocess.sh [-n NPROC] [-d DEVICES_PER_PROC] [-p PORT] [-l LOG_DIR] -- CMD [ARGS...]
#   e.g. launch/local_multiprocess.sh -n 2 -d 2 -- python -m fairjax.train --distributed \
#            --config configs/popalign_mog.py --workdir runs/mog_mp
#
# Each process i gets FAIRJAX_COORDINATOR=127.0.0.1:PORT, FAIRJAX_NUM_PROCESSES=N,
# FAIRJAX_PROCESS_ID=i (read by fairjax.parallel.initialize_distributed, which also
# selects gloo CPU collectives), JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=D.  Process 0's output goes to
# stdout; process i>0 to LOG_DIR/proc_i.log (default: a temp dir, printed).
# SIGINT/SIGTERM are forwarded (as SIGTERM) to all processes (they save a checkpoint and stop).
# Exit status: the first non-zero status among the processes, else 0.
set -euo pipefail

NPROC=2
DEVICES=1
PORT=""
LOG_DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NPROC="$2"; shift 2 ;;
    -d) DEVICES="$2"; shift 2 ;;
    -p) PORT="$2"; shift 2 ;;
    -l) LOG_DIR="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (usage: $0 [-n N] [-d D] [-p PORT] [-l LOG_DIR] -- CMD ...)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "error: no command given (usage: $0 [-n N] [-d D] [-p PORT] [-l LOG_DIR] -- CMD ...)" >&2
  exit 2
fi
if [[ -z "$PORT" ]]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
fi
if [[ -z "$LOG_DIR" ]]; then
  LOG_DIR=$(mktemp -d -t fairjax-mp-XXXXXX)
fi
mkdir -p "$LOG_DIR"
echo "local_multiprocess: $NPROC processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR" >&2

PIDS=()
forward() {
  for pid in "${PIDS[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward TERM' INT  # background jobs of a script ignore SIGINT; send TERM

for ((i = 0; i < NPROC; i++)); do
  if [[ $i -eq 0 ]]; then
    FAIRJAX_COORDINATOR="127.0.0.1:$PORT" FAIRJAX_NUM_PROCESSES="$NPROC" FAIRJAX_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
      "$@" > >(tee "$LOG_DIR/proc_$i.log") 2>&1 &
  else
    FAIRJAX_COORDINATOR="127.0.0.1:$PORT" FAIRJAX_NUM_PROCESSES="$NPROC" FAIRJAX_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
      "$@" >"$LOG_DIR/proc_$i.log" 2>&1 &
  fi
  PIDS+=($!)
done

status=0
for pid in "${PIDS[@]}"; do
  # `wait` returns early when a trapped signal arrives; wait again until the process is gone.
  while true; do
    set +e
    wait "$pid"
    rc=$?
    set -e
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
done
if [[ $status -ne 0 ]]; then
  echo "local_multiprocess: a process failed (status $status); see $LOG_DIR/proc_*.log" >&2
fi
exit $status
