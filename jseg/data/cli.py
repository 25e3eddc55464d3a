"""Command-line parsing shared by the data tools (``stats``, ``show``, ``bench data``).

``--config=PATH`` loads a config file with ``jseg.config.load_config`` (default:
``jseg.config.base_config()``, the CamVid sample); ``--config.a.b=VALUE``
overrides a field (VALUE is read as a Python literal when it parses as one,
e.g. ``--config.data.crop_size='(512, 512)'``); every other ``--name=value``
is returned for the tool.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from jseg.config import base_config, load_config


def _literal(text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_args(argv: list[str], tool_args: dict[str, Any], usage: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Splits ``argv`` into a config (file plus overrides) and the tool's own options.

  ``tool_args`` maps option names to defaults; a default's type converts the value.
  """
  path, overrides, options = None, [], dict(tool_args)
  for arg in argv:
    if not arg.startswith("--") or "=" not in arg:
      raise SystemExit(f"Unexpected argument '{arg}'.\n{usage}")
    key, value = arg[2:].split("=", 1)
    if key == "config":
      path = value
    elif key.startswith("config."):
      overrides.append((key[len("config.") :], value))
    elif key in options:
      default = tool_args[key]
      options[key] = type(default)(value) if default is not None and not isinstance(default, bool) else (
          value.lower() in ("1", "true", "yes") if isinstance(default, bool) else value
      )
    else:
      raise SystemExit(f"Unknown option '--{key}'. Options: --config, --config.<field>, {', '.join('--' + k for k in tool_args)}.\n{usage}")
  config = load_config(path) if path else base_config()
  for field, value in overrides:
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise SystemExit(f"--config.{field}: the config has no field '{p}'.")
      node = node[p]
    node[leaf] = _literal(value, node.get(leaf, None))
  return config, options
