// CUDA implementation of cvfast::native_group_norm (see group_norm.h), three launches:
//   1. partial statistics: grid (batch * groups, splits); each block folds its slice of a group with
//      Welford's update per thread and Chan's merge across the block, and writes (count, mean, M2);
//   2. finalise: one thread per (batch, group) merges the splits in double -> mean, 1/std;
//   3. apply: one pass over x (grid-stride, coalesced in either layout) writing
//      SiLU(((x - mean) * rstd * w + b) * scale + shift), in fp32, rounded once at the store.
// Welford rather than sum / sum of squares: a channel mean far from zero must not cancel the variance.
#include "group_norm.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace cvfast {
namespace {

constexpr int kThreads = 256;               // 8 warps: enough loads in flight per block for a streaming pass
constexpr int64_t kElementsPerSplit = 16384;  // 64 per thread of a stats block
constexpr int64_t kMaxSplits = 1024;        // with batch * groups >= 32, plenty of blocks for 132 SMs

struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean, w = b.n / n;
  return {n, a.mean + delta * w, a.m2 + b.m2 + delta * delta * a.n * w};
}

__device__ Moments block_merge(Moments m) {
  __shared__ Moments warps[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    const Moments other{__shfl_down_sync(0xffffffffu, m.n, offset), __shfl_down_sync(0xffffffffu, m.mean, offset),
                        __shfl_down_sync(0xffffffffu, m.m2, offset)};
    m = merge(m, other);
  }
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) m = merge(m, warps[w]);
  }
  return m;  // valid in thread 0
}

// Memory offset of element e of group (b, g): e runs over (channel in group, position) in contiguous
// layout and over (position, channel in group) in channels-last, each the layout's memory order.
__device__ __forceinline__ int64_t group_offset(int64_t e, int64_t b, int64_t g, int64_t channels,
                                                int64_t positions, int64_t per_group, bool channels_last) {
  if (!channels_last) return (b * channels + g * per_group) * positions + e;
  return (b * positions + e / per_group) * channels + g * per_group + e % per_group;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) partial_moments(const scalar_t* __restrict__ x, Moments* __restrict__ out,
                                                            int64_t groups, int64_t channels, int64_t positions,
                                                            bool channels_last, int64_t splits) {
  const int64_t bg = blockIdx.x, split = blockIdx.y;
  const int64_t b = bg / groups, g = bg % groups, per_group = channels / groups;
  const int64_t length = per_group * positions;
  const int64_t begin = length * split / splits, end = length * (split + 1) / splits;
  Moments m{0.f, 0.f, 0.f};
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const float v = static_cast<float>(x[group_offset(e, b, g, channels, positions, per_group, channels_last)]);
    m.n += 1.f;
    const float delta = v - m.mean;
    m.mean += delta / m.n;
    m.m2 += delta * (v - m.mean);
  }
  m = block_merge(m);
  if (threadIdx.x == 0) out[bg * splits + split] = m;
}

__global__ void finalise(const Moments* __restrict__ partial, float* __restrict__ mean, float* __restrict__ rstd,
                         int64_t count, int64_t splits, double eps) {
  const int64_t bg = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bg >= count) return;
  double n = 0, mu = 0, m2 = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const Moments p = partial[bg * splits + s];
    if (p.n == 0.f) continue;
    const double total = n + p.n, delta = p.mean - mu;
    mu += delta * p.n / total;
    m2 += p.m2 + delta * delta * n * p.n / total;
    n = total;
  }
  mean[bg] = static_cast<float>(mu);
  rstd[bg] = static_cast<float>(rsqrt(m2 / n + eps));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) apply(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                                  const scalar_t* __restrict__ bias, const scalar_t* __restrict__ scale,
                                                  const scalar_t* __restrict__ shift, const float* __restrict__ mean,
                                                  const float* __restrict__ rstd, scalar_t* __restrict__ out,
                                                  int64_t numel, int64_t groups, int64_t channels, int64_t positions,
                                                  bool channels_last, bool silu) {
  const int64_t per_group = channels / groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < numel; i += stride) {
    const int64_t b = i / (channels * positions);
    const int64_t c = channels_last ? i % channels : (i / positions) % channels;
    const int64_t bg = b * groups + c / per_group;
    float y = (static_cast<float>(x[i]) - mean[bg]) * rstd[bg] * static_cast<float>(weight[c]) +
              static_cast<float>(bias[c]);
    if (scale != nullptr) y = y * static_cast<float>(scale[i]) + static_cast<float>(shift[i]);
    if (silu) y = y / (1.f + __expf(-y));
    out[i] = static_cast<scalar_t>(y);
  }
}

at::Tensor group_norm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                           double eps, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                           bool silu) {
  check_group_norm_args(x, weight, bias, groups, eps, scale, shift, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);  // keeps x's layout
  if (x.numel() == 0) return out;
  const int64_t batch = x.size(0), channels = x.size(1), positions = x.numel() / (batch * channels);
  const bool channels_last = is_channels_last(x);
  const int64_t length = channels / groups * positions;
  const int64_t splits = std::min(kMaxSplits, std::max<int64_t>(1, length / kElementsPerSplit));
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({batch * groups * splits * 3}, f32);  // Moments, 3 floats each
  at::Tensor stats = at::empty({2, batch * groups}, f32);
  auto* moments = reinterpret_cast<Moments*>(partial.mutable_data_ptr<float>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((x.numel() + kThreads - 1) / kThreads, int64_t{1} << 20);
  CVFAST_DISPATCH_FLOATS(x.scalar_type(), "native_group_norm_cuda", [&] {
    partial_moments<scalar_t><<<dim3(batch * groups, splits), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), moments, groups, channels, positions, channels_last, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalise<<<(batch * groups + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        moments, stats[0].mutable_data_ptr<float>(), stats[1].mutable_data_ptr<float>(), batch * groups, splits, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    apply<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
        scale ? scale->const_data_ptr<scalar_t>() : nullptr, shift ? shift->const_data_ptr<scalar_t>() : nullptr,
        stats[0].const_data_ptr<float>(), stats[1].const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(),
        x.numel(), groups, channels, positions, channels_last, silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cvfast, CUDA, m) { m.impl("native_group_norm", &group_norm_cuda); }

}  // namespace cvfast
