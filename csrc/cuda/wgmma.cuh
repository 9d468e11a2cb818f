// Hopper warpgroup MMA (wgmma, sm_90a) with the A operand in registers and B in shared memory, for the
// staged GEMM: a warpgroup's 4 warps each hold a 16-row A fragment laid out as mma.sync m16n8k16's (so
// a tiled weight's decoded fragments feed it unchanged), B is a [N][64] 16-bit tile of tokens in the
// 128-byte swizzle (16-byte chunk ch of row r at ch ^ (r % 8), 1024-byte aligned), and each warp's
// fp32 sums [N / 8][1][4] sit as mma.sync's accumulators of N / 8 token tiles would.
// QATEXT_WGMMA is defined only where the device code is compiled for sm_90a; callers keep another path.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cuda/ptx.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QATEXT_WGMMA 1
#endif

namespace qatext::cuda {

#ifdef QATEXT_WGMMA
// Orders this thread's register writes (A fragments, sums) before the next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed groups of this warp's wgmma are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Bulk copies into shared memory whose completion an mbarrier counts (sm_90): one thread arms the barrier
// with the bytes to come, the copy engine completes them, the readers wait for the barrier's phase.
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// (before the barrier's shared memory is used for anything else, the next block's barriers included)
__device__ __forceinline__ void mbar_inval(uint64_t* bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Descriptor of a K-major B tile in the 128-byte swizzle at shared address `addr`: start address / 16
// (bits 0-13), leading byte offset 16 (unused by a swizzled K-major tile one swizzle row deep), stride
// byte offset 1024 between 8-row groups (bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63). The
// 16-deep step j of a 64-column tile starts 32 j bytes in: the swizzle applies to the address formed.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

#define QATEXT_WGMMA_D(i) "+f"(d[i][0][0]), "+f"(d[i][0][1]), "+f"(d[i][0][2]), "+f"(d[i][0][3])

#define QATEXT_WGMMA_N64(TYPE)                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " \
               "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
               "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}," \
               "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n" \
               : QATEXT_WGMMA_D(0), QATEXT_WGMMA_D(1), QATEXT_WGMMA_D(2), QATEXT_WGMMA_D(3), \
                 QATEXT_WGMMA_D(4), QATEXT_WGMMA_D(5), QATEXT_WGMMA_D(6), QATEXT_WGMMA_D(7) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

#define QATEXT_WGMMA_N128(TYPE)                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"               \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " \
               "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
               "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
               "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
               "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}," \
               "{%64,%65,%66,%67}, %68, p, 1, 1, 0;\n}\n" \
               : QATEXT_WGMMA_D(0), QATEXT_WGMMA_D(1), QATEXT_WGMMA_D(2), QATEXT_WGMMA_D(3), \
                 QATEXT_WGMMA_D(4), QATEXT_WGMMA_D(5), QATEXT_WGMMA_D(6), QATEXT_WGMMA_D(7), \
                 QATEXT_WGMMA_D(8), QATEXT_WGMMA_D(9), QATEXT_WGMMA_D(10), QATEXT_WGMMA_D(11), \
                 QATEXT_WGMMA_D(12), QATEXT_WGMMA_D(13), QATEXT_WGMMA_D(14), QATEXT_WGMMA_D(15) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

// d += a b for a warpgroup: a this warp's 16 x 16 fragment, b the [8 MT tokens][16] step at `desc`.
template <typename T, int MT>
__device__ __forceinline__ void wgmma_rs(float (&d)[MT][1][4], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(MT == 8 || MT == 16, "wgmma for 64 or 128 tokens");
  constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
  if constexpr (MT == 8) {
    if constexpr (bf16) QATEXT_WGMMA_N64("bf16"); else QATEXT_WGMMA_N64("f16");
  } else {
    if constexpr (bf16) QATEXT_WGMMA_N128("bf16"); else QATEXT_WGMMA_N128("f16");
  }
}

#undef QATEXT_WGMMA_N64
#undef QATEXT_WGMMA_N128
#undef QATEXT_WGMMA_D
#endif  // QATEXT_WGMMA

}  // namespace qatext::cuda
