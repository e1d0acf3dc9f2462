// The channels-last path of crnet::refine_loop on CUDA (float32, float16; channels a multiple of one
// 16-byte pack). Same contract as the op: logits (N, 2, H, W) contiguous and the iterations each sample used.
// cudnn_epilogues: the convolutions that end in a ReLU run as cuDNN's fused convolution-bias-ReLU.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "refine_weights.h"

namespace crnet::ops {

template <typename T>
std::tuple<at::Tensor, at::Tensor> refine_loop_cuda_nhwc(const at::Tensor& features,
                                                         const c10::optional<at::Tensor>& previous,
                                                         const RefineWeights& w, int64_t iterations,
                                                         double exit_fraction, bool cudnn_epilogues);

}  // namespace crnet::ops
