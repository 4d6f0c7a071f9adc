// The int8 LSTM decode step of lstm_int8.cpp on a state it holds, for decode.cpp's lstm_decode.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace charrnn {

// torch.ops.charrnn.lstm_step for int8 weights, one step after another on the same rows.
// lstm_step is one step of it; lstm_decode keeps one for all the steps of a call, so the
// checks, the allocations and round(127 h) of the state are paid once per call instead of once
// per step: each step reads the int8 h its cells wrote in the step before. The numbers are
// lstm_step's whatever the number of steps (the same code, on the same values).
class Int8Stepper {
 public:
  // Checks the arguments as lstm_step does (weights[0] int8); h_all and c_all [L, B, H] are
  // copied, not changed.
  Int8Stepper(const at::Tensor& h_all, const at::Tensor& c_all, const at::Tensor& table0,
              at::TensorList weights, at::TensorList scales, at::TensorList biases);

  // One step on the characters ``ids`` [B] (checked against V): the logits into logits(), h()
  // and c() moved on. Each step overwrites the logits of the last.
  void step(const int64_t* ids);

  const at::Tensor& logits() const { return logits_; }
  const at::Tensor& h() const { return h_; }
  const at::Tensor& c() const { return c_; }

 private:
  int64_t layers_, batch_, hidden_, vocab_;
  at::Tensor table0_;
  std::vector<at::Tensor> weights_, scales_, biases_;
  at::Tensor h_, c_, logits_;
  // Each layer's int8 matmul input: layer 0 [q(h_0)], layer k [q(x) | q(h_k)] with x the new h
  // of layer k - 1, q(h) = round(127 h); the head reads q(h) of the last layer in place.
  std::vector<at::Tensor> inputs_;
  at::Tensor sums_, head_sums_;  // int32 [B, 4H], [B, V]
};

}  // namespace charrnn
