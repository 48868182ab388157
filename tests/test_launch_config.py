"""Launch scripts (bash -n, --dry-run) and config validation before any compute."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm_gpu.sh"])
def test_launch_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)], check=True)


def test_tpu_dry_run_prints_commands_and_needs_bucket():
  s = os.path.join(REPO, "launch", "tpu_vm.sh")
  out = subprocess.run(["bash", s, "--bucket=gs://b/cj", "--type=v5litepod-8", "--dry-run",
                        "--delete", "--config=configs/headline.py:full"],
                       capture_output=True, text=True, check=True).stdout
  out = out.replace("\\ ", " ")  # commands are printed shell-quoted (printf %q)
  assert "tpu-vm create catchjax" in out and "--accelerator-type=v5litepod-8" in out
  assert "--worker=all" in out and "catchjax.main --config=configs/headline.py:full" in out
  assert "gs://b/cj/headline" in out and "tpu-vm delete" in out
  r = subprocess.run(["bash", s, "--dry-run"], capture_output=True, text=True)
  assert r.returncode == 2 and "--bucket" in r.stderr


def test_slurm_dry_run():
  s = os.path.join(REPO, "launch", "slurm_gpu.sh")
  out = subprocess.run(["bash", s, "--nodes=2", "--gpus-per-node=4", "--dry-run"],
                       capture_output=True, text=True, check=True).stdout
  assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=4" in out
  assert "srun" in out and "catchjax.main --config=configs/headline.py:full" in out


def _cfg():
  from configs.headline import get_config
  return get_config()


@pytest.mark.parametrize("mutate,match", [
    (lambda c: setattr(c.headline, "ns", (0, 4)), "must be positive"),
    (lambda c: setattr(c.headline, "m", 8), "smaller than the largest N"),
    (lambda c: setattr(c, "behaviours", ("nope",)), "unknown behaviour 'nope'"),
    (lambda c: setattr(c.organism, "families", ("token", "nope")), "unknown family 'nope'"),
])
def test_headline_rejects_bad_input_naming_the_field(mutate, match):
  from catchjax.experiments import headline
  c = _cfg()
  mutate(c)
  with pytest.raises(ValueError, match=match):
    headline.validate(c)


def test_missing_model_folder_is_named(tmp_path):
  from catchjax.experiments import headline
  c = _cfg()
  c.model.hf_dir = str(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="config.model.hf_dir"):
    headline.validate(c)


def test_config_override_of_wrong_type_is_refused():
  c = _cfg()
  with pytest.raises(TypeError):
    c.headline.m = "many"
