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
#include "core/quant_math.h"
#include "core/shape.h"

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

// Where lane i of the tiled layout (tile i / 32, lane l = 4g + c) has its codes in W [N, K]: rows n and
// n + 8, columns k .. k + 15.
struct LaneOrigin {
  int64_t n, k;
};
QATEXT_HOST_DEVICE LaneOrigin tile_lane_origin(int64_t i, int64_t K) {
  // 32-bit division (a 64-bit one is a long subroutine on a GPU): fewer than 2^32 tiles, K < 2^31.
  const uint32_t tile = uint32_t(i / 32), tiles_per_row = uint32_t(K / kTileCols), row_tile = tile / tiles_per_row;
  const int lane = int(i % 32);
  return {int64_t(row_tile) * kTileRows + lane / 4, int64_t(tile - row_tile * tiles_per_row) * kTileCols + 16 * (lane % 4)};
}

// The 4 * w bytes of a tile lane's plane of width w as 32-bit words (one vector load on a GPU: tiles and
// lanes start at multiples of 4 * w bytes).
template <int W>
QATEXT_HOST_DEVICE void load_lane_words(const uint8_t* at, uint32_t (&word)[4]) {
#ifdef __CUDA_ARCH__
  if constexpr (W == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(at);
    word[0] = v.x, word[1] = v.y, word[2] = v.z, word[3] = v.w;
  } else if constexpr (W == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(at);
    word[0] = v.x, word[1] = v.y;
  } else {
    word[0] = *reinterpret_cast<const uint32_t*>(at);
  }
#else
  for (int v = 0; v < W; ++v) {
    word[v] = 0;
    for (int b = 0; b < 4; ++b) word[v] |= uint32_t(at[4 * v + b]) << (8 * b);
  }
#endif
}

// The words of lane i: word[p][v] is word v of plane p (the lane's 4 * bits bytes).
template <int BITS>
QATEXT_HOST_DEVICE void load_lane(const uint8_t* tiled, int64_t i, uint32_t (&word)[2][4]) {
  const uint8_t* lane_tile = tiled + (i / 32) * tile_bytes(BITS);
  const int lane = int(i % 32);
  QATEXT_UNROLL
  for (int p = 0; p < tile_planes(BITS); ++p) {
    const TilePlane plane = tile_plane(BITS, p);
    if (plane.width == 4) load_lane_words<4>(lane_tile + plane.offset + lane * 16, word[p]);
    if (plane.width == 2) load_lane_words<2>(lane_tile + plane.offset + lane * 8, word[p]);
    if (plane.width == 1) load_lane_words<1>(lane_tile + plane.offset + lane * 4, word[p]);
  }
}

// The codes of row n + 8 half of a lane (tile_lane_origin) from its words: codes[q] at column k + q.
template <int BITS>
QATEXT_HOST_DEVICE void lane_row_codes(const uint32_t (&word)[2][4], int half, uint32_t (&codes)[16]) {
  QATEXT_UNROLL
  for (int q = 0; q < 16; ++q) codes[q] = 0;
  QATEXT_UNROLL
  for (int p = 0; p < tile_planes(BITS); ++p) {
    const TilePlane plane = tile_plane(BITS, p);
    const int w = plane.width, steps_per_word = 4 / w;
    QATEXT_UNROLL
    for (int q = 0; q < 16; ++q) {  // column k + q = k + 4j + e (16-deep step j, field e)
      const int j = q / 4, e = q % 4;
      // row n + 8 half is fragment register half + 2 (e / 2); the half's shift is applied once a word
      const int bit = w * (2 * (e / 2) + 4 * (j % steps_per_word)) + 16 * (e % 2);
      codes[q] |= (((word[p][j / steps_per_word] >> (w * half)) >> bit) & ((1u << w) - 1u)) << plane.low;
    }
  }
}

// Lane i of the tiled layout written back into the packed rows: its codes are 2 * bits whole bytes of
// each of its two rows, so lanes write disjoint bytes, one store a row on a GPU (3 bits: 6 bytes a lane, so
// the row's four lanes (c = 0..3, together in a warp) shift their bits into three aligned 8-byte words,
// each written by lane c = 0, 1, 2).
template <int BITS>
QATEXT_HOST_DEVICE void untile_lane(const uint8_t* tiled, uint8_t* packed, int64_t i, int64_t K) {
  uint32_t word[2][4];
  load_lane<BITS>(tiled, i, word);
  const LaneOrigin at = tile_lane_origin(i, K);
  const int64_t row_bytes = K * BITS / 8;
  QATEXT_UNROLL
  for (int half = 0; half < 2; ++half) {
    uint32_t codes[16];
    lane_row_codes<BITS>(word, half, codes);
    uint64_t run = 0;  // the row's 16 codes as packed bits
    QATEXT_UNROLL
    for (int q = 0; q < 16; ++q) run |= uint64_t(codes[q]) << (BITS * q);
    uint8_t* out = packed + (at.n + 8 * half) * row_bytes + at.k * BITS / 8;
#ifdef __CUDA_ARCH__  // aligned: rows hold whole tiles, and 2 * bits bytes a lane
    if constexpr (BITS == 4) {
      *reinterpret_cast<uint64_t*>(out) = run;
    } else if constexpr (BITS == 2) {
      *reinterpret_cast<uint32_t*>(out) = uint32_t(run);
    } else {  // word c of the row's 24 bytes (at out - 6c): this lane's bits from 16c on, then the next lane's
      const int c = int(i % 4);
      const uint64_t next = __shfl_down_sync(0xffffffffu, run, 1);
      uint8_t* row_run = out - 6 * c;
      if (c < 3) *reinterpret_cast<uint64_t*>(row_run + 8 * c) = (run >> (16 * c)) | (next << (48 - 16 * c));
    }
#else
    for (int b = 0; b < 2 * BITS; ++b) out[b] = uint8_t(run >> (8 * b));
#endif
  }
}

// A lane's run of 16 weights of a row (16-bit: 32 bytes, one sector) stored at dst. On a GPU the lanes of
// a column pair (c, c ^ 1: i and i ^ 1, together in a warp) swap a half run first, so that each of the
// two 16-byte store instructions writes whole sectors (a run's halves by its two lanes), not half of one
// each.
template <typename T>
QATEXT_HOST_DEVICE void store_lane_run(T* dst, const T (&v)[16], int64_t i) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == 2) {
    const uint4* mine = reinterpret_cast<const uint4*>(v);
    const bool odd = i & 1;
    const uint4 sent = odd ? mine[0] : mine[1];
    uint4 got;
    got.x = __shfl_xor_sync(0xffffffffu, sent.x, 1), got.y = __shfl_xor_sync(0xffffffffu, sent.y, 1);
    got.z = __shfl_xor_sync(0xffffffffu, sent.z, 1), got.w = __shfl_xor_sync(0xffffffffu, sent.w, 1);
    uint4* run = reinterpret_cast<uint4*>(dst);  // this lane's run; the even lane's partner starts 2 vectors on
    *(odd ? run - 1 : run) = odd ? got : mine[0];      // the even lane's run: its first half, then the second
    *(odd ? run + 1 : run + 2) = odd ? mine[1] : got;  // the odd lane's run: likewise
  } else {
    for (int w = 0; w < int(sizeof(v) / 16); ++w) reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<const uint4*>(v)[w];
  }
#else
  (void)i;
  for (int q = 0; q < 16; ++q) dst[q] = v[q];
#endif
}

// Row n + 8 half of lane i (tile_lane_origin), 16 weights, dequantised into out [N, K] (T: float, fp16 or
// bf16; dequant_value, as dequant computes them from packed codes). On a GPU the 32 lanes of a tile call it
// together for one half (a warp: store_lane_run).
template <typename T, int BITS>
QATEXT_HOST_DEVICE void dequant_lane_row(const uint8_t* tiled, const float* scale, const float* zero, T* out,
                                         int64_t i, int half, GroupShape shape) {
  uint32_t word[2][4], codes[16];
  load_lane<BITS>(tiled, i, word);
  lane_row_codes<BITS>(word, half, codes);
  const LaneOrigin at = tile_lane_origin(i, shape.K);
  const int64_t n = at.n + 8 * half, G = shape.groups();
  const int64_t first = n * G + uint32_t(at.k) / uint32_t(shape.group_size);
  const bool one_group = shape.group_size % 16 == 0;  // the run never straddles a group
  const float s = scale[first], z = zero[first];
  alignas(16) T v[16];
  QATEXT_UNROLL
  for (int q = 0; q < 16; ++q) {
    if (one_group) {
      v[q] = T(dequant_value(codes[q], s, z));
    } else {
      const int64_t ng = n * G + uint32_t(at.k + q) / uint32_t(shape.group_size);
      v[q] = T(dequant_value(codes[q], scale[ng], zero[ng]));
    }
  }
  store_lane_run(out + n * shape.K + at.k, v, i);
}

// untile_lane for a bits value known at run time (2, 3 or 4).
QATEXT_HOST_DEVICE void untile_lane(const uint8_t* tiled, uint8_t* packed, int64_t i, int64_t K, int bits) {
  if (bits == 2) untile_lane<2>(tiled, packed, i, K);
  if (bits == 3) untile_lane<3>(tiled, packed, i, K);
  if (bits == 4) untile_lane<4>(tiled, packed, i, K);
}

// Lanes of the tiled layout of an N x K weight (32 per 16 x 64 tile).
QATEXT_HOST_DEVICE int64_t tile_lanes(int64_t N, int64_t K) { return N / kTileRows * (K / kTileCols) * 32; }

}  // namespace qatext
