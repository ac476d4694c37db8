// Library facts and the run-time probe. The first three functions make no CUDA driver call, so
// Python can load the library and read them on a machine without a GPU.
#include "common.cuh"

namespace grpo {
namespace {
__global__ void probe_kernel(int* out) {
  if (out != nullptr) *out = 1;
}
}  // namespace
}  // namespace grpo

GRPO_API int grpo_core_cuda_abi_version(void) { return GRPO_CORE_CUDA_ABI_VERSION; }

GRPO_API int grpo_core_cuda_runtime_version(void) { return CUDART_VERSION; }

GRPO_API const char* grpo_core_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

GRPO_API int grpo_core_cuda_probe(int device) {
  int driver = 0;
  cudaError_t err = cudaDriverGetVersion(&driver);
  if (err != cudaSuccess) return err;
  if (driver < CUDART_VERSION) return cudaErrorInsufficientDriver;  // driver older than our runtime
  int previous = 0;
  err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    // Fails with cudaErrorNoKernelImageForDevice when no SASS/PTX matches this GPU.
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, grpo::probe_kernel);
  }
  cudaSetDevice(previous);
  cudaGetLastError();  // leave no sticky state for the next launcher's cudaGetLastError
  return err;
}
