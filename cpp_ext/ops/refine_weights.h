// The weights of crnet::refine_loop, in the order of the schema (see schema.cpp), checked once.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdio>
#include <string>
#include <vector>

namespace crnet::ops {

// Error messages are built as one std::string, never through c10::str's std::ostringstream: formatting a
// number through the module's iostreams crashed the process on one CUDA build (torch 2.11), where every
// check that printed a number segfaulted and the one that printed only text did not.
inline std::string text(int64_t value) { return std::to_string(value); }
inline std::string text(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", value);
  return buffer;
}
inline std::string text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
inline std::string text(at::ScalarType type) { return c10::toString(type); }

struct RefineWeights {
  at::Tensor feedback_weight, feedback_bias;    // (C, C + 2, 3, 3): features, then the 2 probabilities
  at::Tensor feedback2_weight, feedback2_bias;  // (C, C, 3, 3)
  at::Tensor residual_weight[4], residual_bias[4];  // residual2 conv1, conv2, residual3 conv1, conv2
  at::Tensor pool_weight, pool_bias;            // ASPP image pooling (C, C, 1, 1)
  at::Tensor point_weight, point_bias;          // ASPP 1x1 branch
  std::vector<at::Tensor> dilated_weight, dilated_bias;  // ASPP 3x3 branches, one per dilation
  at::Tensor project_weight, project_bias;      // (C, (2 + D) C, 1, 1): [pool, 1x1, dilated...]
  at::Tensor classifier_weight, classifier_bias;  // (2, C, 1, 1)
  std::vector<int64_t> dilations;
};

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, std::string("crnet::refine_loop: ") + name + " has shape " + text(t.sizes()) +
                                      ", expected " + text(shape));
}

// Checks features (N, C, H, W), previous (N, 2, H, W) and every weight against C; same dtype and device.
// The weights in the op's order, shape-checked; 4-d ones in `format` (channels-last for the NHWC path, whose
// cuDNN convolutions then convert nothing), the rest contiguous.
inline RefineWeights unpack_weights(const at::Tensor& features, const c10::optional<at::Tensor>& previous,
                                    at::TensorList weights, at::IntArrayRef dilations,
                                    at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  TORCH_CHECK(features.dim() == 4,
              "crnet::refine_loop: features must be (N, C, H, W), got " + text(features.sizes()));
  const int64_t n = features.size(0), c = features.size(1), h = features.size(2), w = features.size(3);
  if (previous.has_value()) check_shape(*previous, {n, 2, h, w}, "previous");
  const int64_t d = static_cast<int64_t>(dilations.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 20 + 2 * d,
              "crnet::refine_loop: expected " + text(20 + 2 * d) + " weight tensors for " + text(d) +
                  " dilations, got " + text(static_cast<int64_t>(weights.size())));
  for (const auto& t : weights) {
    TORCH_CHECK(t.scalar_type() == features.scalar_type() && t.device() == features.device(),
                "crnet::refine_loop: every weight must match the features' dtype and device");
  }
  if (previous.has_value()) {
    TORCH_CHECK(previous->scalar_type() == features.scalar_type() && previous->device() == features.device(),
                "crnet::refine_loop: previous must match the features' dtype and device");
  }
  RefineWeights r;
  size_t i = 0;
  auto take = [&](at::IntArrayRef shape, const char* name) {
    check_shape(weights[i], shape, name);
    const at::Tensor& t = weights[i++];
    return t.dim() == 4 ? t.contiguous(format) : t.contiguous();
  };
  r.feedback_weight = take({c, c + 2, 3, 3}, "feedback conv1 weight");
  r.feedback_bias = take({c}, "feedback conv1 bias");
  r.feedback2_weight = take({c, c, 3, 3}, "feedback conv2 weight");
  r.feedback2_bias = take({c}, "feedback conv2 bias");
  for (int j = 0; j < 4; ++j) {
    r.residual_weight[j] = take({c, c, 3, 3}, "residual weight");
    r.residual_bias[j] = take({c}, "residual bias");
  }
  r.pool_weight = take({c, c, 1, 1}, "ASPP pooling weight");
  r.pool_bias = take({c}, "ASPP pooling bias");
  r.point_weight = take({c, c, 1, 1}, "ASPP 1x1 weight");
  r.point_bias = take({c}, "ASPP 1x1 bias");
  for (int64_t j = 0; j < d; ++j) {
    TORCH_CHECK(dilations[j] >= 1, "crnet::refine_loop: dilations must be >= 1");
    r.dilated_weight.push_back(take({c, c, 3, 3}, "ASPP dilated weight"));
    r.dilated_bias.push_back(take({c}, "ASPP dilated bias"));
  }
  r.project_weight = take({c, (2 + d) * c, 1, 1}, "ASPP projection weight");
  r.project_bias = take({c}, "ASPP projection bias");
  r.classifier_weight = take({2, c, 1, 1}, "classifier weight");
  r.classifier_bias = take({2}, "classifier bias");
  r.dilations = dilations.vec();
  return r;
}

inline void check_loop_arguments(int64_t iterations, double exit_fraction) {
  TORCH_CHECK(iterations >= 1, "crnet::refine_loop: iterations must be >= 1, got " + text(iterations));
  TORCH_CHECK(exit_fraction >= 0.0 && exit_fraction <= 1.0,
              "crnet::refine_loop: exit_fraction must be within [0, 1], got " + text(exit_fraction));
}

}  // namespace crnet::ops
