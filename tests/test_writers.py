"""metrics.jsonl logging: appended events read back in order."""

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
