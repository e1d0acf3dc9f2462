#include <cuda_fp16.h>

#include "launch.cuh"
#include "refine_cuda.h"

namespace crnet::kernels::cuda {
namespace {

constexpr int kBlock = 16;  // feedback: a 16x16 pixel tile per block, its 18x18 halo in shared memory

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

template <typename T>
__global__ void feedback_kernel(const T* __restrict__ feature_term, const T* __restrict__ logits,
                                const T* __restrict__ probabilities, const T* __restrict__ weight,
                                int channels, int height, int width, T* __restrict__ out) {
  __shared__ float prob[2][kBlock + 2][kBlock + 2];
  const int n = blockIdx.z;
  const int x0 = blockIdx.x * kBlock, y0 = blockIdx.y * kBlock;
  const int64_t pixels = static_cast<int64_t>(height) * width;
  // The softmax of the tile and its halo, once per block (zero outside the image: the convolution pads).
  for (int i = threadIdx.y * kBlock + threadIdx.x; i < (kBlock + 2) * (kBlock + 2); i += kBlock * kBlock) {
    const int ty = i / (kBlock + 2), tx = i % (kBlock + 2);
    const int y = y0 + ty - 1, x = x0 + tx - 1;
    float p0 = 0.f, p1 = 0.f;
    if (y >= 0 && y < height && x >= 0 && x < width) {
      const int64_t at = static_cast<int64_t>(y) * width + x;
      if (logits != nullptr) {
        const float l0 = load(logits + n * 2 * pixels + at), l1 = load(logits + (n * 2 + 1) * pixels + at);
        const float top = fmaxf(l0, l1), e0 = __expf(l0 - top), e1 = __expf(l1 - top);
        p0 = e0 / (e0 + e1);
        p1 = e1 / (e0 + e1);
      } else if (probabilities != nullptr) {
        p0 = fmaxf(load(probabilities + n * 2 * pixels + at), 0.f);
        p1 = fmaxf(load(probabilities + (n * 2 + 1) * pixels + at), 0.f);
      }
    }
    prob[0][ty][tx] = p0;
    prob[1][ty][tx] = p1;
  }
  __syncthreads();
  const int x = x0 + threadIdx.x, y = y0 + threadIdx.y;
  if (x >= width || y >= height) return;
  const int64_t at = static_cast<int64_t>(y) * width + x;
  for (int k = 0; k < channels; ++k) {
    const T* w = weight + k * 18;
    float acc = load(feature_term + (static_cast<int64_t>(n) * channels + k) * pixels + at);
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int i = 0; i < 3; ++i)
#pragma unroll
        for (int j = 0; j < 3; ++j) acc += load(w + c * 9 + i * 3 + j) * prob[c][threadIdx.y + i][threadIdx.x + j];
    store(out + (static_cast<int64_t>(n) * channels + k) * pixels + at, fmaxf(acc, 0.f));
  }
}

template <typename T>
__global__ void bias_activation_kernel(const T* __restrict__ src, const T* __restrict__ bias,
                                       const T* __restrict__ residual, bool relu, int channels,
                                       int64_t pixels, int64_t total, T* __restrict__ dst,
                                       int64_t dst_batch_stride, T* __restrict__ dst_relu) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = i / pixels, p = i % pixels;
    const int64_t n = plane / channels, k = plane % channels;
    float value = load(src + i);
    if (bias != nullptr) value += load(bias + k);
    if (residual != nullptr) value += load(residual + i);
    if (relu) value = fmaxf(value, 0.f);
    const int64_t at = n * dst_batch_stride + k * pixels + p;
    store(dst + at, value);
    if (dst_relu != nullptr) store(dst_relu + i, fmaxf(value, 0.f));
  }
}

template <typename T>
__global__ void project_classify_kernel(const T* __restrict__ projected, const T* __restrict__ bias,
                                        const T* __restrict__ classifier, const T* __restrict__ classifier_bias,
                                        int channels, int64_t pixels, T* __restrict__ logits) {
  const int n = blockIdx.y;
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= pixels) return;
  float first = load(classifier_bias), second = load(classifier_bias + 1);
  for (int c = 0; c < channels; ++c) {
    const float value =
        fmaxf(load(projected + (static_cast<int64_t>(n) * channels + c) * pixels + p) + load(bias + n * channels + c), 0.f);
    first += load(classifier + c) * value;
    second += load(classifier + channels + c) * value;
  }
  store(logits + n * 2 * pixels + p, first);
  store(logits + (n * 2 + 1) * pixels + p, second);
}

template <typename T>
__global__ void count_changes_kernel(const T* __restrict__ logits, const T* __restrict__ previous, int64_t pixels,
                                     int* __restrict__ counts) {
  const int n = blockIdx.y;
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int changed = 0;
  if (p < pixels) {
    const T* now = logits + n * 2 * pixels;
    const T* before = previous + n * 2 * pixels;
    changed = (load(now + pixels + p) > load(now + p)) != (load(before + pixels + p) > load(before + p));
  }
  // Warp sum, then one atomic per warp.
  for (int offset = 16; offset > 0; offset /= 2) changed += __shfl_down_sync(0xffffffffu, changed, offset);
  if ((threadIdx.x & 31) == 0 && changed != 0) atomicAdd(counts + n, changed);
}

}  // namespace

template <typename T>
cudaError_t feedback(const T* feature_term, const T* logits, const T* probabilities, const T* weight,
                     int batch, int channels, int height, int width, T* out, cudaStream_t stream) {
  const dim3 grid((width + kBlock - 1) / kBlock, (height + kBlock - 1) / kBlock, batch);
  feedback_kernel<T><<<grid, dim3(kBlock, kBlock), 0, stream>>>(feature_term, logits, probabilities, weight,
                                                                channels, height, width, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_activation(const T* src, const T* bias, const T* residual, bool relu, int batch,
                            int channels, int64_t pixels, T* dst, int64_t dst_batch_stride, T* dst_relu,
                            cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(batch) * channels * pixels;
  bias_activation_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(src, bias, residual, relu, channels,
                                                                         pixels, total, dst, dst_batch_stride,
                                                                         dst_relu);
  return cudaGetLastError();
}

template <typename T>
cudaError_t project_classify(const T* projected, const T* bias, const T* classifier,
                             const T* classifier_bias, int batch, int channels, int64_t pixels, T* logits,
                             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((pixels + kThreads - 1) / kThreads), batch);
  project_classify_kernel<T><<<grid, kThreads, 0, stream>>>(projected, bias, classifier, classifier_bias,
                                                            channels, pixels, logits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t count_changes(const T* logits, const T* previous_logits, int batch, int64_t pixels,
                          int* counts, cudaStream_t stream) {
  cudaError_t status = cudaMemsetAsync(counts, 0, sizeof(int) * batch, stream);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>((pixels + kThreads - 1) / kThreads), batch);
  count_changes_kernel<T><<<grid, kThreads, 0, stream>>>(logits, previous_logits, pixels, counts);
  return cudaGetLastError();
}

#define CRNET_INSTANTIATE(T)                                                                                \
  template cudaError_t feedback<T>(const T*, const T*, const T*, const T*, int, int, int, int, T*,          \
                                   cudaStream_t);                                                           \
  template cudaError_t bias_activation<T>(const T*, const T*, const T*, bool, int, int, int64_t, T*, int64_t, \
                                          T*, cudaStream_t);                                                \
  template cudaError_t project_classify<T>(const T*, const T*, const T*, const T*, int, int, int64_t, T*,   \
                                           cudaStream_t);                                                   \
  template cudaError_t count_changes<T>(const T*, const T*, int, int64_t, int*, cudaStream_t);
CRNET_INSTANTIATE(float)
CRNET_INSTANTIATE(__half)
#undef CRNET_INSTANTIATE

}  // namespace crnet::kernels::cuda
