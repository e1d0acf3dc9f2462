// The early-exit bookkeeping of crnet::refine_loop, shared by the backends.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace crnet::ops {

// After iteration t, samples whose mask changed in fewer than exit_fraction * pixels pixels stop: their
// `used` entry becomes t and they leave `active` (the original indices of the rows still running). Returns
// the rows, among the n current ones, that go on.
inline std::vector<int64_t> drop_converged(const int64_t* changed, int64_t n, double exit_fraction,
                                           int64_t pixels, int64_t t, std::vector<int64_t>& used,
                                           std::vector<int64_t>& active) {
  std::vector<int64_t> keep, remaining;
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<double>(changed[i]) < exit_fraction * static_cast<double>(pixels)) {
      used[active[i]] = t;
    } else {
      keep.push_back(i);
      remaining.push_back(active[i]);
    }
  }
  active.swap(remaining);
  return keep;
}

// Writes this iteration's logits `next` of the rows still running (`active`: their original indices) into the
// batch's `logits`; a plain copy while no sample has stopped.
inline void write_active_rows(at::Tensor& logits, const at::Tensor& next, const std::vector<int64_t>& active) {
  if (next.size(0) == logits.size(0)) {
    logits.copy_(next);
  } else {
    logits.index_copy_(0, at::tensor(active, logits.options().dtype(at::kLong)), next);
  }
}

// The rows `keep` of each tensor, in place, when some rows left.
inline void select_rows(const std::vector<int64_t>& keep, int64_t n,
                        std::initializer_list<at::Tensor*> tensors) {
  if (static_cast<int64_t>(keep.size()) == n) return;
  const at::Tensor rows = at::tensor(keep, tensors.begin()[0]->options().dtype(at::kLong));
  for (at::Tensor* t : tensors) *t = t->index_select(0, rows);
}

}  // namespace crnet::ops
