"""Tried, not kept (twenty-eighth pass): the initialiser's random draws grouped by shape.

Traces a function, then evaluates its jaxpr in three parts: everything that does not
depend on a draw, each group of identical draws (jax.random's jitted ``_uniform``,
``_normal`` ... with the same inner jaxpr and input types) as one ``lax.map`` loop, then
the rest. One compiled body per group instead of one per parameter.

  python experiments/performance/init_group_draws.py refinenet

prints lower and compile seconds of the bench preset's initialiser (batch 1, 256², the
options ``Setup.state`` compiles with) both ways, a SHA-256 of the state, and the
parameters that differ.
"""
import collections
import jax
import jax.numpy as jnp
from jax.extend import core as jcore

RANDOM_NAMES = ("_uniform", "_normal", "_normal_real", "_truncated_normal", "_bits")


def _is_var(v):
  return isinstance(v, jcore.Var) and not isinstance(v, jcore.DropVar) and not isinstance(v, jcore.Literal)


def grouped(fn):
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    treedef = jax.tree.structure(out_shape)
    outs = _eval_grouped(closed, *jax.tree.leaves(args))
    return jax.tree.unflatten(treedef, outs)
  return wrapped


def _eval_grouped(closed, *args):
  jaxpr = closed.jaxpr
  # one level of nesting: fn may be a jit whose body holds the draws
  groups = collections.defaultdict(list)
  tainted = set()
  plain, late = [], []
  for e in jaxpr.eqns:
    ins = [v for v in e.invars if _is_var(v)]
    if any(v in tainted for v in ins):
      late.append(e)
      tainted.update(v for v in e.outvars if _is_var(v))
    elif e.primitive.name == "jit" and e.params.get("name") in RANDOM_NAMES:
      key = (id(e.params["jaxpr"]), tuple(str(v.aval) for v in e.invars))
      groups[key].append(e)
      tainted.update(v for v in e.outvars if _is_var(v))
    else:
      plain.append(e)
  # phase A: untainted eqns; export every var later phases read
  needed = set()
  for g in groups.values():
    for e in g:
      needed.update(v for v in e.invars if _is_var(v))
  for e in late:
    needed.update(v for v in e.invars if _is_var(v))
  needed.update(v for v in jaxpr.outvars if _is_var(v))
  produced_a = set(jaxpr.invars) | set(jaxpr.constvars)
  for e in plain:
    produced_a.update(v for v in e.outvars if _is_var(v))
  a_out = [v for v in produced_a if v in needed]
  ja = jcore.Jaxpr(jaxpr.constvars, jaxpr.invars, a_out, plain)
  a_vals = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(ja, closed.consts))(*args)
  env = dict(zip(a_out, a_vals))
  # phase B: each group as one loop
  for g in groups.values():
    inner = g[0].params["jaxpr"]
    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]
    if len(g) == 1:
      outs = jcore.jaxpr_as_fun(inner)(*[read(v) for v in g[0].invars])
      env.update(zip(g[0].outvars, outs))
      continue
    stacked = [jnp.stack([read(e.invars[i]) for e in g]) for i in range(len(g[0].invars))]
    outs = jax.lax.map(lambda xs: tuple(jcore.jaxpr_as_fun(inner)(*xs)), tuple(stacked))
    for j, e in enumerate(g):
      for k, v in enumerate(e.outvars):
        if _is_var(v):
          env[v] = outs[k][j]
  # phase C: the rest
  c_in = [v for v in env if any(v is w for w in needed)] 
  c_in = list(dict.fromkeys(c_in))
  jc = jcore.Jaxpr([], c_in, jaxpr.outvars, late)
  return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jc, []))(*[env[v] for v in c_in])


def main() -> None:
  import hashlib
  import sys
  import time

  import numpy as np

  from jseg import trainer
  from jseg.bench.models import bench_config

  opts = {"xla_cpu_use_fusion_emitters": False}
  run = trainer.setup(bench_config(sys.argv[1], 256, 1))
  body = run.init_fn.__wrapped__

  def sha(st):
    leaves = jax.tree.leaves((st.params, st.batch_stats, st.opt_state))
    return hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest()[:12]

  states = {}
  for name, fn in (("plain", jax.jit(body)), ("grouped", jax.jit(grouped(body)))):
    t = time.time()
    low = fn.lower(run.init_rng)
    tl = time.time() - t
    t = time.time()
    c = low.compile(compiler_options=opts)
    tc = time.time() - t
    states[name] = c(run.init_rng)
    print(name, f"lower {tl:.2f} s, compile {tc:.2f} s, sha {sha(states[name])}")
  a = jax.tree_util.tree_leaves_with_path(states["plain"].params)
  b = jax.tree.leaves(states["grouped"].params)
  diff = [(jax.tree_util.keystr(p), float(np.abs(np.asarray(x) - np.asarray(y)).max()))
          for (p, x), y in zip(a, b) if not np.array_equal(x, y)]
  print(f"parameters that differ: {len(diff)} of {len(b)}; largest differences {sorted(d for _, d in diff)[-3:]}")


if __name__ == "__main__":
  main()
