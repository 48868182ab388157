"""Subprocess worker for tests/test_reliability.py: exactly `python -m catchjax.main` with its
own flags, plus optional pause points at which a test kills it with SIGKILL. Not a test module.

  CATCHJAX_TEST_PAUSE_AT_SAVE=K  CATCHJAX_TEST_MARKER=FILE \\
    python tests/helpers_reliability_worker.py --config=... --workdir=...

CATCHJAX_TEST_PAUSE_AT_SAVE=K: once the training checkpoint of step K is on disk, write FILE and
sleep (the kill window during organism training). CATCHJAX_TEST_PAUSE_AT_ROW=K: once the K-th
result row of the workdir is written, the same (the kill window during the sweep). Pausing,
rather than racing a poller, keeps the kill point exact on a heavily loaded machine.
"""
import os
import sys
import time


def _pause(what: str):
  marker = os.environ["CATCHJAX_TEST_MARKER"]
  with open(marker + ".tmp", "w") as f:
    f.write(what)
  os.replace(marker + ".tmp", marker)
  time.sleep(3600)   # the test kills us here


def main():
  at_save = int(os.environ.get("CATCHJAX_TEST_PAUSE_AT_SAVE", "0") or 0)
  if at_save:
    from catchjax import checkpoint
    save = checkpoint.Checkpointer.save

    def save_then_pause(self, step, *a, **kw):
      out = save(self, step, *a, **kw)
      if step >= at_save:
        self.wait()            # the step is complete on disk
        _pause(f"checkpoint {step}")
      return out

    checkpoint.Checkpointer.save = save_then_pause
  at_row = int(os.environ.get("CATCHJAX_TEST_PAUSE_AT_ROW", "0") or 0)
  if at_row:
    from catchjax import results
    append = results.ResultStore.append

    def append_then_pause(self, row):
      append(self, row)
      if len(self.rows) >= at_row:
        _pause(f"row {len(self.rows)}")

    results.ResultStore.append = append_then_pause
  from absl import app
  from catchjax import main as entry
  app.run(entry.main, argv=[sys.argv[0]] + sys.argv[1:])


if __name__ == "__main__":
  main()
