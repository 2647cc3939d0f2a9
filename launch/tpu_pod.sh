#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod slice (multi-host JAX).
#
#   launch/tpu_pod.sh -t TPU_NAME -z ZONE [-p PROJECT] [-r REMOTE_DIR] [--setup] -- CMD [ARGS...]
#
#   e.g. launch/tpu_pod.sh -t my-v5e-32 -z us-west4-a --setup -- \
#          python -m fairjax.train --distributed --config configs/popalign_sdxl.py \
#          --workdir /mnt/shared/runs/popalign_sdxl
#
# --setup  first copies this checkout (tracked files, via `git ls-files`) to REMOTE_DIR on
#          every worker and runs `pip install -e ".[data]" "jax[tpu]"` there.
# Then runs `cd REMOTE_DIR && CMD` on all workers at once (gcloud ... ssh --worker=all).
# On a TPU pod `jax.distributed.initialize()` needs no arguments (fairjax.train --distributed
# calls it): every worker finds the others through the TPU metadata.
#
# Requirements and notes:
#  * --workdir must be a directory ALL workers see (a Filestore/NFS mount, or a bucket
#    mounted with gcsfuse): orbax writes each host's shards there and restores from it.
#  * Preemption / maintenance: TPU VMs get SIGTERM; the trainer saves a checkpoint at the
#    next step boundary and exits 0.  Re-run the same command to resume.
#  * Environment variables forwarded to the workers: anything in FAIRJAX_ENV, e.g.
#    FAIRJAX_ENV="XLA_FLAGS=--xla_tpu_enable_async_collective_fusion=true" launch/tpu_pod.sh ...
set -euo pipefail

TPU=""; ZONE=""; PROJECT=""; REMOTE_DIR="fairjax"; SETUP=0
usage() { sed -n '2,24p' "$0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -t) TPU="$2"; shift 2 ;;
    -z) ZONE="$2"; shift 2 ;;
    -p) PROJECT="$2"; shift 2 ;;
    -r) REMOTE_DIR="$2"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see $0 --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "error: -t TPU_NAME and -z ZONE are required (see $0 --help)" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "error: no command given after -- (see $0 --help)" >&2; exit 2; }
command -v gcloud >/dev/null || { echo "error: gcloud not found; install the Google Cloud SDK and run gcloud auth login" >&2; exit 2; }

GC=(gcloud compute tpus tpu-vm)
WHERE=("$TPU" --zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")

if [[ $SETUP -eq 1 ]]; then
  ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  TARBALL="$(mktemp -t fairjax-src-XXXXXX).tar.gz"
  (cd "$ROOT" && git ls-files -z | tar --null -czf "$TARBALL" -T -)
  "${GC[@]}" scp "${WHERE[@]}" --worker=all "$TARBALL" "$TPU:/tmp/fairjax-src.tar.gz"
  "${GC[@]}" ssh "${WHERE[@]}" --worker=all --command \
    "mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -xzf /tmp/fairjax-src.tar.gz -C $(printf '%q' "$REMOTE_DIR") && \
     cd $(printf '%q' "$REMOTE_DIR") && python3 -m pip install -q -e '.[data]' 'jax[tpu]'"
  rm -f "$TARBALL"
fi

CMD="cd $(printf '%q' "$REMOTE_DIR") && ${FAIRJAX_ENV:+env $FAIRJAX_ENV }$(printf '%q ' "$@")"
echo "tpu_pod: running on all workers of $TPU: $CMD" >&2
exec "${GC[@]}" ssh "${WHERE[@]}" --worker=all --command "$CMD"
