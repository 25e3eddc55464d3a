"""Benchmarks: ``python -m jseg.bench <suite> [flags]`` writes JSON and prints a table.

Each suite is a module ``jseg/bench/<suite>.py`` with ``main(argv: list[str]) -> None``.
"""
