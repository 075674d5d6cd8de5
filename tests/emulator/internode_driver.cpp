// In-process multi-rank driver of the internode kernels (csrc/kernels/internode.cu) on the emulated
// device and its emulated NVSHMEM (csrc/emulator/nvshmem.cpp).
//
// R ranks are std::threads of one process, --per-node L of them per emulated node
// (EP_COMM_RANKS_PER_NODE, read by the emulated NVSHMEM at initialisation: nvshmem_ptr maps only
// same-node peers, so the NVLink leg stores into peers' heaps and the RDMA leg goes through puts
// and signals, delivered late and out of order by the emulated network). Rank r uses emulated device
// r, which is NVSHMEM PE r (driver_common.hpp: init_nvshmem_pe), and its own InternodeRuntime. So
// ThreadSanitizer and AddressSanitizer see the real cross-rank sharing that rank processes hide.
//
// Every rank runs the call sequence of ep_comm/backends/internode.py with the same C++ entry points
// the bindings call, per case on one buffer (calls are numbered on the device, so cases reuse the
// rings and counters of the ones before):
//   get_dispatch_layout -> (host: cumsum of is_token_in_rank) -> notify -> (host reads the receive
//   count, unless num_worst_tokens) -> dispatch [-> notify -> cached dispatch] -> notify -> combine
// Cases (--cases, comma separated; default all):
//   bf16    bf16 rows with top-k weights; combine with weights and two biases
//   fp8     1-byte rows + float32 scales (column-major: strides (1, N)), no weights; combine with
//           neither weights nor biases
//   cached  bf16 dispatch with weights, then a cached dispatch (same handle) of new FP8 rows and
//           scales; combine with weights and one bias
//   worst   num_worst_tokens = the largest receive count + 3 (no host read; padding rows must stay
//           zero / -1); combine over all num_worst_tokens rows with one bias
// Inputs are seeded per case and rank: uneven token counts (<= --tokens), one rank with zero tokens
// (a different one per case), ~20% of top-k entries -1, token 1 of each rank goes nowhere, distinct
// experts per token. Channel counts alternate between --channels and --channels / 2 per case.
//
// Everything is compared with plain host loops written here from all ranks' inputs, bit for bit:
// the layout (counts per rank, node, expert; is_token_in_rank), rank_matrix and recv_info of
// notify; recv_x, scales, recv_topk_idx (local expert or -1), recv_topk_weights (0 where not
// mine), recv_src_token in the documented row order (source rank major, ascending token within a
// source: row = rows before mine from lower sources + my index among this source's tokens for the
// rank); the combined rows and weights in the kernels' summation order: per destination node the
// rows of its local ranks in local-rank order in float32 from 0 (the forwarder), rounded to bf16
// (unless --float-partials), then those node partials in node order from 0 (the source's receiver), then bias0, then bias1, one rounding to
// bf16. That order is the kernels' by construction, so the comparison is exact, not a tolerance.
//
// Exit status: 0 everything matched; 1 a mismatch; 2 bad usage; 3 an emulated-device fault
// (deadlock, divergent collective, NVSHMEM misuse, hang: printed by the emulator); 4 a kernel or
// runtime error (device timeout, invalid input, runtime.check_error()); 5 the driver's own
// deadline. Sanitizer reports exit through the sanitizer (TSan exitcode, ASan abort).
//
// Build: python scripts/emu_build.py --variant plain (also address, thread), in essence
//   g++ -x c++ -std=c++17 -O2 -DEP_COMM_EMULATOR -Icsrc/emulator/include -Icsrc
//       tests/emulator/internode_driver.cpp csrc/kernels/{layout,internode}.cu
//       csrc/runtime/{internode_runtime,nvshmem_runtime}.cpp csrc/emulator/{runtime,scheduler,nvshmem}.cpp
//       -lpthread
// Check everything: scripts/emu_sanitize.sh; prove the checks bite: scripts/emu_mutants.py.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "driver_common.hpp"
#include "kernels/common/internode_launch.cuh"
#include "kernels/common/internode_layout.cuh"
#include "kernels/layout.hpp"
#include "runtime/errors.hpp"
#include "runtime/internode_runtime.hpp"
#include "runtime/nvshmem_runtime.hpp"

namespace {

using namespace emu_driver;
namespace in = ep_comm::internode;

// ---- options -------------------------------------------------------------------------------------

const std::vector<std::string> kAllCases{"bf16", "fp8", "cached", "worst"};

struct Options : CommonOptions {
  int per_node = 2;
  int experts = 0;   // 0: 3 per rank
  int channels = 2;
  int ring_tokens = 8;  // Config.num_max_rdma_chunked_recv_tokens: the RDMA ring; the NVL ring is 1/8 (>= 2)
  int rdma_chunk = 3;   // Config.num_max_rdma_chunked_send_tokens
  int nvl_chunk = 2;    // Config.num_max_nvl_chunked_send_tokens
  int sms = 0;          // emulated SMs (the layout kernel's grid); 0: the emulator's default
  bool float_partials = false;  // combine's node partials cross the network as float32 (else bf16)
  Options() {
    ranks = 4;
    tokens = 24;  // most tokens a rank dispatches
    hidden = 256;  // two FP8 scale blocks
    cases = kAllCases;
  }
};

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--ranks R] [--per-node L] [--tokens T] [--hidden H] [--experts E] [--topk K] [--seed S]\n"
               "          [--channels C] [--ring-tokens N] [--rdma-chunk N] [--nvl-chunk N] [--sms N] [--cases CASES]\n"
               "          [--timeout-s T] [--deadline-s D] [--sync-each] [--float-partials] [--max-reports M] [--verbose]\n"
               "cases: bf16, fp8, cached, worst (default: all)\n"
               "--per-node L: ranks per emulated node (R = nodes x L); same-node peers are mapped (NVLink leg),\n"
               "  the others reached only through NVSHMEM puts (RDMA leg)\n"
               "--ring-tokens N: RDMA ring slots (dispatch-sized); the NVL ring holds N/8 of them, at least 2\n",
               argv0);
}

bool parse(int argc, char** argv, Options& o) {
  OptionParser p(o, kAllCases, {}, usage);
  p.add("--per-node", o.per_node);
  p.add("--experts", o.experts);
  p.add("--channels", o.channels);
  p.add("--ring-tokens", o.ring_tokens);
  p.add("--rdma-chunk", o.rdma_chunk);
  p.add("--nvl-chunk", o.nvl_chunk);
  p.add("--sms", o.sms);
  p.flag("--float-partials", o.float_partials);
  if (!p.parse(argc, argv)) return false;
  if (o.experts == 0) o.experts = 3 * o.ranks;
  const char* bad = nullptr;
  if (o.ranks < 1 || o.ranks > 16) bad = "--ranks must be 1..16";
  else if (o.per_node < 1 || o.per_node > in::kMaxLocalRanks || o.ranks % o.per_node != 0)
    bad = "--per-node must divide --ranks (and be at most 32)";
  else if (o.tokens < 2) bad = "--tokens must be >= 2";
  else if (o.hidden <= 0 || o.hidden % in::kScaleBlock != 0) bad = "--hidden must be a positive multiple of 128";
  else if (o.experts < o.ranks || o.experts % o.ranks != 0 || o.experts / o.ranks > in::kMaxLocalExperts)
    bad = "--experts must be a positive multiple of --ranks (at most 1024 per rank)";
  else if (o.topk < 1 || o.topk > in::kMaxTopk || o.topk > o.experts) bad = "--topk must be 1..min(32, experts)";
  else if (o.channels < 1 || o.channels > in::kMaxChannels) bad = "--channels must be 1..64";
  else if (o.ring_tokens < 2) bad = "--ring-tokens must be >= 2";
  else if (o.rdma_chunk < 1 || o.nvl_chunk < 1) bad = "--rdma-chunk and --nvl-chunk must be >= 1";
  else if (o.sms < 0) bad = "--sms must be >= 0";
  return p.accept(bad);
}

// ---- what runs ----------------------------------------------------------------------------------------

struct CaseSpec {
  std::string name;
  int index = 0;
  int channels = 1;
  bool fp8 = false;          // the first dispatch: FP8 rows + scales
  bool weights = false;      // the first dispatch carries top-k weights
  bool cached = false;       // a cached dispatch of new FP8 rows + scales follows
  int num_worst = 0;         // 0: the host reads the receive count after notify
  int num_biases = 0;        // combine
  bool combine_weights = false;
};

// One rank's inputs of one case and what must come out.
struct RankCase {
  int n = 0;
  std::vector<int64_t> topk_idx;     // [n, K]
  std::vector<float> topk_weights;   // [n, K] (weights cases)
  std::vector<uint8_t> x;            // [n, row_bytes]
  std::vector<float> scales;         // FP8: element (t, j) at j * n + t (strides (1, n))
  std::vector<uint8_t> x2;           // cached dispatch: FP8 [n, H]
  std::vector<float> scales2;
  // layout
  std::vector<int32_t> per_rank, per_node, per_expert;
  std::vector<uint8_t> in_rank;      // [n, R]
  // notify
  std::vector<int32_t> recv_info;    // [1 + Lx]
  // receive side (rows = num_worst, or the receive count)
  int num_recv = 0, num_rows = 0;
  std::vector<uint8_t> recv_x;
  std::vector<float> recv_scales;
  std::vector<int64_t> recv_topk_idx;
  std::vector<float> recv_topk_weights;
  std::vector<int32_t> recv_src_token;  // [num_recv]
  std::vector<uint8_t> recv_x2;
  std::vector<float> recv_scales2;
  std::vector<std::vector<int>> row_of;  // [src][token]: the row here, or -1
  // combine
  std::vector<uint16_t> comb_x;      // bf16 [num_rows, H]
  std::vector<float> comb_w;         // [num_rows, K]
  std::vector<uint16_t> bias0, bias1;  // bf16 [n, H]
  std::vector<uint16_t> out;         // bf16 [n, H]
  std::vector<float> out_w;          // [n, K]
};

struct World {
  Options opt;
  std::string unique_id;
  int64_t buffer_bytes = 0;
  std::vector<CaseSpec> cases;
  std::vector<std::vector<RankCase>> ranks;       // [case][rank]
  std::vector<std::vector<int32_t>> rank_matrix;  // [case]: [R][R + 1]

  int R() const { return opt.ranks; }
  int L() const { return opt.per_node; }
  int N() const { return opt.ranks / opt.per_node; }
  int H() const { return opt.hidden; }
  int E() const { return opt.experts; }
  int K() const { return opt.topk; }
  int Lx() const { return opt.experts / opt.ranks; }
  int S() const { return opt.hidden / in::kScaleBlock; }
  int row_bytes(bool fp8) const { return fp8 ? opt.hidden : opt.hidden * 2; }
};

// What every rank must agree on in one call (internode.py's _signature: any digest will do).
uint32_t signature(std::initializer_list<long long> fields) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (long long f : fields) h = mix(h, uint64_t(f));
  return uint32_t(h ^ (h >> 32));
}

void make_inputs(World& w, const CaseSpec& c, int rank, RankCase& in) {
  const int T = w.opt.tokens, E = w.E(), K = w.K(), H = w.H(), R = w.R();
  Rng rng(mix(mix(w.opt.seed, uint64_t(c.index) + 1), uint64_t(rank) + 101));
  const int zero_rank = (R - 1 + c.index) % R;
  in.n = (R > 1 && rank == zero_rank) ? 0 : std::max(2, T - rng.below(T / 2 + 1));
  const int n = in.n;
  in.topk_idx.assign(size_t(n) * K, -1);
  for (int t = 0; t < n; ++t) {
    std::vector<int> perm(E);
    for (int i = 0; i < E; ++i) perm[i] = i;
    for (int i = 0; i < K; ++i) std::swap(perm[i], perm[i + rng.below(E - i)]);  // distinct experts
    for (int k = 0; k < K; ++k) {
      const bool masked = t == 1 || rng.uniform() < 0.2f;
      in.topk_idx[size_t(t) * K + k] = masked ? -1 : perm[k];
    }
  }
  if (c.weights) {
    in.topk_weights.resize(size_t(n) * K);
    for (float& v : in.topk_weights) v = rng.uniform() * 2.0f - 0.5f;
  }
  auto fp8_rows = [&](std::vector<uint8_t>& x, std::vector<float>& scales) {
    x.resize(size_t(n) * H);
    for (uint8_t& b : x) b = uint8_t(rng.next());  // copied verbatim: any byte will do
    scales.resize(size_t(n) * w.S());
    for (float& s : scales) s = 0.001f + rng.uniform();
  };
  if (c.fp8) {
    fp8_rows(in.x, in.scales);
  } else {
    const std::vector<uint16_t> v = bf16_vector(rng, size_t(n) * H, 4.0f);
    in.x.resize(v.size() * 2);
    if (!v.empty()) std::memcpy(in.x.data(), v.data(), in.x.size());
  }
  if (c.cached) fp8_rows(in.x2, in.scales2);
}

// The documented protocol as plain loops (internode.cu's header, ep_comm/backends/internode.py).
void expect_case(World& w, int ci) {
  const CaseSpec& c = w.cases[ci];
  std::vector<RankCase>& rs = w.ranks[ci];
  const int R = w.R(), L = w.L(), N = w.N(), H = w.H(), E = w.E(), K = w.K(), Lx = w.Lx(), S = w.S();
  // layout
  for (RankCase& s : rs) {
    s.per_rank.assign(R, 0);
    s.per_node.assign(N, 0);
    s.per_expert.assign(E, 0);
    s.in_rank.assign(size_t(s.n) * R, 0);
    for (int t = 0; t < s.n; ++t) {
      for (int k = 0; k < K; ++k) {
        const int64_t e = s.topk_idx[size_t(t) * K + k];
        if (e < 0) continue;
        ++s.per_expert[e];
        s.in_rank[size_t(t) * R + e / Lx] = 1;
      }
      for (int d = 0; d < R; ++d) s.per_rank[d] += s.in_rank[size_t(t) * R + d];
      for (int m = 0; m < N; ++m) {
        bool any = false;
        for (int l = 0; l < L; ++l) any = any || s.in_rank[size_t(t) * R + m * L + l];
        s.per_node[m] += any;
      }
    }
  }
  std::vector<int32_t>& matrix = w.rank_matrix[ci];
  matrix.assign(size_t(R) * (R + 1), 0);
  for (int s = 0; s < R; ++s) {
    for (int d = 0; d < R; ++d) matrix[s * (R + 1) + d] = rs[s].per_rank[d];
    matrix[s * (R + 1) + R] = rs[s].n;
  }
  int largest = 0;
  for (int d = 0; d < R; ++d) {
    RankCase& r = rs[d];
    r.recv_info.assign(1 + Lx, 0);
    for (int s = 0; s < R; ++s) {
      r.recv_info[0] += rs[s].per_rank[d];
      for (int j = 0; j < Lx; ++j) r.recv_info[1 + j] += rs[s].per_expert[d * Lx + j];
    }
    r.num_recv = r.recv_info[0];
    largest = std::max(largest, r.num_recv);
  }
  if (c.num_worst > 0) w.cases[ci].num_worst = largest + 3;
  const int worst = w.cases[ci].num_worst;
  // receive side: rows source-rank major, ascending token within a source
  for (int d = 0; d < R; ++d) {
    RankCase& r = rs[d];
    r.num_rows = worst > 0 ? worst : r.num_recv;
    const size_t rows = size_t(r.num_rows);
    const int rb = w.row_bytes(c.fp8);
    r.recv_x.assign(rows * rb, 0);  // padding rows (num_worst_tokens) stay zero
    if (c.fp8) r.recv_scales.assign(rows * S, 0.0f);
    r.recv_topk_idx.assign(rows * K, -1);
    if (c.weights) r.recv_topk_weights.assign(rows * K, 0.0f);
    r.recv_src_token.clear();
    if (c.cached) {
      r.recv_x2.assign(rows * H, 0);
      r.recv_scales2.assign(rows * S, 0.0f);
    }
    r.row_of.assign(R, {});
    int row = 0;
    for (int s = 0; s < R; ++s) {
      const RankCase& src = rs[s];
      r.row_of[s].assign(src.n, -1);
      for (int t = 0; t < src.n; ++t) {
        if (!src.in_rank[size_t(t) * R + d]) continue;
        r.row_of[s][t] = row;
        std::memcpy(&r.recv_x[size_t(row) * rb], &src.x[size_t(t) * rb], rb);
        for (int j = 0; c.fp8 && j < S; ++j) r.recv_scales[size_t(row) * S + j] = src.scales[size_t(j) * src.n + t];
        for (int k = 0; k < K; ++k) {
          const int64_t e = src.topk_idx[size_t(t) * K + k];
          const bool mine = e >= d * Lx && e < (d + 1) * Lx;
          r.recv_topk_idx[size_t(row) * K + k] = mine ? e - d * Lx : -1;
          if (c.weights) r.recv_topk_weights[size_t(row) * K + k] = mine ? src.topk_weights[size_t(t) * K + k] : 0.0f;
        }
        r.recv_src_token.push_back(t);
        if (c.cached) {
          std::memcpy(&r.recv_x2[size_t(row) * H], &src.x2[size_t(t) * H], H);
          for (int j = 0; j < S; ++j) r.recv_scales2[size_t(row) * S + j] = src.scales2[size_t(j) * src.n + t];
        }
        ++row;
      }
    }
  }
  // combine inputs: expert outputs (every allocated row, padding rows too) and weights, biases
  for (int d = 0; d < R; ++d) {
    RankCase& r = rs[d];
    Rng rng(mix(mix(w.opt.seed, uint64_t(ci) + 5001), uint64_t(d) + 7));
    r.comb_x = bf16_vector(rng, size_t(r.num_rows) * H, 3.0f);
    if (c.combine_weights) {
      r.comb_w.resize(size_t(r.num_rows) * K);
      for (float& v : r.comb_w) v = rng.uniform() * 2.0f - 0.5f;
    }
    if (c.num_biases > 0) r.bias0 = bf16_vector(rng, size_t(r.n) * H, 1.0f);
    if (c.num_biases > 1) r.bias1 = bf16_vector(rng, size_t(r.n) * H, 1.0f);
  }
  // combine: per node, local ranks in order from 0 (float32); node partials in node order from 0;
  // bias0; bias1; one rounding
  for (int s = 0; s < R; ++s) {
    RankCase& src = rs[s];
    src.out.assign(size_t(src.n) * H, 0);
    if (c.combine_weights) src.out_w.assign(size_t(src.n) * K, 0.0f);
    std::vector<float> acc(H), partial(H), wacc(K), wpartial(K);
    for (int t = 0; t < src.n; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(wacc.begin(), wacc.end(), 0.0f);
      for (int m = 0; m < N; ++m) {
        bool hit = false;
        std::fill(partial.begin(), partial.end(), 0.0f);
        std::fill(wpartial.begin(), wpartial.end(), 0.0f);
        for (int l = 0; l < L; ++l) {
          const int d = m * L + l;
          const int row = rs[d].row_of[s][t];
          if (row < 0) continue;
          hit = true;
          for (int h = 0; h < H; ++h) partial[h] += from_bf16(rs[d].comb_x[size_t(row) * H + h]);
          for (int k = 0; c.combine_weights && k < K; ++k) wpartial[k] += rs[d].comb_w[size_t(row) * K + k];
        }
        if (!hit) continue;
        // The forwarder's partial crosses the network rounded to bf16 unless --float-partials.
        for (int h = 0; h < H; ++h) acc[h] += w.opt.float_partials ? partial[h] : from_bf16(to_bf16(partial[h]));
        for (int k = 0; k < K; ++k) wacc[k] += wpartial[k];
      }
      for (int h = 0; h < H; ++h) {
        float v = acc[h];
        if (c.num_biases > 0) v += from_bf16(src.bias0[size_t(t) * H + h]);
        if (c.num_biases > 1) v += from_bf16(src.bias1[size_t(t) * H + h]);
        src.out[size_t(t) * H + h] = to_bf16(v);
      }
      for (int k = 0; c.combine_weights && k < K; ++k) src.out_w[size_t(t) * K + k] = wacc[k];
    }
  }
}

void plan(World& w) {
  const Options& o = w.opt;
  for (const std::string& name : o.cases) {
    CaseSpec c;
    c.name = name;
    c.index = int(w.cases.size());
    c.channels = c.index % 2 == 0 ? o.channels : std::max(1, o.channels / 2);
    if (name == "bf16") {
      c.weights = true, c.num_biases = 2, c.combine_weights = true;
    } else if (name == "fp8") {
      c.fp8 = true;
    } else if (name == "cached") {
      c.weights = true, c.cached = true, c.num_biases = 1, c.combine_weights = true;
    } else {  // worst
      c.weights = true, c.num_worst = 1 /* set by expect_case */, c.num_biases = 1;
    }
    w.cases.push_back(c);
  }
  w.ranks.assign(w.cases.size(), std::vector<RankCase>(o.ranks));
  w.rank_matrix.resize(w.cases.size());
  for (size_t ci = 0; ci < w.cases.size(); ++ci) {
    for (int r = 0; r < o.ranks; ++r) make_inputs(w, w.cases[ci], r, w.ranks[ci][r]);
    expect_case(w, int(ci));
  }
  w.buffer_bytes = in::buffer_bytes(int64_t(o.hidden) * 2, o.ranks, o.per_node, o.channels, o.ring_tokens);
}

// ---- one rank -----------------------------------------------------------------------------------------------

struct Shared {
  World* world = nullptr;
  HostBarrier* barrier = nullptr;
  RankOutcomes* outcomes = nullptr;
};

class RankRun {
 public:
  RankRun(const World& w, int rank, ep_comm::InternodeRuntime& rt) : w_(w), o_(w.opt), rank_(rank), rt_(rt) {}

  void run_case(const CaseSpec& c) {
    const RankCase& e = w_.ranks[c.index][rank_];
    const int R = w_.R(), N = w_.N(), E = w_.E(), K = w_.K(), H = w_.H(), Lx = w_.Lx(), S = w_.S(), C = c.channels;
    const int n = e.n;
    const int64_t basis = int64_t(H) * 2;  // the layout's row bytes: bf16, whatever this call sends
    Checker check{context(c), o_.max_reports};

    // ---- get_dispatch_layout ----
    int64_t* d_idx = mem_.upload(e.topk_idx);
    auto* d_per_rank = mem_.alloc_n<int>(R);
    auto* d_per_node = mem_.alloc_n<int>(N);
    auto* d_per_expert = mem_.alloc_n<int>(E);
    auto* d_in_rank = mem_.alloc_n<bool>(size_t(n) * R);
    {
      ep_comm::layout::DispatchLayoutArgs a{};
      a.topk_idx = d_idx;
      a.num_tokens = n;
      a.num_topk = K;
      a.num_ranks = R;
      a.num_experts = E;
      a.ranks_per_node = w_.L();
      a.num_tokens_per_rank = d_per_rank;
      a.num_tokens_per_rdma_rank = d_per_node;
      a.num_tokens_per_expert = d_per_expert;
      a.is_token_in_rank = d_in_rank;
      ep_comm::layout::launch_get_dispatch_layout(a, nullptr);
    }
    synchronize();  // the host's cumsum reads is_token_in_rank (torch.cumsum on the emulator's CPU tensors)
    check.equal("num_tokens_per_rank", download<int32_t>(d_per_rank, R), e.per_rank, 0);
    check.equal("num_tokens_per_rdma_rank", download<int32_t>(d_per_node, N), e.per_node, 0);
    check.equal("num_tokens_per_expert", download<int32_t>(d_per_expert, E), e.per_expert, 0);
    const std::vector<uint8_t> in_rank = download<uint8_t>(d_in_rank, size_t(n) * R);
    check.equal("is_token_in_rank", in_rank, e.in_rank, R);
    std::vector<int32_t> cumsum(size_t(n) * R);
    for (int t = 0; t < n; ++t)
      for (int d = 0; d < R; ++d)
        cumsum[size_t(t) * R + d] = (t > 0 ? cumsum[size_t(t - 1) * R + d] : 0) + (in_rank[size_t(t) * R + d] ? 1 : 0);
    const int* d_cumsum = mem_.upload(cumsum);

    // ---- notify ----
    auto* d_matrix = mem_.alloc_n<int>(size_t(R) * (R + 1));
    auto* d_recv_info = mem_.alloc_n<int>(1 + Lx);
    {
      in::NotifyArgs a{};
      a.row_ints = R + 1 + Lx;
      a.num_tokens_per_rank = d_per_rank;
      a.num_tokens_per_expert = d_per_expert;
      a.num_tokens = n;
      a.num_local_experts = Lx;
      a.rank_matrix = d_matrix;
      a.recv_info = d_recv_info;
      a.signature = signature({1, H, w_.row_bytes(c.fp8), c.fp8 ? S : 0, K, Lx, C, o_.ring_tokens});
      rt_.notify(basis, C, o_.ring_tokens, a, nullptr);
    }
    int num_rows = c.num_worst;
    if (num_rows == 0) {
      synchronize();  // the host reads the receive count (internode.py: recv_info.cpu())
      num_rows = download<int32_t>(d_recv_info, 1)[0];
      if (num_rows != e.num_recv) {
        check.fail("notify: recv_info[0] = " + std::to_string(num_rows) + ", expected " + std::to_string(e.num_recv));
        throw std::runtime_error("notify counted " + std::to_string(num_rows) + " rows, expected " +
                                 std::to_string(e.num_recv) + ": the rest of this case would be meaningless");
      }
    }
    after_op();

    // ---- dispatch ----
    const size_t rows = size_t(num_rows);
    const int rb = w_.row_bytes(c.fp8);
    const void* d_x = mem_.upload(e.x);
    const float* d_scales = c.fp8 ? mem_.upload(e.scales) : nullptr;
    const float* d_weights = c.weights ? mem_.upload(e.topk_weights) : nullptr;
    // Padding rows of num_worst_tokens: zeros / -1, as internode.py allocates them.
    auto* d_recv_x = mem_.alloc_n<uint8_t>(rows * rb);
    auto* d_recv_scales = c.fp8 ? mem_.alloc_n<float>(rows * S) : nullptr;
    int64_t* d_recv_idx = mem_.upload(std::vector<int64_t>(rows * K, -1));
    auto* d_recv_w = c.weights ? mem_.alloc_n<float>(rows * K) : nullptr;
    auto* d_src_token = mem_.alloc_n<int>(std::max<size_t>(rows, 1));
    if (rows > 0) {
      std::memset(d_recv_x, 0, rows * rb);
      if (d_recv_scales != nullptr) std::memset(d_recv_scales, 0, rows * S * 4);
      if (d_recv_w != nullptr) std::memset(d_recv_w, 0, rows * K * 4);
    }
    // num_scales is the tensor's column count (internode.py), also where the rank has no tokens
    // and the pointer is null: every rank must lay out the same slots.
    auto dispatch_args = [&](const void* x, const float* scales, bool fp8, int64_t hidden_bytes) {
      in::DispatchArgs a{};
      a.x = x;
      a.hidden_bytes = hidden_bytes;
      a.x_scales = scales;
      a.num_scales = fp8 ? S : 0;
      a.scale_token_stride = 1;  // column-major scales (a transposed tensor): strides (1, n)
      a.scale_hidden_stride = n;
      a.is_token_in_rank = d_in_rank;
      a.token_rank_cumsum = d_cumsum;
      a.rank_matrix = d_matrix;
      a.num_tokens = n;
      a.num_recv_rows = num_rows;
      a.rdma_chunk = o_.rdma_chunk;
      a.nvl_chunk = o_.nvl_chunk;
      return a;
    };
    {
      in::DispatchArgs a = dispatch_args(d_x, d_scales, c.fp8, rb);
      a.topk_idx = d_idx;
      a.topk_weights = d_weights;
      a.num_topk = K;
      a.num_local_experts = Lx;
      a.recv_x = d_recv_x;
      a.recv_x_scales = d_recv_scales;
      a.recv_topk_idx = d_recv_idx;
      a.recv_topk_weights = d_recv_w;
      a.recv_src_token = d_src_token;
      rt_.dispatch(basis, C, o_.ring_tokens, a, nullptr);
    }
    after_op();

    // ---- cached dispatch: new FP8 rows through the same handle ----
    uint8_t* d_recv_x2 = nullptr;
    float* d_recv_scales2 = nullptr;
    if (c.cached) {
      in::NotifyArgs na{};
      na.num_tokens = n;
      na.signature = signature({2, H, H, S, C, o_.ring_tokens});
      rt_.notify(basis, C, o_.ring_tokens, na, nullptr);
      d_recv_x2 = mem_.alloc_n<uint8_t>(rows * H);
      d_recv_scales2 = mem_.alloc_n<float>(rows * S);
      in::DispatchArgs a = dispatch_args(mem_.upload(e.x2), mem_.upload(e.scales2), true, H);
      a.recv_x = d_recv_x2;
      a.recv_x_scales = d_recv_scales2;
      a.recv_src_token = mem_.alloc_n<int>(std::max<size_t>(rows, 1));  // not kept (internode.py)
      rt_.dispatch(basis, C, o_.ring_tokens, a, nullptr);
      after_op();
    }

    // ---- combine ----
    const int combine_topk = c.combine_weights ? K : 0;
    auto* d_out = mem_.alloc_n<uint16_t>(size_t(n) * H);
    auto* d_out_w = c.combine_weights ? mem_.alloc_n<float>(size_t(n) * K) : nullptr;
    {
      in::NotifyArgs na{};
      na.num_tokens = n;
      na.signature = signature({3, H, combine_topk, C, o_.ring_tokens});
      rt_.notify(basis, C, o_.ring_tokens, na, nullptr);
      in::CombineArgs a{};
      a.x = mem_.upload(e.comb_x);
      a.topk_weights = c.combine_weights ? mem_.upload(e.comb_w) : nullptr;
      a.num_topk = combine_topk;
      a.hidden = H;
      a.rank_matrix = d_matrix;
      a.recv_src_token = d_src_token;
      a.num_recv_rows = num_rows;
      a.is_token_in_rank = d_in_rank;
      a.num_tokens = n;
      a.bias0 = c.num_biases > 0 ? mem_.upload(e.bias0) : nullptr;
      a.bias1 = c.num_biases > 1 ? mem_.upload(e.bias1) : nullptr;
      a.out = d_out;
      a.out_weights = d_out_w;
      a.rdma_chunk = o_.rdma_chunk;
      a.nvl_chunk = o_.nvl_chunk;
      a.float_partials = o_.float_partials;
      rt_.combine(basis, C, o_.ring_tokens, a, nullptr);
    }
    // ---- compare ----
    // After a kernel error too (this rank's device is idle then), the dispatch outputs are compared
    // before the error is raised: a bug in dispatch shows as its wrong rows, not only as the
    // combine that tripped over them.
    try {
      synchronize();
    } catch (const std::exception&) {
      compare_dispatch(check, c, e, num_rows, d_matrix, d_recv_info, d_recv_x, d_recv_scales, d_recv_idx, d_recv_w,
                       d_src_token, d_recv_x2, d_recv_scales2);
      throw;
    }
    compare_dispatch(check, c, e, num_rows, d_matrix, d_recv_info, d_recv_x, d_recv_scales, d_recv_idx, d_recv_w,
                     d_src_token, d_recv_x2, d_recv_scales2);
    check.equal("combined_x", download<uint16_t>(d_out, size_t(n) * H), e.out, H);
    if (c.combine_weights) check.equal("combined_topk_weights", download<float>(d_out_w, size_t(n) * K), e.out_w, K);
    log_line(o_.verbose, check.context + ": " + (check.ok ? "ok" : "MISMATCH") + " (" + std::to_string(num_rows) +
                             " rows here)");
  }

 private:
  void compare_dispatch(Checker& check, const CaseSpec& c, const RankCase& e, int num_rows, const int* d_matrix,
                        const int* d_recv_info, const uint8_t* d_recv_x, const float* d_recv_scales,
                        const int64_t* d_recv_idx, const float* d_recv_w, const int* d_src_token,
                        const uint8_t* d_recv_x2, const float* d_recv_scales2) {
    const int R = w_.R(), K = w_.K(), H = w_.H(), Lx = w_.Lx(), S = w_.S(), rb = w_.row_bytes(c.fp8);
    const size_t rows = size_t(num_rows);
    check.equal("rank_matrix", download<int32_t>(d_matrix, size_t(R) * (R + 1)), w_.rank_matrix[c.index], R + 1);
    check.equal("recv_info", download<int32_t>(d_recv_info, 1 + Lx), e.recv_info, 0);
    check.equal("recv_x", download<uint8_t>(d_recv_x, rows * rb), e.recv_x, rb);
    if (c.fp8) check.equal("recv_x_scales", download<float>(d_recv_scales, rows * S), e.recv_scales, S);
    check.equal("recv_topk_idx", download<int64_t>(d_recv_idx, rows * K), e.recv_topk_idx, K);
    if (c.weights) check.equal("recv_topk_weights", download<float>(d_recv_w, rows * K), e.recv_topk_weights, K);
    check.equal("recv_src_token", download<int32_t>(d_src_token, size_t(e.num_recv)), e.recv_src_token, 0);
    if (c.cached) {
      check.equal("cached recv_x", download<uint8_t>(d_recv_x2, rows * H), e.recv_x2, H);
      check.equal("cached recv_x_scales", download<float>(d_recv_scales2, rows * S), e.recv_scales2, S);
    }
  }

  // Waits for this rank's device; a fault (sticky) or a kernel-reported error throws.
  void synchronize() {
    EP_CUDA_CHECK(cudaDeviceSynchronize());
    EP_CUDA_CHECK(cudaGetLastError());
    rt_.check_error();
  }
  void after_op() {
    if (o_.sync_each) synchronize();
  }

  std::string context(const CaseSpec& c) const {
    std::ostringstream os;
    os << "rank " << rank_ << " case " << c.name << " (" << w_.N() << "x" << w_.L() << ", " << c.channels
       << " channels, seed " << o_.seed << ")";
    return os.str();
  }

  const World& w_;
  const Options& o_;
  const int rank_;
  ep_comm::InternodeRuntime& rt_;
  DeviceArena mem_;
};

void rank_main(Shared& sh, int rank) {
  const World& w = *sh.world;
  const Options& o = w.opt;
  RankOutcomes& out = *sh.outcomes;
  bool nvshmem_up = false;
  std::unique_ptr<ep_comm::InternodeRuntime> rt;
  try {
    EP_CUDA_CHECK(cudaSetDevice(rank));
    init_nvshmem_pe(w.unique_id, rank, w.R());
    nvshmem_up = true;
  } catch (const std::exception& ex) {
    out.error(rank, std::string("NVSHMEM initialisation: ") + ex.what());
  }
  sh.barrier->wait();  // rank 0's acquire() returned: nvshmem_runtime holds its reference
  try {
    if (nvshmem_up && !out.any_error) {
      rt = std::make_unique<ep_comm::InternodeRuntime>(w.buffer_bytes, rank, w.R(), w.L(), o.timeout_s);
      // The NVLink leg stores through nvshmem_ptr: every same-node peer must be mapped (internode.py checks it too).
      if (!rt->local_peers_mapped()) out.error(rank, "nvshmem_ptr does not map every same-node peer");
    }
  } catch (const std::exception& ex) {
    out.error(rank, std::string("InternodeRuntime: ") + ex.what());
  }
  sh.barrier->wait();  // every buffer is zeroed before anyone writes into it (internode.py's dist.barrier)

  if (rt && !out.any_error) {
    try {
      RankRun run(w, rank, *rt);
      for (const CaseSpec& c : w.cases) run.run_case(c);
    } catch (const std::exception& ex) {
      out.error(rank, ex.what());
    }
    (void)cudaDeviceSynchronize();  // this rank's kernels are done (also after an error)
  }
  out.finished.fetch_add(1);
  // Collective teardown; after an error the watchdog has ended the process unless every rank got here.
  sh.barrier->wait();
  try {
    if (rt) rt->destroy();
    rt.reset();
  } catch (const std::exception& ex) {
    out.error(rank, std::string("destroy: ") + ex.what());
  }
  sh.barrier->wait();  // every runtime gave its reference back: rank 0's is the last
  if (nvshmem_up) finalize_nvshmem_pe(rank);
}

}  // namespace

int main(int argc, char** argv) {
  World w;
  if (!parse(argc, argv, w.opt)) return 2;
  const Options& o = w.opt;
  install_fault_reporter();
  // Before the first CUDA/NVSHMEM call reads them (threads share the environment).
  if (o.sms > 0) setenv("EP_COMM_EMU_NUM_SMS", std::to_string(o.sms).c_str(), 1);
  setenv("EP_COMM_RANKS_PER_NODE", std::to_string(o.per_node).c_str(), 1);
  plan(w);
  size_symmetric_heap(w.buffer_bytes);

  // Dispatch and combine: one block of 16 warps per channel, on every rank at once.
  warn_if_too_many_fibers("internode_driver", long(o.ranks) * o.channels * 16 * 32);
  std::fprintf(stderr,
               "internode_driver: %d ranks (%d nodes x %d), T %d, hidden %d, %d experts, top-%d, %d channels, ring %d "
               "tokens (chunks %d/%d), seed %llu, cases %zu, buffer %lld bytes\n",
               o.ranks, w.N(), o.per_node, o.tokens, o.hidden, o.experts, o.topk, o.channels, o.ring_tokens,
               o.rdma_chunk, o.nvl_chunk, (unsigned long long)o.seed, w.cases.size(), (long long)w.buffer_bytes);
  try {
    w.unique_id = ep_comm::nvshmem_runtime::get_unique_id();
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "ERROR: %s\n", ex.what());
    return 4;
  }

  Shared sh;
  sh.world = &w;
  HostBarrier barrier(o.ranks);
  sh.barrier = &barrier;
  RankOutcomes outcomes(o.ranks);
  sh.outcomes = &outcomes;
  std::vector<std::thread> ranks;
  for (int r = 0; r < o.ranks; ++r) ranks.emplace_back(rank_main, std::ref(sh), r);
  std::ostringstream ok_text;
  ok_text << "OK: " << w.cases.size() << " cases on " << o.ranks << " ranks (" << w.N() << " nodes x " << o.per_node
          << ") matched the reference (seed " << o.seed << ")";
  return wait_for_ranks(outcomes, ranks, o.deadline_s, o.seed, ok_text.str());
}
