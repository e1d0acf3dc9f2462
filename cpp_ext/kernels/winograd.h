// Winograd F(4x4, 3x3) convolution transforms (Lavin & Gray, 2016) on raw pointers, no torch.
//
// A stride-1 "same" 3x3 convolution with dilation d splits into d*d phase grids (pixels with equal
// y mod d and x mod d); on each grid it is an ordinary 3x3 convolution, so one tile covers a 4x4 block of
// output pixels spaced d apart and reads a 6x6 block of inputs spaced d apart. Feature maps are
// channels-last (N, H, W, C), so every transform runs on whole channel vectors. The product between the
// transforms is a batched matrix multiply, which the caller runs with its own GEMM:
//   V = input_transform(x)        (36, P, C)   P = batch * tiles
//   M[e] = V[e] @ U[e]            (36, P, K)   U = filter_transform(w): (36, C, K)
//   y = output_transform(M)       (N, H, W, K) with bias, residual and ReLU folded in.
// It multiplies 36 * P times per (input, output) channel pair where the direct convolution does 9 * H * W.
#pragma once

#include <cstdint>
#include <vector>

namespace crnet::kernels {

constexpr int kTile = 4;    // output pixels per tile side
constexpr int kWindow = 6;  // input pixels per tile side
constexpr int kPoints = kWindow * kWindow;

// Output tiles of a dilated 3x3 convolution on an H x W map; each pixel belongs to exactly one tile.
struct TileGrid {
  int height = 0;
  int width = 0;
  int dilation = 1;
  std::vector<int> origin_y;  // top-left output pixel of each tile
  std::vector<int> origin_x;
  int64_t count() const { return static_cast<int64_t>(origin_y.size()); }
};

TileGrid make_tile_grid(int height, int width, int dilation);

// Multiplications per channel pair: Winograd on `grid` against a direct convolution that skips the taps
// falling in the zero padding. The caller picks the cheaper.
int64_t winograd_multiplies(const TileGrid& grid);
int64_t direct_multiplies(int height, int width, int dilation);

// weight (C, 3, 3, K) (the PyTorch weight permuted so that output channels are contiguous) -> u (36, C, K).
template <typename T>
void filter_transform(const T* weight, int in_channels, int out_channels, T* u);

// x (N, H, W, C), pixels `x_pixel_stride` apart -> v (36, N * tiles, C), for the tiles [begin, end) of the
// N * tiles; ReLU on the inputs when `relu_input` (the residual branches start with one).
template <typename T>
void input_transform(const T* x, int channels, int64_t x_pixel_stride, const TileGrid& grid, bool relu_input,
                     int64_t batch, T* v, int64_t begin, int64_t end);

// What happens to each output value: y = act(conv + bias[k] + residual), in that order.
template <typename T>
struct Epilogue {
  const T* bias = nullptr;      // (K,) or none
  const T* residual = nullptr;  // (N, H, W, K) contiguous, or none
  bool relu = false;
};

// m (36, N * tiles, K) -> y (N, H, W, K-slice) whose pixels are `out_pixel_stride` apart, so the result can
// land in a channel slice of a wider map. Tiles [begin, end) of the N * tiles.
template <typename T>
void output_transform(const T* m, int out_channels, const TileGrid& grid, const Epilogue<T>& epilogue,
                      int64_t batch, T* y, int64_t out_pixel_stride, int64_t begin, int64_t end);

}  // namespace crnet::kernels
