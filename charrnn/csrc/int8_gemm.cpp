// int8 x int8 -> int32 matrix products of our own, for the decode step's small batches.
//
// torch._int_mm (oneDNN) takes a small-M path that makes a batch of 2 rows cost ~3x one row,
// although both mostly read the same 3 MB of weights. Here, in the way llama.cpp's ggml and
// oneDNN's brgemm do it:
//
// * The weights are packed once (pack_int8) into the layout the dot-product instructions read:
//   blocks of 16 output channels, and within a block, groups of 4 consecutive K bytes of each
//   channel side by side, so one 64-byte load is the 16 int32 lanes of a vpdpbusd operand.
// * A tile of up to MR rows x NR blocks keeps its sums in registers, so each weight load serves
//   every row of the tile. For the decode step's batches one tile covers the batch and the
//   weights are read once, whatever the batch size up to MR.
// * Larger batches loop over panels of NR blocks (outer) and tiles of rows (inner): a panel
//   (NR * 16 channels x K bytes, 32-64 KB) stays in L1/L2 while every row tile reads it.
// * The VNNI tiles issue vpdpbusd by inline assembly (dpbusd): GCC 12 copies and spills the
//   accumulators around the intrinsic, which halved the tile's rate. With it a 12 x 2 tile
//   keeps ~1.9 vpdpbusd a cycle from L1 on Zen 5 (of 2), and an 8-row step's products run at
//   ~1.8 with the weights streaming from L3, prefetched 1 KB ahead (bench/README.md). Wider
//   tiles (8 x 3, 6 x 4 blocks) were no faster at 8 or 16 rows and slower at 9.
// * The u8 x s8 instructions (vpdpbusd, vpmaddubsw) take the activations shifted to unsigned
//   (x + 128); 128 * sum_k w[n][k] is subtracted again, precomputed per channel at pack time.
//   vpdpbusd's 32-bit sums are exact for any int8 weights (modulo 2^32, like the result).
//   vpmaddubsw adds pairs in saturating 16 bits, exact while |w| <= 64 (2 * 255 * 64 = 32,640 <
//   32,767): the decoder's 7-bit weights (charrnn/quantization.py); pack_int8 records max |w|
//   and the AVX2 path refuses anything wider.
//
// So every path gives exactly the integer sums, the same bits as torch._int_mm, which stays
// the reference (and the "onednn" path). The path is picked by CPUID at run time, the best
// first, with portable C++ last (aarch64 included); charrnn.native can force one
// (CHARRNN_INT8_KERNEL). x86 intrinsics are compiled per function with target attributes:
// the library itself is built without -march and runs on any CPU of its architecture.

#include "int8_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace charrnn {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 16;  // output channels per block: one zmm (two ymm) of int32 sums
constexpr int64_t kGroup = 4;   // K bytes of a channel per group: one vpdpbusd lane
constexpr int64_t kAlign = 64;
constexpr int64_t kShift = 128;  // u8 activation = int8 activation + 128
constexpr char kMagic[8] = {'c', 'r', 'n', 'n', 'i', '8', 'p', '1'};

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The packed form lives in the same storage as the [N, K] matrix, after it:
// [matrix, padded to 64 B][Header, 64 B][blocks x groups x 64 B of weights][int32 corrections]
// so a packed matrix is still an ordinary contiguous int8 [N, K] tensor to everything else
// (torch._int_mm, slicing, .float()), and its packed form lives and dies with it.
struct Header {
  char magic[8];
  int64_t n, k, max_abs;
};
static_assert(sizeof(Header) <= kAlign);

struct Packed {
  int64_t n = 0, k = 0, groups = 0, blocks = 0, max_abs = 0;
  const int8_t* data = nullptr;   // [blocks][groups][16 channels][4 bytes]
  const int32_t* corr = nullptr;  // [blocks * 16]: 128 * sum_k w[n][k]
};

struct Layout {
  int64_t matrix, groups, blocks, data, corr, total;  // byte offsets and sizes
};

Layout layout_of(int64_t n, int64_t k) {
  Layout l{};
  l.matrix = round_up(n * k, kAlign);
  l.groups = round_up(k, kGroup) / kGroup;
  l.blocks = round_up(n, kBlock) / kBlock;
  l.data = l.matrix + kAlign;
  l.corr = l.data + l.blocks * l.groups * kBlock * kGroup;
  l.total = l.corr + l.blocks * kBlock * static_cast<int64_t>(sizeof(int32_t));
  return l;
}

void check_matrix(const Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && w.dim() == 2 &&
                  w.is_contiguous(),
              "an int8 weight must be a contiguous int8 CPU [N, K] matrix, got ",
              w.scalar_type(), " ", w.sizes());
}

// Fills ``out`` (a buffer of layout_of(n, k).total bytes, 64-byte aligned) from the matrix w.
void pack_into(const int8_t* w, int64_t n, int64_t k, int8_t* out) {
  const Layout l = layout_of(n, k);
  std::memcpy(out, w, n * k);
  std::memset(out + n * k, 0, l.total - n * k);
  int8_t* data = out + l.data;
  int32_t* corr = reinterpret_cast<int32_t*>(out + l.corr);
  int64_t max_abs = 0;
  for (int64_t ch = 0; ch < n; ++ch) {
    const int64_t b = ch / kBlock, c = ch % kBlock;
    int64_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int8_t v = w[ch * k + j];
      data[((b * l.groups + j / kGroup) * kBlock + c) * kGroup + j % kGroup] = v;
      sum += v;
      max_abs = std::max<int64_t>(max_abs, v < 0 ? -v : v);
    }
    // Modulo 2^32, as the instructions' sums wrap (the exact result fits in int32).
    corr[ch] = static_cast<int32_t>(static_cast<uint32_t>(sum * kShift));
  }
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.n = n;
  h.k = k;
  h.max_abs = max_abs;
  std::memcpy(out + l.matrix, &h, sizeof h);
}

Tensor pack_int8(const Tensor& w) {
  check_matrix(w);
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(n >= 1 && k >= 1, "an int8 weight must have N, K >= 1, got ", w.sizes());
  Tensor storage = at::empty({layout_of(n, k).total}, at::kChar);  // 64-byte aligned
  pack_into(w.data_ptr<int8_t>(), n, k, storage.data_ptr<int8_t>());
  return storage.slice(0, 0, n * k).view({n, k});
}

// The packed form that pack_int8 left after w's values, if w is such a matrix.
bool packed_of(const Tensor& w, Packed& p) {
  if (w.storage_offset() != 0 || !w.has_storage()) return false;
  const int64_t n = w.size(0), k = w.size(1);
  const Layout l = layout_of(n, k);
  if (static_cast<int64_t>(w.storage().nbytes()) < l.total) return false;
  const int8_t* base = w.data_ptr<int8_t>();
  Header h;
  std::memcpy(&h, base + l.matrix, sizeof h);
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0 || h.n != n || h.k != k) return false;
  p.n = n;
  p.k = k;
  p.groups = l.groups;
  p.blocks = l.blocks;
  p.max_abs = h.max_abs;
  p.data = base + l.data;
  p.corr = reinterpret_cast<const int32_t*>(base + l.corr);
  return true;
}

// One tile: ``rows`` rows of activations a [rows][lda] (lda = groups * 4, padded with
// anything: the padded weights are 0) times ``nr`` blocks from ``w`` (the first of them;
// blocks are groups * 64 bytes apart), the first ``valid`` channels written to out [rows][ldc].
// ``corr`` holds the tile's channels' corrections.
struct TileArgs {
  const uint8_t* a;
  int64_t lda;
  const int8_t* w;
  int64_t groups;
  const int32_t* corr;
  int64_t valid;
  int32_t* out;
  int64_t ldc;
};
using Tile = void (*)(const TileArgs&);

inline uint32_t load4(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__x86_64__)

#define CHARRNN_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define CHARRNN_AVXVNNI __attribute__((target("avx2,avxvnni")))
#define CHARRNN_AVX2 __attribute__((target("avx2")))

// acc += x . w, four u8 x s8 products per int32 lane (vpdpbusd). Inline assembly rather than
// _mm512_dpbusd_epi32: GCC 12 copies the accumulator to another register around each of the
// intrinsic's uses in the tile's loop (and spills some of them to the stack), so an 8-row tile
// issued ~1.05 vpdpbusd a cycle instead of the ~1.8 it issues with this (of the 2 Zen 5 can).
CHARRNN_AVX512VNNI inline __m512i dpbusd(__m512i acc, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}

constexpr int64_t kPrefetch = 1024;  // 16 groups ahead

template <int MR, int NR>
CHARRNN_AVX512VNNI void tile_avx512vnni(const TileArgs& t) {
  __m512i acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_si512();
  const int64_t stride = t.groups * kBlock * kGroup;
  for (int64_t g = 0; g < t.groups; ++g) {
    __m512i w[NR];
    for (int j = 0; j < NR; ++j) {
      // The weights stream from L3 (3.2 MB a step, more than L2): asking for each block's line
      // kPrefetch bytes ahead keeps more of them in flight than the hardware prefetcher does,
      // ~10% off a 1-4-row product; past the block's end it fetches the next panel's start.
      _mm_prefetch(reinterpret_cast<const char*>(t.w + j * stride + g * 64 + kPrefetch),
                   _MM_HINT_T0);
      w[j] = _mm512_loadu_si512(t.w + j * stride + g * 64);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(load4(t.a + r * t.lda + g * kGroup)));
      for (int j = 0; j < NR; ++j) acc[r][j] = dpbusd(acc[r][j], x, w[j]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t left = t.valid - j * kBlock;
    if (left <= 0) break;
    const __mmask16 mask = left >= kBlock ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512i corr = _mm512_loadu_si512(t.corr + j * kBlock);
    for (int r = 0; r < MR; ++r)
      _mm512_mask_storeu_epi32(t.out + r * t.ldc + j * kBlock, mask,
                               _mm512_sub_epi32(acc[r][j], corr));
  }
}

// Stores two ymm of sums (16 channels) minus their corrections, the first ``left`` of them.
CHARRNN_AVX2 inline void store_block(int32_t* out, __m256i lo, __m256i hi, const int32_t* corr,
                                     int64_t left) {
  lo = _mm256_sub_epi32(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)));
  hi = _mm256_sub_epi32(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 8)));
  if (left >= kBlock) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), hi);
    return;
  }
  alignas(32) int32_t tmp[kBlock];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), hi);
  std::memcpy(out, tmp, left * sizeof(int32_t));
}

// The same for AVX-VNNI's VEX form (ymm, registers 0-15), for the same reason ("%{" is a
// literal brace in GCC's asm templates).
CHARRNN_AVXVNNI inline __m256i dpbusd_vex(__m256i acc, __m256i x, __m256i w) {
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(x), "x"(w));
  return acc;
}

template <int MR, int NR>
CHARRNN_AVXVNNI void tile_avxvnni(const TileArgs& t) {
  __m256i acc[MR][2 * NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2 * NR; ++j) acc[r][j] = _mm256_setzero_si256();
  const int64_t stride = t.groups * kBlock * kGroup;
  for (int64_t g = 0; g < t.groups; ++g) {
    __m256i w[2 * NR];
    for (int j = 0; j < 2 * NR; ++j)
      w[j] = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(t.w + (j / 2) * stride + g * 64 + (j % 2) * 32));
    for (int r = 0; r < MR; ++r) {
      const __m256i x = _mm256_set1_epi32(static_cast<int>(load4(t.a + r * t.lda + g * kGroup)));
      for (int j = 0; j < 2 * NR; ++j) acc[r][j] = dpbusd_vex(acc[r][j], x, w[j]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t left = t.valid - j * kBlock;
    if (left <= 0) break;
    for (int r = 0; r < MR; ++r)
      store_block(t.out + r * t.ldc + j * kBlock, acc[r][2 * j], acc[r][2 * j + 1],
                  t.corr + j * kBlock, left);
  }
}

template <int MR, int NR>
CHARRNN_AVX2 void tile_avx2(const TileArgs& t) {
  __m256i acc[MR][2 * NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2 * NR; ++j) acc[r][j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t stride = t.groups * kBlock * kGroup;
  for (int64_t g = 0; g < t.groups; ++g) {
    __m256i w[2 * NR];
    for (int j = 0; j < 2 * NR; ++j)
      w[j] = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(t.w + (j / 2) * stride + g * 64 + (j % 2) * 32));
    for (int r = 0; r < MR; ++r) {
      const __m256i x = _mm256_set1_epi32(static_cast<int>(load4(t.a + r * t.lda + g * kGroup)));
      for (int j = 0; j < 2 * NR; ++j) {
        // u8 x s8 pairs summed in 16 bits (exact for |w| <= 64), then pairs of pairs in 32.
        const __m256i pairs = _mm256_maddubs_epi16(x, w[j]);
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t left = t.valid - j * kBlock;
    if (left <= 0) break;
    for (int r = 0; r < MR; ++r)
      store_block(t.out + r * t.ldc + j * kBlock, acc[r][2 * j], acc[r][2 * j + 1],
                  t.corr + j * kBlock, left);
  }
}

#endif  // __x86_64__

// Portable C++: the same tiles, one block at a time, in wrapping 32-bit arithmetic (the
// instructions' modulo-2^32 sums, without signed overflow). The compiler vectorises the
// 16-channel inner loop (NEON on aarch64).
template <int MR, int NR>
void tile_portable(const TileArgs& t) {
  const int64_t stride = t.groups * kBlock * kGroup;
  for (int j = 0; j < NR; ++j) {
    const int64_t left = std::min(t.valid - j * kBlock, kBlock);
    if (left <= 0) break;
    const int8_t* w = t.w + j * stride;
    uint32_t acc[MR][kBlock] = {};
    for (int64_t g = 0; g < t.groups; ++g) {
      const int8_t* wg = w + g * kBlock * kGroup;
      for (int r = 0; r < MR; ++r) {
        const uint8_t* x = t.a + r * t.lda + g * kGroup;
        for (int64_t c = 0; c < kBlock; ++c) {
          uint32_t s = 0;
          for (int64_t i = 0; i < kGroup; ++i)
            s += static_cast<uint32_t>(static_cast<int32_t>(x[i]) * wg[c * kGroup + i]);
          acc[r][c] += s;
        }
      }
    }
    const uint32_t* corr = reinterpret_cast<const uint32_t*>(t.corr + j * kBlock);
    for (int r = 0; r < MR; ++r)
      for (int64_t c = 0; c < left; ++c)
        t.out[r * t.ldc + j * kBlock + c] = static_cast<int32_t>(acc[r][c] - corr[c]);
  }
}

// The tiles of one path for 1..Rows rows and 1..Blocks blocks: tiles[nr - 1][mr - 1] (null
// beyond its limits, which are not compiled).
constexpr int kMaxRows = 12, kMaxBlocks = 2;
using TileTable = std::array<std::array<Tile, kMaxRows>, kMaxBlocks>;

template <template <int, int> class Fn, int MR, int NR, int Rows, int Blocks>
constexpr Tile tile_or_null() {
  if constexpr (MR <= Rows && NR <= Blocks) {
    return Fn<MR, NR>::fn;
  } else {
    return nullptr;
  }
}

template <template <int, int> class Fn, int Rows, int Blocks, int NR, int... MR>
constexpr std::array<Tile, kMaxRows> row_tiles(std::integer_sequence<int, MR...>) {
  return {tile_or_null<Fn, MR + 1, NR, Rows, Blocks>()...};
}

template <template <int, int> class Fn, int Rows, int Blocks, int... NR>
constexpr TileTable table(std::integer_sequence<int, NR...>) {
  return {row_tiles<Fn, Rows, Blocks, NR + 1>(std::make_integer_sequence<int, kMaxRows>{})...};
}

template <template <int, int> class Fn, int Rows, int Blocks>
constexpr TileTable make_table() {
  static_assert(Rows <= kMaxRows && Blocks <= kMaxBlocks);
  return table<Fn, Rows, Blocks>(std::make_integer_sequence<int, kMaxBlocks>{});
}

#define CHARRNN_TILE_FN(name)                         \
  template <int MR, int NR>                           \
  struct name##_fn {                                  \
    static constexpr Tile fn = &tile_##name<MR, NR>; \
  };
CHARRNN_TILE_FN(portable)
#if defined(__x86_64__)
CHARRNN_TILE_FN(avx512vnni)
CHARRNN_TILE_FN(avxvnni)
CHARRNN_TILE_FN(avx2)
#endif

// A kernel path: its tiles and how it blocks. ``rows`` x ``blocks`` sums fit in its registers
// (AVX-512: 32 zmm; AVX2: 16 ymm, two per block) with the weights and a broadcast row.
struct Path {
  const char* name;
  const TileTable* tiles;  // null: torch._int_mm
  int rows, blocks;
  bool seven_bit;  // exact only for |w| <= 64 (vpmaddubsw)
  bool (*supported)();
};

bool always() { return true; }
#if defined(__x86_64__)
bool has_avx512vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}
bool has_avxvnni() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni"); }
bool has_avx2() { return __builtin_cpu_supports("avx2"); }
constexpr TileTable kAvx512Vnni = make_table<avx512vnni_fn, 12, 2>();
constexpr TileTable kAvxVnni = make_table<avxvnni_fn, 6, 1>();
constexpr TileTable kAvx2 = make_table<avx2_fn, 4, 1>();
#endif
constexpr TileTable kPortable = make_table<portable_fn, 4, 1>();

// Best first: "auto" is the first one the CPU has.
const std::vector<Path>& paths() {
  static const std::vector<Path> all = {
#if defined(__x86_64__)
      {"avx512vnni", &kAvx512Vnni, 12, 2, false, has_avx512vnni},
      {"avxvnni", &kAvxVnni, 6, 1, false, has_avxvnni},
      {"avx2", &kAvx2, 4, 1, true, has_avx2},
#endif
      {"portable", &kPortable, 4, 1, false, always},
      {"onednn", nullptr, 0, 0, false, always},
  };
  return all;
}

const Path* find_path(const std::string& name) {
  for (const Path& p : paths())
    if (name == p.name) return &p;
  return nullptr;
}

const Path* best_path() {
  for (const Path& p : paths())
    if (p.supported()) return &p;
  return nullptr;  // unreachable: portable is always supported
}

std::atomic<const Path*> g_path{nullptr};  // null until the first use or setting: auto
std::atomic<bool> g_auto{true};             // chosen by "auto": with AMX large batches go to oneDNN

// Above this many rows "auto" hands the product to torch._int_mm on CPUs with AMX-INT8
// (Sapphire Rapids and later): there oneDNN's large-M GEMM runs on the tile unit, faster than
// our vpdpbusd tiles (bench/README.md). Without AMX ours stay faster at every batch size (on
// a Zen 5 core at 32 and 64 rows, 285 and ~560 us a step against ~385 and ~640-720 for
// oneDNN), so "auto" keeps them. The decode step's batches and the prime's 16-row chunks stay
// below it anyway.
constexpr int64_t kOnednnRows = 24;

// AMX-INT8: CPUID leaf 7, subleaf 0, EDX bit 25 (read directly: GCC 12 and clang name it
// differently in __builtin_cpu_supports).
bool has_amx_int8() {
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 25 & 1) != 0;
#else
  return false;
#endif
}

// Whether "auto" hands a product of ``rows`` rows to torch._int_mm.
bool onednn_rows(int64_t rows) {
  static const bool amx = has_amx_int8();
  return amx && rows > kOnednnRows && g_auto.load(std::memory_order_relaxed);
}

const Path& current_path() {
  const Path* p = g_path.load(std::memory_order_relaxed);
  if (p == nullptr) {
    p = best_path();
    g_path.store(p, std::memory_order_relaxed);
  }
  return *p;
}

// The ``rows`` rows of ``act`` times one panel (``nr`` blocks from ``block``), in tiles of
// about equal size, at most ``path.rows`` each: 13 rows are tiles of 7 and 6, not 12 and 1.
void run_panel(const Path& path, const uint8_t* act, int64_t lda, int64_t rows,
               const Packed& w, int64_t block, int64_t nr, int32_t* out, int64_t ldc) {
  const int64_t tiles = (rows + path.rows - 1) / path.rows;
  const int64_t base = rows / tiles, extra = rows % tiles;
  int64_t r = 0;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t mr = base + (i < extra ? 1 : 0);
    TileArgs t{act + r * lda,
               lda,
               w.data + block * w.groups * kBlock * kGroup,
               w.groups,
               w.corr + block * kBlock,
               w.n - block * kBlock,
               out + r * ldc + block * kBlock,
               ldc};
    (*path.tiles)[nr - 1][mr - 1](t);
    r += mr;
  }
}

// x @ w^T into out [rows][w.n] (rows contiguous).
void gemm(const Path& path, const Tensor& x, const Packed& w, int32_t* o) {
  const int64_t rows = x.size(0), lda = w.groups * kGroup;
  TORCH_CHECK(!path.seven_bit || w.max_abs <= 64, "the ", path.name,
              " int8 kernel needs weights within +-64 (7-bit, charrnn.quantization), got |w| up to ",
              w.max_abs);
  if (rows == 0) return;
  // The activations shifted to unsigned (x + 128 = x ^ 0x80), each row padded to whole groups
  // (with zeros, though the padded weights are 0 anyway). With the stride and the pointers in
  // locals the loop vectorises; x.stride(0) read per byte cost ~2 us of an 8-row layer 1.
  std::unique_ptr<uint8_t[]> act(new uint8_t[rows * lda]);
  const int8_t* xp = x.data_ptr<int8_t>();
  const int64_t k = w.k, stride = x.stride(0);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = xp + r * stride;
    uint8_t* dst = act.get() + r * lda;
    for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<uint8_t>(src[j]) ^ 0x80;
    std::fill(dst + k, dst + lda, uint8_t{0});
  }
  const int64_t nr = path.blocks, panels = (w.blocks + nr - 1) / nr;
  // Rows in chunks whose activations (~32 KB) stay in L1 while every panel reads them: without
  // them 64 rows of 1 KB would be read again from L2 for each of a matrix's 64-128 panels.
  const int64_t chunk = std::max<int64_t>(path.rows, (32 << 10) / lda / path.rows * path.rows);
  // Panels on the intra-op threads when there is enough work per thread (~1M MACs).
  const int64_t panel_macs = std::max<int64_t>(1, std::min(rows, chunk) * lda * nr * kBlock);
  for (int64_t r = 0; r < rows; r += chunk) {
    const int64_t n_rows = std::min(chunk, rows - r);
    at::parallel_for(0, panels, std::max<int64_t>(1, (1 << 20) / panel_macs), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t block = p * nr;
        run_panel(path, act.get() + r * lda, lda, n_rows, w, block, std::min(nr, w.blocks - block),
                  o + r * w.n, w.n);
      }
    });
  }
}

}  // namespace

void int8_mm_out(const Tensor& x, const Tensor& w, Tensor& out) {
  check_matrix(w);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kChar && x.dim() == 2 &&
                  x.stride(1) == 1 && x.size(1) == w.size(1),
              "int8_mm: x must be an int8 CPU [M, ", w.size(1), "] with contiguous rows, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0),
              "int8_mm: out must be a contiguous int32 [", x.size(0), ", ", w.size(0), "]");
  const Path& path = current_path();
  if (path.tiles == nullptr || onednn_rows(x.size(0))) {
    at::_int_mm_out(out, x, w.t());
    return;
  }
  Packed p;
  if (packed_of(w, p)) return gemm(path, x, p, out.data_ptr<int32_t>());
  TORCH_WARN_ONCE(
      "int8 weights not packed by charrnn.native.pack_int8: packing them on every call");
  const Tensor packed = pack_int8(w);
  TORCH_CHECK(packed_of(packed, p), "pack_int8 gave no packed form");
  gemm(path, x, p, out.data_ptr<int32_t>());
}

Tensor int8_mm(const Tensor& x, const Tensor& w) {
  Tensor out = at::empty({x.dim() == 2 ? x.size(0) : 0, w.dim() == 2 ? w.size(0) : 0}, at::kInt);
  int8_mm_out(x, w, out);
  return out;
}

namespace {

// Sets the path (a name, or "auto": the best the CPU has) if given; returns the one in force.
std::string int8_kernel(const std::optional<std::string>& name) {
  if (name.has_value()) {
    const Path* p = *name == "auto" ? best_path() : find_path(*name);
    if (p == nullptr) {
      std::string known = "auto";
      for (const Path& q : paths()) known += std::string(", ") + q.name;
      TORCH_CHECK(false, "unknown int8 kernel '", *name, "' (one of ", known, ")");
    }
    TORCH_CHECK(p->supported(), "this CPU lacks the ", p->name, " int8 kernel's instructions");
    g_path.store(p, std::memory_order_relaxed);
    g_auto.store(*name == "auto", std::memory_order_relaxed);
  }
  return current_path().name;
}

// The paths this CPU can run, best first ("onednn", torch._int_mm, last).
std::vector<std::string> int8_kernels() {
  std::vector<std::string> names;
  for (const Path& p : paths())
    if (p.supported()) names.emplace_back(p.name);
  return names;
}

}  // namespace
}  // namespace charrnn

TORCH_LIBRARY_FRAGMENT(charrnn, m) {
  m.def("pack_int8(Tensor weight) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_kernel(str? name=None) -> str", &charrnn::int8_kernel);
  m.def("int8_kernels() -> str[]", &charrnn::int8_kernels);
}

TORCH_LIBRARY_IMPL(charrnn, CPU, m) {
  m.impl("pack_int8", &charrnn::pack_int8);
  m.impl("int8_mm", &charrnn::int8_mm);
}
