// Sampling, and a decode loop that samples and steps many characters in one call.
//
// charrnn.sampling.sample_next is a dozen small ATen ops per row (softmax, sort, two cumsums,
// masks, searchsorted), each paying dispatch; here the same arithmetic is one pass over the
// row in plain C++. And each character decoded from Python costs the service GIL-held Python
// around the step (turning ids into a list, the uniforms, the bookkeeping of the call);
// lstm_decode pays that once per call of `steps` characters. bench/README.md has the figures.
//
// sample gives the ids of sample_next except where a row's draw lies within float rounding
// of the edge between two characters: the softmax's exp and its sum are computed by other
// code than ATen's (tests/test_sampling.py checks both against a float64 reference). The
// random draw is the same SplitMix64 of (seed, position) as charrnn.sampling.uniforms, so a
// row's text depends only on its own seed, never on its neighbours or on how its characters
// were split into calls.
//
// With a mask (structured generation, charrnn/structured), sample first applies it as
// charrnn.sampling.sample_next does: the forbidden characters leave the row and their mass becomes
// one more outcome, "end" (id V), whose logit is their logsumexp; a row that forbids nothing
// takes the unmasked path, the same bits as without a mask.
//
// Registered as torch.ops.charrnn.sample and torch.ops.charrnn.lstm_decode next to the int8
// LSTM kernels (lstm_int8.cpp), whose step it calls through the dispatcher.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// charrnn.sampling.uniforms for one row: SplitMix64 of (seed, position) -> [0, 1).
double uniform(uint64_t seed, uint64_t position) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ULL + (position + 1) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);  // 2^53
}

struct Scratch {
  std::vector<float> probs, cum;
  std::vector<int64_t> order;
  std::vector<uint64_t> keys;
  std::vector<float> outcomes;  // a masked row's logits and "end" (empty without a mask)
  Scratch(int64_t vocab, bool masked)
      : probs(vocab + masked), cum(vocab + masked), order(vocab + masked), keys(vocab + masked),
        outcomes(masked ? vocab + 1 : 0) {}
};

// The likeliest characters of a row in the order of a stable descending sort, sorted only as
// far as the sampler reads: with thousands of characters (a corpus of source code has ~9,000)
// a full sort costs ~500 us a row, while the draw and the nucleus almost always end within the
// first few dozen. Each key is (probability descending, index ascending) in one integer:
// probabilities are >= 0, so their float bits order as the values do.
struct Ranked {
  const float* p;
  uint64_t* keys;
  int64_t* order;
  float* cum;
  int64_t k;         // the top-k candidates are keys[0, k)
  int64_t ready = 0;  // order[0, ready) and cum[0, ready) are final
  double acc = 0.0;  // cumulative mass in sorted order, in double (as ATen's CPU cumsum)

  // Makes order[r] and cum[r] final (r < k).
  void ensure(int64_t r) {
    if (r < ready) return;
    const int64_t want = std::min(k, std::max({r + 1, 2 * ready, int64_t{64}}));
    if (want < k) std::nth_element(keys + ready, keys + want, keys + k);
    std::sort(keys + ready, keys + want);
    for (int64_t i = ready; i < want; ++i) {
      order[i] = static_cast<int64_t>(keys[i] & 0xffffffffULL);
      cum[i] = static_cast<float>(acc += p[order[i]]);
    }
    ready = want;
  }
};

// One row of sample_next, step by step in its order and precision: softmax of (logits - max) / T
// in float32; a stable descending sort; the top-k and nucleus masks on the sorted probabilities;
// cumulative sums accumulated in double and rounded to float32 (as ATen's CPU cumsum does);
// the first character whose cumulative mass exceeds u times the kept mass.
int64_t sample_row(const float* logits, int64_t vocab, float temperature, int64_t top_k,
                   float top_p, double u, Scratch& s) {
  // (logits - max) / T, as sample_next: greedy where logits / T would overflow.
  float* p = s.probs.data();
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < vocab; ++j) top = std::max(top, logits[j]);
  const float t = std::max(temperature, std::numeric_limits<float>::min());
  float sum = 0.0f;
  for (int64_t j = 0; j < vocab; ++j) {
    p[j] = std::exp((logits[j] - top) / t);
    sum += p[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < vocab; ++j) p[j] *= inv;

  const int64_t k = std::clamp<int64_t>(top_k, 1, vocab);
  uint64_t* keys = s.keys.data();
  for (int64_t j = 0; j < vocab; ++j) {
    uint32_t bits;
    std::memcpy(&bits, p + j, sizeof bits);
    keys[j] = (static_cast<uint64_t>(~bits) << 32) | static_cast<uint64_t>(j);
  }
  if (k < vocab) std::nth_element(keys, keys + k, keys + vocab);  // the top k first
  // The top-k mass (summed in index order: it can differ from the sorted sum in its last bit,
  // which moves only draws within float rounding of an edge, as the header says).
  double mass = 0.0;
  for (int64_t r = 0; r < k; ++r) mass += p[keys[r] & 0xffffffffULL];
  Ranked ranked{p, keys, s.order.data(), s.cum.data(), k};
  const int64_t* order = ranked.order;
  const float* cum = ranked.cum;

  // The nucleus: the shortest prefix whose mass before each kept character stays under top_p
  // of the top-k mass (so the first character is always kept, even when top_p * mass rounds
  // to 0 in float32). With top_p >= 1 it is all of the top k.
  const float limit = top_p * static_cast<float>(mass);
  int64_t kept = k;
  if (top_p < 1.0f) {
    kept = 1;
    while (kept < k) {
      ranked.ensure(kept);
      if (!(cum[kept] - p[order[kept]] < limit)) break;
      ++kept;
    }
  }
  // The first character whose cumulative mass exceeds u times the kept mass. A character whose
  // probability rounded to 0 can never be picked, and a draw that rounds up to the whole mass
  // picks the last character with any.
  ranked.ensure(0);
  const float whole = kept == k ? static_cast<float>(mass) : cum[kept - 1];
  const float target = static_cast<float>(u) * whole;
  for (int64_t r = 0; r < kept; ++r) {
    ranked.ensure(r);
    if (r > 0 && p[order[r]] == 0.0f) return order[r - 1];
    if (cum[r] > target) return order[r];
  }
  return order[kept - 1];
}

bool bit(const int32_t* words, int64_t j) { return (words[j >> 5] >> (j & 31)) & 1; }

// A masked row's outcomes, as charrnn.sampling._draw_masked builds them: the allowed characters'
// logits, -inf for the others, and "end" (out[vocab]) with the logsumexp of the forbidden ones
// where the mask allows it. Returns false where the mask allows every character (the row then
// samples as without a mask).
bool mask_row(const float* logits, int64_t vocab, const int32_t* words, float* out) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  float top = ninf;
  bool forbids = false;
  for (int64_t j = 0; j < vocab; ++j) {
    const bool allowed = bit(words, j);
    forbids |= !allowed;
    out[j] = allowed ? logits[j] : ninf;
    if (!allowed) top = std::max(top, logits[j]);
  }
  if (!forbids) return false;
  float end = ninf;
  if (bit(words, vocab) && top != ninf) {
    float sum = 0.0f;
    for (int64_t j = 0; j < vocab; ++j)
      if (!bit(words, j)) sum += std::exp(logits[j] - top);
    end = top + std::log(sum);
  }
  out[vocab] = end;
  return true;
}

// One row of sample_next with a mask: the id of "end" (vocab) where nothing may follow.
int64_t sample_masked_row(const float* logits, int64_t vocab, const int32_t* words,
                          float temperature, int64_t top_k, float top_p, double u, Scratch& s) {
  float* out = s.outcomes.data();
  if (!mask_row(logits, vocab, words, out))
    return sample_row(logits, vocab, temperature, top_k, top_p, u, s);
  if (std::all_of(out, out + vocab + 1, [](float x) { return std::isinf(x) && x < 0; }))
    return vocab;
  return sample_row(out, vocab + 1, temperature, top_k, top_p, u, s);
}

void check_rows(const Tensor& t, int64_t batch, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 &&
                  t.size(0) == batch,
              what, " must be a ", c10::toString(dtype), " CPU vector of ", batch, " rows, got ",
              t.scalar_type(), " ", t.sizes());
}

void check_logits(const Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.size(1) >= 1,
              "logits must be a float32 CPU [B, V] with V >= 1, got ", logits.scalar_type(), " ",
              logits.sizes());
}

void check_params(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                  const Tensor& top_p) {
  check_logits(logits);
  const int64_t batch = logits.size(0);
  check_rows(temperature, batch, at::kFloat, "temperature");
  check_rows(top_k, batch, at::kLong, "top_k");
  check_rows(top_p, batch, at::kFloat, "top_p");
}

// ids [B] of rows [begin, end): the draw of row b is uniform_of(b). With ``mask`` (int32
// [B, words], words >= (V + 32) / 32), row b is masked by the first V + 1 bits of its words.
template <typename Uniform>
void sample_rows(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                 const Tensor& top_p, Uniform uniform_of, int64_t* ids,
                 const int32_t* mask = nullptr, int64_t words = 0) {
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const float* x = logits.data_ptr<float>();
  const float* t = temperature.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  const float* q = top_p.data_ptr<float>();
  at::parallel_for(0, batch, 32, [&](int64_t begin, int64_t end) {
    Scratch s(vocab, mask != nullptr);
    for (int64_t b = begin; b < end; ++b)
      ids[b] = mask ? sample_masked_row(x + b * vocab, vocab, mask + b * words, t[b], k[b], q[b],
                                        uniform_of(b), s)
                    : sample_row(x + b * vocab, vocab, t[b], k[b], q[b], uniform_of(b), s);
  });
}

// sample_next's signature: u [B] float64 uniforms; mask an optional int32 [B, W] with
// W >= (V + 32) / 32 (llguidance's masks are wider: the bits past V are its own).
Tensor sample(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
              const Tensor& top_p, const Tensor& u, const std::optional<Tensor>& mask) {
  check_params(logits, temperature, top_k, top_p);
  const int64_t batch = logits.size(0), least = (logits.size(1) + 32) / 32;
  check_rows(u, batch, at::kDouble, "u");
  if (mask.has_value())
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kInt && mask->dim() == 2 &&
                    mask->size(0) == batch && mask->size(1) >= least,
                "mask must be an int32 CPU [B, W] with W >= (V + 32) / 32 = ", least,
                " and B = ", batch, ", got ", mask->scalar_type(), " ", mask->sizes());
  const int64_t words = mask.has_value() ? mask->size(1) : 0;
  const Tensor x = logits.contiguous(), t = temperature.contiguous(), k = top_k.contiguous(),
               p = top_p.contiguous(), draws = u.contiguous();
  const Tensor m = mask.has_value() ? mask->contiguous() : Tensor();
  Tensor ids = at::empty({batch}, at::kLong);
  const double* d = draws.data_ptr<double>();
  sample_rows(x, t, k, p, [d](int64_t b) { return d[b]; }, ids.data_ptr<int64_t>(),
              m.defined() ? m.data_ptr<int32_t>() : nullptr, words);
  return ids;
}

using StepFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, at::TensorList, at::TensorList,
                                                 at::TensorList);

// `steps` characters for every row: sample from the logits, step the network on them, and
// again. Row b's draw for its s-th character here is uniform(seeds[b], positions[b] + s).
// ids [steps, B], and the logits and state after the last step. With ``seen`` (a float32
// [steps, B, V]), the logits each character was sampled from are copied into it (for
// logprobs; the caller passes it only when a row asked for them). With ``mask`` the rows draw
// through it, and a row that draws "end" (id V) has the network read character 0: an int32
// [B, W] as for ``sample`` holds for every step, an [S, B, W] gives step s its own. A mask
// depends on the draws before it, so the caller holds one for several steps only on a guess
// that it will not change, checks the guess against the matchers afterwards, and replays the
// steps with the masks they had where it was wrong (app/runner/runner.py).
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_decode(
    const Tensor& logits, const Tensor& h_all, const Tensor& c_all, const Tensor& table0,
    at::TensorList weights, at::TensorList scales, at::TensorList biases,
    const Tensor& temperature, const Tensor& top_k, const Tensor& top_p, const Tensor& seeds,
    const Tensor& positions, int64_t steps, const std::optional<Tensor>& seen,
    const std::optional<Tensor>& mask) {
  check_params(logits, temperature, top_k, top_p);
  const int64_t batch = logits.size(0);
  check_rows(seeds, batch, at::kLong, "seeds");
  check_rows(positions, batch, at::kLong, "positions");
  TORCH_CHECK(steps >= 1, "steps must be >= 1, got ", steps);
  if (seen.has_value())
    TORCH_CHECK(seen->scalar_type() == at::kFloat && seen->dim() == 3 && seen->size(0) == steps &&
                    seen->size(1) == batch && seen->size(2) == logits.size(1),
                "seen must be a float32 [steps, B, V]");
  const int64_t vocab = logits.size(1);
  if (mask.has_value()) {
    const bool per_step = mask->dim() == 3;
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kInt &&
                    (mask->dim() == 2 || (per_step && mask->size(0) == steps)) &&
                    mask->size(-2) == batch && mask->size(-1) >= (vocab + 32) / 32,
                "mask must be an int32 CPU [B, W] or [steps, B, W] with W >= (V + 32) / 32, B = ",
                batch, " and steps = ", steps, ", got ", mask->scalar_type(), " ", mask->sizes());
  }
  const Tensor m = mask.has_value() ? mask->contiguous() : Tensor();
  const int64_t words = m.defined() ? m.size(-1) : 0;
  const int64_t mask_stride = m.defined() && m.dim() == 3 ? batch * words : 0;
  static const auto step = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("charrnn::lstm_step", "")
                               .typed<StepFn>();
  const Tensor t = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const Tensor seed = seeds.contiguous(), pos = positions.contiguous();
  const uint64_t* sd = reinterpret_cast<const uint64_t*>(seed.data_ptr<int64_t>());
  const uint64_t* ps = reinterpret_cast<const uint64_t*>(pos.data_ptr<int64_t>());
  Tensor ids = at::empty({steps, batch}, at::kLong);
  Tensor x = logits.contiguous(), h = h_all, c = c_all;
  for (int64_t s = 0; s < steps; ++s) {
    Tensor row_ids = ids[s];
    if (seen.has_value()) (*seen)[s].copy_(x);
    const uint64_t offset = static_cast<uint64_t>(s);
    sample_rows(x, t, k, p, [&](int64_t b) { return uniform(sd[b], ps[b] + offset); },
                row_ids.data_ptr<int64_t>(),
                m.defined() ? m.data_ptr<int32_t>() + s * mask_stride : nullptr, words);
    Tensor read = row_ids;
    if (m.defined()) {
      read = row_ids.clone();
      int64_t* r = read.data_ptr<int64_t>();
      for (int64_t b = 0; b < batch; ++b)
        if (r[b] == vocab) r[b] = 0;  // "end": the row's text is over, any character will do
    }
    std::tie(x, h, c) = step.call(read, h, c, table0, weights, scales, biases);
    TORCH_CHECK(x.dim() == 2 && x.size(0) == batch && x.size(1) == logits.size(1),
                "the step's logits must be [B, V] like the input logits");
  }
  return {ids, x, h, c};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(charrnn, m) {
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor u, "
      "Tensor? mask=None) -> Tensor");
  m.def(
      "lstm_decode(Tensor logits, Tensor h_all, Tensor c_all, Tensor table0, Tensor[] weights, "
      "Tensor[] scales, Tensor[] biases, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor seeds, Tensor positions, int steps, Tensor(a!)? seen=None, Tensor? mask=None) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(charrnn, CPU, m) {
  m.impl("sample", &sample);
  m.impl("lstm_decode", &lstm_decode);
}
