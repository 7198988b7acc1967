// UNTESTED ON A GPU (compiled with nvcc 13.0 for sm_90a only). A probe, not a kernel:
// one warpgroup issues one wgmma.mma_async.sp.sync.aligned.m64n16k32.f32.bf16.bf16 on
// operands the host laid out per thread, and returns every thread's accumulators, so that
// benchmarks/wgmma_sp_probe.py can compare them with the NumPy emulation
// (sparse_jax/kernels/_wgmma_sp_layout.py) and confirm or refute its rules on an H100/H200.
//
// Shared memory, no swizzle ("interleave"), K-major, core matrices of 8 rows x 16 bytes
// stored contiguously (128 bytes): B (K=32 x N=16): core (n / 8, k / 8) at
// ((n / 8) * 4 + k / 8) * 128 bytes, so the descriptor's leading-byte offset (between core
// matrices along K) is 128 and the stride-byte offset (between 8-row groups along N) 512.
// A, when from shared memory (64 x 16 kept values): core (m / 8, k / 8) at
// ((m / 8) * 2 + k / 8) * 128, LBO 128, SBO 256 (a_mode 1); or M-major, as Sparse24 stores
// it (a_mode 2, imm-trans-a = 1): core matrices of 8 K-rows x 8 M-values (16 bytes), core
// (m / 8, k / 8) at ((m / 8) * 2 + k / 8) * 128 + (k % 8) * 16 + (m % 8) * 2, LBO (between
// core matrices along K) 128, SBO (along M) 256, per CUTLASS's make_gmma_desc<Major::MN>
// INTERLEAVE canonical form. Descriptor fields (PTX ISA, wgmma matrix
// descriptor): address >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, swizzle
// mode 0 in 62-63.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {

constexpr int kN = 16;

__device__ uint64_t Descriptor(const void* smem, uint32_t lbo, uint32_t sbo) {
  uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((address & 0x3FFFF) >> 4);
  desc |= static_cast<uint64_t>(lbo >> 4) << 16;
  desc |= static_cast<uint64_t>(sbo >> 4) << 32;
  return desc;  // base offset 0, swizzle mode 0 (none)
}

template <int kSelector, int kAMode>  // kAMode: 0 registers, 1 smem K-major, 2 smem M-major
__global__ void __launch_bounds__(128, 1)
ProbeKernel(const uint32_t* a_registers, const uint16_t* a_kept, const uint32_t* meta, const uint16_t* b,
            float* d) {
  __shared__ alignas(128) uint16_t b_smem[32 * kN];
  __shared__ alignas(128) uint16_t a_smem[64 * 16];
  const int t = threadIdx.x;
  for (int i = t; i < 32 * kN; i += 128) {  // b is (32, kN) row-major
    const int k = i / kN, n = i % kN;
    b_smem[(((n / 8) * 4 + k / 8) * 128 + (n % 8) * 16 + (k % 8) * 2) / 2] = b[i];
  }
  for (int i = t; i < 64 * 16; i += 128) {  // a_kept is (64, 16) row-major
    const int m = i / 16, k = i % 16;
    const int in_core = kAMode == 2 ? (k % 8) * 16 + (m % 8) * 2 : (m % 8) * 16 + (k % 8) * 2;
    a_smem[(((m / 8) * 2 + k / 8) * 128 + in_core) / 2] = a_kept[i];
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const uint64_t b_desc = Descriptor(b_smem, 128, 512);
  const uint32_t e = meta[t];
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  if constexpr (kAMode != 0) {
    const uint64_t a_desc = Descriptor(a_smem, 128, 256);
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %11, 0;\n"
        "wgmma.mma_async.sp.sync.aligned.m64n16k32.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, %10, %12, p, 1, 1, %13, 0;\n}\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]),
          "+f"(acc[7])
        : "l"(a_desc), "l"(b_desc), "r"(e), "r"(0), "n"(kSelector), "n"(kAMode == 2 ? 1 : 0)
        : "memory");
  } else {
    const uint32_t a0 = a_registers[4 * t], a1 = a_registers[4 * t + 1], a2 = a_registers[4 * t + 2],
                   a3 = a_registers[4 * t + 3];
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %14, 0;\n"
        "wgmma.mma_async.sp.sync.aligned.m64n16k32.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, %13, %15, p, 1, 1, 0;\n}\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]),
          "+f"(acc[7])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b_desc), "r"(e), "r"(0), "n"(kSelector)
        : "memory");
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  for (int i = 0; i < 8; ++i) d[8 * t + i] = acc[i];
}

}  // namespace

extern "C" {

// Runs one probe. a_registers: 128 x 4 uint32 (used when a_mode == 0), a_kept: 64 x 16
// bf16 bits (used when a_mode is 1 or 2), meta: 128 uint32, b: 32 x 16 bf16 bits (row-major),
// d: 128 x 8 float out. Returns 0, or a CUDA error code with its text in err.
int wgmma_sp_probe(const uint32_t* a_registers, const uint16_t* a_kept, const uint32_t* meta, const uint16_t* b,
                   float* d, int selector, int a_mode, char* err, int err_len) {
  uint32_t *da = nullptr, *dm = nullptr;
  uint16_t *dk = nullptr, *db = nullptr;
  float* dd = nullptr;
  cudaError_t status = cudaSuccess;
  auto check = [&](cudaError_t s) { if (status == cudaSuccess) status = s; };
  check(cudaMalloc(&da, 128 * 4 * 4));
  check(cudaMalloc(&dk, 64 * 16 * 2));
  check(cudaMalloc(&dm, 128 * 4));
  check(cudaMalloc(&db, 32 * kN * 2));
  check(cudaMalloc(&dd, 128 * 8 * 4));
  if (status == cudaSuccess) {
    check(cudaMemcpy(da, a_registers, 128 * 4 * 4, cudaMemcpyHostToDevice));
    check(cudaMemcpy(dk, a_kept, 64 * 16 * 2, cudaMemcpyHostToDevice));
    check(cudaMemcpy(dm, meta, 128 * 4, cudaMemcpyHostToDevice));
    check(cudaMemcpy(db, b, 32 * kN * 2, cudaMemcpyHostToDevice));
  }
  if (status == cudaSuccess) {
    using Kernel = void (*)(const uint32_t*, const uint16_t*, const uint32_t*, const uint16_t*, float*);
    const Kernel kernels[2][3] = {{ProbeKernel<0, 0>, ProbeKernel<0, 1>, ProbeKernel<0, 2>},
                                  {ProbeKernel<1, 0>, ProbeKernel<1, 1>, ProbeKernel<1, 2>}};
    kernels[selector != 0][a_mode < 0 || a_mode > 2 ? 0 : a_mode]<<<1, 128>>>(da, dk, dm, db, dd);
    check(cudaGetLastError());
    check(cudaDeviceSynchronize());
    check(cudaMemcpy(d, dd, 128 * 8 * 4, cudaMemcpyDeviceToHost));
  }
  cudaFree(da); cudaFree(dk); cudaFree(dm); cudaFree(db); cudaFree(dd);
  if (status != cudaSuccess && err && err_len > 0) {
    std::snprintf(err, err_len, "%s: %s", cudaGetErrorName(status), cudaGetErrorString(status));
  }
  return static_cast<int>(status);
}

}  // extern "C"
