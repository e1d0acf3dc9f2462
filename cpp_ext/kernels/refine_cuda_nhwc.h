// The channels-last (NHWC) kernels of the refinement loop's CUDA backend, for float16 and float32 tensors
// whose channel count is a multiple of one 16-byte pack (8 halves, 4 floats). A thread moves whole packs,
// so every load and store is 16 bytes wide and a warp reads consecutive memory; cuDNN's NHWC convolutions
// between these kernels need no layout conversion. Arithmetic is in float. Feature maps are (N, H, W, K)
// rows of K channels; the 2-channel logits stay NCHW (N, 2, H, W), the layout the op returns.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace crnet::kernels::cuda {

// Channels per 16-byte pack of T; a channel count must be a multiple of it.
template <typename T>
inline constexpr int kPackChannels = 16 / static_cast<int>(sizeof(T));

// out = relu(feature_term + conv3x3(softmax(logits) or probabilities, weight)), NHWC in and out; logits and
// probabilities (N, 2, H, W), at most one non-null (neither: the first iteration from zeros); weight
// (2, 3, 3, K) contiguous, tap-major: one tap's weights for a pack of channels are one 16-byte load.
template <typename T>
cudaError_t feedback_nhwc(const T* feature_term, const T* logits, const T* probabilities, const T* weight,
                          int batch, int channels, int height, int width, T* out, cudaStream_t stream);

// For each of `rows` pixels: dst = act(src + bias (+ residual)); src and residual rows of K channels
// packed; dst rows `dst_row_stride` elements apart (a channel slice of a wider map), and relu(dst) into
// dst_relu (packed) when it is non-null.
template <typename T>
cudaError_t bias_activation_nhwc(const T* src, const T* bias, const T* residual, bool relu, int64_t rows,
                                 int channels, T* dst, int64_t dst_row_stride, T* dst_relu, cudaStream_t stream);

// logits[n, o, p] = classifier_bias[o] + sum_c classifier[o, c] * relu(projected[n, p, c] + bias[n, c]):
// one warp per pixel, logits NCHW.
template <typename T>
cudaError_t project_classify_nhwc(const T* projected, const T* bias, const T* classifier,
                                  const T* classifier_bias, int batch, int channels, int64_t pixels, T* logits,
                                  cudaStream_t stream);

}  // namespace crnet::kernels::cuda
