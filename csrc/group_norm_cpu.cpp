// CPU implementation of cvfast::native_group_norm (see group_norm.h): the reference for the CUDA
// kernel's numerics and what CI runs. Two passes over x: per-chunk partial sums (in double), then the
// fused normalise / affine / modulation / SiLU. Both passes split the batch's positions
// (frames * height * width) into fixed chunks, so the sums are added in the same order whatever the
// thread count.
#include "group_norm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace cvfast {
namespace {

// About 32K elements per work item: enough to amortise at::parallel_for's scheduling, small enough
// to balance a CogVideoX decoder activation (up to ~2G elements) over any core count.
constexpr int64_t kChunkElements = 1 << 15;

struct Shape {
  int64_t batch, channels, positions, groups;
  bool channels_last;
  int64_t chunk;   // positions per work item
  int64_t chunks;  // per batch element

  Shape(const at::Tensor& x, int64_t groups_)
      : batch(x.size(0)), channels(x.size(1)), positions(x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1))),
        groups(groups_), channels_last(is_channels_last(x)) {
    chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, channels));
    chunks = (positions + chunk - 1) / chunk;
  }
  int64_t per_group() const { return channels / groups; }
};

// Per-channel sums of x and x^2 over positions [p0, p1) of batch element b, added into sum/sq.
template <typename scalar_t>
void channel_sums(const scalar_t* x, const Shape& s, int64_t b, int64_t p0, int64_t p1, double* sum, double* sq) {
  if (s.channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* row = x + (b * s.positions + p) * s.channels;
      for (int64_t c = 0; c < s.channels; ++c) {
        const double v = static_cast<float>(row[c]);
        sum[c] += v;
        sq[c] += v * v;
      }
    }
    return;
  }
  for (int64_t c = 0; c < s.channels; ++c) {
    const scalar_t* row = x + (b * s.channels + c) * s.positions;
    double a = 0, q = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const double v = static_cast<float>(row[p]);
      a += v;
      q += v * v;
    }
    sum[c] += a;
    sq[c] += q;
  }
}

// mean and 1/std per (batch, group), as fp32 like the kernels use them.
template <typename scalar_t>
void group_stats(const scalar_t* x, const Shape& s, double eps, std::vector<float>& mean, std::vector<float>& rstd) {
  // partial[(b * chunks + k) * groups + g] = (sum, sum of squares) of chunk k
  std::vector<double> sum(s.batch * s.chunks * s.groups), sq(sum.size());
  at::parallel_for(0, s.batch * s.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> csum(s.channels), csq(s.channels);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.chunks, k = item % s.chunks;
      std::fill(csum.begin(), csum.end(), 0.0);
      std::fill(csq.begin(), csq.end(), 0.0);
      channel_sums(x, s, b, k * s.chunk, std::min(s.positions, (k + 1) * s.chunk), csum.data(), csq.data());
      for (int64_t c = 0; c < s.channels; ++c) {
        sum[item * s.groups + c / s.per_group()] += csum[c];
        sq[item * s.groups + c / s.per_group()] += csq[c];
      }
    }
  });
  const double n = static_cast<double>(s.per_group() * s.positions);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t g = 0; g < s.groups; ++g) {
      double total = 0, total_sq = 0;
      for (int64_t k = 0; k < s.chunks; ++k) {
        total += sum[(b * s.chunks + k) * s.groups + g];
        total_sq += sq[(b * s.chunks + k) * s.groups + g];
      }
      const double m = total / n;
      const double var = std::max(0.0, total_sq / n - m * m);
      mean[b * s.groups + g] = static_cast<float>(m);
      rstd[b * s.groups + g] = static_cast<float>(1.0 / std::sqrt(var + eps));
    }
  }
}

struct Epilogue {
  bool modulate, silu;
  float operator()(float y, float scale, float shift) const {
    if (modulate) y = y * scale + shift;
    return silu ? y / (1.0f + std::exp(-y)) : y;
  }
};

template <typename scalar_t>
void normalise(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, const scalar_t* scale,
               const scalar_t* shift, scalar_t* out, const Shape& s, const std::vector<float>& mean,
               const std::vector<float>& rstd, Epilogue epilogue) {
  // Per (batch, channel): y = (x - mean) * a + bias[c], a = rstd * weight[c].
  std::vector<float> m(s.batch * s.channels), a(m.size()), beta(s.channels);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t c = 0; c < s.channels; ++c) {
      const int64_t g = b * s.groups + c / s.per_group();
      m[b * s.channels + c] = mean[g];
      a[b * s.channels + c] = rstd[g] * static_cast<float>(weight[c]);
    }
  }
  for (int64_t c = 0; c < s.channels; ++c) beta[c] = static_cast<float>(bias[c]);
  auto store = [&](int64_t i, int64_t bc, int64_t c) {
    const float y = (static_cast<float>(x[i]) - m[bc]) * a[bc] + beta[c];
    out[i] = static_cast<scalar_t>(epilogue.modulate
                                       ? epilogue(y, static_cast<float>(scale[i]), static_cast<float>(shift[i]))
                                       : epilogue(y, 0.f, 0.f));
  };
  at::parallel_for(0, s.batch * s.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.chunks, p0 = (item % s.chunks) * s.chunk;
      const int64_t p1 = std::min(s.positions, p0 + s.chunk);
      if (s.channels_last) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t row = (b * s.positions + p) * s.channels;
          for (int64_t c = 0; c < s.channels; ++c) store(row + c, b * s.channels + c, c);
        }
      } else {
        for (int64_t c = 0; c < s.channels; ++c) {
          const int64_t row = (b * s.channels + c) * s.positions;
          for (int64_t p = p0; p < p1; ++p) store(row + p, b * s.channels + c, c);
        }
      }
    }
  });
}

at::Tensor group_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                          double eps, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                          bool silu) {
  check_group_norm_args(x, weight, bias, groups, eps, scale, shift, c10::DeviceType::CPU);
  at::Tensor out = at::empty_like(x);  // keeps x's layout
  if (x.numel() == 0) return out;
  const Shape s(x, groups);
  CVFAST_DISPATCH_FLOATS(x.scalar_type(), "native_group_norm_cpu", [&] {
    std::vector<float> mean(s.batch * s.groups), rstd(mean.size());
    group_stats(x.const_data_ptr<scalar_t>(), s, eps, mean, rstd);
    const scalar_t* sc = scale.has_value() ? scale->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sh = shift.has_value() ? shift->const_data_ptr<scalar_t>() : nullptr;
    normalise(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), sc,
              sh, out.mutable_data_ptr<scalar_t>(), s, mean, rstd, Epilogue{scale.has_value(), silu});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cvfast, CPU, m) { m.impl("native_group_norm", &group_norm_cpu); }

}  // namespace cvfast
