#include "winograd.h"

#include <algorithm>
#include <cstdlib>

namespace crnet::kernels {

TileGrid make_tile_grid(int height, int width, int dilation) {
  TileGrid grid;
  grid.height = height;
  grid.width = width;
  grid.dilation = dilation;
  // Phase (py, px) holds the pixels py, py + d, ... (rows) and px, px + d, ... (columns).
  for (int py = 0; py < std::min(dilation, height); ++py) {
    for (int px = 0; px < std::min(dilation, width); ++px) {
      const int rows = (height - py + dilation - 1) / dilation;
      const int cols = (width - px + dilation - 1) / dilation;
      for (int ty = 0; ty < rows; ty += kTile) {
        for (int tx = 0; tx < cols; tx += kTile) {
          grid.origin_y.push_back(py + ty * dilation);
          grid.origin_x.push_back(px + tx * dilation);
        }
      }
    }
  }
  return grid;
}

int64_t winograd_multiplies(const TileGrid& grid) { return kPoints * grid.count(); }

int64_t direct_multiplies(int height, int width, int dilation) {
  int64_t rows = 0, cols = 0;
  for (int tap = -1; tap <= 1; ++tap) {
    rows += std::max(0, height - std::abs(tap) * dilation);
    cols += std::max(0, width - std::abs(tap) * dilation);
  }
  return rows * cols;
}

namespace {

// The 1-D transforms on `n` lanes at once: out[r][lane] = sum_i matrix[r][i] * in[i][lane]. Lanes are
// channels, contiguous, so the loops vectorise.
template <typename T, bool kRelu>
inline void input_rows(const T* const in[6], T* const out[6], int n) {
#pragma GCC ivdep
  for (int l = 0; l < n; ++l) {
    T z[6];
    for (int i = 0; i < 6; ++i) z[i] = kRelu ? std::max(in[i][l], T(0)) : in[i][l];
    out[0][l] = 4 * z[0] - 5 * z[2] + z[4];
    out[1][l] = -4 * z[1] - 4 * z[2] + z[3] + z[4];
    out[2][l] = 4 * z[1] - 4 * z[2] - z[3] + z[4];
    out[3][l] = -2 * z[1] - z[2] + 2 * z[3] + z[4];
    out[4][l] = 2 * z[1] - z[2] - 2 * z[3] + z[4];
    out[5][l] = 4 * z[1] - 5 * z[3] + z[5];
  }
}

template <typename T>
inline void filter_rows(const T* const in[3], T* const out[6], int n) {
#pragma GCC ivdep
  for (int l = 0; l < n; ++l) {
    const T g0 = in[0][l], g1 = in[1][l], g2 = in[2][l];
    out[0][l] = g0 / 4;
    out[1][l] = -(g0 + g1 + g2) / 6;
    out[2][l] = -(g0 - g1 + g2) / 6;
    out[3][l] = g0 / 24 + g1 / 12 + g2 / 6;
    out[4][l] = g0 / 24 - g1 / 12 + g2 / 6;
    out[5][l] = g2;
  }
}

template <typename T>
inline void output_rows(const T* const in[6], T* const out[4], int n) {
#pragma GCC ivdep
  for (int l = 0; l < n; ++l) {
    const T m0 = in[0][l], m1 = in[1][l], m2 = in[2][l], m3 = in[3][l], m4 = in[4][l], m5 = in[5][l];
    out[0][l] = m0 + m1 + m2 + m3 + m4;
    out[1][l] = m1 - m2 + 2 * (m3 - m4);
    out[2][l] = m1 + m2 + 4 * (m3 + m4);
    out[3][l] = m1 - m2 + 8 * (m3 - m4) + m5;
  }
}

}  // namespace

template <typename T>
void filter_transform(const T* weight, int in_channels, int out_channels, T* u) {
  const int k = out_channels;
  std::vector<T> columns(18 * static_cast<size_t>(k));  // G g: [6 rows][3 taps][K]
  for (int c = 0; c < in_channels; ++c) {
    const T* g = weight + static_cast<int64_t>(c) * 9 * k;  // g[i][j] is the vector at (i * 3 + j) * K
    for (int j = 0; j < 3; ++j) {
      const T* in[3] = {g + (0 * 3 + j) * k, g + (1 * 3 + j) * k, g + (2 * 3 + j) * k};
      T* out[6];
      for (int i = 0; i < 6; ++i) out[i] = columns.data() + (i * 3 + j) * k;
      filter_rows(in, out, k);
    }
    for (int i = 0; i < 6; ++i) {
      const T* in[3] = {columns.data() + (i * 3) * k, columns.data() + (i * 3 + 1) * k,
                        columns.data() + (i * 3 + 2) * k};
      T* out[6];
      for (int j = 0; j < 6; ++j) out[j] = u + ((static_cast<int64_t>(i) * 6 + j) * in_channels + c) * k;
      filter_rows(in, out, k);
    }
  }
}

template <typename T>
void input_transform(const T* x, int channels, int64_t x_pixel_stride, const TileGrid& grid, bool relu_input,
                     int64_t batch, T* v, int64_t begin, int64_t end) {
  const int height = grid.height, width = grid.width, d = grid.dilation;
  const int64_t tiles = grid.count(), columns = batch * tiles;
  const std::vector<T> zeros(channels, T(0));
  std::vector<T> stage(kPoints * static_cast<size_t>(channels));  // B^T d: [6 rows][6 columns][C]
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / tiles, t = p % tiles;
    const int y0 = grid.origin_y[t] - d, x0 = grid.origin_x[t] - d;
    for (int j = 0; j < kWindow; ++j) {
      const int xx = x0 + j * d;
      const T* in[6];
      T* out[6];
      for (int i = 0; i < kWindow; ++i) {
        const int y = y0 + i * d;
        const bool inside = y >= 0 && y < height && xx >= 0 && xx < width;
        in[i] = inside ? x + ((n * height + y) * width + xx) * x_pixel_stride : zeros.data();
        out[i] = stage.data() + (i * kWindow + j) * channels;
      }
      if (relu_input) {
        input_rows<T, true>(in, out, channels);
      } else {
        input_rows<T, false>(in, out, channels);
      }
    }
    for (int i = 0; i < kWindow; ++i) {
      const T* in[6];
      T* out[6];
      for (int j = 0; j < kWindow; ++j) {
        in[j] = stage.data() + (i * kWindow + j) * channels;
        out[j] = v + ((i * kWindow + j) * columns + p) * channels;
      }
      input_rows<T, false>(in, out, channels);
    }
  }
}

template <typename T>
void output_transform(const T* m, int out_channels, const TileGrid& grid, const Epilogue<T>& epilogue,
                      int64_t batch, T* y, int64_t out_pixel_stride, int64_t begin, int64_t end) {
  const int height = grid.height, width = grid.width, d = grid.dilation, k = out_channels;
  const int64_t tiles = grid.count(), columns = batch * tiles;
  std::vector<T> stage(kTile * kWindow * static_cast<size_t>(k));  // A^T M: [4 rows][6 columns][K]
  std::vector<T> values(kTile * static_cast<size_t>(k));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / tiles, t = p % tiles;
    for (int j = 0; j < kWindow; ++j) {
      const T* in[6];
      T* out[4];
      for (int i = 0; i < kWindow; ++i) in[i] = m + ((i * kWindow + j) * columns + p) * k;
      for (int a = 0; a < kTile; ++a) out[a] = stage.data() + (a * kWindow + j) * k;
      output_rows(in, out, k);
    }
    for (int a = 0; a < kTile; ++a) {
      const int yy = grid.origin_y[t] + a * d;
      if (yy >= height) break;
      const T* in[6];
      T* out[4];
      for (int j = 0; j < kWindow; ++j) in[j] = stage.data() + (a * kWindow + j) * k;
      for (int b = 0; b < kTile; ++b) out[b] = values.data() + b * k;
      output_rows(in, out, k);
      for (int b = 0; b < kTile; ++b) {
        const int xx = grid.origin_x[t] + b * d;
        if (xx >= width) break;
        const int64_t pixel = (n * height + yy) * width + xx;
        const T* value = values.data() + b * k;
        const T* skip = epilogue.residual ? epilogue.residual + pixel * k : nullptr;
        T* dst = y + pixel * out_pixel_stride;
#pragma GCC ivdep
        for (int c = 0; c < k; ++c) {
          T result = value[c] + (epilogue.bias ? epilogue.bias[c] : T(0)) + (skip ? skip[c] : T(0));
          dst[c] = epilogue.relu ? std::max(result, T(0)) : result;
        }
      }
    }
  }
}

#define CRNET_INSTANTIATE(T)                                                                              \
  template void filter_transform<T>(const T*, int, int, T*);                                               \
  template void input_transform<T>(const T*, int, int64_t, const TileGrid&, bool, int64_t, T*, int64_t,    \
                                   int64_t);                                                               \
  template void output_transform<T>(const T*, int, const TileGrid&, const Epilogue<T>&, int64_t, T*,       \
                                    int64_t, int64_t, int64_t);
CRNET_INSTANTIATE(float)
CRNET_INSTANTIATE(double)
#undef CRNET_INSTANTIATE

}  // namespace crnet::kernels
