"""``jseg.bench.flops``: model FLOPs counted on the jaxpr, checked against hand counts and torch."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jseg.bench.flops import count_flops


def test_conv_and_dense_match_hand_counts():
  conv = nn.Conv(8, (3, 3), use_bias=False)
  x = jnp.zeros((2, 16, 16, 4))
  v = conv.init(jax.random.key(0), x)
  assert count_flops(conv.apply, v, x) == 2 * 2 * 16 * 16 * 8 * 9 * 4
  a, b = jnp.zeros((5, 7)), jnp.zeros((7, 3))
  assert count_flops(jnp.matmul, a, b) == 2 * 5 * 7 * 3
  # Batched contraction: 4 independent (5x7)@(7x3) products.
  assert count_flops(lambda p, q: jnp.einsum("bij,bjk->bik", p, q),
                     jnp.zeros((4, 5, 7)), jnp.zeros((4, 7, 3))) == 4 * 2 * 5 * 7 * 3


def test_gradient_of_a_conv_is_three_convs():
  conv = nn.Conv(8, (3, 3), use_bias=False)
  x = jnp.zeros((2, 16, 16, 4))
  v = conv.init(jax.random.key(0), x)
  fwd = count_flops(conv.apply, v, x)
  # sin: the backward needs the forward (the gradient of a sum of a linear map would not,
  # and dead code is not counted).
  both = count_flops(jax.grad(lambda v, x: jnp.sin(conv.apply(v, x)).sum(), argnums=(0, 1)), v, x)
  assert both == 3 * fwd  # forward, input gradient, kernel gradient
  assert count_flops(jax.grad(lambda v, x: conv.apply(v, x).sum(), argnums=(0, 1)), v, x) == 2 * fwd


def test_onednn_convolutions_count_as_the_convolutions_they_compute():
  from jseg import native
  from jseg.models.conv import Conv
  if native.onednn() is None:
    pytest.skip(native.onednn_error())
  ours, stock = Conv(8, (3, 3), strides=2, use_bias=False), nn.Conv(8, (3, 3), strides=2,
                                                                   use_bias=False)
  x = jnp.zeros((2, 16, 16, 4))
  v = stock.init(jax.random.key(0), x)
  fwd = count_flops(stock.apply, v, x)
  assert count_flops(ours.apply, v, x) == fwd > 0
  assert count_flops(ours.apply, v, x, custom_calls_only=True) == fwd
  assert count_flops(stock.apply, v, x, custom_calls_only=True) == 0  # XLA's own convs
  grads = lambda argnums: jax.grad(lambda v, x: jnp.sin(ours.apply(v, x)).sum(), argnums)  # noqa: E731
  assert count_flops(grads((0, 1)), v, x) == 3 * fwd
  # Gradient w.r.t. the kernel only: the input gradient is not computed (as in torch).
  assert count_flops(grads(0), v, x) == 2 * fwd
  # With an epilogue (a BatchNorm folded in at evaluation): the same convolution.
  from jseg.models import conv as conv_lib
  k = v["params"]["kernel"]
  ep = conv_lib.Epilogue(jnp.ones(8), jnp.zeros(8), True)
  fused = lambda x, k: conv_lib.conv_general_dilated(  # noqa: E731
      x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), epilogue=ep)
  assert "JsegConvScaleBias" in jax.jit(fused).lower(x, k).as_text()
  assert count_flops(fused, x, k, custom_calls_only=True) == fwd


def test_scan_counts_its_body_length_times_and_cond_its_largest_branch():
  w = jnp.zeros((6, 6))
  one = count_flops(lambda x: x @ w, jnp.zeros((6,)))

  def scanned(x):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  assert count_flops(scanned, jnp.zeros((6,))) == 5 * one
  big = jnp.zeros((6, 60))
  assert count_flops(lambda p, x: jax.lax.cond(p, lambda x: (x @ big).sum(), lambda x: x.sum(), x),
                     True, jnp.zeros((6,))) == 2 * 6 * 60
  # jit and remat are entered, not skipped.
  assert count_flops(jax.jit(jax.checkpoint(lambda x: x @ w)), jnp.zeros((6,))) == one


def test_unet_step_count_equals_torch_flop_counter_on_the_twin():
  torch = pytest.importorskip("torch")
  from torch.utils.flop_counter import FlopCounterMode

  from jseg.bench import models as bench_models
  from jseg.models import build_model
  spec = importlib.util.spec_from_file_location(
      "torch_models", bench_models.REPO_ROOT / "benchmarks" / "torch_models.py")
  torch_models = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(torch_models)
  c = bench_models.bench_config("unet", 32, 2, overrides={"depth": 3, "width": 4})
  model = build_model(c.model)
  x = jnp.zeros((2, 32, 32, 3))
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))  # tracing only

  def loss(params, batch_stats, x):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sin(out[0].astype(jnp.float32)).mean()  # the last conv's forward is used

  ours = count_flops(jax.grad(loss), v["params"], v["batch_stats"], x)
  import json
  twin = torch_models.build("unet", json.loads(c.model.to_json_best_effort()))
  with FlopCounterMode(display=False) as counter:
    logits, _ = twin(torch.zeros(2, 3, 32, 32))
    torch.sin(logits).mean().backward()
  # The twin's first conv needs no input gradient; jax's grad w.r.t. params skips it too.
  assert ours == pytest.approx(counter.get_total_flops(), rel=1e-9)
  assert ours > 0


def test_dead_code_is_not_counted():
  """A custom VJP that recomputes its input with ``jax.vjp`` traces a forward it never uses
  (``norm.BatchNorm``'s ``then``); XLA drops it, and so does the count."""
  conv = nn.Conv(8, (3, 3), use_bias=False)
  x = jnp.zeros((2, 16, 16, 4))
  v = conv.init(jax.random.key(0), x)
  k = v["params"]["kernel"]
  f = lambda x, k: conv.apply({"params": {"kernel": k}}, x)  # noqa: E731

  @jax.custom_vjp
  def g(x, k):
    return f(x, k)

  def g_fwd(x, k):
    return f(x, k), (x, k)

  def g_bwd(res, ct):
    _, vjp = jax.vjp(f, *res)  # its forward is dead
    return vjp(ct)

  g.defvjp(g_fwd, g_bwd)
  one = count_flops(conv.apply, v, x)
  assert count_flops(jax.grad(lambda x, k: jnp.sin(g(x, k)).sum(), argnums=(0, 1)), x, k) == 3 * one
