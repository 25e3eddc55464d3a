"""Optimisers and learning-rate schedules as optax chains, built from the config.

``build_optimizer(config) -> (tx, schedule)``. The chain is, innermost first:

1. ``clip_by_global_norm(optimizer.grad_clip_norm)`` when > 0;
2. the optimiser ``optimizer.name`` (``sgd``, ``adam``, ``adamw``) driven by ``schedule``;
   weight decay skips BatchNorm parameters and biases (see ``decay_mask``);
3. Lookahead (``optimizer.lookahead_k`` > 0, ``optimizer.lookahead_alpha``) around it;
4. an exponential moving average of the weights (``optimizer.ema_decay`` > 0).

The train state holds plain parameters and applies ``tx.update(grads, opt_state,
params)`` with ``optax.apply_updates``; Lookahead's slow weights and the EMA weights
therefore live inside ``opt_state``, and ``eval_params`` returns the weights to
evaluate with (EMA if on, else Lookahead's slow weights if on, else ``params``).

Schedules (``schedule.name``): ``constant``, ``poly``, ``cosine``, ``step``, ``sgdr``,
each preceded by ``schedule.warmup_steps`` of linear warm-up from
``warmup_ratio * lr`` to ``lr``. The decay of ``poly``/``cosine`` and the cycles of
``sgdr`` run on the clock that starts after warm-up (over ``total_steps -
warmup_steps`` steps); ``step`` boundaries are absolute optimiser steps. Schedules
take optax's ``count`` (the number of updates already applied).

Config fields (read with defaults so older configs keep working):
``optimizer.{name, learning_rate, momentum, nesterov, weight_decay,
decay_norm_and_bias (False), b1, b2, eps, grad_clip_norm (0 = off), lookahead_k (0 =
off), lookahead_alpha (0.5), ema_decay (0 = off)}`` and ``schedule.{name, power,
min_lr, warmup_steps, warmup_ratio, boundaries, factor, cycle_steps, cycle_mult,
cycle_decay}``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jseg.registry import OPTIMIZERS, SCHEDULES

Schedule = Callable[[Any], jax.Array]


def _get(cfg: Any, name: str, default: Any) -> Any:
  value = cfg.get(name, default) if cfg is not None else default
  return default if value is None else value


# ----------------------------------------------------------------------------- schedules
# Each entry: build(schedule_cfg, lr, steps, warmup_steps) -> schedule(t), where ``t`` counts
# from the end of warm-up and ``steps`` is the length of the post-warm-up phase.


@SCHEDULES.register("constant")
def _constant(sc: Any, lr: float, steps: int, warmup: int) -> Schedule:
  return optax.constant_schedule(lr)


@SCHEDULES.register("poly")
def _poly(sc: Any, lr: float, steps: int, warmup: int) -> Schedule:
  """``(lr - min_lr) (1 - t/T)^power + min_lr``: MMSegmentation's default (power 0.9).

  Written out rather than ``optax.polynomial_schedule``, which returns NaN at ``t = T``
  under jit on XLA:CPU: there ``1 - t/T`` rounds to a tiny negative number (the division
  becomes a multiply by ``1/T``) and its 0.9th power is NaN. ``(T - t)/T`` is exact at 0.
  """
  min_lr, power, total = float(_get(sc, "min_lr", 0.0)), float(_get(sc, "power", 0.9)), max(steps, 1)

  def schedule(count):
    frac = (total - jnp.clip(jnp.asarray(count, jnp.float32), 0, total)) / total
    scaled = jnp.power(jnp.maximum(frac, 0.0), power)
    return (lr - min_lr) * scaled + min_lr

  return schedule


@SCHEDULES.register("cosine")
def _cosine(sc: Any, lr: float, steps: int, warmup: int) -> Schedule:
  """Half-cosine from ``lr`` to ``min_lr`` over the post-warm-up steps (Loshchilov & Hutter)."""
  min_lr = float(_get(sc, "min_lr", 0.0))
  return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=min_lr / lr if lr else 0.0)


@SCHEDULES.register("step")
def _step(sc: Any, lr: float, steps: int, warmup: int) -> Schedule:
  """Multiply by ``factor`` at each of ``boundaries`` (absolute optimiser steps)."""
  boundaries = tuple(int(b) for b in _get(sc, "boundaries", ()))
  if list(boundaries) != sorted(set(boundaries)) or any(b <= warmup for b in boundaries):
    raise ValueError(
        f"schedule.boundaries must be increasing steps after the warm-up ({warmup}); got {boundaries}.")
  factor = float(_get(sc, "factor", 0.1))
  return optax.piecewise_constant_schedule(lr, {b - warmup: factor for b in boundaries})


def sgdr_cycle_starts(cycle_steps: int, cycle_mult: float, horizon: int) -> list[int]:
  """Post-warm-up steps where SGDR cycles begin, up to and including the first >= horizon.

  Cycle i has ``round(cycle_steps * cycle_mult**i)`` steps (integers, so restarts land
  on exact steps).
  """
  if cycle_steps < 1:
    raise ValueError(f"schedule.cycle_steps must be >= 1; got {cycle_steps}.")
  if cycle_mult < 1:
    raise ValueError(f"schedule.cycle_mult must be >= 1; got {cycle_mult}.")
  starts, length, t = [0], float(cycle_steps), 0
  while t < horizon:
    t += max(1, int(round(length)))
    starts.append(t)
    length *= cycle_mult
  return starts


@SCHEDULES.register("sgdr")
def _sgdr(sc: Any, lr: float, steps: int, warmup: int) -> Schedule:
  """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter, ICLR 2017).

  Cycle i lasts ``cycle_steps * cycle_mult**i`` steps and anneals from
  ``lr * cycle_decay**i`` to ``min_lr``; the learning rate jumps back up at the first
  step of each cycle.
  """
  cycle = int(_get(sc, "cycle_steps", max(steps, 1)))
  mult = float(_get(sc, "cycle_mult", 1.0))
  decay = float(_get(sc, "cycle_decay", 1.0))
  min_lr = float(_get(sc, "min_lr", 0.0))
  starts_np = np.asarray(sgdr_cycle_starts(cycle, mult, max(steps, 1)), np.int32)
  starts, lengths = jnp.asarray(starts_np), jnp.asarray(np.diff(starts_np))

  def schedule(count):
    t = jnp.asarray(count, jnp.int32)
    i = jnp.clip(jnp.searchsorted(starts, t, side="right") - 1, 0, len(starts_np) - 2)
    frac = jnp.clip((t - starts[i]) / lengths[i], 0.0, 1.0)
    peak = lr * decay ** i.astype(jnp.float32)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

  return schedule


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The learning rate as a function of the optimiser step (warm-up included)."""
  sc = config.get("schedule", None)
  lr = float(config.optimizer.learning_rate)
  total = int(config.total_steps)
  warmup = int(_get(sc, "warmup_steps", 0))
  if warmup < 0 or warmup >= max(total, 1):
    raise ValueError(f"schedule.warmup_steps must be in [0, total_steps={total}); got {warmup}.")
  main = SCHEDULES.get(_get(sc, "name", "constant"))(sc, lr, total - warmup, warmup)
  if warmup == 0:
    return main
  ratio = float(_get(sc, "warmup_ratio", 1e-3))
  ramp = optax.linear_schedule(ratio * lr, lr, warmup)  # every main schedule starts at lr
  return optax.join_schedules([ramp, main], [warmup])


def snapshot_steps(config: ml_collections.ConfigDict, total_steps: int | None = None) -> list[int]:
  """Steps (state.step after the update) where SGDR cycles end, up to ``total_steps``.

  The trainer saves a snapshot there for snapshot ensembles (Huang et al., ICLR 2017).
  Empty for every schedule but ``sgdr``; a cycle cut short by ``total_steps`` is not
  listed (the final checkpoint covers it).
  """
  total = int(config.total_steps if total_steps is None else total_steps)
  sc = config.get("schedule", None)
  if _get(sc, "name", "constant") != "sgdr":
    return []
  warmup = int(_get(sc, "warmup_steps", 0))
  starts = sgdr_cycle_starts(int(_get(sc, "cycle_steps", max(total - warmup, 1))),
                             float(_get(sc, "cycle_mult", 1.0)), max(total - warmup, 1))
  return [warmup + s for s in starts[1:] if warmup + s <= total]


# ----------------------------------------------------------------------------- optimisers


def global_norm(tree: Any) -> jax.Array:
  """L2 norm of all leaves of ``tree`` together, in float32 (``optax.tree.norm``'s value).

  Where ``jseg.native``'s kernels serve (``norm_native_active``), one custom call reads
  every leaf where it lies and sums the squares in double (``JsegSumSquares``; the same
  value for any thread count). Elsewhere one reduction over the leaves concatenated, not
  one reduction per leaf plus a sum: XLA:CPU compiles every fusion into its own kernel, and
  per leaf that was ~130 of the PSPNet step's 726 kernels, ~75 MB of the compiler's peak
  memory and 3 s of compile time (``experiments/performance/README.md``, "Sixth pass"). The
  concatenate is one copy of the gradients (XLA:CPU does not fuse it into the reduction):
  3.5 MB for the bench's PSPNet, but the paper-sized DeepLab v3's 58M parameters: 45 MB of
  its gradient program's temporaries and 19 ms of a 1 s step, which the custom call saves
  (twentieth pass).
  """
  leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  if norm_native_active():
    return jnp.sqrt(_sum_squares_native(leaves))
  flat = jnp.concatenate(leaves) if len(leaves) > 1 else leaves[0]
  return jnp.sqrt(jnp.sum(flat * flat))


def norm_native_active() -> bool:
  """Whether ``global_norm`` traced now runs as ``jseg.native``'s kernel (``JSEG_NORM`` =
  ``auto`` | ``native`` | ``xla``; ``auto``: where the oneDNN convolutions run)."""
  from jseg import native  # noqa: PLC0415 - keeps `import jseg.optim` cheap
  from jseg.models import conv  # noqa: PLC0415
  return native.kernels_active("JSEG_NORM", conv.onednn_active)


@jax.custom_jvp
def _sum_squares_native(leaves: list[jax.Array]) -> jax.Array:
  """sum over the float32 ``leaves`` of their squares, as one custom call."""
  return jax.ffi.ffi_call("JsegSumSquares", jax.ShapeDtypeStruct((), jnp.float32),
                          vmap_method="sequential")(*leaves)


@_sum_squares_native.defjvp
def _sum_squares_jvp(primals, tangents):
  (leaves,), (dots,) = primals, tangents
  return _sum_squares_native(leaves), 2 * sum(jnp.vdot(x, d) for x, d in zip(leaves, dots))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` (same values and empty state) with ``global_norm``."""
  def update(updates, state, params=None):
    del params
    norm = global_norm(updates)
    keep = norm < max_norm
    clipped = lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clipped, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: conv/dense kernels (ndim >= 2).

  BatchNorm/LayerNorm ``scale`` and ``bias`` and every ``bias`` are 1-D and are left
  alone (decaying them hurts, Goyal et al. 2017 / MMSeg ``norm_decay_mult=0``).
  """
  def keep(path, leaf):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    return bool(jnp.ndim(leaf) >= 2 and name not in ("bias", "scale"))

  return jax.tree_util.tree_map_with_path(keep, params)


def _decay(oc: Any) -> tuple[float, Any]:
  wd = float(_get(oc, "weight_decay", 0.0))
  mask = None if bool(_get(oc, "decay_norm_and_bias", False)) else decay_mask
  return wd, mask


@OPTIMIZERS.register("sgd")
def _sgd(oc: Any, schedule: Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; L2 weight decay added to the gradient (PyTorch's SGD)."""
  wd, mask = _decay(oc)
  momentum = float(_get(oc, "momentum", 0.9))
  return optax.chain(
      optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
      optax.sgd(schedule, momentum=momentum or None, nesterov=bool(_get(oc, "nesterov", False))),
  )


@OPTIMIZERS.register("adam")
def _adam(oc: Any, schedule: Schedule) -> optax.GradientTransformation:
  """Adam (Kingma & Ba 2015); weight decay is L2 on the gradient like PyTorch's Adam."""
  wd, mask = _decay(oc)
  return optax.chain(
      optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
      optax.adam(schedule, b1=float(_get(oc, "b1", 0.9)), b2=float(_get(oc, "b2", 0.999)),
                 eps=float(_get(oc, "eps", 1e-8))),
  )


@OPTIMIZERS.register("adamw")
def _adamw(oc: Any, schedule: Schedule) -> optax.GradientTransformation:
  """AdamW: decoupled weight decay scaled by the schedule (Loshchilov & Hutter, ICLR 2019)."""
  wd, mask = _decay(oc)
  return optax.adamw(schedule, b1=float(_get(oc, "b1", 0.9)), b2=float(_get(oc, "b2", 0.999)),
                     eps=float(_get(oc, "eps", 1e-8)), weight_decay=wd, mask=mask)


class LookaheadState(NamedTuple):
  """Inner optimiser state, the slow weights and the number of inner steps taken."""

  inner: Any
  slow: Any
  count: jax.Array


def lookahead(inner: optax.GradientTransformation, k: int, alpha: float) -> optax.GradientTransformation:
  """Lookahead (Zhang, Lucas, Hinton & Ba, NeurIPS 2019) on plain parameters.

  The inner optimiser moves the fast weights (the trainer's params); every ``k`` steps
  ``slow <- slow + alpha (fast - slow)`` and the fast weights are reset to ``slow``.
  Unlike ``optax.lookahead`` the params stay a plain pytree: the slow weights live in
  the state, and the returned update moves the params onto them at a sync step.
  """
  if k < 1 or not 0.0 < alpha <= 1.0:
    raise ValueError(f"lookahead needs k >= 1 and 0 < alpha <= 1; got k={k}, alpha={alpha}.")

  def init(params):
    return LookaheadState(inner.init(params), jax.tree.map(jnp.asarray, params),
                          jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("lookahead needs params: call tx.update(grads, opt_state, params).")
    inner_updates, inner_state = inner.update(updates, state.inner, params, **extra)
    fast = optax.apply_updates(params, inner_updates)
    count = state.count + 1
    sync = count % k == 0
    slow = jax.tree.map(lambda s, f: jnp.where(sync, s + alpha * (f - s), s).astype(s.dtype),
                        state.slow, fast)
    new_params = jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast)
    out = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new_params, params)
    return out, LookaheadState(inner_state, slow, count)

  return optax.GradientTransformation(init, update)


class EmaParamsState(NamedTuple):
  """Inner optimiser state and the moving average of the parameters."""

  inner: Any
  ema: Any


def ema_params(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """Keeps ``ema <- decay * ema + (1 - decay) * params_after_update`` in the state.

  The average starts at the initial parameters (so it needs no bias correction) and
  covers ``params`` only; BatchNorm statistics are evaluated as they are.
  """
  if not 0.0 < decay < 1.0:
    raise ValueError(f"optimizer.ema_decay must be in (0, 1) (0 = off); got {decay}.")

  def init(params):
    return EmaParamsState(inner.init(params), jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("EMA of weights needs params: call tx.update(grads, opt_state, params).")
    updates, inner_state = inner.update(updates, state.inner, params, **extra)
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state.ema, new)
    return updates, EmaParamsState(inner_state, ema)

  return optax.GradientTransformation(init, update)


def build_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Schedule]:
  """``(tx, schedule)`` for ``config`` (see the module doc for the chain)."""
  oc = config.optimizer
  schedule = build_schedule(config)
  tx = OPTIMIZERS.get(_get(oc, "name", "sgd"))(oc, schedule)
  clip = float(_get(oc, "grad_clip_norm", 0.0))
  if clip < 0:
    raise ValueError(f"optimizer.grad_clip_norm must be >= 0 (0 = off); got {clip}.")
  if clip:
    tx = optax.chain(clip_by_global_norm(clip), tx)
  k = int(_get(oc, "lookahead_k", 0))
  if k:
    tx = lookahead(tx, k, float(_get(oc, "lookahead_alpha", 0.5)))
  decay = float(_get(oc, "ema_decay", 0.0))
  if decay:
    tx = ema_params(tx, decay)
  return tx, schedule


def _find(opt_state: Any, cls: type) -> Any:
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
           if isinstance(x, cls)]
  return found[0] if found else None


def eval_params(params: Any, opt_state: Any, config: ml_collections.ConfigDict) -> Any:
  """Weights to evaluate with: EMA if on, else Lookahead's slow weights if on, else ``params``."""
  oc = config.optimizer
  if float(_get(oc, "ema_decay", 0.0)):
    state = _find(opt_state, EmaParamsState)
    if state is None:
      raise ValueError("optimizer.ema_decay is set but opt_state holds no EMA weights; was it "
                       "built by jseg.optim.build_optimizer with this config?")
    return state.ema
  if int(_get(oc, "lookahead_k", 0)):
    state = _find(opt_state, LookaheadState)
    if state is None:
      raise ValueError("optimizer.lookahead_k is set but opt_state holds no Lookahead state; was it "
                       "built by jseg.optim.build_optimizer with this config?")
    return state.slow
  return params
