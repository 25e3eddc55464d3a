"""Markdown tables from ``python -m jseg.bench models --out=...`` JSON files.

  python experiments/performance/tables.py experiments/performance/headline_256_b4_ynn_dot_reduce.json
  python experiments/performance/tables.py --scaling experiments/performance/scaling_*.json
  python experiments/performance/tables.py --rounds experiments/performance/s22_zen5_all_256_b4_rounds2_lazy.json
  python experiments/performance/tables.py --ab BEFORE_1.json,BEFORE_2.json AFTER_1.json,AFTER_2.json
"""

from __future__ import annotations

import argparse
import json
import statistics


def _f(v, spec):
  return format(v, spec) if isinstance(v, (int, float)) else "-"


def side_by_side(path: str, peak: float | None = None) -> str:
  r = json.load(open(path))
  peak = peak or r["peak"].get("best_gflops")
  s = r["settings"]
  lines = [f"`{r['command']}` (batch {s['batch']}, {s['size']}x{s['size']}, {s['threads']} threads; "
           f"XLA_FLAGS=`{s.get('xla_flags', '')}`)", "",
           "| model | params | GFLOP/img (train) | jseg img/s | torch img/s | **train j/t** | jseg ms/img (infer) | "
           "torch ms/img | **infer j/t** | jseg compile s | jseg MFU | torch MFU | jseg peak MB | torch peak MB | "
           "**mem j/t** | load avg |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in r["results"]:
    j, t = row.get("jseg", {}), row.get("torch", {})
    if "error" in j:
      lines.append(f"| {row['model']} | error: {j['error'][:80]} |")
      continue
    q = row.get("ratio", {})
    gf = j["train_gflops_per_image"]
    mfu = lambda m: (_f(100 * gf * m["train_images_per_s"] / peak, ".0f") + "%"  # noqa: E731
                     if m and peak and "train_images_per_s" in m else "-")
    lines.append(
        f"| {row['model']} | {j['params']:,} | {gf:.1f} | {j['train_images_per_s']:.2f} | "
        f"{_f(t.get('train_images_per_s'), '.2f')} | **{_f(q.get('train'), '.2f')}x** | "
        f"{j['infer_ms_per_image']:.1f} | {_f(t.get('infer_ms_per_image'), '.1f')} | "
        f"**{_f(q.get('infer'), '.2f')}x** | {j['compile_s']:.1f} | {mfu(j)} | {mfu(t)} | "
        f"{j['peak_rss_mb']:.0f} | {_f(t.get('peak_rss_mb'), '.0f')} | **{_f(q.get('memory'), '.2f')}x** | "
        f"{' '.join(str(x) for x in row.get('loadavg_before', [])[:1])} |")
  lines.append("")
  lines.append(f"Peak used for MFU: {peak:.0f} GFLOP/s ({r['peak'].get('how', '')}; measured this run: "
               f"jax {r['peak'].get('jax_gflops')}, torch {r['peak'].get('torch_gflops')}).")
  return "\n".join(lines)


def _ratios(row: dict, key: str) -> str:
  """Median of the per-round j/t ratios, the rounds in brackets (one round: the run's ratio)."""
  vals = [q[key] for q in row.get("round_ratios", []) if q.get(key) is not None]
  if not vals:
    return _f(row.get("ratio", {}).get(key), ".2f") + "x"
  med = f"{statistics.median(vals):.2f}x"
  return med if len(vals) == 1 else med + " (" + " / ".join(f"{v:.2f}" for v in vals) + ")"


def _bold(v: str) -> str:
  """The median in bold, the rounds after it plain."""
  return "**" + v.replace(" (", "** (", 1) if " (" in v else f"**{v}**"


def rounds(path: str) -> str:
  """The compact table of the README's passes: ratios per round and the two peaks."""
  r = json.load(open(path))
  lines = ["| model | train j/t (rounds) | infer j/t (rounds) | peak MB jseg / torch | mem j/t (rounds) |",
           "|---|---|---|---|---|"]
  for row in r["results"]:
    j, t = row.get("jseg", {}), row.get("torch", {})
    if "error" in j:
      lines.append(f"| {row['model']} | error: {j['error'][:80]} |")
      continue
    lines.append(f"| {row['model']} | {_bold(_ratios(row, 'train'))} | {_bold(_ratios(row, 'infer'))} | "
                 f"{j['peak_rss_mb']:.0f} / {_f(t.get('peak_rss_mb'), '.0f')} | {_ratios(row, 'memory')} |")
  loads = [x for row in r["results"] for x in (row.get("loadavg_before", [None])[:1] + row.get("loadavg_after", [None])[:1])
           if x is not None]
  if loads:
    lines += ["", f"`{r['command']}`; load {min(loads):.1f}-{max(loads):.1f}."]
  return "\n".join(lines)


def scaling(paths: list[str]) -> str:
  lines = ["| model | batch | size | jseg img/s | torch img/s | train j/t | jseg peak MB | torch peak MB | "
           "jseg step s | torch step s |", "|---|---|---|---|---|---|---|---|---|---|"]
  rows = []
  for p in paths:
    r = json.load(open(p))
    for row in r["results"]:
      rows.append((row["model"], r["settings"]["batch"], r["settings"]["size"], row))
  for m, b, s, row in sorted(rows, key=lambda x: (x[0], x[1], x[2])):
    j, t = row.get("jseg", {}), row.get("torch", {})
    if "error" in j:
      lines.append(f"| {m} | {b} | {s} | error: {j['error'][:60]} |")
      continue
    lines.append(f"| {m} | {b} | {s} | {j['train_images_per_s']:.2f} | {_f(t.get('train_images_per_s'), '.2f')} | "
                 f"{_f(row.get('ratio', {}).get('train'), '.2f')}x | {j['peak_rss_mb']:.0f} | "
                 f"{_f(t.get('peak_rss_mb'), '.0f')} | {j['step_s']:.3f} | {_f(t.get('step_s'), '.3f')} |"
                 .replace("| -x |", "| - |"))
  return "\n".join(lines)


def ab(before: str, after: str) -> str:
  """jseg's own figures in runs before and after a change (comma-separated files, e.g.
  alternated ``--torch=no`` runs): step and inference times, peaks, per run."""
  def load(paths):
    return [{r["model"]: r["jseg"] for r in json.load(open(f))["results"] if "jseg" in r}
            for f in paths.split(",")]
  b, a = load(before), load(after)
  join = lambda runs, m, k, spec: " / ".join(format(r[m][k], spec) for r in runs if m in r)
  mean = lambda runs, m, k: statistics.mean(r[m][k] for r in runs if m in r)
  lines = ["| model | step s before | step s after | **train after/before** | infer ms before | "
           "infer ms after | **infer** | train peak MB before | after | peak MB before | after |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for m in b[0]:
    if not all(m in r for r in a):
      continue
    lines.append(
        f"| {m} | {join(b, m, 'step_s', '.3f')} | {join(a, m, 'step_s', '.3f')} | "
        f"**{mean(b, m, 'step_s') / mean(a, m, 'step_s'):.2f}x** | "
        f"{join(b, m, 'infer_ms_per_image', '.1f')} | {join(a, m, 'infer_ms_per_image', '.1f')} | "
        f"**{mean(b, m, 'infer_ms_per_image') / mean(a, m, 'infer_ms_per_image'):.2f}x** | "
        f"{join(b, m, 'train_peak_rss_mb', '.0f')} | {join(a, m, 'train_peak_rss_mb', '.0f')} | "
        f"{join(b, m, 'peak_rss_mb', '.0f')} | {join(a, m, 'peak_rss_mb', '.0f')} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("paths", nargs="+")
  p.add_argument("--scaling", action="store_true")
  p.add_argument("--rounds", action="store_true", help="compact table: median of per-round ratios, rounds in brackets")
  p.add_argument("--ab", action="store_true", help="two paths: before and after runs (comma-separated)")
  p.add_argument("--peak", type=float, default=None, help="GFLOP/s for MFU (default: the run's measured best)")
  a = p.parse_args()
  if a.ab:
    print(ab(*a.paths))
  elif a.scaling:
    print(scaling(a.paths))
  elif a.rounds:
    for path in a.paths:
      print(rounds(path))
      print()
  else:
    for path in a.paths:
      print(side_by_side(path, a.peak))
      print()


if __name__ == "__main__":
  main()
