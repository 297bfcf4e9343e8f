// The [N, 3, F] parts of the whitened equivariant layer norm (mspec.models.et.EquivariantLayerNorm)
// as XLA:CPU kernels, forward and backward; the 3 x 3 inverse square root between them stays in
// JAX (mspec/models/fused_eqln.py has the formulas). Per atom, with vc = v - mean_F(v):
//
//   cov:   C = vc vc^T / F                                   [N, 3, 3]
//   apply: out = w * (M vc)                                  [N, 3, F]   (M = C'^-1/2, w [F])
//
// XLA runs each of these as several passes over the [N, 3, F] features (centre, batched 3 x 3
// GEMMs, weight, and as many again backward); here each is one pass per atom, the atom's 3 x F
// block staying in cache. Every output is written by one thread in a fixed order (the weight
// cotangent: per block of atoms, then summed over the blocks in order), so results are bitwise
// repeatable whatever the threads' timing.
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;
using B = ffi::Buffer<ffi::F32>;
using R = ffi::ResultBuffer<ffi::F32>;

namespace {

using mspec_kernels::parallel_for;

// Atoms per chunk of the parallel loops; the weight cotangent is summed per chunk.
constexpr int64_t kAtomBlock = 16;

// vc = v - mean_F(v) for one atom: v, vc [3, F].
inline void centre(const float* v, float* vc, int64_t F) {
  for (int64_t i = 0; i < 3; ++i) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t f = 0; f < F; ++f) s += v[i * F + f];
    const float mean = s / static_cast<float>(F);
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) vc[i * F + f] = v[i * F + f] - mean;
  }
}

// C = vc vc^T / F.
ffi::Error CovImpl(ffi::ThreadPool pool, B vec, R cov) {
  const int64_t N = vec.dimensions()[0], F = vec.dimensions()[2];
  const float* V = vec.typed_data();
  float* C = cov->typed_data();
  parallel_for(pool, N, kAtomBlock, 3 * F, [&](int64_t n0, int64_t n1, float* vc) {
    for (int64_t n = n0; n < n1; ++n) {
      centre(V + n * 3 * F, vc, F);
      float* c = C + n * 9;
      for (int64_t i = 0; i < 3; ++i) {
        for (int64_t j = i; j < 3; ++j) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t f = 0; f < F; ++f) s += vc[i * F + f] * vc[j * F + f];
          c[i * 3 + j] = c[j * 3 + i] = s / static_cast<float>(F);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// d v = (G + G^T) vc / F for the cotangent G of C. (Its mean over F is 0, since vc's is: the
// centring's own derivative changes nothing.)
ffi::Error CovBackwardImpl(ffi::ThreadPool pool, B vec, B gcov, R gvec) {
  const int64_t N = vec.dimensions()[0], F = vec.dimensions()[2];
  const float *V = vec.typed_data(), *G = gcov.typed_data();
  float* GV = gvec->typed_data();
  parallel_for(pool, N, kAtomBlock, 3 * F, [&](int64_t n0, int64_t n1, float* vc) {
    for (int64_t n = n0; n < n1; ++n) {
      centre(V + n * 3 * F, vc, F);
      const float* g = G + n * 9;
      float s[9];
      for (int64_t i = 0; i < 3; ++i)
        for (int64_t j = 0; j < 3; ++j) s[i * 3 + j] = (g[i * 3 + j] + g[j * 3 + i]) / F;
      float* out = GV + n * 3 * F;
      for (int64_t i = 0; i < 3; ++i) {
#pragma omp simd
        for (int64_t f = 0; f < F; ++f)
          out[i * F + f] = s[i * 3] * vc[f] + s[i * 3 + 1] * vc[F + f] + s[i * 3 + 2] * vc[2 * F + f];
      }
    }
  });
  return ffi::Error::Success();
}

// out = w * (M vc).
ffi::Error ApplyImpl(ffi::ThreadPool pool, B vec, B mat, B weight, R result) {
  const int64_t N = vec.dimensions()[0], F = vec.dimensions()[2];
  const float *V = vec.typed_data(), *M = mat.typed_data(), *W = weight.typed_data();
  float* O = result->typed_data();
  parallel_for(pool, N, kAtomBlock, 3 * F, [&](int64_t n0, int64_t n1, float* vc) {
    for (int64_t n = n0; n < n1; ++n) {
      centre(V + n * 3 * F, vc, F);
      const float* m = M + n * 9;
      float* out = O + n * 3 * F;
      for (int64_t i = 0; i < 3; ++i) {
#pragma omp simd
        for (int64_t f = 0; f < F; ++f)
          out[i * F + f] =
              W[f] * (m[i * 3] * vc[f] + m[i * 3 + 1] * vc[F + f] + m[i * 3 + 2] * vc[2 * F + f]);
      }
    }
  });
  return ffi::Error::Success();
}

// Given g = d out: with u = w * g, d M = u vc^T, d vc = M^T u and d v = d vc - mean_F(d vc);
// d w = sum over atoms and components of g * (M vc).
ffi::Error ApplyBackwardImpl(ffi::ThreadPool pool, B vec, B mat, B weight, B gout, R gvec, R gmat,
                             R gweight) {
  const int64_t N = vec.dimensions()[0], F = vec.dimensions()[2];
  const float *V = vec.typed_data(), *M = mat.typed_data(), *W = weight.typed_data();
  const float* G = gout.typed_data();
  float *GV = gvec->typed_data(), *GM = gmat->typed_data(), *GW = gweight->typed_data();
  const int64_t blocks = (N + kAtomBlock - 1) / kAtomBlock;
  std::vector<float> partial(blocks * F, 0.f);  // d w per block of atoms
  // Scratch: vc and u, [3, F] each.
  parallel_for(pool, N, kAtomBlock, 6 * F, [&](int64_t n0, int64_t n1, float* buf) {
    float *vc = buf, *u = buf + 3 * F;
    // n0 is a multiple of kAtomBlock and [n0, n1) one block: the loop hands out whole chunks.
    float* gw = partial.data() + (n0 / kAtomBlock) * F;
    for (int64_t n = n0; n < n1; ++n) {
      centre(V + n * 3 * F, vc, F);
      const float *m = M + n * 9, *g = G + n * 3 * F;
      for (int64_t i = 0; i < 3; ++i) {
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) {
          const float y = m[i * 3] * vc[f] + m[i * 3 + 1] * vc[F + f] + m[i * 3 + 2] * vc[2 * F + f];
          gw[f] += g[i * F + f] * y;
          u[i * F + f] = W[f] * g[i * F + f];
        }
      }
      float* gm = GM + n * 9;
      for (int64_t i = 0; i < 3; ++i) {
        for (int64_t j = 0; j < 3; ++j) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t f = 0; f < F; ++f) s += u[i * F + f] * vc[j * F + f];
          gm[i * 3 + j] = s;
        }
      }
      float* out = GV + n * 3 * F;
      for (int64_t j = 0; j < 3; ++j) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t f = 0; f < F; ++f) {
          const float d = m[j] * u[f] + m[3 + j] * u[F + f] + m[6 + j] * u[2 * F + f];
          out[j * F + f] = d;
          s += d;
        }
        const float mean = s / static_cast<float>(F);
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) out[j * F + f] -= mean;
      }
    }
  });
  std::memset(GW, 0, F * sizeof(float));
  for (int64_t b = 0; b < blocks; ++b) {
    const float* p = partial.data() + b * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) GW[f] += p[f];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqlnCov, CovImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<B>().Ret<B>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqlnCovBackward, CovBackwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<B>().Arg<B>().Ret<B>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqlnApply, ApplyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B>().Arg<B>().Arg<B>()
                                  .Ret<B>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqlnApplyBackward, ApplyBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<B>().Arg<B>().Arg<B>().Arg<B>()
                                  .Ret<B>().Ret<B>().Ret<B>());
