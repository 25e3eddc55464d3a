"""Config helpers shared by the files in ``configs/``; no experiment values live here
beyond the defaults every run shares.

``base_config()`` returns every field the tools rely on (see docs/design.md);
an experiment's ``get_config()`` starts from it and changes a few fields.
``load_config(path)`` imports a config file by path for tools that are not
driven by ``ml_collections.config_flags``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent


def base_config() -> ml_collections.ConfigDict:
  """The fields every training config has, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 8
  c.eval_batch_size = 2
  c.total_steps = 1000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.log_every = 50
  c.keep_checkpoints = 3
  c.distributed = False
  # XLA's persistent compilation cache (jseg.runtime): re-runs skip compilation; "" = off.
  c.compilation_cache_dir = "~/.cache/jseg/xla"
  # Compile the optimiser update apart from the gradients (jseg.trainer.SplitStep): same
  # values, a lower compile-memory peak; False = one program.
  c.split_update = True
  # XLA:CPU's MLIR fusion emitters for the training step's two programs (CPU only). False =
  # its older LLVM-IR emitters for them (evaluation and prediction: eval_fusion_emitters): the
  # same values, about a quarter of the compiler's memory (RefineNet, batch 1: +202 -> +56 MB
  # while compiling), up to 35% more time in XLA's own kernels on some networks
  # (experiments/performance/README.md, twenty-sixth pass). For small batches, where
  # compiling the step is the run's memory peak. Needs split_update=True.
  c.step_fusion_emitters = True
  # The same for the evaluation and prediction programs (the forward pass): False = the
  # older emitters, a lower compile-memory peak, 0-14% slower inference on this CPU
  # (twenty-sixth pass's table). Where compiling is the evaluation's memory peak (small
  # images and batches; at 1024² the forward's own buffers outweigh it).
  c.eval_fusion_emitters = True

  c.model = ml_collections.ConfigDict()
  c.model.name = "pspnet"
  c.model.num_classes = 11
  c.model.dtype = "float32"
  c.model.pretrained = ""  # local torchvision/timm VGG or ResNet weights (.pth/.safetensors)
  c.model.pretrained_scope = "backbone"  # where in the parameter tree they go

  c.data = ml_collections.ConfigDict()
  c.data.name = "camvid"
  c.data.root = "samples/camvid"
  c.data.cache_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.crop_size = (256, 256)
  c.data.ignore_index = 255
  c.data.scale_range = (0.5, 2.0)
  c.data.hflip = True
  c.data.color_jitter = 0.0
  c.data.blur = False
  c.data.normalize = "standardize"
  c.data.worker_count = 0
  c.data.read_threads = 1
  c.data.invalid_labels = "error"  # or "ignore": out-of-set mask values become ignore_index

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "cross_entropy"
  c.loss.aux_weight = 0.4
  c.loss.class_weights = ml_collections.config_dict.placeholder(tuple)
  c.loss.label_smoothing = 0.0
  c.loss.avg_non_ignore = True
  c.loss.class_weight_mode = "none"
  c.loss.class_frequencies = ml_collections.config_dict.placeholder(tuple)
  c.loss.terms = ml_collections.config_dict.placeholder(tuple)
  c.loss.focal_gamma = 2.0
  c.loss.dice_smooth = 1.0
  c.loss.ohem_thresh = 0.7
  c.loss.ohem_min_kept = 100000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.nesterov = False
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.lookahead_k = 0
  c.optimizer.lookahead_alpha = 0.5
  c.optimizer.ema_decay = 0.0
  c.optimizer.decay_norm_and_bias = False

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "poly"
  c.schedule.power = 0.9
  c.schedule.warmup_steps = 0
  c.schedule.warmup_ratio = 1e-3
  c.schedule.min_lr = 0.0
  c.schedule.boundaries = ()
  c.schedule.factor = 0.1
  c.schedule.cycle_steps = ml_collections.config_dict.placeholder(int)
  c.schedule.cycle_mult = 1.0
  c.schedule.cycle_decay = 1.0

  from jseg import inference  # test-time settings: whole/slide/multiscale, flip, CRF

  c.inference = inference.default_config()
  return c


def resolve_path(path: str) -> Path:
  """A relative path is taken from the working directory, else from the repo root."""
  p = Path(os.path.expanduser(path))
  if p.is_absolute() or p.exists():
    return p
  return REPO_ROOT / p


def load_config(path: str) -> ml_collections.ConfigDict:
  """Imports ``path`` and returns its ``get_config()``."""
  file = resolve_path(path)
  if not file.is_file():
    raise FileNotFoundError(f"Config file '{path}' does not exist (looked at {file}).")
  spec = importlib.util.spec_from_file_location(f"jseg_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"Config file '{path}' has no get_config() function.")
  return module.get_config()
