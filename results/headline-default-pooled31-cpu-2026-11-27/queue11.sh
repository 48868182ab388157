#!/bin/bash
# Session 11: resume the session-10 seed sweep (code of 51b3dfb, organism 6c26b23e89a2 cached).
cd /work/sweep
export PYTHONPATH=/work/sweep HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
S=$(python3 -c "print(tuple(range(18, 60)))")
/work/main/.venv/bin/python -m catchjax.main --config=configs/headline.py --workdir=/work/main/workdirs/headline_ps --config.model.hf_dir=/work/main/artifacts/smollm2-135m-instruct \
  --config.headline.seeds="$S" --config.headline.ns="(16,)" --config.headline.distinguish_seeds="()" \
  --config.headline.families="('tier','year','collusion')"
