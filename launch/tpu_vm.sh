#!/usr/bin/env bash
# Cloud TPU VM / pod slice: create, install the project on every worker, train, evaluate,
# follow the logs, delete. Every subcommand accepts --dry-run to print the exact gcloud
# commands instead of running them. create --check --config=... first compiles the config for
# the slice here (python -m rml_jax.bench --topology; needs libtpu, no TPU) and creates
# nothing when it does not fit or its batch does not split.
#
#   launch/tpu_vm.sh create --name=rml --zone=us-central2-b --accelerator=v4-32 \
#       [--check --config=configs/city.py]
#   launch/tpu_vm.sh setup  --name=rml --zone=us-central2-b
#   launch/tpu_vm.sh train  --name=rml --zone=us-central2-b --config=configs/digits.py \
#       --workdir=gs://my-bucket/rml/digits
#   launch/tpu_vm.sh eval   --name=rml --zone=us-central2-b --config=configs/digits.py \
#       --workdir=gs://my-bucket/rml/digits
#   launch/tpu_vm.sh logs   --name=rml --zone=us-central2-b
#   launch/tpu_vm.sh delete --name=rml --zone=us-central2-b
#
# Flags may also come from the environment: TPU_NAME, TPU_ZONE, TPU_PROJECT,
# TPU_ACCELERATOR, TPU_VERSION, RML_REPO (git URL of this project), RML_REF.
set -euo pipefail

# Prints the usage; exits with $1 (0 when asked for with --help, 2 after a bad call).
usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage 2
command_name=$1
shift
case $command_name in
  -h | --help | help) usage 0 ;;
esac

name=${TPU_NAME:-}
zone=${TPU_ZONE:-}
project=${TPU_PROJECT:-}
accelerator=${TPU_ACCELERATOR:-v4-8}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
repo=${RML_REPO:-}
ref=${RML_REF:-main}
config=""
workdir=""
dry_run=0
check=0
extra=()

for arg in "$@"; do
  case $arg in
    --name=*) name=${arg#*=} ;;
    --zone=*) zone=${arg#*=} ;;
    --project=*) project=${arg#*=} ;;
    --accelerator=*) accelerator=${arg#*=} ;;
    --version=*) version=${arg#*=} ;;
    --repo=*) repo=${arg#*=} ;;
    --ref=*) ref=${arg#*=} ;;
    --config=*) config=${arg#*=} ;;
    --workdir=*) workdir=${arg#*=} ;;
    --dry-run) dry_run=1 ;;
    --check) check=1 ;;
    --config.*) extra+=("$arg") ;;
    -h | --help) usage 0 ;;
    *) die "unknown argument '$arg' (see $0 --help)" ;;
  esac
done

[[ -n $name ]] || die "--name (or TPU_NAME) is required"
[[ -n $zone ]] || die "--zone (or TPU_ZONE) is required"

project_flag=()
[[ -n $project ]] && project_flag=(--project="$project")

# Prints the command (shell-quoted); runs it unless --dry-run.
run() {
  printf '%q ' "$@"
  printf '\n'
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

# Runs a shell command line on every worker of the slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project_flag[@]}" \
    --worker=all --command="$1"
}

main_command() {
  local mode=$1
  [[ -n $config ]] || die "--config is required for $mode"
  [[ -n $workdir ]] || die "--workdir is required for $mode (a gs:// path on a pod slice)"
  local line
  line="cd ~/rml_jax && . .venv/bin/activate && python -m rml_jax.main"
  line+=" --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir") --mode=$mode"
  local flag
  for flag in "${extra[@]}"; do
    line+=" $(printf '%q' "$flag")"
  done
  # One process per worker; jax.distributed.initialize() finds the slice's coordinator.
  line+=" 2>&1 | tee -a ~/rml_jax_$mode.log"
  on_all_workers "$line"
}

# Compiles the config for the accelerator here, before anything is created; its one-line error
# (and exit status 2) stops the script.
check_compile() {
  [[ -n $config ]] || die "--check needs --config (the config to compile for $accelerator)"
  run "${PYTHON:-python3}" -m rml_jax.bench --config="$config" --topology="$accelerator" \
    "${extra[@]}" || exit $?
}

case $command_name in
  create)
    [[ $check -eq 1 ]] && check_compile
    run gcloud compute tpus tpu-vm create "$name" --zone="$zone" "${project_flag[@]}" \
      --accelerator-type="$accelerator" --version="$version"
    ;;
  setup)
    [[ -n $repo ]] || die "--repo (or RML_REPO): the git URL the workers clone"
    on_all_workers "set -e; rm -rf ~/rml_jax; git clone --quiet $(printf '%q' "$repo") ~/rml_jax \
&& cd ~/rml_jax && git checkout --quiet $(printf '%q' "$ref") && python3 -m venv .venv \
&& . .venv/bin/activate && pip install -q -e . 'jax[tpu]'"
    ;;
  train) main_command train ;;
  eval) main_command eval ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project_flag[@]}" \
      --worker=0 --command="tail -n 100 -f ~/rml_jax_train.log"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" "${project_flag[@]}" --quiet
    ;;
  *) die "unknown subcommand '$command_name'; expected create, setup, train, eval, logs or delete" ;;
esac
