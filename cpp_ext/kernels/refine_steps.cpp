#include "refine_steps.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace crnet::kernels {

template <typename T>
void softmax2(const T* logits, int64_t pixels, T* probabilities, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const T* l0 = logits + n * 2 * pixels;
    const T* l1 = l0 + pixels;
    T* p0 = probabilities + n * 2 * pixels;
    T* p1 = p0 + pixels;
    for (int64_t p = 0; p < pixels; ++p) {
      const T top = std::max(l0[p], l1[p]);  // as torch.softmax: shift by the max, then normalise
      const T e0 = std::exp(l0[p] - top), e1 = std::exp(l1[p] - top);
      const T sum = e0 + e1;
      p0[p] = e0 / sum;
      p1[p] = e1 / sum;
    }
  }
}

template <typename T>
void feedback(const T* feature_term, const T* probabilities, const T* weight, int channels, int height,
              int width, T* out, int64_t begin, int64_t end) {
  const int64_t pixels = static_cast<int64_t>(height) * width;
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t n = plane / channels, k = plane % channels;
    const T* base = feature_term + plane * pixels;
    T* dst = out + plane * pixels;
    std::copy(base, base + pixels, dst);
    for (int c = 0; c < 2; ++c) {
      const T* prob = probabilities + (n * 2 + c) * pixels;
      const T* w = weight + (k * 2 + c) * 9;
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          const T tap = w[i * 3 + j];
          const int dy = i - 1, dx = j - 1;
          const int y_lo = std::max(0, -dy), y_hi = std::min(height, height - dy);
          const int x_lo = std::max(0, -dx), x_hi = std::min(width, width - dx);
          for (int y = y_lo; y < y_hi; ++y) {
            const T* src = prob + static_cast<int64_t>(y + dy) * width + dx;
            T* row = dst + static_cast<int64_t>(y) * width;
            for (int x = x_lo; x < x_hi; ++x) row[x] += tap * std::max(src[x], T(0));
          }
        }
      }
    }
    for (int64_t p = 0; p < pixels; ++p) dst[p] = std::max(dst[p], T(0));
  }
}

template <typename T>
void bias_activation(const T* src, const T* bias, const T* residual, bool relu, int channels,
                     int64_t pixels, T* dst, int64_t dst_batch_stride, int64_t begin, int64_t end) {
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t n = plane / channels, k = plane % channels;
    const T* in = src + plane * pixels;
    const T* skip = residual ? residual + plane * pixels : nullptr;
    T* out = dst + n * dst_batch_stride + k * pixels;
    const T b = bias ? bias[k] : T(0);
    for (int64_t p = 0; p < pixels; ++p) {
      T value = in[p] + b;
      if (skip) value += skip[p];
      out[p] = relu && value < T(0) ? T(0) : value;
    }
  }
}

template <typename T>
void project_classify(const T* projected, const T* bias, const T* classifier, const T* classifier_bias,
                      int channels, int64_t pixels, T* logits, int64_t begin, int64_t end) {
  const int64_t blocks = (pixels + kPixelBlock - 1) / kPixelBlock;
  T first[kPixelBlock], second[kPixelBlock];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / blocks, p0 = (item % blocks) * kPixelBlock;
    const int64_t count = std::min(kPixelBlock, pixels - p0);
    std::fill(first, first + count, classifier_bias[0]);
    std::fill(second, second + count, classifier_bias[1]);
    for (int c = 0; c < channels; ++c) {
      const T* in = projected + (n * channels + c) * pixels + p0;
      const T b = bias[n * channels + c], w0 = classifier[c], w1 = classifier[channels + c];
      for (int64_t p = 0; p < count; ++p) {
        const T value = std::max(in[p] + b, T(0));
        first[p] += w0 * value;
        second[p] += w1 * value;
      }
    }
    std::copy(first, first + count, logits + n * 2 * pixels + p0);
    std::copy(second, second + count, logits + (n * 2 + 1) * pixels + p0);
  }
}

template <typename T>
void count_changes(const T* logits, const T* previous_logits, int64_t pixels, int64_t* counts,
                   int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const T* now = logits + n * 2 * pixels;
    const T* before = previous_logits + n * 2 * pixels;
    int64_t changed = 0;
    for (int64_t p = 0; p < pixels; ++p) {
      changed += (now[pixels + p] > now[p]) != (before[pixels + p] > before[p]);
    }
    counts[n] = changed;
  }
}

#define CRNET_INSTANTIATE(T)                                                                             \
  template void softmax2<T>(const T*, int64_t, T*, int64_t, int64_t);                                    \
  template void feedback<T>(const T*, const T*, const T*, int, int, int, T*, int64_t, int64_t);           \
  template void bias_activation<T>(const T*, const T*, const T*, bool, int, int64_t, T*, int64_t, int64_t, \
                                   int64_t);                                                              \
  template void project_classify<T>(const T*, const T*, const T*, const T*, int, int64_t, T*, int64_t,    \
                                    int64_t);                                                             \
  template void count_changes<T>(const T*, const T*, int64_t, int64_t*, int64_t, int64_t);
CRNET_INSTANTIATE(float)
CRNET_INSTANTIATE(double)
#undef CRNET_INSTANTIATE

}  // namespace crnet::kernels
