"""Model FLOPs from a function's jaxpr: convolutions and matrix products only.

``count_flops(fn, *args)`` traces ``fn`` (no compilation, any backend) and sums
``2 * multiply-adds`` of every ``conv_general_dilated`` and ``dot_general`` in
it, entering calls, ``jit``, ``remat`` and custom-derivative rules, counting a
``scan`` body ``length`` times and the largest branch of a ``cond``. jseg's oneDNN
convolutions (``ffi_call`` to ``JsegConv*``, ``jseg.models.conv``) count as the
convolutions they compute. This is the
convention of model-FLOP utilisation (and of ``torch.utils.flop_counter``):
elementwise ops, reductions and data movement are left out.

Why not XLA's ``cost_analysis()``: on GPU the compiled executable hides its
convolutions in cuDNN custom calls and the count drops to the elementwise ops
(measured on an H200: 5.7 GFLOP per image for a PSPNet step that does about
1,100), and the pre-optimisation count is 0 there. The jaxpr is the same on
every backend.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax import core as jax_core

try:  # jax >= 0.4.36 moved the jaxpr types to jax.extend.core
  from jax.extend.core import ClosedJaxpr, Jaxpr
except ImportError:  # pragma: no cover
  ClosedJaxpr, Jaxpr = jax_core.ClosedJaxpr, jax_core.Jaxpr


def count_flops(fn: Callable[..., Any], *args: Any, custom_calls_only: bool = False,
                **kwargs: Any) -> float:
  """FLOPs (2 x multiply-adds) of the convolutions and matmuls ``fn(*args)`` runs.

  ``custom_calls_only``: count only jseg's oneDNN convolutions, the part XLA's
  ``cost_analysis()`` cannot see (custom calls count 0 there).
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return jaxpr_flops(closed.jaxpr, custom_calls_only)


def jaxpr_flops(jaxpr: Jaxpr, custom_calls_only: bool = False, dce: bool = True) -> float:
  """FLOPs of ``jaxpr``; ``dce``: first drop what none of its outputs uses, as XLA does (a
  custom VJP that recomputes a value with ``jax.vjp`` traces a forward it never uses)."""
  if dce:
    jaxpr = _dce(jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += 0.0 if custom_calls_only else _conv_flops(eqn)
    elif name == "dot_general":
      total += 0.0 if custom_calls_only else _dot_flops(eqn)
    elif name == "ffi_call" and str(eqn.params.get("target_name", "")).startswith("JsegConv"):
      total += _onednn_conv_flops(eqn)
    elif name == "cond":
      total += max((jaxpr_flops(_unwrap(b), custom_calls_only, False)
                    for b in eqn.params["branches"]),
                   default=0.0)
    else:
      inner = sum(jaxpr_flops(j, custom_calls_only, False) for j in _sub_jaxprs(eqn.params))
      if name == "scan":
        inner *= eqn.params["length"]
      total += inner
  return total


def _dce(jaxpr: Jaxpr) -> Jaxpr:
  """``jaxpr`` without the equations no output depends on (nested calls too), or as it is
  where jax's dead-code elimination is unavailable."""
  try:
    from jax._src.interpreters import partial_eval as pe  # noqa: PLC0415 - internal API
    return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)[0]
  except Exception:  # noqa: BLE001 - an optional refinement of the count
    return jaxpr


def _unwrap(j: Any) -> Jaxpr:
  return j.jaxpr if isinstance(j, ClosedJaxpr) else j


def _sub_jaxprs(params: dict[str, Any]) -> list[Jaxpr]:
  """The jaxprs a primitive runs (call bodies, scan/while bodies, remat, custom rules' primal)."""
  out = []
  for key, value in params.items():
    if key in ("fwd_jaxpr_thunk", "bwd", "jvp_jaxpr_fun", "jvp_jaxpr_thunk"):
      continue  # derivative rules: the traced program already contains what runs
    if isinstance(value, (Jaxpr, ClosedJaxpr)):
      out.append(_unwrap(value))
  return out


def _conv_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  rhs_spec = dn.rhs_spec  # (out-feature dim, in-feature dim, spatial dims...)
  window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  in_features = rhs.shape[rhs_spec[1]]
  return 2.0 * math.prod(out.shape) * window * in_features


def _onednn_conv_flops(eqn) -> float:
  """A oneDNN convolution (forward, input or kernel gradient): 2 x |dy| x KH x KW x C_in/G."""
  target = eqn.params["target_name"]
  ins, out = [v.aval for v in eqn.invars], eqn.outvars[0].aval
  if target in ("JsegConvFwd", "JsegConvBias", "JsegConvBiasAdd", "JsegConvScaleBias",
                "JsegConvScaleBiasAdd"):
    dy, k = out, ins[1]
  elif target == "JsegConvBwdData":
    dy, k = ins[0], ins[1]
  elif target == "JsegConvBwdWeights":
    dy, k = ins[1], out
  else:
    return 0.0
  return 2.0 * math.prod(dy.shape) * k.shape[0] * k.shape[1] * k.shape[2]


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (_, rc), (_, rb) = eqn.params["dimension_numbers"]
  free_rhs = math.prod(d for i, d in enumerate(rhs.shape) if i not in rc and i not in rb)
  return 2.0 * math.prod(lhs.shape) * free_rhs
