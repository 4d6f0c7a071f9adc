// The int8 matrix product of the native kernels (int8_gemm.cpp), for lstm_int8.cpp.
#pragma once

#include <ATen/ATen.h>

namespace charrnn {

// x [M, K] int8 (rows contiguous) @ w^T, w an int8 [N, K] matrix, as int32 [M, N]: the exact
// integer sums of torch._int_mm(x, w.t()), by the kernel path in force (CHARRNN_INT8_KERNEL).
// A matrix from charrnn::pack_int8 carries its packed form; any other is packed on each call.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w);

// The same into ``out``, a contiguous int32 [M, N]: the decode loop's buffers, reused from step
// to step (lstm_int8.cpp's Int8Stepper).
void int8_mm_out(const at::Tensor& x, const at::Tensor& w, at::Tensor& out);

}  // namespace charrnn
