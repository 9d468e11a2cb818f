// The decode GEMM's tiled weight layout (core/tile_layout.h): conversion both ways, dequantisation, and
// dequant_matmul on a tiled weight (the register-direct kernel on CUDA at small M; beyond it the staged
// kernel up to its measured limit, then the fused kernel on the codes untiled, or the weight
// dequantised straight from the tiled layout and one GEMM);
// and a SwiGLU MLP's gate and up projections on one such weight, silu(gate) * up in the decode kernel's
// epilogue.
#include "core/quant_math.h"
#include "core/tile_layout.h"
#include "ops/common.h"
#include "ops/decode_autotune.h"
#include "ops/ops.h"

namespace qatext::ops {

namespace {

// Checks a tiled (or to-be-tiled) weight [N, K * bits / 8]; returns N.
int64_t check_tileable(const char* op, const char* name, const at::Tensor& t, int64_t bits, int64_t K) {
  TORCH_CHECK_VALUE(tile_layout_bits_ok(int(bits)), op, ": bits must be 2, 3 or 4 for the tiled layout, got ", bits);
  check_dim(op, name, t, 2);
  TORCH_CHECK_VALUE(K > 0 && K % kTileCols == 0, op, ": in_features must be a positive multiple of ", kTileCols,
                    ", got ", K);
  const int64_t N = t.size(0);
  TORCH_CHECK_VALUE(N % kTileRows == 0, op, ": ", name, " must have a multiple of ", kTileRows,
                    " rows (out_features), got ", N);
  check_packed(op, name, t, N, packed_row_bytes(K, int(bits)));
  return N;
}


// Tiled codes contiguous and 16-byte aligned, as the lane kernels' vector loads need (a copy only for a
// view at an odd offset).
at::Tensor lane_aligned(const at::Tensor& tiled) {
  at::Tensor t = tiled.contiguous();
  return aligned16(t) ? t : t.clone();
}

// The codes of `in` in the other layout (to_tiled: packed -> tiled, else back); same bytes, same shape.
at::Tensor relayout(const char* op, const char* name, const at::Tensor& in_, int64_t bits, int64_t in_features,
                    bool to_tiled) {
  const int64_t N = check_tileable(op, name, in_, bits, in_features);
  const at::Tensor in = lane_aligned(in_);
  at::Tensor out = at::empty_like(in);
  if (to_tiled) {
    QATEXT_DEVICE_CALL(in, tile_packed, in.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(), N, in_features,
                       int(bits));
  } else {
    QATEXT_DEVICE_CALL(in, untile_packed, in.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(), N,
                       in_features, int(bits));
  }
  return out;
}

}  // namespace

at::Tensor tile_packed(const at::Tensor& packed, int64_t bits, int64_t in_features) {
  return relayout("qatext.tile_packed", "packed", packed, bits, in_features, true);
}

at::Tensor untile_packed(const at::Tensor& tiled, int64_t bits, int64_t in_features) {
  return relayout("qatext.untile_packed", "tiled", tiled, bits, in_features, false);
}

#ifdef QATEXT_WITH_CUDA
at::Tensor decode_matmul(const at::Tensor& a, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                         const at::Tensor& b, GroupShape shape, cuda::DecodeTuning decode_tuning, bool swiglu) {
  const int64_t M = a.size(0);
  const at::OptionalDeviceGuard guard(at::device_of(a));
  decode_tuning.warp_split = decode_tuning.warp_split || swiglu;  // (its epilogue sums the block's warps)
  const int64_t splits = cuda::decode_gemm_splits(M, shape, decode_tuning);
  at::Tensor out = at::empty({M, swiglu ? shape.N / 2 : shape.N}, a.options());
  at::Tensor partial, zeroed;
  int* counters = nullptr;
  if (splits > 1 && !cuda::decode_gemm_cluster(M, shape, splits, decode_tuning)) {
    partial = at::empty({splits, M, shape.N}, a.options().dtype(at::kFloat));
    const int64_t count = cuda::decode_gemm_counters(M, shape, decode_tuning);
    counters = cuda::decode_gemm_counter_workspace(count, current_stream(a));
    if (counters == nullptr) {  // none for this stream yet while it captures a graph: a zeroed tensor
      zeroed = at::zeros({count}, a.options().dtype(at::kInt));
      counters = zeroed.mutable_data_ptr<int>();
    }
  }
  const int64_t wgmma_block = cuda::wgmma_block_tokens(M, shape, decode_tuning);
  const bool wgmma = wgmma_block > 0;
  const at::Tensor a_wgmma =
      wgmma ? at::empty({cuda::wgmma_tiles_size(M, shape.K, wgmma_block)}, a.options()) : at::Tensor();
  const at::Tensor sums =
      wgmma ? at::empty({cuda::wgmma_sums_size(M, shape, splits)}, a.options().dtype(at::kFloat)) : at::Tensor();
  dispatch_half(a.scalar_type(), [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    if (wgmma) {
      cuda::wgmma_tokens<scalar_t>(a.const_data_ptr<scalar_t>(), a_wgmma.mutable_data_ptr<scalar_t>(),
                                   sums.mutable_data_ptr<float>(), M, shape, splits, wgmma_block, current_stream(a));
    }
    cuda::decode_gemm<scalar_t>(a.const_data_ptr<scalar_t>(), wgmma ? a_wgmma.const_data_ptr<scalar_t>() : nullptr,
                                wgmma ? sums.const_data_ptr<float>() : nullptr, w.const_data_ptr<uint8_t>(),
                                scale.const_data_ptr<float>(), zero.const_data_ptr<float>(),
                                b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                                partial.defined() ? partial.mutable_data_ptr<float>() : nullptr, counters, M, shape,
                                splits, decode_tuning, swiglu, current_stream(a));
  });
  return out;
}
#endif

namespace {

// x @ deq(W)^T (+ bias) on the decode kernel (or, staged, the staged kernel) where it takes this call
// (CUDA, 16-bit x, at most the shape's decode or staged token limit); with swiglu
// (decode only), silu(gate) * up of it. Undefined where it does not.
at::Tensor kernel_path(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale, const at::Tensor& zero,
                       const GroupShape& shape, const std::optional<at::Tensor>& bias, bool swiglu, bool staged) {
#ifdef QATEXT_WITH_CUDA
  const auto dtype = x.scalar_type();
  if (!x.is_cuda() || (dtype != at::kBFloat16 && dtype != at::kHalf) || !cuda::decode_gemm_supported(shape)) return {};
  const int64_t M = x.numel() / shape.K;
  const int device = x.get_device();
  const int64_t limit = staged ? staged_max_tokens(device, shape) : decode_max_tokens(device, shape);
  if (M < 1 || M > limit || (staged && !cuda::staged_gemm_fits(M, shape.K))) return {};
  const cuda::DecodeTuning tuning = staged ? staged_tuning_for(device, shape) : decode_tuning_for(device, shape, M);
  const at::Tensor a = flatten_rows(x).contiguous(), w = tiled.contiguous();
  if (!aligned16(a) || !aligned16(w) || (swiglu && !cuda::decode_gemm_swiglu_supported(M, shape, tuning))) return {};
  const at::Tensor b = bias.has_value() ? bias->to(dtype).contiguous() : at::Tensor();
  const at::Tensor out = decode_matmul(a, w, as_float(scale), as_float(zero), b, shape, tuning, swiglu);
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  return out.view(sizes);
#else
  (void)x, (void)tiled, (void)scale, (void)zero, (void)shape, (void)bias, (void)swiglu, (void)staged;
  return {};
#endif
}

// Checks a tiled weight for x; returns its shape.
GroupShape check_tiled_matmul(const char* op, const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                              const at::Tensor& zero, int64_t bits, int64_t group_size,
                              const std::optional<at::Tensor>& bias) {
  check_matmul_inputs(op, x, "tiled", tiled, bias);
  check_tileable(op, "tiled", tiled, bits, x.size(-1));
  return check_packed_weight(op, tiled, scale, zero, bits, group_size, x.size(-1));
}

// The weight in dtype, [N, K], dequantised straight from the tiled codes (no untiled copy).
at::Tensor dequant_tiled_checked(const at::Tensor& tiled, const at::Tensor& scale, const at::Tensor& zero,
                                 const GroupShape& shape, at::ScalarType dtype) {
  const at::Tensor codes = lane_aligned(tiled), s = as_float(scale), z = as_float(zero);
  at::Tensor w = at::empty({shape.N, shape.K}, codes.options().dtype(dtype));
  QATEXT_DISPATCH_FLOAT(dtype, [&] {
    QATEXT_DEVICE_CALL(codes, dequant_tiled<scalar_t>, codes.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(),
                       z.const_data_ptr<float>(), w.mutable_data_ptr<scalar_t>(), shape);
  });
  return w;
}

}  // namespace

at::Tensor dequant_tiled(const at::Tensor& tiled, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                         int64_t group_size, int64_t in_features, at::ScalarType dtype) {
  const char* op = "qatext.dequant_tiled";
  check_tileable(op, "tiled", tiled, bits, in_features);
  const GroupShape shape = check_packed_weight(op, tiled, scale, zero, bits, group_size, in_features);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": dtype must be float32, bfloat16 or float16, got ", dtype);
  return dequant_tiled_checked(tiled, scale, zero, shape, dtype);
}

namespace {

// dequant_matmul_tiled, or with swiglu swiglu_matmul_tiled, on arguments already checked.
at::Tensor tiled_matmul_checked(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                                const at::Tensor& zero, const GroupShape& shape, const std::optional<at::Tensor>& bias,
                                bool swiglu) {
  const at::Tensor out = kernel_path(x, tiled, scale, zero, shape, bias, swiglu, false);
  if (out.defined()) return out;
  const at::Tensor y = tiled_matmul_beyond_decode(x, tiled, scale, zero, shape, bias);
  if (!swiglu) return y;
  // Beyond the decode kernel: the GEMM, then silu(gate) * up as the MLP computes them unfused (in x's dtype).
  const auto halves = y.chunk(2, -1);
  return at::silu(halves[0]) * halves[1];
}

}  // namespace

at::Tensor dequant_matmul_tiled(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                                const at::Tensor& zero, int64_t bits, int64_t group_size,
                                const std::optional<at::Tensor>& bias) {
  const GroupShape shape =
      check_tiled_matmul("qatext.dequant_matmul_tiled", x, tiled, scale, zero, bits, group_size, bias);
  return tiled_matmul_checked(x, tiled, scale, zero, shape, bias, false);
}

at::Tensor swiglu_matmul_tiled(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t group_size,
                               const std::optional<at::Tensor>& bias) {
  const GroupShape shape =
      check_tiled_matmul("qatext.swiglu_matmul_tiled", x, tiled, scale, zero, bits, group_size, bias);
  return tiled_matmul_checked(x, tiled, scale, zero, shape, bias, true);
}

at::Tensor tiled_matmul_beyond_decode(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                                      const at::Tensor& zero, const GroupShape& shape,
                                      const std::optional<at::Tensor>& bias) {
  const at::Tensor out = kernel_path(x, tiled, scale, zero, shape, bias, false, true);
  return out.defined() ? out : tiled_matmul_beyond_staged(x, tiled, scale, zero, shape, bias);
}

at::Tensor tiled_matmul_beyond_staged(const at::Tensor& x, const at::Tensor& tiled, const at::Tensor& scale,
                                      const at::Tensor& zero, const GroupShape& shape,
                                      const std::optional<at::Tensor>& bias) {
  if (fused_dequant_gemm_applies(x, shape)) {
    return dequant_matmul_checked(x, untile_packed(tiled, shape.bits, shape.K), scale, zero, shape, bias);
  }
  return linear_in_dtype(x, dequant_tiled_checked(tiled, scale, zero, shape, x.scalar_type()), bias);
}

at::Tensor grouped_matmul_tiled(const at::Tensor& x, const at::Tensor& offs, const at::Tensor& tiled,
                                const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group_size,
                                bool swiglu) {
  const char* op = "qatext.grouped_matmul_tiled";
  check_matmul_inputs(op, x, "tiled", tiled, std::nullopt);
  check_dim(op, "x", x, 2);
  check_dim(op, "offs", offs, 1);
  check_same_device(op, {{"x", &x}, {"offs", &offs}});
  TORCH_CHECK_TYPE(offs.scalar_type() == at::kInt, op, ": offs must be int32 (the running row counts of the experts), got ",
                   offs.scalar_type());
  const int64_t experts = offs.numel(), S = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(experts >= 1, op, ": offs must name at least one expert");
  check_tileable(op, "tiled", tiled, bits, K);
  TORCH_CHECK_VALUE(tiled.size(0) % experts == 0 && (tiled.size(0) / experts) % kTileRows == 0, op,
                    ": tiled must stack ", experts, " experts' weights of a multiple of ", kTileRows, " rows each, got ",
                    tiled.size(0), " rows");
  const GroupShape stacked = check_packed_weight(op, tiled, scale, zero, bits, group_size, K);
  GroupShape shape = stacked;
  shape.N = stacked.N / experts;
  TORCH_CHECK_VALUE(!swiglu || shape.N % (2 * kTileRows) == 0, op, ": swiglu needs each expert's gate and up rows ",
                    "in ", 2 * kTileRows, "-row multiples, got ", shape.N, " rows an expert");
#ifdef QATEXT_WITH_CUDA
  const auto dtype = x.scalar_type();
  if (x.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) && S > 0) {
    const int64_t expert_tokens = (S + std::min(S, experts) - 1) / std::max<int64_t>(1, std::min(S, experts));
    const cuda::DecodeTuning tuning = decode_tuning_for(x.get_device(), shape, expert_tokens);
    const at::Tensor a = x.contiguous(), w = lane_aligned(tiled), o = offs.contiguous();
    if (aligned16(a) && cuda::grouped_decode_supported(S, experts, expert_tokens, shape, tuning, swiglu)) {
      const at::OptionalDeviceGuard guard(at::device_of(a));
      at::Tensor out = at::empty({S, swiglu ? shape.N / 2 : shape.N}, a.options());
      at::Tensor items = at::empty({2 * cuda::grouped_decode_items(S, experts)}, o.options());
      const at::Tensor s = as_float(scale), z = as_float(zero);
      dispatch_half(dtype, [&](auto type_tag) {
        using scalar_t = decltype(type_tag);
        cuda::grouped_decode_gemm<scalar_t>(a.const_data_ptr<scalar_t>(), w.const_data_ptr<uint8_t>(),
                                            s.const_data_ptr<float>(), z.const_data_ptr<float>(),
                                            o.const_data_ptr<int>(), items.mutable_data_ptr<int>(),
                                            out.mutable_data_ptr<scalar_t>(), S, experts, expert_tokens, shape, tuning,
                                            swiglu, current_stream(a));
      });
      return out;
    }
  }
#endif
  // Elsewhere one call an expert on its rows (the offsets read on the host).
  const at::Tensor ends = offs.to(at::kCPU, at::kLong);
  const int64_t* end = ends.const_data_ptr<int64_t>();
  at::Tensor out = at::zeros({S, swiglu ? shape.N / 2 : shape.N}, x.options());
  for (int64_t e = 0, first = 0; e < experts; first = end[e], ++e) {
    TORCH_CHECK_VALUE(end[e] >= first && end[e] <= S, op, ": offs must be non-decreasing and at most x's ", S,
                      " rows, got ", end[e], " for expert ", e);
    if (end[e] == first) continue;
    const at::Tensor rows = x.narrow(0, first, end[e] - first), w = tiled.narrow(0, e * shape.N, shape.N);
    const at::Tensor s = scale.narrow(0, e * shape.N, shape.N), z = zero.narrow(0, e * shape.N, shape.N);
    out.narrow(0, first, end[e] - first).copy_(tiled_matmul_checked(rows, w, s, z, shape, std::nullopt, swiglu));
  }
  return out;
}

}  // namespace qatext::ops
