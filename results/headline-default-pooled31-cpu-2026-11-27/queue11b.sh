#!/bin/bash
# Session 11, from 05:06: collusion only (tier and year met the 0.1 half-width at 24-25 seeds).
cd /work/sweep
export PYTHONPATH=/work/sweep HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
S=$(python3 -c "print(tuple(range(24, 60)))")
/work/main/.venv/bin/python -m catchjax.main --config=configs/headline.py --workdir=/work/main/workdirs/headline_ps --config.model.hf_dir=/work/main/artifacts/smollm2-135m-instruct \
  --config.headline.seeds="$S" --config.headline.ns="(16,)" --config.headline.distinguish_seeds="()" \
  --config.headline.families="('collusion',)"
