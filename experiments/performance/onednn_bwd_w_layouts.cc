// oneDNN's kernel-gradient primitive on NHWC activations against the same primitive on the
// layouts it prefers (format_tag::any), reorders timed apart (fourteenth pass,
// experiments/performance/README.md). Build against the wheel's oneDNN:
//   P=$(python -c "import sys;print(sys.prefix)")
//   g++ -O2 -std=c++17 onednn_bwd_w_layouts.cc -I$P/include -L$P/lib -ldnnl -Wl,-rpath,$P/lib -o bww
//   OMP_NUM_THREADS=2 ./bww N H C OC ANY [K STRIDE DILATION]     # ANY: 0 NHWC, 1 blocked
#include "oneapi/dnnl/dnnl.hpp"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
using namespace dnnl; using tag=memory::format_tag; using dt=memory::data_type;
int main(int argc,char**argv){
  int n=atoi(argv[1]),h=atoi(argv[2]),c=atoi(argv[3]),oc=atoi(argv[4]); int anysrc=atoi(argv[5]); int k=argc>6?atoi(argv[6]):3, sd=argc>7?atoi(argv[7]):1, dd=argc>8?atoi(argv[8]):1; int p=dd*(k-1)/2; int oh=(h+2*p-dd*(k-1)-1)/sd+1;
  engine eng(engine::kind::cpu,0); stream s(eng);
  memory::dims src={n,c,h,h},wei={oc,c,k,k},dst={n,oc,oh,oh},st={sd,sd},dl={dd-1,dd-1},pd={p,p};
  auto srcU=memory::desc(src,dt::f32,tag::nhwc), dstU=memory::desc(dst,dt::f32,tag::nhwc);
  auto srcA=anysrc?memory::desc(src,dt::f32,tag::any):srcU, dstA=anysrc?memory::desc(dst,dt::f32,tag::any):dstU;
  auto fpd=convolution_forward::primitive_desc(eng,prop_kind::forward_training,algorithm::convolution_direct,srcA,memory::desc(wei,dt::f32,tag::any),dstA,st,dl,pd,pd);
  auto bpd=convolution_backward_weights::primitive_desc(eng,algorithm::convolution_direct,srcA,memory::desc(wei,dt::f32,tag::any),dstA,st,dl,pd,pd,fpd);
  printf("impl %s src %s\n",bpd.impl_info_str(), bpd.src_desc()==srcU?"nhwc":"blocked");
  std::vector<float> xs((size_t)n*c*h*h,1.f),ys((size_t)n*oc*oh*oh,0.5f);
  memory xu(srcU,eng,xs.data()), yu(dstU,eng,ys.data());
  memory xb(bpd.src_desc(),eng), yb(bpd.diff_dst_desc(),eng), wb(bpd.diff_weights_desc(),eng);
  reorder rx(xu,xb), ry(yu,yb);
  auto bw=convolution_backward_weights(bpd);
  for(int rep=0;rep<7;rep++){
    auto t0=std::chrono::steady_clock::now();
    if(anysrc){rx.execute(s,xu,xb);ry.execute(s,yu,yb);} s.wait();
    auto t1=std::chrono::steady_clock::now();
    bw.execute(s,{{DNNL_ARG_SRC,anysrc?xb:xu},{DNNL_ARG_DIFF_DST,anysrc?yb:yu},{DNNL_ARG_DIFF_WEIGHTS,wb}}); s.wait();
    auto t2=std::chrono::steady_clock::now();
    printf("reorders %.1f ms bwd_w %.1f ms\n",std::chrono::duration<double,std::milli>(t1-t0).count(),std::chrono::duration<double,std::milli>(t2-t1).count());
  }
}
