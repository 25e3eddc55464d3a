"""metrics.jsonl logging: appended events read back in order."""

import pytest

from jseg.writers import MetricWriter, read_metrics


def test_events_append_across_writers(tmp_path):
  w = MetricWriter(tmp_path, tensorboard=False)
  w.write(1, "train", {"loss": 2.5})
  w.close()
  w = MetricWriter(tmp_path, tensorboard=False)  # a resumed run appends
  w.write(2, "eval", {"miou": 0.5, "iou/Sky": None})
  w.close()
  events = read_metrics(tmp_path)
  assert [(e["step"], e["split"]) for e in events] == [(1, "train"), (2, "eval")]
  assert events[0]["loss"] == 2.5 and events[1]["iou/Sky"] is None


def test_disabled_writer_writes_nothing(tmp_path):
  w = MetricWriter(tmp_path, enabled=False)
  w.write(1, "train", {"loss": 1.0})
  w.close()
  assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_events_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch when installed (2.45 s, 221 MB here): the writer blocks that
  import for its own import only (no ``None`` left in ``sys.modules`` to block a user's)."""
  import subprocess
  import sys

  pytest.importorskip("tensorboardX")
  script = (
      "import sys\n"
      "from jseg.writers import MetricWriter\n"
      f"w = MetricWriter({str(tmp_path)!r})\n"
      "w.write(3, 'train', {'loss': 1.5})\n"
      "w.close()\n"
      "print(repr(sys.modules.get('torch', 'absent')))\n")  # None would block later imports
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "'absent'"
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0
