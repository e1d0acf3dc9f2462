// CPU backend of crnet::refine_loop (float32, float64).
//
// What it saves over the eager loop: the feature half of the first feedback convolution is computed once
// instead of T times; every 3x3 convolution runs as Winograd F(4x4, 3x3) (36 multiplies per 4x4 output
// tile instead of 144), dilated ones on their phase grids, or directly where that is cheaper; biases,
// residual adds and ReLUs happen in the output transform; the ASPP image-pooling branch becomes a bias of
// the projection, whose ReLU feeds the classifier in the same pass; converged samples leave the batch.
// Inside, feature maps are channels-last, so every transform and epilogue runs on whole channel vectors.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <numeric>

#include "../kernels/refine_steps.h"
#include "../kernels/winograd.h"
#include "early_exit.h"
#include "refine_weights.h"

namespace crnet::ops {
namespace {

using kernels::Epilogue;
using kernels::TileGrid;

constexpr int64_t kGrain = 16;  // pixels or tiles per task: enough to amortise a task, few enough to balance

// A 3x3 convolution prepared once per call: Winograd-transformed filters, or the plain weights where the
// direct convolution multiplies less (a large dilation on a small map leaves few taps inside it).
struct Conv3x3 {
  TileGrid grid;
  bool winograd = false;
  at::Tensor filters;  // (36, C, K) for Winograd, else the (K, C, 3, 3) weight
  int64_t dilation = 1;
  int64_t out_channels = 0;
};

template <typename T>
Conv3x3 prepare(const at::Tensor& weight, int64_t in_channels, int64_t dilation, int64_t height,
                int64_t width) {
  Conv3x3 conv;
  conv.dilation = dilation;
  conv.out_channels = weight.size(0);
  conv.grid = kernels::make_tile_grid(height, width, dilation);
  conv.winograd = kernels::winograd_multiplies(conv.grid) < kernels::direct_multiplies(height, width, dilation);
  const at::Tensor used = weight.narrow(1, 0, in_channels);
  if (conv.winograd) {
    const at::Tensor channels_last = used.permute({1, 2, 3, 0}).contiguous();  // (C, 3, 3, K)
    conv.filters = at::empty({kernels::kPoints, in_channels, conv.out_channels}, weight.options());
    kernels::filter_transform<T>(channels_last.data_ptr<T>(), in_channels, conv.out_channels,
                                 conv.filters.data_ptr<T>());
  } else {
    conv.filters = used.contiguous();
  }
  return conv;
}

// out (pixels `out_stride` apart) = epilogue(conv(relu_input ? relu(x) : x)); x contiguous (N, H, W, C).
template <typename T>
void run(const Conv3x3& conv, const at::Tensor& x, bool relu_input, const Epilogue<T>& epilogue, T* out,
         int64_t out_stride) {
  const int64_t batch = x.size(0), channels = x.size(3), k = conv.out_channels;
  if (conv.winograd) {
    const int64_t columns = batch * conv.grid.count();
    at::Tensor v = at::empty({kernels::kPoints, columns, channels}, x.options());
    const T* src = x.data_ptr<T>();
    T* v_ptr = v.data_ptr<T>();
    at::parallel_for(0, columns, kGrain, [&](int64_t begin, int64_t end) {
      kernels::input_transform<T>(src, channels, channels, conv.grid, relu_input, batch, v_ptr, begin, end);
    });
    const at::Tensor m = at::bmm(v, conv.filters);  // (36, P, K)
    const T* m_ptr = m.data_ptr<T>();
    at::parallel_for(0, columns, kGrain, [&](int64_t begin, int64_t end) {
      kernels::output_transform<T>(m_ptr, k, conv.grid, epilogue, batch, out, out_stride, begin, end);
    });
    return;
  }
  // oneDNN on a channels-last view; its output comes back channels-last, so the permute is free.
  const at::Tensor input = (relu_input ? x.relu() : x).permute({0, 3, 1, 2});
  const at::Tensor y = at::conv2d(input, conv.filters, {}, 1, conv.dilation, conv.dilation)
                           .permute({0, 2, 3, 1})
                           .contiguous();
  const T* y_ptr = y.data_ptr<T>();
  at::parallel_for(0, y.numel() / k, kGrain, [&](int64_t begin, int64_t end) {
    kernels::bias_activation<T>(y_ptr, epilogue.bias, epilogue.residual, epilogue.relu, k, out, out_stride,
                                begin, end);
  });
}

template <typename T>
at::Tensor convolve(const Conv3x3& conv, const at::Tensor& x, bool relu_input, const Epilogue<T>& epilogue) {
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2), conv.out_channels}, x.options());
  run<T>(conv, x, relu_input, epilogue, out.data_ptr<T>(), conv.out_channels);
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> refine_loop_typed(const at::Tensor& features,
                                                     const c10::optional<at::Tensor>& previous,
                                                     const RefineWeights& w, int64_t iterations,
                                                     double exit_fraction) {
  const int64_t batch = features.size(0), channels = features.size(1);
  const int64_t height = features.size(2), width = features.size(3), pixels = height * width;
  const at::Tensor x = features.permute({0, 2, 3, 1}).contiguous();  // channels-last inside the loop
  const int64_t branches = 1 + static_cast<int64_t>(w.dilations.size());
  auto bias = [](const at::Tensor& b) { return b.data_ptr<T>(); };
  auto pixel_loop = [](int64_t count, auto&& body) { at::parallel_for(0, count, kGrain, body); };

  // Everything that does not change across iterations, once.
  const Conv3x3 feature_half = prepare<T>(w.feedback_weight, channels, 1, height, width);
  const at::Tensor probability_half =
      w.feedback_weight.narrow(1, channels, 2).permute({1, 2, 3, 0}).contiguous();  // (2, 3, 3, C)
  const Conv3x3 feedback2 = prepare<T>(w.feedback2_weight, channels, 1, height, width);
  Conv3x3 residual[4];
  for (int j = 0; j < 4; ++j) residual[j] = prepare<T>(w.residual_weight[j], channels, 1, height, width);
  std::vector<Conv3x3> dilated;
  for (size_t j = 0; j < w.dilations.size(); ++j) {
    dilated.push_back(prepare<T>(w.dilated_weight[j], channels, w.dilations[j], height, width));
  }
  const at::Tensor pool_matrix = w.pool_weight.view({channels, channels});
  const at::Tensor point_matrix = w.point_weight.view({channels, channels});
  const at::Tensor project = w.project_weight.view({channels, (1 + branches) * channels});
  const at::Tensor project_pool = project.narrow(1, 0, channels);
  const at::Tensor project_branches = project.narrow(1, channels, branches * channels);
  const at::Tensor classifier = w.classifier_weight.view({2, channels});
  at::Tensor feature_term =
      convolve<T>(feature_half, x, /*relu_input=*/true, Epilogue<T>{bias(w.feedback_bias), nullptr, false});

  at::Tensor logits = at::empty({batch, 2, height, width}, features.options());
  std::vector<int64_t> used(batch, iterations);
  at::Tensor probabilities = previous.has_value() ? previous->contiguous() : at::zeros_like(logits);
  at::Tensor active_x = x, current;
  std::vector<int64_t> active(batch);
  std::iota(active.begin(), active.end(), 0);
  const auto index_options = features.options().dtype(at::kLong);

  for (int64_t t = 1; t <= iterations; ++t) {
    const int64_t n = static_cast<int64_t>(active.size());

    // h = X + R1([X, y]): the hoisted feature term plus the probabilities' small convolution, then conv2.
    at::Tensor hidden = at::empty_like(active_x);
    pixel_loop(n * pixels, [&](int64_t begin, int64_t end) {
      kernels::feedback<T>(feature_term.data_ptr<T>(), probabilities.data_ptr<T>(),
                           probability_half.data_ptr<T>(), channels, height, width, hidden.data_ptr<T>(),
                           begin, end);
    });
    at::Tensor h = convolve<T>(feedback2, hidden, false,
                               Epilogue<T>{bias(w.feedback2_bias), active_x.data_ptr<T>(), false});
    // h += R2(h); h += R3(h)
    for (int j = 0; j < 4; j += 2) {
      hidden = convolve<T>(residual[j], h, true, Epilogue<T>{bias(w.residual_bias[j]), nullptr, true});
      h = convolve<T>(residual[j + 1], hidden, false,
                      Epilogue<T>{bias(w.residual_bias[j + 1]), h.data_ptr<T>(), false});
    }

    // ASPP: the pooling branch is constant over the image, so it enters as a per-sample projection bias;
    // the other branches write side by side into one map, which the projection reads as one GEMM.
    const at::Tensor pooled = at::relu(at::addmm(w.pool_bias, h.mean({1, 2}), pool_matrix.t()));
    const at::Tensor sample_bias = at::addmm(w.project_bias, pooled, project_pool.t()).contiguous();
    at::Tensor stacked = at::empty({n, height, width, branches * channels}, features.options());
    const int64_t stride = branches * channels;
    const at::Tensor point = at::mm(h.view({n * pixels, channels}), point_matrix.t());
    pixel_loop(n * pixels, [&](int64_t begin, int64_t end) {
      kernels::bias_activation<T>(point.data_ptr<T>(), bias(w.point_bias), nullptr, true, channels,
                                  stacked.data_ptr<T>(), stride, begin, end);
    });
    for (size_t j = 0; j < dilated.size(); ++j) {
      run<T>(dilated[j], h, false, Epilogue<T>{bias(w.dilated_bias[j]), nullptr, true},
             stacked.data_ptr<T>() + (1 + j) * channels, stride);
    }
    const at::Tensor projected = at::mm(stacked.view({n * pixels, stride}), project_branches.t());
    at::Tensor next = at::empty({n, 2, height, width}, features.options());
    pixel_loop(n * pixels, [&](int64_t begin, int64_t end) {
      kernels::project_classify<T>(projected.data_ptr<T>(), sample_bias.data_ptr<T>(),
                                   classifier.data_ptr<T>(), w.classifier_bias.data_ptr<T>(), channels,
                                   pixels, next.data_ptr<T>(), begin, end);
    });
    write_active_rows(logits, next, active);
    if (t == iterations) break;

    // Early exit: samples whose mask barely moved since the last iteration keep these logits.
    if (exit_fraction > 0 && t >= 2) {
      std::vector<int64_t> changed(n);
      kernels::count_changes<T>(next.data_ptr<T>(), current.data_ptr<T>(), pixels, changed.data(), 0, n);
      const std::vector<int64_t> keep =
          drop_converged(changed.data(), n, exit_fraction, pixels, t, used, active);
      if (keep.empty()) break;
      select_rows(keep, n, {&active_x, &feature_term, &next});
    }
    current = next;
    probabilities = at::empty_like(current);
    kernels::softmax2<T>(current.data_ptr<T>(), pixels, probabilities.data_ptr<T>(), 0, current.size(0));
  }
  return {logits, at::tensor(used, index_options)};
}

std::tuple<at::Tensor, at::Tensor> refine_loop_cpu(const at::Tensor& features,
                                                   const c10::optional<at::Tensor>& previous,
                                                   at::TensorList weights, at::IntArrayRef dilations,
                                                   int64_t iterations, double exit_fraction,
                                                   bool /*cudnn_epilogues: no cuDNN on a CPU*/) {
  check_loop_arguments(iterations, exit_fraction);
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "crnet::refine_loop on CPU takes float32 or float64, got " + text(features.scalar_type()));
  const RefineWeights w = unpack_weights(features, previous, weights, dilations);
  return AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "crnet::refine_loop", [&] {
    return refine_loop_typed<scalar_t>(features, previous, w, iterations, exit_fraction);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(crnet, CPU, m) { m.impl("refine_loop", &refine_loop_cpu); }

}  // namespace crnet::ops
