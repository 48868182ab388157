#!/bin/bash
# The two sweeps of sessions 10-11 into workdirs/headline_ps (code of 51b3dfb in a worktree at
# /work/sweep; organism 6c26b23e89a2 already cached there). FAMS / FIRST pick the sweep:
#   FAMS="('tier','year','collusion')" FIRST=18   seeds 18-24 (stopped by hand after seed 24)
#   FAMS="('collusion',)" FIRST=24                seeds 24-30 (stopped when the power rule,
#                                                 power_replay.py, said collusion was done)
cd /work/sweep
export PYTHONPATH=/work/sweep HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
S=$(python3 -c "print(tuple(range(${FIRST:-18}, 60)))")
/work/main/.venv/bin/python -m catchjax.main --config=configs/headline.py \
  --workdir=/work/main/workdirs/headline_ps \
  --config.model.hf_dir=/work/main/artifacts/smollm2-135m-instruct \
  --config.headline.seeds="$S" --config.headline.ns="(16,)" --config.headline.distinguish_seeds="()" \
  --config.headline.families="${FAMS:-('tier','year','collusion')}"
