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

// z (6) -> B^T z
template <typename T>
inline void input_rows(const T* z, T* out, int stride) {
  out[0 * stride] = 4 * z[0] - 5 * z[2] + z[4];
  out[1 * stride] = -4 * z[1] - 4 * z[2] + z[3] + z[4];
  out[2 * stride] = 4 * z[1] - 4 * z[2] - z[3] + z[4];
  out[3 * stride] = -2 * z[1] - z[2] + 2 * z[3] + z[4];
  out[4 * stride] = 2 * z[1] - z[2] - 2 * z[3] + z[4];
  out[5 * stride] = 4 * z[1] - 5 * z[3] + z[5];
}

// g (3) -> G g
template <typename T>
inline void filter_rows(const T* g, T* out, int stride) {
  out[0 * stride] = g[0] / 4;
  out[1 * stride] = -(g[0] + g[1] + g[2]) / 6;
  out[2 * stride] = -(g[0] - g[1] + g[2]) / 6;
  out[3 * stride] = g[0] / 24 + g[1] / 12 + g[2] / 6;
  out[4 * stride] = g[0] / 24 - g[1] / 12 + g[2] / 6;
  out[5 * stride] = g[2];
}

// m (6) -> A^T m
template <typename T>
inline void output_rows(const T* m, T* out, int stride) {
  out[0 * stride] = m[0] + m[1] + m[2] + m[3] + m[4];
  out[1 * stride] = m[1] - m[2] + 2 * (m[3] - m[4]);
  out[2 * stride] = m[1] + m[2] + 4 * (m[3] + m[4]);
  out[3 * stride] = m[1] - m[2] + 8 * (m[3] - m[4]) + m[5];
}

}  // namespace

template <typename T>
void filter_transform(const T* weight, int out_channels, int in_channels, int weight_in_channels, T* u) {
  const int64_t plane = static_cast<int64_t>(out_channels) * in_channels;
  for (int k = 0; k < out_channels; ++k) {
    for (int c = 0; c < in_channels; ++c) {
      const T* g = weight + (static_cast<int64_t>(k) * weight_in_channels + c) * 9;
      T columns[3][kWindow];  // G g, stored transposed: columns[j][i] = (G g)[i][j]
      for (int j = 0; j < 3; ++j) {
        const T column[3] = {g[j], g[3 + j], g[6 + j]};
        filter_rows(column, columns[j], 1);
      }
      for (int i = 0; i < kWindow; ++i) {
        const T row[3] = {columns[0][i], columns[1][i], columns[2][i]};
        T out[kWindow];
        filter_rows(row, out, 1);  // (G g G^T)[i][:]
        for (int j = 0; j < kWindow; ++j) u[(i * kWindow + j) * plane + static_cast<int64_t>(k) * in_channels + c] = out[j];
      }
    }
  }
}

template <typename T>
void input_transform(const T* x, int channels, const TileGrid& grid, bool relu_input, int64_t batch, T* v,
                     int64_t begin, int64_t end) {
  const int height = grid.height, width = grid.width, d = grid.dilation;
  const int64_t tiles = grid.count();
  const int64_t columns = batch * tiles;                 // P
  const int64_t point_stride = channels * columns;       // between the 36 matrices
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t n = plane / channels, c = plane % channels;
    const T* image = x + plane * height * width;
    T* out = v + c * columns + n * tiles;
    for (int64_t t = 0; t < tiles; ++t) {
      const int y0 = grid.origin_y[t] - d, x0 = grid.origin_x[t] - d;
      T window[kWindow][kWindow];
      for (int i = 0; i < kWindow; ++i) {
        const int y = y0 + i * d;
        for (int j = 0; j < kWindow; ++j) {
          const int xx = x0 + j * d;
          T value = (y >= 0 && y < height && xx >= 0 && xx < width) ? image[y * width + xx] : T(0);
          window[i][j] = relu_input && value < T(0) ? T(0) : value;
        }
      }
      T rows[kWindow][kWindow];  // rows[j][i] = (B^T window)[i][j]
      for (int j = 0; j < kWindow; ++j) {
        const T column[kWindow] = {window[0][j], window[1][j], window[2][j],
                                   window[3][j], window[4][j], window[5][j]};
        input_rows(column, rows[j], 1);
      }
      for (int i = 0; i < kWindow; ++i) {
        const T row[kWindow] = {rows[0][i], rows[1][i], rows[2][i], rows[3][i], rows[4][i], rows[5][i]};
        input_rows(row, out + (i * kWindow) * point_stride + t, static_cast<int>(point_stride));
      }
    }
  }
}

template <typename T>
void output_transform(const T* m, int out_channels, const TileGrid& grid, const Epilogue<T>& epilogue,
                      int64_t batch, T* y, int64_t out_batch_stride, int64_t begin, int64_t end) {
  const int height = grid.height, width = grid.width, d = grid.dilation;
  const int64_t tiles = grid.count();
  const int64_t columns = batch * tiles;
  const int64_t point_stride = out_channels * columns;
  const int64_t plane_size = static_cast<int64_t>(height) * width;
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t n = plane / out_channels, k = plane % out_channels;
    const T* in = m + k * columns + n * tiles;
    T* out = y + n * out_batch_stride + k * plane_size;
    const T* residual = epilogue.residual ? epilogue.residual + plane * plane_size : nullptr;
    const T bias = epilogue.bias ? epilogue.bias[k] : T(0);
    for (int64_t t = 0; t < tiles; ++t) {
      T rows[kWindow][kTile];  // rows[j][a] = (A^T M)[a][j]
      for (int j = 0; j < kWindow; ++j) {
        T column[kWindow];
        for (int i = 0; i < kWindow; ++i) column[i] = in[(i * kWindow + j) * point_stride + t];
        output_rows(column, rows[j], 1);
      }
      for (int a = 0; a < kTile; ++a) {
        const int yy = grid.origin_y[t] + a * d;
        if (yy >= height) break;
        const T row[kWindow] = {rows[0][a], rows[1][a], rows[2][a], rows[3][a], rows[4][a], rows[5][a]};
        T values[kTile];
        output_rows(row, values, 1);
        for (int b = 0; b < kTile; ++b) {
          const int xx = grid.origin_x[t] + b * d;
          if (xx >= width) break;
          const int64_t at = static_cast<int64_t>(yy) * width + xx;
          T value = values[b] + bias;
          if (residual) value += residual[at];
          out[at] = epilogue.relu && value < T(0) ? T(0) : value;
        }
      }
    }
  }
}

#define CRNET_INSTANTIATE(T)                                                                              \
  template void filter_transform<T>(const T*, int, int, int, T*);                                          \
  template void input_transform<T>(const T*, int, const TileGrid&, bool, int64_t, T*, int64_t, int64_t);  \
  template void output_transform<T>(const T*, int, const TileGrid&, const Epilogue<T>&, int64_t, T*,       \
                                    int64_t, int64_t, int64_t);
CRNET_INSTANTIATE(float)
CRNET_INSTANTIATE(double)
#undef CRNET_INSTANTIATE

}  // namespace crnet::kernels
