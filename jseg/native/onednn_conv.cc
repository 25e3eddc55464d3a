// 2-D convolution (forward, input gradient, kernel gradient) as XLA FFI handlers calling
// oneDNN, the library torch's CPU convolutions use. XLA:CPU's own convolutions and the
// layout transposes it inserts around kernel gradients are the largest remaining cost of a
// jseg training step on CPU (experiments/performance/README.md).
//
// Layouts are JAX's: activations NHWC, kernels HWIO (grouped: HW(I/G)(O), output channels
// group-major). Activations are handed to oneDNN as they are (nhwc); kernels are reordered
// to and from the blocked layout oneDNN picks, which is cheap (kernels are small).
// float32 only. Built by jseg/native/__init__.py; used through jseg/models/conv.py.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

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
};

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
};

std::mutex cache_mu;
std::unordered_map<std::string, std::shared_ptr<Prims>> cache;

dnnl::convolution_forward::primitive_desc FwdPd(const Geom& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.Src(), g.WeiAny(), g.Dst(), g.strides, g.dil, g.pad_l, g.pad_r, dnnl::primitive_attr());
}

dnnl::primitive_attr UserScratch() {
  dnnl::primitive_attr a;
  a.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return a;
}

std::shared_ptr<Prims> Get(const Geom& g, char kind) {
  std::string key = g.Key(kind);
  {
    std::lock_guard<std::mutex> l(cache_mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto fwd_pd = FwdPd(g);
  auto p = std::make_shared<Prims>();
  if (kind == 'f') {
    auto pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        g.Src(), g.WeiAny(), g.Dst(), g.strides, g.dil, g.pad_l, g.pad_r, UserScratch());
    p->prim = dnnl::convolution_forward(pd);
    p->wei = pd.weights_desc();
    p->scratch = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  } else if (kind == 'd') {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.WeiAny(), g.Dst(), g.strides,
        g.dil, g.pad_l, g.pad_r, fwd_pd, UserScratch());
    p->prim = dnnl::convolution_backward_data(pd);
    p->wei = pd.weights_desc();
    p->scratch = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.WeiAny(), g.Dst(), g.strides,
        g.dil, g.pad_l, g.pad_r, fwd_pd, UserScratch());
    p->prim = dnnl::convolution_backward_weights(pd);
    p->wei = pd.diff_weights_desc();
    p->scratch = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  }
  p->reorder = p->wei != g.WeiUser();
  if (p->reorder) {
    if (kind == 'w')
      p->from_wei = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), p->wei, Engine(),
                                                                g.WeiUser()));
    else
      p->to_wei = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), g.WeiUser(), Engine(),
                                                              p->wei));
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
thread_local Buffer scratch_buf, wei_buf;

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

memory Scratch(const Prims& p) {
  return memory(p.scratch, Engine(), scratch_buf.Get(p.scratch.get_size()));
}

// Runs one cached primitive on XLA's buffers. 'f': a = x, b = k, out = y; 'd': a = dy,
// b = k, out = dx; 'w': a = x, b = dy, out = dk.
void Run(const Geom& g, char kind, void* a, void* b, void* out) {
  auto p = Get(g, kind);
  dnnl::stream s(Engine());
  const bool kernel_in = kind != 'w';
  memory user_w(g.WeiUser(), Engine(), kernel_in ? b : out);
  memory w = user_w;
  if (p->reorder) {
    w = memory(p->wei, Engine(), wei_buf.Get(p->wei.get_size()));
    if (kernel_in) p->to_wei.execute(s, user_w, w);
  }
  std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, Scratch(*p)}};
  if (kind == 'f') {
    args[DNNL_ARG_SRC] = memory(g.Src(), Engine(), a);
    args[DNNL_ARG_WEIGHTS] = w;
    args[DNNL_ARG_DST] = memory(g.Dst(), Engine(), out);
  } else if (kind == 'd') {
    args[DNNL_ARG_DIFF_DST] = memory(g.Dst(), Engine(), a);
    args[DNNL_ARG_WEIGHTS] = w;
    args[DNNL_ARG_DIFF_SRC] = memory(g.Src(), Engine(), out);
  } else {
    args[DNNL_ARG_SRC] = memory(g.Src(), Engine(), a);
    args[DNNL_ARG_DIFF_DST] = memory(g.Dst(), Engine(), b);
    args[DNNL_ARG_DIFF_WEIGHTS] = w;
  }
  p->prim.execute(s, args);
  if (!kernel_in && p->reorder) p->from_wei.execute(s, w, user_w);
  s.wait();
}

}  // namespace

// y = conv(x, k)
ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                       int64_t groups) {
  Geom g;
  auto err = MakeGeom(x.dimensions(), k.dimensions(), y->dimensions(), strides, dilation,
                      padding, groups, &g);
  if (!err.success()) return err;
  return Guard([&] { Run(g, 'f', x.typed_data(), k.typed_data(), y->typed_data()); });
}

// dx = conv_transpose(dy, k): the input gradient.
ffi::Error ConvBwdDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                           ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> padding,
                           int64_t groups) {
  Geom g;
  auto err = MakeGeom(dx->dimensions(), k.dimensions(), dy.dimensions(), strides, dilation,
                      padding, groups, &g);
  if (!err.success()) return err;
  return Guard([&] { Run(g, 'd', dy.typed_data(), k.typed_data(), dx->typed_data()); });
}

// dk = correlation of x with dy: the kernel gradient.
ffi::Error ConvBwdWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dk, ffi::Span<const int64_t> strides,
                              ffi::Span<const int64_t> dilation,
                              ffi::Span<const int64_t> padding, int64_t groups) {
  Geom g;
  auto err = MakeGeom(x.dimensions(), dk->dimensions(), dy.dimensions(), strides, dilation,
                      padding, groups, &g);
  if (!err.success()) return err;
  return Guard([&] { Run(g, 'w', x.typed_data(), dy.typed_data(), dk->typed_data()); });
}

#define JSEG_CONV_ATTRS                               \
  .Attr<ffi::Span<const int64_t>>("strides")          \
      .Attr<ffi::Span<const int64_t>>("dilation")     \
      .Attr<ffi::Span<const int64_t>>("padding")      \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JSEG_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvBwdData, ConvBwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JSEG_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsegConvBwdWeights, ConvBwdWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JSEG_CONV_ATTRS);

// Which oneDNN implementation each primitive uses ("brg:avx512_core", "jit:avx2", ...), for
// benchmarks and tests: a reference implementation would be a silent 100x slowdown.
extern "C" int jseg_onednn_impl(const int64_t* dims, int64_t groups, char kind, char* out,
                                int out_len) {
  try {
    Geom g;
    g.n = dims[0]; g.h = dims[1]; g.w = dims[2]; g.c = dims[3];
    g.kh = dims[4]; g.kw = dims[5]; g.ci_g = dims[6]; g.oc = dims[7];
    g.oh = dims[8]; g.ow = dims[9]; g.groups = groups;
    g.strides = {dims[10], dims[11]};
    g.dil = {dims[12] - 1, dims[13] - 1};
    g.pad_l = {dims[14], dims[16]};
    g.pad_r = {dims[15], dims[17]};
    auto p = Get(g, kind);
    std::string s = p->impl;
    std::strncpy(out, s.c_str(), out_len - 1);
    out[out_len - 1] = 0;
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(out, e.what(), out_len - 1);
    out[out_len - 1] = 0;
    return 1;
  }
}
