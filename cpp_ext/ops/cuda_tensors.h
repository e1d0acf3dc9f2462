// Tensors to the CUDA kernels' raw pointers, and CUDA errors to torch errors: shared by the op's CUDA paths.
#pragma once

#include <ATen/ATen.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

namespace crnet::ops {

inline void check(cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, std::string("crnet::refine_loop: ") + cudaGetErrorString(status));
}

template <typename T>
struct Raw;  // at::Half and float tensors -> the kernels' pointer types
template <>
struct Raw<float> {
  using type = float;
};
template <>
struct Raw<at::Half> {
  using type = __half;
};

template <typename T>
typename Raw<T>::type* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<typename Raw<T>::type*>(t.data_ptr<T>()) : nullptr;
}

}  // namespace crnet::ops
