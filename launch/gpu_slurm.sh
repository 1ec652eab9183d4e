#!/usr/bin/env bash
# One or more GPU nodes under SLURM: one process per node, all of a node's GPUs in it; the
# coordinator is the job's first node. --dry-run prints the sbatch script instead of submitting.
#
#   launch/gpu_slurm.sh --nodes=2 --gpus-per-node=4 --config=configs/digits.py \
#       --workdir=/shared/runs/digits [--partition=gpu] [--time=36:00:00] [--venv=.venv] \
#       [--mode=train|eval] [--config.total_steps=90000 ...] [--dry-run]
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

nodes=1
gpus=1
partition=""
time_limit="24:00:00"
venv=".venv"
config=""
workdir=""
mode="train"
dry_run=0
extra=()

for arg in "$@"; do
  case $arg in
    --nodes=*) nodes=${arg#*=} ;;
    --gpus-per-node=*) gpus=${arg#*=} ;;
    --partition=*) partition=${arg#*=} ;;
    --time=*) time_limit=${arg#*=} ;;
    --venv=*) venv=${arg#*=} ;;
    --config=*) config=${arg#*=} ;;
    --workdir=*) workdir=${arg#*=} ;;
    --mode=*) mode=${arg#*=} ;;
    --dry-run) dry_run=1 ;;
    --config.*) extra+=("$arg") ;;
    -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg'" ;;
  esac
done

[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required (a path every node can reach)"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes: expected a positive integer, got '$nodes'"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node: expected a positive integer, got '$gpus'"
[[ $mode == train || $mode == eval ]] || die "--mode: expected train or eval, got '$mode'"

main_args=$(printf '%q ' --config="$config" --workdir="$workdir" --mode="$mode" "${extra[@]}")

script=$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=rml_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --output=rml_jax_%j.log
${partition:+#SBATCH --partition=$partition}
set -euo pipefail
cd $(printf '%q' "$PWD")
. $(printf '%q' "$venv")/bin/activate
# rml_jax.main calls jax.distributed.initialize() when SLURM_NTASKS > 1; JAX reads the
# coordinator (the first node, a port derived from the job id), process count and index from
# SLURM's environment.
srun python -m rml_jax.main $main_args
EOF
)

if [[ $dry_run -eq 1 ]]; then
  printf '%s\n' "$script"
else
  printf '%s\n' "$script" | sbatch
fi
