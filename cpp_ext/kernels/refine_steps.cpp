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
  for (int64_t pixel = begin; pixel < end; ++pixel) {
    const int64_t n = pixel / pixels, p = pixel % pixels;
    const int y = static_cast<int>(p / width), x = static_cast<int>(p % width);
    const T* base = feature_term + pixel * channels;
    T* dst = out + pixel * channels;
    std::copy(base, base + channels, dst);
    for (int c = 0; c < 2; ++c) {
      const T* prob = probabilities + (n * 2 + c) * pixels;
      for (int i = 0; i < 3; ++i) {
        const int yy = y + i - 1;
        if (yy < 0 || yy >= height) continue;
        for (int j = 0; j < 3; ++j) {
          const int xx = x + j - 1;
          if (xx < 0 || xx >= width) continue;
          const T value = std::max(prob[static_cast<int64_t>(yy) * width + xx], T(0));
          const T* w = weight + ((c * 3 + i) * 3 + j) * channels;
#pragma GCC ivdep
          for (int k = 0; k < channels; ++k) dst[k] += value * w[k];
        }
      }
    }
#pragma GCC ivdep
    for (int k = 0; k < channels; ++k) dst[k] = std::max(dst[k], T(0));
  }
}

template <typename T>
void bias_activation(const T* src, const T* bias, const T* residual, bool relu, int channels, T* dst,
                     int64_t dst_pixel_stride, int64_t begin, int64_t end) {
  for (int64_t pixel = begin; pixel < end; ++pixel) {
    const T* in = src + pixel * channels;
    const T* skip = residual ? residual + pixel * channels : nullptr;
    T* out = dst + pixel * dst_pixel_stride;
#pragma GCC ivdep
    for (int k = 0; k < channels; ++k) {
      const T value = in[k] + (bias ? bias[k] : T(0)) + (skip ? skip[k] : T(0));
      out[k] = relu ? std::max(value, T(0)) : value;
    }
  }
}

template <typename T>
void project_classify(const T* projected, const T* bias, const T* classifier, const T* classifier_bias,
                      int channels, int64_t pixels, T* logits, int64_t begin, int64_t end) {
  for (int64_t pixel = begin; pixel < end; ++pixel) {
    const int64_t n = pixel / pixels, p = pixel % pixels;
    const T* in = projected + pixel * channels;
    const T* b = bias + n * channels;
    T first = classifier_bias[0], second = classifier_bias[1];
    for (int c = 0; c < channels; ++c) {
      const T value = std::max(in[c] + b[c], T(0));
      first += classifier[c] * value;
      second += classifier[channels + c] * value;
    }
    logits[n * 2 * pixels + p] = first;
    logits[(n * 2 + 1) * pixels + p] = second;
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
  template void bias_activation<T>(const T*, const T*, const T*, bool, int, T*, int64_t, int64_t,         \
                                   int64_t);                                                              \
  template void project_classify<T>(const T*, const T*, const T*, const T*, int, int64_t, T*, int64_t,    \
                                    int64_t);                                                             \
  template void count_changes<T>(const T*, const T*, int64_t, int64_t*, int64_t, int64_t);
CRNET_INSTANTIATE(float)
CRNET_INSTANTIATE(double)
#undef CRNET_INSTANTIATE

}  // namespace crnet::kernels
