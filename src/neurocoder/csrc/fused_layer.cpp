// The forward and backward of neurocoder.fused._FusedLayer for CPU tensors, in C++.
//
// Why: on a CPU, at the released shape, the Python Function runs ~70 small ATen operations per
// training step; their dispatch, the Python that sequences them and the temporaries they
// allocate (each (J, P, R x B) pass a fresh 0.75 MB at batch 128) cost as much as the
// arithmetic. Here the GEMMs (the composer's map and x M_U^T, the V product, their gradients)
// stay ATen calls, and everything between them is a few loops: the content attention with its
// softmax (attend), the composed apply up to the V product (compose), and their backwards, each
// parallel over PyTorch's threads. fused.py holds the same maths as operations; tests check the
// two agree in value and gradient for every option.
// Shapes as in fused.py (T = 1 here):
//   J banks (3)  P slots  k key size  B batch  R = rank  N = R x B  C composer rows  Q = J R k
//   head_t (C + P, B): rows (j, r, c) of queries, then (learned) J R sharpness rows, then P rows
//   of x M_U^T; weights (J, P, R, B); unit_queries (J, k, R, B); query_norm (J, R, B).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
constexpr double kEps = 1e-8;
constexpr double kBoundedLogits = 30.0;  // as fused._BOUNDED_LOGITS

// An out= argument from a view made in the call (the view lives until the call returns).
inline Tensor& out(Tensor&& view) { return view; }


// exp for the softmax's loops. float: Cephes' expf (range reduction to |r| <= ln 2 / 2, a
// degree-6 polynomial, 2^n by the exponent bits), ~1e-7 relative error, written without calls
// or branches so that the compiler vectorises the loops that use it (needs -fno-trapping-math
// for the clamp); double: std::exp (the double path is for tests and exact work, not speed).
inline float exp_for_softmax(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round to nearest
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double exp_for_softmax(double x) { return std::exp(x); }

template <typename T>
inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }   // as F.softplus (threshold 20)

// Content attention of every component, one (bank, component) unit at a time: normalise the
// queries (rows of head_t), scale them, take cosines with the unit keys and the softmax over
// the P slots. Writes unit_queries (J, k, R, B), query_norm (J, R, B) and weights (J, P, R, B)
// in fused.py's layouts. Within a unit the P x B block of weights stays in cache through the
// logits, exp and normalisation: one write to memory instead of four passes.
// pick(std::integral_constant<int, K>) for the key sizes compiled in (K = k), else for K = 0 (the
// generic loop): how attend and its backward choose their instantiation.
template <typename Pick>
auto with_key_size(int64_t k, Pick pick) {
  switch (k) {
    case 1: return pick(std::integral_constant<int, 1>{});
    case 2: return pick(std::integral_constant<int, 2>{});
    case 3: return pick(std::integral_constant<int, 3>{});
    case 4: return pick(std::integral_constant<int, 4>{});
    case 5: return pick(std::integral_constant<int, 5>{});
    case 6: return pick(std::integral_constant<int, 6>{});
    case 8: return pick(std::integral_constant<int, 8>{});
    case 16: return pick(std::integral_constant<int, 16>{});
    default: return pick(std::integral_constant<int, 0>{});
  }
}

// KeySize > 0 fixes the key size at compile time: the k products inside the vectorised loop over
// the batch then unroll (4-5x faster than a run-time k there, measured); 0 takes k as given.
template <typename T, int KeySize>
void attend_units(const T* head, const T* unit_keys, const T* learned_sharpness, T fixed_sharpness,
                  const T* slot_bias, int64_t J, int64_t P, int64_t R, int64_t key_dim, int64_t B,
                  T* unit_queries, T* query_norm, T* weights, int64_t begin, int64_t end) {
  const int64_t k = KeySize > 0 ? KeySize : key_dim;
  (void)J;   // the units' range covers the banks
  {
    std::vector<T> scaled(k * B), column(B), largest(B);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t j = unit / R, r = unit % R;
      const T* q = head + unit * k * B;                              // (k, B): row (j, r, c)
      T* norm = query_norm + unit * B;
      std::fill(column.begin(), column.end(), T(0));
      for (int64_t c = 0; c < k; ++c)
        for (int64_t b = 0; b < B; ++b) column[b] += q[c * B + b] * q[c * B + b];
      for (int64_t b = 0; b < B; ++b) norm[b] = std::max(std::sqrt(column[b]), T(1e-8));
      const T* scale_row = learned_sharpness ? learned_sharpness + unit * B : nullptr;
      for (int64_t c = 0; c < k; ++c) {
        T* unit_q = unit_queries + ((j * k + c) * R + r) * B;
        for (int64_t b = 0; b < B; ++b) {
          const T u = q[c * B + b] / norm[b];
          unit_q[b] = u;
          scaled[c * B + b] = u * (scale_row ? scale_row[b] : fixed_sharpness);
        }
      }
      // |logit| <= the sharpness plus the largest |slot bias|: when that is at most kBoundedLogits
      // exp needs no max subtracted (the softmax is the same; exp(30) x P stays far inside float).
      T bound = 0;
      for (int64_t b = 0; b < B; ++b) bound = std::max(bound, std::abs(scale_row ? scale_row[b] : fixed_sharpness));
      T largest_bias = 0;
      if (slot_bias)
        for (int64_t p = 0; p < P; ++p) largest_bias = std::max(largest_bias, std::abs(slot_bias[j * P + p]));
      const bool bounded = bound + largest_bias <= T(kBoundedLogits);
      // Logits column by column (the k products inside the vectorised loop over the batch), then
      // when bounded exp and the column sums in the same pass; otherwise the max first.
      T* __restrict__ sums = column.data();
      T* __restrict__ top = largest.data();
      const T* __restrict__ sq = scaled.data();
      if (!bounded) std::fill(largest.begin(), largest.end(), -std::numeric_limits<T>::infinity());
      std::fill(column.begin(), column.end(), T(0));
      for (int64_t p = 0; p < P; ++p) {
        T* __restrict__ w = weights + ((j * P + p) * R + r) * B;
        const T* __restrict__ key = unit_keys + (j * P + p) * k;
        const T offset = slot_bias ? slot_bias[j * P + p] : T(0);
        if (bounded) {
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) {
            T logit = offset;
            for (int64_t c = 0; c < k; ++c) logit += key[c] * sq[c * B + b];
            const T e = exp_for_softmax(logit);
            w[b] = e;
            sums[b] += e;
          }
        } else {
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) {
            T logit = offset;
            for (int64_t c = 0; c < k; ++c) logit += key[c] * sq[c * B + b];
            w[b] = logit;
            top[b] = std::max(top[b], logit);
          }
        }
      }
      if (!bounded) {
        for (int64_t p = 0; p < P; ++p) {
          T* __restrict__ w = weights + ((j * P + p) * R + r) * B;
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) { w[b] = exp_for_softmax(w[b] - top[b]); sums[b] += w[b]; }
        }
      }
      for (int64_t b = 0; b < B; ++b) column[b] = T(1) / column[b];
      for (int64_t p = 0; p < P; ++p) {
        T* __restrict__ w = weights + ((j * P + p) * R + r) * B;
        const T* __restrict__ inverse = column.data();
        for (int64_t b = 0; b < B; ++b) w[b] *= inverse[b];
      }
    }
  }
}

template <typename T>
void attend(const T* head, const T* unit_keys, const T* learned_sharpness, T fixed_sharpness,
            const T* slot_bias, int64_t J, int64_t P, int64_t R, int64_t k, int64_t B,
            T* unit_queries, T* query_norm, T* weights) {
  const auto units = with_key_size(k, [](auto size) { return attend_units<T, decltype(size)::value>; });
  at::parallel_for(0, J * R, 1, [=](int64_t begin, int64_t end) {
    units(head, unit_keys, learned_sharpness, fixed_sharpness, slot_bias, J, P, R, k, B, unit_queries,
          query_norm, weights, begin, end);
  });
}

// out[b] = sum_i a(i)[b] * c(i)[b] for b < n: a(i), c(i) give the i-th pair of rows. The
// contractions of compose and its backward (over slots or over components) are all this.
template <typename T, typename RowsA, typename RowsC>
inline void sum_of_products(T* __restrict__ out, int64_t n, int64_t count, RowsA a, RowsC c) {
  std::fill(out, out + n, T(0));
  for (int64_t i = 0; i < count; ++i) {
    const T* __restrict__ row_a = a(i);
    const T* __restrict__ row_c = c(i);
#pragma omp simd
    for (int64_t b = 0; b < n; ++b) out[b] += row_a[b] * row_c[b];
  }
}

// The composed low-rank apply up to the last product, column by column (each sample apart):
// raw_sigma = S . read_s, sigma = reverse cumulative sum of softplus(raw_sigma) (descending),
// projected = read_u . (x M_U^T), per_component = projected * sigma, mixed = read_v . per_component.
// weights (J, P, R, B); memory_by_slot (P, B); outputs (R, B) and mixed (P, B).
template <typename T>
void compose_columns(const T* weights, const T* memory_by_slot, const T* s_values, int64_t P, int64_t R, int64_t B,
                     T* raw_sigma, T* sigma, T* projected, T* per_component, T* mixed, int64_t b0, int64_t b1) {
  const T *read_u = weights, *read_v = weights + P * R * B, *read_s = weights + 2 * P * R * B;
  {
    const int64_t n = b1 - b0;
    for (int64_t r = 0; r < R; ++r) {
      T* raw = raw_sigma + r * B + b0;
      T* proj = projected + r * B + b0;
      std::fill(raw, raw + n, T(0));
      std::fill(proj, proj + n, T(0));
      for (int64_t p = 0; p < P; ++p) {
        const T* ws = read_s + (p * R + r) * B + b0;
        const T* wu = read_u + (p * R + r) * B + b0;
        const T* m = memory_by_slot + p * B + b0;
        const T s = s_values[p];
        for (int64_t b = 0; b < n; ++b) { raw[b] += s * ws[b]; proj[b] += wu[b] * m[b]; }
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      T running = 0;
      for (int64_t r = R - 1; r >= 0; --r) {
        running += softplus(raw_sigma[r * B + b]);
        sigma[r * B + b] = running;
        per_component[r * B + b] = projected[r * B + b] * running;
      }
    }
    for (int64_t p = 0; p < P; ++p)
      sum_of_products(mixed + p * B + b0, n, R, [=](int64_t r) { return read_v + (p * R + r) * B + b0; },
                      [=](int64_t r) { return per_component + r * B + b0; });
  }
}

template <typename T>
void compose(const T* weights, const T* memory_by_slot, const T* s_values, int64_t P, int64_t R, int64_t B,
             T* raw_sigma, T* sigma, T* projected, T* per_component, T* mixed) {
  at::parallel_for(0, B, 32, [=](int64_t b0, int64_t b1) {
    compose_columns(weights, memory_by_slot, s_values, P, R, B, raw_sigma, sigma, projected, per_component, mixed,
                    b0, b1);
  });
}

// usage (J, P): each slot's largest weight over a composition's R components, batch-averaged.
template <typename T>
void usage_rows(const T* weights, int64_t R, int64_t B, T* usage, int64_t begin, int64_t end) {
  {
    std::vector<T> largest(B);
    for (int64_t row = begin; row < end; ++row) {
      const T* w = weights + row * R * B;
      std::copy(w, w + B, largest.begin());
      for (int64_t r = 1; r < R; ++r)
        for (int64_t b = 0; b < B; ++b) largest[b] = std::max(largest[b], w[r * B + b]);
      T total = 0;
      for (int64_t b = 0; b < B; ++b) total += largest[b];
      usage[row] = total / T(B);
    }
  }
}

template <typename T>
void usage_of(const T* weights, int64_t J, int64_t P, int64_t R, int64_t B, T* usage) {
  at::parallel_for(0, J * P, 8, [=](int64_t begin, int64_t end) { usage_rows(weights, R, B, usage, begin, end); });
}

// The backward of compose for columns [b0, b1): from d loss / d mixed (P, B) (and of sigma,
// (R, B), when sigma is an output in use) to d loss / d projected times sigma (grad_projected),
// d loss / d raw_sigma (grad_raw) and d loss / d (x M_U^T) (grad_through_memory, (P, B): the
// U rows of the head's gradient).
template <typename T>
void compose_backward_columns(const T* weights, const T* sigma, const T* projected, const T* raw_sigma,
                              const T* grad_mixed, const T* grad_sigma, int64_t P, int64_t R, int64_t B,
                              T* grad_projected, T* grad_raw, T* grad_through_memory, int64_t b0, int64_t b1) {
  const T *read_u = weights, *read_v = weights + P * R * B;
  const int64_t n = b1 - b0;
  for (int64_t r = 0; r < R; ++r)                     // d loss / d per_component, kept in grad_projected
    sum_of_products(grad_projected + r * B + b0, n, P, [=](int64_t p) { return read_v + (p * R + r) * B + b0; },
                    [=](int64_t p) { return grad_mixed + p * B + b0; });
  for (int64_t b = b0; b < b1; ++b) {
    // sigma_r = sum_{r' >= r} softplus(raw_r'): d / d softplus(raw_r') = sum_{r <= r'} d / d sigma_r.
    T running = 0;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t at = r * B + b;
      const T grad_per_component = grad_projected[at];
      running += grad_per_component * projected[at] + (grad_sigma ? grad_sigma[at] : T(0));
      grad_raw[at] = running / (T(1) + std::exp(-raw_sigma[at]));          // times sigmoid(raw)
      grad_projected[at] = grad_per_component * sigma[at];
    }
  }
  for (int64_t p = 0; p < P; ++p)
    sum_of_products(grad_through_memory + p * B + b0, n, R,
                    [=](int64_t r) { return read_u + (p * R + r) * B + b0; },
                    [=](int64_t r) { return grad_projected + r * B + b0; });
}

// The backward of attend, one (bank, component) unit at a time: d loss / d read weights (from
// compose's gradients), the softmax's backward, then the gradients of the scaled queries (into
// the head's gradient, through the normalisation and, when learned, the sharpness) and, per
// unit, partial sums over the batch for the keys (J R, P, k), the slot bias (J R, P) and the S
// programs (R, P; bank 2 only), which the caller sums over components.
template <typename T, int KeySize>
void attend_backward_units(const T* weights, const T* unit_queries, const T* query_norm, const T* unit_keys,
                           const T* learned_sharpness, T fixed_sharpness, const T* memory_by_slot,
                           const T* grad_projected, const T* grad_mixed, const T* per_component, const T* s_values,
                           const T* grad_raw, int64_t J, int64_t P, int64_t R, int64_t key_dim, int64_t B,
                           T* grad_head, T* grad_sharpness, bool through_softplus, T* key_partials,
                           T* bias_partials, T* s_partials, const T* grad_read, int64_t begin, int64_t end) {
  const int64_t k = KeySize > 0 ? KeySize : key_dim;
  (void)J;
  std::vector<T> dot_buffer(B), grad_logit_buffer(B), grad_scaled_buffer(k * B), scale_buffer(B);
  T* __restrict__ dot = dot_buffer.data();
  T* __restrict__ grad_logit = grad_logit_buffer.data();
  T* __restrict__ grad_scaled = grad_scaled_buffer.data();
  T* __restrict__ scale = scale_buffer.data();
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t j = unit / R, r = unit % R;
    // d loss / d read weight (p, b) = first[p, b] * second[b]: bank U: (x M_U^T)[p] * d projected;
    // V: d mixed[p] * per_component; S: s[p] * d raw_sigma.
    const T* second = (j == 0 ? grad_projected : j == 1 ? per_component : grad_raw) + r * B;
    auto first_row = [&](int64_t p) { return (j == 0 ? memory_by_slot : grad_mixed) + p * B; };
    std::fill(dot, dot + B, T(0));
    for (int64_t p = 0; p < P; ++p) {
      const T* __restrict__ w = weights + ((j * P + p) * R + r) * B;
      if (grad_read) {
        // Least-used reading: d loss / d attention, already through the mixing.
        const T* __restrict__ g = grad_read + ((j * P + p) * R + r) * B;
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) dot[b] += w[b] * g[b];
      } else if (j == 2) {
        const T s = s_values[p];
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) dot[b] += w[b] * s * second[b];
      } else {
        const T* __restrict__ f = first_row(p);
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) dot[b] += w[b] * f[b] * second[b];
      }
    }
    const T* sharp = learned_sharpness ? learned_sharpness + unit * B : nullptr;
    for (int64_t b = 0; b < B; ++b) scale[b] = sharp ? sharp[b] : fixed_sharpness;
    std::fill(grad_scaled, grad_scaled + k * B, T(0));
    for (int64_t p = 0; p < P; ++p) {
      const T* __restrict__ w = weights + ((j * P + p) * R + r) * B;
      if (grad_read) {
        const T* __restrict__ g = grad_read + ((j * P + p) * R + r) * B;
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) grad_logit[b] = w[b] * (g[b] - dot[b]);
      } else if (j == 2) {
        const T s = s_values[p];
        T s_sum = 0;
#pragma omp simd reduction(+ : s_sum)
        for (int64_t b = 0; b < B; ++b) {
          grad_logit[b] = w[b] * (s * second[b] - dot[b]);
          s_sum += w[b] * second[b];
        }
        if (s_partials) s_partials[r * P + p] = s_sum;
      } else {
        const T* __restrict__ f = first_row(p);
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) grad_logit[b] = w[b] * (f[b] * second[b] - dot[b]);
      }
      if (bias_partials) {
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t b = 0; b < B; ++b) total += grad_logit[b];
        bias_partials[unit * P + p] = total;
      }
      const T* key = unit_keys + (j * P + p) * k;
      for (int64_t c = 0; c < k; ++c) {
        const T* __restrict__ uq = unit_queries + ((j * k + c) * R + r) * B;
        T* __restrict__ gs = grad_scaled + c * B;
        const T key_c = key[c];
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t b = 0; b < B; ++b) {
          total += grad_logit[b] * uq[b] * scale[b];
          gs[b] += key_c * grad_logit[b];
        }
        key_partials[(unit * P + p) * k + c] = total;
      }
    }
    // Through q_hat * scale and q_hat = q / |q|: d q = scale (g - q_hat (g . q_hat)) / |q|, with
    // g = d loss / d scaled query; g . q_hat is also d loss / d scale.
    const T* norm = query_norm + unit * B;
#pragma omp simd
    for (int64_t b = 0; b < B; ++b) {
      T along = 0;
      for (int64_t c = 0; c < k; ++c) along += grad_scaled[c * B + b] * unit_queries[((j * k + c) * R + r) * B + b];
      for (int64_t c = 0; c < k; ++c) {
        const T uq = unit_queries[((j * k + c) * R + r) * B + b];
        grad_head[((j * R + r) * k + c) * B + b] = scale[b] * (grad_scaled[c * B + b] - uq * along) / norm[b];
      }
      // through_softplus: the gradient of the raw row (d softplus = sigmoid = -expm1(-softplus));
      // otherwise of the sharpness itself.
      if (sharp) grad_sharpness[(j * R + r) * B + b] = through_softplus ? -along * std::expm1(-sharp[b]) : along;
    }
  }
}

// The m slots of smallest usage (ties to the lower index) into chosen[0..m).
template <typename T>
void least_used_slots(const T* usage, int64_t P, int64_t m, std::vector<int64_t>& order) {
  order.resize(P);
  for (int64_t p = 0; p < P; ++p) order[p] = p;
  auto before = [usage](int64_t a, int64_t b) { return usage[a] < usage[b] || (usage[a] == usage[b] && a < b); };
  if (m < P) std::nth_element(order.begin(), order.begin() + m, order.end(), before);
}

template <typename T>
void attend_backward(const T* weights, const T* unit_queries, const T* query_norm, const T* unit_keys,
                     const T* learned_sharpness, T fixed_sharpness, const T* memory_by_slot, const T* grad_projected,
                     const T* grad_mixed, const T* per_component, const T* s_values, const T* grad_raw, int64_t J,
                     int64_t P, int64_t R, int64_t k, int64_t B, T* grad_head, T* grad_sharpness,
                     bool through_softplus, T* key_partials, T* bias_partials, T* s_partials,
                     const T* grad_read = nullptr) {
  const auto units =
      with_key_size(k, [](auto size) { return attend_backward_units<T, decltype(size)::value>; });
  at::parallel_for(0, J * R, 1, [=](int64_t begin, int64_t end) {
    units(weights, unit_queries, query_norm, unit_keys, learned_sharpness, fixed_sharpness, memory_by_slot,
          grad_projected, grad_mixed, per_component, s_values, grad_raw, J, P, R, k, B, grad_head, grad_sharpness,
          through_softplus, key_partials, bias_partials, s_partials, grad_read, begin, end);
  });
}

// Least-used mixing (neurocoder.reading.read_with_least_used): for each (bank, sample) the R
// components in order, w_n = (1 - g_n) a_n + g_n l_n, with l_n the least-used weight of the usage
// before n (the m slots of smallest usage, ties to the lower index, as a stable sort takes them;
// weight proportional to max(1 - usage, eps)), then usage = max(usage, w_n). One routine serves
// both layouts, given as strides (MixLayout): the fused read's weights (J, P, R, B) with gates
// (J R, B), and least_used_read_forward's (J, B, R, P) with gates (J, B, R). Writes the final
// weights, and the usage before each component and each least-used weight (the weights' layout)
// for the backward; optionally the usage after the last component, (J, B, P). Samples go in
// chunks of kMixChunk: on the fused layout every pass reads contiguous runs of samples, and the
// choice of slots runs for a whole chunk at once.
constexpr int64_t kMixChunk = 128;

// Element (j, b, r, p) of the weights sits at j bank + b sample + r component + p slot; gate
// (j, b, r) at j gate_bank + b gate_sample + r gate_component.
struct MixLayout {
  int64_t bank, sample, component, slot, gate_bank, gate_sample, gate_component;
};
// The fused read's: weights (J, P, R, B), gates (J R, B).
inline MixLayout read_layout(int64_t P, int64_t R, int64_t B) { return {P * R * B, 1, B, R * B, R * B, 1, B}; }
// neurocoder.reading's: attention (J, B, R, P), gates (J, B, R).
inline MixLayout reading_layout(int64_t P, int64_t R, int64_t B) { return {B * R * P, R * P, P, 1, B * R, R, 1}; }
// Up to this m the slots are chosen for every sample of a chunk at once (see least_used_mix).
constexpr int64_t kSmallM = 16;

// The m smallest of usage[p * stride] over p (ties to the lower index) into order[0..m), for m
// above kSmallM (least_used_mix chooses smaller m for a whole chunk at once).
template <typename T>
void least_used_slots_strided(const T* usage, int64_t stride, int64_t P, int64_t m, std::vector<int64_t>& order,
                              std::vector<T>& values) {
  values.resize(P);
  for (int64_t p = 0; p < P; ++p) values[p] = usage[p * stride];
  least_used_slots(values.data(), P, m, order);
}

template <typename T>
void least_used_mix(const T* attention, const T* gates, int64_t J, int64_t P, int64_t R, int64_t B, int64_t m,
                    MixLayout layout, T* final_weights, T* usage_before, T* least, T* usage_after = nullptr) {
  const int64_t sb = layout.sample, gb = layout.gate_sample;
  const int64_t chunks = (B + kMixChunk - 1) / kMixChunk;
  at::parallel_for(0, J * chunks, 1, [=](int64_t begin, int64_t end) {
    std::vector<T> u(P * kMixChunk), l(P * kMixChunk), values;
    std::vector<T> kept_value(kSmallM * kMixChunk), kept_slot(kSmallM * kMixChunk), carry_value(kMixChunk),
        carry_slot(kMixChunk);
    std::vector<int64_t> order;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task / chunks, b0 = (task % chunks) * kMixChunk, n = std::min(kMixChunk, B - b0);
      std::fill(u.begin(), u.end(), T(0));
      for (int64_t r = 0; r < R; ++r) {
        std::fill(l.begin(), l.end(), T(0));
        if (m <= kSmallM) {
          // The m smallest usages of every sample at once: a branchless insertion, p by p, into
          // m sorted (value, slot) pairs per sample, vectorised over the samples. A strict < keeps
          // an equal usage behind the lower slot already in, as the stable sort orders them.
          std::fill(kept_value.begin(), kept_value.end(), std::numeric_limits<T>::infinity());
          std::fill(kept_slot.begin(), kept_slot.end(), T(0));
          T* __restrict__ cv = carry_value.data();
          T* __restrict__ cs = carry_slot.data();
          for (int64_t p = 0; p < P; ++p) {
            const T* __restrict__ up = u.data() + p * kMixChunk;
            for (int64_t bb = 0; bb < kMixChunk; ++bb) { cv[bb] = up[bb]; cs[bb] = T(p); }
            for (int64_t i = 0; i < m; ++i) {
              T* __restrict__ kv = kept_value.data() + i * kMixChunk;
              T* __restrict__ ks = kept_slot.data() + i * kMixChunk;
              // Over the whole chunk (a fixed trip count the compiler vectorises); lanes past n
              // are never read.
              // Written as min / max and exact blends of slots (small integers in T), not as
              // conditional assignments: GCC turns those into masked stores, microcoded and ~10x
              // slower on AMD EPYC (measured here).
              // Ordered by (usage, slot): a slot pushed down by a smaller usage must still pass an
              // equal usage of a higher slot further down.
              for (int64_t bb = 0; bb < kMixChunk; ++bb) {
                const T v = kv[bb], sl = ks[bb], c = cv[bb], cslot = cs[bb];
                const T smaller = (c < v || (c == v && cslot < sl)) ? T(1) : T(0);
                kv[bb] = std::min(v, c);     // equal values: either order holds the same value
                cv[bb] = std::max(v, c);
                ks[bb] = sl + (cslot - sl) * smaller;
                cs[bb] = cslot + (sl - cslot) * smaller;
              }
            }
          }
          for (int64_t bb = 0; bb < n; ++bb) {
            T total = 0;
            for (int64_t i = 0; i < m; ++i) {
              const int64_t p = static_cast<int64_t>(kept_slot[i * kMixChunk + bb]);
              const T raw = std::max(T(1) - u[p * kMixChunk + bb], T(kEps));
              l[p * kMixChunk + bb] = raw;
              total += raw;
            }
            for (int64_t i = 0; i < m; ++i) l[static_cast<int64_t>(kept_slot[i * kMixChunk + bb]) * kMixChunk + bb] /= total;
          }
        } else {
          for (int64_t bb = 0; bb < n; ++bb) {
            least_used_slots_strided(u.data() + bb, kMixChunk, P, m, order, values);
            T total = 0;
            for (int64_t i = 0; i < m; ++i) {
              const int64_t p = order[i];
              const T raw = std::max(T(1) - u[p * kMixChunk + bb], T(kEps));
              l[p * kMixChunk + bb] = raw;
              total += raw;
            }
            for (int64_t i = 0; i < m; ++i) l[order[i] * kMixChunk + bb] /= total;
          }
        }
        const T* __restrict__ g = gates + j * layout.gate_bank + r * layout.gate_component + b0 * gb;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t at = j * layout.bank + r * layout.component + p * layout.slot + b0 * sb;
          T* __restrict__ up = u.data() + p * kMixChunk;
          const T* __restrict__ lp = l.data() + p * kMixChunk;
          const T* __restrict__ a = attention + at;
          T* __restrict__ before = usage_before + at;
          T* __restrict__ lw = least + at;
          T* __restrict__ fw = final_weights + at;
          for (int64_t bb = 0; bb < n; ++bb) {
            before[bb * sb] = up[bb];
            lw[bb * sb] = lp[bb];
            const T value = (T(1) - g[bb * gb]) * a[bb * sb] + g[bb * gb] * lp[bb];
            fw[bb * sb] = value;
            up[bb] = std::max(up[bb], value);
          }
        }
      }
      if (usage_after)
        for (int64_t bb = 0; bb < n; ++bb)
          for (int64_t p = 0; p < P; ++p) usage_after[(j * B + b0 + bb) * P + p] = u[p * kMixChunk + bb];
    }
  });
}

// The backward of least_used_mix: from d loss / d final weights (the weights' layout) and,
// optionally, d loss / d usage after the last component ((J, B, P)) to d loss / d attention
// (written over grad_final) and d loss / d gates (the gates' layout). Reverse order over the
// components, carrying d loss / d usage, with autograd's rules for the Python loop:
// torch.maximum splits a tie's gradient in half; clamp_min passes it where 1 - usage >= eps; the
// chosen slots (a sort) pass none.
template <typename T>
void least_used_mix_backward(const T* attention, const T* gates, const T* final_weights, const T* usage_before,
                             const T* least, int64_t J, int64_t P, int64_t R, int64_t B, MixLayout layout,
                             T* grad_final, T* grad_gates, const T* grad_usage_after = nullptr) {
  const int64_t chunks = (B + kMixChunk - 1) / kMixChunk;
  const int64_t sb = layout.sample, gb = layout.gate_sample;
  at::parallel_for(0, J * chunks, 1, [=](int64_t begin, int64_t end) {
    std::vector<T> grad_u(P * kMixChunk), grad_prev(P * kMixChunk), grad_w(P * kMixChunk);
    T grad_gate[kMixChunk], weighted[kMixChunk], total[kMixChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task / chunks, b0 = (task % chunks) * kMixChunk, n = std::min(kMixChunk, B - b0);
      std::fill(grad_u.begin(), grad_u.end(), T(0));
      if (grad_usage_after)
        for (int64_t bb = 0; bb < n; ++bb)
          for (int64_t p = 0; p < P; ++p) grad_u[p * kMixChunk + bb] = grad_usage_after[(j * B + b0 + bb) * P + p];
      for (int64_t r = R - 1; r >= 0; --r) {
        const int64_t gate_at = j * layout.gate_bank + r * layout.gate_component + b0 * gb;
        const T* g = gates + gate_at;
        std::fill(grad_gate, grad_gate + kMixChunk, T(0));
        std::fill(weighted, weighted + kMixChunk, T(0));
        std::fill(total, total + kMixChunk, T(0));
        for (int64_t p = 0; p < P; ++p) {
          const int64_t at = j * layout.bank + r * layout.component + p * layout.slot + b0 * sb;
          T* gu = grad_u.data() + p * kMixChunk;
          T* gp = grad_prev.data() + p * kMixChunk;
          T* gw = grad_w.data() + p * kMixChunk;
          for (int64_t bb = 0; bb < n; ++bb) {
            const int64_t e = at + bb * sb;
            // usage after = maximum(usage before, w): a tie splits the gradient in half.
            const T carried = gu[bb], before = usage_before[e], w = final_weights[e];
            if (before > w) { gp[bb] = carried; gw[bb] = 0; }
            else if (before < w) { gp[bb] = 0; gw[bb] = carried; }
            else { gp[bb] = carried / 2; gw[bb] = carried / 2; }
            gw[bb] += grad_final[e];
            const T l = least[e], gate = g[bb * gb];
            grad_gate[bb] += gw[bb] * (l - attention[e]);
            grad_final[e] = (T(1) - gate) * gw[bb];
            if (l != 0) {
              total[bb] += std::max(T(1) - before, T(kEps));
              weighted[bb] += gate * gw[bb] * l;
            }
          }
        }
        for (int64_t bb = 0; bb < n; ++bb) grad_gates[gate_at + bb * gb] = grad_gate[bb];
        // l = raw / sum(raw), raw = max(1 - usage before, eps) on the chosen slots.
        for (int64_t p = 0; p < P; ++p) {
          const int64_t at = j * layout.bank + r * layout.component + p * layout.slot + b0 * sb;
          T* gp = grad_prev.data() + p * kMixChunk;
          const T* gw = grad_w.data() + p * kMixChunk;
          for (int64_t bb = 0; bb < n; ++bb) {
            const int64_t e = at + bb * sb;
            if (least[e] != 0 && T(1) - usage_before[e] >= T(kEps))
              gp[bb] -= (g[bb * gb] * gw[bb] - weighted[bb]) / total[bb];
          }
        }
        std::swap(grad_u, grad_prev);
      }
    }
  });
}

// Buffers kept between calls and handed out again once nothing else holds them (neither the
// tensor nor any view of its storage: autograd's saved tensors, a gradient a parameter kept).
// Why: glibc serves each allocation above its mmap threshold with fresh pages, and touching
// them costs page faults and zeroing; at the released shape, batch 128, that made the weight
// gradient's product (200 x 1,024) take ~1.5 ms against ~0.6 ms into memory already mapped.
// Per thread, a few sizes per buffer, each at most kReuseBytes (larger ones are allocated afresh).
enum Buffer { kHead, kWeights, kUnitQueries, kOutput, kGradHead, kGradJoined, kGradInput, kMixFinal, kMixBefore,
              kMixLeast, kGradRead, kBufferCount };
constexpr int kReusePerBuffer = 4;
constexpr int64_t kReuseBytes = 16 << 20;

Tensor reusable(Buffer buffer, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::vector<Tensor> kept[kBufferCount];
  auto& entries = kept[buffer];
  for (auto& t : entries)
    if (t.use_count() == 1 && t.storage().use_count() == 1 && t.sizes() == sizes &&
        t.scalar_type() == c10::typeMetaToScalarType(options.dtype()) && t.device() == options.device())
      return t;
  Tensor fresh = at::empty(sizes, options);
  if (fresh.nbytes() <= kReuseBytes && fresh.device().is_cpu()) {
    if (static_cast<int>(entries.size()) == kReusePerBuffer) entries.erase(entries.begin());
    entries.push_back(fresh);
  }
  return fresh;
}


// Least-used reading inside the read: the gates (J R, B), m, and the buffers the mixing writes,
// (J, P, R, B) each: the final weights, the usage before each component, each least-used weight.
struct LeastUsed {
  Tensor gates, final_weights, usage_before, least;
  int64_t m;
};

// The checks every read op makes of its queries (J R k, B) and its sharpness (J R, B when
// learned, else the fixed value), naming the op.
void check_queries_and_sharpness(const char* op, const Tensor& queries, const std::optional<Tensor>& sharpness,
                                 std::optional<double> fixed_sharpness, int64_t J, int64_t R, int64_t k, int64_t B) {
  TORCH_CHECK(queries.dim() == 2 && queries.size(0) == J * R * k, op, ": queries of shape ", queries.sizes(),
              ", expected (", J * R * k, ", B)");
  TORCH_CHECK(sharpness.has_value() != fixed_sharpness.has_value(),
              op, ": give a learned sharpness tensor or a fixed value, not both or neither");
  TORCH_CHECK(!sharpness.has_value() || (sharpness->size(0) == J * R && sharpness->size(1) == B),
              op, ": sharpness of shape ", sharpness.has_value() ? sharpness->sizes() : at::IntArrayRef{},
              ", expected (", J * R, ", ", B, ")");
}

// What attend writes and its backward reads: the unit keys and their norms, the unit queries,
// their norms and the read weights, allocated for R components of B samples.
struct AttentionBuffers {
  Tensor key_norm, unit_keys, unit_queries, query_norm, weights;
};

AttentionBuffers attention_buffers(const Tensor& keys, int64_t R, int64_t B, const at::TensorOptions& options) {
  const int64_t J = keys.size(0), P = keys.size(1), k = keys.size(2);
  Tensor key_norm = at::linalg_vector_norm(keys, 2, {2}, true).clamp_min_(kEps);       // (J, P, 1)
  return {key_norm, (keys / key_norm).contiguous(), at::empty({J, k, R * B}, options),
          at::empty({J, 1, R, B}, options), at::empty({J, P, R * B}, options)};
}

// The keys' gradient through their normalisation and the slot bias's, from the per-(bank,
// component) partial sums attend_backward writes: (J R, P, k) and (J R, P).
std::pair<Tensor, Tensor> key_and_bias_gradients(const Tensor& key_partials, const Tensor& bias_partials,
                                                 const Tensor& unit_keys, const Tensor& key_norm, int64_t R,
                                                 bool has_slot_bias) {
  const int64_t J = unit_keys.size(0), P = unit_keys.size(1), k = unit_keys.size(2);
  Tensor grad_unit_keys = key_partials.view({J, R, P, k}).sum(1);                        // (J, P, k)
  Tensor grad_keys = (grad_unit_keys - unit_keys * (grad_unit_keys * unit_keys).sum(2, true)) / key_norm;
  Tensor grad_slot_bias = has_slot_bias ? bias_partials.view({J, R, P}).sum(1)
                                        : at::empty({0}, unit_keys.options());
  return {grad_keys, grad_slot_bias};
}

// attend on tensors: query_rows J R k rows of B; sharpness (J R, B) when learned, else undefined
// and fixed_sharpness; slot_bias (J, P) or undefined. Writes unit_queries, query_norm, weights.
template <typename T>
void attend_tensors(const void* query_rows, const Tensor& unit_keys, const Tensor& sharpness,
                    std::optional<double> fixed_sharpness, const Tensor& slot_bias, int64_t R, int64_t B,
                    const Tensor& unit_queries, const Tensor& query_norm, const Tensor& weights) {
  attend<T>(static_cast<const T*>(query_rows), unit_keys.data_ptr<T>(),
            sharpness.defined() ? sharpness.data_ptr<T>() : nullptr,
            static_cast<T>(sharpness.defined() ? 0.0 : *fixed_sharpness),
            slot_bias.defined() ? slot_bias.data_ptr<T>() : nullptr, unit_keys.size(0), unit_keys.size(1), R,
            unit_keys.size(2), B, unit_queries.data_ptr<T>(), query_norm.data_ptr<T>(), weights.data_ptr<T>());
}

void read_forward(const void* query_rows, const Tensor& unit_keys, const Tensor& sharpness,
                  std::optional<double> fixed_sharpness, const Tensor& slot_bias, const void* memory_by_slot,
                  const Tensor& s_values, int64_t R, int64_t B, const Tensor& unit_queries, const Tensor& query_norm,
                  const Tensor& weights, const Tensor& raw_sigma, const Tensor& sigma, const Tensor& projected,
                  const Tensor& per_component, const Tensor& mixed, const Tensor& usage,
                  const LeastUsed* least_used = nullptr) {
  const int64_t J = unit_keys.size(0), P = unit_keys.size(1);
  Tensor s_contiguous = s_values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(unit_keys.scalar_type(), "read_forward", [&] {
    attend_tensors<scalar_t>(query_rows, unit_keys, sharpness, fixed_sharpness, slot_bias, R, B, unit_queries,
                             query_norm, weights);
    const scalar_t* composed = weights.data_ptr<scalar_t>();
    if (least_used) {
      least_used_mix<scalar_t>(weights.data_ptr<scalar_t>(), least_used->gates.data_ptr<scalar_t>(), J, P, R, B,
                               least_used->m, read_layout(P, R, B), least_used->final_weights.data_ptr<scalar_t>(),
                               least_used->usage_before.data_ptr<scalar_t>(), least_used->least.data_ptr<scalar_t>());
      composed = least_used->final_weights.data_ptr<scalar_t>();
    }
    compose<scalar_t>(composed, static_cast<const scalar_t*>(memory_by_slot),
                      s_contiguous.data_ptr<scalar_t>(), P, R, B, raw_sigma.data_ptr<scalar_t>(),
                      sigma.data_ptr<scalar_t>(), projected.data_ptr<scalar_t>(), per_component.data_ptr<scalar_t>(),
                      mixed.data_ptr<scalar_t>());
    if (usage.defined()) usage_of<scalar_t>(composed, J, P, R, B, usage.data_ptr<scalar_t>());
  });
}

// The read's backward from d loss / d mixed (P, B) and d loss / d sigma ((R, B), or undefined),
// shared by the whole-layer op and the read alone; only where the gradients go differs. Writes
// d loss / d (x M_U^T) into grad_by_slot (P rows of B), the queries' gradient into grad_queries
// (J R k rows of B) and, when the sharpness is learned, its gradient into grad_sharpness (J R
// rows of B): through the softplus (the raw rows) or not. Returns the gradients of the raw keys
// (J, P, k), the slot bias ((J, P), or empty) and the S programs (P,).
std::tuple<Tensor, Tensor, Tensor> read_backward(
    const Tensor& weights, const Tensor& unit_queries, const Tensor& query_norm, const Tensor& unit_keys,
    const Tensor& key_norm, const Tensor& sharpness, std::optional<double> fixed_sharpness,
    const Tensor& memory_by_slot, const Tensor& raw_sigma, const Tensor& sigma, const Tensor& projected,
    const Tensor& per_component, const Tensor& s_values, const Tensor& grad_mixed, const Tensor& grad_sigma_rb,
    bool has_slot_bias, void* grad_by_slot, void* grad_queries, void* grad_sharpness, bool through_softplus,
    const LeastUsed* least_used = nullptr, const Tensor& grad_gates = Tensor()) {
  const int64_t J = unit_queries.size(0), k = unit_queries.size(1), P = unit_keys.size(1);
  const int64_t R = sigma.size(0), B = sigma.size(1);
  const auto options = unit_queries.options();
  Tensor grad_projected = at::empty({R, B}, options), grad_raw = at::empty({R, B}, options);
  Tensor key_partials = at::empty({J * R, P, k}, options);
  Tensor bias_partials = has_slot_bias ? at::empty({J * R, P}, options) : Tensor();
  Tensor s_partials = at::empty({R, P}, options);
  Tensor s_contiguous = s_values.contiguous();
  // With least-used reading the compose step read the final weights; the attention's softmax
  // takes the gradient that reaches the attention through the mixing.
  const Tensor& composed = least_used ? least_used->final_weights : weights;
  Tensor grad_read = least_used ? reusable(kGradRead, {J, P, R * B}, options) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(unit_queries.scalar_type(), "read_backward", [&] {
    auto* by_slot_out = static_cast<scalar_t*>(grad_by_slot);
    at::parallel_for(0, B, 32, [&](int64_t b0, int64_t b1) {
      compose_backward_columns<scalar_t>(
          composed.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(), projected.data_ptr<scalar_t>(),
          raw_sigma.data_ptr<scalar_t>(), grad_mixed.data_ptr<scalar_t>(),
          grad_sigma_rb.defined() ? grad_sigma_rb.data_ptr<scalar_t>() : nullptr, P, R, B,
          grad_projected.data_ptr<scalar_t>(), grad_raw.data_ptr<scalar_t>(), by_slot_out, b0, b1);
    });
    scalar_t* grad_read_ptr = nullptr;
    if (least_used) {
      // d loss / d final weight (p, b) = first[p, b] * second[b], as attend_backward_units has it;
      // the S programs' gradient from the final S weights.
      grad_read_ptr = grad_read.data_ptr<scalar_t>();
      const scalar_t* final_w = composed.data_ptr<scalar_t>();
      const scalar_t* by_slot = memory_by_slot.data_ptr<scalar_t>();
      const scalar_t* gm = grad_mixed.data_ptr<scalar_t>();
      const scalar_t* gp = grad_projected.data_ptr<scalar_t>();
      const scalar_t* pc = per_component.data_ptr<scalar_t>();
      const scalar_t* gr = grad_raw.data_ptr<scalar_t>();
      const scalar_t* sv = s_contiguous.data_ptr<scalar_t>();
      scalar_t* sp = s_partials.data_ptr<scalar_t>();
      at::parallel_for(0, J * P, 1, [=](int64_t begin, int64_t end) {
        for (int64_t jp = begin; jp < end; ++jp) {
          const int64_t j = jp / P, p = jp % P;
          for (int64_t r = 0; r < R; ++r) {
            scalar_t* g = grad_read_ptr + (jp * R + r) * B;
            if (j == 0) for (int64_t b = 0; b < B; ++b) g[b] = by_slot[p * B + b] * gp[r * B + b];
            else if (j == 1) for (int64_t b = 0; b < B; ++b) g[b] = gm[p * B + b] * pc[r * B + b];
            else {
              scalar_t total = 0;
              const scalar_t* w = final_w + (jp * R + r) * B;
              for (int64_t b = 0; b < B; ++b) {
                g[b] = sv[p] * gr[r * B + b];
                total += w[b] * gr[r * B + b];
              }
              sp[r * P + p] = total;
            }
          }
        }
      });
      least_used_mix_backward<scalar_t>(weights.data_ptr<scalar_t>(), least_used->gates.data_ptr<scalar_t>(),
                                        composed.data_ptr<scalar_t>(), least_used->usage_before.data_ptr<scalar_t>(),
                                        least_used->least.data_ptr<scalar_t>(), J, P, R, B, read_layout(P, R, B),
                                        grad_read_ptr, grad_gates.data_ptr<scalar_t>());
    }
    attend_backward<scalar_t>(
        weights.data_ptr<scalar_t>(), unit_queries.data_ptr<scalar_t>(), query_norm.data_ptr<scalar_t>(),
        unit_keys.data_ptr<scalar_t>(), sharpness.defined() ? sharpness.data_ptr<scalar_t>() : nullptr,
        static_cast<scalar_t>(sharpness.defined() ? 0.0 : *fixed_sharpness), memory_by_slot.data_ptr<scalar_t>(),
        grad_projected.data_ptr<scalar_t>(), grad_mixed.data_ptr<scalar_t>(), per_component.data_ptr<scalar_t>(),
        s_contiguous.data_ptr<scalar_t>(), grad_raw.data_ptr<scalar_t>(), J, P, R, k, B,
        static_cast<scalar_t*>(grad_queries), static_cast<scalar_t*>(grad_sharpness), through_softplus,
        key_partials.data_ptr<scalar_t>(), has_slot_bias ? bias_partials.data_ptr<scalar_t>() : nullptr,
        least_used ? nullptr : s_partials.data_ptr<scalar_t>(), grad_read_ptr);
  });
  const auto [grad_keys, grad_slot_bias] = key_and_bias_gradients(key_partials, bias_partials, unit_keys, key_norm,
                                                                  R, has_slot_bias);
  return {grad_keys, grad_slot_bias, s_partials.sum(0)};
}


// The layer's keys (J, P, k) from its parameters, as ProgramMemory.keys(): content keys map each
// U and V program through (key_a, key_b) and (key_c, key_d); learned keys are key_a and key_b.
Tensor layer_keys(const Tensor& u_values, const Tensor& v_values, const Tensor& s_keys, const Tensor& key_a,
                  const Tensor& key_b, const std::optional<Tensor>& key_c, const std::optional<Tensor>& key_d) {
  Tensor keys = at::empty({3, s_keys.size(0), s_keys.size(1)}, s_keys.options());
  if (key_c.has_value()) {
    at::addmm_out(out(keys[0]), key_b, u_values, key_a.t());
    at::addmm_out(out(keys[1]), *key_d, v_values, key_c->t());
  } else {
    keys[0].copy_(key_a);
    keys[1].copy_(key_b);
  }
  keys[2].copy_(s_keys);
  return keys;
}

// Returns {y (B, d_out), sigma (B, R), usage (J, P)} then the tensors the backward needs:
// unit_queries, query_norm, unit_keys, key_norm, weights, memory_by_slot, raw_sigma, sigma_rb,
// projected, per_component, mixed, sharpness (empty when fixed).
std::vector<Tensor> fused_layer_forward(
    const Tensor& x, const Tensor& head_weight, const Tensor& head_bias, const Tensor& u_values,
    const Tensor& v_values, const Tensor& s_values, const Tensor& s_keys, const Tensor& key_a,
    const Tensor& key_b, const std::optional<Tensor>& key_c, const std::optional<Tensor>& key_d,
    const std::optional<Tensor>& slot_bias, int64_t rank, int64_t key_dim,
    std::optional<double> fixed_sharpness, bool want_usage) {
  const int64_t B = x.size(0), C = head_weight.size(0), P = u_values.size(0), J = 3, k = key_dim;
  const int64_t R = rank, N = R * B, Q = J * R * k;
  // The composer's rows then x M_U^T, transposed ((C + P, B)): each product fills contiguous rows.
  Tensor head_t = reusable(kHead, {C + P, B}, x.options());
  at::addmm_out(out(head_t.narrow(0, 0, C)), head_bias.unsqueeze(1), head_weight, x.t());
  at::mm_out(out(head_t.narrow(0, C, P)), u_values, x.t());
  Tensor keys = layer_keys(u_values, v_values, s_keys, key_a, key_b, key_c, key_d);
  const bool learned = !fixed_sharpness.has_value();
  TORCH_CHECK(C == Q + (learned ? J * R : 0), "fused_layer_forward: the composer has ", C, " rows, expected ",
              Q + (learned ? J * R : 0), " (queries", learned ? " and sharpness" : "", " only)");
  Tensor sharpness;  // (J, 1, R, B) when learned
  if (learned) sharpness = at::softplus(head_t.narrow(0, Q, J * R)).contiguous().view({J, 1, R, B});

  Tensor key_norm = at::linalg_vector_norm(keys, 2, {2}, true).clamp_min_(kEps);      // (J, P, 1)
  Tensor unit_keys = keys / key_norm;                                                   // (J, P, k)
  Tensor unit_queries = reusable(kUnitQueries, {J, k, N}, x.options());
  Tensor query_norm = at::empty({J, 1, R, B}, x.options());
  Tensor weights = reusable(kWeights, {J, P, N}, x.options());
  Tensor raw_sigma = at::empty({R, B}, x.options()), sigma = at::empty({R, B}, x.options());
  Tensor projected = at::empty({R, B}, x.options()), per_component = at::empty({R, B}, x.options());
  Tensor mixed = at::empty({P, B}, x.options());
  Tensor usage = at::zeros({J, P}, x.options());
  Tensor memory_by_slot = head_t.narrow(0, C, P);                                       // (P, B)
  Tensor bias = slot_bias.has_value() ? slot_bias->contiguous() : Tensor();
  read_forward(head_t.data_ptr(), unit_keys, learned ? sharpness : Tensor(), fixed_sharpness, bias,
               memory_by_slot.data_ptr(), s_values, R, B, unit_queries, query_norm, weights, raw_sigma, sigma, projected,
               per_component, mixed, want_usage ? usage : Tensor());
  Tensor y = reusable(kOutput, {B, v_values.size(1)}, x.options());
  at::mm_out(y, mixed.t(), v_values);                                               // (B, d_out)
  return {y, sigma.t(), usage, unit_queries, query_norm, unit_keys, key_norm, weights, memory_by_slot,
          raw_sigma, sigma, projected, per_component, mixed, learned ? sharpness : at::empty({0}, x.options())};
}

// Gradients, in _FusedLayer.forward's argument order: x, head_weight, head_bias, u_values,
// v_values, s_values, s_keys, key_a, key_b, key_c, key_d, slot_bias. An entry whose input needs
// no gradient (or does not exist) is an empty tensor; the Python side turns it into None.
std::vector<Tensor> fused_layer_backward(
    const std::optional<Tensor>& grad_y_in, const std::optional<Tensor>& grad_sigma, const Tensor& x,
    const Tensor& head_weight, const Tensor& u_values, const Tensor& v_values, const Tensor& s_values,
    const Tensor& key_a, const std::optional<Tensor>& key_c,
    at::TensorList saved, int64_t rank, std::optional<double> fixed_sharpness, bool has_slot_bias,
    int64_t needs_mask) {
  // Bit i of needs_mask: whether input i (the order below) needs a gradient.
  auto needs = [needs_mask](int i) { return ((needs_mask >> i) & 1) != 0; };
  const Tensor &unit_queries = saved[0], &query_norm = saved[1], &unit_keys = saved[2], &key_norm = saved[3],
               &weights = saved[4], &memory_by_slot = saved[5], &raw_sigma = saved[6], &sigma = saved[7],
               &projected = saved[8], &per_component = saved[9], &mixed = saved[10], &sharpness = saved[11];
  const int64_t J = unit_queries.size(0), k = unit_queries.size(1), N = unit_queries.size(2);
  const int64_t P = unit_keys.size(1), R = rank, B = N / R, C = head_weight.size(0);
  const bool learned = !fixed_sharpness.has_value();
  Tensor grad_y = grad_y_in.has_value() ? *grad_y_in : at::zeros({B, v_values.size(1)}, x.options());
  Tensor grad_v_values = at::mm(mixed, grad_y);                                          // (P, d_out)
  Tensor grad_mixed = at::mm(v_values, grad_y.t()).contiguous();                         // (P, B)
  Tensor grad_sigma_rb = grad_sigma.has_value() ? grad_sigma->t().contiguous() : Tensor();   // (R, B)
  // The head's gradient, (C + P, B) as head_t: query rows, (learned) sharpness rows, U rows; the
  // kernels write every row.
  Tensor grad_head = reusable(kGradHead, {C + P, B}, x.options());
  const int64_t element = grad_head.element_size();
  auto* head_rows = static_cast<char*>(grad_head.data_ptr());
  auto [grad_keys, grad_slot_bias, grad_s_values] = read_backward(
      weights, unit_queries, query_norm, unit_keys, key_norm, learned ? sharpness : Tensor(), fixed_sharpness,
      memory_by_slot, raw_sigma, sigma, projected, per_component, s_values, grad_mixed, grad_sigma_rb,
      has_slot_bias, head_rows + C * B * element, head_rows, head_rows + J * R * k * B * element,
      /*through_softplus=*/true);

  Tensor none = at::empty({0}, x.options());   // no gradient (the Python side passes None)
  Tensor grad_x = none;
  if (needs(0)) {
    grad_x = reusable(kGradInput, {B, x.size(1)}, x.options());
    at::mm_out(grad_x, grad_head.narrow(0, 0, C).t(), head_weight).addmm_(grad_head.narrow(0, C, P).t(), u_values);
  }
  Tensor grad_head_weight = none, grad_u = none;
  if (needs(1) || needs(3)) {
    Tensor grad_joined = reusable(kGradJoined, {C + P, x.size(1)}, x.options());
    at::mm_out(grad_joined, grad_head, x);                                          // (C + P, d_in)
    grad_head_weight = grad_joined.narrow(0, 0, C);
    grad_u = grad_joined.narrow(0, C, P);
  }
  Tensor grad_head_bias = needs(2) ? grad_head.narrow(0, 0, C).sum(1) : none;
  Tensor grad_a = none, grad_b = none, grad_c = none, grad_d = none;
  if (key_c.has_value()) {
    Tensor grad_u_keys = grad_keys[0], grad_v_keys = grad_keys[1];                        // (P, k)
    if (needs(3)) grad_u.addmm_(grad_u_keys, key_a);
    if (needs(4)) grad_v_values.addmm_(grad_v_keys, *key_c);
    if (needs(7)) grad_a = at::mm(grad_u_keys.t(), u_values);
    if (needs(8)) grad_b = grad_u_keys.sum(0);
    if (needs(9)) grad_c = at::mm(grad_v_keys.t(), v_values);
    if (needs(10)) grad_d = grad_v_keys.sum(0);
  } else {
    grad_a = grad_keys[0];
    grad_b = grad_keys[1];
  }
  return {grad_x, needs(1) ? grad_head_weight : none, grad_head_bias, needs(3) ? grad_u : none,
          needs(4) ? grad_v_values : none, needs(5) ? grad_s_values : none, needs(6) ? grad_keys[2] : none,
          needs(7) ? grad_a : none, needs(8) ? grad_b : none, grad_c, grad_d, grad_slot_bias};
}

// The forward of a no-grad, eval-mode call: an agent's rollout makes thousands of them on small
// batches, where the fixed cost of each operation dominates. The training forward's maths from
// constants the caller keeps between calls (neurocoder.reuse_programs): the composer's rows
// joined with the U programs, (C + P, d_in) and (C + P,), and the unit keys (J, P, k). Nothing is
// saved for a backward and no usage is counted. Returns y (B, d_out), the output bias included.
Tensor fused_layer_inference(const Tensor& x, const Tensor& joined_weight, const Tensor& joined_bias,
                             const Tensor& unit_keys, const Tensor& s_values, const Tensor& v_values,
                             const std::optional<Tensor>& output_bias, const std::optional<Tensor>& slot_bias,
                             int64_t rank, int64_t key_dim, std::optional<double> fixed_sharpness) {
  const int64_t B = x.size(0), P = v_values.size(0), J = 3, k = key_dim, R = rank, N = R * B;
  const int64_t C = joined_weight.size(0) - P, Q = J * R * k;
  const bool learned = !fixed_sharpness.has_value();
  TORCH_CHECK(C == Q + (learned ? J * R : 0), "fused_layer_inference: the composer has ", C, " rows, expected ",
              Q + (learned ? J * R : 0), " (queries", learned ? " and sharpness" : "", " only)");
  TORCH_CHECK(unit_keys.dim() == 3 && unit_keys.size(0) == J && unit_keys.size(1) == P && unit_keys.size(2) == k,
              "fused_layer_inference: unit keys of shape ", unit_keys.sizes(), ", expected (3, ", P, ", ", k, ")");
  Tensor head_t = at::empty({C + P, B}, x.options());
  at::addmm_out(head_t, joined_bias.unsqueeze(1), joined_weight, x.t());
  Tensor sharpness;
  if (learned) sharpness = at::softplus(head_t.narrow(0, Q, J * R)).contiguous();
  Tensor unit_queries = at::empty({J, k, N}, x.options()), query_norm = at::empty({J, R, B}, x.options());
  Tensor weights = at::empty({J, P, N}, x.options());
  Tensor mixed = at::empty({P, B}, x.options());
  Tensor bias = slot_bias.has_value() ? slot_bias->contiguous() : Tensor();
  Tensor raw_sigma = at::empty({R, B}, x.options()), sigma = at::empty({R, B}, x.options());
  Tensor projected = at::empty({R, B}, x.options()), per_component = at::empty({R, B}, x.options());
  read_forward(head_t.data_ptr(), unit_keys.contiguous(), sharpness, fixed_sharpness, bias,
               head_t.narrow(0, C, P).data_ptr(), s_values, R, B, unit_queries, query_norm, weights, raw_sigma,
               sigma, projected, per_component, mixed, Tensor());
  if (output_bias.has_value()) return at::addmm(*output_bias, mixed.t(), v_values);
  return at::mm(mixed.t(), v_values);
}

// The read alone (neurocoder.fused._FusedReadApply's maths) for the cases the whole-layer ops do
// not cover: the recurrent composer's T steps, a composer reading a separate context, frozen
// slots, a working program's gate. The caller lays the inputs out: queries (J R k, B), the rows
// of unit (j, n) for components n = t x rank + r of the T steps; sharpness (J R, B), positive,
// when learned (else fixed_sharpness); memory_by_slot (P, B) = (x M_U^T)^T; keys (J, P, k).
// Returns y (B, d_out), sigma (B, R), usage (J, P), then what fused_read_backward needs:
// unit_queries, query_norm, unit_keys, key_norm, weights, raw_sigma, sigma (R, B), projected,
// per_component, mixed.
std::vector<Tensor> fused_read_forward(const Tensor& queries, const std::optional<Tensor>& sharpness,
                                       std::optional<double> fixed_sharpness, const Tensor& memory_by_slot,
                                       const Tensor& keys, const std::optional<Tensor>& slot_bias,
                                       const Tensor& s_values, const Tensor& v_values, int64_t components,
                                       bool want_usage, const std::optional<Tensor>& gates, int64_t least_used) {
  const int64_t J = 3, P = keys.size(1), k = keys.size(2), R = components, B = queries.size(1), N = R * B;
  TORCH_CHECK(!gates.has_value() || (gates->size(0) == J * R && gates->size(1) == B && least_used >= 1 &&
                                     least_used <= P),
              "fused_read_forward: least-used gates of shape ", gates.has_value() ? gates->sizes() : at::IntArrayRef{},
              " (expected (", J * R, ", ", B, ")) with least_used ", least_used, " (expected 1 to ", P, ")");
  check_queries_and_sharpness("fused_read_forward", queries, sharpness, fixed_sharpness, J, R, k, B);
  TORCH_CHECK(memory_by_slot.size(0) == P && memory_by_slot.size(1) == B, "fused_read_forward: memory_by_slot of shape ",
              memory_by_slot.sizes(), ", expected (", P, ", ", B, ")");
  const auto options = queries.options();
  Tensor q = queries.contiguous(), by_slot = memory_by_slot.contiguous();
  Tensor scale = sharpness.has_value() ? sharpness->contiguous() : Tensor();
  // Named references, not a structured binding: the lambdas below capture them (C++17 allows that).
  const AttentionBuffers attention = attention_buffers(keys, R, B, options);
  const Tensor &key_norm = attention.key_norm, &unit_keys = attention.unit_keys;
  const Tensor &unit_queries = attention.unit_queries, &query_norm = attention.query_norm;
  const Tensor& weights = attention.weights;
  Tensor raw_sigma = at::empty({R, B}, options), sigma = at::empty({R, B}, options);
  Tensor projected = at::empty({R, B}, options), per_component = at::empty({R, B}, options);
  Tensor mixed = at::empty({P, B}, options), usage = at::zeros({J, P}, options);
  Tensor bias = slot_bias.has_value() ? slot_bias->contiguous() : Tensor();
  std::optional<LeastUsed> mixing;
  if (gates.has_value())
    mixing = LeastUsed{gates->contiguous(), reusable(kMixFinal, {J, P, N}, options),
                       reusable(kMixBefore, {J, P, N}, options), reusable(kMixLeast, {J, P, N}, options), least_used};
  read_forward(q.data_ptr(), unit_keys, scale, fixed_sharpness, bias, by_slot.data_ptr(), s_values, R, B,
               unit_queries, query_norm, weights, raw_sigma, sigma, projected, per_component, mixed,
               want_usage ? usage : Tensor(), mixing ? &*mixing : nullptr);
  Tensor y = at::mm(mixed.t(), v_values);                                              // (B, d_out)
  std::vector<Tensor> out = {y, sigma.t().contiguous(), usage, unit_queries, query_norm, unit_keys, key_norm, weights,
                             raw_sigma, sigma, projected, per_component, mixed};
  if (mixing) {   // the least-used mixing's state, for the backward
    out.push_back(mixing->gates);
    out.push_back(mixing->final_weights);
    out.push_back(mixing->usage_before);
    out.push_back(mixing->least);
  }
  return out;
}

// fused_read_forward's backward. Returns the gradients of queries (J R k, B), the sharpness
// (J R, B; empty when fixed), memory_by_slot (P, B), the keys (J, P, k), the slot bias (J, P;
// empty without it), s_values (P,) and v_values (P, d_out).
std::vector<Tensor> fused_read_backward(const std::optional<Tensor>& grad_y_in, const std::optional<Tensor>& grad_sigma,
                                        at::TensorList saved, const std::optional<Tensor>& sharpness,
                                        std::optional<double> fixed_sharpness, const Tensor& memory_by_slot,
                                        const Tensor& s_values, const Tensor& v_values, bool has_slot_bias,
                                        int64_t least_used) {
  const Tensor &unit_queries = saved[0], &query_norm = saved[1], &unit_keys = saved[2], &key_norm = saved[3],
               &weights = saved[4], &raw_sigma = saved[5], &sigma = saved[6], &projected = saved[7],
               &per_component = saved[8], &mixed = saved[9];
  std::optional<LeastUsed> mixing;
  if (least_used > 0) {
    TORCH_CHECK(saved.size() == 14, "fused_read_backward: least-used reading needs the mixing's saved state");
    mixing = LeastUsed{saved[10], saved[11], saved[12], saved[13], least_used};
  }
  const int64_t J = unit_queries.size(0), k = unit_queries.size(1), P = unit_keys.size(1);
  const int64_t R = sigma.size(0), B = sigma.size(1);
  const auto options = unit_queries.options();
  Tensor grad_y = grad_y_in.has_value() ? *grad_y_in : at::zeros({B, v_values.size(1)}, options);
  Tensor grad_v_values = at::mm(mixed, grad_y);                                          // (P, d_out)
  Tensor grad_mixed = at::mm(v_values, grad_y.t()).contiguous();                         // (P, B)
  Tensor grad_sigma_rb = grad_sigma.has_value() ? grad_sigma->t().contiguous() : Tensor();   // (R, B)
  Tensor by_slot = memory_by_slot.contiguous(), scale = sharpness.has_value() ? sharpness->contiguous() : Tensor();
  Tensor grad_queries = at::empty({J * R * k, B}, options);
  Tensor grad_sharpness = scale.defined() ? at::empty({J * R, B}, options) : at::empty({0}, options);
  Tensor grad_by_slot = at::empty({P, B}, options);
  Tensor grad_gates = mixing ? at::empty({J * R, B}, options) : at::empty({0}, options);
  auto [grad_keys, grad_slot_bias, grad_s_values] = read_backward(
      weights, unit_queries, query_norm, unit_keys, key_norm, scale, fixed_sharpness, by_slot, raw_sigma, sigma,
      projected, per_component, s_values, grad_mixed, grad_sigma_rb, has_slot_bias, grad_by_slot.data_ptr(),
      grad_queries.data_ptr(), scale.defined() ? grad_sharpness.data_ptr() : nullptr, /*through_softplus=*/false,
      mixing ? &*mixing : nullptr, grad_gates);
  return {grad_queries, grad_sharpness, grad_by_slot, grad_keys, grad_slot_bias, grad_s_values, grad_v_values,
          grad_gates};
}


// ------------------------------------------------------------------ least-used reading
// neurocoder.reading.read_with_least_used for CPU tensors (the composable path: traces,
// fused=False): attention (J, B, R, P) and gates (J, B, R) -> weights (J, B, R, P) and usage
// (J, B, P), through least_used_mix on reading_layout. The Python loop issues ~10 operations per
// component forward and ~20 backward. Saved for the backward: the usage before each component and
// each least-used weight, (J, B, R, P) each.
std::vector<Tensor> least_used_read_forward(const Tensor& attention_in, const Tensor& gates_in, int64_t m) {
  const Tensor attention = attention_in.contiguous(), gates = gates_in.contiguous();
  TORCH_CHECK(attention.dim() == 4 && gates.dim() == 3 && gates.size(0) == attention.size(0) &&
              gates.size(1) == attention.size(1) && gates.size(2) == attention.size(2),
              "least_used_read_forward: attention (J, B, R, P) and gates (J, B, R) expected, got ",
              attention.sizes(), " and ", gates.sizes());
  const int64_t J = attention.size(0), B = attention.size(1), R = attention.size(2), P = attention.size(3);
  TORCH_CHECK(m >= 1 && m <= P, "least_used_read_forward: least_used must be in [1, ", P, "], got ", m);
  Tensor weights = at::empty_like(attention), usage_before = at::empty_like(attention);
  Tensor least = at::empty_like(attention), usage = at::empty({J, B, P}, attention.options());
  AT_DISPATCH_FLOATING_TYPES(attention.scalar_type(), "least_used_read_forward", [&] {
    least_used_mix<scalar_t>(attention.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), J, P, R, B, m,
                             reading_layout(P, R, B), weights.data_ptr<scalar_t>(), usage_before.data_ptr<scalar_t>(),
                             least.data_ptr<scalar_t>(), usage.data_ptr<scalar_t>());
  });
  return {weights, usage, usage_before, least};
}

// Gradients of attention and gates from those of weights and usage (either may be undefined).
std::vector<Tensor> least_used_read_backward(const std::optional<Tensor>& grad_weights_in,
                                             const std::optional<Tensor>& grad_usage_in, const Tensor& attention_in,
                                             const Tensor& gates_in, const Tensor& weights, const Tensor& usage_before,
                                             const Tensor& least) {
  const Tensor attention = attention_in.contiguous(), gates = gates_in.contiguous();
  const int64_t J = attention.size(0), B = attention.size(1), R = attention.size(2), P = attention.size(3);
  // The attention's gradient is written over a copy of the weights' (zeros without one).
  Tensor grad_attention = grad_weights_in.has_value() ? grad_weights_in->contiguous().clone()
                                                      : at::zeros_like(attention);
  Tensor grad_usage = grad_usage_in.has_value() ? grad_usage_in->contiguous() : Tensor();
  Tensor grad_gates = at::empty_like(gates);
  AT_DISPATCH_FLOATING_TYPES(attention.scalar_type(), "least_used_read_backward", [&] {
    least_used_mix_backward<scalar_t>(attention.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                      weights.data_ptr<scalar_t>(), usage_before.data_ptr<scalar_t>(),
                                      least.data_ptr<scalar_t>(), J, P, R, B, reading_layout(P, R, B),
                                      grad_attention.data_ptr<scalar_t>(), grad_gates.data_ptr<scalar_t>(),
                                      grad_usage.defined() ? grad_usage.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_attention, grad_gates};
}


// ------------------------------------------------------------------ the convolutional layer
// NeurocoderConv2d's read (neurocoder.fused._NativeConvRead). The layer convolves its input with
// the P program filters: responses (B, P, H' W'); each sample's output is its responses mixed
// by its composed (O, P) matrix,
//   mixing[b] = sum_r (M_V^T read_v_r) (sigma_r read_u_r)^T,   y[b] = mixing[b] responses[b] (+ bias).
// This op makes the mixing matrices from the composer's queries; the layer applies them (one
// batched product). The attention is the fused read's (attend, and its backward fed every read
// weight's gradient, as least-used reading feeds it); the singular values and their scaling are
// loops over contiguous samples; the small per-sample products are one batched BLAS call each.
// Layouts: weights (J, P, R, B) as the fused read's; scaled (P, R, B) = sigma read_u, and
// sample-major read_v_out (B, R, O) = (read_v^T M_V), scaled_by_sample (B, R, P), mixing (B, O, P).

// Singular values from the S bank's read weights, columns [b0, b1): raw_sigma = S . read_s,
// sigma = reverse cumulative sum of softplus(raw_sigma) (descending). (R, B) each.
template <typename T>
void singular_values_columns(const T* read_s, const T* s_values, int64_t P, int64_t R, int64_t B, T* raw_sigma,
                             T* sigma, int64_t b0, int64_t b1) {
  const int64_t n = b1 - b0;
  for (int64_t r = 0; r < R; ++r) {
    T* __restrict__ raw = raw_sigma + r * B + b0;
    std::fill(raw, raw + n, T(0));
    for (int64_t p = 0; p < P; ++p) {
      const T* __restrict__ ws = read_s + (p * R + r) * B + b0;
      const T s = s_values[p];
#pragma omp simd
      for (int64_t b = 0; b < n; ++b) raw[b] += s * ws[b];
    }
  }
  for (int64_t b = b0; b < b1; ++b) {
    T running = 0;
    for (int64_t r = R - 1; r >= 0; --r) {
      running += softplus(raw_sigma[r * B + b]);
      sigma[r * B + b] = running;
    }
  }
}

// scaled[p, r, b] = sigma[r, b] read_u[p, r, b] for columns [b0, b1). (P, R, B).
template <typename T>
void scale_by_sigma_columns(const T* read_u, const T* sigma, int64_t P, int64_t R, int64_t B, T* scaled, int64_t b0,
                            int64_t b1) {
  const int64_t n = b1 - b0;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t r = 0; r < R; ++r) {
      const T* __restrict__ w = read_u + (p * R + r) * B + b0;
      const T* __restrict__ s = sigma + r * B + b0;
      T* __restrict__ row = scaled + (p * R + r) * B + b0;
#pragma omp simd
      for (int64_t b = 0; b < n; ++b) row[b] = s[b] * w[b];
    }
}

// The backward of scale_by_sigma_columns: from d scaled (P, R, B), d read_u into grad_read_u
// (P, R, B) and d sigma added to grad_sigma (R, B).
template <typename T>
void scale_by_sigma_backward_columns(const T* read_u, const T* sigma, const T* grad_scaled, int64_t P, int64_t R,
                                     int64_t B, T* grad_read_u, T* grad_sigma, int64_t b0, int64_t b1) {
  const int64_t n = b1 - b0;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = (p * R + r) * B + b0;
      const T* __restrict__ w = read_u + row;
      const T* __restrict__ g = grad_scaled + row;
      const T* __restrict__ s = sigma + r * B + b0;
      T* __restrict__ gw = grad_read_u + row;
      T* __restrict__ gs = grad_sigma + r * B + b0;
#pragma omp simd
      for (int64_t b = 0; b < n; ++b) {
        gw[b] = g[b] * s[b];
        gs[b] += g[b] * w[b];
      }
    }
}

// The backward through the singular values, columns [b0, b1): sigma_r = sum_{r' >= r}
// softplus(raw_r'), so d / d softplus(raw_r') = sum_{r <= r'} d / d sigma_r. (R, B) each.
template <typename T>
void singular_values_backward_columns(const T* raw_sigma, const T* grad_sigma, int64_t R, int64_t B, T* grad_raw,
                                      int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T running = 0;
    for (int64_t r = 0; r < R; ++r) {
      running += grad_sigma[r * B + b];
      grad_raw[r * B + b] = running / (T(1) + std::exp(-raw_sigma[r * B + b]));     // times sigmoid(raw)
    }
  }
}

// The S bank's part of the backward, slots [p0, p1): raw_sigma = S . read_s, so d read_s[p, n] =
// s_p d raw_sigma[n] and d s_p = sum_n read_s[p, n] d raw_sigma[n]. read_s, grad_read_s (P, N).
template <typename T>
void s_bank_backward_rows(const T* read_s, const T* s_values, const T* grad_raw, int64_t N, T* grad_read_s,
                          T* grad_s_values, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* __restrict__ ws = read_s + p * N;
    T* __restrict__ g = grad_read_s + p * N;
    const T s = s_values[p];
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t n = 0; n < N; ++n) {
      g[n] = s * grad_raw[n];
      total += ws[n] * grad_raw[n];
    }
    grad_s_values[p] = total;
  }
}

// Returns mixing (B, O, P), sigma (B, R), usage (J, P), then what conv_read_backward needs:
// unit_queries, query_norm, unit_keys, key_norm, weights, raw_sigma, sigma (R, B), read_v_out,
// scaled_by_sample. queries, sharpness, keys and slot_bias as fused_read_forward's; v_values
// (P, O). usage_weights (B,), optional: each column's weight in the usage average (how many
// samples share its context), else 1.
// expand: int64 indices, contiguous, each in [0, B): which read each sample takes.
void check_expand(const char* op, const Tensor& expand, int64_t B) {
  TORCH_CHECK(expand.scalar_type() == at::kLong && expand.dim() == 1 && expand.is_contiguous() && expand.is_cpu(),
              op, ": expand must be a contiguous 1-D int64 CPU tensor, got ", expand.scalar_type(), " of shape ",
              expand.sizes());
  const int64_t* index = expand.data_ptr<int64_t>();
  for (int64_t i = 0; i < expand.numel(); ++i)
    TORCH_CHECK(index[i] >= 0 && index[i] < B, op, ": expand holds index ", index[i], ", outside [0, ", B, ")");
}

// The read from given unit keys up to the mixing, shared by conv_read_forward and
// conv_read_inference: attend (writing unit_queries, query_norm and weights), the singular
// values, each read's U weights scaled by them, then the two products with the programs.
// query_rows: J R k rows of B (the composer's rows, transposed); scale (J R, B) when learned.
struct ConvMixing {
  Tensor raw_sigma, sigma, read_v_out, scaled_by_sample, mixing;
};

ConvMixing conv_mixing(const void* query_rows, const Tensor& scale, std::optional<double> fixed_sharpness,
                       const Tensor& unit_keys, const Tensor& slot_bias, const Tensor& s_values, const Tensor& v_values,
                       int64_t R, int64_t B, const Tensor& unit_queries, const Tensor& query_norm,
                       const Tensor& weights) {
  const int64_t P = unit_keys.size(1), O = v_values.size(1);
  const auto options = weights.options();
  Tensor raw_sigma = at::empty({R, B}, options), sigma = at::empty({R, B}, options);
  Tensor scaled = at::empty({P, R, B}, options);
  Tensor s_contiguous = s_values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "conv_mixing", [&] {
    attend_tensors<scalar_t>(query_rows, unit_keys, scale, fixed_sharpness, slot_bias, R, B, unit_queries,
                             query_norm, weights);
    const scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      singular_values_columns<scalar_t>(w + 2 * P * R * B, s_contiguous.data_ptr<scalar_t>(), P, R, B,
                                        raw_sigma.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(), b0, b1);
      scale_by_sigma_columns<scalar_t>(w, sigma.data_ptr<scalar_t>(), P, R, B, scaled.data_ptr<scalar_t>(), b0, b1);
    });
  });
  // The products with the programs, sample-major (B, ., .): a GEMM and a batched one.
  Tensor read_v_out = at::mm(weights[1].t(), v_values.contiguous()).view({R, B, O}).transpose(0, 1).contiguous();
  Tensor scaled_by_sample = scaled.permute({2, 1, 0}).contiguous();                             // (B, R, P)
  Tensor mixing = at::bmm(read_v_out.transpose(1, 2), scaled_by_sample);                        // (B, O, P)
  return {raw_sigma, sigma, read_v_out, scaled_by_sample, mixing};
}

std::vector<Tensor> conv_read_forward(const Tensor& queries, const std::optional<Tensor>& sharpness,
                                      std::optional<double> fixed_sharpness, const Tensor& keys,
                                      const std::optional<Tensor>& slot_bias, const Tensor& s_values,
                                      const Tensor& v_values, int64_t components, bool want_usage,
                                      const std::optional<Tensor>& usage_weights,
                                      const std::optional<Tensor>& expand) {
  const int64_t J = 3, P = keys.size(1), k = keys.size(2), R = components, B = queries.size(1);
  check_queries_and_sharpness("conv_read_forward", queries, sharpness, fixed_sharpness, J, R, k, B);
  TORCH_CHECK(v_values.dim() == 2 && v_values.size(0) == P, "conv_read_forward: v_values of shape ",
              v_values.sizes(), ", expected (", P, ", out_channels)");
  TORCH_CHECK(!usage_weights.has_value() || usage_weights->numel() == B, "conv_read_forward: usage_weights of ",
              usage_weights.has_value() ? usage_weights->numel() : 0, " values, expected ", B);
  const auto options = queries.options();
  Tensor q = queries.contiguous();
  Tensor scale = sharpness.has_value() ? sharpness->contiguous() : Tensor();
  const AttentionBuffers a = attention_buffers(keys, R, B, options);
  Tensor bias = slot_bias.has_value() ? slot_bias->contiguous() : Tensor();
  const ConvMixing m = conv_mixing(q.data_ptr(), scale, fixed_sharpness, a.unit_keys, bias, s_values, v_values, R, B,
                                   a.unit_queries, a.query_norm, a.weights);
  Tensor usage;
  if (!want_usage) {
    usage = at::zeros({J, P}, options);
  } else {
    // Each slot's largest weight over a composition's components, averaged over the samples.
    Tensor largest = a.weights.view({J, P, R, B}).amax(2);                              // (J, P, B)
    usage = usage_weights.has_value() ? at::matmul(largest, *usage_weights) / usage_weights->sum()
                                      : largest.mean(2);
  }
  Tensor mixing = m.mixing;
  if (expand.has_value()) {
    // Each sample's read is the read of its context (expand[b] < B): one row copy per sample.
    check_expand("conv_read_forward", *expand, B);
    const int64_t size = mixing.size(1) * mixing.size(2), rows = expand->numel();
    Tensor full = at::empty({rows, mixing.size(1), mixing.size(2)}, options);
    const int64_t* index = expand->data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(mixing.scalar_type(), "conv_read_expand", [&] {
      const scalar_t* from = mixing.data_ptr<scalar_t>();
      scalar_t* to = full.data_ptr<scalar_t>();
      for (int64_t b = 0; b < rows; ++b) std::copy_n(from + index[b] * size, size, to + b * size);
    });
    mixing = full;
  }
  return {mixing, m.sigma.t().contiguous(), usage, a.unit_queries, a.query_norm, a.unit_keys, a.key_norm,
          a.weights, m.raw_sigma, m.sigma, m.read_v_out, m.scaled_by_sample};
}

// NeurocoderConv2d's read for no-grad, eval-mode calls (an agent's rollout: many calls on small
// batches, where each operation's fixed cost dominates): the composer's rows, then conv_mixing.
// From constants the caller keeps between calls (neurocoder.reuse_programs): the composer's
// weight (C, context) and bias (C,) with only query and (learned) sharpness rows, the unit keys
// (J, P, k) and the programs. Nothing is saved and no usage is counted.
// context (B, context_features) -> mixing (B, C_out, P).
Tensor conv_read_inference(const Tensor& context, const Tensor& head_weight, const Tensor& head_bias,
                           const Tensor& unit_keys, const std::optional<Tensor>& slot_bias, const Tensor& s_values,
                           const Tensor& v_values, int64_t rank, std::optional<double> fixed_sharpness) {
  const int64_t J = 3, B = context.size(0), P = v_values.size(0), R = rank;
  TORCH_CHECK(unit_keys.dim() == 3 && unit_keys.size(0) == J && unit_keys.size(1) == P,
              "conv_read_inference: unit keys of shape ", unit_keys.sizes(), ", expected (3, ", P, ", key_dim)");
  const int64_t k = unit_keys.size(2), Q = J * R * k, C = head_weight.size(0);
  const bool learned = !fixed_sharpness.has_value();
  TORCH_CHECK(C == Q + (learned ? J * R : 0), "conv_read_inference: the composer has ", C, " rows, expected ",
              Q + (learned ? J * R : 0), " (queries", learned ? " and sharpness" : "", " only)");
  const auto options = context.options();
  Tensor head_t = at::addmm(head_bias.unsqueeze(1), head_weight, context.t());         // (C, B)
  Tensor scale = learned ? at::softplus(head_t.narrow(0, Q, J * R)).contiguous() : Tensor();
  Tensor unit_queries = at::empty({J, k, R * B}, options), query_norm = at::empty({J, 1, R, B}, options);
  Tensor weights = at::empty({J, P, R * B}, options);
  Tensor slot = slot_bias.has_value() ? slot_bias->contiguous() : Tensor();
  return conv_mixing(head_t.data_ptr(), scale, fixed_sharpness, unit_keys.contiguous(), slot, s_values, v_values, R,
                     B, unit_queries, query_norm, weights).mixing;
}

// Open addressing over rows of bytes: slots (S entries, S a power of two, -1 where empty) hold
// indices into a table of rows, `bytes` each. Returns the slot where `row` is, or the empty slot
// where it would go (rows match bit for bit: FNV-1a over the bytes, then memcmp).
inline int64_t find_row(const int64_t* slots, int64_t S, const unsigned char* table, const unsigned char* row,
                        int64_t bytes) {
  uint64_t hash = 1469598103934665603ull;
  for (int64_t i = 0; i < bytes; ++i) hash = (hash ^ row[i]) * 1099511628211ull;
  int64_t at = static_cast<int64_t>(hash & static_cast<uint64_t>(S - 1));
  while (slots[at] != -1 && std::memcmp(table + slots[at] * bytes, row, bytes) != 0) at = (at + 1) & (S - 1);
  return at;
}

// The distinct rows of a (B, C) tensor, matched bit for bit (0.0 and -0.0 differ; NaN rows with the
// same bits match), in order of first appearance: unique (U, C), inverse (B,) each row's unique
// row, counts (U,) how many rows each unique row stands for.
std::vector<Tensor> unique_rows(const Tensor& rows_in) {
  TORCH_CHECK(rows_in.dim() == 2, "unique_rows: expected a (B, C) tensor, got shape ", rows_in.sizes());
  const Tensor rows = rows_in.contiguous();
  const int64_t B = rows.size(0), bytes = rows.size(1) * rows.element_size();
  int64_t S = 1;
  while (S < 2 * B) S <<= 1;
  std::vector<int64_t> slots(S, -1), first;
  Tensor inverse = at::empty({B}, rows.options().dtype(at::kLong));
  int64_t* which = inverse.data_ptr<int64_t>();
  const auto* data = static_cast<const unsigned char*>(rows.data_ptr());
  std::vector<unsigned char> held;                     // the unique rows' bytes, in order
  held.reserve(static_cast<size_t>(B * bytes));
  std::vector<int64_t> counts;
  for (int64_t b = 0; b < B; ++b) {
    const unsigned char* row = data + b * bytes;
    const int64_t at = find_row(slots.data(), S, held.data(), row, bytes);
    if (slots[at] == -1) {
      slots[at] = static_cast<int64_t>(first.size());
      first.push_back(b);
      counts.push_back(0);
      held.insert(held.end(), row, row + bytes);
    }
    which[b] = slots[at];
    ++counts[slots[at]];
  }
  const int64_t U = static_cast<int64_t>(first.size());
  Tensor positions = at::from_blob(first.data(), {U}, at::kLong);
  return {rows.index_select(0, positions), inverse, at::from_blob(counts.data(), {U}, at::kLong).clone()};
}

// to[row] = the mean of from's row (rows of n contiguous values); the sum vectorised (its order
// fixed by the build, so the same bits on every call).
template <typename T>
void row_means(const T* from, int64_t rows, int64_t n, T* to) {
  for (int64_t row = 0; row < rows; ++row) {
    const T* __restrict__ values = from + row * n;
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) total += values[i];
    to[row] = total / static_cast<T>(n);
  }
}

// Each sample's context, x averaged over its pixels: x (B, C, H, W) -> (B, C), as x.mean((2, 3))
// (one loop over contiguous pixels instead of a reduction op and a division).
Tensor pixel_means(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_floating_point(), "pixel_means: expected a floating (B, C, H, W) tensor, got ",
              x.scalar_type(), " of shape ", x.sizes());
  const Tensor input = x.contiguous();
  const int64_t rows = input.size(0) * input.size(1), pixels = input.size(2) * input.size(3);
  Tensor means = at::empty({input.size(0), input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pixel_means", [&] {
    row_means<scalar_t>(input.data_ptr<scalar_t>(), rows, pixels, means.data_ptr<scalar_t>());
  });
  return means;
}

// The responses to the P program filters, mixed per sample: x (B, C_in, H, W), mixing (B, O, P)
// -> (B, O, H', W'), the bias (O,) included. padding_mode: "same" or "valid", else the numbers.
Tensor apply_conv_mixing(const Tensor& x, const Tensor& mixing, const Tensor& filters,
                         const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         c10::string_view padding_mode, at::IntArrayRef dilation) {
  const int64_t B = x.size(0), P = filters.size(0), O = mixing.size(1);
  Tensor responses = padding_mode.empty() ? at::conv2d(x, filters, {}, stride, padding, dilation)
                                          : at::conv2d(x, filters, {}, stride, padding_mode, dilation);
  const int64_t H = responses.size(2), W = responses.size(3);
  Tensor flat = responses.view({B, P, H * W});
  Tensor y = bias.has_value() ? at::baddbmm(bias->view({1, O, 1}), mixing, flat) : at::bmm(mixing, flat);
  return y.view({B, O, H, W});
}

// NeurocoderConv2d's whole no-grad, eval-mode call (an agent's rollout) in one op, remembering
// the contexts it meets: an agent meets the same MinAtar contexts again and again (in Seaquest
// ~4 of a step's 32 are new), and each context's mixing matrix depends on the context alone until
// a parameter changes. The table lives in tensors the caller keeps with the parameters' other
// constants (neurocoder.reuse_programs) and drops when a parameter changes:
//   slots (S,) int64: open addressing by a hash of the context's bits, -1 where empty; S a power
//       of two at least twice the capacity;
//   rows (capacity, context_features): the contexts met, bit for bit;
//   mixings (capacity, O, P): their mixing matrices;
//   counts (3,) int64: contexts held, contexts met, contexts read (the last two for reports).
// A call whose contexts do not fit starts the table over; one larger than the table reads all its
// contexts. The context is given, or x averaged over its pixels; the read is conv_read_inference;
// then the responses to the program filters (P, C_in, kh, kw) are mixed, the bias included.
// x (B, C_in, H, W) -> (B, C_out, H', W').
Tensor conv_layer_inference(const Tensor& x, const std::optional<Tensor>& context, Tensor& slots, Tensor& rows,
                            Tensor& mixings, Tensor& counts, const Tensor& head_weight, const Tensor& head_bias,
                            const Tensor& unit_keys, const std::optional<Tensor>& slot_bias, const Tensor& s_values,
                            const Tensor& v_values, const Tensor& filters, const std::optional<Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view padding_mode,
                            at::IntArrayRef dilation, int64_t rank, std::optional<double> fixed_sharpness) {
  const int64_t B = x.size(0), P = v_values.size(0), O = v_values.size(1);
  TORCH_CHECK(x.dim() == 4 && filters.dim() == 4 && filters.size(0) == P && filters.size(1) == x.size(1),
              "conv_layer_inference: input of shape ", x.sizes(), " and filters of shape ", filters.sizes(),
              ", expected (B, C_in, H, W) and (", P, ", C_in, kh, kw)");
  const Tensor ctx = context.has_value() ? context->contiguous() : pixel_means(x);          // (B, C)
  const int64_t capacity = rows.size(0), C = ctx.size(1), S = slots.size(0);
  TORCH_CHECK(slots.scalar_type() == at::kLong && counts.scalar_type() == at::kLong && counts.numel() == 3 &&
                  S >= 2 * capacity && (S & (S - 1)) == 0 && rows.dim() == 2 && rows.size(1) == C &&
                  rows.scalar_type() == ctx.scalar_type() && mixings.size(0) == capacity && mixings.size(1) == O &&
                  mixings.size(2) == P && mixings.scalar_type() == ctx.scalar_type() && rows.is_contiguous() &&
                  mixings.is_contiguous() && slots.is_contiguous(),
              "conv_layer_inference: the context table's tensors do not match (", S, " slots, rows ", rows.sizes(),
              ", mixings ", mixings.sizes(), ", context of width ", C, ")");
  auto read = [&](const Tensor& contexts) {
    return conv_read_inference(contexts, head_weight, head_bias, unit_keys, slot_bias, s_values, v_values, rank,
                               fixed_sharpness);
  };
  int64_t* count = counts.data_ptr<int64_t>();
  count[1] += B;
  if (B > capacity) {
    count[2] += B;
    return apply_conv_mixing(x, read(ctx), filters, bias, stride, padding, padding_mode, dilation);
  }
  int64_t* slot = slots.data_ptr<int64_t>();
  if (count[0] + B > capacity) {                      // no room for this call's contexts: start over
    std::fill(slot, slot + S, int64_t(-1));
    count[0] = 0;
  }
  const int64_t bytes = C * ctx.element_size();
  const auto* context_bytes = static_cast<const unsigned char*>(ctx.data_ptr());
  auto* row_bytes = static_cast<unsigned char*>(rows.data_ptr());
  std::vector<int64_t> which(B), fresh;
  const int64_t held_before = count[0];
  for (int64_t b = 0; b < B; ++b) {
    const unsigned char* row = context_bytes + b * bytes;
    const int64_t at = find_row(slot, S, row_bytes, row, bytes);
    if (slot[at] == -1) {                             // met for the first time: held, read below
      slot[at] = count[0];
      std::memcpy(row_bytes + count[0] * bytes, row, bytes);
      fresh.push_back(b);
      ++count[0];
    }
    which[b] = slot[at];
  }
  count[2] += static_cast<int64_t>(fresh.size());
  if (!fresh.empty()) {
    Tensor positions = at::from_blob(fresh.data(), {static_cast<int64_t>(fresh.size())}, at::kLong);
    mixings.narrow(0, held_before, static_cast<int64_t>(fresh.size())).copy_(read(ctx.index_select(0, positions)));
  }
  Tensor mixing = at::empty({B, O, P}, ctx.options());
  const int64_t size = O * P * mixings.element_size();
  const auto* table = static_cast<const unsigned char*>(mixings.data_ptr());
  auto* out = static_cast<unsigned char*>(mixing.data_ptr());
  for (int64_t b = 0; b < B; ++b) std::memcpy(out + b * size, table + which[b] * size, size);
  return apply_conv_mixing(x, mixing, filters, bias, stride, padding, padding_mode, dilation);
}

// conv_read_forward's backward, from d loss / d mixing (B, O, P). Returns the gradients of
// queries (J R k, B), the sharpness (J R, B; empty when fixed), the keys (J, P, k), the slot bias
// (J, P; empty without it), s_values (P,) and v_values (P, O).
std::vector<Tensor> conv_read_backward(const Tensor& grad_mixing_in, at::TensorList saved,
                                       const std::optional<Tensor>& sharpness, std::optional<double> fixed_sharpness,
                                       const Tensor& s_values, const Tensor& v_values, bool has_slot_bias,
                                       const std::optional<Tensor>& expand) {
  TORCH_CHECK(saved.size() == 9, "conv_read_backward: expected the 9 tensors conv_read_forward saves");
  const Tensor &unit_queries = saved[0], &query_norm = saved[1], &unit_keys = saved[2], &key_norm = saved[3],
               &weights = saved[4], &raw_sigma = saved[5], &sigma = saved[6], &read_v_out = saved[7],
               &scaled = saved[8];
  const int64_t J = unit_queries.size(0), k = unit_queries.size(1), P = unit_keys.size(1);
  const int64_t R = sigma.size(0), B = sigma.size(1), O = read_v_out.size(2);
  const auto options = unit_queries.options();
  Tensor grad_mixing = grad_mixing_in.contiguous();
  if (expand.has_value()) {
    // The forward copied read expand[b] to sample b: each read's gradient is the sum of its samples'.
    TORCH_CHECK(expand->numel() == grad_mixing.size(0), "conv_read_backward: ", expand->numel(),
                " expand indices for a gradient of ", grad_mixing.size(0), " samples");
    check_expand("conv_read_backward", *expand, B);
    const int64_t size = O * P, rows = expand->numel();
    Tensor summed = at::zeros({B, O, P}, options);
    const int64_t* index = expand->data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(grad_mixing.scalar_type(), "conv_read_expand_backward", [&] {
      const scalar_t* from = grad_mixing.data_ptr<scalar_t>();
      scalar_t* to = summed.data_ptr<scalar_t>();
      for (int64_t b = 0; b < rows; ++b) {
        scalar_t* __restrict__ row = to + index[b] * size;
        const scalar_t* __restrict__ g = from + b * size;
        for (int64_t i = 0; i < size; ++i) row[i] += g[i];
      }
    });
    grad_mixing = summed;
  }
  Tensor scale = sharpness.has_value() ? sharpness->contiguous() : Tensor();
  Tensor grad_read = at::empty({J, P, R * B}, options), grad_raw = at::empty({R, B}, options);
  Tensor grad_sigma = at::zeros({R, B}, options);
  Tensor s_contiguous = s_values.contiguous(), v = v_values.contiguous();
  Tensor grad_queries = at::empty({J * R * k, B}, options);
  Tensor grad_sharpness = scale.defined() ? at::empty({J * R, B}, options) : at::empty({0}, options);
  Tensor key_partials = at::empty({J * R, P, k}, options);
  Tensor bias_partials = has_slot_bias ? at::empty({J * R, P}, options) : Tensor();
  Tensor grad_s_values = at::empty({P}, options);
  // mixing[b] = read_v_out[b]^T scaled[b].
  Tensor grad_read_v_out = at::bmm(scaled, grad_mixing.transpose(1, 2));                        // (B, R, O)
  Tensor grad_scaled = at::bmm(read_v_out, grad_mixing).permute({2, 1, 0}).contiguous();        // (P, R, B)
  // V bank: read_v_out[b, r] = read_v[:, r, b]^T M_V, so d read_v (P, R B) = M_V d read_v_out^T,
  // d M_V = read_v d read_v_out.
  Tensor grad_read_v_rb = grad_read_v_out.transpose(0, 1).reshape({R * B, O});                 // (R B, O)
  at::mm_out(out(grad_read[1]), v, grad_read_v_rb.t());
  Tensor grad_v_values = at::mm(weights[1], grad_read_v_rb);
  AT_DISPATCH_FLOATING_TYPES(unit_queries.scalar_type(), "conv_read_backward", [&] {
    const scalar_t* w = weights.data_ptr<scalar_t>();
    scalar_t* gread = grad_read.data_ptr<scalar_t>();
    scalar_t* gsig = grad_sigma.data_ptr<scalar_t>();
    scalar_t* graw = grad_raw.data_ptr<scalar_t>();
    const scalar_t* sv = s_contiguous.data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      scale_by_sigma_backward_columns<scalar_t>(w, sigma.data_ptr<scalar_t>(), grad_scaled.data_ptr<scalar_t>(), P,
                                                R, B, gread, gsig, b0, b1);
      singular_values_backward_columns<scalar_t>(raw_sigma.data_ptr<scalar_t>(), gsig, R, B, graw, b0, b1);
    });
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      s_bank_backward_rows<scalar_t>(w + 2 * P * R * B, sv, graw, R * B, gread + 2 * P * R * B,
                                     grad_s_values.data_ptr<scalar_t>(), p0, p1);
    });
    // The gradient of every read weight is given (grad_read), so the compose-side pointers go unused.
    attend_backward<scalar_t>(
        w, unit_queries.data_ptr<scalar_t>(), query_norm.data_ptr<scalar_t>(), unit_keys.data_ptr<scalar_t>(),
        scale.defined() ? scale.data_ptr<scalar_t>() : nullptr,
        static_cast<scalar_t>(scale.defined() ? 0.0 : *fixed_sharpness), graw, graw, graw, graw, sv, graw, J, P, R,
        k, B, grad_queries.data_ptr<scalar_t>(), scale.defined() ? grad_sharpness.data_ptr<scalar_t>() : nullptr,
        /*through_softplus=*/false, key_partials.data_ptr<scalar_t>(),
        has_slot_bias ? bias_partials.data_ptr<scalar_t>() : nullptr, /*s_partials=*/nullptr, gread);
  });
  const auto [grad_keys, grad_slot_bias] = key_and_bias_gradients(key_partials, bias_partials, unit_keys, key_norm,
                                                                  R, has_slot_bias);
  return {grad_queries, grad_sharpness, grad_keys, grad_slot_bias, grad_s_values, grad_v_values};
}

// NeurocoderConv2d's read with the feed-forward composer, from its parameters, in one op: the
// composer's rows (head_weight (C, context), head_bias (C,): query rows, then the learned
// sharpness rows), the keys, then conv_read_forward. Returns conv_read_forward's tensors, then the
// raw sharpness rows (J R, B; empty when fixed) for the backward's softplus.
std::vector<Tensor> conv_layer_read_forward(const Tensor& context, const Tensor& head_weight, const Tensor& head_bias,
                                            const Tensor& u_values, const Tensor& v_values, const Tensor& s_values,
                                            const Tensor& s_keys, const Tensor& key_a, const Tensor& key_b,
                                            const std::optional<Tensor>& key_c, const std::optional<Tensor>& key_d,
                                            const std::optional<Tensor>& slot_bias, int64_t rank,
                                            std::optional<double> fixed_sharpness, bool want_usage,
                                            const std::optional<Tensor>& usage_weights,
                                            const std::optional<Tensor>& expand) {
  const int64_t J = 3, k = s_keys.size(1), R = rank, Q = J * R * k, C = head_weight.size(0);
  const bool learned = !fixed_sharpness.has_value();
  TORCH_CHECK(C == Q + (learned ? J * R : 0), "conv_layer_read_forward: the composer has ", C, " rows, expected ",
              Q + (learned ? J * R : 0), " (queries", learned ? " and sharpness" : "", " only)");
  Tensor head_t = at::addmm(head_bias.unsqueeze(1), head_weight, context.t());         // (C, B)
  Tensor raw = learned ? head_t.narrow(0, Q, J * R) : at::empty({0}, context.options());
  std::optional<Tensor> sharpness;
  if (learned) sharpness = at::softplus(raw);
  std::vector<Tensor> result = conv_read_forward(head_t.narrow(0, 0, Q), sharpness, fixed_sharpness,
                                                 layer_keys(u_values, v_values, s_keys, key_a, key_b, key_c, key_d),
                                                 slot_bias, s_values, v_values, R, want_usage, usage_weights, expand);
  result.push_back(learned ? *sharpness : raw);
  result.push_back(raw);
  return result;
}

// conv_layer_read_forward's backward from d loss / d mixing. saved: the 9 tensors
// conv_read_forward saves, then the sharpness and the raw sharpness rows (empty when fixed).
// Returns the gradients, in conv_layer_read_forward's argument order: context, head_weight,
// head_bias, u_values, v_values, s_values, s_keys, key_a, key_b, key_c, key_d, slot_bias; an entry
// whose input needs no gradient (bit i of needs_mask clear) or does not exist is empty.
std::vector<Tensor> conv_layer_read_backward(const Tensor& grad_mixing, at::TensorList saved, const Tensor& context,
                                             const Tensor& head_weight, const Tensor& u_values,
                                             const Tensor& v_values, const Tensor& s_values, const Tensor& key_a,
                                             const std::optional<Tensor>& key_c, bool has_slot_bias,
                                             std::optional<double> fixed_sharpness,
                                             const std::optional<Tensor>& expand, int64_t needs_mask) {
  TORCH_CHECK(saved.size() == 11, "conv_layer_read_backward: expected the 11 tensors conv_layer_read_forward saves");
  auto needs = [needs_mask](int i) { return ((needs_mask >> i) & 1) != 0; };
  const bool learned = !fixed_sharpness.has_value();
  const Tensor &sharpness = saved[9], &raw = saved[10];
  std::vector<Tensor> read = conv_read_backward(grad_mixing, saved.slice(0, 9),
                                                learned ? std::optional<Tensor>(sharpness) : std::nullopt,
                                                fixed_sharpness, s_values, v_values, has_slot_bias, expand);
  const Tensor &grad_queries = read[0], &grad_keys = read[2];
  Tensor grad_v_values = read[5];
  // The composer's rows: the queries', then the raw sharpness' through the softplus (threshold 20).
  Tensor grad_head = learned ? at::cat({grad_queries, at::softplus_backward(read[1], raw, 1.0, 20.0)}, 0)
                             : grad_queries;                                                  // (C, B)
  Tensor none = at::empty({0}, context.options());
  Tensor grad_context = needs(0) ? at::mm(grad_head.t(), head_weight) : none;
  Tensor grad_head_weight = needs(1) ? at::mm(grad_head, context) : none;
  Tensor grad_head_bias = needs(2) ? grad_head.sum(1) : none;
  Tensor grad_u = none, grad_a = none, grad_b = none, grad_c = none, grad_d = none;
  if (key_c.has_value()) {
    const Tensor grad_u_keys = grad_keys[0], grad_v_keys = grad_keys[1];                      // (P, k)
    if (needs(3)) grad_u = at::mm(grad_u_keys, key_a);
    if (needs(4)) grad_v_values = grad_v_values.addmm(grad_v_keys, *key_c);
    if (needs(7)) grad_a = at::mm(grad_u_keys.t(), u_values);
    if (needs(8)) grad_b = grad_u_keys.sum(0);
    if (needs(9)) grad_c = at::mm(grad_v_keys.t(), v_values);
    if (needs(10)) grad_d = grad_v_keys.sum(0);
  } else {                                        // learned keys: U takes no gradient here
    if (needs(7)) grad_a = grad_keys[0];
    if (needs(8)) grad_b = grad_keys[1];
  }
  return {grad_context, grad_head_weight, grad_head_bias, grad_u, needs(4) ? grad_v_values : none,
          needs(5) ? read[4] : none, needs(6) ? grad_keys[2] : none, grad_a, grad_b, grad_c, grad_d,
          has_slot_bias && needs(11) ? read[3] : none};
}

}  // namespace

TORCH_LIBRARY(neurocoder_cpu, m) {
  m.def("fused_layer_forward(Tensor x, Tensor head_weight, Tensor head_bias, Tensor u_values, Tensor v_values, "
        "Tensor s_values, Tensor s_keys, Tensor key_a, Tensor key_b, Tensor? key_c, Tensor? key_d, "
        "Tensor? slot_bias, int rank, int key_dim, float? fixed_sharpness, "
        "bool want_usage) -> Tensor[]");
  m.def("fused_layer_backward(Tensor? grad_y, Tensor? grad_sigma, Tensor x, Tensor head_weight, "
        "Tensor u_values, Tensor v_values, Tensor s_values, Tensor key_a, Tensor? key_c, "
        "Tensor[] saved, int rank, float? fixed_sharpness, bool has_slot_bias, int needs_mask) -> Tensor[]");
  m.def("fused_layer_inference(Tensor x, Tensor joined_weight, Tensor joined_bias, Tensor unit_keys, "
        "Tensor s_values, Tensor v_values, Tensor? output_bias, Tensor? slot_bias, int rank, int key_dim, "
        "float? fixed_sharpness) -> Tensor");
  m.def("fused_read_forward(Tensor queries, Tensor? sharpness, float? fixed_sharpness, Tensor memory_by_slot, "
        "Tensor keys, Tensor? slot_bias, Tensor s_values, Tensor v_values, int components, bool want_usage, "
        "Tensor? gates, int least_used) -> Tensor[]");
  m.def("fused_read_backward(Tensor? grad_y, Tensor? grad_sigma, Tensor[] saved, Tensor? sharpness, "
        "float? fixed_sharpness, Tensor memory_by_slot, Tensor s_values, Tensor v_values, bool has_slot_bias, "
        "int least_used) -> Tensor[]");
  m.def("conv_read_forward(Tensor queries, Tensor? sharpness, float? fixed_sharpness, Tensor keys, "
        "Tensor? slot_bias, Tensor s_values, Tensor v_values, int components, bool want_usage, "
        "Tensor? usage_weights, Tensor? expand) -> Tensor[]");
  m.def("conv_read_backward(Tensor grad_mixing, Tensor[] saved, Tensor? sharpness, float? fixed_sharpness, "
        "Tensor s_values, Tensor v_values, bool has_slot_bias, Tensor? expand) -> Tensor[]");
  m.def("conv_layer_inference(Tensor x, Tensor? context, Tensor(a!) slots, Tensor(b!) rows, Tensor(c!) mixings, "
        "Tensor(d!) counts, Tensor head_weight, Tensor head_bias, Tensor unit_keys, Tensor? slot_bias, "
        "Tensor s_values, Tensor v_values, Tensor filters, Tensor? bias, int[] stride, int[] padding, "
        "str padding_mode, int[] dilation, int rank, float? fixed_sharpness) -> Tensor");
  m.def("conv_layer_read_forward(Tensor context, Tensor head_weight, Tensor head_bias, Tensor u_values, "
        "Tensor v_values, Tensor s_values, Tensor s_keys, Tensor key_a, Tensor key_b, Tensor? key_c, Tensor? key_d, "
        "Tensor? slot_bias, int rank, float? fixed_sharpness, bool want_usage, Tensor? usage_weights, "
        "Tensor? expand) -> Tensor[]");
  m.def("conv_layer_read_backward(Tensor grad_mixing, Tensor[] saved, Tensor context, Tensor head_weight, "
        "Tensor u_values, Tensor v_values, Tensor s_values, Tensor key_a, Tensor? key_c, bool has_slot_bias, "
        "float? fixed_sharpness, Tensor? expand, int needs_mask) -> Tensor[]");
  m.def("unique_rows(Tensor rows) -> Tensor[]");
  m.def("pixel_means(Tensor x) -> Tensor");
  m.def("least_used_read_forward(Tensor attention, Tensor gates, int least_used) -> Tensor[]");
  m.def("least_used_read_backward(Tensor? grad_weights, Tensor? grad_usage, Tensor attention, Tensor gates, "
        "Tensor weights, Tensor usage_before, Tensor least) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(neurocoder_cpu, CPU, m) {
  m.impl("fused_layer_forward", &fused_layer_forward);
  m.impl("fused_layer_backward", &fused_layer_backward);
  m.impl("fused_layer_inference", &fused_layer_inference);
  m.impl("fused_read_forward", &fused_read_forward);
  m.impl("fused_read_backward", &fused_read_backward);
  m.impl("conv_read_forward", &conv_read_forward);
  m.impl("conv_layer_inference", &conv_layer_inference);
  m.impl("unique_rows", &unique_rows);
  m.impl("pixel_means", &pixel_means);
  m.impl("conv_layer_read_forward", &conv_layer_read_forward);
  m.impl("conv_layer_read_backward", &conv_layer_read_backward);
  m.impl("conv_read_backward", &conv_read_backward);
  m.impl("least_used_read_forward", &least_used_read_forward);
  m.impl("least_used_read_backward", &least_used_read_backward);
}
