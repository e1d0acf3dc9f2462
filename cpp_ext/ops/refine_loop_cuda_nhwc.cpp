// crnet::refine_loop on CUDA, channels-last: the plan of the NCHW path (refine_loop_cuda.cpp: hoisted feature
// term, one feedback kernel, one epilogue per convolution, pooling as a projection bias, projection ReLU
// fused with the classifier) with every feature map NHWC, so that cuDNN runs its NHWC tensor-core kernels
// with no layout conversion and our kernels move 16-byte packs of channels. The 1x1 convolutions are plain
// GEMMs over (pixels, channels) rows. While a batch is too small to fill the GPU, the ASPP branches run side
// by side on the op's own streams (forked from and joined back into the caller's stream, so the call stays one
// capturable sequence for CUDA graphs). With cudnn_epilogues the convolutions that end in a ReLU (the first of
// each residual block, the ASPP branches) are cuDNN's fused convolution-bias-ReLU kernels, no epilogue kernel
// after them; the branches then write maps of their own, concatenated for the projection.
#include "refine_loop_cuda_nhwc.h"

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <exception>
#include <functional>
#include <numeric>
#include <vector>

#include "../kernels/refine_cuda.h"
#include "../kernels/refine_cuda_nhwc.h"
#include "cuda_tensors.h"
#include "early_exit.h"

namespace crnet::ops {
namespace {

namespace k = kernels::cuda;
constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;
// Up to this many pixels in the batch (four samples of 41 x 41) one 3x3 convolution leaves most of an
// H100's SMs idle, so the ASPP branches run concurrently.
constexpr int64_t kConcurrentPixels = 8192;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Item i of this thread's list of CUDA handles for the current device, created on first use and kept:
// nothing is destroyed while a capture that recorded it may still be open.
template <typename Handle, typename Create>
Handle pooled(std::vector<std::vector<Handle>>& lists, size_t i, Create create) {
  const auto device = static_cast<size_t>(c10::cuda::current_device());
  if (lists.size() <= device) lists.resize(device + 1);
  auto& list = lists[device];
  while (list.size() <= i) {
    Handle handle;
    check(create(&handle));
    list.push_back(handle);
  }
  return list[i];
}

// A wait takes an event's latest record at the time, so the same events serve every call.
cudaEvent_t pooled_event(size_t i) {
  static thread_local std::vector<std::vector<cudaEvent_t>> events;
  return pooled(events, i, [](cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDisableTiming); });
}

// The op's own side streams, not torch's pool (which user code and graph captures also draw from).
c10::cuda::CUDAStream side_stream(size_t i) {
  static thread_local std::vector<std::vector<cudaStream_t>> streams;
  const cudaStream_t stream =
      pooled(streams, i, [](cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamNonBlocking); });
  return c10::cuda::getStreamFromExternal(stream, c10::cuda::current_device());
}

// Runs work[0] on the caller's stream and the others on side streams that start after everything already
// queued on it; the caller's stream then waits for all of them, also when a branch throws (an unjoined
// stream would otherwise break a capture in progress with a message that hides the error).
void run_side_by_side(const std::vector<std::function<void()>>& work) {
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  check(cudaEventRecord(pooled_event(0), main.stream()));
  std::exception_ptr failure;
  auto attempt = [&](const std::function<void()>& branch) {
    try {
      branch();
    } catch (...) {
      if (!failure) failure = std::current_exception();
    }
  };
  for (size_t j = 1; j < work.size(); ++j) {
    const c10::cuda::CUDAStream side = side_stream(j - 1);
    check(cudaStreamWaitEvent(side.stream(), pooled_event(0), 0));
    {
      const c10::cuda::CUDAStreamGuard guard(side);
      attempt(work[j]);
    }
    check(cudaEventRecord(pooled_event(j), side.stream()));
  }
  attempt(work[0]);
  for (size_t j = 1; j < work.size(); ++j) check(cudaStreamWaitEvent(main.stream(), pooled_event(j), 0));
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

template <typename T>
std::tuple<at::Tensor, at::Tensor> refine_loop_cuda_nhwc(const at::Tensor& features,
                                                         const c10::optional<at::Tensor>& previous,
                                                         const RefineWeights& w, int64_t iterations,
                                                         double exit_fraction, bool cudnn_epilogues) {
  using Scalar = typename Raw<T>::type;
  const at::Tensor x = features.contiguous(kChannelsLast);
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t pixels = height * width;
  const int64_t branches = 1 + static_cast<int64_t>(w.dilations.size());
  const at::Tensor none;

  // dst rows (dst_row_stride apart) = epilogue(conv), conv an NHWC map or (pixels, channels) rows.
  auto epilogue = [&](const at::Tensor& conv, const at::Tensor& bias, const at::Tensor& residual, bool relu,
                      Scalar* dst, int64_t dst_row_stride, const at::Tensor& dst_relu) {
    check(k::bias_activation_nhwc(ptr<T>(conv), ptr<T>(bias), ptr<T>(residual), relu, conv.numel() / channels,
                                  static_cast<int>(channels), dst, dst_row_stride, ptr<T>(dst_relu),
                                  current_stream()));
  };
  auto conv3x3 = [](const at::Tensor& input, const at::Tensor& weight, int64_t dilation) {
    return at::conv2d(input, weight, {}, 1, dilation, dilation).contiguous(kChannelsLast);
  };
  auto data = [](const at::Tensor& t) { return ptr<T>(t); };
  // relu(conv(input) + bias) as one cuDNN kernel, channels-last out.
  auto conv_relu = [](const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, int64_t padding,
                      int64_t dilation) {
    return at::cudnn_convolution_relu(input, weight, bias, {1, 1}, {padding, padding}, {dilation, dilation}, 1)
        .contiguous(kChannelsLast);
  };

  // Once per call: the feature term of the first feedback convolution, and the 1x1 weights as matrices.
  const at::Tensor feature_weight = w.feedback_weight.narrow(1, 0, channels).contiguous(kChannelsLast);
  // Tap-major, (2, 3, 3, K): a thread reads one tap's weights for its pack of channels with one coalesced load.
  const at::Tensor probability_weight = w.feedback_weight.narrow(1, channels, 2).permute({1, 2, 3, 0}).contiguous();
  at::Tensor feature_term = at::empty_like(x);
  epilogue(conv3x3(x.relu(), feature_weight, 1), w.feedback_bias, none, false, data(feature_term), channels, none);
  const at::Tensor pool_matrix = w.pool_weight.reshape({channels, channels});
  const at::Tensor point_matrix = w.point_weight.reshape({channels, channels});
  const at::Tensor project = w.project_weight.reshape({channels, (1 + branches) * channels});
  const at::Tensor project_pool = project.narrow(1, 0, channels);
  const at::Tensor project_branches = project.narrow(1, channels, branches * channels).contiguous();
  const at::Tensor classifier = w.classifier_weight.reshape({2, channels}).contiguous();

  at::Tensor logits = at::empty({batch, 2, height, width}, x.options());
  std::vector<int64_t> used(batch, iterations), active(batch);
  std::iota(active.begin(), active.end(), 0);
  at::Tensor active_x = x, current, start = previous.has_value() ? previous->contiguous() : at::Tensor();
  at::Tensor counts = at::empty({batch}, x.options().dtype(at::kInt));

  for (int64_t t = 1; t <= iterations; ++t) {
    const int64_t n = static_cast<int64_t>(active.size());
    at::Tensor hidden = at::empty_like(active_x);
    check(k::feedback_nhwc(data(feature_term), t == 1 ? nullptr : data(current), t == 1 ? data(start) : nullptr,
                           data(probability_weight), static_cast<int>(n), static_cast<int>(channels),
                           static_cast<int>(height), static_cast<int>(width), data(hidden), current_stream()));
    at::Tensor h = at::empty_like(active_x), h_relu = at::empty_like(active_x);
    epilogue(conv3x3(hidden, w.feedback2_weight, 1), w.feedback2_bias, active_x, false, data(h), channels, h_relu);
    for (int j = 0; j < 4; j += 2) {
      if (cudnn_epilogues) {
        hidden = conv_relu(h_relu, w.residual_weight[j], w.residual_bias[j], 1, 1);
      } else {
        epilogue(conv3x3(h_relu, w.residual_weight[j], 1), w.residual_bias[j], none, true, data(hidden), channels,
                 none);
      }
      at::Tensor next_h = at::empty_like(h), next_relu = j == 0 ? at::empty_like(h) : at::Tensor();
      epilogue(conv3x3(hidden, w.residual_weight[j + 1], 1), w.residual_bias[j + 1], h, false, data(next_h),
               channels, next_relu);
      h = next_h;
      h_relu = next_relu;
    }

    // ASPP: the pooling branch as a per-sample projection bias; the other branches write their channel slice
    // of each pixel's row, so no concatenation (with cuDNN's epilogues, one concatenation of their maps).
    const at::Tensor pooled = at::relu(at::addmm(w.pool_bias, h.mean({2, 3}), pool_matrix.t()));
    const at::Tensor sample_bias = at::addmm(w.project_bias, pooled, project_pool.t()).contiguous();
    at::Tensor stacked = at::empty({n * pixels, branches * channels}, x.options());
    const at::Tensor rows = h.permute({0, 2, 3, 1}).reshape({n * pixels, channels});  // a view: h is NHWC
    std::vector<at::Tensor> maps(branches);  // with cudnn_epilogues: each branch's own NHWC map
    std::vector<std::function<void()>> work{[&] {
      if (cudnn_epilogues) {
        maps[0] = conv_relu(h, w.point_weight, w.point_bias, 0, 1);
      } else {
        epilogue(at::matmul(rows, point_matrix.t()), w.point_bias, none, true, data(stacked), branches * channels,
                 none);
      }
    }};
    for (size_t j = 0; j < w.dilations.size(); ++j) {
      work.push_back([&, j] {
        if (cudnn_epilogues) {
          maps[1 + j] = conv_relu(h, w.dilated_weight[j], w.dilated_bias[j], w.dilations[j], w.dilations[j]);
        } else {
          epilogue(conv3x3(h, w.dilated_weight[j], w.dilations[j]), w.dilated_bias[j], none, true,
                   data(stacked) + (1 + j) * channels, branches * channels, none);
        }
      });
    }
    if (n * pixels <= kConcurrentPixels) {
      run_side_by_side(work);
    } else {
      for (const auto& branch : work) branch();
    }
    if (cudnn_epilogues) {  // NHWC maps side by side in each pixel's row: (n * pixels, branches * channels)
      std::vector<at::Tensor> pixel_major;
      for (const auto& map : maps) pixel_major.push_back(map.permute({0, 2, 3, 1}));  // views: maps are NHWC
      at::Tensor out = stacked.view({n, height, width, branches * channels});
      at::cat_out(out, pixel_major, 3);
    }
    const at::Tensor projected = at::matmul(stacked, project_branches.t());  // (n * pixels, channels)
    at::Tensor next = at::empty({n, 2, height, width}, x.options());
    check(k::project_classify_nhwc(data(projected), data(sample_bias), data(classifier), data(w.classifier_bias),
                                   static_cast<int>(n), static_cast<int>(channels), pixels, data(next),
                                   current_stream()));
    write_active_rows(logits, next, active);
    if (t == iterations) break;

    if (exit_fraction > 0 && t >= 2) {
      check(k::count_changes(data(next), data(current), static_cast<int>(n), pixels, counts.data_ptr<int>(),
                             current_stream()));
      // The one host round trip of early exit.
      const at::Tensor changed = counts.narrow(0, 0, n).to(at::kLong).cpu();
      const std::vector<int64_t> keep =
          drop_converged(changed.data_ptr<int64_t>(), n, exit_fraction, pixels, t, used, active);
      if (keep.empty()) break;
      select_rows(keep, n, {&active_x, &feature_term, &next});
      active_x = active_x.contiguous(kChannelsLast);  // row selection may hand back NCHW
      feature_term = feature_term.contiguous(kChannelsLast);
    }
    current = next;
  }
  if (exit_fraction == 0) return {logits, at::full({batch}, iterations, x.options().dtype(at::kLong))};
  return {logits, at::tensor(used, at::TensorOptions().dtype(at::kLong)).to(x.device())};
}

template std::tuple<at::Tensor, at::Tensor> refine_loop_cuda_nhwc<float>(const at::Tensor&,
                                                                         const c10::optional<at::Tensor>&,
                                                                         const RefineWeights&, int64_t, double,
                                                                         bool);
template std::tuple<at::Tensor, at::Tensor> refine_loop_cuda_nhwc<at::Half>(const at::Tensor&,
                                                                            const c10::optional<at::Tensor>&,
                                                                            const RefineWeights&, int64_t, double,
                                                                            bool);

}  // namespace crnet::ops
