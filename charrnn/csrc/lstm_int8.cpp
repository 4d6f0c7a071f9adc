// The int8 LSTM decode step and prime of charrnn/decode.py, with a fused cell.
//
// Op by op (charrnn/kernels.py), most of a step position's time is not the int8 matmul but a
// dozen small ATen ops (dequantize, add, sigmoid, tanh, mul, addcmul, round, cast), each
// paying dispatch and a TensorIterator (bench/README.md has the figures). Here everything around
// the matmuls (dequantizing the int32 sums, the gates, the new state, quantizing h for the
// next matmul) is one pass over the row in plain C++ that the compiler vectorises.
//
// tanh and sigmoid are a rational approximation built only from IEEE-exact operations
// (+, *, /, min, max), compiled with -ffp-contract=off: every element gets the same bits
// whatever the vector width, the CPU, the batch size or the row's position in the batch.
// So, as with the reference kernels, a row's numbers do not depend on its neighbours, and
// the prime gives exactly the state of feeding its characters one at a time to the step.
// The numbers differ from the reference kernels' (ATen's tanh) in the last bits.
//
// The int8 matmuls are charrnn::int8_mm (int8_gemm.cpp): our own kernels, on weights that
// charrnn.native.pack_int8 packed once at load, by the path the CPU (or CHARRNN_INT8_KERNEL)
// picks. Their sums are exact integers, so the path changes no bit of the result.
//
// Registered as torch.ops.charrnn.lstm_step / lstm_prime, with the signatures of
// kernels.lstm_step / kernels.lstm_prime for int8 weights. Built and loaded by
// charrnn/native.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "int8_gemm.h"
#include "lstm_int8.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <future>
#include <memory>
#include <optional>
#include <vector>

// The cell is compiled three times on x86-64 Linux, for AVX-512, AVX2 and the SSE2 baseline,
// and the loader picks one by the CPU (an ifunc). They give the same bits: the cell uses only
// correctly rounded IEEE operations and nothing is contracted into FMAs. Its helpers must be
// inlined into each copy, which GCC's growth limits would refuse in a unit this large.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__)
#define CHARRNN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CHARRNN_CLONES
#endif
#define CHARRNN_INLINE inline __attribute__((always_inline))

namespace {

using at::Tensor;

// tanh to within a few float ulps: Eigen's rational approximation (a 13th/6th degree ratio
// of odd/even polynomials), clamped where it reaches +-1.
CHARRNN_INLINE float tanh_approx(float x) {
  const float clamp = 7.90531110763549805f;
  x = std::min(std::max(x, -clamp), clamp);
  const float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = x * p;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  return p / q;
}

CHARRNN_INLINE float sigmoid_approx(float x) { return 0.5f * tanh_approx(0.5f * x) + 0.5f; }

// round(127 h) as int8 (h in [-1, 1]): adding and subtracting 1.5 * 2^23 rounds to the
// nearest integer, ties to even, like torch.round, in plain arithmetic that vectorises.
CHARRNN_INLINE int8_t quantize(float h) {
  float v = std::min(std::max(h * 127.0f, -127.0f), 127.0f);
  v = (v + 12582912.0f) - 12582912.0f;
  return static_cast<int8_t>(static_cast<int32_t>(v));
}

// Where a row's gate pre-activations come from, besides the recurrent int32 sums.
struct GateInputs {
  const float* table = nullptr;    // layer 0: fp32 input gates of the character (with biases)
  const int32_t* sums = nullptr;   // higher layers in the prime: int32 sums of the input half
  const float* scales = nullptr;   // [4H]: int32 sums -> fp32
  const float* bias = nullptr;     // [4H] for higher layers, null for layer 0
};

// A row's gates [i | f | g | o] activated into ``gates``: sigmoid of i, f and o, tanh of g, each
// of its pre-activation pre(j). One loop per activation, each element independent of the
// others: the ~100 vector operations of an element's gates and cell, in one loop as they
// were, formed a chain longer than the out-of-order window covers, ~15% slower at 8 rows.
template <class Pre>
CHARRNN_INLINE void activate(Pre pre, float* gates, int64_t hidden) {
  for (int64_t j = 0; j < 2 * hidden; ++j) gates[j] = sigmoid_approx(pre(j));
  for (int64_t j = 2 * hidden; j < 3 * hidden; ++j) gates[j] = tanh_approx(pre(j));
  for (int64_t j = 3 * hidden; j < 4 * hidden; ++j) gates[j] = sigmoid_approx(pre(j));
}

// The LSTM update of one row from its activated gates: ``c`` in place, the new h to ``h_out``.
CHARRNN_INLINE void lstm_update(const float* gates, float* c, float* h_out, int64_t hidden) {
  const float* gi = gates;
  const float* gf = gates + hidden;
  const float* gg = gates + 2 * hidden;
  const float* go = gates + 3 * hidden;
  for (int64_t j = 0; j < hidden; ++j) {
    const float cj = gf[j] * c[j] + gi[j] * gg[j];
    c[j] = cj;
    h_out[j] = go[j] * tanh_approx(cj);
  }
}

// One LSTM cell on one row. ``c`` is updated in place; h goes to ``h_out`` (fp32) and, as
// round(127 h), to ``q_out`` (the next matmul's int8 input).
CHARRNN_CLONES void cell_row(const int32_t* sums, const GateInputs& in, float* c, float* h_out, int8_t* q_out,
              int64_t hidden, float* gates) {
  const float* scales = in.scales;
  if (in.table != nullptr) {
    const float* table = in.table;
    activate([=](int64_t j) { return table[j] + static_cast<float>(sums[j]) * scales[j]; }, gates,
             hidden);
  } else if (in.sums != nullptr) {
    const int32_t* input = in.sums;
    const float* bias = in.bias;
    activate([=](int64_t j) { return static_cast<float>(input[j] + sums[j]) * scales[j] + bias[j]; },
             gates, hidden);
  } else {
    const float* bias = in.bias;
    activate([=](int64_t j) { return static_cast<float>(sums[j]) * scales[j] + bias[j]; }, gates,
             hidden);
  }
  lstm_update(gates, c, h_out, hidden);
  // A loop of its own: mixed with the float math above, the int8 stores stop vectorisation.
  for (int64_t j = 0; j < hidden; ++j) q_out[j] = quantize(h_out[j]);
}

// round(127 h) of ``rows`` rows of ``hidden`` floats (``h``, rows contiguous) into ``q`` (rows
// ``q_stride`` apart): the previous state's part of each layer's matmul input. A function of its
// own, cloned like the cell: in the step's body (SSE2) it stayed scalar, ~5 us at 8 rows.
CHARRNN_CLONES void quantize_rows(const float* h, int64_t rows, int64_t hidden, int8_t* q,
                                  int64_t q_stride) {
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t j = 0; j < hidden; ++j) q[b * q_stride + j] = quantize(h[b * hidden + j]);
}

// logits = float(sums) * scales (+ bias), [rows, n]: the two ATen ops of the head (int32 times
// float32, then the bias), each correctly rounded in float32 as they are, in one pass without
// their dispatch (~3 us a step). charrnn/decode.py's prime_all computes them with those ops.
CHARRNN_CLONES void scale_rows(const int32_t* sums, int64_t rows, int64_t n, const float* scales,
                               const float* bias, float* logits) {
  for (int64_t b = 0; b < rows; ++b) {
    const int32_t* s = sums + b * n;
    float* y = logits + b * n;
    if (bias != nullptr) {
      for (int64_t j = 0; j < n; ++j) y[j] = static_cast<float>(s[j]) * scales[j] + bias[j];
    } else {
      for (int64_t j = 0; j < n; ++j) y[j] = static_cast<float>(s[j]) * scales[j];
    }
  }
}

// The same cell for fp32 weights: ``products`` are the row's fp32 x @ W^T, and h is copied
// to ``x_out`` (the next matmul's input) as it is.
CHARRNN_CLONES void cell_row_f32(const float* products, const GateInputs& in, float* c, float* h_out,
                                 float* x_out, int64_t hidden, float* gates) {
  if (in.table != nullptr) {
    const float* table = in.table;
    activate([=](int64_t j) { return table[j] + products[j]; }, gates, hidden);
  } else {
    const float* bias = in.bias;
    activate([=](int64_t j) { return products[j] + bias[j]; }, gates, hidden);
  }
  lstm_update(gates, c, h_out, hidden);
  std::copy(h_out, h_out + hidden, x_out);
}

// Rows per fixed-shape fp32 matmul (charrnn.decode.FP32_BLOCK["cpu"]): BLAS picks its
// kernel by the row count, so every row goes through the same [8, K] GEMM whatever the
// batch size, and a row's products do not depend on its neighbours.
constexpr int64_t kBlock = 8;

// x [B, K] @ W^T in blocks of kBlock rows (the last one zero-padded): [B, N].
Tensor blocked_mm(const Tensor& x, const Tensor& weight) {
  const int64_t rows = x.size(0), padded = (rows + kBlock - 1) / kBlock * kBlock;
  Tensor xp = x;
  if (padded != rows) {
    xp = at::zeros({padded, x.size(1)}, x.options());
    xp.slice(0, 0, rows).copy_(x);
  }
  Tensor out = at::empty({padded, weight.size(0)}, x.options());
  const Tensor w_t = weight.t();
  for (int64_t r = 0; r < padded; r += kBlock) {
    Tensor part = out.slice(0, r, r + kBlock);
    at::mm_out(part, xp.slice(0, r, r + kBlock), w_t);
  }
  return padded != rows ? out.slice(0, 0, rows) : out;
}

void check_int8_matrix(const Tensor& w, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.is_contiguous(), what,
              " must be a contiguous int8 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, what, " must be [", rows,
              ", ", cols, "], got ", w.sizes());
}

void check_float_matrix(const Tensor& w, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, what, " must be [", rows,
              ", ", cols, "], got ", w.sizes());
}

void check_float_vector(const Tensor& v, int64_t size, const char* what) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.is_contiguous() &&
                  v.dim() == 1 && v.size(0) == size,
              what, " must be a contiguous float32 CPU vector of ", size);
}

std::tuple<Tensor, Tensor, Tensor> lstm_step_f32(const Tensor& ids, const Tensor& h_all,
                                                 const Tensor& c_all, const Tensor& table0,
                                                 at::TensorList weights, at::TensorList biases);

std::tuple<Tensor, Tensor, Tensor> lstm_step(const Tensor& ids, const Tensor& h_all,
                                             const Tensor& c_all, const Tensor& table0,
                                             at::TensorList weights, at::TensorList scales,
                                             at::TensorList biases) {
  TORCH_CHECK(h_all.dim() == 3 && h_all.sizes() == c_all.sizes(), "h and c must be [L, B, H]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == h_all.size(0) + 1 &&
                  scales.size() == weights.size() && biases.size() == weights.size(),
              "expected ", h_all.size(0) + 1, " weights, scales and biases");
  if (weights[0].scalar_type() == at::kFloat) {
    TORCH_CHECK(h_all.scalar_type() == at::kFloat && c_all.scalar_type() == at::kFloat,
                "h and c must be float32");
    TORCH_CHECK(h_all.size(0) >= 1 && h_all.size(2) >= 1,
                "h and c must be [L, B, H] with L, H >= 1");
    TORCH_CHECK(ids.dim() == 1 && ids.size(0) == h_all.size(1), "ids must be [B] with B = ",
                h_all.size(1));
    TORCH_CHECK(table0.dim() == 2 && table0.size(1) == 4 * h_all.size(2) &&
                    table0.scalar_type() == at::kFloat && table0.is_contiguous(),
                "table0 must be a contiguous float32 [V, 4H]");
    TORCH_CHECK(biases[0].numel() == 0,
                "layer 0's biases live in table0: biases[0] must be empty");
    for (const Tensor& sc : scales)
      TORCH_CHECK(sc.numel() == 0, "fp32 weights take no scales: every scales tensor must be empty");
    return lstm_step_f32(ids, h_all, c_all, table0, weights, biases);
  }
  charrnn::Int8Stepper stepper(h_all, c_all, table0, weights, scales, biases);
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == h_all.size(1), "ids must be [B] with B = ",
              h_all.size(1));
  TORCH_CHECK(ids.device().is_cpu() && (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt),
              "ids must be int64 or int32 on the CPU, got ", ids.scalar_type(), " on ", ids.device());
  stepper.step(ids.to(at::kLong).contiguous().data_ptr<int64_t>());
  return {stepper.logits(), stepper.h(), stepper.c()};
}

// lstm_step for fp32 weights (arguments checked there, except the matrices): the matmuls
// are fixed-shape fp32 GEMMs (blocked_mm), the cell the same as the int8 step's.
std::tuple<Tensor, Tensor, Tensor> lstm_step_f32(const Tensor& ids, const Tensor& h_all,
                                                 const Tensor& c_all, const Tensor& table0,
                                                 at::TensorList weights, at::TensorList biases) {
  // A state that requires grad (the model's own output) must not reach mm's out= variant;
  // the op has no gradient anyway.
  at::NoGradGuard no_grad;
  const int64_t layers = h_all.size(0), batch = h_all.size(1), hidden = h_all.size(2);
  for (int64_t k = 0; k < layers; ++k) {
    check_float_matrix(weights[k], 4 * hidden, k == 0 ? hidden : 2 * hidden, "an LSTM weight");
    if (k > 0) check_float_vector(biases[k], 4 * hidden, "an LSTM bias");
  }
  const int64_t vocab = weights[layers].dim() == 2 ? weights[layers].size(0) : 0;
  check_float_matrix(weights[layers], vocab, hidden, "the head's weight");
  if (biases[layers].numel() > 0) check_float_vector(biases[layers], vocab, "the head's bias");

  const Tensor h_in = h_all.contiguous(), c_in = c_all.contiguous();
  Tensor h_out = at::empty_like(h_in), c_out = c_in.clone();
  const Tensor x0 = table0.index_select(0, ids);  // checks the ids against V
  // Each layer's matmul input: layer 0 [h0], layer k [x | h_k] with x the new h of layer k - 1.
  std::vector<Tensor> inputs{h_in[0]};
  for (int64_t k = 1; k < layers; ++k) {
    Tensor x = at::empty({batch, 2 * hidden}, at::kFloat);
    x.slice(1, hidden, 2 * hidden).copy_(h_in[k]);
    inputs.push_back(x);
  }
  Tensor head_x = at::empty({batch, hidden}, at::kFloat);
  for (int64_t k = 0; k < layers; ++k) {
    const Tensor products = blocked_mm(inputs[k], weights[k]);  // [B, 4H], contiguous
    GateInputs in;
    if (k == 0) {
      in.table = x0.data_ptr<float>();
    } else {
      in.bias = biases[k].data_ptr<float>();
    }
    float* next = k + 1 < layers ? inputs[k + 1].data_ptr<float>() : head_x.data_ptr<float>();
    const int64_t next_width = k + 1 < layers ? 2 * hidden : hidden;
    const float* p = products.data_ptr<float>();
    float* c = c_out.data_ptr<float>() + k * batch * hidden;
    float* h = h_out.data_ptr<float>() + k * batch * hidden;
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> gates(4 * hidden);
      for (int64_t b = begin; b < end; ++b) {
        GateInputs row = in;
        if (row.table != nullptr) row.table += b * 4 * hidden;
        cell_row_f32(p + b * 4 * hidden, row, c + b * hidden, h + b * hidden,
                     next + b * next_width, hidden, gates.data());
      }
    });
  }
  Tensor logits = blocked_mm(head_x, weights[layers]);
  if (biases[layers].numel() > 0) logits = logits + biases[layers];
  return {logits, h_out, c_out};
}

// h and c after the prime, and round(127 h) of the last layer at every position [T, H]
// (what the head reads: the logits after each position, for scoring).
std::tuple<Tensor, Tensor, Tensor> lstm_prime_outputs(const Tensor& ids, const Tensor& table0,
                                                      at::TensorList inputs,
                                                      at::TensorList recurrent,
                                                      at::TensorList scales, at::TensorList biases,
                                                      int64_t chunk,
                                                      const std::optional<Tensor>& h0,
                                                      const std::optional<Tensor>& c0) {
  const int64_t layers = static_cast<int64_t>(recurrent.size());
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(inputs.size()) == layers &&
                  static_cast<int64_t>(scales.size()) >= layers &&
                  static_cast<int64_t>(biases.size()) >= layers,
              "expected one input, recurrent weight, scales and bias per layer");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) >= 1, "the prime must be [T] with T >= 1");
  TORCH_CHECK(chunk >= 1, "chunk must be >= 1");
  TORCH_CHECK(recurrent[0].dim() == 2, "a recurrent weight must be [4H, H]");
  const int64_t hidden = recurrent[0].size(1), steps = ids.size(0);
  chunk = std::min(chunk, steps);  // and (steps + chunk - 1) cannot overflow
  TORCH_CHECK(table0.dim() == 2 && table0.size(1) == 4 * hidden &&
                  table0.scalar_type() == at::kFloat && table0.is_contiguous(),
              "table0 must be a contiguous float32 [V, 4H]");
  for (int64_t k = 0; k < layers; ++k) {
    check_int8_matrix(recurrent[k], 4 * hidden, hidden, "a recurrent weight");
    if (k > 0) {
      check_int8_matrix(inputs[k], 4 * hidden, hidden, "an input weight");
      check_float_vector(biases[k], 4 * hidden, "an LSTM bias");
    }
    check_float_vector(scales[k], 4 * hidden, "an LSTM weight's scales");
  }
  TORCH_CHECK(inputs[0].numel() == 0 && biases[0].numel() == 0,
              "layer 0's inputs and biases live in table0: inputs[0] and biases[0] must be empty");

  // From (h0, c0) [L, 1, H] when given (a prime continued in chunks), else from zero: the
  // same numbers as one call over the whole prime, since every position only reads the state.
  TORCH_CHECK(h0.has_value() == c0.has_value(), "give both h0 and c0, or neither");
  Tensor h, c;
  if (h0.has_value()) {
    for (const Tensor* s : {&*h0, &*c0})
      TORCH_CHECK(s->dim() == 3 && s->size(0) == layers && s->size(1) == 1 &&
                      s->size(2) == hidden && s->scalar_type() == at::kFloat && s->device().is_cpu(),
                  "h0 and c0 must be float32 CPU [", layers, ", 1, ", hidden, "]");
    h = h0->contiguous().clone();
    c = c0->contiguous().clone();
  } else {
    h = at::zeros({layers, 1, hidden}, at::kFloat);
    c = at::zeros({layers, 1, hidden}, at::kFloat);
  }
  // round(127 h) of every position of every layer: the next layer's matmul inputs.
  Tensor outs = at::empty({layers, steps, hidden}, at::kChar);
  // Each layer's recurrent input before the first position: round(127 h0) (zero from zero).
  Tensor first_q = at::empty({layers, 1, hidden}, at::kChar);
  {
    const float* hp = h.data_ptr<float>();
    int8_t* qp = first_q.data_ptr<int8_t>();
    for (int64_t j = 0; j < layers * hidden; ++j) qp[j] = quantize(hp[j]);
  }

  // Layer k over positions [i * chunk, (i + 1) * chunk).
  auto run = [&](int64_t k, int64_t i) {
    const int64_t t0 = i * chunk, t1 = std::min(steps, t0 + chunk);
    const Tensor out_k = outs[k];
    const Tensor pre = k == 0 ? table0.index_select(0, ids.slice(0, t0, t1))
                              : charrnn::int8_mm(outs[k - 1].slice(0, t0, t1), inputs[k]);
    GateInputs in;
    in.scales = scales[k].data_ptr<float>();
    if (k > 0) in.bias = biases[k].data_ptr<float>();
    std::vector<float> gates(4 * hidden);
    float* hk = h.data_ptr<float>() + k * hidden;
    float* ck = c.data_ptr<float>() + k * hidden;
    for (int64_t t = t0; t < t1; ++t) {
      const Tensor q = t == 0 ? first_q[k] : out_k.slice(0, t - 1, t);
      const Tensor sums = charrnn::int8_mm(q, recurrent[k]);
      if (k == 0) {
        in.table = pre.data_ptr<float>() + (t - t0) * 4 * hidden;
      } else {
        in.sums = pre.data_ptr<int32_t>() + (t - t0) * 4 * hidden;
      }
      cell_row(sums.data_ptr<int32_t>(), in, ck, hk, out_k.data_ptr<int8_t>() + t * hidden,
               hidden, gates.data());
    }
  };

  // A wavefront over chunks: while layer k runs chunk i, layer k + 1 runs chunk i - 1 on
  // torch's inter-op pool, so the layers overlap on separate cores. A task the pool has not
  // started by the time this thread is free is run here instead (``claimed``): waiting for it
  // could deadlock when this thread is itself one of the pool's, and is slower anyway.
  struct Task {
    int64_t layer = 0;
    std::atomic<bool> claimed{false};
    std::promise<void> done;
  };
  const int64_t n = (steps + chunk - 1) / chunk;
  for (int64_t diagonal = 0; diagonal < n + layers - 1; ++diagonal) {
    std::vector<int64_t> active;
    for (int64_t k = 0; k < layers; ++k)
      if (diagonal - k >= 0 && diagonal - k < n) active.push_back(k);
    std::vector<std::shared_ptr<Task>> tasks;
    std::vector<std::future<void>> finished;
    tasks.reserve(active.size());
    finished.reserve(active.size());
    for (size_t j = 1; j < active.size(); ++j) {
      tasks.push_back(std::make_shared<Task>());
      tasks.back()->layer = active[j];
      finished.push_back(tasks.back()->done.get_future());
    }
    for (const auto& task : tasks) {
      try {
        at::launch([&run, task, diagonal] {
          if (task->claimed.exchange(true)) return;  // run by the caller instead
          try {
            run(task->layer, diagonal - task->layer);
            task->done.set_value();
          } catch (...) {
            task->done.set_exception(std::current_exception());
          }
        });
      } catch (...) {  // not launched: left unclaimed, so it runs below
      }
    }
    std::exception_ptr failed;
    auto run_here = [&](int64_t k) {
      try {
        run(k, diagonal - k);
      } catch (...) {
        if (!failed) failed = std::current_exception();
      }
    };
    run_here(active[0]);
    for (size_t j = 0; j < tasks.size(); ++j) {
      if (!tasks[j]->claimed.exchange(true)) {
        run_here(tasks[j]->layer);
        continue;
      }
      try {  // started by the pool: always wait, it uses this frame's tensors
        finished[j].get();
      } catch (...) {
        if (!failed) failed = std::current_exception();
      }
    }
    if (failed) std::rethrow_exception(failed);
  }
  return {h, c, outs[layers - 1]};
}

std::tuple<Tensor, Tensor> lstm_prime(const Tensor& ids, const Tensor& table0,
                                      at::TensorList inputs, at::TensorList recurrent,
                                      at::TensorList scales, at::TensorList biases,
                                      int64_t chunk, const std::optional<Tensor>& h0,
                                      const std::optional<Tensor>& c0) {
  auto [h, c, outs] =
      lstm_prime_outputs(ids, table0, inputs, recurrent, scales, biases, chunk, h0, c0);
  return {h, c};
}

}  // namespace

namespace charrnn {

Int8Stepper::Int8Stepper(const Tensor& h_all, const Tensor& c_all, const Tensor& table0,
                         at::TensorList weights, at::TensorList scales, at::TensorList biases) {
  TORCH_CHECK(h_all.dim() == 3 && h_all.sizes() == c_all.sizes(), "h and c must be [L, B, H]");
  TORCH_CHECK(h_all.scalar_type() == at::kFloat && c_all.scalar_type() == at::kFloat,
              "h and c must be float32");
  layers_ = h_all.size(0);
  batch_ = h_all.size(1);
  hidden_ = h_all.size(2);
  const int64_t layers = layers_, batch = batch_, hidden = hidden_;
  TORCH_CHECK(layers >= 1 && hidden >= 1, "h and c must be [L, B, H] with L, H >= 1");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers + 1 &&
                  scales.size() == weights.size() && biases.size() == weights.size(),
              "expected ", layers + 1, " weights, scales and biases");
  TORCH_CHECK(table0.dim() == 2 && table0.size(1) == 4 * hidden &&
                  table0.scalar_type() == at::kFloat && table0.is_contiguous(),
              "table0 must be a contiguous float32 [V, 4H]");
  TORCH_CHECK(biases[0].numel() == 0, "layer 0's biases live in table0: biases[0] must be empty");
  for (int64_t k = 0; k < layers; ++k) {
    check_int8_matrix(weights[k], 4 * hidden, k == 0 ? hidden : 2 * hidden, "an LSTM weight");
    check_float_vector(scales[k], 4 * hidden, "an LSTM weight's scales");
    if (k > 0) check_float_vector(biases[k], 4 * hidden, "an LSTM bias");
  }
  vocab_ = weights[layers].dim() == 2 ? weights[layers].size(0) : 0;
  check_int8_matrix(weights[layers], vocab_, hidden, "the head's weight");
  check_float_vector(scales[layers], vocab_, "the head's scales");
  if (biases[layers].numel() > 0) check_float_vector(biases[layers], vocab_, "the head's bias");
  table0_ = table0;
  weights_.assign(weights.begin(), weights.end());
  scales_.assign(scales.begin(), scales.end());
  biases_.assign(biases.begin(), biases.end());

  // h is only read as round(127 h), quantized here once: every step writes all of h_.
  const Tensor h_in = h_all.contiguous();
  h_ = at::empty_like(h_in);
  c_ = c_all.contiguous().clone();
  logits_ = at::empty({batch, vocab_}, at::kFloat);
  sums_ = at::empty({batch, 4 * hidden}, at::kInt);
  head_sums_ = at::empty({batch, vocab_}, at::kInt);
  for (int64_t k = 0; k < layers; ++k) {
    const int64_t width = k == 0 ? hidden : 2 * hidden;
    inputs_.push_back(at::empty({batch, width}, at::kChar));
    quantize_rows(h_in.data_ptr<float>() + k * batch * hidden, batch, hidden,
                  inputs_[k].data_ptr<int8_t>() + width - hidden, width);
  }
}

void Int8Stepper::step(const int64_t* ids) {
  const int64_t layers = layers_, batch = batch_, hidden = hidden_;
  // Layer 0 reads its rows of table0 in place: index_select's checks without its copy and
  // dispatch (~1 us a step).
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_INDEX(ids[b] >= 0 && ids[b] < table0_.size(0), "index ", ids[b],
                      " is out of range for table0's ", table0_.size(0), " characters");
  for (int64_t k = 0; k < layers; ++k) {
    charrnn::int8_mm_out(inputs_[k], weights_[k], sums_);  // [B, 4H]
    GateInputs in;
    in.scales = scales_[k].data_ptr<float>();
    if (k == 0) {
      in.table = table0_.data_ptr<float>();
    } else {
      in.bias = biases_[k].data_ptr<float>();
    }
    // The new round(127 h) goes where this layer's matmul reads it at the next step (its sums
    // are taken), and the next layer's input half is a copy of it.
    const int64_t width = inputs_[k].size(1);
    int8_t* q = inputs_[k].data_ptr<int8_t>() + width - hidden;
    const int32_t* s = sums_.data_ptr<int32_t>();
    float* c = c_.data_ptr<float>() + k * batch * hidden;
    float* h = h_.data_ptr<float>() + k * batch * hidden;
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> gates(4 * hidden);
      for (int64_t b = begin; b < end; ++b) {
        GateInputs row = in;
        if (row.table != nullptr) row.table += ids[b] * 4 * hidden;
        cell_row(s + b * 4 * hidden, row, c + b * hidden, h + b * hidden, q + b * width, hidden,
                 gates.data());
      }
    });
    if (k + 1 < layers) {
      int8_t* x = inputs_[k + 1].data_ptr<int8_t>();
      for (int64_t b = 0; b < batch; ++b)
        std::copy(q + b * width, q + b * width + hidden, x + b * 2 * hidden);
    }
  }
  // The head on the last layer's round(127 h), read in place.
  const Tensor& last = inputs_[layers - 1];
  charrnn::int8_mm_out(last.slice(1, last.size(1) - hidden, last.size(1)), weights_[layers],
                       head_sums_);
  scale_rows(head_sums_.data_ptr<int32_t>(), batch, vocab_, scales_[layers].data_ptr<float>(),
             biases_[layers].numel() > 0 ? biases_[layers].data_ptr<float>() : nullptr,
             logits_.data_ptr<float>());
}

}  // namespace charrnn

TORCH_LIBRARY(charrnn, m) {
  m.def(
      "lstm_step(Tensor ids, Tensor h_all, Tensor c_all, Tensor table0, Tensor[] weights, "
      "Tensor[] scales, Tensor[] biases) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lstm_prime(Tensor ids, Tensor table0, Tensor[] inputs, Tensor[] recurrent, "
      "Tensor[] scales, Tensor[] biases, int chunk, Tensor? h0=None, Tensor? c0=None) -> (Tensor, Tensor)");
  m.def(
      "lstm_prime_outputs(Tensor ids, Tensor table0, Tensor[] inputs, Tensor[] recurrent, "
      "Tensor[] scales, Tensor[] biases, int chunk, Tensor? h0=None, Tensor? c0=None) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(charrnn, CPU, m) {
  m.impl("lstm_step", &lstm_step);
  m.impl("lstm_prime", &lstm_prime);
  m.impl("lstm_prime_outputs", &lstm_prime_outputs);
}
