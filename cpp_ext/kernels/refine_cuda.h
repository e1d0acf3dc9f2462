// CUDA kernels of the refinement loop on raw pointers and a stream, no torch. T is float or __half;
// arithmetic is in float. Tensors are contiguous NCHW unless a stride says otherwise. Each launcher
// returns cudaGetLastError() of its launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace crnet::kernels::cuda {

// out = relu(feature_term + conv3x3(softmax(logits) or probabilities, weight)): the whole feedback step in
// one kernel. Exactly one of `logits` / `probabilities` is non-null (the first iteration starts from
// given probabilities or zeros). feature_term (N, K, H, W); weight (K, 2, 3, 3).
template <typename T>
cudaError_t feedback(const T* feature_term, const T* logits, const T* probabilities, const T* weight,
                     int batch, int channels, int height, int width, T* out, cudaStream_t stream);

// dst = act(src + bias[k] (+ residual)), and relu(dst) into dst_relu when it is non-null (the next
// residual branch starts with a ReLU). dst samples are `dst_batch_stride` apart.
template <typename T>
cudaError_t bias_activation(const T* src, const T* bias, const T* residual, bool relu, int batch,
                            int channels, int64_t pixels, T* dst, int64_t dst_batch_stride, T* dst_relu,
                            cudaStream_t stream);

// logits[n, o, p] = classifier_bias[o] + sum_c classifier[o, c] * relu(projected[n, c, p] + bias[n, c]).
template <typename T>
cudaError_t project_classify(const T* projected, const T* bias, const T* classifier,
                             const T* classifier_bias, int batch, int channels, int64_t pixels, T* logits,
                             cudaStream_t stream);

// counts[n] = pixels whose mask (logit 1 > logit 0) differs between the two maps; counts zeroed first.
template <typename T>
cudaError_t count_changes(const T* logits, const T* previous_logits, int batch, int64_t pixels,
                          int* counts, cudaStream_t stream);

}  // namespace crnet::kernels::cuda
