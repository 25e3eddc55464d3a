"""What importing jseg's training module loads: grain, orbax and tfds only on first use.

Each check runs in a fresh interpreter, since this test process has them loaded already.
"""

import subprocess
import sys

from jseg.config import REPO_ROOT

HEAVY = ("grain", "orbax", "tensorflow_datasets")


def _loaded_after(code: str) -> set[str]:
  probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
  proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return set(proc.stdout.split())


def test_trainer_import_loads_no_input_or_checkpoint_library():
  assert _loaded_after("import jseg.trainer, jseg.checkpoint, jseg.data") == set()


def test_each_library_loads_on_first_use(tmp_path):
  # grain imports orbax itself.
  assert _loaded_after("import jseg.data\njseg.data.make_train_iterator") == set(HEAVY)
  # A dataset's info (what the model benchmark and prediction on files need) loads none of them;
  # building or opening its array_record files loads tfds.
  assert _loaded_after("from jseg.config import load_config\nfrom jseg.data import get_info\n"
                       "get_info(load_config('configs/pspnet.py').data)") == set()
  assert _loaded_after("from jseg.data import build") == {"tensorflow_datasets"}
  assert _loaded_after(f"from jseg.checkpoint import Checkpointer\nCheckpointer({str(tmp_path)!r})") == {"orbax"}


def test_lazy_names_resolve_and_unknown_names_raise():
  import jseg.data
  from jseg.data import catalog, loader, source

  assert jseg.data.make_train_iterator is loader.make_train_iterator
  assert jseg.data.get_info is catalog.get_info is source.get_info
  assert jseg.data.build is source.build
  assert "make_eval_source" in dir(jseg.data)
  try:
    jseg.data.no_such_name
  except AttributeError as e:
    assert "no_such_name" in str(e)
  else:
    raise AssertionError("an unknown attribute of jseg.data did not raise")
