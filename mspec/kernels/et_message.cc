// Fused message passing of one Equivariant Transformer attention layer, forward and backward,
// for XLA:CPU (XLA FFI custom calls). Python side, semantics and the reference formulas:
// mspec/models/fused_message.py. Compiled on first use by mspec/kernels/build.py.
//
// Layouts (row-major float32): q, k [N, F]; u [N, H, 3D] (per head [s | g | t]); vec [N, 3, F];
// pk [R, F], pv [R, H, 3D]: filter rows before their SiLU (dk = SiLU(pk), dv = SiLU(pv), applied
// here so that XLA does not write them out and read them back); frow [E] int32: the filter row of
// each edge (both directions of an atom pair share one); unit [E, 3]; cut, mask [E]; senders,
// receivers [E] int32.
// rperm / rptr: the edges grouped by receiver (edge rperm[p] for p in [rptr[i], rptr[i + 1]));
// sperm / sptr: the same by sender; rowperm / rowptr: by filter row. Every output row is written
// by exactly one thread, in a fixed order (deterministic results), so no atomics: the forward
// runs over receivers; the backward's pass 1 over filter rows (keeping each edge's attention
// weight and logit cotangent, [E, H]), pass 2 over receivers (dq), pass 3 over senders.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using B = ffi::Buffer<ffi::F32>;
using I = ffi::Buffer<ffi::S32>;
using R = ffi::ResultBuffer<ffi::F32>;

static inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// The attention logit of one head: sum_d q_d k_d dk_d, with the activated filter dk = SiLU(pk).
static inline float head_logit(const float* q, const float* k, const float* dk, int64_t D) {
  float ar = 0.f;
#pragma omp simd reduction(+ : ar)
  for (int64_t d = 0; d < D; ++d) ar += q[d] * k[d] * dk[d];
  return ar;
}

// act = SiLU(x) and (unless grad is null) grad = SiLU'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
// for the n filter values: once per filter row and call, so that the edge loops (2 edges per
// atom pair, 3 passes) evaluate no exp for the filters and read one value per channel.
static void activate_rows(const float* x, float* act, float* grad, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const float s = sigmoid(x[r]);
    act[r] = x[r] * s;
    if (grad != nullptr) grad[r] = s * (1.f + x[r] * (1.f - s));
  }
}

// x_agg[i] = sum_e s_e * a_e * m_e; vec_agg[i] = sum_e (vec_j * g_e + t_e unit_e) * m_e, with
// a_e = SiLU(sum_d q_i k_j dk_e) * cut_e per head and [s | g | t] = u_j * dv_e.
static ffi::Error ForwardImpl(B q, B k, B u, B vec, B dk, B dv, B unit, B cut, B mask, I senders,
                              I frow, I rperm, I rptr, R xagg, R vagg, R actk, R actv,
                              int64_t H) {
  const int64_t N = q.dimensions()[0], F = q.dimensions()[1], D = F / H;
  const float *Q = q.typed_data(), *K = k.typed_data(), *U = u.typed_data(), *V = vec.typed_data();
  const float *DK = dk.typed_data(), *DV = dv.typed_data(), *UN = unit.typed_data();
  const float *C = cut.typed_data(), *M = mask.typed_data();
  const int32_t *S = senders.typed_data(), *RPERM = rperm.typed_data(), *RPTR = rptr.typed_data();
  const int32_t* FR = frow.typed_data();
  float *X = xagg->typed_data(), *VA = vagg->typed_data();
  const int64_t NR = dk.dimensions()[0];
  float *AK = actk->typed_data(), *AV = actv->typed_data();
  activate_rows(DK, AK, nullptr, NR * F);
  activate_rows(DV, AV, nullptr, NR * 3 * F);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < N; ++i) {
    float* xi = X + i * F;
    float* vi = VA + i * 3 * F;
    std::memset(xi, 0, F * sizeof(float));
    std::memset(vi, 0, 3 * F * sizeof(float));
    const float* qi = Q + i * F;
    for (int32_t p = RPTR[i]; p < RPTR[i + 1]; ++p) {
      const int64_t e = RPERM[p];
      const float m = M[e];
      if (m == 0.f) continue;
      const int64_t j = S[e];
      const float *kj = K + j * F, *uj = U + j * 3 * F, *vj = V + j * 3 * F;
      const float *ake = AK + FR[e] * F, *ave = AV + FR[e] * 3 * F;
      const float u0 = UN[e * 3], u1 = UN[e * 3 + 1], u2 = UN[e * 3 + 2];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t o = h * D;
        const float ar = head_logit(qi + o, kj + o, ake + o, D);
        const float a = ar * sigmoid(ar) * C[e] * m;
        const float *uh = uj + h * 3 * D, *avh = ave + h * 3 * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float s = uh[d] * avh[d], g = uh[D + d] * avh[D + d];
          const float t = uh[2 * D + d] * avh[2 * D + d];
          const int64_t c = o + d;
          xi[c] += s * a;
          vi[c] += (vj[c] * g + t * u0) * m;
          vi[F + c] += (vj[F + c] * g + t * u1) * m;
          vi[2 * F + c] += (vj[2 * F + c] * g + t * u2) * m;
        }
      }
    }
  }
  return ffi::Error::Success();
}

// Cotangents of every input but the mask and the indices, given gx = d x_agg, gv = d vec_agg.
// The filter cotangents come out per filter row ([R, F], [R, 3F]): pass 1 runs over the rows
// (rowperm / rowptr: the edges of each row), so each row has one writer and the edges sharing a
// row are summed in registers, never written out per edge. dq, which a row's edges add to
// different receivers, comes from pass 2 over receivers.
static ffi::Error BackwardImpl(B q, B k, B u, B vec, B dk, B dv, B unit, B cut, B mask, I senders,
                               I receivers, I frow, I rperm, I rptr, I rowperm, I rowptr, I sperm,
                               I sptr, B gx, B gv, R oq, R ok, R ou, R ovec, R odk, R odv,
                               R ounit, R ocut, R actk, R actv, R gradk, R gradv, R attn,
                               R dlogit, int64_t H) {
  const int64_t N = q.dimensions()[0], F = q.dimensions()[1], D = F / H;
  const int64_t NR = dk.dimensions()[0];
  const float *Q = q.typed_data(), *K = k.typed_data(), *U = u.typed_data(), *V = vec.typed_data();
  const float *DK = dk.typed_data(), *DV = dv.typed_data(), *UN = unit.typed_data();
  const float *C = cut.typed_data(), *M = mask.typed_data();
  const float *GX = gx.typed_data(), *GV = gv.typed_data();
  const int32_t *S = senders.typed_data(), *RC = receivers.typed_data(), *FR = frow.typed_data();
  const int32_t *RPERM = rperm.typed_data(), *RPTR = rptr.typed_data();
  const int32_t *ROWPERM = rowperm.typed_data(), *ROWPTR = rowptr.typed_data();
  const int32_t *SPERM = sperm.typed_data(), *SPTR = sptr.typed_data();
  float *dQ = oq->typed_data(), *dK = ok->typed_data(), *dU = ou->typed_data();
  float *dV = ovec->typed_data(), *dDK = odk->typed_data(), *dDV = odv->typed_data();
  float *dUN = ounit->typed_data(), *dC = ocut->typed_data();
  float *AK = actk->typed_data(), *AV = actv->typed_data();
  float *GK = gradk->typed_data(), *GV_ = gradv->typed_data();
  activate_rows(DK, AK, GK, NR * F);
  activate_rows(DV, AV, GV_, NR * 3 * F);
  // Per edge and head, from pass 1 for passes 2 and 3: the attention weight a and
  // d loss / d logit (only read for active edges).
  float *ATT = attn->typed_data(), *DAR = dlogit->typed_data();
  // Pass 1, over filter rows, last row first (in the pair layout the last row is the one all
  // self-loops share, by far the largest: started first, it cannot hold up the end of the loop):
  // d dk, d dv (per row), d unit, d cut, a, d logit (per edge).
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = NR - 1; row >= 0; --row) {
      float *ddk = dDK + row * F, *ddv = dDV + row * 3 * F;
      std::memset(ddk, 0, F * sizeof(float));
      std::memset(ddv, 0, 3 * F * sizeof(float));
      const float *ake = AK + row * F, *ave = AV + row * 3 * F;
      const float *gke = GK + row * F, *gve = GV_ + row * 3 * F;
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
          const int64_t o = h * D;
          const float ar = head_logit(qi + o, kj + o, ake + o, D);
          const float sg = sigmoid(ar);
          const float a = ar * sg * C[e] * m;
          const float *uh = uj + h * 3 * D, *avh = ave + h * 3 * D;
          float* ddvh = ddv + h * 3 * D;
          const float* gvh = gve + h * 3 * D;
          float da = 0.f;  // d loss / d (SiLU(ar) * cut * m)
#pragma omp simd reduction(+ : da, du0, du1, du2)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t c = o + d;
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
          for (int64_t d = 0; d < D; ++d) ddk[o + d] += dar * qi[o + d] * kj[o + d] * gke[o + d];
        }
        dun[0] = du0;
        dun[1] = du1;
        dun[2] = du2;
        dC[e] = dcut;
      }
    }
  }
  // Pass 2, over receivers: dq (per receiver, in a fixed edge order, so the result does not
  // depend on how rows were spread over threads).
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < N; ++i) {
    float* dqi = dQ + i * F;
    std::memset(dqi, 0, F * sizeof(float));
    for (int32_t p = RPTR[i]; p < RPTR[i + 1]; ++p) {
      const int64_t e = RPERM[p];
      if (M[e] == 0.f) continue;
      const float *kj = K + S[e] * F, *ake = AK + FR[e] * F;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t o = h * D;
        const float dar = DAR[e * H + h];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dqi[o + d] += dar * kj[o + d] * ake[o + d];
      }
    }
  }
  // Pass 3, over senders: dk, du, dvec (per sender).
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t j = 0; j < N; ++j) {
    float *dkj = dK + j * F, *duj = dU + j * 3 * F, *dvj = dV + j * 3 * F;
    std::memset(dkj, 0, F * sizeof(float));
    std::memset(duj, 0, 3 * F * sizeof(float));
    std::memset(dvj, 0, 3 * F * sizeof(float));
    const float *uj = U + j * 3 * F, *vj = V + j * 3 * F;
    for (int32_t p = SPTR[j]; p < SPTR[j + 1]; ++p) {
      const int64_t e = SPERM[p];
      const float m = M[e];
      if (m == 0.f) continue;
      const int64_t i = RC[e];
      const float *qi = Q + i * F, *gxi = GX + i * F, *gvi = GV + i * 3 * F;
      const float *ake = AK + FR[e] * F, *ave = AV + FR[e] * 3 * F;
      const float u0 = UN[e * 3], u1 = UN[e * 3 + 1], u2 = UN[e * 3 + 2];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t o = h * D;
        const float a = ATT[e * H + h];
        const float *uh = uj + h * 3 * D, *avh = ave + h * 3 * D;
        float* duh = duj + h * 3 * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const int64_t c = o + d;
          const float fs = avh[d], fg = avh[D + d], ft = avh[2 * D + d];
          duh[d] += gxi[c] * a * fs;
          const float g = uh[D + d] * fg;
          const float dg = (gvi[c] * vj[c] + gvi[F + c] * vj[F + c] + gvi[2 * F + c] * vj[2 * F + c]) * m;
          duh[D + d] += dg * fg;
          const float dt = (gvi[c] * u0 + gvi[F + c] * u1 + gvi[2 * F + c] * u2) * m;
          duh[2 * D + d] += dt * ft;
          dvj[c] += gvi[c] * g * m;
          dvj[F + c] += gvi[F + c] * g * m;
          dvj[2 * F + c] += gvi[2 * F + c] * g * m;
        }
        const float dar = DAR[e * H + h];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dkj[o + d] += dar * qi[o + d] * ake[o + d];
      }
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EtMessageForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>()
                                  .Arg<B>().Arg<B>().Arg<B>()
                                  .Arg<I>().Arg<I>().Arg<I>().Arg<I>()
                                  .Ret<B>().Ret<B>()
                                  .Ret<B>().Ret<B>()
                                  .Attr<int64_t>("heads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EtMessageBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>().Arg<B>()
                                  .Arg<B>().Arg<B>().Arg<B>()
                                  .Arg<I>().Arg<I>().Arg<I>().Arg<I>().Arg<I>().Arg<I>()
                                  .Arg<I>().Arg<I>().Arg<I>()
                                  .Arg<B>().Arg<B>()
                                  .Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>()
                                  .Ret<B>().Ret<B>()
                                  .Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>().Ret<B>()
                                  .Attr<int64_t>("heads"));
