// XLA FFI handlers that run cuSPARSELt's 2:4 sparse matmul: the yardstick for sparse_jax's
// kernels (benchmarks/matmul.py) and a candidate backend. Plain host C++ (no device code),
// so g++ builds it against the CUDA runtime and cuSPARSELt headers; see
// benchmarks/build_cusparselt_ffi.sh and sparse_jax/kernels/_cusparselt.py.
//
// Problem: y (M, N) = x (M, K) @ W (K, N), all row-major, W 2:4 along K (sparse_jax's
// layout, axis 0). Read column-major, the same bytes are y^T (N, M) = W^T (N, K) @ x^T
// (K, M), with W^T the structured operand A (2:4 along its K), x^T the dense B, no copy.
//
// Targets (platform CUDA):
//   sparse_jax_cusparselt_compress: W (K, N) bf16/f16 -> opaque uint8 buffer of
//     sparse_jax_cusparselt_compressed_size(k, n, dtype) bytes (cuSPARSELt's own format).
//   sparse_jax_cusparselt_matmul: x (M, K), compressed W, attr n -> y (M, N); attr
//     search = 1 runs cusparseLtMatmulSearch once per shape (algorithm autotuning).
// Plans are cached per (device, M, K, N, dtype) for the life of the process.

#include <cuda_runtime_api.h>
#include <cusparseLt.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr uint32_t kAlignment = 16;  // bytes; XLA buffers are at least this aligned

std::string StatusText(cusparseStatus_t status) {
  const char* name = cusparseLtGetErrorName(status);
  const char* text = cusparseLtGetErrorString(status);
  return std::string(name ? name : "?") + ": " + (text ? text : "");
}

#define SJ_CHECK_LT(expr)                                                        \
  do {                                                                           \
    cusparseStatus_t status_ = (expr);                                           \
    if (status_ != CUSPARSE_STATUS_SUCCESS) {                                    \
      return ffi::Error::Internal(std::string(#expr " failed: ") + StatusText(status_)); \
    }                                                                            \
  } while (0)

#define SJ_CHECK_CUDA(expr)                                                      \
  do {                                                                           \
    cudaError_t err_ = (expr);                                                   \
    if (err_ != cudaSuccess) {                                                   \
      return ffi::Error::Internal(std::string(#expr " failed: ") + cudaGetErrorString(err_)); \
    }                                                                            \
  } while (0)

// One cuSPARSELt handle per device, created on first use.
ffi::Error GetHandle(cusparseLtHandle_t** out) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  int device = 0;
  SJ_CHECK_CUDA(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = handles[device];
  if (!slot) {
    auto handle = std::make_unique<cusparseLtHandle_t>();
    SJ_CHECK_LT(cusparseLtInit(handle.get()));
    slot = std::move(handle);
  }
  *out = slot.get();
  return ffi::Error::Success();
}

ffi::Error CudaType(ffi::DataType dtype, cudaDataType* out) {
  switch (dtype) {
    case ffi::DataType::BF16: *out = CUDA_R_16BF; return ffi::Error::Success();
    case ffi::DataType::F16: *out = CUDA_R_16F; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("cuSPARSELt handler: expected bfloat16 or float16 operands");
  }
}

// W^T as cuSPARSELt's structured A: N x K column-major, leading dimension N.
ffi::Error InitSparseDescriptor(cusparseLtHandle_t* handle, int64_t k, int64_t n, cudaDataType type,
                                cusparseLtMatDescriptor_t* desc) {
  SJ_CHECK_LT(cusparseLtStructuredDescriptorInit(handle, desc, n, k, n, kAlignment, type,
                                                 CUSPARSE_ORDER_COL, CUSPARSELT_SPARSITY_50_PERCENT));
  return ffi::Error::Success();
}

struct Plan {
  cusparseLtMatDescriptor_t a, b, d;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t selection;
  cusparseLtMatmulPlan_t plan;
  size_t workspace_bytes = 0;
  bool searched = false;
};

using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int>;

ffi::Error GetPlan(cusparseLtHandle_t* handle, int64_t m, int64_t k, int64_t n, cudaDataType type,
                   Plan** out) {
  static std::mutex mutex;
  static std::map<PlanKey, std::unique_ptr<Plan>> plans;
  int device = 0;
  SJ_CHECK_CUDA(cudaGetDevice(&device));
  PlanKey key{device, m, k, n, static_cast<int>(type)};
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = plans[key];
  if (!slot) {
    auto p = std::make_unique<Plan>();
    if (auto err = InitSparseDescriptor(handle, k, n, type, &p->a); !err.success()) return err;
    // x^T: K x M column-major (ld K); y^T: N x M column-major (ld N).
    SJ_CHECK_LT(cusparseLtDenseDescriptorInit(handle, &p->b, k, m, k, kAlignment, type, CUSPARSE_ORDER_COL));
    SJ_CHECK_LT(cusparseLtDenseDescriptorInit(handle, &p->d, n, m, n, kAlignment, type, CUSPARSE_ORDER_COL));
    SJ_CHECK_LT(cusparseLtMatmulDescriptorInit(handle, &p->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                               CUSPARSE_OPERATION_NON_TRANSPOSE, &p->a, &p->b, &p->d, &p->d,
                                               CUSPARSE_COMPUTE_32F));
    SJ_CHECK_LT(cusparseLtMatmulAlgSelectionInit(handle, &p->selection, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
    SJ_CHECK_LT(cusparseLtMatmulPlanInit(handle, &p->plan, &p->matmul, &p->selection));
    SJ_CHECK_LT(cusparseLtMatmulGetWorkspace(handle, &p->plan, &p->workspace_bytes));
    slot = std::move(p);
  }
  *out = slot.get();
  return ffi::Error::Success();
}

ffi::Error CompressImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer w,
                        ffi::Result<ffi::AnyBuffer> compressed) {
  auto dims = w.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("sparse_jax_cusparselt_compress: w must be (K, N)");
  const int64_t k = dims[0], n = dims[1];
  cudaDataType type;
  if (auto err = CudaType(w.element_type(), &type); !err.success()) return err;
  cusparseLtHandle_t* handle = nullptr;
  if (auto err = GetHandle(&handle); !err.success()) return err;
  cusparseLtMatDescriptor_t desc;
  if (auto err = InitSparseDescriptor(handle, k, n, type, &desc); !err.success()) return err;
  size_t compressed_bytes = 0, buffer_bytes = 0;
  SJ_CHECK_LT(cusparseLtSpMMACompressedSize2(handle, &desc, &compressed_bytes, &buffer_bytes));
  if (compressed->size_bytes() != compressed_bytes) {
    std::ostringstream msg;
    msg << "sparse_jax_cusparselt_compress: output has " << compressed->size_bytes() << " bytes, cuSPARSELt wants "
        << compressed_bytes << " for K=" << k << " N=" << n;
    cusparseLtMatDescriptorDestroy(&desc);
    return ffi::Error::InvalidArgument(msg.str());
  }
  void* buffer = nullptr;
  if (buffer_bytes > 0) {
    auto allocated = scratch.Allocate(buffer_bytes, 256);
    if (!allocated.has_value()) return ffi::Error::Internal("sparse_jax_cusparselt_compress: scratch allocation failed");
    buffer = *allocated;
  }
  SJ_CHECK_LT(cusparseLtSpMMACompress2(handle, &desc, /*isSparseA=*/1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                       w.untyped_data(), compressed->untyped_data(), buffer, stream));
  SJ_CHECK_LT(cusparseLtMatDescriptorDestroy(&desc));
  return ffi::Error::Success();
}

ffi::Error MatmulImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                      ffi::AnyBuffer compressed, ffi::Result<ffi::AnyBuffer> y, int64_t n, int64_t search) {
  auto x_dims = x.dimensions();
  auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || y_dims.size() != 2 || y_dims[0] != x_dims[0] || y_dims[1] != n) {
    return ffi::Error::InvalidArgument("sparse_jax_cusparselt_matmul: expected x (M, K) and y (M, n)");
  }
  if (y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("sparse_jax_cusparselt_matmul: y must have x's dtype");
  }
  const int64_t m = x_dims[0], k = x_dims[1];
  cudaDataType type;
  if (auto err = CudaType(x.element_type(), &type); !err.success()) return err;
  cusparseLtHandle_t* handle = nullptr;
  if (auto err = GetHandle(&handle); !err.success()) return err;
  Plan* plan = nullptr;
  if (auto err = GetPlan(handle, m, k, n, type, &plan); !err.success()) return err;
  void* workspace = nullptr;
  if (plan->workspace_bytes > 0) {
    auto allocated = scratch.Allocate(plan->workspace_bytes, 256);
    if (!allocated.has_value()) return ffi::Error::Internal("sparse_jax_cusparselt_matmul: workspace allocation failed");
    workspace = *allocated;
  }
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t streams[1] = {stream};
  if (search && !plan->searched) {
    SJ_CHECK_LT(cusparseLtMatmulSearch(handle, &plan->plan, &alpha, compressed.untyped_data(), x.untyped_data(),
                                       &beta, y->untyped_data(), y->untyped_data(), workspace, streams, 1));
    plan->searched = true;
    // The search may pick a configuration needing a larger workspace.
    size_t needed = 0;
    SJ_CHECK_LT(cusparseLtMatmulGetWorkspace(handle, &plan->plan, &needed));
    if (needed > plan->workspace_bytes) {
      plan->workspace_bytes = needed;
      auto allocated = scratch.Allocate(needed, 256);
      if (!allocated.has_value()) return ffi::Error::Internal("sparse_jax_cusparselt_matmul: workspace allocation failed");
      workspace = *allocated;
    }
  }
  SJ_CHECK_LT(cusparseLtMatmul(handle, &plan->plan, &alpha, compressed.untyped_data(), x.untyped_data(), &beta,
                               y->untyped_data(), y->untyped_data(), workspace, streams, 1));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxCusparseltCompress, CompressImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseJaxCusparseltMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("search"));

// Plain C entry points for Python's ctypes (shapes are needed at trace time).
extern "C" {

// Bytes of cuSPARSELt's compressed W (K, N) (dtype 0 = bf16, 1 = f16), or -1 on error.
int64_t sparse_jax_cusparselt_compressed_size(int64_t k, int64_t n, int dtype) {
  cusparseLtHandle_t* handle = nullptr;
  if (!GetHandle(&handle).success()) return -1;
  cusparseLtMatDescriptor_t desc;
  const cudaDataType type = dtype == 0 ? CUDA_R_16BF : CUDA_R_16F;
  if (!InitSparseDescriptor(handle, k, n, type, &desc).success()) return -1;
  size_t compressed_bytes = 0, buffer_bytes = 0;
  cusparseStatus_t status = cusparseLtSpMMACompressedSize2(handle, &desc, &compressed_bytes, &buffer_bytes);
  cusparseLtMatDescriptorDestroy(&desc);
  return status == CUSPARSE_STATUS_SUCCESS ? static_cast<int64_t>(compressed_bytes) : -1;
}

// cuSPARSELt's version (major * 1000 + minor * 100 + patch style, as cusparseLtGetVersion), or -1.
int64_t sparse_jax_cusparselt_version() {
  cusparseLtHandle_t* handle = nullptr;
  if (!GetHandle(&handle).success()) return -1;
  int version = 0;
  return cusparseLtGetVersion(handle, &version) == CUSPARSE_STATUS_SUCCESS ? version : -1;
}

}  // extern "C"
