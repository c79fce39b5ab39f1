#pragma once
// exp and erf in plain float arithmetic that the compiler vectorises (no libm calls, no branches), for the
// memory-bound kernels of the CPU backend: softmaxes, the cross-entropy, GELU. std::exp / std::erf are the
// reference; tests/test_backend.cpp checks these against them over the ranges the kernels use.
//   fast_exp: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial), about 2 ulp; exactly 0
//             below -87.3 (where expf underflows to a denormal) and clamped at 88.7.
//   fast_erf: Abramowitz & Stegun 7.1.26 with fast_exp, absolute error below 6e-7 (1.5e-7 before float rounding);
//             optionally also gives the exp(-x^2) it computed.
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#endif

namespace moelab::vec {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

inline float fast_exp(float x) {
  const float xc = x > 88.7f ? 88.7f : x;
  const float clamped = xc < -87.3f ? -87.3f : xc;
  // n = round(x / ln 2) via the 1.5 * 2^23 trick (round-to-nearest-even in the FPU).
  const float shifter = 12582912.f;
  const float n = (clamped * 1.44269504088896341f + shifter) - shifter;
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, ln2 split hi + lo
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);  // 2^n
  return x < -87.3f ? 0.f : e * scale;
}

// erf(x), and in exp_neg_sq the exp(-x^2) it is built from (GELU's backward needs both: the normal density at
// x sqrt(2) is that same exponential, so it is taken once).
inline float fast_erf(float x, float& exp_neg_sq) {
  const float ax = x < 0.f ? -x : x;
  const float t = 1.f / (1.f + 0.3275911f * ax);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  exp_neg_sq = fast_exp(-ax * ax);
  const float y = 1.f - poly * exp_neg_sq;
  return x < 0.f ? -y : y;
}

inline float fast_erf(float x) {
  float unused;
  return fast_erf(x, unused);
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// fast_exp on 16 lanes (same algorithm and constants; FMA contraction may differ in the last ulp).
inline __m512 fast_exp16(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 shifter = _mm512_set1_ps(12582912.f);
  const __m512 n =
      _mm512_sub_ps(_mm512_fmadd_ps(clamped, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), e, _mm512_castsi512_ps(bits));
}
#endif

}  // namespace moelab::vec
