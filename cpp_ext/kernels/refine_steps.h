// The small per-pixel steps of the refinement loop on raw pointers, no torch (CPU). All tensors are
// contiguous NCHW; each function works on the rows [begin, end) of its stated work range, so the caller
// chooses the threading.
#pragma once

#include <cstdint>

namespace crnet::kernels {

// probabilities (N, 2, HW) = softmax over the two channels of logits (N, 2, HW); work range: N.
template <typename T>
void softmax2(const T* logits, int64_t pixels, T* probabilities, int64_t begin, int64_t end);

// The feedback step with the feature half of the first convolution hoisted out of the loop:
//   out = relu(feature_term + conv3x3(relu(probabilities), weight) )
// feature_term (N, K, H, W) holds conv3x3(relu(X), W_features) + bias, computed once per query;
// weight (K, 2, 3, 3) is the probability half. Work range: N * K planes.
template <typename T>
void feedback(const T* feature_term, const T* probabilities, const T* weight, int channels, int height,
              int width, T* out, int64_t begin, int64_t end);

// dst = act(src + bias[k] (+ residual)); planes of HW pixels, src contiguous (N, K, HW), dst samples
// `dst_batch_stride` apart. Work range: N * K planes.
template <typename T>
void bias_activation(const T* src, const T* bias, const T* residual, bool relu, int channels,
                     int64_t pixels, T* dst, int64_t dst_batch_stride, int64_t begin, int64_t end);

// The ASPP projection's epilogue and the classifier in one pass:
//   logits[n, o, p] = classifier_bias[o] + sum_c classifier[o, c] * relu(projected[n, c, p] + bias[n, c])
// bias (N, C) carries the projection bias plus the image-pooling branch, which is constant over the image.
// Work range: N * ceil(HW / kPixelBlock) blocks.
constexpr int64_t kPixelBlock = 256;
template <typename T>
void project_classify(const T* projected, const T* bias, const T* classifier, const T* classifier_bias,
                      int channels, int64_t pixels, T* logits, int64_t begin, int64_t end);

// Per sample, the pixels whose mask (foreground iff logit 1 > logit 0) differs between two logit maps.
// Work range: N.
template <typename T>
void count_changes(const T* logits, const T* previous_logits, int64_t pixels, int64_t* counts,
                   int64_t begin, int64_t end);

}  // namespace crnet::kernels
