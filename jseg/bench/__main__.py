"""Dispatches ``python -m jseg.bench <suite>`` to ``jseg.bench.<suite>.main``."""

import importlib
import pkgutil
import sys

import jseg.bench


def main() -> None:
  suites = sorted(m.name for m in pkgutil.iter_modules(jseg.bench.__path__) if not m.name.startswith("_"))
  if len(sys.argv) < 2 or sys.argv[1] not in suites:
    got = sys.argv[1] if len(sys.argv) > 1 else "(none)"
    raise SystemExit(f"Unknown benchmark suite {got}. Choose one of: {', '.join(suites)}.")
  importlib.import_module(f"jseg.bench.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
  main()
