// 2-D convolution (forward, input gradient, kernel gradient) as XLA FFI handlers calling
// oneDNN, the library torch's CPU convolutions use. XLA:CPU's own convolutions and the
// layout transposes it inserts around kernel gradients are the largest remaining cost of a
// jseg training step on CPU (experiments/performance/README.md).
//
// Layouts are JAX's: activations NHWC, kernels HWIO (grouped: HW(I/G)(O), output channels
// group-major). Activations are handed to oneDNN as they are (nhwc); kernels are reordered
// to and from the blocked layout oneDNN picks, which is cheap (kernels are small).
// float32 only. Built by jseg/native/__init__.py; used through jseg/models/conv.py.
// A call runs whole on OpenMP's threads or cut into single-threaded parts on XLA's intra-op
// threads (RunSplit; the `split` and `chunks` attributes, chosen by conv.conv_split).
//
// Also BatchNorm's training forward and backward (optionally with the ReLU after it) over
// [M, C] rows, each one call with two passes over the data: XLA:CPU compiles a
// BatchNorm layer into ~10 kernels (sums, per-channel terms, running averages), and every
// kernel costs compiler memory; these are thunks. Used through jseg/models/norm.py. And
// the loss end's class log-probabilities (jseg/losses.py), the depthwise kernel gradient
// (jseg/models/layers.py) and the sum of squares of many buffers (jseg/optim.py).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// GNU OpenMP, which oneDNN's wheel links: its thread count is per calling thread.
extern "C" int omp_get_max_threads(void);
extern "C" void omp_set_num_threads(int);

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// Sets this thread's OpenMP thread count for a scope (threads > 0), so that a oneDNN
// primitive built and run inside it is single-threaded: no OpenMP team is started.
class OmpThreads {
 public:
  explicit OmpThreads(int threads) : prev_(threads > 0 ? omp_get_max_threads() : 0) {
    if (threads > 0) omp_set_num_threads(threads);
  }
  ~OmpThreads() {
    if (prev_ > 0) omp_set_num_threads(prev_);
  }

 private:
  int prev_;
};

// Geometry of one convolution, from the NHWC input, HWIO kernel and NHWC output shapes.
struct Geom {
  int64_t n, h, w, c, kh, kw, ci_g, oc, oh, ow, groups;
  memory::dims strides, dil, pad_l, pad_r;

  std::string Key(char kind) const {
    std::ostringstream s;
    s << kind << n << ',' << h << ',' << w << ',' << c << ',' << kh << ',' << kw << ','
      << ci_g << ',' << oc << ',' << oh << ',' << ow << ',' << groups;
    for (auto* v : {&strides, &dil, &pad_l, &pad_r})
      for (auto d : *v) s << ',' << d;
    return s.str();
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, dt::f32, tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, oc, oh, ow}, dt::f32, tag::nhwc); }
  memory::dims WeiDims() const {
    if (groups == 1) return {oc, ci_g, kh, kw};
    return {groups, oc / groups, ci_g, kh, kw};
  }
  memory::desc WeiUser() const {
    return memory::desc(WeiDims(), dt::f32, groups == 1 ? tag::hwio : tag::hwigo);
  }
  memory::desc WeiAny() const { return memory::desc(WeiDims(), dt::f32, tag::any); }
  memory::desc Bias() const { return memory::desc({oc}, dt::f32, tag::a); }
  // The reorder attribute's mask over WeiDims() of a per-output-channel scale (oc values,
  // in HWIO's output-channel order: group-major when grouped).
  int ScaleMask() const { return groups == 1 ? 1 : 3; }
};

// A kernel reorder from `from` to `to` that multiplies each output channel by a scale
// (kinds 'P' to 'S') when `scaled`, else a plain one.
dnnl::reorder KernelReorder(const memory::desc& from, const memory::desc& to, bool scaled,
                            int mask) {
  dnnl::primitive_attr attr;
  if (scaled) attr.set_scales_mask(DNNL_ARG_SRC, mask);
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to, attr));
}

// Runs a kernel reorder, passing the scales (n values at `scale`) when given.
void RunReorder(const dnnl::reorder& r, const dnnl::stream& s, const memory& from,
                const memory& to, const float* scale, int64_t n) {
  std::unordered_map<int, memory> args{{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
  if (scale)
    args[DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC] =
        memory(memory::desc({n}, dt::f32, tag::a), Engine(), const_cast<float*>(scale));
  r.execute(s, args);
}

// Call kinds: 'f' forward, 'd' input gradient, 'w' kernel gradient, and the inference
// forward with an epilogue on its output in the same pass (a BatchNorm at evaluation, its
// scale folded into the kernel by the caller): + a per-channel bias, then + the output
// buffer's previous contents (a residual: oneDNN's sum post-op) for 'r' and 's', then ReLU
// (eltwise post-op) for 'q' and 's' ('p': the bias only). Bias and ReLU cost nothing in
// oneDNN's kernels; per-channel scale and shift as binary post-ops made brgconv slower
// than a separate pass (twelfth pass, experiments/performance/README.md). 'P' to 'S': the
// same with a per-output-channel scale that the kernel's reorder into oneDNN's layout
// applies (a reorder attribute), so no separate pass over the kernel scales it first; the
// reorder runs every call anyway, and is made a scaled copy where the layouts agree.
bool Scaled(char kind) { return kind >= 'P' && kind <= 'S'; }
char Unscaled(char kind) { return Scaled(kind) ? static_cast<char>(kind - 'P' + 'p') : kind; }
bool Epilogue(char kind) { return Unscaled(kind) >= 'p' && Unscaled(kind) <= 's'; }
bool Forward(char kind) { return kind == 'f' || Epilogue(kind); }
bool EpilogueSum(char kind) { return Unscaled(kind) == 'r' || Unscaled(kind) == 's'; }
bool EpilogueRelu(char kind) { return Unscaled(kind) == 'q' || Unscaled(kind) == 's'; }

ffi::Error MakeGeom(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                    ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                    ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                    int64_t groups, Geom* g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      dilation.size() != 2 || padding.size() != 4)
    return ffi::Error::InvalidArgument("onednn conv: expected rank-4 NHWC/HWIO operands");
  g->n = x[0]; g->h = x[1]; g->w = x[2]; g->c = x[3];
  g->kh = k[0]; g->kw = k[1]; g->ci_g = k[2]; g->oc = k[3];
  g->oh = y[1]; g->ow = y[2]; g->groups = groups;
  if (groups < 1 || g->c != g->ci_g * groups || g->oc % groups != 0 || y[0] != x[0] ||
      y[3] != k[3])
    return ffi::Error::InvalidArgument("onednn conv: inconsistent shapes or groups");
  g->strides = {strides[0], strides[1]};
  g->dil = {dilation[0] - 1, dilation[1] - 1};  // oneDNN counts dilation from 0
  g->pad_l = {padding[0], padding[2]};
  g->pad_r = {padding[1], padding[3]};
  return ffi::Error::Success();
}

// Primitives are built once per geometry (oneDNN JIT-compiles them) and reused.
struct Prims {
  dnnl::primitive prim;
  memory::desc wei;      // the kernel layout the primitive wants
  bool reorder = false;  // whether it differs from the user's HWIO
  dnnl::reorder to_wei, from_wei;  // HWIO -> wei (forward, input gradient), wei -> HWIO
  memory::desc scratch;  // its scratchpad
  std::string impl;      // oneDNN's name for the implementation it picked
  // Kernel gradient only: x and dy reordered from NHWC into the blocked layouts the
  // primitive wants (BlockedActivations), into the workspace, before it runs.
  bool act = false;
  memory::desc src, dst;            // x's and dy's layouts the primitive reads
  dnnl::reorder to_src, to_dst;     // NHWC -> src / dst
};

std::mutex cache_mu;
std::unordered_map<std::string, std::shared_ptr<Prims>> cache;

dnnl::convolution_forward::primitive_desc FwdPd(const Geom& g, bool any_act = false) {
  const memory::desc src = any_act ? memory::desc({g.n, g.c, g.h, g.w}, dt::f32, tag::any) : g.Src();
  const memory::desc dst = any_act ? memory::desc({g.n, g.oc, g.oh, g.ow}, dt::f32, tag::any) : g.Dst();
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      src, g.WeiAny(), dst, g.strides, g.dil, g.pad_l, g.pad_r, dnnl::primitive_attr());
}

// Whether a kernel gradient reads x and dy in oneDNN's blocked layouts (reordered from
// NHWC first) rather than in NHWC. oneDNN 3.2's direct kernel-gradient kernel for AVX2
// machines (`jit:avx2`, no AVX-512) is written for blocked activations: on NHWC it ran
// 2.5-7x slower than on blocked ones with both reorders counted (a 3x3 layer, 2 images
// 128x128x64 on one thread: 315 ms against 7 + 41; experiments/performance/README.md,
// fourteenth pass). AVX-512 machines get brgemm kernels that read NHWC as it is. Not for
// fewer than 8 input or output channels (a first layer's 3), which the blocked layout pads
// to 8: there the reorders cost more than they save (26 -> 40 ms, 4 x 256x256x3 -> 32).
// JSEG_CONV_BLOCKED=0 turns this off (for A/B measurements; read once per process).
bool BlockedActivations(const Geom& g, const std::string& nhwc_impl) {
  static const bool off = [] {
    const char* v = std::getenv("JSEG_CONV_BLOCKED");
    return v && std::string(v) == "0";
  }();
  return !off && nhwc_impl == "jit:avx2" && g.ci_g >= 8 && g.oc / g.groups >= 8;
}

dnnl::primitive_attr UserScratch() {
  dnnl::primitive_attr a;
  a.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return a;
}

// threads: 0 builds the primitive for OpenMP's default team, 1 for one thread.
std::shared_ptr<Prims> Get(const Geom& g, char kind, int threads = 0) {
  std::string key = g.Key(kind) + (threads ? "/1" : "");
  {
    std::lock_guard<std::mutex> l(cache_mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  OmpThreads scope(threads);
  auto p = std::make_shared<Prims>();
  if (kind == 'f') {
    auto pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        g.Src(), g.WeiAny(), g.Dst(), g.strides, g.dil, g.pad_l, g.pad_r, UserScratch());
    p->prim = dnnl::convolution_forward(pd);
    p->wei = pd.weights_desc();
    p->scratch = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  } else if (Epilogue(kind)) {
    dnnl::post_ops po;
    if (EpilogueSum(kind)) po.append_sum(1.f);
    if (EpilogueRelu(kind)) po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr attr = UserScratch();
    attr.set_post_ops(po);
    auto pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        g.Src(), g.WeiAny(), g.Bias(), g.Dst(), g.strides, g.dil, g.pad_l, g.pad_r, attr);
    p->prim = dnnl::convolution_forward(pd);
    p->wei = pd.weights_desc();
    p->scratch = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  } else if (kind == 'd') {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.WeiAny(), g.Dst(), g.strides,
        g.dil, g.pad_l, g.pad_r, FwdPd(g), UserScratch());
    p->prim = dnnl::convolution_backward_data(pd);
    p->wei = pd.weights_desc();
    p->scratch = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.WeiAny(), g.Dst(), g.strides,
        g.dil, g.pad_l, g.pad_r, FwdPd(g), UserScratch());
    if (BlockedActivations(g, pd.impl_info_str())) {
      auto blocked = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct,
          memory::desc({g.n, g.c, g.h, g.w}, dt::f32, tag::any), g.WeiAny(),
          memory::desc({g.n, g.oc, g.oh, g.ow}, dt::f32, tag::any), g.strides, g.dil, g.pad_l,
          g.pad_r, FwdPd(g, true), UserScratch());
      if (blocked.src_desc() != g.Src() || blocked.diff_dst_desc() != g.Dst()) {
        pd = blocked;
        p->act = true;
        p->src = pd.src_desc();
        p->dst = pd.diff_dst_desc();
        p->to_src = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), g.Src(), Engine(), p->src));
        p->to_dst = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), g.Dst(), Engine(), p->dst));
      }
    }
    p->prim = dnnl::convolution_backward_weights(pd);
    p->wei = pd.diff_weights_desc();
    p->scratch = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  }
  p->reorder = p->wei != g.WeiUser() || Scaled(kind);
  if (p->reorder) {
    if (kind == 'w')
      p->from_wei = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), p->wei, Engine(),
                                                                g.WeiUser()));
    else
      p->to_wei = KernelReorder(g.WeiUser(), p->wei, Scaled(kind), g.ScaleMask());
  }
  std::lock_guard<std::mutex> l(cache_mu);
  cache.emplace(key, p);
  return p;
}

// A page-aligned buffer that only grows. oneDNN aligns parts of a scratchpad inside it
// relative to absolute addresses, so an unaligned base would let it write past the end.
class Buffer {
 public:
  ~Buffer() { std::free(p_); }
  void* Get(size_t n) {
    if (n > n_) {
      std::free(p_);
      n_ = (n + 4095) / 4096 * 4096;
      p_ = std::aligned_alloc(4096, n_);
      if (!p_) throw std::bad_alloc();
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// Per-calling-thread buffers: the same primitive may run on two XLA threads at once.
thread_local Buffer scratch_buf, wei_buf, act_buf;

template <class F>
ffi::Error Guard(F f) {
  try {
    f();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

size_t Pages(size_t n) { return (n + 4095) / 4096 * 4096; }

// Bytes of blocked x and dy a kernel gradient with BlockedActivations wants, page-aligned.
size_t ActBytes(const Prims& p) {
  return p.act ? Pages(p.src.get_size()) + Pages(p.dst.get_size()) : 0;
}

// Bytes of workspace one call needs: its scratchpad, the kernel in oneDNN's layout and the
// blocked activations (ActBytes), each page-aligned, plus a page to align the base.
size_t WorkspaceBytes(const Prims& p) {
  return 4096 + Pages(p.scratch.get_size()) + (p.reorder ? Pages(p.wei.get_size()) : 0) +
         ActBytes(p);
}

// A kernel gradient with BlockedActivations: reorders x (at x) and dy (at dy, its NHWC
// layout `dy_user`, by default the primitive's geometry's) into the blocked buffer at
// `act` and points the primitive's arguments at them.
void BlockArgs(const Prims& p, const Geom& g, const void* x, const void* dy, char* act,
               std::unordered_map<int, memory>& args, const dnnl::stream& s,
               const dnnl::reorder* dy_reorder = nullptr, const memory::desc* dy_user = nullptr) {
  memory xb(p.src, Engine(), act), yb(p.dst, Engine(), act + Pages(p.src.get_size()));
  memory xu(g.Src(), Engine(), const_cast<void*>(x));
  memory yu(dy_user ? *dy_user : g.Dst(), Engine(), const_cast<void*>(dy));
  p.to_src.execute(s, xu, xb);
  (dy_reorder ? *dy_reorder : p.to_dst).execute(s, yu, yb);
  args[DNNL_ARG_SRC] = xb;
  args[DNNL_ARG_DIFF_DST] = yb;
}

// A convolution primitive's arguments. 'f' (and the epilogue kinds): a = x, out = y; 'd': a
// = dy, out = dx; 'w': a = x, b = dy; w = the kernel ('f', 'd') or its gradient ('w') in the
// primitive's layout; bias: the epilogue kinds' bias.
std::unordered_map<int, memory> Args(char kind, const Geom& g, void* a, void* b, void* out,
                                     const memory& w, const memory& scratch,
                                     const float* bias = nullptr) {
  std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, scratch}};
  if (Forward(kind)) {
    args[DNNL_ARG_SRC] = memory(g.Src(), Engine(), a);
    args[DNNL_ARG_WEIGHTS] = w;
    args[DNNL_ARG_DST] = memory(g.Dst(), Engine(), out);
    if (Epilogue(kind)) args[DNNL_ARG_BIAS] = memory(g.Bias(), Engine(), const_cast<float*>(bias));
  } else if (kind == 'd') {
    args[DNNL_ARG_DIFF_DST] = memory(g.Dst(), Engine(), a);
    args[DNNL_ARG_WEIGHTS] = w;
    args[DNNL_ARG_DIFF_SRC] = memory(g.Src(), Engine(), out);
  } else {
    args[DNNL_ARG_SRC] = memory(g.Src(), Engine(), a);
    args[DNNL_ARG_DIFF_DST] = memory(g.Dst(), Engine(), b);
    args[DNNL_ARG_DIFF_WEIGHTS] = w;
  }
  return args;
}

// Runs one cached primitive on XLA's buffers. 'f': a = x, b = k, out = y; 'd': a = dy,
// b = k, out = dx; 'w': a = x, b = dy, out = dk.
// ws: XLA's workspace output of the call (WorkspaceBytes), so the scratchpad and the
// reordered kernel live in XLA's buffers, shared between calls by its buffer assignment;
// when it is too small (or absent), per-thread buffers that only grow.
void Run(const Geom& g, char kind, void* a, void* b, void* out, void* ws, size_t ws_bytes,
         const float* bias, const float* scale) {
  auto p = Get(g, kind);
  dnnl::stream s(Engine());
  const bool kernel_in = kind != 'w';
  void* scratch_ptr;
  void* wei_ptr = nullptr;
  char* act_ptr = nullptr;
  if (ws && ws_bytes >= WorkspaceBytes(*p)) {
    char* base = reinterpret_cast<char*>(Pages(reinterpret_cast<uintptr_t>(ws)));
    scratch_ptr = base;
    wei_ptr = base + Pages(p->scratch.get_size());
    act_ptr = static_cast<char*>(wei_ptr) + (p->reorder ? Pages(p->wei.get_size()) : 0);
  } else {
    scratch_ptr = scratch_buf.Get(p->scratch.get_size());
    if (p->reorder) wei_ptr = wei_buf.Get(p->wei.get_size());
    if (p->act) act_ptr = static_cast<char*>(act_buf.Get(ActBytes(*p)));
  }
  memory user_w(g.WeiUser(), Engine(), kernel_in ? b : out);
  memory w = user_w;
  if (p->reorder) {
    w = memory(p->wei, Engine(), wei_ptr);
    if (kernel_in) RunReorder(p->to_wei, s, user_w, w, scale, g.oc);
  }
  auto args = Args(kind, g, a, b, out, w, memory(p->scratch, Engine(), scratch_ptr), bias);
  if (p->act) BlockArgs(*p, g, a, b, act_ptr, args, s);
  p->prim.execute(s, args);
  if (!kernel_in && p->reorder) p->from_wei.execute(s, w, user_w);
  s.wait();
}


// Rows and channels of an array whose last axis is the channel axis.
void RowsCols(ffi::Span<const int64_t> d, int64_t* m, int64_t* c) {
  *c = d.size() == 0 ? 1 : d[d.size() - 1];
  *m = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) *m *= d[i];
}

// Runs f(q) for q in [0, n) on the calling thread and, when the work is large enough
// (elements >= 32k), on XLA's intra-op threads too (the FFI's thread pool, so no second
// pool competes for the cores). The caller takes chunks itself and waits only for chunks a
// helper has already claimed, so it never waits on a task that has not started; a helper
// that starts after every chunk is claimed returns without touching f.
template <class F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t elements, const F& f) {
  const int helpers = elements < (int64_t{1} << 15)
                          ? 0
                          : static_cast<int>(std::min<int64_t>(pool.num_threads(), n - 1));
  if (helpers <= 0) {
    for (int64_t q = 0; q < n; ++q) f(q);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, &f] {
    for (int64_t q; (q = st->next.fetch_add(1)) < n;) {
      f(q);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int i = 0; i < helpers; ++i) {
    auto task = work;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// ParallelFor over the parts of a oneDNN call, each run single-threaded (OmpThreads(1)). A
// part that throws (a oneDNN error) records it; the first is rethrown here once every part
// has finished, so no part outlives the buffers of the call.
template <class F>
void ParallelParts(ffi::ThreadPool& pool, int64_t n, const F& f) {
  std::mutex mu;
  std::string err;
  ParallelFor(pool, n, int64_t{1} << 40, [&](int64_t q) {
    try {
      OmpThreads one(1);
      f(q);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> l(mu);
      if (err.empty()) err = e.what();
    }
  });
  if (!err.empty()) throw std::runtime_error(err);
}

// How a convolution call is cut over XLA's intra-op threads (its `split` attribute):
// 0: one oneDNN call on OpenMP's team (oneDNN's own threads, which then compete with
// XLA's for the cores while XLA runs other kernels beside the call); 1: `chunks` equal
// groups of images; 2: every image's output rows in `chunks` bands (forward; kernel
// gradient, whose bands are then added like image groups'); 3:
// `chunks` groups of output channels (kernel gradient only: each part reads every image and
// writes its own channels of the kernel gradient, so no part holds a whole kernel); 4:
// `chunks` groups of input channels (input gradient only: each part reads all of dy and its
// channels of the kernel, and writes its channels of dx through a buffer). Each
// part is a single-threaded oneDNN call on one of XLA's threads (ParallelFor), so no
// second pool of threads exists; the parts' kernel gradients are added in part order,
// so the bits do not depend on which thread ran which part.
struct Part {
  Geom g;
  int64_t src_off, dst_off;  // offsets (floats) of the part's first input / output element
};

std::vector<Part> Parts(const Geom& g, int64_t split, int64_t chunks) {
  std::vector<Part> out;
  if (split == 4) {  // src_off: the part's first input channel
    for (int64_t q = 0; q < chunks; ++q) {
      Part p{g, q * (g.c / chunks), 0};
      p.g.c = p.g.ci_g = g.c / chunks;
      out.push_back(p);
    }
    return out;
  }
  if (split == 3) {  // dst_off: the part's first output channel
    for (int64_t q = 0; q < chunks; ++q) {
      Part p{g, 0, q * (g.oc / chunks)};
      p.g.oc = g.oc / chunks;
      out.push_back(p);
    }
    return out;
  }
  if (split == 1) {
    const int64_t nq = g.n / chunks;
    for (int64_t q = 0; q < chunks; ++q) {
      Part p{g, q * nq * g.h * g.w * g.c, q * nq * g.oh * g.ow * g.oc};
      p.g.n = nq;
      out.push_back(p);
    }
    return out;
  }
  const int64_t s = g.strides[0], eff = (g.kh - 1) * (g.dil[0] + 1) + 1;
  for (int64_t i = 0; i < g.n; ++i) {
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t r0 = q * g.oh / chunks, r1 = (q + 1) * g.oh / chunks;
      const int64_t start = r0 * s - g.pad_l[0], end = (r1 - 1) * s - g.pad_l[0] + eff;
      const int64_t lo = std::max<int64_t>(0, start), hi = std::min(g.h, end);
      Part p{g, (i * g.h + lo) * g.w * g.c, (i * g.oh + r0) * g.ow * g.oc};
      p.g.n = 1;
      p.g.h = hi - lo;
      p.g.oh = r1 - r0;
      p.g.pad_l[0] = lo - start;
      p.g.pad_r[0] = end - hi;
      out.push_back(p);
    }
  }
  return out;
}

ffi::Error CheckSplit(const Geom& g, char kind, int64_t split, int64_t chunks) {
  if (split == 0 && chunks == 1) return ffi::Error::Success();
  if (split == 1 && chunks >= 2 && g.n % chunks == 0) return ffi::Error::Success();
  if (split == 2 && (Forward(kind) || kind == 'w') && chunks >= 1 && chunks <= g.oh &&
      g.n * chunks >= 2) {
    for (const Part& p : Parts(g, split, chunks))
      if (p.g.h < 1) return ffi::Error::InvalidArgument("onednn conv: a row band reads no input row");
    return ffi::Error::Success();
  }
  if (split == 3 && kind == 'w' && g.groups == 1 && chunks >= 2 && g.oc % chunks == 0)
    return ffi::Error::Success();
  if (split == 4 && kind == 'd' && g.groups == 1 && chunks >= 2 && g.c % chunks == 0)
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument("onednn conv: invalid split/chunks for this call");
}

// A kernel's reorder between two layouts cut along the kernel's first dimension (output
// channels; groups when grouped) into pieces whose bounds fall on both layouts' blocks,
// each a single-threaded reorder of a sub-memory, so that the parts' threads share it.
// Empty (use the whole reorder) when a layout pads the kernel (a piece would leave the
// padding unwritten) or there is less than two blocks' worth.
// Scaled (kinds 'P' to 'S'): each piece multiplies its output channels by their scales,
// `scale_at[q]` the piece's first scale and `scales[q]` how many.
struct ChunkedReorder {
  std::vector<dnnl::reorder> prims;
  std::vector<memory::desc> from, to;
  std::vector<int64_t> scale_at, scales;
};

ChunkedReorder MakeChunked(const memory::desc& from, const memory::desc& to, int64_t chunks,
                           bool scaled = false, int mask = 0) {
  ChunkedReorder c;
  const memory::dims dims = from.get_dims();
  if (chunks < 2 || from.get_padded_dims() != dims || to.get_padded_dims() != dims) return c;
  int64_t block = 1;
  for (const memory::desc* d : {&from, &to}) {
    const memory::dims blks = d->get_inner_blks(), idxs = d->get_inner_idxs();
    int64_t b = 1;
    for (size_t i = 0; i < blks.size(); ++i)
      if (idxs[i] == 0) b *= blks[i];
    block = std::lcm(block, b);
  }
  if (dims[0] % block) return c;
  const int64_t units = dims[0] / block, pieces = std::min(chunks, units);
  if (pieces < 2) return c;
  OmpThreads one(1);
  for (int64_t q = 0; q < pieces; ++q) {
    const int64_t u0 = q * units / pieces, u1 = (q + 1) * units / pieces;
    memory::dims sub = dims, offsets(dims.size(), 0);
    sub[0] = (u1 - u0) * block;
    offsets[0] = u0 * block;
    c.from.push_back(from.submemory_desc(sub, offsets));
    c.to.push_back(to.submemory_desc(sub, offsets));
    c.prims.push_back(KernelReorder(c.from.back(), c.to.back(), scaled, mask));
    // Output channels per unit of the first dimension: 1, or per group when grouped.
    const int64_t per = dims.size() == 5 ? dims[1] : 1;
    c.scale_at.push_back(offsets[0] * per);
    c.scales.push_back(sub[0] * per);
  }
  return c;
}

// Runs `c`'s pieces on XLA's threads (or, when it is empty, `whole` on this thread); scale:
// the kernel's `n` output-channel scales when the reorders are scaled.
void Reorder(const ChunkedReorder& c, const dnnl::reorder& whole, const memory& from,
             const memory& to, ffi::ThreadPool& pool, const float* scale = nullptr,
             int64_t n = 0) {
  if (c.prims.empty()) {
    dnnl::stream s(Engine());
    RunReorder(whole, s, from, to, scale, n);
    s.wait();
    return;
  }
  void* a = from.get_data_handle();
  void* b = to.get_data_handle();
  ParallelParts(pool, static_cast<int64_t>(c.prims.size()), [&](int64_t q) {
    dnnl::stream sq(Engine());
    memory mf(c.from[q], Engine(), a), mt(c.to[q], Engine(), b);
    RunReorder(c.prims[q], sq, mf, mt, scale ? scale + c.scale_at[q] : nullptr, c.scales[q]);
    sq.wait();
  });
}

// A split call's primitives (single-threaded) and where its workspace puts each part's
// scratchpad and kernel: `wei[q]` is the kernel in part q's layout (forward / input
// gradient: shared by the parts whose layout is part 0's) or part q's kernel gradient
// (kernel gradient: every part but part 0 without a reorder, which writes the output).
struct SplitPlan {
  std::vector<Part> parts;
  std::vector<std::shared_ptr<Prims>> prims;
  std::vector<size_t> scratch_at, wei_at;  // byte offsets from the aligned base
  std::vector<bool> owns_wei;              // whether part q reorders / writes its own
  std::vector<size_t> dy_at;               // split 3: each part's channels of dy; 4: of dx
  std::vector<dnnl::reorder> to_out;       // split 3: its kernel gradient into the output's;
                                           // 4: its channels of the kernel into its layout
  std::vector<size_t> act_at;              // each part's blocked x and dy (Prims::act)
  std::vector<memory::desc> dy_view;       // split 3 with act: its channels of dy in place
  std::vector<dnnl::reorder> dy_part;      // and their reorder into its blocked dy
  ChunkedReorder wei0;                     // part 0's kernel reorder (to or from HWIO), cut
  size_t bytes = 0;                        // workspace wanted, with a page to align
};

// Split 3 / 4: part q's output / input channels of the HWIO kernel (or its gradient), in
// place: the part's kernel dimensions with the whole kernel's strides.
memory::desc KernelPart(const Geom& full, const Geom& part) {
  return memory::desc(part.WeiDims(), dt::f32,
                      memory::dims{1, full.oc, full.kw * full.ci_g * full.oc, full.ci_g * full.oc});
}

std::mutex plan_mu;
std::unordered_map<std::string, std::shared_ptr<const SplitPlan>> plans;

// Built once per geometry, kind and split, like the primitives.
std::shared_ptr<const SplitPlan> Plan(const Geom& g, char kind, int64_t split, int64_t chunks) {
  const std::string key = g.Key(kind) + "/" + std::to_string(split) + "x" + std::to_string(chunks);
  {
    std::lock_guard<std::mutex> l(plan_mu);
    auto it = plans.find(key);
    if (it != plans.end()) return it->second;
  }
  auto made = std::make_shared<SplitPlan>();
  SplitPlan& sp = *made;
  sp.parts = Parts(g, split, chunks);
  size_t at = 0;
  for (size_t q = 0; q < sp.parts.size(); ++q) {
    auto p = Get(sp.parts[q].g, kind, 1);
    sp.prims.push_back(p);
    sp.scratch_at.push_back(at);
    at += Pages(p->scratch.get_size());
    bool own;
    if (split == 3) {
      own = true;
      const int64_t oq = sp.parts[q].g.oc;
      sp.dy_at.push_back(at);
      if (!p->act) at += Pages(sizeof(float) * g.n * g.oh * g.ow * oq);
      OmpThreads scope(1);
      sp.to_out.push_back(dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), p->wei, Engine(), KernelPart(g, sp.parts[q].g))));
      if (p->act) {
        sp.dy_view.push_back(memory::desc({g.n, oq, g.oh, g.ow}, dt::f32,
                                          memory::dims{g.oh * g.ow * g.oc, 1, g.ow * g.oc, g.oc}));
        sp.dy_part.push_back(dnnl::reorder(
            dnnl::reorder::primitive_desc(Engine(), sp.dy_view.back(), Engine(), p->dst)));
      } else {
        sp.dy_view.emplace_back();
        sp.dy_part.emplace_back();
      }
    } else if (split == 4) {
      own = true;
      sp.dy_at.push_back(at);
      at += Pages(sizeof(float) * g.n * g.h * g.w * sp.parts[q].g.c);
      OmpThreads scope(1);
      sp.to_out.push_back(dnnl::reorder(dnnl::reorder::primitive_desc(
          Engine(), KernelPart(g, sp.parts[q].g), Engine(), p->wei)));
    } else if (kind == 'w')
      own = p->reorder || q > 0;
    else
      own = p->reorder && (q == 0 || !sp.prims[0]->reorder || p->wei != sp.prims[0]->wei);
    sp.owns_wei.push_back(own);
    sp.wei_at.push_back(own ? at : 0);
    if (own) at += Pages(p->wei.get_size());
    sp.act_at.push_back(at);
    at += ActBytes(*p);
  }
  sp.bytes = 4096 + at;
  const Prims& p0 = *sp.prims[0];
  if (kind == 'w' && split == 2)  // the bands' kernel gradients are added in one layout
    for (const auto& p : sp.prims)
      if (p->reorder != p0.reorder || p->wei != p0.wei)
        throw std::runtime_error("row bands whose kernel gradients differ in layout");
  if (split < 3 && p0.reorder)
    sp.wei0 = kind == 'w' ? MakeChunked(p0.wei, g.WeiUser(), chunks)
                          : MakeChunked(g.WeiUser(), p0.wei, chunks, Scaled(kind), g.ScaleMask());
  std::lock_guard<std::mutex> l(plan_mu);
  plans.emplace(key, made);
  return made;
}

// Split 3 (kernel gradient by output channels): part q copies its channels of dy, computes
// their kernel gradient from every image and writes it into its channels of the output.
void RunOutChannels(const SplitPlan& sp, const Geom& g, const float* x, const float* dy,
                    float* out, char* base, ffi::ThreadPool& pool) {
  const int64_t n = static_cast<int64_t>(sp.parts.size());
  const int64_t pixels = g.n * g.oh * g.ow;
  ParallelParts(pool, n, [&](int64_t q) {
    const Part& part = sp.parts[q];
    const Prims& p = *sp.prims[q];
    const int64_t oq = part.g.oc, o0 = part.dst_off;
    float* dyq = reinterpret_cast<float*>(base + sp.dy_at[q]);
    if (!p.act)
      for (int64_t i = 0; i < pixels; ++i)
        std::memcpy(dyq + i * oq, dy + i * g.oc + o0, sizeof(float) * oq);
    dnnl::stream sq(Engine());
    memory w(p.wei, Engine(), base + sp.wei_at[q]);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SCRATCHPAD, memory(p.scratch, Engine(), base + sp.scratch_at[q])},
        {DNNL_ARG_SRC, memory(part.g.Src(), Engine(), const_cast<float*>(x))},
        {DNNL_ARG_DIFF_DST, memory(part.g.Dst(), Engine(), dyq)},
        {DNNL_ARG_DIFF_WEIGHTS, w}};
    if (p.act)  // dy's channels straight from their place in dy into the blocked layout
      BlockArgs(p, part.g, x, dy + o0, base + sp.act_at[q], args, sq, &sp.dy_part[q],
                &sp.dy_view[q]);
    p.prim.execute(sq, args);
    memory dk(KernelPart(g, part.g), Engine(), out + o0);
    sp.to_out[q].execute(sq, w, dk);
    sq.wait();
  });
}

// Split 4 (input gradient by input channels): part q reorders its channels of the kernel,
// computes their input gradient from all of dy into a buffer and copies it into its
// channels of dx.
void RunInChannels(const SplitPlan& sp, const Geom& g, const float* dy, const float* k,
                   float* dx, char* base, ffi::ThreadPool& pool) {
  const int64_t n = static_cast<int64_t>(sp.parts.size());
  const int64_t pixels = g.n * g.h * g.w;
  ParallelParts(pool, n, [&](int64_t q) {
    const Part& part = sp.parts[q];
    const Prims& p = *sp.prims[q];
    const int64_t cq = part.g.c, c0 = part.src_off;
    float* dxq = reinterpret_cast<float*>(base + sp.dy_at[q]);
    dnnl::stream sq(Engine());
    memory kq(KernelPart(g, part.g), Engine(), const_cast<float*>(k) + c0 * g.oc);
    memory w(p.wei, Engine(), base + sp.wei_at[q]);
    sp.to_out[q].execute(sq, kq, w);
    p.prim.execute(sq, {{DNNL_ARG_SCRATCHPAD, memory(p.scratch, Engine(), base + sp.scratch_at[q])},
                        {DNNL_ARG_DIFF_DST, memory(part.g.Dst(), Engine(), const_cast<float*>(dy))},
                        {DNNL_ARG_WEIGHTS, w},
                        {DNNL_ARG_DIFF_SRC, memory(part.g.Src(), Engine(), dxq)}});
    sq.wait();
    for (int64_t i = 0; i < pixels; ++i)
      std::memcpy(dx + i * g.c + c0, dxq + i * cq, sizeof(float) * cq);
  });
}

// Runs a split call (split 1 to 4) on XLA's buffers; a, b, out as Run's.
void RunSplit(const Geom& g, char kind, int64_t split, int64_t chunks, float* a, float* b,
              float* out, void* ws, size_t ws_bytes, ffi::ThreadPool& pool, const float* bias,
              const float* scale) {
  const SplitPlan& sp = *Plan(g, kind, split, chunks);
  Buffer own;
  char* base = ws && ws_bytes >= sp.bytes
                   ? reinterpret_cast<char*>(Pages(reinterpret_cast<uintptr_t>(ws)))
                   : static_cast<char*>(own.Get(sp.bytes));
  const int64_t n = static_cast<int64_t>(sp.parts.size());
  if (split == 3) {
    RunOutChannels(sp, g, a, b, out, base, pool);
    return;
  }
  if (split == 4) {
    RunInChannels(sp, g, a, b, out, base, pool);
    return;
  }
  OmpThreads one(1);
  dnnl::stream s(Engine());
  memory user_w(g.WeiUser(), Engine(), kind == 'w' ? out : b);
  // The kernel each part reads (forward, input gradient) or writes (kernel gradient).
  std::vector<memory> w(n);
  for (int64_t q = 0; q < n; ++q) {
    const Prims& p = *sp.prims[q];
    if (sp.owns_wei[q]) {
      w[q] = memory(p.wei, Engine(), base + sp.wei_at[q]);
      if (kind != 'w' && q == 0)
        Reorder(sp.wei0, p.to_wei, user_w, w[q], pool, scale, g.oc);
      else if (kind != 'w')
        RunReorder(p.to_wei, s, user_w, w[q], scale, g.oc);
    } else {
      w[q] = p.reorder ? w[0] : user_w;
    }
  }
  s.wait();
  ParallelParts(pool, n, [&](int64_t q) {
    const Part& part = sp.parts[q];
    const Prims& p = *sp.prims[q];
    dnnl::stream sq(Engine());
    // Each part's first element: x/dx at src_off, y/dy at dst_off.
    float* pa = a + (kind == 'd' ? part.dst_off : part.src_off);
    float* pb = kind == 'w' ? b + part.dst_off : nullptr;
    float* po = kind == 'w' ? nullptr : out + (Forward(kind) ? part.dst_off : part.src_off);
    auto args = Args(kind, part.g, pa, pb, po, w[q],
                     memory(p.scratch, Engine(), base + sp.scratch_at[q]), bias);
    if (p.act) BlockArgs(p, part.g, pa, pb, base + sp.act_at[q], args, sq);
    p.prim.execute(sq, args);
    sq.wait();
  });
  if (kind != 'w') return;
  // Kernel gradient: part 0's buffer += the others', in part order, then to HWIO.
  float* sum = static_cast<float*>(w[0].get_data_handle());
  const int64_t elems = static_cast<int64_t>(w[0].get_desc().get_size() / sizeof(float));
  const int64_t block = 1 << 14, blocks = (elems + block - 1) / block;
  ParallelFor(pool, blocks, elems, [&](int64_t i) {
    const int64_t lo = i * block, hi = std::min(elems, lo + block);
    for (int64_t q = 1; q < n; ++q) {
      const float* __restrict src = static_cast<const float*>(w[q].get_data_handle());
#pragma omp simd
      for (int64_t k = lo; k < hi; ++k) sum[k] += src[k];
    }
  });
  if (sp.prims[0]->reorder) Reorder(sp.wei0, sp.prims[0]->from_wei, w[0], user_w, pool);
}

}  // namespace

// One convolution call: checks the geometry and split, then runs it whole (split 0) or cut
// over XLA's threads. a, b, out as Run's.
static ffi::Error Conv(char kind, ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> k_dims,
                ffi::Span<const int64_t> y_dims, ffi::Span<const int64_t> strides,
                ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                int64_t groups, int64_t split, int64_t chunks, float* a, float* b, float* out,
                void* ws, size_t ws_bytes, ffi::ThreadPool& pool, const float* bias = nullptr,
                const float* scale = nullptr) {
  Geom g;
  auto err = MakeGeom(x_dims, k_dims, y_dims, strides, dilation, padding, groups, &g);
  if (!err.success()) return err;
  err = CheckSplit(g, kind, split, chunks);
  if (!err.success()) return err;
  return Guard([&] {
    if (split == 0)
      Run(g, kind, a, b, out, ws, ws_bytes, bias, scale);
    else
      RunSplit(g, kind, split, chunks, a, b, out, ws, ws_bytes, pool, bias, scale);
  });
}

// y = conv(x, k)
ffi::Error ConvFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> ws,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                       ffi::Span<const int64_t> padding, int64_t groups, int64_t split,
                       int64_t chunks) {
  return Conv('f', x.dimensions(), k.dimensions(), y->dimensions(), strides, dilation, padding,
              groups, split, chunks, x.typed_data(), k.typed_data(), y->typed_data(),
              ws->untyped_data(), ws->size_bytes(), pool);
}

// y = relu?(conv(x, k) + bias [+ res]): an inference forward with its epilogue (kinds 'p' /
// 'q', or 'r' / 's' with res). oneDNN's sum post-op adds what y holds, so y is XLA's alias
// of res (the Python side asks for it); res is copied into y when it is not.
ffi::Error ConvBias(const char* name, ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
                    ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& bias,
                    const ffi::Buffer<ffi::F32>* res, ffi::ResultBuffer<ffi::F32>& y,
                    ffi::ResultBuffer<ffi::U8>& ws, ffi::Span<const int64_t> strides,
                    ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                    int64_t groups, int64_t split, int64_t chunks, int64_t relu,
                    const ffi::Buffer<ffi::F32>* scale = nullptr) {
  if (bias.element_count() != static_cast<size_t>(k.dimensions().back()))
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": bias is not one value per output channel");
  if (scale && scale->element_count() != static_cast<size_t>(k.dimensions().back()))
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": scale is not one value per output channel");
  if (res && res->element_count() != y->element_count())
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": the residual is not the output's shape");
  if (res && res->typed_data() != y->typed_data())
    std::memcpy(y->typed_data(), res->typed_data(), sizeof(float) * res->element_count());
  char kind = res ? (relu ? 's' : 'r') : (relu ? 'q' : 'p');
  if (scale) kind = static_cast<char>(kind - 'p' + 'P');
  return Conv(kind, x.dimensions(), k.dimensions(), y->dimensions(), strides, dilation, padding,
              groups, split, chunks, x.typed_data(), k.typed_data(), y->typed_data(),
              ws->untyped_data(), ws->size_bytes(), pool, bias.typed_data(),
              scale ? scale->typed_data() : nullptr);
}

ffi::Error ConvBiasImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::U8> ws, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                        int64_t groups, int64_t split, int64_t chunks, int64_t relu) {
  return ConvBias("JsegConvBias", pool, x, k, bias, nullptr, y, ws, strides, dilation, padding,
                  groups, split, chunks, relu);
}

ffi::Error ConvBiasAddImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::F32> res, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::U8> ws, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                           int64_t groups, int64_t split, int64_t chunks, int64_t relu) {
  return ConvBias("JsegConvBiasAdd", pool, x, k, bias, &res, y, ws, strides, dilation, padding,
                  groups, split, chunks, relu);
}

// y = relu?(conv(x, k * scale) + bias): 'P' / 'Q', the scale applied by the kernel's reorder.
ffi::Error ConvScaleBiasImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                             ffi::ResultBuffer<ffi::U8> ws, ffi::Span<const int64_t> strides,
                             ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                             int64_t groups, int64_t split, int64_t chunks, int64_t relu) {
  return ConvBias("JsegConvScaleBias", pool, x, k, bias, nullptr, y, ws, strides, dilation,
                  padding, groups, split, chunks, relu, &scale);
}

// y = relu?(conv(x, k * scale) + bias + res): 'R' / 'S'.
ffi::Error ConvScaleBiasAddImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> res,
                                ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> ws,
                                ffi::Span<const int64_t> strides,
                                ffi::Span<const int64_t> dilation,
                                ffi::Span<const int64_t> padding, int64_t groups, int64_t split,
                                int64_t chunks, int64_t relu) {
  return ConvBias("JsegConvScaleBiasAdd", pool, x, k, bias, &res, y, ws, strides, dilation,
                  padding, groups, split, chunks, relu, &scale);
}

// dx = conv_transpose(dy, k): the input gradient.
ffi::Error ConvBwdDataImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                           ffi::ResultBuffer<ffi::U8> ws, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                           int64_t groups, int64_t split, int64_t chunks) {
  return Conv('d', dx->dimensions(), k.dimensions(), dy.dimensions(), strides, dilation,
              padding, groups, split, chunks, dy.typed_data(), k.typed_data(), dx->typed_data(),
              ws->untyped_data(), ws->size_bytes(), pool);
}

// dk = correlation of x with dy: the kernel gradient.
ffi::Error ConvBwdWeightsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                              ffi::ResultBuffer<ffi::U8> ws, ffi::Span<const int64_t> strides,
                              ffi::Span<const int64_t> dilation,
                              ffi::Span<const int64_t> padding, int64_t groups, int64_t split,
                              int64_t chunks) {
  return Conv('w', x.dimensions(), dk->dimensions(), dy.dimensions(), strides, dilation,
              padding, groups, split, chunks, x.typed_data(), dy.typed_data(), dk->typed_data(),
              ws->untyped_data(), ws->size_bytes(), pool);
}

namespace {

// Rows are processed in tiles of T = ceil(256 / C) rows (W = T * C contiguous elements),
// with the per-channel terms repeated T times, so the inner loops run over >= 256
// elements even at 4 channels. The two loops below are compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time (GCC's target_clones), with `omp simd`.
#define JSEG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// Adds `tiles` tiles of w elements to the tile sums: b1 += u, b2 += u * v, where u = g
// masked by (mask > 0) when mask is given, else g; v = g when v is null (sum of squares).
JSEG_CLONES void TileSums(const float* __restrict g, const float* __restrict mask,
                          const float* __restrict v, int64_t tiles, int64_t w,
                          float* __restrict b1, float* __restrict b2) {
  for (int64_t i = 0; i < tiles; ++i) {
    const float* __restrict gi = g + i * w;
    if (mask) {
      const float* __restrict mi = mask + i * w;
      const float* __restrict vi = v + i * w;
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) {
        const float u = mi[k] > 0.f ? gi[k] : 0.f;
        b1[k] += u;
        b2[k] += u * vi[k];
      }
    } else if (v) {
      const float* __restrict vi = v + i * w;
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) {
        b1[k] += gi[k];
        b2[k] += gi[k] * vi[k];
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) {
        b1[k] += gi[k];
        b2[k] += gi[k] * gi[k];
      }
    }
  }
}

// Over n elements whose per-channel terms a, b, e (tiled to the tile width) repeat with
// period w. Backward (x given): out = u * a + (b + e * x), where u = g masked by
// (mask > 0) when given, also written to du when given. Forward (x null): out = g * a + b
// (+ res when given), then ReLU when relu.
JSEG_CLONES void TileAffine(const float* g, const float* __restrict mask,
                            const float* __restrict x, const float* __restrict res,
                            const float* __restrict a, const float* __restrict b,
                            const float* __restrict e, bool relu, int64_t n, int64_t w,
                            float* out, float* __restrict du) {
  for (int64_t s = 0; s < n; s += w) {
    const int64_t len = std::min(w, n - s);
    // out may be g itself (the backward's dx written over gy, which XLA aliases): every
    // element is read before it is written, and `omp simd` vectorises without alias checks.
    const float* gi = g + s;
    float* oi = out + s;
    if (x && mask && du) {
      const float* __restrict xi = x + s;
      const float* __restrict mi = mask + s;
      float* __restrict di = du + s;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        const float u = mi[k] > 0.f ? gi[k] : 0.f;
        di[k] = u;
        oi[k] = u * a[k] + (b[k] + e[k] * xi[k]);
      }
    } else if (x && mask) {
      const float* __restrict xi = x + s;
      const float* __restrict mi = mask + s;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        const float u = mi[k] > 0.f ? gi[k] : 0.f;
        oi[k] = u * a[k] + (b[k] + e[k] * xi[k]);
      }
    } else if (x) {
      const float* __restrict xi = x + s;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) oi[k] = gi[k] * a[k] + (b[k] + e[k] * xi[k]);
    } else if (res) {
      const float* __restrict ri = res + s;
      if (relu) {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) oi[k] = std::max(gi[k] * a[k] + b[k] + ri[k], 0.f);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) oi[k] = gi[k] * a[k] + b[k] + ri[k];
      }
    } else if (relu) {
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) oi[k] = std::max(gi[k] * a[k] + b[k], 0.f);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) oi[k] = gi[k] * a[k] + b[k];
    }
  }
}

// How [m, c] rows are cut: tiles of `rows` rows (w elements), chunks of `chunk` tiles
// (at least 512 rows or 64k elements, the unit of work of one thread), `chunks` of them.
struct Tiling {
  int64_t rows, w, chunk, chunks, m, c;
  Tiling(int64_t m_, int64_t c_) : m(m_), c(c_) {
    rows = std::max<int64_t>(1, (256 + c - 1) / c);
    w = rows * c;
    chunk = std::max<int64_t>(1, (std::max<int64_t>(512 * c, 65536) + w - 1) / w);
    const int64_t tiles = (m + rows - 1) / rows;
    chunks = std::max<int64_t>(1, (tiles + chunk - 1) / chunk);
  }
  // Elements [begin, end) of chunk q.
  int64_t Begin(int64_t q) const { return std::min(m * c, q * chunk * w); }
  int64_t End(int64_t q) const { return std::min(m * c, (q + 1) * chunk * w); }
  std::vector<float> Tile(const std::vector<float>& per_channel) const {
    std::vector<float> t(w);
    for (int64_t i = 0; i < w; ++i) t[i] = per_channel[i % c];
    return t;
  }
};

// Per-channel sums s1 = sum_r u(r), s2 = sum_r u(r) * v(r) over the rows of [m, c] arrays
// (TileSums' terms). Accumulated in float over blocks of 64 tiles, then in double per
// chunk; the chunks' sums are added in chunk order, so the bits do not depend on the
// number of threads (or on the run).
void ChannelSums(ffi::ThreadPool& pool, const float* g, const float* mask, const float* v,
                 int64_t m, int64_t c, double* s1, double* s2) {
  const Tiling t(m, c);
  const int64_t w = t.w;
  std::vector<double> part(static_cast<size_t>(2 * w * t.chunks), 0.0);
  ParallelFor(pool, t.chunks, m * c, [&](int64_t q) {
    std::vector<float> b1(w), b2(w);
    double* p1 = part.data() + 2 * w * q;
    double* p2 = p1 + w;
    const int64_t end = t.End(q);
    for (int64_t s = t.Begin(q); s < end; s += 64 * w) {
      std::fill(b1.begin(), b1.end(), 0.f);
      std::fill(b2.begin(), b2.end(), 0.f);
      const int64_t n = std::min(64 * w, end - s);
      const int64_t full = n / w, rest = n % w;  // rest: the last rows, fewer than a tile
      const float* ms = mask ? mask + s : nullptr;
      const float* vs = v ? v + s : nullptr;
      TileSums(g + s, ms, vs, full, w, b1.data(), b2.data());
      if (rest) {
        const int64_t o = full * w;
        TileSums(g + s + o, ms ? ms + o : nullptr, vs ? vs + o : nullptr, 1, rest, b1.data(),
                 b2.data());
      }
      for (int64_t k = 0; k < w; ++k) {
        p1[k] += b1[k];
        p2[k] += b2[k];
      }
    }
  });
  std::fill(s1, s1 + c, 0.0);
  std::fill(s2, s2 + c, 0.0);
  for (int64_t q = 0; q < t.chunks; ++q)
    for (int64_t k = 0; k < w; ++k) {
      s1[k % c] += part[2 * w * q + k];
      s2[k % c] += part[2 * w * q + w + k];
    }
}

// TileAffine over all m rows, a chunk per task over the thread pool; a, b, e per channel.
void ChannelAffine(ffi::ThreadPool& pool, const float* g, const float* mask, const float* x,
                   const float* res, const std::vector<float>& a, const std::vector<float>& b,
                   const std::vector<float>* e, bool relu, int64_t m, int64_t c, float* out,
                   float* du) {
  const Tiling t(m, c);
  const auto at = t.Tile(a), bt = t.Tile(b);
  const auto et = e ? t.Tile(*e) : std::vector<float>();
  ParallelFor(pool, t.chunks, m * c, [&](int64_t q) {
    const int64_t s = t.Begin(q), n = t.End(q) - s;
    TileAffine(g + s, mask ? mask + s : nullptr, x ? x + s : nullptr, res ? res + s : nullptr,
               at.data(), bt.data(), e ? et.data() : nullptr, relu, n, t.w, out + s,
               du ? du + s : nullptr);
  });
}

}  // namespace

// The running statistics' inputs and outputs of a forward call.
struct Running {
  const float* mean;
  const float* var;
  float* new_mean;
  float* new_var;
  float momentum, one_minus;  // one_minus: 1 - momentum, rounded as the caller rounds it
};

// BatchNorm's training forward over x [..., C]: the batch mean and E[x^2] - E[x]^2 (not
// clipped; summed in double), then y = x * a + (bias - mean * a), a = scale / sqrt(max(var,
// 0) + eps), plus res when given, followed by ReLU when relu != 0; and the running
// averages momentum * running + (1 - momentum) * batch (the variance clipped at 0). The
// same formulas as jseg/models/norm.py.
ffi::Error BnFwd(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, const float* res,
                 const ffi::Buffer<ffi::F32>& scale, const ffi::Buffer<ffi::F32>& bias,
                 const Running& run, ffi::ResultBuffer<ffi::F32>& y,
                 ffi::ResultBuffer<ffi::F32>& mean, ffi::ResultBuffer<ffi::F32>& var_raw,
                 float eps, int64_t relu) {
  int64_t m, c;
  RowsCols(x.dimensions(), &m, &c);
  if (scale.element_count() != static_cast<size_t>(c) ||
      bias.element_count() != static_cast<size_t>(c) ||
      mean->element_count() != static_cast<size_t>(c) || y->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("JsegBnFwd: shapes do not match the channel axis");
  return Guard([&] {
    std::vector<double> s1(c), s2(c);
    ChannelSums(pool, x.typed_data(), nullptr, nullptr, m, c, s1.data(), s2.data());
    std::vector<float> a(c), b(c);
    const double n = static_cast<double>(std::max<int64_t>(m, 1));
    for (int64_t k = 0; k < c; ++k) {
      const double mu = s1[k] / n, v = s2[k] / n - mu * mu;
      const float muf = static_cast<float>(mu), vf = static_cast<float>(v);
      mean->typed_data()[k] = muf;
      var_raw->typed_data()[k] = vf;
      a[k] = scale.typed_data()[k] / std::sqrt(std::max(vf, 0.f) + eps);
      b[k] = bias.typed_data()[k] - muf * a[k];
      run.new_mean[k] = run.momentum * run.mean[k] + run.one_minus * muf;
      run.new_var[k] = run.momentum * run.var[k] + run.one_minus * std::max(vf, 0.f);
    }
    ChannelAffine(pool, x.typed_data(), nullptr, nullptr, res, a, b, nullptr, relu != 0, m, c,
                  y->typed_data(), nullptr);
  });
}

Running MakeRunning(const ffi::Buffer<ffi::F32>& ra_mean, const ffi::Buffer<ffi::F32>& ra_var,
                    ffi::ResultBuffer<ffi::F32>& new_mean, ffi::ResultBuffer<ffi::F32>& new_var,
                    float momentum, float one_minus) {
  return {ra_mean.typed_data(), ra_var.typed_data(), new_mean->typed_data(),
          new_var->typed_data(), momentum, one_minus};
}

bool RunningShapesOk(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& ra_mean,
                     const ffi::Buffer<ffi::F32>& ra_var, ffi::ResultBuffer<ffi::F32>& new_mean,
                     ffi::ResultBuffer<ffi::F32>& new_var) {
  int64_t m, c;
  RowsCols(x.dimensions(), &m, &c);
  const size_t n = static_cast<size_t>(c);
  return ra_mean.element_count() == n && ra_var.element_count() == n &&
         new_mean->element_count() == n && new_var->element_count() == n;
}

ffi::Error BnFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> ra_mean,
                     ffi::Buffer<ffi::F32> ra_var, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> new_mean, ffi::ResultBuffer<ffi::F32> new_var,
                     ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var_raw,
                     float eps, int64_t relu, float momentum, float one_minus) {
  if (!RunningShapesOk(x, ra_mean, ra_var, new_mean, new_var))
    return ffi::Error::InvalidArgument("JsegBnFwd: running statistics' shapes are not [C]");
  return BnFwd(pool, x, nullptr, scale, bias,
               MakeRunning(ra_mean, ra_var, new_mean, new_var, momentum, one_minus), y, mean,
               var_raw, eps, relu);
}

// With a residual: relu(BatchNorm(x) + res), the end of a ResNet block, in the same pass.
ffi::Error BnAddFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> res,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> ra_mean, ffi::Buffer<ffi::F32> ra_var,
                        ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> new_mean,
                        ffi::ResultBuffer<ffi::F32> new_var, ffi::ResultBuffer<ffi::F32> mean,
                        ffi::ResultBuffer<ffi::F32> var_raw, float eps, int64_t relu,
                        float momentum, float one_minus) {
  if (res.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("JsegBnAddFwd: the residual's shape is not x's");
  if (!RunningShapesOk(x, ra_mean, ra_var, new_mean, new_var))
    return ffi::Error::InvalidArgument("JsegBnAddFwd: running statistics' shapes are not [C]");
  return BnFwd(pool, x, res.typed_data(), scale, bias,
               MakeRunning(ra_mean, ra_var, new_mean, new_var, momentum, one_minus), y, mean,
               var_raw, eps, relu);
}

// The forward's output again from x and the forward's mean and var_raw: the same a and b
// as BnFwd computes them and the same pass, so the same bits. For a BatchNorm whose output
// only feeds a convolution (norm.BatchNorm's `then`): the backward recomputes it instead of
// XLA keeping it.
ffi::Error BnApplyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                       ffi::Buffer<ffi::F32> var_raw, ffi::Buffer<ffi::F32> /*after*/,
                       ffi::ResultBuffer<ffi::F32> y, float eps, int64_t relu) {
  int64_t m, c;
  RowsCols(x.dimensions(), &m, &c);
  const size_t cs = static_cast<size_t>(c);
  if (scale.element_count() != cs || bias.element_count() != cs || mean.element_count() != cs ||
      var_raw.element_count() != cs || y->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("JsegBnApply: shapes do not match the channel axis");
  return Guard([&] {
    std::vector<float> a(c), b(c);
    for (int64_t k = 0; k < c; ++k) {
      const float muf = mean.typed_data()[k], vf = var_raw.typed_data()[k];
      a[k] = scale.typed_data()[k] / std::sqrt(std::max(vf, 0.f) + eps);
      b[k] = bias.typed_data()[k] - muf * a[k];
    }
    ChannelAffine(pool, x.typed_data(), nullptr, nullptr, nullptr, a, b, nullptr, relu != 0, m, c,
                  y->typed_data(), nullptr);
  });
}

// Its backward: gy (the output's cotangent), x, mask (the forward's output when relu != 0:
// the ReLU passes gy where it is > 0; ignored otherwise), scale, and the forward's mean and
// var_raw with their cotangents -> dx, d_scale, d_bias (and d_res, the masked gy, when
// given). The chain rule of the forward, term by term as norm._batch_norm_train_bwd writes
// it, with the per-channel terms in double.
ffi::Error BnBwd(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& gy, const ffi::Buffer<ffi::F32>& x,
                 const ffi::Buffer<ffi::F32>& mask, const ffi::Buffer<ffi::F32>& scale,
                 const ffi::Buffer<ffi::F32>& mean, const ffi::Buffer<ffi::F32>& var_raw,
                 const ffi::Buffer<ffi::F32>& g_mean, const ffi::Buffer<ffi::F32>& g_var,
                 ffi::ResultBuffer<ffi::F32>& dx, float* d_res,
                 ffi::ResultBuffer<ffi::F32>& d_scale, ffi::ResultBuffer<ffi::F32>& d_bias,
                 float eps, int64_t relu) {
  int64_t m, c;
  RowsCols(x.dimensions(), &m, &c);
  if (gy.element_count() != x.element_count() || mask.element_count() != x.element_count() ||
      scale.element_count() != static_cast<size_t>(c) ||
      g_var.element_count() != static_cast<size_t>(c))
    return ffi::Error::InvalidArgument("JsegBnBwd: shapes do not match the channel axis");
  return Guard([&] {
    const float* mk = relu ? mask.typed_data() : nullptr;
    std::vector<double> r1(c), r2(c);
    ChannelSums(pool, gy.typed_data(), mk, x.typed_data(), m, c, r1.data(), r2.data());
    std::vector<float> a(c), b(c), e(c);
    const double n = static_cast<double>(std::max<int64_t>(m, 1));
    for (int64_t k = 0; k < c; ++k) {
      const double sc = scale.typed_data()[k], mu = mean.typed_data()[k];
      const float vr = var_raw.typed_data()[k];
      const double inv = 1.0 / std::sqrt(static_cast<double>(std::max(vr, 0.f)) + eps);
      const double ak = sc * inv;
      const double d_a = r2[k] - mu * r1[k];
      const double d_inv = sc * d_a;
      const double d_var = -0.5 * inv * inv * inv * d_inv + g_var.typed_data()[k];
      // jnp.maximum's derivative: 1 above, 0 below, 1/2 at a tie (as autodiff).
      const double d_var_raw = d_var * (vr > 0.f ? 1.0 : (vr == 0.f ? 0.5 : 0.0));
      const double d_mean = -ak * r1[k] - 2.0 * mu * d_var_raw + g_mean.typed_data()[k];
      d_scale->typed_data()[k] = static_cast<float>(inv * d_a);
      d_bias->typed_data()[k] = static_cast<float>(r1[k]);
      a[k] = static_cast<float>(ak);
      b[k] = static_cast<float>(d_mean / n);
      e[k] = static_cast<float>(2.0 / n * d_var_raw);
    }
    ChannelAffine(pool, gy.typed_data(), mk, x.typed_data(), nullptr, a, b, &e, false, m, c,
                  dx->typed_data(), mk ? d_res : nullptr);
    if (d_res && !mk)
      std::memcpy(d_res, gy.typed_data(), sizeof(float) * static_cast<size_t>(m * c));
  });
}

ffi::Error BnBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> x,
                     ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var_raw,
                     ffi::Buffer<ffi::F32> g_mean, ffi::Buffer<ffi::F32> g_var,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> d_scale,
                     ffi::ResultBuffer<ffi::F32> d_bias, float eps, int64_t relu) {
  return BnBwd(pool, gy, x, mask, scale, mean, var_raw, g_mean, g_var, dx, nullptr, d_scale, d_bias,
               eps, relu);
}

ffi::Error BnAddBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var_raw,
                        ffi::Buffer<ffi::F32> g_mean, ffi::Buffer<ffi::F32> g_var,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> d_res,
                        ffi::ResultBuffer<ffi::F32> d_scale, ffi::ResultBuffer<ffi::F32> d_bias,
                        float eps, int64_t relu) {
  return BnBwd(pool, gy, x, mask, scale, mean, var_raw, g_mean, g_var, dx, d_res->typed_data(),
               d_scale, d_bias, eps, relu);
}

// Bindings of the BatchNorm handlers: F32 buffers in, F32 buffers out.
#define JSEG_IN .Arg<ffi::Buffer<ffi::F32>>()
#define JSEG_OUT .Ret<ffi::Buffer<ffi::F32>>()
#define JSEG_BN_ATTRS .Attr<float>("eps").Attr<int64_t>("relu")
#define JSEG_BN_FWD_ATTRS JSEG_BN_ATTRS.Attr<float>("momentum").Attr<float>("one_minus")

// x, scale, bias, running mean, running var -> y, new mean, new var, batch mean, var_raw.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegBnFwd, BnFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN JSEG_IN JSEG_IN
                                  JSEG_IN JSEG_IN JSEG_OUT JSEG_OUT JSEG_OUT JSEG_OUT JSEG_OUT
                                      JSEG_BN_FWD_ATTRS);

// The same with the residual after x.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegBnAddFwd, BnAddFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN JSEG_IN JSEG_IN
                                  JSEG_IN JSEG_IN JSEG_IN JSEG_OUT JSEG_OUT JSEG_OUT JSEG_OUT
                                      JSEG_OUT JSEG_BN_FWD_ATTRS);

// x, scale, bias, mean, var_raw, after -> y. `after` is not read: the caller passes a
// value of the backward so that XLA cannot schedule the call (and y's buffer) earlier.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegBnApply, BnApplyImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN JSEG_IN JSEG_IN
                                  JSEG_IN JSEG_IN JSEG_IN JSEG_OUT JSEG_BN_ATTRS);

// gy, x, mask, scale, mean, var_raw, g_mean, g_var -> dx, d_scale, d_bias.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegBnBwd, BnBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN JSEG_IN JSEG_IN
                                  JSEG_IN JSEG_IN JSEG_IN JSEG_IN JSEG_IN JSEG_OUT JSEG_OUT
                                      JSEG_OUT JSEG_BN_ATTRS);

// The same, also -> d_res (after dx).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegBnAddBwd, BnAddBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN JSEG_IN JSEG_IN
                                  JSEG_IN JSEG_IN JSEG_IN JSEG_IN JSEG_IN JSEG_OUT JSEG_OUT
                                      JSEG_OUT JSEG_OUT JSEG_BN_ATTRS);

// ---------------------------------------------------------------------------------------
// The class log-probabilities' backward (jseg/losses.py, _class_log_prob_bwd) over
// class-major logits z (N images of K planes of P pixels), written over z (the caller aliases it to the output):
//   dz = [y == k] g_y + g_mean / K - (g_y + g_mean) exp(z - lse)
// with lse, y (int32), g_y, g_mean per pixel [N, P...]. One elementwise pass: XLA:CPU fuses
// this with the log-normaliser's K-plane maximum recomputed for each of the K outputs, and
// cannot write it over z, so the full-size logits and their gradient were both live.
namespace {

// exp(x) for x <= 0 (here x = z - max or z - lse): Cephes' expf (reduction by ln 2 in two
// parts, degree-5 polynomial), within 2 ulp of expf; 0 below -87.3 (where expf is
// denormal), NaN for NaN. Branch-free arithmetic, so `omp simd` vectorises it (glibc's
// vector expf needs -ffast-math; a clamp of x made GCC thread jumps it cannot vectorise).
// Below -87.3 the intermediate values are meaningless and discarded by the last select.
inline float ExpF(float x) {
  const float t = x * 1.44269504088896341f + 0.5f;
  const int32_t ti = static_cast<int32_t>(t);
  const float fx = static_cast<float>(ti) - (static_cast<float>(ti) > t ? 1.f : 0.f);  // floor
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float e = y * __builtin_bit_cast(float, (static_cast<int32_t>(fx) + 127) << 23);
  return x < -87.3f ? 0.f : e;
}

// Pixels [p0, p0 + len) of image n, every class; per-pixel terms at lse .. gm + p0.
JSEG_CLONES void LogProbBwdBlock(float* z, const float* __restrict lse,
                                 const int32_t* __restrict y, const float* __restrict gy,
                                 const float* __restrict gm, int64_t k, int64_t p,
                                 int64_t len) {
  const float kf = static_cast<float>(k);
  for (int64_t c = 0; c < k; ++c) {
    float* __restrict zc = z + c * p;
    const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float a = (y[i] == ci ? gy[i] : 0.f) + gm[i] / kf;
      zc[i] = a - (gy[i] + gm[i]) * ExpF(zc[i] - lse[i]);
    }
  }
}

// The forward over the same block: lse = m + log(sum_k exp(z_k - m)) (m the maximum),
// lp_y = z_y - lse, lp_mean = (sum_k z_k) / K - lse, the sums in class order as the XLA
// form adds its planes. len <= kBlock.
constexpr int64_t kBlock = 1024;
JSEG_CLONES void LogProbFwdBlock(const float* __restrict z, const int32_t* __restrict y,
                                 float* __restrict lp_y, float* __restrict lp_mean,
                                 float* __restrict lse, int64_t k, int64_t p, int64_t len) {
  float m[kBlock], s[kBlock], zy[kBlock], zs[kBlock];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    m[i] = z[i];
    s[i] = 0.f;
    zy[i] = 0.f;
    zs[i] = 0.f;
  }
  for (int64_t c = 1; c < k; ++c) {
    const float* __restrict zc = z + c * p;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) m[i] = std::max(m[i], zc[i]);
  }
  for (int64_t c = 0; c < k; ++c) {
    const float* __restrict zc = z + c * p;
    const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      s[i] += ExpF(zc[i] - m[i]);
      zy[i] += y[i] == ci ? zc[i] : 0.f;
      zs[i] += zc[i];
    }
  }
  const float kf = static_cast<float>(k);
  for (int64_t i = 0; i < len; ++i) {
    const float l = m[i] + std::log(s[i]);
    lse[i] = l;
    lp_y[i] = zy[i] - l;
    lp_mean[i] = zs[i] / kf - l;
  }
}

}  // namespace

// Blocks of kBlock pixels of each image, a task each, over XLA's pool.
template <class F>
void ForPixelBlocks(ffi::ThreadPool& pool, int64_t n, int64_t k, int64_t p, const F& f) {
  const int64_t per_image = (p + kBlock - 1) / kBlock;
  ParallelFor(pool, n * per_image, n * k * p, [&](int64_t q) {
    const int64_t i = q / per_image, p0 = (q % per_image) * kBlock;
    f(i, p0, std::min(kBlock, p - p0));
  });
}

// z holds n images of k class planes of p pixels, in that order, whatever its shape (the
// caller gives it the shape of its producer's output, so XLA aliases it without a copy).
bool LogProbDims(const ffi::Buffer<ffi::F32>& z, int64_t n, int64_t k, int64_t* p) {
  if (n <= 0 || k <= 0) return false;
  *p = static_cast<int64_t>(z.element_count()) / (n * k);
  return *p * n * k == static_cast<int64_t>(z.element_count());
}

// z [N, K, P...], labels [N, P...] -> log p_y, mean_k log p_k, lse (each [N, P...]).
ffi::Error LogProbFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::S32> y,
                          ffi::ResultBuffer<ffi::F32> lp_y, ffi::ResultBuffer<ffi::F32> lp_mean,
                          ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> z_out,
                          int64_t n, int64_t k) {
  int64_t p;
  if (!LogProbDims(z, n, k, &p)) return ffi::Error::InvalidArgument("JsegLogProbFwd: z is not n x k planes");
  const size_t pix = static_cast<size_t>(n * p);
  if (y.element_count() != pix || lp_y->element_count() != pix ||
      lp_mean->element_count() != pix || lse->element_count() != pix ||
      z_out->element_count() != z.element_count())
    return ffi::Error::InvalidArgument("JsegLogProbFwd: per-pixel shapes do not match z");
  return Guard([&] {
    // z_out is z passed through (aliased by the caller), so that the backward, which writes
    // over it, is its only reader and XLA needs no copy; copied when XLA did not alias it.
    if (z_out->typed_data() != z.typed_data())
      std::memcpy(z_out->typed_data(), z.typed_data(), sizeof(float) * z.element_count());
    ForPixelBlocks(pool, n, k, p, [&](int64_t i, int64_t p0, int64_t len) {
      const int64_t o = i * p + p0;
      LogProbFwdBlock(z.typed_data() + i * k * p + p0, y.typed_data() + o,
                      lp_y->typed_data() + o, lp_mean->typed_data() + o, lse->typed_data() + o,
                      k, p, len);
    });
  });
}

ffi::Error LogProbBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z,
                          ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::S32> y,
                          ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> gm,
                          ffi::ResultBuffer<ffi::F32> dz, int64_t n, int64_t k) {
  int64_t p;
  if (!LogProbDims(z, n, k, &p)) return ffi::Error::InvalidArgument("JsegLogProbBwd: z is not n x k planes");
  const size_t pix = static_cast<size_t>(n * p);
  if (lse.element_count() != pix || y.element_count() != pix || gy.element_count() != pix ||
      gm.element_count() != pix || dz->element_count() != z.element_count())
    return ffi::Error::InvalidArgument("JsegLogProbBwd: per-pixel shapes do not match z");
  return Guard([&] {
    float* out = dz->typed_data();
    if (out != z.typed_data())  // not aliased (XLA still needed z): start from a copy
      std::memcpy(out, z.typed_data(), sizeof(float) * z.element_count());
    ForPixelBlocks(pool, n, k, p, [&](int64_t i, int64_t p0, int64_t len) {
      const int64_t o = i * p + p0;
      LogProbBwdBlock(out + i * k * p + p0, lse.typed_data() + o, y.typed_data() + o,
                      gy.typed_data() + o, gm.typed_data() + o, k, p, len);
    });
  });
}

// z, labels -> log p_y, mean log p, lse, z (aliased to the input z by the caller).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegLogProbFwd, LogProbFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN
                                  .Arg<ffi::Buffer<ffi::S32>>() JSEG_OUT JSEG_OUT JSEG_OUT
                                      JSEG_OUT.Attr<int64_t>("n").Attr<int64_t>("k"));

// z, lse, labels, g_y, g_mean -> dz (aliased to z by the caller).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegLogProbBwd, LogProbBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN JSEG_IN
                                  .Arg<ffi::Buffer<ffi::S32>>() JSEG_IN JSEG_IN JSEG_OUT
                                      .Attr<int64_t>("n").Attr<int64_t>("k"));

// The kernel gradient of a stride-1 depthwise k x k convolution at dilation d with same
// padding p = d (k - 1) / 2: dk[i, j, c] = sum over n, y, x of
// x_in[n, y + i d - p, x + j d - p, c] * g[n, y, x, c] (terms outside the input are 0).
// Written out in XLA (layers._shifted_kernel_grad), each of the k*k taps is its own slice
// and reduction kernel: 16-19 kernels per layer that XLA compiles, on the maps where
// oneDNN has only its GEMM for this gradient (dilated depthwise layers; every one of
// DeepLab v3+'s ASPP and dilated Xception layers on AVX2). One task per block of
// kDwBlock channels, every tap; a row's terms summed in float, rows in double, in a fixed
// order (the same bits on any thread count).
namespace {
constexpr int64_t kDwBlock = 32;

// acc[q] += sum over len pixels t of x[t * c + q] * g[t * c + q], q < cb.
JSEG_CLONES void DwTapRow(const float* __restrict x, const float* __restrict g,
                          float* __restrict acc, int64_t c, int64_t cb, int64_t len) {
  for (int64_t t = 0; t < len; ++t) {
    const float* __restrict xr = x + t * c;
    const float* __restrict gr = g + t * c;
#pragma omp simd
    for (int64_t q = 0; q < cb; ++q) acc[q] += xr[q] * gr[q];
  }
}
}  // namespace

ffi::Error DwKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk,
                            int64_t k, int64_t d) {
  const auto xd = x.dimensions();
  if (xd.size() != 4 || g.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("JsegDwKernelGrad: x and g must be NHWC");
  for (int a = 0; a < 4; ++a)
    if (g.dimensions()[a] != xd[a])
      return ffi::Error::InvalidArgument("JsegDwKernelGrad: g's shape differs from x's");
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3];
  if (k <= 0 || k % 2 == 0 || d <= 0 || static_cast<int64_t>(dk->element_count()) != k * k * c)
    return ffi::Error::InvalidArgument("JsegDwKernelGrad: needs odd k, d >= 1, dk of k*k*C");
  const int64_t p = d * (k - 1) / 2, taps = k * k;
  const int64_t blocks = (c + kDwBlock - 1) / kDwBlock;
  return Guard([&] {
    ParallelFor(pool, blocks, n * h * w * c * taps, [&](int64_t b) {
      const int64_t c0 = b * kDwBlock, cb = std::min(kDwBlock, c - c0);
      std::vector<double> tot(taps * cb, 0.0);
      std::vector<float> row(taps * cb);
      for (int64_t i0 = 0; i0 < n; ++i0) {
        for (int64_t oy = 0; oy < h; ++oy) {
          std::fill(row.begin(), row.end(), 0.f);
          const float* grow = g.typed_data() + ((i0 * h + oy) * w) * c + c0;
          for (int64_t i = 0; i < k; ++i) {
            const int64_t iy = oy + i * d - p;
            if (iy < 0 || iy >= h) continue;
            const float* xrow = x.typed_data() + ((i0 * h + iy) * w) * c + c0;
            for (int64_t j = 0; j < k; ++j) {
              const int64_t off = j * d - p;
              const int64_t x0 = std::max<int64_t>(0, -off), x1 = std::min(w, w - off);
              if (x0 >= x1) continue;
              DwTapRow(xrow + (x0 + off) * c, grow + x0 * c, row.data() + (i * k + j) * cb, c,
                       cb, x1 - x0);
            }
          }
          for (int64_t q = 0; q < taps * cb; ++q) tot[q] += row[q];
        }
      }
      float* out = dk->typed_data();
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t q = 0; q < cb; ++q) out[t * c + c0 + q] = static_cast<float>(tot[t * cb + q]);
    });
  });
}

// x, g -> dk [k * k, C] (taps in row-major order).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegDwKernelGrad, DwKernelGradImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN JSEG_IN JSEG_OUT
                                  .Attr<int64_t>("k").Attr<int64_t>("d"));

// The backward of a stride-1 k x k max pool with same padding (layers.max_pool_same): each
// output's gradient goes to the one input that held its window's maximum, recorded in the
// forward as the tap of the row maximum (row_at, at the output) and of the column maximum
// (col_at, at the column maxima). Per output row y: the column maxima's gradient
// gc[x] = sum over taps i of [row_at[y + p - i, x] == i] g[y + p - i, x], then
// dx[y, x] = sum over i of [col_at[y, x + p - i] == i] gc[x + p - i], each sum in tap order
// with 0 for taps outside the map, as XLA's form (layers._unwindow) adds them: the same
// bits. XLA ran every tap's shift as its own kernel with a full-size copy (4.5x the input
// in temporaries); here one pass over the rows writes dx and nothing else.
namespace {
// acc[t] (=, for the first tap, else +=) at[t] == i ? g[t] : 0, t < len.
JSEG_CLONES void RouteTap(const float* __restrict g, const int8_t* __restrict at,
                          float* __restrict acc, int64_t len, int8_t i, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) acc[t] = at[t] == i ? g[t] : 0.f;
  } else {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) acc[t] += at[t] == i ? g[t] : 0.f;
  }
}

// A tap that falls outside the map: XLA adds its zero fill.
void RouteNone(float* __restrict acc, int64_t len, bool first) {
  if (first) {
    std::fill(acc, acc + len, 0.f);
  } else {
    for (int64_t t = 0; t < len; ++t) acc[t] += 0.f;  // turns -0 into +0, as XLA's add does
  }
}
}  // namespace

ffi::Error PoolSameBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                           ffi::Buffer<ffi::S8> row_at, ffi::Buffer<ffi::S8> col_at,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t k) {
  const auto gd = g.dimensions();
  if (gd.size() != 4 || row_at.dimensions().size() != 4 || col_at.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("JsegPoolSameBwd: g, row_at and col_at must be NHWC");
  for (int a = 0; a < 4; ++a)
    if (row_at.dimensions()[a] != gd[a] || col_at.dimensions()[a] != gd[a])
      return ffi::Error::InvalidArgument("JsegPoolSameBwd: row_at's or col_at's shape differs from g's");
  if (k <= 0 || k % 2 == 0 || k > 127)
    return ffi::Error::InvalidArgument("JsegPoolSameBwd: needs an odd window k < 128");
  const int64_t n = gd[0], h = gd[1], w = gd[2], c = gd[3], p = (k - 1) / 2;
  const int64_t row = w * c;
  return Guard([&] {
    ParallelFor(pool, n * h, n * h * row * k, [&](int64_t r) {
      const int64_t i0 = r / h, y = r % h;
      std::unique_ptr<float[]> gc(new float[row]);  // the first tap writes all of it
      for (int64_t i = 0; i < k; ++i) {
        const int64_t yy = y + p - i;
        if (yy < 0 || yy >= h) {
          RouteNone(gc.get(), row, i == 0);
          continue;
        }
        const int64_t o = (i0 * h + yy) * row;
        RouteTap(g.typed_data() + o, row_at.typed_data() + o, gc.get(), row,
                 static_cast<int8_t>(i), i == 0);
      }
      float* out = dx->typed_data() + r * row;
      const int8_t* at = col_at.typed_data() + r * row;
      for (int64_t x = 0; x < w; ++x) {
        for (int64_t i = 0; i < k; ++i) {
          const int64_t xx = x + p - i;
          if (xx < 0 || xx >= w) {
            RouteNone(out + x * c, c, i == 0);
            continue;
          }
          RouteTap(gc.get() + xx * c, at + xx * c, out + x * c, c, static_cast<int8_t>(i),
                   i == 0);
        }
      }
    });
  });
}

// g, row_at (int8), col_at (int8) -> dx (g's shape).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegPoolSameBwd, PoolSameBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSEG_IN
                                  .Arg<ffi::Buffer<ffi::S8>>().Arg<ffi::Buffer<ffi::S8>>()
                                      JSEG_OUT.Attr<int64_t>("k"));

// Sum of the squares of every element of every operand (float32 buffers of any shapes),
// for the gradients' global norm (``optim.global_norm``): one pass over the leaves where
// they lie, instead of XLA's copy of all of them into one array (a model's size again in
// temporaries) or one reduction kernel per leaf. The leaves are cut into fixed pieces of
// at most kSsqPiece elements, each summed in double by one task; the pieces' sums are then
// added in order, so the result does not depend on the thread count.
namespace {
constexpr int64_t kSsqPiece = int64_t{1} << 16;

JSEG_CLONES double SumSquares(const float* __restrict x, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * x[i];
  return acc;
}
}  // namespace

ffi::Error SumSquaresImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                          ffi::ResultBuffer<ffi::F32> out) {
  struct Piece {
    const float* p;
    int64_t n;
  };
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    auto b = args.get<ffi::Buffer<ffi::F32>>(i);
    if (!b.has_value())
      return ffi::Error::InvalidArgument("JsegSumSquares: every operand must be float32");
    const float* p = b->typed_data();
    const int64_t n = static_cast<int64_t>(b->element_count());
    total += n;
    for (int64_t o = 0; o < n; o += kSsqPiece) pieces.push_back({p + o, std::min(kSsqPiece, n - o)});
  }
  if (out->element_count() != 1)
    return ffi::Error::InvalidArgument("JsegSumSquares: the result is one scalar");
  return Guard([&] {
    std::vector<double> sums(pieces.size(), 0.0);
    ParallelFor(pool, static_cast<int64_t>(pieces.size()), total,
                [&](int64_t q) { sums[q] = SumSquares(pieces[q].p, pieces[q].n); });
    double acc = 0.0;
    for (double v : sums) acc += v;
    out->typed_data()[0] = static_cast<float>(acc);
  });
}

// Any number of float32 buffers -> the sum of all their elements' squares (f32 scalar).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegSumSquares, SumSquaresImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs() JSEG_OUT);

#define JSEG_CONV_ATTRS                               \
  .Attr<ffi::Span<const int64_t>>("strides")          \
      .Attr<ffi::Span<const int64_t>>("dilation")     \
      .Attr<ffi::Span<const int64_t>>("padding")      \
      .Attr<int64_t>("groups")                        \
      .Attr<int64_t>("split")                         \
      .Attr<int64_t>("chunks")

// A convolution handler's binding: the thread pool, its float32 inputs (`inputs`: JSEG_IN
// repeated), the result and its uint8 workspace, the geometry attributes.
#define JSEG_CONV_BIND(inputs) \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() inputs JSEG_OUT.Ret<ffi::Buffer<ffi::U8>>() JSEG_CONV_ATTRS

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvFwd, ConvFwdImpl, JSEG_CONV_BIND(JSEG_IN JSEG_IN));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvBias, ConvBiasImpl,
                              JSEG_CONV_BIND(JSEG_IN JSEG_IN JSEG_IN).Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvBiasAdd, ConvBiasAddImpl,
                              JSEG_CONV_BIND(JSEG_IN JSEG_IN JSEG_IN JSEG_IN)
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvScaleBias, ConvScaleBiasImpl,
                              JSEG_CONV_BIND(JSEG_IN JSEG_IN JSEG_IN JSEG_IN).Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvScaleBiasAdd, ConvScaleBiasAddImpl,
                              JSEG_CONV_BIND(JSEG_IN JSEG_IN JSEG_IN JSEG_IN JSEG_IN)
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvBwdData, ConvBwdDataImpl, JSEG_CONV_BIND(JSEG_IN JSEG_IN));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvBwdWeights, ConvBwdWeightsImpl,
                              JSEG_CONV_BIND(JSEG_IN JSEG_IN));

// Which oneDNN implementation each primitive uses ("brg:avx512_core", "jit:avx2", ...), for
// benchmarks and tests: a reference implementation would be a silent 100x slowdown.
namespace {
// The geometry from the flat dims the Python side passes: x (4), k (4), output h/w (2),
// strides (2), dilation (2), padding (4: top, bottom, left, right).
Geom GeomFromDims(const int64_t* dims, int64_t groups) {
  Geom g;
  g.n = dims[0]; g.h = dims[1]; g.w = dims[2]; g.c = dims[3];
  g.kh = dims[4]; g.kw = dims[5]; g.ci_g = dims[6]; g.oc = dims[7];
  g.oh = dims[8]; g.ow = dims[9]; g.groups = groups;
  g.strides = {dims[10], dims[11]};
  g.dil = {dims[12] - 1, dims[13] - 1};
  g.pad_l = {dims[14], dims[16]};
  g.pad_r = {dims[15], dims[17]};
  return g;
}
}  // namespace

// Bytes of XLA workspace one call of this geometry and kind wants (Run's ws), or -1.
// split/chunks as the call's attributes.
extern "C" int64_t jseg_onednn_workspace(const int64_t* dims, int64_t groups, char kind,
                                         int64_t split, int64_t chunks) {
  try {
    const Geom g = GeomFromDims(dims, groups);
    if (!CheckSplit(g, kind, split, chunks).success()) return -1;
    if (split != 0) return static_cast<int64_t>(Plan(g, kind, split, chunks)->bytes);
    return static_cast<int64_t>(WorkspaceBytes(*Get(g, kind)));
  } catch (const std::exception&) {
    return -1;
  }
}

// How many pieces a split call's kernel reorder is cut into (0: one whole reorder), or -1.
extern "C" int64_t jseg_onednn_reorder_pieces(const int64_t* dims, int64_t groups, char kind,
                                              int64_t split, int64_t chunks) {
  try {
    const Geom g = GeomFromDims(dims, groups);
    if (split == 0 || !CheckSplit(g, kind, split, chunks).success()) return -1;
    return static_cast<int64_t>(Plan(g, kind, split, chunks)->wei0.prims.size());
  } catch (const std::exception&) {
    return -1;
  }
}

// Whether a call reorders its kernel into another layout (1) or reads HWIO as it is (0),
// or -1. Of a split call: its first part.
extern "C" int64_t jseg_onednn_kernel_reorder(const int64_t* dims, int64_t groups, char kind,
                                              int64_t split, int64_t chunks) {
  try {
    const Geom g = GeomFromDims(dims, groups);
    if (!CheckSplit(g, kind, split, chunks).success()) return -1;
    auto p = split ? Plan(g, kind, split, chunks)->prims[0] : Get(g, kind);
    return p->reorder ? 1 : 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// Of a split call (split != 0): the implementation of its first part.
extern "C" int jseg_onednn_impl(const int64_t* dims, int64_t groups, char kind, int64_t split,
                                int64_t chunks, char* out, int out_len) {
  try {
    const Geom g = GeomFromDims(dims, groups);
    if (!CheckSplit(g, kind, split, chunks).success())
      throw std::invalid_argument("invalid split/chunks for this call");
    auto p = split ? Plan(g, kind, split, chunks)->prims[0] : Get(g, kind);
    std::string s = p->impl + (p->act ? " (blocked x, dy)" : "");
    std::strncpy(out, s.c_str(), out_len - 1);
    out[out_len - 1] = 0;
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(out, e.what(), out_len - 1);
    out[out_len - 1] = 0;
    return 1;
  }
}
