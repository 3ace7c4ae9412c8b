#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, install this repo on every worker, run the trainer on all of them at
# once, stream their logs, delete the slice.
#
#   launch/tpu_pod.sh [OPTIONS] COMMAND [-- TRAINER_ARGS...]
#
# Commands:
#   create   create the slice (gcloud compute tpus tpu-vm create)
#   setup    copy this working tree to every worker and pip-install it with jax[tpu]
#   train    run `python -m flamingo_jax.train --distributed=on TRAINER_ARGS` on every worker (--worker=all) and
#            stream all workers' output, each line prefixed with the worker's hostname; with --detach, start it
#            under nohup (it survives the ssh session) and return
#   logs     follow the detached run's log on every worker
#   stop     send SIGTERM to the detached trainer on every worker
#   delete   delete the slice
#   up       create, setup, train (add --delete-after to delete the slice when training ends, success or not)
#
# Options (or the environment variable in brackets):
#   --name NAME             slice name [TPU_NAME, default flamingo-pod]
#   --zone ZONE             [ZONE, default us-central2-b]
#   --accelerator TYPE      e.g. v4-32, v5litepod-16, v5p-64 [ACCELERATOR_TYPE, default v4-32]
#   --version VERSION       TPU VM runtime [RUNTIME_VERSION, default tpu-ubuntu2204-base]
#   --project PROJECT       [PROJECT, default: gcloud's configured project]
#   --spot                  create a Spot slice (preemptible: the trainer resumes from its workdir checkpoint)
#   --detach                train: run in the background, see `logs`
#   --delete-after          up: delete the slice when training ends
#   --dry-run               print the commands instead of running them
#
# Every worker runs the same command: JAX's multi-controller runtime. `--distributed=on` makes the trainer call
# jax.distributed.initialize(), which finds the coordinator, process count and id from the TPU metadata server.
# The workdir must be shared by all workers, i.e. on GCS (setup installs gcsfs and google-cloud-storage for it).
# The built datasets and the tokenizer are read from local paths, the same on every worker (a persistent disk
# attached read-only to all of them, or a copy made with `gcloud ... ssh --worker=all`):
#
#   launch/tpu_pod.sh --accelerator=v4-32 up --delete-after -- \
#       --config=configs/flamingo_3b.py --workdir=gs://BUCKET/runs/f3b --config.data.tokenizer=/data/tok.model
#
# Only process 0 writes metrics and TensorBoard; every process writes its shards of each checkpoint.
set -euo pipefail

TPU_NAME="${TPU_NAME:-flamingo-pod}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
SPOT=0
DETACH=0
DELETE_AFTER=0
DRY_RUN=0
REMOTE_DIR="flamingo_jax"             # under the worker's home directory
REMOTE_LOG="flamingo_train.log"       # detached runs write here, on every worker
REMOTE_PID="flamingo_train.pid"       # and their process group id here
JAX_SPEC='jax[tpu]>=0.9.0,<0.11'
GCS_SPECS="gcsfs google-cloud-storage"  # gs:// workdirs: etils.epath (metrics, checkpoints) and tensorboardX
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# run CMD...: the single place where anything happens; with --dry-run it only prints, shell-quoted.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

COMMAND=""
TRAINER_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --name) TPU_NAME="${2:?--name needs a value}"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --accelerator=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --accelerator) ACCELERATOR_TYPE="${2:?--accelerator needs a value}"; shift ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --version) RUNTIME_VERSION="${2:?--version needs a value}"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --delete-after) DELETE_AFTER=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAINER_ARGS=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "${COMMAND}" ]] || die "one command at a time (got ${COMMAND} and $1)"; COMMAND="$1" ;;
  esac
  shift
done
[[ -n "${COMMAND}" ]] || { usage; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="${ZONE}")
[[ -z "${PROJECT}" ]] || LOCATION+=(--project="${PROJECT}")

# on_all_workers COMMAND_STRING: one ssh per worker, in parallel; their output is streamed as it comes.
on_all_workers() {
  run "${GCLOUD[@]}" ssh "${TPU_NAME}" "${LOCATION[@]}" --worker=all --command="$1"
}

create() {
  local extra=()
  [[ "${SPOT}" == 0 ]] || extra+=(--spot)
  run "${GCLOUD[@]}" create "${TPU_NAME}" "${LOCATION[@]}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${RUNTIME_VERSION}" "${extra[@]}"
}

setup() {
  # The working tree as it is (tracked and untracked files, not what .gitignore excludes), so that what runs on
  # the pod is what was tested here, committed or not.
  local tarball="${TMPDIR:-/tmp}/flamingo_jax_${TPU_NAME}.tar.gz"
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "+ (cd ${REPO} && git ls-files -co --exclude-standard -z | tar --null -T - -czf ${tarball})"
  else
    (cd "${REPO}" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "${tarball}")
  fi
  run "${GCLOUD[@]}" scp "${tarball}" "${TPU_NAME}:flamingo_jax.tar.gz" "${LOCATION[@]}" --worker=all
  on_all_workers "set -e; rm -rf ~/${REMOTE_DIR}; mkdir -p ~/${REMOTE_DIR}; \
tar -xzf ~/flamingo_jax.tar.gz -C ~/${REMOTE_DIR}; cd ~/${REMOTE_DIR}; \
python3 -m pip install -q -U pip; python3 -m pip install -q -e . '${JAX_SPEC}' ${GCS_SPECS}; \
python3 -c 'import jax; print(jax.__version__, jax.local_device_count(), \"local TPU devices\")'"
}

train() {
  local quoted=""
  if [[ ${#TRAINER_ARGS[@]} -gt 0 ]]; then
    quoted="$(printf ' %q' "${TRAINER_ARGS[@]}")"
  fi
  local trainer="python3 -m flamingo_jax.train --distributed=on${quoted}"
  if [[ "${DETACH}" == 1 ]]; then
    # setsid: its own process group, which `stop` signals through the pid file.
    on_all_workers "cd ~/${REMOTE_DIR} && nohup setsid ${trainer} > ~/${REMOTE_LOG} 2>&1 < /dev/null & \
echo \$! > ~/${REMOTE_PID}; echo \"started on \$(hostname), pid \$!\""
  else
    # sed -u: line-buffered, so the streams of all workers interleave by line, each tagged with its host.
    on_all_workers "set -o pipefail; cd ~/${REMOTE_DIR} && ${trainer} 2>&1 | sed -u \"s/^/[\$(hostname)] /\""
  fi
}

logs() {
  on_all_workers "tail -n 50 -F ~/${REMOTE_LOG} | sed -u \"s/^/[\$(hostname)] /\""
}

stop() {
  # SIGTERM: the trainer saves a checkpoint at the next step boundary and exits.
  on_all_workers "test -f ~/${REMOTE_PID} && kill -TERM -- -\$(cat ~/${REMOTE_PID}) || echo \"no detached run on \$(hostname)\""
}

delete() {
  run "${GCLOUD[@]}" delete "${TPU_NAME}" "${LOCATION[@]}" --quiet
}

case "${COMMAND}" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  up)
    if [[ "${DELETE_AFTER}" == 1 ]]; then
      trap delete EXIT  # also when training fails or is interrupted: an idle slice still bills
    fi
    create
    setup
    train
    ;;
  *) die "unknown command ${COMMAND} (see --help)" ;;
esac
