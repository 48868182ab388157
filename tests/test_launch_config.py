"""Launch scripts (bash -n, --dry-run) and config validation before any compute."""
import os
import shlex
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


OVERRIDES = ["--config.organism.families=('token', 'year')",      # spaces, quotes, parens
              '--config.model.hf_dir=/models/my model',                # a space
              "--config.headline.ns=(1, 4)", "--noconfig.train_against.keep_runs"]


def _main_argv(line: str) -> list:
  """The catchjax.main arguments of a shell command line (as the shell would split it)."""
  argv = shlex.split(line)
  return argv[argv.index("catchjax.main") + 1:]


def test_tpu_forwards_overrides_verbatim():
  s = os.path.join(REPO, "launch", "tpu_vm.sh")
  out = subprocess.run(["bash", s, "--bucket=gs://b/cj", "--dry-run", *OVERRIDES,
                        "--config=configs/headline.py:tiny"],
                       capture_output=True, text=True, check=True).stdout
  ssh = shlex.split([line for line in out.splitlines() if "catchjax.main" in line][-1])
  remote = ssh[ssh.index("--command") + 1]   # the string the worker's shell runs
  assert _main_argv(remote) == ["--config=configs/headline.py:tiny", *OVERRIDES,
                                "--workdir=$HOME/gcs/cj/headline"]
  out = subprocess.run(["bash", s, "--bucket=gs://b/cj", "--dry-run", "--workdir=/data/my wd"],
                       capture_output=True, text=True, check=True).stdout
  ssh = shlex.split([line for line in out.splitlines() if "catchjax.main" in line][-1])
  assert _main_argv(ssh[ssh.index("--command") + 1]) == [
      "--config=configs/headline.py:full", "--workdir=/data/my wd"]


def test_slurm_forwards_overrides_verbatim():
  s = os.path.join(REPO, "launch", "slurm_gpu.sh")
  out = subprocess.run(["bash", s, "--dry-run", *OVERRIDES, "--workdir=/shared/my wd"],
                       capture_output=True, text=True, check=True).stdout
  srun = [line for line in out.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1
  assert _main_argv(srun[0]) == ["--config=configs/headline.py:full", *OVERRIDES,
                                 "--workdir=/shared/my wd"]


@pytest.mark.parametrize("script,extra", [("tpu_vm.sh", ["--bucket=gs://b/cj"]),
                                          ("slurm_gpu.sh", [])])
@pytest.mark.parametrize("bad", ["--bogus", "--nodes", "families=3", "--configx=1",
                                 "--config.organism.n_per_family"])   # the last: then '3'
def test_launch_refuses_unknown_arguments(script, extra, bad):
  s = os.path.join(REPO, "launch", script)
  args = extra + ["--dry-run", bad] + (["3"] if bad.startswith("--config.") else [])
  r = subprocess.run(["bash", s, *args], capture_output=True, text=True)
  refused = "3" if bad.startswith("--config.") else bad
  assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
  assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"unknown argument: {refused}; usage: ")
  assert f"launch/{script}" in r.stderr and "--config.FIELD=VALUE" in r.stderr


def _cfg():
  from configs.headline import get_config
  return get_config()


@pytest.mark.parametrize("mutate,match", [
    (lambda c: setattr(c.headline, "ns", (0, 4)), "must be positive"),
    (lambda c: setattr(c.catch, "m", 8), "smaller than the headline's largest N"),
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
    c.catch.m = "many"
