// CUDA backend of crnet::refine_loop (float32, float16). This file is the NCHW path; a channels-last input
// takes the NHWC path (refine_loop_cuda_nhwc.cpp), which follows the same plan in the other layout.
//
// The convolutions stay with cuDNN (it picks Winograd or implicit GEMM itself); around them the loop
// hoists the feature half of the first feedback convolution out of the iterations, runs the feedback step
// (softmax, the 2-channel convolution, the hoisted term, ReLU) as one kernel, folds every bias, residual add
// and ReLU into one epilogue kernel per convolution that also writes the ReLU the next branch needs, turns
// the ASPP pooling branch into a projection bias, and fuses the projection's ReLU with the classifier.
// Nothing in the loop waits for the host unless early exit is on (then one 4-byte read per iteration), so
// the whole call can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <numeric>

#include "../kernels/refine_cuda.h"
#include "../kernels/refine_cuda_nhwc.h"
#include "cuda_tensors.h"
#include "early_exit.h"
#include "refine_loop_cuda_nhwc.h"
#include "refine_weights.h"

namespace crnet::ops {
namespace {

namespace k = kernels::cuda;

template <typename T>
std::tuple<at::Tensor, at::Tensor> refine_loop_typed(const at::Tensor& features,
                                                     const c10::optional<at::Tensor>& previous,
                                                     const RefineWeights& w, int64_t iterations,
                                                     double exit_fraction) {
  const at::Tensor x = features.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t pixels = height * width;
  const int64_t branches = 1 + static_cast<int64_t>(w.dilations.size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor none;

  // dst = epilogue(conv(src)) with cuDNN for the convolution and one kernel for the rest.
  auto epilogue = [&](const at::Tensor& conv, const at::Tensor& bias, const at::Tensor& residual, bool relu,
                      T* dst, int64_t dst_stride, const at::Tensor& dst_relu) {
    check(k::bias_activation(ptr<T>(conv), ptr<T>(bias), ptr<T>(residual), relu, conv.size(0), conv.size(1),
                             pixels, reinterpret_cast<typename Raw<T>::type*>(dst), dst_stride, ptr<T>(dst_relu),
                             stream));
  };
  auto conv3x3 = [](const at::Tensor& input, const at::Tensor& weight, int64_t dilation) {
    return at::conv2d(input, weight, {}, 1, dilation, dilation).contiguous();
  };

  // Once per call: the feature term of the first feedback convolution, and the reshaped 1x1 weights.
  const at::Tensor feature_weight = w.feedback_weight.narrow(1, 0, channels).contiguous();
  const at::Tensor probability_weight = w.feedback_weight.narrow(1, channels, 2).contiguous();
  at::Tensor feature_term = at::empty_like(x);
  epilogue(conv3x3(x.relu(), feature_weight, 1), w.feedback_bias, none, false, feature_term.data_ptr<T>(),
           feature_term.stride(0), none);
  const at::Tensor pool_matrix = w.pool_weight.view({channels, channels});
  const at::Tensor point_matrix = w.point_weight.view({channels, channels});
  const at::Tensor project = w.project_weight.view({channels, (1 + branches) * channels});
  const at::Tensor project_pool = project.narrow(1, 0, channels);
  const at::Tensor project_branches = project.narrow(1, channels, branches * channels).contiguous();

  at::Tensor logits = at::empty({batch, 2, height, width}, x.options());
  std::vector<int64_t> used(batch, iterations), active(batch);
  std::iota(active.begin(), active.end(), 0);
  at::Tensor active_x = x, current, start = previous.has_value() ? previous->contiguous() : at::Tensor();
  at::Tensor counts = at::empty({batch}, x.options().dtype(at::kInt));
  const auto index_options = x.options().dtype(at::kLong);

  for (int64_t t = 1; t <= iterations; ++t) {
    const int64_t n = static_cast<int64_t>(active.size());
    at::Tensor hidden = at::empty_like(active_x);
    check(k::feedback(ptr<T>(feature_term), t == 1 ? nullptr : ptr<T>(current), t == 1 ? ptr<T>(start) : nullptr,
                      ptr<T>(probability_weight), n, channels, height, width, ptr<T>(hidden), stream));
    at::Tensor h = at::empty_like(active_x), h_relu = at::empty_like(active_x);
    epilogue(conv3x3(hidden, w.feedback2_weight, 1), w.feedback2_bias, active_x, false, h.data_ptr<T>(),
             h.stride(0), h_relu);
    for (int j = 0; j < 4; j += 2) {
      epilogue(conv3x3(h_relu, w.residual_weight[j], 1), w.residual_bias[j], none, true, hidden.data_ptr<T>(),
               hidden.stride(0), none);
      at::Tensor next_h = at::empty_like(h), next_relu = j == 0 ? at::empty_like(h) : at::Tensor();
      epilogue(conv3x3(hidden, w.residual_weight[j + 1], 1), w.residual_bias[j + 1], h, false,
               next_h.data_ptr<T>(), next_h.stride(0), next_relu);
      h = next_h;
      h_relu = next_relu;
    }

    // ASPP: pooling branch as a per-sample projection bias; branches written side by side, no concat.
    const at::Tensor pooled = at::relu(at::addmm(w.pool_bias, h.mean({2, 3}), pool_matrix.t()));
    const at::Tensor sample_bias = at::addmm(w.project_bias, pooled, project_pool.t()).contiguous();
    at::Tensor stacked = at::empty({n, branches * channels, height, width}, x.options());
    epilogue(at::matmul(point_matrix, h.view({n, channels, pixels})).contiguous(), w.point_bias, none, true,
             stacked.data_ptr<T>(), stacked.stride(0), none);
    for (size_t j = 0; j < w.dilations.size(); ++j) {
      epilogue(conv3x3(h, w.dilated_weight[j], w.dilations[j]), w.dilated_bias[j], none, true,
               stacked.data_ptr<T>() + (1 + j) * channels * pixels, stacked.stride(0), none);
    }
    const at::Tensor projected =
        at::matmul(project_branches, stacked.view({n, branches * channels, pixels})).contiguous();
    at::Tensor next = at::empty({n, 2, height, width}, x.options());
    check(k::project_classify(ptr<T>(projected), ptr<T>(sample_bias), ptr<T>(w.classifier_weight),
                              ptr<T>(w.classifier_bias), n, channels, pixels, ptr<T>(next), stream));
    write_active_rows(logits, next, active);
    if (t == iterations) break;

    if (exit_fraction > 0 && t >= 2) {
      check(k::count_changes(ptr<T>(next), ptr<T>(current), n, pixels, counts.data_ptr<int>(), stream));
      // The one host round trip of early exit.
      const at::Tensor changed = counts.narrow(0, 0, n).to(at::kLong).cpu();
      const std::vector<int64_t> keep =
          drop_converged(changed.data_ptr<int64_t>(), n, exit_fraction, pixels, t, used, active);
      if (keep.empty()) break;
      select_rows(keep, n, {&active_x, &feature_term, &next});
    }
    current = next;
  }
  if (exit_fraction == 0) return {logits, at::full({batch}, iterations, index_options)};  // capturable
  return {logits, at::tensor(used, at::TensorOptions().dtype(at::kLong)).to(x.device())};
}

// The NHWC kernels move 16-byte packs: every tensor they read whole must start on a 16-byte boundary (a
// tensor of its own does; a view into another may not, and then the NCHW path runs).
bool packs_aligned(const at::Tensor& features, const RefineWeights& w) {
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  bool ok = aligned(features) && aligned(w.feedback_bias) && aligned(w.feedback2_bias) && aligned(w.point_bias) &&
            aligned(w.classifier_weight);
  for (const auto& b : w.residual_bias) ok = ok && aligned(b);
  for (const auto& b : w.dilated_bias) ok = ok && aligned(b);
  return ok;
}

std::tuple<at::Tensor, at::Tensor> refine_loop_cuda(const at::Tensor& features,
                                                    const c10::optional<at::Tensor>& previous,
                                                    at::TensorList weights, at::IntArrayRef dilations,
                                                    int64_t iterations, double exit_fraction,
                                                    bool cudnn_epilogues) {
  check_loop_arguments(iterations, exit_fraction);
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kHalf,
              "crnet::refine_loop on CUDA takes float32 or float16, got " + text(features.scalar_type()));
  const c10::cuda::CUDAGuard guard(features.device());
  const bool half = features.scalar_type() == at::kHalf;
  // Channels-last in (what a channels-last model hands over): channels-last through, no layout conversion.
  const int64_t pack = half ? kernels::cuda::kPackChannels<__half> : kernels::cuda::kPackChannels<float>;
  const bool nhwc = features.dim() == 4 && features.size(1) % pack == 0 && !features.is_contiguous() &&
                    features.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (nhwc) {
    const RefineWeights w = unpack_weights(features, previous, weights, dilations, at::MemoryFormat::ChannelsLast);
    if (packs_aligned(features, w)) {
      if (half) {
        return refine_loop_cuda_nhwc<at::Half>(features, previous, w, iterations, exit_fraction, cudnn_epilogues);
      }
      return refine_loop_cuda_nhwc<float>(features, previous, w, iterations, exit_fraction, cudnn_epilogues);
    }
  }
  // The NCHW path keeps its own epilogues (it serves inputs that are not channels-last).
  const RefineWeights w = unpack_weights(features, previous, weights, dilations);
  if (half) return refine_loop_typed<at::Half>(features, previous, w, iterations, exit_fraction);
  return refine_loop_typed<float>(features, previous, w, iterations, exit_fraction);
}

}  // namespace

TORCH_LIBRARY_IMPL(crnet, CUDA, m) { m.impl("refine_loop", &refine_loop_cuda); }

}  // namespace crnet::ops
