// Launch geometry shared by the refinement loop's kernels.
#pragma once

#include <cstdint>

namespace crnet::kernels::cuda {

inline constexpr int kThreads = 256;  // threads per block

// Blocks for `threads` threads, capped: the kernels' grid-stride loops cover what a capped grid leaves.
inline unsigned blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace crnet::kernels::cuda
