"""How much memory XLA:CPU's compiler holds while it compiles a training step, and how
many kernels (fusions) the step has: parts of the step compiled one after the other.

  python experiments/performance/compile_memory.py --model=pspnet [--batch=4 --size=256] \
      [--variants=step,no_grad_norm,grads_only,forward_only,vjp_fwd,vjp_bwd]

Per variant: compile seconds, the peak of glibc's in-use heap during compilation above
what was in use before (``mallinfo2``: ``uordblks + hblkhd``, sampled every 10 ms from a
thread; freed-but-kept pages are not counted, so this is memory the compiler really
held), the number of fusions and copies in the compiled entry computation, and the median
of 5 runs. Variants: ``step`` (``trainer.train_step`` as shipped), ``no_grad_norm`` (the
step without its ``grad_norm`` metric), ``grads_only`` (loss and gradients, no optimiser,
no running statistics), ``grad_step`` and ``update_step`` (the two programs of
``trainer.SplitStep``, the trainer's default), ``forward_only`` (loss only), ``vjp_fwd`` (the forward returning
``jax.vjp``'s residuals as outputs) and ``vjp_bwd`` (the backward from those residuals).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import statistics
import threading
import time


class _MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="pspnet")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--variants", default="step,no_grad_norm,grads_only,forward_only")
  a = p.parse_args()
  libc = ctypes.CDLL("libc.so.6")
  libc.mallinfo2.restype = _MallInfo2

  def in_use_mb() -> float:
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jseg import losses, parallel, runtime, trainer
  from jseg.bench.models import bench_config

  cfg = bench_config(a.model, a.size, a.batch)
  run = trainer.setup(cfg)
  state = run.state
  loss_fn = losses.build_loss(cfg)
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((a.batch, a.size, a.size, 3), np.float32),
          "label": rng.integers(0, 11, (a.batch, a.size, a.size)).astype(np.int32)}
  batch = parallel.shard_batch(host, run.mesh)

  def loss(params, state, batch):
    (logits, aux), new = state.apply_fn(
        trainer.variables(params, state.batch_stats), batch["image"], train=True,
        rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["batch_stats"])
    return loss_fn(logits, batch["label"], aux)[0], new

  def no_grad_norm(state, batch, rng):
    (value, new), g = jax.value_and_grad(loss, has_aux=True)(state.params, state, batch)
    return state.apply_gradients(grads=g, batch_stats=new["batch_stats"]), {"loss": value}

  def grads_only(state, batch, rng):
    (value, _), g = jax.value_and_grad(loss, has_aux=True)(state.params, state, batch)
    return g, value

  def forward_only(state, batch, rng):
    return loss(state.params, state, batch)[0]

  def vjp_fwd(state, batch, rng):
    value, vjp, new = jax.vjp(lambda p: loss(p, state, batch), state.params, has_aux=True)
    return value, vjp, new

  def vjp_bwd(value, vjp, new):
    return vjp(jnp.ones_like(value))[0]

  fns = {"step": functools.partial(trainer.train_step, loss_fn=loss_fn),
         "no_grad_norm": no_grad_norm, "grads_only": grads_only, "forward_only": forward_only,
         "vjp_fwd": vjp_fwd, "grad_step": functools.partial(trainer.grad_step, loss_fn=loss_fn),
         "update_step": None}
  for v in a.variants.split(","):
    gc.collect()
    runtime.release_free_memory()
    if v == "update_step":  # the second program of trainer.SplitStep
      grads = jax.block_until_ready(jax.jit(fns["grad_step"])(state, batch, run.step_rng))[:2]
      residuals = (state, *grads)
      lowered = jax.jit(trainer.update_step).lower(*residuals)
    elif v == "vjp_bwd":
      residuals = jax.block_until_ready(jax.jit(vjp_fwd)(state, batch, run.step_rng))
      leaves = jax.tree.leaves(residuals[1])
      print(f"residuals: {len(leaves)} arrays, {sum(x.nbytes for x in leaves) / 2**20:.1f} MB")
      lowered = jax.jit(vjp_bwd).lower(*residuals)
    else:
      lowered = jax.jit(fns[v]).lower(state, batch, run.step_rng)
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
      while not done.is_set():
        samples.append(in_use_mb())
        time.sleep(0.01)

    before = in_use_mb()
    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    entry = compiled.as_text().split("ENTRY")[1]
    times = []
    for _ in range(5):
      args = residuals if v in ("vjp_bwd", "update_step") else (
          jax.block_until_ready(jax.tree.map(jnp.copy, state)), batch, run.step_rng)
      t1 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t1)
    print(f"{a.model} b{a.batch} {a.size}^2 {v:13s} compile {seconds:5.1f} s, in-use heap peak "
          f"+{max(samples) - before:6.1f} MB, fusions {entry.count(' fusion('):4d}, "
          f"copies {entry.count(' copy('):3d}, run {1e3 * statistics.median(times):6.1f} ms", flush=True)
    del compiled, lowered


if __name__ == "__main__":
  main()
