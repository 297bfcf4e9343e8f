// Fused message passing of one Equivariant Transformer attention layer, forward, backward and the
// backward's derivative (second order, for training on forces), for XLA:CPU (XLA FFI custom calls). Python side, semantics and the reference formulas:
// mspec/models/fused_message.py. Compiled on first use by mspec/kernels/build.py.
//
// Layouts (row-major float32): q, k [N, F]; u [N, H, 3D] (per head [s | g | t]); vec [N, 3, F];
// pkv [R, 4F]: filter rows [pk | pv] before their bias and SiLU, as one GEMM writes them, with
// bias [4F]: dk = SiLU(pk + bias[:F]) [R, F], dv = SiLU(pv + bias[F:]) [R, H, 3D] (applied here,
// so that XLA does not write them out and read them back); unit [E, 3]; cut, mask [E];
// senders, receivers [E] int32; frow [E] int32: the filter row of each edge (both directions of
// an atom pair share one); rowperm / rowptr: the edges grouped by filter row (edge rowperm[p]
// for p in [rowptr[r], rowptr[r + 1])).
//
// Two schedules, chosen per call (attribute "schedule": 0 auto, 1 components, 2 passes):
//
// * components (the default whenever it balances): the nodes split into components, the
//   smallest node ranges that no active edge crosses (the molecules of a packed batch). One
//   thread does all the work of a component, its filter rows in order: the SiLU (and SiLU') of a
//   row is computed once into a per-thread buffer and used by all the row's edges in the
//   component, and every node and row cotangent of the component is summed in that thread, in a
//   fixed order. One pass forward, one pass backward, no scratch in memory. A filter row whose
//   edges lie in several components (the pair layout's row shared by all self-loops) gets one
//   partial sum per component, added up in component order after the parallel loop.
// * passes (when one component holds more than 1/8 of the active edges, e.g. a few big
//   molecules): the forward runs over receivers; the backward's pass 1 over filter
//   rows (keeping each edge's attention weight and logit cotangent, [E, H]), pass 2 over
//   receivers (dq), pass 3 over senders. Activated filter rows go to scratch.
//
// Either way every output is written by one thread in a fixed order: results are bitwise
// repeatable, whatever the threads' timing, and need no atomics.
//
// Threads: the parallel loops run on XLA's own intra-op thread pool (the FFI's ThreadPool
// context), the threads that also run XLA's GEMMs and fusions. XLA runs independent ops at the
// same time (e.g. this kernel beside the layer's vec_proj GEMM); with a thread pool of the
// kernel's own (OpenMP) the two would oversubscribe the cores and spin against each other.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;
using B = ffi::Buffer<ffi::F32>;
using I = ffi::Buffer<ffi::S32>;
using R = ffi::ResultBuffer<ffi::F32>;

namespace {

using mspec_kernels::parallel_for;
using mspec_kernels::scratch;

enum Schedule : int64_t { kAuto = 0, kComponents = 1, kPasses = 2 };

// Heads whose attention weights one edge computes together (a stack array).
constexpr int64_t kHeadBlock = 16;

// exp(x) for the SiLU, inline so that loops over a filter row vectorise without a libm call:
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6 polynomial for
// e^r (relative error about 1e-7, like expf), times 2^n built in the exponent bits. x is clamped
// to [-87, 88], where 2^n stays a normal float: beyond, exp saturates (SiLU is then 0 or x to
// float precision).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float x) { return 1.f / (1.f + fast_exp(-x)); }

// The attention logit of one head: sum_d q_d k_d dk_d, with the activated filter dk = SiLU(pk).
inline float head_logit(const float* q, const float* k, const float* dk, int64_t D) {
  float ar = 0.f;
#pragma omp simd reduction(+ : ar)
  for (int64_t d = 0; d < D; ++d) ar += q[d] * k[d] * dk[d];
  return ar;
}

// With z = x + bias: act = SiLU(z) and (unless grad is null) grad = SiLU'(z)
// = sigmoid(z) (1 + z (1 - sigmoid(z))).
inline void activate(const float* x, const float* bias, float* act, float* grad, int64_t n) {
#pragma omp simd
  for (int64_t r = 0; r < n; ++r) {
    const float z = x[r] + bias[r];
    const float s = sigmoid(z);
    act[r] = z * s;
    if (grad != nullptr) grad[r] = s * (1.f + z * (1.f - s));
  }
}

// The inputs every kernel reads, as raw pointers, and the sizes.
struct Graph {
  int64_t N, F, H, D, E, NR;
  const float *Q, *K, *U, *V, *PKV, *BIAS, *UN, *C, *M;
  const int32_t *S, *RC, *FR, *ROWPERM, *ROWPTR;

  Graph(B q, B k, B u, B vec, B pkv, B bias, B unit, B cut, B mask, I senders, I receivers,
        I frow, I rowperm, I rowptr, int64_t heads)
      : N(q.dimensions()[0]), F(q.dimensions()[1]), H(heads), D(F / heads),
        E(senders.dimensions()[0]), NR(pkv.dimensions()[0]), Q(q.typed_data()),
        K(k.typed_data()), U(u.typed_data()), V(vec.typed_data()), PKV(pkv.typed_data()),
        BIAS(bias.typed_data()), UN(unit.typed_data()), C(cut.typed_data()),
        M(mask.typed_data()), S(senders.typed_data()), RC(receivers.typed_data()),
        FR(frow.typed_data()), ROWPERM(rowperm.typed_data()), ROWPTR(rowptr.typed_data()) {}

  // Activated filter row r (and, unless grad is null, its SiLU') into act [4F]: [dk | dv].
  void activate_row(int64_t r, float* act, float* grad) const {
    activate(PKV + r * 4 * F, BIAS, act, grad, 4 * F);
  }
};

// Graph::activate_row for all rows, over the threads (passes schedule): act, grad [R, 4F].
void activate_rows(ffi::ThreadPool& pool, const Graph& g, float* act, float* grad) {
  const int64_t F = g.F;
  parallel_for(pool, g.NR, 64, 0, [&](int64_t r0, int64_t r1, float*) {
    for (int64_t r = r0; r < r1; ++r)
      g.activate_row(r, act + r * 4 * F, grad == nullptr ? nullptr : grad + r * 4 * F);
  });
}

// Edges grouped by a node index (receivers or senders), stable: edge perm[p] for p in
// [ptr[i], ptr[i + 1]), in increasing edge order (a counting sort).
void group_by_node(const int32_t* node, int64_t E, int64_t N, std::vector<int32_t>& perm,
                   std::vector<int32_t>& ptr) {
  ptr.assign(N + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++ptr[node[e] + 1];
  for (int64_t i = 0; i < N; ++i) ptr[i + 1] += ptr[i];
  perm.resize(E);
  std::vector<int32_t> next(ptr.begin(), ptr.end() - 1);
  for (int64_t e = 0; e < E; ++e) perm[next[node[e]]++] = static_cast<int32_t>(e);
}

// The components schedule: node ranges no active edge crosses, and their edges.
struct Components {
  int64_t count = 0;
  std::vector<int32_t> node_start;  // [count + 1]: component c holds nodes [start[c], start[c+1])
  std::vector<int32_t> edge_ptr;    // [count + 1]
  std::vector<int32_t> edges;       // [E]: by component (of the receiver), then filter row
  std::vector<int32_t> order;       // components, most active edges first
  int64_t max_work = 0, total_work = 0;
};

Components find_components(const Graph& g) {
  Components c;
  // Each active edge between different nodes covers the gaps between its lower and its higher
  // node; a component ends at every gap that no edge covers.
  std::vector<int32_t> open(g.N + 1, 0);
  for (int64_t e = 0; e < g.E; ++e) {
    if (g.M[e] == 0.f || g.S[e] == g.RC[e]) continue;
    ++open[std::min(g.S[e], g.RC[e])];
    --open[std::max(g.S[e], g.RC[e])];
  }
  std::vector<int32_t> component(g.N);
  c.node_start.push_back(0);
  int64_t covering = 0;
  for (int64_t i = 0; i < g.N; ++i) {
    component[i] = static_cast<int32_t>(c.count);
    covering += open[i];
    if (covering == 0) {
      ++c.count;
      c.node_start.push_back(static_cast<int32_t>(i + 1));
    }
  }
  // Edges by the component of their receiver, in filter-row order (rowperm), so that a row's
  // edges in one component are consecutive.
  c.edge_ptr.assign(c.count + 1, 0);
  std::vector<int64_t> work(c.count, 0);
  for (int64_t e = 0; e < g.E; ++e) {
    ++c.edge_ptr[component[g.RC[e]] + 1];
    if (g.M[e] != 0.f) ++work[component[g.RC[e]]];
  }
  for (int64_t u = 0; u < c.count; ++u) c.edge_ptr[u + 1] += c.edge_ptr[u];
  c.edges.resize(g.E);
  std::vector<int32_t> next(c.edge_ptr.begin(), c.edge_ptr.end() - 1);
  for (int64_t p = 0; p < g.E; ++p) {
    const int32_t e = g.ROWPERM[p];
    c.edges[next[component[g.RC[e]]]++] = e;
  }
  c.order.resize(c.count);
  for (int64_t u = 0; u < c.count; ++u) c.order[u] = static_cast<int32_t>(u);
  // Largest first, so that a big component does not start last and hold up the end.
  std::stable_sort(c.order.begin(), c.order.end(),
                   [&](int32_t a, int32_t b) { return work[a] > work[b]; });
  for (int64_t w : work) {
    c.max_work = std::max(c.max_work, w);
    c.total_work += w;
  }
  return c;
}

// Whether the components schedule spreads well: no component holds more than 1/8 of the active
// edges. The rule looks at the batch only, never at the thread count: the two schedules round
// differently, and a run resumed in another process (with another number of CPUs, hence of XLA
// threads) must repeat the same steps bit for bit.
bool use_components(const Components& c, int64_t schedule) {
  if (schedule != kAuto) return schedule == kComponents;
  return 8 * c.max_work <= c.total_work;
}

ffi::Error bad_schedule(int64_t schedule) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "mspec et_message: unknown schedule " + std::to_string(schedule));
}

// ---------------------------------------------------------------------------------------------
// Forward: x_agg[i] = sum_e s_e * a_e * m_e; vec_agg[i] = sum_e (vec_j * g_e + t_e unit_e) * m_e,
// with a_e = SiLU(sum_d q_i k_j dk_e) * cut_e per head and [s | g | t] = u_j * dv_e.

// One edge's messages into its receiver's rows, given the edge's activated filter row.
// kD > 0: the head width D as a compile-time constant (instantiated for D = 32, the papers' 8
// heads of 256 channels), so the per-head loops compile to whole vector registers with no loop
// or remainder; kD = 0 reads D from the graph (any width). Same arithmetic either way.
template <int64_t kD>
inline void forward_edge(const Graph& g, int64_t e, const float* ak, const float* av, float* X,
                         float* VA) {
  const int64_t F = g.F, D = kD > 0 ? kD : g.D, i = g.RC[e], j = g.S[e];
  const float m = g.M[e];
  const float *qi = g.Q + i * F, *kj = g.K + j * F, *uj = g.U + j * 3 * F, *vj = g.V + j * 3 * F;
  float *xi = X + i * F, *vi = VA + i * 3 * F;
  const float u0 = g.UN[e * 3], u1 = g.UN[e * 3 + 1], u2 = g.UN[e * 3 + 2];
  const float w = g.C[e] * m;
  for (int64_t h0 = 0; h0 < g.H; h0 += kHeadBlock) {
    // The attention weights of a block of heads first, so that their sigmoids vectorise.
    const int64_t nh = std::min(kHeadBlock, g.H - h0);
    float att[kHeadBlock];
    for (int64_t b = 0; b < nh; ++b) {
      const int64_t o = (h0 + b) * D;
      att[b] = head_logit(qi + o, kj + o, ak + o, D);
    }
#pragma omp simd
    for (int64_t b = 0; b < nh; ++b) att[b] *= sigmoid(att[b]) * w;
    for (int64_t b = 0; b < nh; ++b) {
      const int64_t h = h0 + b, o = h * D;
      const float a = att[b];
      const float *uh = uj + h * 3 * D, *avh = av + h * 3 * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float s = uh[d] * avh[d], gg = uh[D + d] * avh[D + d];
        const float t = uh[2 * D + d] * avh[2 * D + d];
        const int64_t c = o + d;
        xi[c] += s * a;
        vi[c] += (vj[c] * gg + t * u0) * m;
        vi[F + c] += (vj[F + c] * gg + t * u1) * m;
        vi[2 * F + c] += (vj[2 * F + c] * gg + t * u2) * m;
      }
    }
  }
}

void forward_components(ffi::ThreadPool& pool, const Graph& g, const Components& comp, float* X,
                        float* VA) {
  const int64_t F = g.F;
  // Scratch: this thread's activated filter row [dk | dv].
  parallel_for(pool, comp.count, 1, 4 * F, [&](int64_t n0, int64_t n1, float* act) {
    float *ak = act, *av = ak + F;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t u = comp.order[n];
      const int64_t lo = comp.node_start[u], hi = comp.node_start[u + 1];
      std::memset(X + lo * F, 0, (hi - lo) * F * sizeof(float));
      std::memset(VA + lo * 3 * F, 0, (hi - lo) * 3 * F * sizeof(float));
      int64_t row = -1;
      for (int32_t p = comp.edge_ptr[u]; p < comp.edge_ptr[u + 1]; ++p) {
        const int64_t e = comp.edges[p];
        if (g.M[e] == 0.f) continue;
        if (g.FR[e] != row) {
          row = g.FR[e];
          g.activate_row(row, act, nullptr);
        }
        if (g.D == 32) {
          forward_edge<32>(g, e, ak, av, X, VA);
        } else {
          forward_edge<0>(g, e, ak, av, X, VA);
        }
      }
    }
  });
}

void forward_passes(ffi::ThreadPool& pool, const Graph& g, float* X, float* VA) {
  const int64_t F = g.F;
  std::unique_ptr<float[]> ACT = scratch(g.NR * 4 * F);
  activate_rows(pool, g, ACT.get(), nullptr);
  std::vector<int32_t> rperm, rptr;
  group_by_node(g.RC, g.E, g.N, rperm, rptr);
  parallel_for(pool, g.N, 16, 0, [&](int64_t i0, int64_t i1, float*) {
    for (int64_t i = i0; i < i1; ++i) {
      std::memset(X + i * F, 0, F * sizeof(float));
      std::memset(VA + i * 3 * F, 0, 3 * F * sizeof(float));
      for (int32_t p = rptr[i]; p < rptr[i + 1]; ++p) {
        const int64_t e = rperm[p];
        if (g.M[e] == 0.f) continue;
        const float* act = ACT.get() + g.FR[e] * 4 * F;
        if (g.D == 32) {
          forward_edge<32>(g, e, act, act + F, X, VA);
        } else {
          forward_edge<0>(g, e, act, act + F, X, VA);
        }
      }
    }
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, B q, B k, B u, B vec, B pkv, B bias, B unit, B cut,
                       B mask, I senders, I receivers, I frow, I rowperm, I rowptr, R xagg, R vagg,
                       int64_t heads, int64_t schedule) {
  if (schedule < kAuto || schedule > kPasses) return bad_schedule(schedule);
  const Graph g(q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm,
                rowptr, heads);
  float *X = xagg->typed_data(), *VA = vagg->typed_data();
  if (schedule != kPasses) {
    const Components comp = find_components(g);
    if (use_components(comp, schedule)) {
      forward_components(pool, g, comp, X, VA);
      return ffi::Error::Success();
    }
  }
  forward_passes(pool, g, X, VA);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Backward: the cotangents of every input but the mask and the indices, given gx = d x_agg and
// gv = d vec_agg. The filter cotangents come out per filter row ([R, 4F], the cotangent of
// [pk | pv] + bias), and summed over the rows for the bias ([4F]).

struct Grads {
  const float *GX, *GV;                                // [N, F], [N, 3, F]
  float *dQ, *dK, *dU, *dV, *dPKV, *dBIAS, *dUN, *dC;  // outputs
};

// The components schedule's work for one edge e = j -> i (active), given its row's activated
// filter (ak, av) and SiLU' (gk, gv): adds to dq_i, dk_j, du_j, dvec_j and the row's cotangent
// (ddk [F], ddv [3F]); writes d unit_e and d cut_e.
template <int64_t kD>
inline void backward_edge(const Graph& g, const Grads& o, int64_t e, const float* ak,
                          const float* av, const float* gk, const float* gvr, float* ddk,
                          float* ddv) {
  const int64_t F = g.F, D = kD > 0 ? kD : g.D, i = g.RC[e], j = g.S[e];
  const float m = g.M[e], ce = g.C[e];
  const float *qi = g.Q + i * F, *gxi = o.GX + i * F, *gvi = o.GV + i * 3 * F;
  const float *kj = g.K + j * F, *uj = g.U + j * 3 * F, *vj = g.V + j * 3 * F;
  float *dqi = o.dQ + i * F, *dkj = o.dK + j * F, *duj = o.dU + j * 3 * F, *dvj = o.dV + j * 3 * F;
  const float u0 = g.UN[e * 3], u1 = g.UN[e * 3 + 1], u2 = g.UN[e * 3 + 2];
  float du0 = 0.f, du1 = 0.f, du2 = 0.f, dcut = 0.f;
  for (int64_t h0 = 0; h0 < g.H; h0 += kHeadBlock) {
    // The logits and sigmoids of a block of heads first, so that the sigmoids vectorise.
    const int64_t nh = std::min(kHeadBlock, g.H - h0);
    float logit[kHeadBlock], sig[kHeadBlock];
    for (int64_t b = 0; b < nh; ++b) {
      const int64_t oh = (h0 + b) * D;
      logit[b] = head_logit(qi + oh, kj + oh, ak + oh, D);
    }
#pragma omp simd
    for (int64_t b = 0; b < nh; ++b) sig[b] = sigmoid(logit[b]);
    for (int64_t b = 0; b < nh; ++b) {
      const int64_t h = h0 + b, oh = h * D;
      const float ar = logit[b], sg = sig[b];
      const float a = ar * sg * ce * m;
      const float *uh = uj + h * 3 * D, *avh = av + h * 3 * D, *gvh = gvr + h * 3 * D;
      float *ddvh = ddv + h * 3 * D, *duh = duj + h * 3 * D;
      float da = 0.f;  // d loss / d (SiLU(ar) * cut * m)
#pragma omp simd reduction(+ : da, du0, du1, du2)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = oh + d;
        const float fs = avh[d], fg = avh[D + d], ft = avh[2 * D + d];
        const float us = uh[d], ug = uh[D + d], ut = uh[2 * D + d];
        const float gx = gxi[c], g0 = gvi[c], g1 = gvi[F + c], g2 = gvi[2 * F + c];
        const float t = ut * ft, gg = ug * fg;
        da += gx * us * fs;
        const float dg = (g0 * vj[c] + g1 * vj[F + c] + g2 * vj[2 * F + c]) * m;
        const float dt = (g0 * u0 + g1 * u1 + g2 * u2) * m;
        ddvh[d] += gx * a * us * gvh[d];
        ddvh[D + d] += dg * ug * gvh[D + d];
        ddvh[2 * D + d] += dt * ut * gvh[2 * D + d];
        du0 += g0 * t * m;
        du1 += g1 * t * m;
        du2 += g2 * t * m;
        duh[d] += gx * a * fs;
        duh[D + d] += dg * fg;
        duh[2 * D + d] += dt * ft;
        dvj[c] += g0 * gg * m;
        dvj[F + c] += g1 * gg * m;
        dvj[2 * F + c] += g2 * gg * m;
      }
      dcut += da * ar * sg * m;
      const float dar = da * m * ce * sg * (1.f + ar * (1.f - sg));
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = oh + d;
        ddk[c] += dar * qi[c] * kj[c] * gk[c];
        dqi[c] += dar * kj[c] * ak[c];
        dkj[c] += dar * qi[c] * ak[c];
      }
    }
  }
  o.dUN[e * 3] = du0;
  o.dUN[e * 3 + 1] = du1;
  o.dUN[e * 3 + 2] = du2;
  o.dC[e] = dcut;
}

// The end of the run of component u's edges, from position p on, that share p's filter row
// (the edges are in row order within a component), and whether any of them is active.
inline int32_t row_run_end(const Graph& g, const Components& comp, int64_t u, int32_t p,
                           bool* active) {
  const int32_t row = g.FR[comp.edges[p]];
  int32_t end = p;
  while (end < comp.edge_ptr[u + 1] && g.FR[comp.edges[end]] == row) {
    *active |= g.M[comp.edges[end]] != 0.f;
    ++end;
  }
  return end;
}

// The filter-row and bias cotangents of the components schedule. A row's edges in one component
// are summed by that component's thread; a row whose edges lie in several components (the pair
// layout's row shared by all self-loops) gets one partial sum per component, added up in
// component order after the parallel loop. Each component's share of the bias cotangent (the sum
// of its row cotangents) is added while each row's sum is still in cache (a second pass over
// [R, 4F], as the passes schedule does, would cost as much as the reduction XLA did before).
struct RowSums {
  int64_t F;
  std::vector<std::vector<int32_t>> partial_rows;  // per component
  std::vector<std::vector<float>> partials;        // per component: [rows, 4F]
  std::vector<float> bias_parts;                   // [count, 4F]

  RowSums(const Graph& g, const Components& comp, float* dPKV)
      : F(g.F), partial_rows(comp.count), partials(comp.count), bias_parts(comp.count * 4 * g.F, 0.f) {
    // Rows with no edge at all get zero cotangents (the parallel loop only writes rows it sees).
    for (int64_t row = 0; row < g.NR; ++row) {
      if (g.ROWPTR[row + 1] == g.ROWPTR[row]) std::memset(dPKV + row * 4 * F, 0, 4 * F * sizeof(float));
    }
  }

  // Component u's sum over `count` edges of filter row `row`: final when those are all its edges.
  void add(const Graph& g, int64_t u, int64_t row, int64_t count, const float* sum, float* dPKV) {
    if (count == g.ROWPTR[row + 1] - g.ROWPTR[row]) {
      std::memcpy(dPKV + row * 4 * F, sum, 4 * F * sizeof(float));
    } else {
      partial_rows[u].push_back(static_cast<int32_t>(row));
      partials[u].insert(partials[u].end(), sum, sum + 4 * F);
    }
    float* bias_part = bias_parts.data() + u * 4 * F;
#pragma omp simd
    for (int64_t c = 0; c < 4 * F; ++c) bias_part[c] += sum[c];
  }

  // After the parallel loop: the shared rows and the bias, in component order.
  void finish(const Graph& g, int64_t count, float* dPKV, float* dBIAS) const {
    std::vector<char> started(g.NR, 0);
    std::memset(dBIAS, 0, 4 * F * sizeof(float));
    for (int64_t u = 0; u < count; ++u) {
      for (size_t n = 0; n < partial_rows[u].size(); ++n) {
        const int64_t row = partial_rows[u][n];
        const float* part = partials[u].data() + n * 4 * F;
        float* dpkv = dPKV + row * 4 * F;
        if (!started[row]) {
          started[row] = 1;
          std::memcpy(dpkv, part, 4 * F * sizeof(float));
        } else {
          for (int64_t c = 0; c < 4 * F; ++c) dpkv[c] += part[c];
        }
      }
      const float* bias_part = bias_parts.data() + u * 4 * F;
      for (int64_t c = 0; c < 4 * F; ++c) dBIAS[c] += bias_part[c];
    }
  }
};

void backward_components(ffi::ThreadPool& pool, const Graph& g, const Grads& o,
                         const Components& comp) {
  const int64_t F = g.F;
  RowSums sums(g, comp, o.dPKV);
  // Scratch: this thread's filter row: activation [dk | dv], SiLU', cotangent; 4F each.
  parallel_for(pool, comp.count, 1, 12 * F, [&](int64_t n0, int64_t n1, float* buf) {
    float *ak = buf, *av = ak + F, *gk = buf + 4 * F, *gvr = gk + F, *ddk = buf + 8 * F;
    float* ddv = ddk + F;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t u = comp.order[n];
      const int64_t lo = comp.node_start[u], hi = comp.node_start[u + 1];
      std::memset(o.dQ + lo * F, 0, (hi - lo) * F * sizeof(float));
      std::memset(o.dK + lo * F, 0, (hi - lo) * F * sizeof(float));
      std::memset(o.dU + lo * 3 * F, 0, (hi - lo) * 3 * F * sizeof(float));
      std::memset(o.dV + lo * 3 * F, 0, (hi - lo) * 3 * F * sizeof(float));
      for (int32_t p = comp.edge_ptr[u]; p < comp.edge_ptr[u + 1];) {
        // The edges [p, end) of this component that share one filter row.
        const int64_t row = g.FR[comp.edges[p]];
        bool active = false;
        const int32_t end = row_run_end(g, comp, u, p, &active);
        std::memset(ddk, 0, 4 * F * sizeof(float));
        if (active) g.activate_row(row, ak, gk);
        for (int32_t q = p; q < end; ++q) {
          const int64_t e = comp.edges[q];
          if (g.M[e] == 0.f) {
            o.dUN[e * 3] = o.dUN[e * 3 + 1] = o.dUN[e * 3 + 2] = 0.f;
            o.dC[e] = 0.f;
            continue;
          }
          if (g.D == 32) {
            backward_edge<32>(g, o, e, ak, av, gk, gvr, ddk, ddv);
          } else {
            backward_edge<0>(g, o, e, ak, av, gk, gvr, ddk, ddv);
          }
        }
        sums.add(g, u, row, end - p, ddk, o.dPKV);
        p = end;
      }
    }
  });
  sums.finish(g, comp.count, o.dPKV, o.dBIAS);
}

// The passes schedule (see the top of the file).
void backward_passes(ffi::ThreadPool& pool, const Graph& g, const Grads& o) {
  const int64_t N = g.N, F = g.F, H = g.H, D = g.D, NR = g.NR;
  const float *Q = g.Q, *K = g.K, *U = g.U, *V = g.V, *UN = g.UN, *C = g.C, *M = g.M;
  const float *GX = o.GX, *GV = o.GV;
  const int32_t *S = g.S, *RC = g.RC, *FR = g.FR, *ROWPERM = g.ROWPERM, *ROWPTR = g.ROWPTR;
  float *dQ = o.dQ, *dK = o.dK, *dU = o.dU, *dV = o.dV, *dPKV = o.dPKV;
  float *dUN = o.dUN, *dC = o.dC;
  // Activated rows and their SiLU', [R, 4F] each; a row is [dk | dv].
  std::unique_ptr<float[]> act = scratch(NR * 4 * F), grad = scratch(NR * 4 * F);
  std::unique_ptr<float[]> att = scratch(g.E * H), dlogit = scratch(g.E * H);
  float *ACT = act.get(), *GRAD = grad.get();
  float *ATT = att.get(), *DAR = dlogit.get();
  activate_rows(pool, g, ACT, GRAD);
  std::vector<int32_t> rperm, rptr, sperm, sptr;
  group_by_node(RC, g.E, N, rperm, rptr);
  group_by_node(S, g.E, N, sperm, sptr);
  // Pass 1, over filter rows, last row first (in the pair layout the last row is the one all
  // self-loops share, by far the largest: started first, it cannot hold up the end of the loop):
  // d dk, d dv (per row), d unit, d cut, a, d logit (per edge).
  parallel_for(pool, NR, 16, 0, [&](int64_t n0, int64_t n1, float*) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t row = NR - 1 - n;
      float *ddk = dPKV + row * 4 * F, *ddv = ddk + F;
      std::memset(ddk, 0, 4 * F * sizeof(float));
      const float *ake = ACT + row * 4 * F, *ave = ake + F;
      const float *gke = GRAD + row * 4 * F, *gve = gke + F;
      for (int32_t p = ROWPTR[row]; p < ROWPTR[row + 1]; ++p) {
        const int64_t e = ROWPERM[p];
        float* dun = dUN + e * 3;
        const float m = M[e];
        if (m == 0.f) {
          dun[0] = dun[1] = dun[2] = 0.f;
          dC[e] = 0.f;
          continue;
        }
        const int64_t i = RC[e], j = S[e];
        const float *qi = Q + i * F, *gxi = GX + i * F, *gvi = GV + i * 3 * F;
        const float *kj = K + j * F, *uj = U + j * 3 * F, *vj = V + j * 3 * F;
        const float u0 = UN[e * 3], u1 = UN[e * 3 + 1], u2 = UN[e * 3 + 2];
        float du0 = 0.f, du1 = 0.f, du2 = 0.f, dcut = 0.f;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t oh = h * D;
          const float ar = head_logit(qi + oh, kj + oh, ake + oh, D);
          const float sg = sigmoid(ar);
          const float a = ar * sg * C[e] * m;
          const float *uh = uj + h * 3 * D, *avh = ave + h * 3 * D;
          float* ddvh = ddv + h * 3 * D;
          const float* gvh = gve + h * 3 * D;
          float da = 0.f;
#pragma omp simd reduction(+ : da, du0, du1, du2)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t c = oh + d;
            const float s = uh[d] * avh[d], t = uh[2 * D + d] * avh[2 * D + d];
            da += gxi[c] * s;
            ddvh[d] += gxi[c] * a * uh[d] * gvh[d];
            const float dg = (gvi[c] * vj[c] + gvi[F + c] * vj[F + c] + gvi[2 * F + c] * vj[2 * F + c]) * m;
            ddvh[D + d] += dg * uh[D + d] * gvh[D + d];
            const float dt = (gvi[c] * u0 + gvi[F + c] * u1 + gvi[2 * F + c] * u2) * m;
            ddvh[2 * D + d] += dt * uh[2 * D + d] * gvh[2 * D + d];
            du0 += gvi[c] * t * m;
            du1 += gvi[F + c] * t * m;
            du2 += gvi[2 * F + c] * t * m;
          }
          dcut += da * ar * sg * m;
          const float dar = da * m * C[e] * sg * (1.f + ar * (1.f - sg));
          ATT[e * H + h] = a;
          DAR[e * H + h] = dar;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ddk[oh + d] += dar * qi[oh + d] * kj[oh + d] * gke[oh + d];
        }
        dun[0] = du0;
        dun[1] = du1;
        dun[2] = du2;
        dC[e] = dcut;
      }
    }
  });
  // Pass 2, over receivers: dq (per receiver, in a fixed edge order).
  parallel_for(pool, N, 16, 0, [&](int64_t i0, int64_t i1, float*) {
    for (int64_t i = i0; i < i1; ++i) {
      float* dqi = dQ + i * F;
      std::memset(dqi, 0, F * sizeof(float));
      for (int32_t p = rptr[i]; p < rptr[i + 1]; ++p) {
        const int64_t e = rperm[p];
        if (M[e] == 0.f) continue;
        const float *kj = K + S[e] * F, *ake = ACT + FR[e] * 4 * F;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t oh = h * D;
          const float dar = DAR[e * H + h];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dqi[oh + d] += dar * kj[oh + d] * ake[oh + d];
        }
      }
    }
  });
  // Pass 3, over senders: dk, du, dvec (per sender).
  parallel_for(pool, N, 16, 0, [&](int64_t j0, int64_t j1, float*) {
    for (int64_t j = j0; j < j1; ++j) {
      float *dkj = dK + j * F, *duj = dU + j * 3 * F, *dvj = dV + j * 3 * F;
      std::memset(dkj, 0, F * sizeof(float));
      std::memset(duj, 0, 3 * F * sizeof(float));
      std::memset(dvj, 0, 3 * F * sizeof(float));
      const float *uj = U + j * 3 * F, *vj = V + j * 3 * F;
      for (int32_t p = sptr[j]; p < sptr[j + 1]; ++p) {
        const int64_t e = sperm[p];
        const float m = M[e];
        if (m == 0.f) continue;
        const int64_t i = RC[e];
        const float *qi = Q + i * F, *gxi = GX + i * F, *gvi = GV + i * 3 * F;
        const float *ake = ACT + FR[e] * 4 * F, *ave = ake + F;
        const float u0 = UN[e * 3], u1 = UN[e * 3 + 1], u2 = UN[e * 3 + 2];
        for (int64_t h = 0; h < H; ++h) {
          const int64_t oh = h * D;
          const float a = ATT[e * H + h];
          const float *uh = uj + h * 3 * D, *avh = ave + h * 3 * D;
          float* duh = duj + h * 3 * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const int64_t c = oh + d;
            const float fs = avh[d], fg = avh[D + d], ft = avh[2 * D + d];
            duh[d] += gxi[c] * a * fs;
            const float gg = uh[D + d] * fg;
            const float dg = (gvi[c] * vj[c] + gvi[F + c] * vj[F + c] + gvi[2 * F + c] * vj[2 * F + c]) * m;
            duh[D + d] += dg * fg;
            const float dt = (gvi[c] * u0 + gvi[F + c] * u1 + gvi[2 * F + c] * u2) * m;
            duh[2 * D + d] += dt * ft;
            dvj[c] += gvi[c] * gg * m;
            dvj[F + c] += gvi[F + c] * gg * m;
            dvj[2 * F + c] += gvi[2 * F + c] * gg * m;
          }
          const float dar = DAR[e * H + h];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dkj[oh + d] += dar * qi[oh + d] * ake[oh + d];
        }
      }
    }
  });
  // The bias: the row cotangents summed over the rows, in row order, one block of 64 channels
  // per work item.
  const int64_t block = 64;
  parallel_for(pool, (4 * F + block - 1) / block, 1, 0, [&](int64_t b0, int64_t b1, float*) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * block, hi = std::min(4 * F, lo + block);
      float* db = o.dBIAS;
      for (int64_t c = lo; c < hi; ++c) db[c] = 0.f;
      for (int64_t row = 0; row < NR; ++row) {
        const float* dpkv = dPKV + row * 4 * F;
#pragma omp simd
        for (int64_t c = lo; c < hi; ++c) db[c] += dpkv[c];
      }
    }
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, B q, B k, B u, B vec, B pkv, B bias, B unit, B cut,
                        B mask, I senders, I receivers, I frow, I rowperm, I rowptr, B gx, B gv,
                        R oq, R ok, R ou, R ovec, R opkv, R obias, R ounit, R ocut, int64_t heads,
                        int64_t schedule) {
  if (schedule < kAuto || schedule > kPasses) return bad_schedule(schedule);
  const Graph g(q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm,
                rowptr, heads);
  const Grads o{gx.typed_data(),     gv.typed_data(),     oq->typed_data(),   ok->typed_data(),
                ou->typed_data(),    ovec->typed_data(),  opkv->typed_data(), obias->typed_data(),
                ounit->typed_data(), ocut->typed_data()};
  if (schedule != kPasses) {
    const Components comp = find_components(g);
    if (use_components(comp, schedule)) {
      backward_components(pool, g, o, comp);
      return ffi::Error::Success();
    }
  }
  backward_passes(pool, g, o);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Second order. With f the forward at x = (q, k, u, vec, pkv, bias, unit, cut), the cotangents
// y_bar = (gx, gv) and a direction t of x, this computes the forward's tangent J(x) t
// (tx [N, F], tvagg [N, 3, F]) and the tangent of every backward output as x moves along t with
// y_bar fixed, i.e. H t for the Hessian H of <y_bar, f(x)>. Together they are the VJP of the
// backward (mspec/kernels/message.py): at a cotangent t of its outputs, y_bar gets J t and x gets
// H t (H is symmetric). Training on forces needs it: the forces are a backward pass, and their
// loss is differentiated once more. Schedule: components only (one thread per molecule), in the
// same fixed order as the backward, so results are bitwise repeatable.

struct Tangents {
  const float *TQ, *TK, *TU, *TV, *TPKV, *TBIAS, *TUN, *TC;
};

struct SecondOrder {
  float *TX, *TVA;                                     // J t
  float *dQ, *dK, *dU, *dV, *dPKV, *dBIAS, *dUN, *dC;  // H t, laid out as the backward's outputs
};

// Filter row r with its tangent: act = SiLU(z), grad = SiLU'(z), tact = SiLU'(z) tz and
// tgrad = SiLU''(z) tz for z = pkv + bias, tz = tpkv + tbias; SiLU'' = s (1 - s) (2 + z (1 - 2 s)).
inline void activate_row_tangent(const Graph& g, const Tangents& t, int64_t r, float* act,
                                 float* grad, float* tact, float* tgrad) {
  const int64_t W = 4 * g.F;
  const float *x = g.PKV + r * W, *tx = t.TPKV + r * W;
#pragma omp simd
  for (int64_t c = 0; c < W; ++c) {
    const float z = x[c] + g.BIAS[c], tz = tx[c] + t.TBIAS[c];
    const float sg = sigmoid(z);
    const float d1 = sg * (1.f + z * (1.f - sg));
    act[c] = z * sg;
    grad[c] = d1;
    tact[c] = d1 * tz;
    tgrad[c] = sg * (1.f - sg) * (2.f + z * (1.f - 2.f * sg)) * tz;
  }
}

// One active edge e = j -> i: adds to the receiver's J t rows and to the H t rows of i and j and
// of the filter row (tddk [F], tddv [3F]); writes the H t of unit_e and cut_e. The first-order
// quantities (logits, a, da, dar, ...) are those of backward_edge, each with its tangent.
template <int64_t kD>
inline void second_order_edge(const Graph& g, const Grads& y, const Tangents& t,
                              const SecondOrder& o, int64_t e, const float* ak, const float* av,
                              const float* gk, const float* gvr, const float* tak,
                              const float* tav, const float* tgk, const float* tgv, float* tddk,
                              float* tddv) {
  const int64_t F = g.F, D = kD > 0 ? kD : g.D, i = g.RC[e], j = g.S[e];
  const float m = g.M[e], w = g.C[e] * m, tw = t.TC[e] * m;
  const float *qi = g.Q + i * F, *kj = g.K + j * F, *uj = g.U + j * 3 * F, *vj = g.V + j * 3 * F;
  const float *tqi = t.TQ + i * F, *tkj = t.TK + j * F, *tuj = t.TU + j * 3 * F;
  const float *tvj = t.TV + j * 3 * F, *gxi = y.GX + i * F, *gvi = y.GV + i * 3 * F;
  float *txi = o.TX + i * F, *tvi = o.TVA + i * 3 * F;
  float *dqi = o.dQ + i * F, *dkj = o.dK + j * F, *duj = o.dU + j * 3 * F, *dvj = o.dV + j * 3 * F;
  const float u0 = g.UN[e * 3], u1 = g.UN[e * 3 + 1], u2 = g.UN[e * 3 + 2];
  const float tu0 = t.TUN[e * 3], tu1 = t.TUN[e * 3 + 1], tu2 = t.TUN[e * 3 + 2];
  float du0 = 0.f, du1 = 0.f, du2 = 0.f, dcut = 0.f;
  for (int64_t h = 0; h < g.H; ++h) {
    const int64_t oh = h * D;
    float ar = 0.f, tar = 0.f;
#pragma omp simd reduction(+ : ar, tar)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t c = oh + d;
      ar += qi[c] * kj[c] * ak[c];
      tar += tqi[c] * kj[c] * ak[c] + qi[c] * tkj[c] * ak[c] + qi[c] * kj[c] * tak[c];
    }
    const float sg = sigmoid(ar);
    const float s0 = ar * sg, s1 = sg * (1.f + ar * (1.f - sg));
    const float s2 = sg * (1.f - sg) * (2.f + ar * (1.f - 2.f * sg));
    const float a = s0 * w, ta = s1 * tar * w + s0 * tw;
    const float *uh = uj + h * 3 * D, *tuh = tuj + h * 3 * D;
    const float *avh = av + h * 3 * D, *tavh = tav + h * 3 * D;
    const float *gvh = gvr + h * 3 * D, *tgvh = tgv + h * 3 * D;
    float *tddvh = tddv + h * 3 * D, *duh = duj + h * 3 * D;
    float da = 0.f, tda = 0.f;
#pragma omp simd reduction(+ : da, tda, du0, du1, du2)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t c = oh + d;
      const float fs = avh[d], fg = avh[D + d], ft = avh[2 * D + d];
      const float tfs = tavh[d], tfg = tavh[D + d], tft = tavh[2 * D + d];
      const float us = uh[d], ug = uh[D + d], ut = uh[2 * D + d];
      const float tus = tuh[d], tug = tuh[D + d], tut = tuh[2 * D + d];
      const float gx = gxi[c], g0 = gvi[c], g1 = gvi[F + c], g2 = gvi[2 * F + c];
      const float v0 = vj[c], v1 = vj[F + c], v2 = vj[2 * F + c];
      const float tv0 = tvj[c], tv1 = tvj[F + c], tv2 = tvj[2 * F + c];
      const float sm = us * fs, tsm = tus * fs + us * tfs;
      const float gg = ug * fg, tgg = tug * fg + ug * tfg;
      const float tt = ut * ft, ttt = tut * ft + ut * tft;
      // J t: the forward's tangent.
      txi[c] += tsm * a + sm * ta;
      tvi[c] += (tv0 * gg + v0 * tgg + ttt * u0 + tt * tu0) * m;
      tvi[F + c] += (tv1 * gg + v1 * tgg + ttt * u1 + tt * tu1) * m;
      tvi[2 * F + c] += (tv2 * gg + v2 * tgg + ttt * u2 + tt * tu2) * m;
      // H t: the backward's tangent.
      da += gx * sm;
      tda += gx * tsm;
      const float dg = (g0 * v0 + g1 * v1 + g2 * v2) * m, tdg = (g0 * tv0 + g1 * tv1 + g2 * tv2) * m;
      const float dt = (g0 * u0 + g1 * u1 + g2 * u2) * m, tdt = (g0 * tu0 + g1 * tu1 + g2 * tu2) * m;
      tddvh[d] += gx * (ta * us * gvh[d] + a * tus * gvh[d] + a * us * tgvh[d]);
      tddvh[D + d] += tdg * ug * gvh[D + d] + dg * tug * gvh[D + d] + dg * ug * tgvh[D + d];
      tddvh[2 * D + d] += tdt * ut * gvh[2 * D + d] + dt * tut * gvh[2 * D + d] + dt * ut * tgvh[2 * D + d];
      du0 += g0 * ttt * m;
      du1 += g1 * ttt * m;
      du2 += g2 * ttt * m;
      duh[d] += gx * (ta * fs + a * tfs);
      duh[D + d] += tdg * fg + dg * tfg;
      duh[2 * D + d] += tdt * ft + dt * tft;
      dvj[c] += g0 * tgg * m;
      dvj[F + c] += g1 * tgg * m;
      dvj[2 * F + c] += g2 * tgg * m;
    }
    dcut += (tda * s0 + da * s1 * tar) * m;
    const float dar = da * w * s1, tdar = tda * w * s1 + da * tw * s1 + da * w * s2 * tar;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const int64_t c = oh + d;
      tddk[c] += tdar * qi[c] * kj[c] * gk[c] +
                 dar * (tqi[c] * kj[c] * gk[c] + qi[c] * tkj[c] * gk[c] + qi[c] * kj[c] * tgk[c]);
      dqi[c] += tdar * kj[c] * ak[c] + dar * (tkj[c] * ak[c] + kj[c] * tak[c]);
      dkj[c] += tdar * qi[c] * ak[c] + dar * (tqi[c] * ak[c] + qi[c] * tak[c]);
    }
  }
  o.dUN[e * 3] = du0;
  o.dUN[e * 3 + 1] = du1;
  o.dUN[e * 3 + 2] = du2;
  o.dC[e] = dcut;
}

void second_order_components(ffi::ThreadPool& pool, const Graph& g, const Grads& y,
                             const Tangents& t, const SecondOrder& o, const Components& comp) {
  const int64_t F = g.F;
  RowSums sums(g, comp, o.dPKV);
  // The head widths of the MD17 (16) and QM9 (32) models compiled as constants, any other at run time.
  const auto edge = g.D == 32 ? &second_order_edge<32>
                              : (g.D == 16 ? &second_order_edge<16> : &second_order_edge<0>);
  // Scratch per thread: a filter row's SiLU, SiLU', their tangents and the row's H t; 4F each.
  parallel_for(pool, comp.count, 1, 20 * F, [&](int64_t n0, int64_t n1, float* buf) {
    float *ak = buf, *gk = buf + 4 * F, *tak = buf + 8 * F, *tgk = buf + 12 * F;
    float* tddk = buf + 16 * F;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t u = comp.order[n];
      const int64_t lo = comp.node_start[u], hi = comp.node_start[u + 1];
      for (float* out : {o.TX, o.dQ, o.dK}) std::memset(out + lo * F, 0, (hi - lo) * F * sizeof(float));
      for (float* out : {o.TVA, o.dU, o.dV}) std::memset(out + lo * 3 * F, 0, (hi - lo) * 3 * F * sizeof(float));
      for (int32_t p = comp.edge_ptr[u]; p < comp.edge_ptr[u + 1];) {
        const int64_t row = g.FR[comp.edges[p]];
        bool active = false;
        const int32_t end = row_run_end(g, comp, u, p, &active);
        std::memset(tddk, 0, 4 * F * sizeof(float));
        if (active) activate_row_tangent(g, t, row, ak, gk, tak, tgk);
        for (int32_t q = p; q < end; ++q) {
          const int64_t e = comp.edges[q];
          if (g.M[e] == 0.f) {
            o.dUN[e * 3] = o.dUN[e * 3 + 1] = o.dUN[e * 3 + 2] = 0.f;
            o.dC[e] = 0.f;
            continue;
          }
          edge(g, y, t, o, e, ak, ak + F, gk, gk + F, tak, tak + F, tgk, tgk + F, tddk, tddk + F);
        }
        sums.add(g, u, row, end - p, tddk, o.dPKV);
        p = end;
      }
    }
  });
  sums.finish(g, comp.count, o.dPKV, o.dBIAS);
}

ffi::Error SecondOrderImpl(ffi::ThreadPool pool, B q, B k, B u, B vec, B pkv, B bias, B unit,
                           B cut, B mask, I senders, I receivers, I frow, I rowperm, I rowptr,
                           B gx, B gv, B tq, B tk, B tu, B tvec, B tpkv, B tbias, B tunit, B tcut,
                           R otx, R otv, R oq, R ok, R ou, R ovec, R opkv, R obias, R ounit,
                           R ocut, int64_t heads) {
  const Graph g(q, k, u, vec, pkv, bias, unit, cut, mask, senders, receivers, frow, rowperm,
                rowptr, heads);
  const Grads y{gx.typed_data(), gv.typed_data(), nullptr, nullptr, nullptr, nullptr,
                nullptr,         nullptr,         nullptr, nullptr};
  const Tangents t{tq.typed_data(),   tk.typed_data(),    tu.typed_data(),    tvec.typed_data(),
                   tpkv.typed_data(), tbias.typed_data(), tunit.typed_data(), tcut.typed_data()};
  const SecondOrder o{otx->typed_data(),   otv->typed_data(),   oq->typed_data(),
                      ok->typed_data(),    ou->typed_data(),    ovec->typed_data(),
                      opkv->typed_data(),  obias->typed_data(), ounit->typed_data(),
                      ocut->typed_data()};
  second_order_components(pool, g, y, t, o, find_components(g));
  return ffi::Error::Success();
}

}  // namespace

// The arguments every kernel takes first: q, k, u, vec, pkv, bias, unit, cut, mask and the
// int32 senders, receivers, frow, rowperm, rowptr.
static auto bind_graph() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>()
      .Arg<I>().Arg<I>().Arg<I>().Arg<I>().Arg<I>();
}

// Forward: -> x_agg, vec_agg.
XLA_FFI_DEFINE_HANDLER_SYMBOL(EtMessageForward, ForwardImpl,
                              bind_graph()
                                  .Ret<B>().Ret<B>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("schedule"));

// Backward: + gx, gv -> the cotangents of q, k, u, vec, pkv, bias, unit, cut.
XLA_FFI_DEFINE_HANDLER_SYMBOL(EtMessageBackward, BackwardImpl,
                              bind_graph()
                                  .Arg<B>().Arg<B>()
                                  .Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>()
                                  .Ret<B>().Ret<B>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("schedule"));

// Second order: + gx, gv and a tangent of the eight float inputs -> J t (2), H t (8).
XLA_FFI_DEFINE_HANDLER_SYMBOL(EtMessageSecondOrder, SecondOrderImpl,
                              bind_graph()
                                  .Arg<B>().Arg<B>()
                                  .Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>()
                                  .Arg<B>().Arg<B>()
                                  .Ret<B>().Ret<B>()
                                  .Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>()
                                  .Ret<B>().Ret<B>()
                                  .Attr<int64_t>("heads"));
