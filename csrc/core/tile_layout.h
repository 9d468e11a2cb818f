// The decode GEMM's weight layout ("tiled"): a permutation of the bits of qatext's packed layout,
// so that each lane of a warp loads the codes of its mma.sync A fragments as one 16-byte (4-bit) or
// 8-byte (2-bit) vector straight from global memory; 3-bit codes are split into a 2-bit plane (the
// low bits, laid out as 2-bit codes) and a 1-bit plane (the high bit), 8 + 4 bytes per lane. Same
// byte count as packed: [N, K * bits / 8].
//
// W [N, K] is cut into tiles of 16 rows x 64 columns, stored row-tile-major: tile (nt, kt) starts at
// byte (nt * K / 64 + kt) * 128 * bits, so a warp streaming along K reads consecutive tiles. A plane
// of width w bits starts at `offset` in the tile (3 bits: the 2-bit plane at 0, the 1-bit plane at
// 256); in it lane l = 4g + c (g = 0..7, c = 0..3) owns 4 * w bytes at l * 4 * w: rows g and g + 8,
// columns 16c .. 16c + 15, as the A fragments of four 16-deep mma steps j = 0..3. Step j's
// fragment column 2c + e' (e' = 0, 1) and 2c + 8 + e' hold columns k = 16c + 4j + e' and 16c + 4j + 2 + e'
// (the activations are loaded with the same permutation, so the product is unchanged).
// Fragment register r (0..3: rows g / g + 8, columns e = 0-1 / 2-3) holds its two fields in bits
// w * (r + 4 s) and 16 + w * (r + 4 s) of a 32-bit word (s: the step within the word; a w-bit word
// holds 4 / w steps), so one shift and one mask put both in the low bits of a 16-bit pair.
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace qatext {

constexpr int kTileRows = 16;
constexpr int kTileCols = 64;

QATEXT_HOST_DEVICE bool tile_layout_bits_ok(int bits) { return bits == 2 || bits == 3 || bits == 4; }
QATEXT_HOST_DEVICE int64_t tile_bytes(int bits) { return int64_t(kTileRows) * kTileCols * bits / 8; }

// The planes of a tile: 1 (bits 2 or 4) or 2 (bits 3: low 2 bits, then the high bit).
struct TilePlane {
  int width;   // bits of each code held here
  int offset;  // byte offset in the tile
  int low;     // the lowest code bit held here
};
QATEXT_HOST_DEVICE int tile_planes(int bits) { return bits == 3 ? 2 : 1; }
QATEXT_HOST_DEVICE TilePlane tile_plane(int bits, int p) {
  if (bits != 3) return {bits, 0, 0};
  return p == 0 ? TilePlane{2, 0, 0} : TilePlane{1, 256, 2};
}

// Where plane p's field of code (n, k) lives in the tiled layout: byte offset and bit shift.
struct TileBit {
  int64_t byte;
  int shift;
};

QATEXT_HOST_DEVICE TileBit tile_position(int64_t n, int64_t k, int64_t K, int bits, int p = 0) {
  const TilePlane plane = tile_plane(bits, p);
  const int w = plane.width;
  const int64_t tile = (n / kTileRows) * (K / kTileCols) + k / kTileCols;
  const int nr = int(n % kTileRows), kc = int(k % kTileCols);
  const int g = nr % 8, c = kc / 16, j = (kc % 16) / 4, e = kc % 4;
  const int steps_per_word = 4 / w;
  const int word = j / steps_per_word, s = j % steps_per_word;
  const int r = nr / 8 + 2 * (e / 2), h = e % 2;
  const int bit = w * (r + 4 * s) + 16 * h;
  return {tile * tile_bytes(bits) + plane.offset + (4 * g + c) * 4 * w + 4 * word + bit / 8, bit % 8};
}

// The code (n, k) whose plane field f (bits [f * w, (f + 1) * w) of tiled byte `byte`) is there, and
// that plane: the inverse of tile_position.
QATEXT_HOST_DEVICE TilePlane tile_code_at(int64_t byte, int f, int64_t K, int bits, int64_t& n, int64_t& k) {
  const int64_t tile = byte / tile_bytes(bits);
  int within = int(byte % tile_bytes(bits));
  const TilePlane plane = tile_plane(bits, bits == 3 && within >= 256 ? 1 : 0);
  within -= plane.offset;
  const int w = plane.width;
  const int lane = within / (4 * w), rest = within % (4 * w), word = rest / 4;
  const int bit = 8 * (rest % 4) + f * w;
  const int h = bit / 16, p = (bit % 16) / w, r = p % 4, s = p / 4;
  const int j = word * (4 / w) + s, e = 2 * (r / 2) + h;
  const int64_t tiles_per_row = K / kTileCols;
  n = (tile / tiles_per_row) * kTileRows + lane / 4 + 8 * (r % 2);
  k = (tile % tiles_per_row) * kTileCols + 16 * (lane % 4) + 4 * j + e;
  return plane;
}

// Code k of a packed row (a little-endian bit stream, code k at bits k * bits ..; a 3-bit code may
// straddle two bytes).
QATEXT_HOST_DEVICE uint32_t packed_code(const uint8_t* row, int64_t row_bytes, int64_t k, int bits) {
  const int64_t bit = k * bits, byte = bit / 8;
  uint32_t v = row[byte];
  if (byte + 1 < row_bytes) v |= uint32_t(row[byte + 1]) << 8;
  return (v >> (bit % 8)) & ((1u << bits) - 1u);
}

// Tiled byte `byte` gathered from the packed rows (row_bytes each).
QATEXT_HOST_DEVICE uint8_t tiled_byte(const uint8_t* packed, int64_t row_bytes, int64_t byte, int64_t K, int bits) {
  uint32_t out = 0;
  int64_t n, k;
  const int w = tile_code_at(byte, 0, K, bits, n, k).width;
  for (int f = 0; f < 8 / w; ++f) {
    const TilePlane plane = tile_code_at(byte, f, K, bits, n, k);
    const uint32_t code = packed_code(packed + n * row_bytes, row_bytes, k, bits);
    out |= ((code >> plane.low) & ((1u << w) - 1u)) << (f * w);
  }
  return uint8_t(out);
}

// Packed byte j of row n gathered from the tiled layout.
QATEXT_HOST_DEVICE uint8_t untiled_byte(const uint8_t* tiled, int64_t n, int64_t j, int64_t K, int bits) {
  uint32_t out = 0;
  if (bits != 3) {  // whole codes per byte, in one plane
    for (int f = 0; f < 8 / bits; ++f) {
      const TileBit at = tile_position(n, j * 8 / bits + f, K, bits);
      out |= ((uint32_t(tiled[at.byte]) >> at.shift) & ((1u << bits) - 1u)) << (f * bits);
    }
    return uint8_t(out);
  }
  for (int t = 0; t < 8; ++t) {  // bit by bit: 3-bit codes straddle bytes
    const int64_t bit = j * 8 + t, k = bit / 3;
    if (k >= K) break;  // the row's padding bits stay zero
    const int b = int(bit % 3), p = b / 2;
    const TileBit at = tile_position(n, k, K, bits, p);
    out |= ((uint32_t(tiled[at.byte]) >> (at.shift + b - tile_plane(bits, p).low)) & 1u) << t;
  }
  return uint8_t(out);
}

}  // namespace qatext
