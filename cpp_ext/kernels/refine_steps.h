// The small per-pixel steps of the refinement loop on raw pointers, no torch (CPU). Feature maps are
// channels-last (N, H, W, C), logits and probabilities (N, 2, H, W); each function works on the items
// [begin, end) of its stated work range, so the caller chooses the threading.
#pragma once

#include <cstdint>

namespace crnet::kernels {

// probabilities (N, 2, HW) = softmax over the two channels of logits (N, 2, HW); work range: N.
template <typename T>
void softmax2(const T* logits, int64_t pixels, T* probabilities, int64_t begin, int64_t end);

// The feedback step with the feature half of the first convolution hoisted out of the loop:
//   out = relu(feature_term + conv3x3(relu(probabilities), weight))
// feature_term and out (N, H, W, K) channels-last; probabilities (N, 2, H, W); weight (2, 3, 3, K), the
// probability half of the PyTorch weight permuted. Work range: the N * H * W pixels.
template <typename T>
void feedback(const T* feature_term, const T* probabilities, const T* weight, int channels, int height,
              int width, T* out, int64_t begin, int64_t end);

// dst = act(src + bias (+ residual)) per pixel: src and residual (pixels, K) contiguous, dst pixels
// `dst_pixel_stride` apart (a channel slice of a wider map). Work range: pixels.
template <typename T>
void bias_activation(const T* src, const T* bias, const T* residual, bool relu, int channels, T* dst,
                     int64_t dst_pixel_stride, int64_t begin, int64_t end);

// The ASPP projection's epilogue and the classifier in one pass:
//   logits[n, o, p] = classifier_bias[o] + sum_c classifier[o, c] * relu(projected[n, p, c] + bias[n, c])
// projected (N, HW, C) channels-last; bias (N, C) carries the projection bias plus the image-pooling
// branch, which is constant over the image; logits (N, 2, HW). Work range: the N * HW pixels.
template <typename T>
void project_classify(const T* projected, const T* bias, const T* classifier, const T* classifier_bias,
                      int channels, int64_t pixels, T* logits, int64_t begin, int64_t end);

// Per sample, the pixels whose mask (foreground iff logit 1 > logit 0) differs between two logit maps.
// Work range: N.
template <typename T>
void count_changes(const T* logits, const T* previous_logits, int64_t pixels, int64_t* counts,
                   int64_t begin, int64_t end);

}  // namespace crnet::kernels
