// The decode GEMM's weight layout ("tiled"): a permutation of the bits of qatext's packed layout,
// so that each lane of a warp loads the codes of its mma.sync A fragments as one 16-byte (4-bit) or
// 8-byte (2-bit) vector straight from global memory. Same byte count as packed: [N, K * bits / 8].
//
// W [N, K] is cut into tiles of 16 rows x 64 columns, stored row-tile-major: tile (nt, kt) starts at
// byte (nt * K / 64 + kt) * 128 * bits, so a warp streaming along K reads consecutive tiles. In a
// tile, lane l = 4g + c (g = 0..7, c = 0..3) owns 4 * bits bytes at l * 4 * bits: rows g and g + 8,
// columns 16c .. 16c + 15, as the A fragments of four 16-deep mma steps j = 0..3. Step j's
// fragment column 2c + e' (e' = 0, 1) and 2c + 8 + e' hold columns k = 16c + 4j + e' and 16c + 4j + 2 + e'
// (the activations are loaded with the same permutation, so the product is unchanged).
// Fragment register r (0..3: rows g / g + 8, columns e = 0-1 / 2-3) holds its two codes in bits
// bits * (r + 4 s) and 16 + bits * (r + 4 s) of a 32-bit word (s: the step within the word; a 2-bit
// word holds two steps), so one shift and one mask put both in the low bits of a 16-bit pair.
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace qatext {

constexpr int kTileRows = 16;
constexpr int kTileCols = 64;

QATEXT_HOST_DEVICE bool tile_layout_bits_ok(int bits) { return bits == 2 || bits == 4; }
QATEXT_HOST_DEVICE int64_t tile_bytes(int bits) { return int64_t(kTileRows) * kTileCols * bits / 8; }

// Where code (n, k) lives in the tiled layout: byte offset from the start and bit shift in that byte.
struct TileBit {
  int64_t byte;
  int shift;
};

QATEXT_HOST_DEVICE TileBit tile_position(int64_t n, int64_t k, int64_t K, int bits) {
  const int64_t tile = (n / kTileRows) * (K / kTileCols) + k / kTileCols;
  const int nr = int(n % kTileRows), kc = int(k % kTileCols);
  const int g = nr % 8, c = kc / 16, j = (kc % 16) / 4, e = kc % 4;
  const int steps_per_word = 4 / bits;
  const int word = j / steps_per_word, s = j % steps_per_word;
  const int r = nr / 8 + 2 * (e / 2), h = e % 2;
  const int bit = bits * (r + 4 * s) + 16 * h;
  return {tile * tile_bytes(bits) + (4 * g + c) * 4 * bits + 4 * word + bit / 8, bit % 8};
}

// The code (n, k) held by field f (bits [f * bits, (f + 1) * bits)) of tiled byte `byte`: the inverse
// of tile_position.
QATEXT_HOST_DEVICE void tile_code_at(int64_t byte, int f, int64_t K, int bits, int64_t& n, int64_t& k) {
  const int64_t tile = byte / tile_bytes(bits);
  const int within = int(byte % tile_bytes(bits));
  const int lane = within / (4 * bits), rest = within % (4 * bits), word = rest / 4;
  const int bit = 8 * (rest % 4) + f * bits;
  const int h = bit / 16, p = (bit % 16) / bits, r = p % 4, s = p / 4;
  const int j = word * (4 / bits) + s, e = 2 * (r / 2) + h;
  const int64_t tiles_per_row = K / kTileCols;
  n = (tile / tiles_per_row) * kTileRows + lane / 4 + 8 * (r % 2);
  k = (tile % tiles_per_row) * kTileCols + 16 * (lane % 4) + 4 * j + e;
}

// Tiled byte `byte` gathered from the packed rows (row_bytes each).
QATEXT_HOST_DEVICE uint8_t tiled_byte(const uint8_t* packed, int64_t row_bytes, int64_t byte, int64_t K, int bits) {
  uint32_t out = 0;
  for (int f = 0; f < 8 / bits; ++f) {
    int64_t n, k;
    tile_code_at(byte, f, K, bits, n, k);
    const uint32_t code = (packed[n * row_bytes + k * bits / 8] >> ((k * bits) % 8)) & ((1u << bits) - 1u);
    out |= code << (f * bits);
  }
  return uint8_t(out);
}

// Packed byte j of row n gathered from the tiled layout.
QATEXT_HOST_DEVICE uint8_t untiled_byte(const uint8_t* tiled, int64_t n, int64_t j, int64_t K, int bits) {
  uint32_t out = 0;
  for (int f = 0; f < 8 / bits; ++f) {
    const int64_t k = j * 8 / bits + f;
    const TileBit at = tile_position(n, k, K, bits);
    out |= ((uint32_t(tiled[at.byte]) >> at.shift) & ((1u << bits) - 1u)) << (f * bits);
  }
  return uint8_t(out);
}

}  // namespace qatext
