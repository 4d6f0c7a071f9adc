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
// With controls (charrnn/controls.py, a ControlsBatch's tensors), a row that has any applies
// them in their order before it samples: logit bias, penalties and DRY on a copy of its
// logits, its banned characters at -inf (where none is left, the row draws "end", id V), the
// mask, then temperature, top-k, typical-p, top-p and min-p; after the draw the row's state
// (history, counts, DRY matches, automata) moves on in place, exactly as
// ControlsBatch.record moves it. The copy guard is one more mask there, over the constraint's:
// a walk over the training text's suffix array (TextIndexView, the same arithmetic as
// charrnn/textindex.py) and a line key per row, which bite only at the steps they must. A row without controls takes the path it takes without the
// argument, and without the argument nothing here looks at controls.
//
// Registered as torch.ops.charrnn.sample and torch.ops.charrnn.lstm_decode next to the int8
// LSTM kernels (lstm_int8.cpp), whose step it runs: an Int8Stepper for int8 weights, the
// lstm_step op through the dispatcher for fp32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "lstm_int8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <utility>
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
  // With controls: a row's controlled logits, DRY's repeat length per character and the
  // characters it touched, and typical-p's and min-p's numbers (empty without controls).
  std::vector<float> adjusted, kept;
  std::vector<int32_t> repeat, touched;
  std::vector<double> q, score;
  std::vector<int64_t> rank;
  std::vector<int32_t> guard;  // the copy guard's mask (its first (V + 32) / 32 words)
  // With controls a row may be masked by its copy guard: room for "end" either way.
  Scratch(int64_t vocab, bool masked, bool controlled = false)
      : Scratch(vocab, masked || controlled, controlled, 0) {}
  Scratch(int64_t vocab, bool masked, bool controlled, int)
      : probs(vocab + masked), cum(vocab + masked), order(vocab + masked), keys(vocab + masked),
        outcomes(masked ? vocab + 1 : 0) {
    if (!controlled) return;
    guard.resize((vocab + 32) / 32);
    const int64_t n = vocab + masked;
    adjusted.resize(vocab);
    kept.resize(n);
    repeat.assign(vocab, 0);
    touched.reserve(vocab);
    q.resize(n);
    score.resize(n);
    rank.resize(n);
  }
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

// p = softmax((logits - max) / T), as sample_next: greedy where logits / T would overflow.
void softmax_row(const float* logits, int64_t vocab, float temperature, float* p) {
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
}

// Sort keys of the probabilities p: (probability descending, index ascending) in one integer.
void rank_keys(const float* p, int64_t vocab, uint64_t* keys) {
  for (int64_t j = 0; j < vocab; ++j) {
    uint32_t bits;
    std::memcpy(&bits, p + j, sizeof bits);
    keys[j] = (static_cast<uint64_t>(~bits) << 32) | static_cast<uint64_t>(j);
  }
}

// One row of sample_next, step by step in its order and precision: softmax of (logits - max) / T
// in float32; a stable descending sort; the top-k and nucleus masks on the sorted probabilities;
// cumulative sums accumulated in double and rounded to float32 (as ATen's CPU cumsum does);
// the first character whose cumulative mass exceeds u times the kept mass.
int64_t sample_row(const float* logits, int64_t vocab, float temperature, int64_t top_k,
                   float top_p, double u, Scratch& s) {
  float* p = s.probs.data();
  softmax_row(logits, vocab, temperature, p);
  const int64_t k = std::clamp<int64_t>(top_k, 1, vocab);
  uint64_t* keys = s.keys.data();
  rank_keys(p, vocab, keys);
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

// --- Generation controls (charrnn/controls.py) ---

// The columns of a ControlsBatch's tensors and of its automata's nodes: charrnn/controls.py
// names the same numbers.
enum Param {
  kRepetition, kPresence, kFrequency, kDryMultiplier, kDryBase, kTypicalP, kMinP, kParams
};
enum Limit {
  kFlags, kPenaltyLastN, kDryLastN, kDryAllowed, kCapacity, kBreakerBase, kBanBase, kMaxCopy,
  kNewline, kLimits
};
enum Cursor {
  kLength, kSince, kBreakerState, kBanState, kCopyLo, kCopyHi, kCopyLen, kLineKey, kLineLen,
  kLeft, kCursors
};
enum Node { kEdgeBegin, kEdgeEnd, kFail, kDoneBegin, kDoneEnd, kEnds, kNodeColumns };
enum Flag : int64_t {
  kBias = 1, kPenalties = 2, kDry = 4, kBans = 8, kShape = 16, kCopy = 32, kLines = 64
};
constexpr int64_t kControlTensors = 13;
constexpr uint64_t kLineP = 0x100000001B3ULL;  // textindex.LINE_P
// llama.cpp's bound on DRY's exponent, log(FLT_MAX), and the largest penalty (finite).
constexpr double kDryMaxLog = 88.7228391;
constexpr double kFloatMax = std::numeric_limits<float>::max();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One row's Aho-Corasick automaton (controls.Machine): its nodes from its base on. Its states
// (fail links, the edges' targets) are its own, 0 its root; edges and done ids are the batch's.
struct Machine {
  const int32_t* nodes;
  const int32_t* edges;
  const int32_t* done;

  const int32_t* node(int64_t s) const { return nodes + s * kNodeColumns; }
  bool ends(int64_t s) const { return node(s)[kEnds] != 0; }

  // The state after reading c in state s: the first state on s's fail chain with an edge for
  // c (edges sorted by character), else the root.
  int64_t next(int64_t s, int32_t c) const {
    for (; s >= 0; s = node(s)[kFail]) {
      const int32_t* n = node(s);
      int64_t lo = n[kEdgeBegin], hi = n[kEdgeEnd];
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (edges[2 * mid] < c) lo = mid + 1;
        else hi = mid;
      }
      if (lo < n[kEdgeEnd] && edges[2 * lo] == c) return edges[2 * lo + 1];
    }
    return 0;
  }
  // The characters that would end a string after state s: done[first, last).
  std::pair<const int32_t*, const int32_t*> done_after(int64_t s) const {
    return {done + node(s)[kDoneBegin], done + node(s)[kDoneEnd]};
  }
};

// The training text's index (textindex.TextIndex) as the copy guard reads it: ``text`` its ids
// then -1 (the end of the text, which sorts first), ``sa`` its suffix array, ``lines`` the
// sorted keys of its lines. A run being followed is a Match: the suffix-array rows [lo, hi)
// whose suffixes start with it, ``len`` characters long.
struct Match {
  int64_t lo, hi, len;
};

struct TextIndexView {
  const int32_t* text;
  const int32_t* sa;
  int64_t n;
  const uint64_t* lines;
  int64_t n_lines;

  int32_t at(int64_t row, int64_t offset) const { return text[sa[row] + offset]; }

  // The first row of [lo, hi) whose character at ``offset`` is >= c (> c with ``upper``);
  // the rows' characters there are sorted, as they all share the ``offset`` before.
  int64_t bound(int64_t lo, int64_t hi, int64_t offset, int32_t c, bool upper) const {
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const int32_t k = at(mid, offset);
      if (upper ? k <= c : k < c) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // The suffix at p against pat[0, m): < 0, 0 where it starts with pat, > 0.
  int compare(int64_t p, const int32_t* pat, int64_t m) const {
    for (int64_t i = 0; i < m; ++i)
      if (text[p + i] != pat[i]) return text[p + i] < pat[i] ? -1 : 1;
    return 0;
  }

  // The run pat[0, m) as a Match (it occurs: callers take it from the text).
  Match find(const int32_t* pat, int64_t m) const {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (compare(sa[mid], pat, m) < 0) lo = mid + 1;
      else hi = mid;
    }
    int64_t end = n, a = lo;
    while (a < end) {
      const int64_t mid = a + (end - a) / 2;
      if (compare(sa[mid], pat, m) <= 0) a = mid + 1;
      else end = mid;
    }
    return {lo, a, m};
  }

  // The run without its first character (TextIndex.shorten).
  Match shorten(const Match& m) const {
    if (m.len <= 1) return {0, n, 0};
    return find(text + sa[m.lo] + 1, m.len - 1);
  }

  // TextIndex.advance: the longest suffix of the run followed by c that occurs, at most
  // ``most`` long.
  Match advance(Match m, int32_t c, int64_t most) const {
    for (;;) {
      if (m.len >= most) {
        m = shorten(m);
        continue;
      }
      const int64_t a = bound(m.lo, m.hi, m.len, c, false);
      const int64_t b = bound(a, m.hi, m.len, c, true);
      if (b > a) return {a, b, m.len + 1};
      if (m.len == 0) return m;
      m = shorten(m);
    }
  }

  // Calls f(c) for each character that follows the run somewhere (TextIndex.next_chars).
  template <typename F>
  void next_chars(const Match& m, F f) const {
    for (int64_t i = m.lo; i < m.hi;) {
      const int32_t k = at(i, m.len);
      if (k >= 0) f(k);
      i = bound(i, m.hi, m.len, k, true);
    }
  }

  bool is_line(uint64_t key) const { return std::binary_search(lines, lines + n_lines, key); }
};

// A ControlsBatch's tensors, as pointers (the state ones written in place).
struct Controls {
  int64_t vocab, width;
  const float* bias;
  const double* params;
  const int64_t* limits;
  int32_t* counts;
  int32_t* history;
  int32_t* matches;
  int64_t* cursor;
  const int32_t* nodes;
  const int32_t* edges;
  const int32_t* done;
  TextIndexView index;

  int64_t flags(int64_t b) const { return limits[b * kLimits + kFlags]; }
  const int64_t* limit(int64_t b) const { return limits + b * kLimits; }
  const double* param(int64_t b) const { return params + b * kParams; }
  int64_t* state(int64_t b) const { return cursor + b * kCursors; }
  Machine machine(int64_t base) const { return {nodes + base * kNodeColumns, edges, done}; }
};

Controls view_controls(at::TensorList c, int64_t batch, int64_t vocab) {
  TORCH_CHECK(static_cast<int64_t>(c.size()) == kControlTensors,
              "controls must be a ControlsBatch's ", kControlTensors, " tensors, got ", c.size());
  const int64_t width = c[4].dim() == 2 ? c[4].size(1) : -1;
  const struct {
    at::ScalarType dtype;
    std::vector<int64_t> sizes;  // -1: any
    const char* what;
  } want[kControlTensors] = {
      {at::kFloat, {batch, vocab}, "bias"},          {at::kDouble, {batch, kParams}, "params"},
      {at::kLong, {batch, kLimits}, "limits"},       {at::kInt, {batch, vocab}, "counts"},
      {at::kInt, {batch, width}, "history"},         {at::kInt, {batch, width}, "matches"},
      {at::kLong, {batch, kCursors}, "cursor"},      {at::kInt, {-1, kNodeColumns}, "nodes"},
      {at::kInt, {-1, 2}, "edges"},                  {at::kInt, {-1}, "done"},
      {at::kInt, {-1}, "index text"},                {at::kInt, {-1}, "index suffix array"},
      {at::kLong, {-1}, "index line keys"},
  };
  for (int64_t i = 0; i < kControlTensors; ++i) {
    const Tensor& t = c[i];
    bool ok = t.device().is_cpu() && t.scalar_type() == want[i].dtype && t.is_contiguous() &&
              t.dim() == static_cast<int64_t>(want[i].sizes.size());
    for (int64_t d = 0; ok && d < t.dim(); ++d)
      ok = want[i].sizes[d] < 0 || t.size(d) == want[i].sizes[d];
    TORCH_CHECK(ok, "controls: ", want[i].what, " must be a contiguous ",
                c10::toString(want[i].dtype), " CPU tensor of sizes ", want[i].sizes,
                " (-1: any), got ", t.scalar_type(), " ", t.sizes());
  }
  const int64_t* limits = c[2].data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(limits[b * kLimits + kCapacity] <= width, "controls: row ", b,
                "'s history capacity exceeds the history's width ", width);
  const int64_t n = c[11].size(0);
  TORCH_CHECK(c[10].size(0) == n + 1, "controls: the index text must be its suffix array's ",
              "length + 1 (the end's -1), got ", c[10].size(0), " and ", n);
  return {vocab,
          width,
          c[0].data_ptr<float>(),
          c[1].data_ptr<double>(),
          c[2].data_ptr<int64_t>(),
          c[3].data_ptr<int32_t>(),
          c[4].data_ptr<int32_t>(),
          c[5].data_ptr<int32_t>(),
          c[6].data_ptr<int64_t>(),
          c[7].data_ptr<int32_t>(),
          c[8].data_ptr<int32_t>(),
          c[9].data_ptr<int32_t>(),
          {c[10].data_ptr<int32_t>(), c[11].data_ptr<int32_t>(), n,
           reinterpret_cast<const uint64_t*>(c[12].data_ptr<int64_t>()), c[12].size(0)}};
}

// Repetition, presence and frequency penalties on the characters seen in the row's window, as
// llama.cpp: a positive logit divided by r, a negative one multiplied by r, then
// count * frequency + presence subtracted, in float32.
void penalise_row(const Controls& cs, int64_t b, float* y) {
  const double* par = cs.param(b);
  const float r = static_cast<float>(par[kRepetition]);
  const float presence = static_cast<float>(par[kPresence]);
  const float frequency = static_cast<float>(par[kFrequency]);
  const int32_t* n = cs.counts + b * cs.vocab;
  for (int64_t j = 0; j < cs.vocab; ++j) {
    if (n[j] <= 0) continue;
    const float v = y[j] > 0 ? y[j] / r : y[j] * r;
    y[j] = v - (static_cast<float>(n[j]) * frequency + presence);
  }
}

// DRY: each character that would extend a repeat of L >= allowed characters (a suffix of the
// window's text that occurred earlier in it, no longer than the text since a sequence breaker
// last ended) loses multiplier * base^(L - allowed), the exponent at most llama.cpp's bound.
// A one-character breaker is never penalised. matches[j] is how many characters end both at
// j and at the end of the text, clamped here to the window.
void dry_row(const Controls& cs, int64_t b, float* y, Scratch& s) {
  const int64_t* lim = cs.limit(b);
  const int64_t* cur = cs.state(b);
  const int64_t len = cur[kLength], since = cur[kSince], allowed = lim[kDryAllowed];
  const int64_t start = std::max<int64_t>(0, len - lim[kDryLastN]);
  if (std::min(since, len - 1 - start) < allowed) return;  // no repeat can be that long
  const int32_t* h = cs.history + b * cs.width;
  const int32_t* m = cs.matches + b * cs.width;
  int32_t* repeat = s.repeat.data();
  s.touched.clear();
  // A repeat ending at j is at most j - start + 1 long: the scan starts where that reaches
  // allowed, and looks closer only at blocks where some matches[j] does (most have none).
  constexpr int64_t kBlock = 64;
  for (int64_t from = start + allowed - 1; from + 1 < len; from += kBlock) {
    const int64_t to = std::min(from + kBlock, len - 1);
    int32_t most = 0;
    for (int64_t j = from; j < to; ++j) most = std::max(most, m[j]);
    if (most < allowed) continue;
    for (int64_t j = from; j < to; ++j) {
      if (m[j] < allowed) continue;
      const int64_t n = std::min({static_cast<int64_t>(m[j]), j - start + 1, since});
      const int32_t c = h[j + 1];
      if (repeat[c] == 0) s.touched.push_back(c);
      repeat[c] = std::max(repeat[c], static_cast<int32_t>(n));
    }
  }
  const int32_t *single = nullptr, *singles_end = nullptr;  // the one-character breakers
  if (lim[kBreakerBase] >= 0)
    std::tie(single, singles_end) = cs.machine(lim[kBreakerBase]).done_after(0);
  const double multiplier = cs.param(b)[kDryMultiplier], base = cs.param(b)[kDryBase];
  const int64_t top = static_cast<int64_t>(kDryMaxLog / std::log(base));
  for (const int32_t c : s.touched) {
    if (std::find(single, singles_end, c) == singles_end) {
      const double exponent = static_cast<double>(std::min<int64_t>(repeat[c] - allowed, top));
      y[c] -= static_cast<float>(std::min(multiplier * std::pow(base, exponent), kFloatMax));
    }
    repeat[c] = 0;
  }
}

// The row's banned characters (those that would end a banned string) at -inf. Returns whether
// any character is left.
bool ban_row(const Controls& cs, int64_t b, float* y) {
  const auto [first, last] = cs.machine(cs.limit(b)[kBanBase]).done_after(cs.state(b)[kBanState]);
  for (const int32_t* c = first; c < last; ++c) y[*c] = kNegInf;
  return std::any_of(y, y + cs.vocab, [](float v) { return v != kNegInf; });
}

// The copy guard's mask for row b's next character (ControlsBatch.guard), over ``words`` (the
// constraint's mask, or null: every character, but not "end"), in s.guard. Returns the mask
// to sample with: ``words`` itself where the guard forbids nothing here.
const int32_t* guard_row(const Controls& cs, int64_t b, const int32_t* words, Scratch& s) {
  const int64_t flags = cs.flags(b), vocab = cs.vocab;
  const int64_t* lim = cs.limit(b);
  const int64_t* cur = cs.state(b);
  const TextIndexView& ix = cs.index;
  int32_t* g = s.guard.data();
  bool copied = false;
  auto forbid = [&](int64_t j) {
    if (!copied) {
      const int64_t n = static_cast<int64_t>(s.guard.size());
      for (int64_t w = 0; w < n; ++w) g[w] = words ? words[w] : -1;
      // The guard never says that a text may end: without a constraint's mask, "end" comes
      // only where nothing is left.
      if (!words) g[vocab >> 5] &= ~(int32_t{1} << (vocab & 31));
      copied = true;
    }
    g[j >> 5] &= ~(int32_t{1} << (j & 31));
  };
  if ((flags & kCopy) && cur[kCopyLen] == lim[kMaxCopy])
    ix.next_chars({cur[kCopyLo], cur[kCopyHi], cur[kCopyLen]}, forbid);
  if (flags & kLines) {
    const uint64_t key = static_cast<uint64_t>(cur[kLineKey]);
    const int64_t newline = lim[kNewline];
    if (cur[kLineLen] > 0 && ix.is_line(key)) {  // the text would end on a training line
      forbid(vocab);
      if (newline >= 0) forbid(newline);
    }
    if (cur[kLeft] == 1)  // the last character: it ends the last line
      for (int64_t j = 0; j < vocab; ++j)
        if (j != newline && ix.is_line(key * kLineP + static_cast<uint64_t>(j + 1))) forbid(j);
  }
  return copied ? g : words;
}

// Row b's copy guard after it drew character c (ControlsBatch._guard_advance).
void guard_record(const Controls& cs, int64_t b, int32_t c, int64_t flags) {
  const int64_t* lim = cs.limit(b);
  int64_t* cur = cs.state(b);
  if (flags & kCopy) {
    const Match m = cs.index.advance({cur[kCopyLo], cur[kCopyHi], cur[kCopyLen]}, c,
                                     lim[kMaxCopy]);
    cur[kCopyLo] = m.lo;
    cur[kCopyHi] = m.hi;
    cur[kCopyLen] = m.len;
  }
  if (flags & kLines) {
    const bool newline = c == lim[kNewline];
    const uint64_t key = static_cast<uint64_t>(cur[kLineKey]) * kLineP + static_cast<uint64_t>(c + 1);
    cur[kLineKey] = newline ? 0 : static_cast<int64_t>(key);
    cur[kLineLen] = newline ? 0 : cur[kLineLen] + 1;
  }
  --cur[kLeft];
}

// Locally typical sampling on w[0, k) (the top k's probabilities, likeliest first): zeroes the
// characters outside the typical set, as charrnn.sampling._typical (float64, sums in order).
void typical(float* w, int64_t k, double typical_p, Scratch& s) {
  double* q = s.q.data();
  double* score = s.score.data();
  int64_t* rank = s.rank.data();
  double mass = 0.0, entropy = 0.0;
  for (int64_t r = 0; r < k; ++r) mass += w[r];
  for (int64_t r = 0; r < k; ++r) {
    q[r] = w[r] / mass;
    score[r] = q[r] > 0 ? std::log(q[r]) : 0.0;  // log q for now
    entropy += -q[r] * score[r];
  }
  for (int64_t r = 0; r < k; ++r)
    score[r] = q[r] > 0 ? std::abs(-score[r] - entropy) : std::numeric_limits<double>::infinity();
  std::iota(rank, rank + k, int64_t{0});
  std::stable_sort(rank, rank + k, [score](int64_t a, int64_t b) { return score[a] < score[b]; });
  double before = 0.0;  // the mass of the characters closer to the entropy
  for (int64_t i = 0; i < k; ++i) {
    if (!(before <= typical_p)) w[rank[i]] = 0.0f;
    before += q[rank[i]];
  }
}

// One row of charrnn.sampling._draw with typical-p and min-p (_draw_shaped): the top k, then
// typical-p, the nucleus and min-p each zero characters, then the draw over those left.
int64_t sample_shaped_row(const float* logits, int64_t n, float temperature, int64_t top_k,
                          float top_p, double typical_p, float min_p, double u, Scratch& s) {
  float* p = s.probs.data();
  softmax_row(logits, n, temperature, p);
  const int64_t k = std::clamp<int64_t>(top_k, 1, n);
  uint64_t* keys = s.keys.data();
  rank_keys(p, n, keys);
  std::partial_sort(keys, keys + k, keys + n);
  int64_t* order = s.order.data();
  float* w = s.kept.data();
  for (int64_t r = 0; r < k; ++r) {
    order[r] = static_cast<int64_t>(keys[r] & 0xffffffffULL);
    w[r] = p[order[r]];
  }
  if (typical_p < 1.0) typical(w, k, typical_p, s);
  // The nucleus among those kept: the likeliest kept always stays.
  float* cum = s.cum.data();
  double acc = 0.0;
  for (int64_t r = 0; r < k; ++r) cum[r] = static_cast<float>(acc += w[r]);
  const float limit = top_p * cum[k - 1];
  bool first = true;
  for (int64_t r = 0; r < k; ++r) {
    if (w[r] <= 0.0f) continue;
    if (!first && !(cum[r] - w[r] < limit)) w[r] = 0.0f;
    first = false;
  }
  // min-p: at least min_p times the likeliest kept character's probability.
  const float floor = min_p * *std::max_element(w, w + k);
  for (int64_t r = 0; r < k; ++r)
    if (!(w[r] >= floor)) w[r] = 0.0f;
  acc = 0.0;
  int64_t last = 0;
  for (int64_t r = 0; r < k; ++r) {
    cum[r] = static_cast<float>(acc += w[r]);
    if (w[r] > 0.0f) last = r;
  }
  const float target = static_cast<float>(u) * cum[k - 1];
  for (int64_t r = 0; r < k; ++r)
    if (cum[r] > target) return order[r];
  return order[last];
}

// One row with controls (flags != 0): its controls on a copy of its logits, then the mask
// (words, or none), then the filters. "end" (vocab) where nothing may follow.
int64_t sample_controlled_row(const float* logits, int64_t vocab, const int32_t* words,
                              float temperature, int64_t top_k, float top_p, double u,
                              const Controls& cs, int64_t b, Scratch& s) {
  const int64_t flags = cs.flags(b);
  float* y = s.adjusted.data();
  std::copy(logits, logits + vocab, y);
  if (flags & kBias) {
    const float* bias = cs.bias + b * vocab;
    for (int64_t j = 0; j < vocab; ++j) y[j] += bias[j];
  }
  if (flags & kPenalties) penalise_row(cs, b, y);
  if (flags & kDry) dry_row(cs, b, y, s);
  if ((flags & kBans) && !ban_row(cs, b, y)) return vocab;  // every character banned
  if (flags & (kCopy | kLines)) words = guard_row(cs, b, words, s);
  const float* x = y;
  int64_t n = vocab;
  if (words != nullptr && mask_row(y, vocab, words, s.outcomes.data())) {
    x = s.outcomes.data();
    n = vocab + 1;
    if (std::all_of(x, x + n, [](float v) { return v == kNegInf; })) return vocab;
  }
  if (!(flags & kShape)) return sample_row(x, n, temperature, top_k, top_p, u, s);
  const double* par = cs.param(b);
  return sample_shaped_row(x, n, temperature, top_k, top_p, par[kTypicalP],
                           static_cast<float>(par[kMinP]), u, s);
}

// Row b's history after character c (controls.ControlsBatch._push): full, it keeps its newer
// half; the penalty window's counts and DRY's matches move with it.
void push(const Controls& cs, int64_t b, int32_t c, int64_t flags) {
  const int64_t* lim = cs.limit(b);
  int64_t* cur = cs.state(b);
  int32_t* h = cs.history + b * cs.width;
  int32_t* m = cs.matches + b * cs.width;
  int64_t n = cur[kLength];
  if (n == lim[kCapacity]) {
    const int64_t keep = n / 2;
    std::memmove(h, h + n - keep, keep * sizeof *h);
    std::memmove(m, m + n - keep, keep * sizeof *m);
    n = keep;
  }
  if (flags & kPenalties) {
    int32_t* counts = cs.counts + b * cs.vocab;
    const int64_t window = lim[kPenaltyLastN];
    if (n >= window) --counts[h[n - window]];
    ++counts[c];
  }
  if (flags & kDry) {
    // A match at i goes on where the character at i is c, from the one at i - 1.
    // (Downwards, each i reads m[i - 1] before it is written: the compiler vectorises it.)
    const int64_t lo = std::max<int64_t>(0, n + 1 - lim[kDryLastN]);
    for (int64_t i = n - 1; i >= std::max<int64_t>(lo, 1); --i)
      m[i] = h[i] == c ? m[i - 1] + 1 : 0;
    if (lo == 0 && n > 0) m[0] = h[0] == c ? 1 : 0;
  }
  m[n] = 0;
  h[n] = c;
  cur[kLength] = n + 1;
}

// Row b's state after it drew character c (controls.ControlsBatch._advance).
void record(const Controls& cs, int64_t b, int32_t c) {
  const int64_t flags = cs.flags(b);
  const int64_t* lim = cs.limit(b);
  int64_t* cur = cs.state(b);
  if (flags & (kPenalties | kDry)) push(cs, b, c, flags);
  if (flags & kDry) {
    if (lim[kBreakerBase] < 0) {
      ++cur[kSince];
    } else {
      const Machine breakers = cs.machine(lim[kBreakerBase]);
      cur[kBreakerState] = breakers.next(cur[kBreakerState], c);
      cur[kSince] = breakers.ends(cur[kBreakerState]) ? 0 : cur[kSince] + 1;
    }
  }
  if (flags & kBans) cur[kBanState] = cs.machine(lim[kBanBase]).next(cur[kBanState], c);
  if (flags & (kCopy | kLines)) guard_record(cs, b, c, flags);
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
// With ``controls``, a row that has any samples through them and then records its draw.
template <typename Uniform>
void sample_rows(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                 const Tensor& top_p, Uniform uniform_of, int64_t* ids,
                 const int32_t* mask = nullptr, int64_t words = 0,
                 const Controls* controls = nullptr) {
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const float* x = logits.data_ptr<float>();
  const float* t = temperature.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  const float* q = top_p.data_ptr<float>();
  at::parallel_for(0, batch, 32, [&](int64_t begin, int64_t end) {
    Scratch s(vocab, mask != nullptr, controls != nullptr);
    for (int64_t b = begin; b < end; ++b) {
      const int32_t* row_mask = mask ? mask + b * words : nullptr;
      if (controls != nullptr && controls->flags(b) != 0) {
        ids[b] = sample_controlled_row(x + b * vocab, vocab, row_mask, t[b], k[b], q[b],
                                       uniform_of(b), *controls, b, s);
        if (ids[b] < vocab) record(*controls, b, static_cast<int32_t>(ids[b]));
        continue;
      }
      ids[b] = row_mask ? sample_masked_row(x + b * vocab, vocab, row_mask, t[b], k[b], q[b],
                                            uniform_of(b), s)
                        : sample_row(x + b * vocab, vocab, t[b], k[b], q[b], uniform_of(b), s);
    }
  });
}

// sample_next's signature: u [B] float64 uniforms; mask an optional int32 [B, W] with
// W >= (V + 32) / 32 (llguidance's masks are wider: the bits past V are its own); controls
// an optional ControlsBatch's tensors, whose state each row with controls advances by its draw.
Tensor sample(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
              const Tensor& top_p, const Tensor& u, const std::optional<Tensor>& mask,
              std::optional<at::TensorList> controls) {
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
  std::optional<Controls> cs;
  if (controls.has_value()) cs = view_controls(*controls, batch, logits.size(1));
  Tensor ids = at::empty({batch}, at::kLong);
  const double* d = draws.data_ptr<double>();
  sample_rows(x, t, k, p, [d](int64_t b) { return d[b]; }, ids.data_ptr<int64_t>(),
              m.defined() ? m.data_ptr<int32_t>() : nullptr, words, cs ? &*cs : nullptr);
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
// steps with the masks they had where it was wrong (app/runner/runner.py). With ``controls``
// (a ControlsBatch's tensors) the rows draw through them and their state moves on after every
// draw, as one ``sample`` per step would move it; a row that draws "end" reads character 0.
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_decode(
    const Tensor& logits, const Tensor& h_all, const Tensor& c_all, const Tensor& table0,
    at::TensorList weights, at::TensorList scales, at::TensorList biases,
    const Tensor& temperature, const Tensor& top_k, const Tensor& top_p, const Tensor& seeds,
    const Tensor& positions, int64_t steps, const std::optional<Tensor>& seen,
    const std::optional<Tensor>& mask, std::optional<at::TensorList> controls) {
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
  std::optional<Controls> cs;
  if (controls.has_value()) cs = view_controls(*controls, batch, vocab);
  const int64_t mask_stride = m.defined() && m.dim() == 3 ? batch * words : 0;
  static const auto step = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("charrnn::lstm_step", "")
                               .typed<StepFn>();
  const Tensor t = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const Tensor seed = seeds.contiguous(), pos = positions.contiguous();
  const uint64_t* sd = reinterpret_cast<const uint64_t*>(seed.data_ptr<int64_t>());
  const uint64_t* ps = reinterpret_cast<const uint64_t*>(pos.data_ptr<int64_t>());
  Tensor ids = at::empty({steps, batch}, at::kLong);
  // int8 weights step on one Int8Stepper for the whole call (its buffers and its int8 state
  // reused from step to step: ~4 us less a step at 1 row and 8 rows, of ~39 and ~78 on a
  // Zen 5 core); fp32 weights through the dispatcher.
  std::optional<charrnn::Int8Stepper> stepper;
  if (!weights.empty() && weights[0].scalar_type() == at::kChar) {
    stepper.emplace(h_all, c_all, table0, weights, scales, biases);
    // The check the step makes of its ids (one per row of the logits) against the state's rows.
    TORCH_CHECK(h_all.size(1) == batch, "ids must be [B] with B = ", h_all.size(1),
                " (the state's rows), got ", batch, " rows of logits");
  }
  Tensor x = logits.contiguous(), h = h_all, c = c_all;
  Tensor read = at::empty({batch}, at::kLong);
  for (int64_t s = 0; s < steps; ++s) {
    int64_t* row_ids = ids.data_ptr<int64_t>() + s * batch;
    if (seen.has_value()) (*seen)[s].copy_(x);
    const uint64_t offset = static_cast<uint64_t>(s);
    sample_rows(x, t, k, p, [&](int64_t b) { return uniform(sd[b], ps[b] + offset); }, row_ids,
                m.defined() ? m.data_ptr<int32_t>() + s * mask_stride : nullptr, words,
                cs ? &*cs : nullptr);
    int64_t* r = read.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b)
      r[b] = row_ids[b] == vocab ? 0 : row_ids[b];  // "end": the row's text is over, any will do
    if (stepper) {
      stepper->step(r);
      x = stepper->logits();
    } else {
      std::tie(x, h, c) = step.call(read, h, c, table0, weights, scales, biases);
    }
    TORCH_CHECK(x.dim() == 2 && x.size(0) == batch && x.size(1) == logits.size(1),
                "the step's logits must be [B, V] like the input logits");
  }
  if (stepper) return {ids, x, stepper->h(), stepper->c()};
  return {ids, x, h, c};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(charrnn, m) {
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor u, "
      "Tensor? mask=None, Tensor(a!)[]? controls=None) -> Tensor");
  m.def(
      "lstm_decode(Tensor logits, Tensor h_all, Tensor c_all, Tensor table0, Tensor[] weights, "
      "Tensor[] scales, Tensor[] biases, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor seeds, Tensor positions, int steps, Tensor(a!)? seen=None, Tensor? mask=None, "
      "Tensor(a!)[]? controls=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(charrnn, CPU, m) {
  m.impl("sample", &sample);
  m.impl("lstm_decode", &lstm_decode);
}
