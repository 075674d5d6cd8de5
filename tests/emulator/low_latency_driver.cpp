// In-process multi-rank driver of the low-latency kernels on the emulated device and its emulated
// NVSHMEM (csrc/emulator/nvshmem.cpp).
//
// R ranks are std::threads of one process; rank r uses emulated device r, which is also NVSHMEM
// PE r (the emulated NVSHMEM finds PEs by device), and its own LowLatencyRuntime. So
// ThreadSanitizer and AddressSanitizer see the real cross-rank sharing (P2P stores into peers'
// symmetric heaps, puts and signals delivered by the emulated network thread) that rank processes
// hide from them.
//
// NVSHMEM set-up: nvshmem_runtime keeps one PE per process (its reference count and PE number are
// process-wide, as NVSHMEM's own state is), so only rank 0 initialises through
// nvshmem_runtime::acquire(); the other ranks initialise their PE with the same unique id through
// the emulated NVSHMEM's nvshmemi_init_thread (driver_common.hpp: init_nvshmem_pe), all at once (the
// bootstrap waits for every PE). Then every rank constructs LowLatencyRuntime (whose constructor
// checks nvshmem_my_pe() of its device, takes a reference and allocates the symmetric buffer
// collectively), with a host barrier after it, as ep_comm/backends/low_latency.py does. At the end
// every rank calls destroy() (collective), then rank 0 nvshmem_runtime::release() (the last
// reference: nvshmem_finalize) and the others nvshmem_finalize().
//
// Every rank runs the same ops back to back on its default stream, with fresh seeded inputs per
// dispatch (num_tokens <= T, ~20% of top-k entries -1, token 1 goes nowhere, distinct experts per
// token, a rank with zero tokens now and then), no host synchronisation until the end of a case:
//   bf16      dispatch (bf16) -> combine
//   fp8       dispatch (FP8, float32 scales) -> combine
//   ue8m0     dispatch (FP8, round_scale, UE8M0-packed scales; hidden % 512 == 0) -> combine
//   zerocopy  dispatch (bf16) -> combine from the buffer's staging area (zero_copy=true), written
//             by a stream-ordered copy
//   double    dispatch A, dispatch B (both halves: two dispatches in a row flip the parity that
//             dispatch/combine pairs keep), combine A, combine B
//   inflight  send A, send B, recv A, recv B (two ops in flight, as with receive hooks), then the
//             same for their combines
//   full      every rank sends T tokens that all name one hot expert: every slot of a source's
//             region is used (slot T-1 included), so overlapping regions show
// default: bf16,fp8,zerocopy,double,inflight,full; all: those and ue8m0.
// Then, per case, every output is compared with plain host loops written here from all ranks'
// inputs (one process knows them all): token_slot and send_count of the send side; recv_count,
// recv_layout, the rows of recv_x (expert e's rows source-rank major, tokens ascending within a
// source) and the scales bit for bit; the combined rows bit for bit (expert outputs y are seeded
// per row; the source sums weight * row over k = 0..K-1 in float32, multiply then add, and rounds
// once to bf16, as the kernel does); cumulative_local_expert_recv_stats once at the end.
//
// Exit status: 0 everything matched; 1 a mismatch; 2 bad usage; 3 an emulated-device fault
// (deadlock, divergent collective, NVSHMEM misuse, hang: printed by the emulator); 4 a kernel or
// runtime error (device timeout, invalid input, runtime.check_error()); 5 the driver's own
// deadline. Sanitizer reports exit through the sanitizer (TSan exitcode, ASan abort).
//
// Build: python scripts/emu_build.py --variant plain (also address, thread), in essence
//   g++ -x c++ -std=c++17 -O2 -DEP_COMM_EMULATOR -Icsrc/emulator/include -Icsrc
//       tests/emulator/low_latency_driver.cpp csrc/kernels/low_latency.cu csrc/runtime/nvshmem_runtime.cpp
//       csrc/emulator/{runtime,scheduler,nvshmem}.cpp -lpthread
// Check everything: scripts/emu_sanitize.sh; prove the checks bite: scripts/emu_mutants.py.
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <chrono>
#include <cmath>
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
#include "kernels/common/low_latency_launch.cuh"
#include "kernels/common/low_latency_layout.cuh"
#include "runtime/errors.hpp"
#include "runtime/nvshmem_runtime.hpp"

namespace {

using namespace emu_driver;
namespace ll = ep_comm::low_latency;

// ---- options -------------------------------------------------------------------------------------

const std::vector<std::string> kDefaultCases{"bf16", "fp8", "zerocopy", "double", "inflight", "full"};
const std::vector<std::string> kAllCases{"bf16", "fp8", "ue8m0", "zerocopy", "double", "inflight", "full"};

struct Options : CommonOptions {
  int experts = 0;  // 0: 3 per rank
  bool p2p = true;
  int sms = 0;  // emulated SMs (grid sizes); 0: the emulator's default
  int skew_us = 0;  // rank r launches every send kernel r * skew_us later (receivers wait for late senders)
  Options() {
    tokens = 12;  // T: num_max_dispatch_tokens_per_rank; a dispatch sends up to T tokens per rank
    hidden = 256;  // two FP8 scale blocks: the scales' column-major layout shows
    topk = 3;
    cases = kDefaultCases;
  }
};

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--ranks R] [--tokens T] [--hidden H] [--experts E] [--topk K] [--seed S] [--p2p 0|1]\n"
               "          [--sms N] [--skew-us U] [--cases CASES] [--timeout-s T] [--deadline-s D] [--sync-each]\n"
               "          [--max-reports M] [--verbose]\n"
               "cases: bf16, fp8, ue8m0, zerocopy, double, inflight, full; default: all but ue8m0; all\n"
               "--p2p 0: NVSHMEM_DISABLE_P2P=1 and use_p2p=false (every peer through puts and signals)\n"
               "--skew-us U: rank r sleeps r * U microseconds before it launches each send kernel, so that\n"
               "  receivers are already waiting when rows land (their waits are what is tested)\n",
               argv0);
}

bool parse(int argc, char** argv, Options& o) {
  OptionParser p(o, kAllCases, {}, usage);
  p.add("--experts", o.experts);
  p.add("--p2p", [&o](const char* v) { o.p2p = std::atoi(v) != 0; });
  p.add("--sms", o.sms);
  p.add("--skew-us", o.skew_us);
  if (!p.parse(argc, argv)) return false;
  if (o.experts == 0) o.experts = 3 * o.ranks;
  const bool ue8m0 = std::find(o.cases.begin(), o.cases.end(), "ue8m0") != o.cases.end();
  const char* bad = nullptr;
  if (o.ranks < 1 || o.ranks > 8) bad = "--ranks must be 1..8";
  else if (o.tokens < 1) bad = "--tokens must be >= 1";
  else if (o.hidden <= 0 || o.hidden % ll::kFp8BlockSize != 0) bad = "--hidden must be a positive multiple of 128";
  else if (ue8m0 && o.hidden % (ll::kFp8BlockSize * ll::kUe8m0ScalesPerWord) != 0)
    bad = "the ue8m0 case needs --hidden a multiple of 512";
  else if (o.experts < o.ranks || o.experts % o.ranks != 0) bad = "--experts must be a positive multiple of --ranks";
  else if (o.topk < 1 || o.topk > ll::kMaxTopk || o.topk > o.experts) bad = "--topk must be 1..min(32, experts)";
  else if (o.sms < 0) bad = "--sms must be >= 0";
  else if (o.skew_us < 0) bad = "--skew-us must be >= 0";
  return p.accept(bad);
}

// ---- what runs ----------------------------------------------------------------------------------------

struct DispatchSpec {
  int index = 0;
  bool fp8 = false, round_scale = false, ue8m0 = false;
  bool full = false;  // every rank sends T tokens, all naming one hot expert
};
struct CombineSpec {
  int index = 0;
  int dispatch = 0;  // whose handle (token_slot, send_count, recv_layout) it uses
  bool zero_copy = false;
};
// One kernel launch: the send or receive half of a dispatch or combine.
struct Step {
  bool combine = false;
  bool recv = false;
  int index = 0;  // into World::dispatches or World::combines
};
struct Case {
  std::string name;
  std::vector<Step> steps;
  std::vector<int> dispatches, combines;  // compared after the case's last step
};

// ---- inputs and what must come out ----------------------------------------------------------------------

struct DispatchRank {
  // inputs
  int num_tokens = 0;
  std::vector<int64_t> topk_idx;  // [n, K]
  std::vector<uint16_t> x;        // bf16 [n, H]
  // send side
  std::vector<int32_t> token_slot;  // [n, K]
  std::vector<int32_t> send_count;  // [E]
  // receive side, per local expert
  std::vector<int32_t> recv_count;   // [L]
  std::vector<int32_t> recv_layout;  // [L, R, 2]
  std::vector<std::vector<uint8_t>> rows;        // [L] -> [recv_count, row_bytes] (bf16 or fp8)
  std::vector<std::vector<float>> scales;        // [L] -> [recv_count, H/128] (fp8, float32 scales)
  std::vector<std::vector<int32_t>> ue8m0;       // [L] -> [recv_count, H/512] (fp8, packed)
};

struct CombineRank {
  std::vector<float> topk_weights;  // [n, K]
  std::vector<uint16_t> y;          // bf16 [L, R*T, H]: this rank's expert outputs (rows past recv_count 0)
  std::vector<uint16_t> combined;   // bf16 [n, H]
};

struct World {
  Options opt;
  std::string unique_id;  // rank 0's, for every rank
  int64_t buffer_bytes = 0;
  std::vector<Case> cases;
  std::vector<DispatchSpec> dispatches;
  std::vector<CombineSpec> combines;
  std::vector<std::vector<DispatchRank>> dispatch_ranks;  // [dispatch][rank]
  std::vector<std::vector<CombineRank>> combine_ranks;    // [combine][rank]
  std::vector<std::vector<int32_t>> cumulative_stats;     // [rank][L]: sum of recv_count over dispatches

  int R() const { return opt.ranks; }
  int T() const { return opt.tokens; }
  int H() const { return opt.hidden; }
  int E() const { return opt.experts; }
  int K() const { return opt.topk; }
  int L() const { return opt.experts / opt.ranks; }
  int64_t RT() const { return int64_t(opt.ranks) * opt.tokens; }
  int num_scales() const { return opt.hidden / ll::kFp8BlockSize; }
  int num_ue8m0_words() const { return num_scales() / ll::kUe8m0ScalesPerWord; }
  int row_bytes(const DispatchSpec& d) const { return d.fp8 ? opt.hidden : opt.hidden * 2; }
};

DispatchRank make_dispatch_inputs(const World& w, const DispatchSpec& d, int rank) {
  const int T = w.T(), H = w.H(), E = w.E(), K = w.K();
  Rng rng(mix(mix(w.opt.seed, uint64_t(d.index) + 1), uint64_t(rank) + 101));
  DispatchRank in;
  if (d.full) in.num_tokens = T;
  else if (rank == w.R() - 1 && w.R() > 1 && d.index % 3 == 1) in.num_tokens = 0;  // a rank with nothing
  else in.num_tokens = std::max(1, T - rng.below(T / 2 + 1));
  const int n = in.num_tokens;
  const int hot = int(mix(w.opt.seed, uint64_t(d.index)) % uint64_t(E));
  in.topk_idx.assign(size_t(n) * K, -1);
  for (int t = 0; t < n; ++t) {
    std::vector<int> perm(E);
    for (int i = 0; i < E; ++i) perm[i] = i;
    if (d.full) std::swap(perm[0], perm[hot]);  // slot k = 0: the hot expert
    for (int i = d.full ? 1 : 0; i < K; ++i) std::swap(perm[i], perm[i + rng.below(E - i)]);  // distinct experts
    for (int k = 0; k < K; ++k) {
      const bool masked = !(d.full && k == 0) && ((t == 1 && !d.full) || rng.uniform() < 0.2f);
      in.topk_idx[size_t(t) * K + k] = masked ? -1 : perm[k];
    }
  }
  in.x.resize(size_t(n) * H);
  for (int t = 0; t < n; ++t) {
    const float scale = 0.01f + 8.0f * rng.uniform();  // rows of different magnitudes (FP8 scales)
    for (int h = 0; h < H; ++h) in.x[size_t(t) * H + h] = to_bf16((rng.uniform() * 2.0f - 1.0f) * scale);
  }
  return in;
}

// The FP8 cast of one bf16 row, as ep_comm/fp8.py specifies it (kernels/common/low_latency_fp8.cuh):
// per 128 channels amax (clamped at 1e-4), scale = amax / 448, optionally rounded up to a power
// of two, q = e4m3_rn_satfinite(x / scale). The e4m3 rounding is the emulated device's.
void cast_row_to_fp8(const uint16_t* x, int hidden, bool round_scale, uint8_t* q, float* scales) {
  for (int b = 0; b < hidden / ll::kFp8BlockSize; ++b) {
    float amax = 0.0f;
    for (int h = b * ll::kFp8BlockSize; h < (b + 1) * ll::kFp8BlockSize; ++h) amax = std::max(amax, std::fabs(from_bf16(x[h])));
    amax = std::max(amax, 1e-4f);
    float scale = amax / 448.0f;
    if (round_scale) {
      uint32_t bits;
      std::memcpy(&bits, &scale, 4);
      uint32_t exponent = (bits >> 23) & 0xffu;
      if ((bits & 0x7fffffu) != 0) exponent += 1;
      bits = exponent << 23;
      std::memcpy(&scale, &bits, 4);
    }
    scales[b] = scale;
    for (int h = b * ll::kFp8BlockSize; h < (b + 1) * ll::kFp8BlockSize; ++h) q[h] = ep_emu_float_to_e4m3(from_bf16(x[h]) / scale);
  }
}

// The documented protocol as plain loops (low_latency.cu's header, low_latency_launch.cuh).
void expect_dispatch(World& w, int index) {
  const DispatchSpec& d = w.dispatches[index];
  std::vector<DispatchRank>& ranks = w.dispatch_ranks[index];
  const int R = w.R(), H = w.H(), E = w.E(), K = w.K(), L = w.L();
  const int row_bytes = w.row_bytes(d), S = w.num_scales(), W = w.num_ue8m0_words();
  // Send side: slot of (t, k) = earlier (t', k') of this source that named the same expert.
  for (DispatchRank& s : ranks) {
    s.token_slot.assign(size_t(s.num_tokens) * K, -1);
    s.send_count.assign(E, 0);
    for (size_t i = 0; i < s.topk_idx.size(); ++i)
      if (s.topk_idx[i] >= 0) s.token_slot[i] = s.send_count[s.topk_idx[i]]++;
  }
  // Receive side: expert e's rows source-rank major, tokens ascending within a source.
  for (int dst = 0; dst < R; ++dst) {
    DispatchRank& r = ranks[dst];
    r.recv_count.assign(L, 0);
    r.recv_layout.assign(size_t(L) * R * 2, 0);
    r.rows.assign(L, {});
    r.scales.assign(L, {});
    r.ue8m0.assign(L, {});
    for (int l = 0; l < L; ++l) {
      const int e = dst * L + l;
      for (int src = 0; src < R; ++src) {
        const DispatchRank& s = ranks[src];
        r.recv_layout[(size_t(l) * R + src) * 2] = r.recv_count[l];
        r.recv_layout[(size_t(l) * R + src) * 2 + 1] = s.send_count[e];
        r.recv_count[l] += s.send_count[e];
        for (int t = 0; t < s.num_tokens; ++t) {
          bool named = false;
          for (int k = 0; k < K; ++k) named = named || s.topk_idx[size_t(t) * K + k] == e;
          if (!named) continue;
          const uint16_t* x = &s.x[size_t(t) * H];
          std::vector<uint8_t>& rows = r.rows[l];
          if (!d.fp8) {
            rows.insert(rows.end(), reinterpret_cast<const uint8_t*>(x), reinterpret_cast<const uint8_t*>(x) + row_bytes);
            continue;
          }
          std::vector<uint8_t> q(H);
          std::vector<float> sc(S);
          cast_row_to_fp8(x, H, d.round_scale, q.data(), sc.data());
          rows.insert(rows.end(), q.begin(), q.end());
          if (!d.ue8m0) {
            r.scales[l].insert(r.scales[l].end(), sc.begin(), sc.end());
            continue;
          }
          for (int word = 0; word < W; ++word) {  // byte i of word w: the exponent byte of scale 4w+i
            uint32_t packed = 0;
            for (int i = 0; i < ll::kUe8m0ScalesPerWord; ++i) {
              uint32_t bits;
              std::memcpy(&bits, &sc[word * ll::kUe8m0ScalesPerWord + i], 4);
              packed |= ((bits >> 23) & 0xffu) << (8 * i);
            }
            r.ue8m0[l].push_back(int32_t(packed));
          }
        }
      }
    }
    for (int l = 0; l < L; ++l) w.cumulative_stats[dst][l] += r.recv_count[l];
  }
}

void expect_combine(World& w, int index) {
  const CombineSpec& c = w.combines[index];
  const std::vector<DispatchRank>& dr = w.dispatch_ranks[c.dispatch];
  std::vector<CombineRank>& ranks = w.combine_ranks[index];
  const int R = w.R(), H = w.H(), K = w.K(), L = w.L();
  const int64_t RT = w.RT();
  ranks.assign(R, CombineRank{});
  for (int r = 0; r < R; ++r) {
    Rng rng(mix(mix(w.opt.seed, uint64_t(index) + 5001), uint64_t(r) + 7));
    CombineRank& cr = ranks[r];
    cr.topk_weights.resize(size_t(dr[r].num_tokens) * K);
    for (float& v : cr.topk_weights) v = rng.uniform() * 2.0f - 0.5f;
    cr.y.assign(size_t(L) * RT * H, 0);
    for (int l = 0; l < L; ++l) {
      const std::vector<uint16_t> rows = bf16_vector(rng, size_t(dr[r].recv_count[l]) * H, 3.0f);
      std::copy(rows.begin(), rows.end(), cr.y.begin() + size_t(l) * RT * H);
    }
  }
  // On each source: acc = 0; for k: acc = acc + w * row (float32, each operation rounded: x86-64
  // has no FMA without -march, so nothing is contracted); one rounding to bf16.
  for (int s = 0; s < R; ++s) {
    const DispatchRank& in = dr[s];
    CombineRank& cr = ranks[s];
    cr.combined.assign(size_t(in.num_tokens) * H, 0);
    for (int t = 0; t < in.num_tokens; ++t)
      for (int h = 0; h < H; ++h) {
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
          const int64_t e = in.topk_idx[size_t(t) * K + k];
          if (e < 0) continue;
          const int dst = int(e / L), l = int(e % L);
          const int64_t row = dr[dst].recv_layout[(size_t(l) * R + s) * 2] + in.token_slot[size_t(t) * K + k];
          const float product = cr.topk_weights[size_t(t) * K + k] * from_bf16(ranks[dst].y[(size_t(l) * RT + row) * H + h]);
          acc = acc + product;
        }
        cr.combined[size_t(t) * H + h] = to_bf16(acc);
      }
  }
}

void plan(World& w) {
  const Options& o = w.opt;
  auto dispatch = [&](bool fp8, bool ue8m0, bool full) {
    DispatchSpec d;
    d.index = int(w.dispatches.size());
    d.fp8 = fp8;
    d.round_scale = ue8m0;
    d.ue8m0 = ue8m0;
    d.full = full;
    w.dispatches.push_back(d);
    return d.index;
  };
  auto combine = [&](int of, bool zero_copy) {
    CombineSpec c;
    c.index = int(w.combines.size());
    c.dispatch = of;
    c.zero_copy = zero_copy;
    w.combines.push_back(c);
    return c.index;
  };
  auto send = [](bool is_combine, int i) { return Step{is_combine, false, i}; };
  auto recv = [](bool is_combine, int i) { return Step{is_combine, true, i}; };
  for (const std::string& name : o.cases) {
    Case c;
    c.name = name;
    if (name == "double" || name == "inflight") {
      const int a = dispatch(false, false, false), b = dispatch(name == "inflight", false, false);
      const int ca = combine(a, false), cb = combine(b, name == "inflight");
      if (name == "double")
        c.steps = {send(false, a), recv(false, a), send(false, b), recv(false, b),
                   send(true, ca), recv(true, ca), send(true, cb), recv(true, cb)};
      else
        c.steps = {send(false, a), send(false, b), recv(false, a), recv(false, b),
                   send(true, ca), send(true, cb), recv(true, ca), recv(true, cb)};
      c.dispatches = {a, b};
      c.combines = {ca, cb};
    } else {
      const int a = dispatch(name == "fp8" || name == "ue8m0", name == "ue8m0", name == "full");
      const int ca = combine(a, name == "zerocopy" || name == "ue8m0");
      c.steps = {send(false, a), recv(false, a), send(true, ca), recv(true, ca)};
      c.dispatches = {a};
      c.combines = {ca};
    }
    w.cases.push_back(c);
  }
  w.cumulative_stats.assign(w.R(), std::vector<int32_t>(w.L(), 0));
  w.dispatch_ranks.resize(w.dispatches.size());
  for (const DispatchSpec& d : w.dispatches) {
    for (int r = 0; r < w.R(); ++r) w.dispatch_ranks[d.index].push_back(make_dispatch_inputs(w, d, r));
    expect_dispatch(w, d.index);
  }
  w.combine_ranks.resize(w.combines.size());
  for (const CombineSpec& c : w.combines) expect_combine(w, c.index);
  w.buffer_bytes = ll::buffer_bytes(w.T(), w.H(), w.R(), w.E());
}

// ---- one rank -----------------------------------------------------------------------------------------------

struct Shared {
  World* world = nullptr;
  HostBarrier* barrier = nullptr;
  RankOutcomes* outcomes = nullptr;
};

// This rank's device arrays of one dispatch and one combine.
struct DispatchDevice {
  uint16_t* x = nullptr;
  int64_t* topk_idx = nullptr;
  int32_t *token_slot = nullptr, *send_count = nullptr, *recv_count = nullptr, *recv_layout = nullptr;
  unsigned long long* call_epoch = nullptr;
  void* recv_x = nullptr;
  void* recv_scales = nullptr;
};
struct CombineDevice {
  float* topk_weights = nullptr;
  uint16_t* y = nullptr;
  unsigned long long* call_epoch = nullptr;
  uint16_t* out = nullptr;
};

class RankRun {
 public:
  RankRun(const World& w, int rank, ep_comm::LowLatencyRuntime& rt)
      : w_(w), o_(w.opt), rank_(rank), rt_(rt), dispatch_(w.dispatches.size()), combine_(w.combines.size()) {
    stats_ = mem_.alloc_n<int32_t>(w.L());
    EP_CUDA_CHECK(cudaMemset(stats_, 0, sizeof(int32_t) * w.L()));
  }

  void run_case(const Case& c) {
    for (const Step& s : c.steps) {
      if (!s.recv && o_.skew_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(rank_ * o_.skew_us));
      if (!s.combine && !s.recv) dispatch_send(s.index);
      if (!s.combine && s.recv) dispatch_recv(s.index);
      if (s.combine && !s.recv) combine_send(s.index);
      if (s.combine && s.recv) combine_recv(s.index);
      if (o_.sync_each) synchronize();
    }
    synchronize();
    Checker check{context(c), o_.max_reports};
    for (int d : c.dispatches) compare_dispatch(check, d);
    for (int i : c.combines) compare_combine(check, i);
    log_line(o_.verbose, check.context + ": " + (check.ok ? "ok" : "MISMATCH"));
  }

  void compare_stats() {
    Checker check{"rank " + std::to_string(rank_) + " after every case (seed " + std::to_string(o_.seed) + ")",
                  o_.max_reports};
    check.equal("cumulative_local_expert_recv_stats", download<int32_t>(stats_, w_.L()), w_.cumulative_stats[rank_], 0);
  }

 private:
  // Waits for this rank's device; a fault (sticky) or a kernel-reported error throws.
  void synchronize() {
    EP_CUDA_CHECK(cudaDeviceSynchronize());
    EP_CUDA_CHECK(cudaGetLastError());
    rt_.check_error();
  }

  std::string context(const Case& c) const {
    std::ostringstream os;
    os << "rank " << rank_ << " case " << c.name << " (" << (o_.p2p ? "p2p" : "put") << ", seed " << o_.seed << ")";
    return os.str();
  }

  void dispatch_send(int i) {
    const DispatchSpec& d = w_.dispatches[i];
    const DispatchRank& in = w_.dispatch_ranks[i][rank_];
    DispatchDevice& dev = dispatch_[i];
    const size_t n = size_t(in.num_tokens), K = size_t(w_.K()), L = size_t(w_.L()), RT = size_t(w_.RT());
    dev.x = mem_.upload(in.x);
    dev.topk_idx = mem_.upload(in.topk_idx);
    dev.token_slot = mem_.alloc_n<int32_t>(n * K);
    dev.send_count = mem_.alloc_n<int32_t>(w_.E());
    dev.call_epoch = mem_.alloc_n<unsigned long long>(1);
    dev.recv_count = mem_.alloc_n<int32_t>(L);
    dev.recv_layout = mem_.alloc_n<int32_t>(L * w_.R() * 2);
    dev.recv_x = mem_.alloc(L * RT * w_.row_bytes(d));
    if (d.fp8) dev.recv_scales = mem_.alloc(sizeof(int32_t) * L * RT * (d.ue8m0 ? w_.num_ue8m0_words() : w_.num_scales()));
    ll::DispatchSendArgs a{};
    a.x = dev.x;
    a.topk_idx = dev.topk_idx;
    a.num_tokens = in.num_tokens;
    a.num_topk = w_.K();
    a.use_fp8 = d.fp8;
    a.round_scale = d.round_scale;
    a.token_slot = dev.token_slot;
    a.send_count = dev.send_count;
    a.call_epoch = dev.call_epoch;
    rt_.dispatch_send(w_.T(), w_.H(), w_.E(), a, nullptr);
  }

  void dispatch_recv(int i) {
    const DispatchSpec& d = w_.dispatches[i];
    const DispatchDevice& dev = dispatch_[i];
    ll::DispatchRecvArgs a{};
    a.call_epoch = dev.call_epoch;
    a.use_fp8 = d.fp8;
    a.use_ue8m0 = d.ue8m0;
    a.recv_x = dev.recv_x;
    a.recv_scales = dev.recv_scales;
    a.recv_count = dev.recv_count;
    a.recv_layout = dev.recv_layout;
    a.cumulative_stats = stats_;
    rt_.dispatch_recv(w_.T(), w_.H(), w_.E(), a, nullptr);
  }

  void combine_send(int i) {
    const CombineSpec& c = w_.combines[i];
    const CombineRank& in = w_.combine_ranks[i][rank_];
    const DispatchDevice& dd = dispatch_[c.dispatch];
    CombineDevice& dev = combine_[i];
    dev.call_epoch = mem_.alloc_n<unsigned long long>(1);
    ll::CombineSendArgs a{};
    if (c.zero_copy) {
      // Written on the stream, as a caller writes get_next_low_latency_combine_buffer(): after the
      // previous combine's send finished reading the staging area.
      uint8_t* staging = reinterpret_cast<uint8_t*>(rt_.buffer_ptr()) +
                         rt_.layout(w_.T(), w_.H(), w_.E()).combine_staging_offset;
      EP_CUDA_CHECK(cudaMemcpyAsync(staging, in.y.data(), in.y.size() * sizeof(uint16_t), cudaMemcpyHostToDevice,
                                    nullptr));
    } else {
      dev.y = mem_.upload(in.y);
    }
    a.x = dev.y;
    a.zero_copy = c.zero_copy;
    a.recv_layout = dd.recv_layout;
    a.call_epoch = dev.call_epoch;
    rt_.combine_send(w_.T(), w_.H(), w_.E(), a, nullptr);
  }

  void combine_recv(int i) {
    const CombineSpec& c = w_.combines[i];
    const DispatchRank& in = w_.dispatch_ranks[c.dispatch][rank_];
    const DispatchDevice& dd = dispatch_[c.dispatch];
    CombineDevice& dev = combine_[i];
    dev.topk_weights = mem_.upload(w_.combine_ranks[i][rank_].topk_weights);
    dev.out = mem_.alloc_n<uint16_t>(size_t(in.num_tokens) * w_.H());
    ll::CombineRecvArgs a{};
    a.call_epoch = dev.call_epoch;
    a.topk_idx = dd.topk_idx;
    a.topk_weights = dev.topk_weights;
    a.token_slot = dd.token_slot;
    a.send_count = dd.send_count;
    a.num_tokens = in.num_tokens;
    a.num_topk = w_.K();
    a.out = dev.out;
    rt_.combine_recv(w_.T(), w_.H(), w_.E(), a, nullptr);
  }

  void compare_dispatch(Checker& check, int i) {
    const DispatchSpec& d = w_.dispatches[i];
    const DispatchRank& e = w_.dispatch_ranks[i][rank_];
    const DispatchDevice& dev = dispatch_[i];
    const int R = w_.R(), K = w_.K(), L = w_.L(), S = w_.num_scales(), W = w_.num_ue8m0_words();
    const int64_t RT = w_.RT(), row_bytes = w_.row_bytes(d);
    const std::string op = "dispatch " + std::to_string(i) + " ";
    check.equal(op + "token_slot", download<int32_t>(dev.token_slot, e.token_slot.size()), e.token_slot, K);
    check.equal(op + "send_count", download<int32_t>(dev.send_count, w_.E()), e.send_count, 0);
    const std::vector<int32_t> count = download<int32_t>(dev.recv_count, L);
    check.equal(op + "recv_count", count, e.recv_count, 0);
    check.equal(op + "recv_layout", download<int32_t>(dev.recv_layout, size_t(L) * R * 2), e.recv_layout, 2);
    const auto* recv_x = static_cast<const uint8_t*>(dev.recv_x);
    for (int l = 0; l < L; ++l) {
      // Rows past what this expert should hold are not compared (the kernel leaves them as they were).
      const int64_t rows = e.recv_count[l];
      const std::string expert = "[expert " + std::to_string(l) + "]";
      std::vector<uint8_t> got(recv_x + l * RT * row_bytes, recv_x + (l * RT + rows) * row_bytes);
      check.equal(op + "recv_x" + expert, got, e.rows[l], int(row_bytes));
      if (!d.fp8) continue;
      if (d.ue8m0) {  // column-major int32 [L, H/512, R*T]
        const auto* all = static_cast<const int32_t*>(dev.recv_scales);
        std::vector<int32_t> packed(size_t(rows) * W);
        for (int64_t row = 0; row < rows; ++row)
          for (int word = 0; word < W; ++word) packed[row * W + word] = all[(int64_t(l) * W + word) * RT + row];
        check.equal(op + "recv_scales (ue8m0)" + expert, packed, e.ue8m0[l], W);
      } else {  // column-major float32 [L, H/128, R*T]
        const auto* all = static_cast<const float*>(dev.recv_scales);
        std::vector<float> scales(size_t(rows) * S);
        for (int64_t row = 0; row < rows; ++row)
          for (int j = 0; j < S; ++j) scales[row * S + j] = all[(int64_t(l) * S + j) * RT + row];
        check.equal(op + "recv_scales" + expert, scales, e.scales[l], S);
      }
    }
  }

  void compare_combine(Checker& check, int i) {
    const CombineSpec& c = w_.combines[i];
    const size_t n = size_t(w_.dispatch_ranks[c.dispatch][rank_].num_tokens);
    check.equal("combine " + std::to_string(i) + " combined_x", download<uint16_t>(combine_[i].out, n * w_.H()),
                w_.combine_ranks[i][rank_].combined, w_.H());
  }

  const World& w_;
  const Options& o_;
  const int rank_;
  ep_comm::LowLatencyRuntime& rt_;
  DeviceArena mem_;
  int32_t* stats_ = nullptr;
  std::vector<DispatchDevice> dispatch_;
  std::vector<CombineDevice> combine_;
};

void rank_main(Shared& sh, int rank) {
  const World& w = *sh.world;
  const Options& o = w.opt;
  RankOutcomes& out = *sh.outcomes;
  bool nvshmem_up = false;
  std::unique_ptr<ep_comm::LowLatencyRuntime> rt;
  try {
    EP_CUDA_CHECK(cudaSetDevice(rank));
    init_nvshmem_pe(w.unique_id, rank, w.R());
    nvshmem_up = true;
  } catch (const std::exception& ex) {
    out.error(rank, std::string("NVSHMEM initialisation: ") + ex.what());
  }
  sh.barrier->wait();  // rank 0's acquire() returned: nvshmem_runtime holds its reference
  try {
    if (nvshmem_up && !out.any_error) rt = std::make_unique<ep_comm::LowLatencyRuntime>(w.buffer_bytes, rank, w.R(), o.p2p, o.timeout_s);
  } catch (const std::exception& ex) {
    out.error(rank, std::string("LowLatencyRuntime: ") + ex.what());
  }
  sh.barrier->wait();  // every buffer is zeroed before anyone sends (the dist.barrier of low_latency.py)

  if (rt && !out.any_error) {
    try {
      RankRun run(w, rank, *rt);
      for (const Case& c : w.cases) run.run_case(c);
      run.compare_stats();
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
  // Every runtime gave its reference back (the count is process-wide), so rank 0's is the last.
  sh.barrier->wait();
  if (nvshmem_up) finalize_nvshmem_pe(rank);
}

}  // namespace

int main(int argc, char** argv) {
  World w;
  if (!parse(argc, argv, w.opt)) return 2;
  const Options& o = w.opt;
  install_fault_reporter();
  // Before the first CUDA/NVSHMEM call reads them.
  if (o.sms > 0) setenv("EP_COMM_EMU_NUM_SMS", std::to_string(o.sms).c_str(), 1);
  if (!o.p2p) setenv("NVSHMEM_DISABLE_P2P", "1", 1);
  plan(w);
  size_symmetric_heap(w.buffer_bytes);

  int sms = 0;
  (void)cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  // The largest grid: combine_recv, up to min(SMs, T) blocks of 256 threads, on every rank.
  warn_if_too_many_fibers("low_latency_driver", long(o.ranks) * std::min(sms, o.tokens) * 256);
  size_t steps = 0;
  for (const Case& c : w.cases) steps += c.steps.size();
  std::fprintf(stderr,
               "low_latency_driver: %d ranks, T %d, hidden %d, %d experts, top-%d, %s, %d SMs, seed %llu, %zu cases "
               "(%zu kernels per rank), buffer %lld bytes\n",
               o.ranks, o.tokens, o.hidden, o.experts, o.topk, o.p2p ? "P2P stores" : "NVSHMEM puts only", sms,
               (unsigned long long)o.seed, w.cases.size(), steps, (long long)w.buffer_bytes);
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
  ok_text << "OK: " << w.cases.size() << " cases (" << w.dispatches.size() << " dispatches, " << w.combines.size()
          << " combines) on " << o.ranks << " ranks matched the reference (" << (o.p2p ? "p2p" : "put")
          << ", seed " << o.seed << ")";
  return wait_for_ranks(outcomes, ranks, o.deadline_s, o.seed, ok_text.str());
}
