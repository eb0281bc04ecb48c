// The fused VAE norm shared by the CPU and CUDA implementations of cvfast::native_group_norm:
//   y = GroupNorm(x) * weight + bias;  y = y * scale + shift (optional);  y = SiLU(y) (optional)
// x: (batch, channels, frames, height, width), contiguous or channels_last_3d; scale and shift
// shaped and laid out like x. Statistics in double (CPU) / fp32 partials (CUDA), the rest in fp32,
// one rounding to x's dtype at the store.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

// The dtypes the ops take (the checks refuse the others): float32, bfloat16, float16.
#define CVFAST_DISPATCH_FLOATS(TYPE, NAME, ...)                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace cvfast {

// The op's name in error messages.
inline constexpr const char* kGroupNorm = "cvfast::native_group_norm";

inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !x.is_contiguous();
}

inline void check_layout_like(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), kGroupNorm, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kGroupNorm, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), kGroupNorm, ": ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.strides() == x.strides(), kGroupNorm, ": ", name, " must have x's memory layout (strides ",
              x.strides(), "), got strides ", t.strides());
}

inline void check_param(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), kGroupNorm, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kGroupNorm, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous(), kGroupNorm, ": ", name,
              " must be a contiguous 1-D tensor of x's ", x.size(1), " channels, got shape ", t.sizes());
}

// Every argument check of the op, at the C++ boundary; `device` is the dispatch key's device type.
inline void check_group_norm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                  int64_t groups, double eps, const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift, c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, kGroupNorm, ": x must be on ", c10::DeviceTypeName(device), ", got ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              kGroupNorm, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 5, kGroupNorm, ": x must be 5-D (batch, channels, frames, height, width), got shape ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast3d), kGroupNorm,
              ": x must be contiguous or channels_last_3d, got strides ", x.strides(), " for shape ", x.sizes());
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, kGroupNorm, ": groups=", groups,
              " must be positive and divide x's ", x.size(1), " channels");
  TORCH_CHECK(eps >= 0, kGroupNorm, ": eps=", eps, " must be >= 0");
  check_param("weight", weight, x);
  check_param("bias", bias, x);
  TORCH_CHECK(scale.has_value() == shift.has_value(), kGroupNorm,
              ": scale and shift must both be given or both be None, got scale ",
              scale.has_value() ? "given" : "None", " and shift ", shift.has_value() ? "given" : "None");
  if (scale.has_value()) {
    check_layout_like("scale", *scale, x);
    check_layout_like("shift", *shift, x);
  }
}

}  // namespace cvfast
