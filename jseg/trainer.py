"""Training and evaluation logic behind ``jseg.train`` and ``jseg.evaluate``.

The step functions are pure and jitted once over the device mesh; the loop in
``train_and_evaluate`` does all I/O (data, logging, checkpoints, progress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from jseg import checkpoint as ckpt_lib
from jseg import data as data_lib
from jseg import compiling, inference, losses, metrics, optim, parallel, runtime
from jseg.models import build_model
from jseg.writers import MetricWriter


class TrainState(train_state.TrainState):
  """Flax ``TrainState`` plus BatchNorm statistics (empty dict for BN-free nets)."""

  batch_stats: Any = None


def variables(params: Any, batch_stats: Any) -> dict:
  """The variables dict ``model.apply`` takes."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def create_train_state(
    config: ml_collections.ConfigDict, model: Any, tx: optax.GradientTransformation,
    rng: jax.Array, channels: int,
) -> TrainState:
  """Initialises parameters from ``rng`` with a dummy batch at the crop size."""
  h, w = config.data.crop_size
  dummy = jnp.zeros((1, h, w, channels), jnp.float32)
  p_rng, d_rng = jax.random.split(rng)
  variables = model.init({"params": p_rng, "dropout": d_rng}, dummy, train=False)
  return TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      tx=tx,
      batch_stats=variables.get("batch_stats", {}),
  )


def grad_step(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, loss_fn: Callable,
) -> tuple[Any, Any, dict[str, jax.Array]]:
  """Gradients, new BatchNorm statistics and the step's metrics (no update).

  Dropout noise is ``fold_in(rng, step)`` so resume needs no RNG state.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def compute_loss(params):
    (logits, aux), new_vars = state.apply_fn(
        variables(params, state.batch_stats), batch["image"], train=True,
        rngs={"dropout": step_rng}, mutable=["batch_stats"],
    )
    loss, parts = loss_fn(logits, batch["label"], aux)
    return loss, (parts, new_vars.get("batch_stats", {}))

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  out = {f"loss_{k}": v for k, v in parts.items()}
  out.update(loss=loss, grad_norm=optim.global_norm(grads))
  return grads, batch_stats, out


def grad_step_into(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, spare: Any, *,
    loss_fn: Callable,
) -> tuple[Any, Any, dict[str, jax.Array]]:
  """``grad_step`` given ``spare``, gradient-shaped buffers to donate (``SplitStep`` passes
  the previous step's gradients): XLA writes the new gradients into them instead of into
  fresh allocations, which the OS would page-fault and zero again every step."""
  del spare  # only its buffers are used, as the outputs' (donate_argnums, keep_unused)
  return grad_step(state, batch, rng, loss_fn=loss_fn)


def update_step(state: TrainState, grads: Any, batch_stats: Any) -> TrainState:
  """The optimiser update (and the new BatchNorm statistics) applied to ``state``."""
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


def train_step(
    state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, loss_fn: Callable,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step as one function: ``grad_step`` then ``update_step``."""
  grads, batch_stats, out = grad_step(state, batch, rng, loss_fn=loss_fn)
  return update_step(state, grads, batch_stats), out


def _recycled(tree: Any) -> list[Any]:
  """The leaves of ``tree`` whose gradients ``SplitStep`` keeps for the next step: those of
  ``runtime.MMAP_THRESHOLD`` bytes and more, each a mapping of its own. Smaller ones come
  from glibc's heap, which reuses freed blocks anyway; kept, they fragmented it (paper
  DeepLab v3 training peak +35-43 MB with every gradient kept)."""
  return [x for x in jax.tree.leaves(tree)
          if x.size * np.dtype(x.dtype).itemsize >= runtime.MMAP_THRESHOLD]


class SplitStep:
  """``train_step`` as two jitted programs: ``grad_step``, then ``update_step``.

  Same values as the single program (``tests/test_train_step.py``). Why two: XLA:CPU's
  compiler holds the IR of every kernel of a program until the program is compiled
  (~0.3-0.7 MB per kernel), and the optimiser update and the BatchNorm statistics add
  one kernel per output array (230 of PSPNet's 558). Compiled apart, the compile peak is
  the larger program's: PSPNet batch 4, 256², whole-process peak 661 / 670 -> 599 / 581 MB
  with ``runtime.releasing_free_memory`` (``experiments/performance/step_programs.py``;
  README there, "Seventh pass"); the step time does not change. ``config.split_update=False``
  gives the single program. Called, lowered and compiled like a ``jax.jit`` function.

  The gradient program (``grad_step_into``) writes each step's gradients of 1 MiB and more
  (``_recycled``) into the buffers of the previous step's, which this object keeps between
  calls (donated to the next call; ``release`` drops them, e.g. before an evaluation):
  fresh gradient buffers are mapped and page-faulted anew every step on CPU. Paper-sized, batch 2, 256², same values
  (``experiments/performance/recycle_grads.py``, alternated, medians): DeepLab v3 679.7 ->
  631.8 ms per step, minor faults 121k -> 66k; PSPNet 1286.6 -> 1238.1 ms; U-Net 1541.0 ->
  1503.3 ms. Training peak (``jseg.bench``, paper DeepLab v3) 1362-1364 -> 1377-1378 MB;
  bench presets unchanged.
  """

  def __init__(self, grads_fn: Any, update_fn: Any, zeros_fn: Any,
               compiler_options: dict[str, Any] | None = None):
    self.grads_fn, self.update_fn, self.zeros_fn = grads_fn, update_fn, zeros_fn
    # XLA options for compiling both programs (``step_compiler_options``). Given at compile
    # time, not to ``jax.jit``: JAX refuses a jit with ``compiler_options`` inside another
    # trace (the bench's ``jax.make_jaxpr`` of the step, a user's outer jit).
    self.compiler_options = compiler_options
    self._compiled: dict[Any, SplitStep] = {}
    self._spare = None

  def __call__(self, state: TrainState, batch: dict, rng: jax.Array):
    if (self.compiler_options or self._compiled) and not compiling.traced(state, batch, rng):
      key = compiling.signature(state, batch, rng)
      compiled = self._compiled.get(key)
      if compiled is None and self.compiler_options:  # as jax.jit would, with the options
        compiled = self._compiled[key] = self.lower(state, batch, rng).compile()
      if compiled is not None:
        return compiled(state, batch, rng)
    spare, self._spare = self._spare, None
    if spare is None:
      spare = self.zeros_fn(_recycled(state.params))
    grads, batch_stats, out = self.grads_fn(state, batch, rng, spare)
    new_state = self.update_fn(state, grads, batch_stats)
    self._spare = _recycled(grads)
    return new_state, out

  def precompile(self, state: Any, batch: Any, rng: Any) -> None:
    """Compiles both programs for calls with arguments like these; ``state`` may be
    abstract (``Setup.abstract_state()``), so the step can compile before the state exists:
    the compiler's peak then does not sit on top of the parameters and optimiser state."""
    self._compiled[compiling.signature(state, batch, rng)] = self.lower(state, batch, rng).compile()

  def release(self) -> None:
    """Drops the gradient buffers kept for the next call (it allocates fresh ones)."""
    self._spare = None
    for compiled in self._compiled.values():
      compiled.release()

  def lower(self, state: Any, batch: Any, rng: Any) -> "SplitStep":
    spare = _recycled(state.params)
    grads, batch_stats, _ = jax.eval_shape(self.grads_fn, state, batch, rng, spare)
    return SplitStep(self.grads_fn.lower(state, batch, rng, spare),
                     self.update_fn.lower(state, grads, batch_stats), self.zeros_fn,
                     self.compiler_options)

  def compile(self) -> "SplitStep":
    """Both programs compiled with ``compiler_options`` (call on a lowered step); wrap it in
    ``runtime.releasing_free_memory`` as the trainer wraps its first step."""
    kw = compiling.compile_kwargs(self.compiler_options)
    return SplitStep(self.grads_fn.compile(**kw), self.update_fn.compile(**kw), self.zeros_fn)

  def cost_analysis(self) -> dict[str, float]:
    """XLA's cost analysis of both compiled programs, summed."""
    total: dict[str, float] = {}
    for fn in (self.grads_fn, self.update_fn):
      for k, v in (fn.cost_analysis() or {}).items():
        total[k] = total.get(k, 0.0) + float(v)
    return total

  def as_text(self) -> str:
    """Both programs' HLO text (lowered or compiled), one after the other."""
    return self.grads_fn.as_text() + "\n" + self.update_fn.as_text()


def step_compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """XLA options the training step's programs compile with: XLA:CPU's older (LLVM-IR)
  fusion emitters where ``config.step_fusion_emitters`` is False and the backend is the
  CPU (same values, about a quarter of the compiler's memory; other backends ignore the
  setting), else None (XLA's defaults, or a user's ``XLA_FLAGS``)."""
  return compiling.fusion_emitter_options(config, "step_fusion_emitters")


def eval_compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """XLA options of the evaluation and prediction programs (the forward pass): the older
  fusion emitters where ``config.eval_fusion_emitters`` is False on the CPU, else None."""
  return compiling.fusion_emitter_options(config, "eval_fusion_emitters")


def make_step(config: ml_collections.ConfigDict, loss_fn: Callable, mesh) -> Any:
  """The jitted training step over ``mesh``: a ``SplitStep`` unless ``config.split_update``
  is False (then one ``jax.jit`` program). The state is donated to the update, the previous
  step's gradients to the gradient program (``SplitStep``). The ``SplitStep`` compiles
  with ``step_compiler_options(config)``."""
  repl = parallel.replicated(mesh)
  options = step_compiler_options(config)
  if not config.get("split_update", True):
    if options:
      raise ValueError("config.step_fusion_emitters=False needs config.split_update=True (the "
                       "step's two programs compile with it).")
    return jax.jit(functools.partial(train_step, loss_fn=loss_fn),
                   in_shardings=(repl, parallel.batch_sharded(mesh), repl),
                   out_shardings=(repl, repl), donate_argnums=(0,))
  grads_fn = jax.jit(functools.partial(grad_step_into, loss_fn=loss_fn),
                     in_shardings=(repl, parallel.batch_sharded(mesh), repl, repl),
                     out_shardings=(repl, repl, repl), donate_argnums=(3,), keep_unused=True)
  update_fn = jax.jit(update_step, in_shardings=(repl, repl, repl), out_shardings=repl,
                      donate_argnums=(0,))
  zeros_fn = jax.jit(lambda leaves: [jnp.zeros_like(x) for x in leaves], out_shardings=repl)
  return SplitStep(grads_fn, update_fn, zeros_fn, options)


def eval_step(
    variables: dict, images: jax.Array, labels: jax.Array, *, apply_fn: Callable,
    num_classes: int, ignore_index: int,
) -> jax.Array:
  """Confusion matrix of one batch (padding examples carry only ignore labels)."""
  logits, _ = apply_fn(variables, images, train=False)
  pred = jnp.argmax(logits, axis=-1)
  return metrics.confusion_matrix(pred, labels, num_classes, ignore_index)


class Evaluator:
  """Accumulates a confusion matrix over a split, batching same-shaped images."""

  def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh, info):
    self.config = config
    self._model = model
    apply_fn = model.apply
    self.mesh = mesh
    self.info = info
    self.batch_size = config.get("eval_batch_size", 1)
    n_dev = mesh.devices.size
    # Round up so every device gets the same number of examples.
    self.batch_size = int(math.ceil(self.batch_size / n_dev) * n_dev)
    self.compiler_options = eval_compiler_options(config)
    self._step = compiling.OnCall(jax.jit(
        functools.partial(
            eval_step, apply_fn=apply_fn, num_classes=info.num_classes,
            ignore_index=info.ignore_index,
        ),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh),
                      parallel.batch_sharded(mesh)),
        out_shardings=parallel.replicated(mesh),
    ), self.compiler_options)

  def _batches(self, source) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Groups consecutive same-shaped examples of this process's share."""
    p, n_proc = jax.process_index(), jax.process_count()
    local_bs = self.batch_size // n_proc
    pending: list[dict] = []
    for i in range(p, len(source), n_proc):
      ex = source[i]
      if pending and ex["image"].shape != pending[0]["image"].shape:
        yield self._stack(pending, local_bs)
        pending = []
      pending.append(ex)
      if len(pending) == local_bs:
        yield self._stack(pending, local_bs)
        pending = []
    if pending:
      yield self._stack(pending, local_bs)

  def _stack(self, examples: list[dict], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([e["image"] for e in examples])
    labels = np.stack([e["label"] for e in examples]).astype(np.int32)
    if len(examples) < size:  # pad with ignored examples so shapes divide over devices
      pad = size - len(examples)
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate(
          [labels, np.full((pad,) + labels.shape[1:], self.info.ignore_index, np.int32)])
    return images, labels

  def confusion(self, variables: dict, source) -> np.ndarray:
    """Confusion matrix over ``source``: on device for whole-image inference, else
    through ``jseg.inference`` (sliding window, multi-scale, flip, CRF) on the host."""
    if inference.needs_host_inference(self.config.get("inference")):
      return self._confusion_host(variables, source)
    total = None
    for images, labels in self._batches(source):
      batch = parallel.shard_batch({"image": images, "label": labels}, self.mesh)
      cm = self._step(variables, batch["image"], batch["label"])
      total = cm if total is None else total + cm
    if total is None:
      raise ValueError("The evaluation split is empty: no examples to evaluate.")
    return np.asarray(jax.device_get(total))


  def _confusion_host(self, variables: dict, source) -> np.ndarray:
    infer = self.config.inference
    apply_fn = inference.make_apply_fn(self._model, variables, self.compiler_options)
    use_crf = inference.crf_enabled(infer)
    k, ignore = self.info.num_classes, self.info.ignore_index
    total = np.zeros((k, k), np.int64)
    indices = list(range(jax.process_index(), len(source), jax.process_count()))
    if not indices:
      raise ValueError("The evaluation split is empty: no examples to evaluate.")
    for start in range(0, len(indices), self.batch_size):
      chunk = [source[i] for i in indices[start:start + self.batch_size]]
      raw = [source.raw(i)["image"] for i in indices[start:start + self.batch_size]] if use_crf else None
      preds = inference.predict_labels(apply_fn, [e["image"] for e in chunk], infer, raw)
      for pred, ex in zip(preds, chunk):
        total += np.asarray(metrics.confusion_matrix(pred, ex["label"], k, ignore), np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
    return total


def _model_meta(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.model.to_json_best_effort())


def _scalars(d: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in d.items()}


def summary_for_log(summary: dict, class_names: list[str]) -> dict[str, float]:
  """Flattens a metrics summary into JSON-friendly scalars (per-class IoU by name)."""
  out = {}
  for k, v in summary.items():
    arr = np.asarray(v)
    if arr.ndim == 0:
      out[k] = None if not np.isfinite(arr) else float(arr)
  for name, value in zip(class_names, np.asarray(summary["iou"])):
    out[f"iou/{name}"] = None if not np.isfinite(value) else float(value)
  return out


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Writes the resolved config; a different earlier one is kept with a timestamp."""
  path = workdir / "config.json"
  text = ckpt_lib.config_to_json(config)
  if path.exists() and path.read_text() != text:
    keep = workdir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.rename(keep)
    print(f"The config differs from the previous run's; the old one is kept as {keep}.")
  path.write_text(text)


# The initialiser runs once, so its code need not be fast: on CPU it is compiled without
# XLA's fusion emitters, whose compiler memory set the whole process's peak for DeepLab v3+
# (batch 4, 256^2: init compile peak 541 -> 453 MB, PSPNet 431 -> 374; the same parameter
# bits; experiments/performance/README.md, "Ninth pass").
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_cpu_use_fusion_emitters": False}}


@dataclasses.dataclass
class Setup:
  """What a run is built from; shared by training, quick tests and inference.

  ``state`` is initialised on first access only, so loading a checkpoint
  (which needs just ``abstract_state()``) never compiles or runs the init.
  """

  config: ml_collections.ConfigDict
  mesh: Any
  info: Any
  model: Any
  schedule: Callable
  init_fn: Callable
  init_rng: jax.Array
  step_fn: Callable
  step_rng: jax.Array

  @functools.cached_property
  def state(self) -> TrainState:
    with runtime.releasing_free_memory():
      init = self.init_fn.lower(self.init_rng).compile(compiler_options=_INIT_COMPILER_OPTIONS.get(
          jax.default_backend(), {}))
    state = jax.block_until_ready(init(self.init_rng))
    del init
    self.init_fn.clear_cache()  # runs once: drop its executable (~50-100 MB resident)
    gc.collect()  # the compiled init sits in a reference cycle: free it now, not at some later collection
    return state

  def abstract_state(self) -> Any:
    """Shapes, dtypes and (replicated) shardings of the state, for orbax restore."""
    repl = parallel.replicated(self.mesh)
    shapes = jax.eval_shape(self.init_fn, self.init_rng)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl)
        if isinstance(x, jax.ShapeDtypeStruct) else x, shapes)


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Builds model, optimiser, loss, the state initialiser and the jitted step.

  Parameters are initialised from an ``rbg`` key derived from the seed (its
  init compiles several times faster on CPU than threefry's); dropout keys stay
  threefry, whose values do not depend on how the batch is sharded.
  """
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  info = data_lib.get_info(config.data)
  if config.model.num_classes != info.num_classes:
    raise ValueError(
        f"model.num_classes={config.model.num_classes} but dataset '{config.data.name}' "
        f"has {info.num_classes} classes.")
  model = build_model(config.model)
  tx, schedule = optim.build_optimizer(config)
  loss_fn = losses.build_loss(config)
  step_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  init_rng = jax.random.key(config.seed, impl="rbg")
  repl = parallel.replicated(mesh)
  init = jax.jit(
      functools.partial(create_train_state, config, model, tx, channels=info.channels),
      out_shardings=repl)
  step_fn = make_step(config, loss_fn, mesh)
  return Setup(config, mesh, info, model, schedule, init, init_rng, step_fn, step_rng)


def with_pretrained(state: TrainState, config: ml_collections.ConfigDict, mesh) -> TrainState:
  """Loads ``model.pretrained`` (a local torchvision/timm VGG or ResNet file) into
  the sub-tree ``model.pretrained_scope`` and re-initialises the optimiser state
  from the loaded weights; returns ``state`` unchanged when no file is configured."""
  path = config.model.get("pretrained", "")
  if not path:
    return state
  from jseg.config import resolve_path
  from jseg.models.pretrained import load_pretrained

  file = resolve_path(path)
  if not file.is_file():
    raise FileNotFoundError(f"model.pretrained='{path}' does not exist (looked at {file}).")
  host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  loaded = load_pretrained(host, file, config.model.get("pretrained_scope", "backbone"))
  repl = parallel.replicated(mesh)
  params = jax.device_put(loaded["params"], repl)
  batch_stats = jax.device_put(loaded.get("batch_stats", {}), repl)
  opt_state = jax.jit(state.tx.init, out_shardings=repl)(params)
  print(f"Loaded pretrained weights from {file} into '{config.model.get('pretrained_scope', 'backbone')}'.")
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


def quick_train(config: ml_collections.ConfigDict, steps: int) -> list[float]:
  """Runs ``steps`` training steps on the configured data; returns the losses.

  No checkpoints, no evaluation: the smallest real use of the pipeline, for tests.
  """
  run = setup(config)
  it = data_lib.make_train_iterator(config)
  state, out = run.state, []
  try:
    for _ in range(steps):
      batch = parallel.shard_batch(next(it), run.mesh)
      state, m = run.step_fn(state, batch, run.step_rng)
      out.append(float(m["loss"]))
  finally:
    it.close()
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints); returns final eval summary."""
  workdir = Path(workdir)
  runtime.enable_compilation_cache(config.get("compilation_cache_dir", ""))
  runtime.fix_mmap_threshold()
  runtime.install_block_cache()
  parallel.maybe_initialize_distributed(config)
  is_main = jax.process_index() == 0
  run = setup(config)
  mesh, info, model, schedule, step_fn, step_rng = (
      run.mesh, run.info, run.model, run.schedule, run.step_fn, run.step_rng)
  workdir.mkdir(parents=True, exist_ok=True)

  train_iter = data_lib.make_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count())
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3))
  restored = None
  if checkpointer.steps():
    _check_compatible(checkpointer, config)
    restored = checkpointer.restore_latest(run.abstract_state())
  first_batch = None
  if restored is None and hasattr(step_fn, "precompile"):
    # A fresh run compiles its step before the state exists, so the compiler's peak does
    # not sit on top of the parameters and optimiser state (RefineNet, batch 1: process
    # peak 552-558 -> 512-538 MB; experiments/performance/README.md, twenty-eighth pass).
    first_batch = parallel.shard_batch(next(train_iter), mesh)
    with runtime.releasing_free_memory():
      step_fn.precompile(run.abstract_state(), first_batch, step_rng)
  state = restored.state if restored is not None else with_pretrained(run.state, config, mesh)
  if restored is not None:
    train_iter.set_state(restored.data)
    print(f"Resumed from step {restored.step} in {checkpointer.directory}.", flush=True)
  if is_main:
    write_config(config, workdir)

  writer = MetricWriter(workdir, enabled=is_main)
  evaluator = Evaluator(config, model, mesh, info)
  eval_source = data_lib.make_eval_source(config, config.data.eval_split)
  snapshots = set(optim.snapshot_steps(config, config.total_steps))
  meta = {"model": _model_meta(config), "rng": np.asarray(step_rng).tolist()}

  def evaluate(state) -> dict:
    params = optim.eval_params(state.params, state.opt_state, config)
    cm = evaluator.confusion(variables(params, state.batch_stats), eval_source)
    return metrics.summarize(cm)

  start = int(jax.device_get(state.step))
  pending: list[tuple[int, jax.Array]] = []  # (step, loss) not yet checked on host
  last_saved = restored.step if restored else None
  summary = None
  progress = _progress(start, config.total_steps, enabled=is_main)
  t_log, n_log = time.time(), 0

  def check_finite() -> None:
    for s, loss in pending:
      value = float(loss)
      if not math.isfinite(value):
        checkpointer.wait()
        raise FloatingPointError(
            f"Non-finite loss ({value}) at step {s}. Training stopped; the last good "
            f"checkpoint is step {last_saved} in {checkpointer.directory}.")
    pending.clear()

  try:
    for step in range(start + 1, config.total_steps + 1):
      if first_batch is not None:
        batch, first_batch = first_batch, None
      else:
        batch = parallel.shard_batch(next(train_iter), mesh)
      # The first call compiles the step: hand the compiler's freed memory back meanwhile.
      with runtime.releasing_free_memory() if step == start + 1 else contextlib.nullcontext():
        state, step_metrics = step_fn(state, batch, step_rng)
      pending.append((step, step_metrics["loss"]))
      n_log += 1
      if step % config.log_every == 0 or step == config.total_steps:
        check_finite()  # waits for the step, so the bar's rate and ETA are real
        progress.update(step - progress.n)
        logged = _scalars(jax.device_get(step_metrics))
        logged["learning_rate"] = float(schedule(step - 1))
        logged["steps_per_second"] = n_log / max(time.time() - t_log, 1e-9)
        t_log, n_log = time.time(), 0
        writer.write(step, "train", logged)
        progress.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['learning_rate']:.2e}")
      is_eval = step % config.eval_every == 0 or step == config.total_steps
      saves = (step % config.checkpoint_every == 0 or is_eval or step in snapshots
               or step == config.total_steps)
      if saves:  # kept buffers are not held through evaluation or saving
        if hasattr(step_fn, "release"):
          step_fn.release()  # the gradient buffers
        runtime.release_block_cache()  # jaxlib's kept blocks
      eval_metrics = None
      if is_eval:
        with runtime.releasing_free_memory() if summary is None else contextlib.nullcontext():
          summary = evaluate(state)  # the first one compiles the forward
        eval_metrics = summary_for_log(summary, info.class_names)
        writer.write(step, "eval", eval_metrics)
        progress.write(
            f"step {step}: pixel acc {summary['pixel_accuracy']:.4f}  "
            f"mean acc {summary['mean_accuracy']:.4f}  mIoU {summary['miou']:.4f}  "
            f"FWIoU {summary['fwiou']:.4f}")
      if saves:
        check_finite()
        ranked = {"miou": eval_metrics["miou"]} if eval_metrics and eval_metrics["miou"] is not None else None
        checkpointer.save(step, state, train_iter.get_state(), {**meta, "step": step}, ranked)
        last_saved = step
        if step in snapshots:
          _save_snapshot(workdir, step, state)
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
    train_iter.close()

  if summary is None:  # resumed at or past total_steps: evaluate what we have
    summary = evaluate(state)
  if is_main:
    print(metrics.format_table(summary, info.class_names), flush=True)
  return summary


def _check_compatible(checkpointer: ckpt_lib.Checkpointer, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume when the newest readable checkpoint's model config differs."""
  for step in reversed(checkpointer.steps()):
    try:
      saved = checkpointer.read_meta(step)["model"]
    except Exception:  # unreadable: restore_latest reports it and falls back
      continue
    problems = ckpt_lib.incompatibilities(saved, _model_meta(config))
    if problems:
      checkpointer.close()
      raise ValueError(
          f"Cannot resume from {checkpointer.directory} (step {step}): the config differs "
          "from the checkpoint's in " + "; ".join(problems)
          + ". Use a new --workdir, or the run's own config.")
    return


def _save_snapshot(workdir: Path, step: int, state: TrainState) -> None:
  """SGDR cycle-end snapshot kept outside the keep-N rotation.

  A run resumed from before ``step`` recomputes the same state, so an existing
  snapshot of that step is kept as it is rather than written again.
  """
  folder = workdir / "snapshots" / f"cycle_end_{step}"
  if (folder / "checkpoints" / str(step)).is_dir():
    return
  snap = ckpt_lib.Checkpointer(folder, keep=1, async_save=False)
  snap.save(step, state, {}, {"step": step})
  snap.close()


def _progress(start: int, total: int, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=start, disable=not enabled, unit="step",
              dynamic_ncols=True, desc="train")
