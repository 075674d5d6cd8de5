// In-process multi-rank driver of the intranode kernels on the emulated device (csrc/emulator).
//
// R ranks are std::threads of one process; rank r uses emulated device r (cudaSetDevice is
// thread-local in the emulator) and its own ep_comm::IpcBuffer. The ranks exchange IPC handles in
// memory; in one process cudaIpcOpenMemHandle returns the peer's own pointer, so ThreadSanitizer
// and AddressSanitizer see the real cross-rank sharing that rank processes hide from them.
//
// Every rank runs the call sequence of ep_comm/backends/intranode.py, with the same C++ entry
// points the bindings (csrc/bindings/intranode.cpp) call and the same signatures and sizes:
//   get_dispatch_layout -> notify (arm_recv_counters) -> wait_recv_counts (unless num_worst_tokens)
//   -> dispatch -> cached dispatch (new payload, same handle) -> combine (y, weights, biases)
// on fresh seeded inputs, then compares every output with a plain host-loop reference computed
// here from all ranks' inputs (one process knows them all):
//   layout counts and is_token_in_rank, the handle (channel_pos, send_count, recv_start), the
//   receive counts and per-expert counts (rounded up to expert_alignment), recv_x / scales /
//   topk idx / weights bit for bit in the documented order (source rank, then channel, then
//   token), num_worst_tokens padding rows, and combine bit for bit (float32 sum in ascending
//   rank order from 0, then bias0, then bias1, one rounding to bf16; weights likewise).
//
// Cases (--cases, comma separated):
//   bf16   bf16 rows, top-k weights, expert_alignment 1, host-reported counts; combine with two
//          biases and weights
//   fp8    1-byte rows + float32 scales (hidden / 128 per row), no weights, expert_alignment 4;
//          combine of bf16 rows without bias or weights
//   worst  bf16, weights, expert_alignment 2, num_worst_tokens = total + 3 (no host sync, padding
//          rows); combine with one bias, no weights
//   abort  (only when named; run once, after everything else) the last rank skips the call: every
//          other rank's notify must time out (after --abort-timeout-s) and raise an error naming
//          it as the peer, with nothing hanging; the error paths (error slots, the abort words
//          written into peers' buffers) then run under the sanitizers too
// Every case: the last rank has zero tokens, ~20% of top-k entries are -1, token 1 of each rank
// goes nowhere; channel counts alternate between --channels and --channels / 2 from call to call
// on the same buffer.
//
// Exit status: 0 everything matched; 1 a mismatch; 2 bad usage; 3 an emulated-device fault
// (deadlock, divergent collective, barrier mismatch, hang: printed by the emulator); 4 a kernel
// or runtime error (device timeout, invalid input, CUDA error); 5 the driver's own deadline.
// A SIGSEGV (an access outside device memory: every allocation ends at the emulator's guard page)
// prints the address and exits 3 in builds without a sanitizer (the sanitizers report it).
// Sanitizer reports exit through the sanitizer (TSan exitcode, ASan abort).
//
// Build: python scripts/emu_build.py --variant plain (also address, thread), in essence
//   g++ -x c++ -std=c++17 -O2 -DEP_COMM_EMULATOR -Icsrc/emulator/include -Icsrc
//       tests/emulator/intranode_driver.cpp csrc/kernels/{layout,intranode}.cu
//       csrc/runtime/ipc_buffer.cpp csrc/emulator/{runtime,scheduler}.cpp -lpthread
// Check everything: scripts/emu_sanitize.sh; prove the checks bite: scripts/emu_mutants.py.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
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
#include "kernels/common/intranode_layout.cuh"
#include "kernels/intranode.hpp"
#include "kernels/layout.hpp"
#include "runtime/errors.hpp"
#include "runtime/ipc_buffer.hpp"

namespace {

using namespace emu_driver;
namespace in = ep_comm::intranode;

// ---- options -------------------------------------------------------------------------------------

const std::vector<std::string> kAllCases{"bf16", "fp8", "worst"};

struct Options : CommonOptions {
  int channels = 2;
  int slots = 4;  // ring capacity (num_max_nvl_chunked_recv_tokens): small, so rings wrap
  int experts_per_rank = 3;
  int iterations = 1;
  double abort_timeout_s = 3.0;  // the device timeout of the abort case
  Options() {
    tokens = 24;  // tokens of rank 0; others a few fewer, the last rank none
    hidden = 128;
    cases = kAllCases;
  }
};

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--ranks R] [--tokens N] [--hidden H] [--channels C] [--slots S] [--experts-per-rank E]\n"
               "          [--topk K] [--seed S] [--iterations I] [--cases bf16,fp8,worst,abort] [--timeout-s T]\n"
               "          [--abort-timeout-s A] [--deadline-s D] [--sync-each] [--max-reports M] [--verbose]\n"
               "cases: bf16, fp8, worst (default: these three), all (the same), abort (only when named)\n",
               argv0);
}

bool parse(int argc, char** argv, Options& o) {
  OptionParser p(o, kAllCases, {"abort"}, usage);
  p.add("--channels", o.channels);
  p.add("--slots", o.slots);
  p.add("--experts-per-rank", o.experts_per_rank);
  p.add("--iterations", o.iterations);
  p.add("--abort-timeout-s", o.abort_timeout_s);
  if (!p.parse(argc, argv)) return false;
  const char* bad = nullptr;
  if (o.ranks < 1 || o.ranks > in::kNumMaxRanks) bad = "--ranks must be 1..8";
  else if (o.tokens < 0) bad = "--tokens must be >= 0";
  else if (o.hidden <= 0 || o.hidden % in::kScaleBlock != 0) bad = "--hidden must be a positive multiple of 128";
  else if (o.channels < 1 || o.channels > in::kMaxChannels) bad = "--channels must be 1..128";
  else if (o.slots < 2) bad = "--slots must be >= 2";
  else if (o.experts_per_rank < 1) bad = "--experts-per-rank must be >= 1";
  else if (o.topk < 1 || o.topk > in::kMaxTopk || o.topk > o.experts_per_rank * o.ranks)
    bad = "--topk must be 1..min(32, experts)";
  else if (o.iterations < 1) bad = "nothing to run";
  else if (o.ranks < 2 && std::find(o.cases.begin(), o.cases.end(), "abort") != o.cases.end())
    bad = "the abort case needs at least 2 ranks";
  return p.accept(bad);
}

// ---- call signatures: exactly ep_comm/backends/intranode.py::_signature -----------------------------

uint32_t crc32(const std::string& text) {
  uint32_t crc = 0xffffffffu;
  for (unsigned char c : text) {
    crc ^= c;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}
uint32_t signature(const std::string& kind, const std::vector<long long>& values) {
  std::string text = kind + ":";
  for (size_t i = 0; i < values.size(); ++i) text += (i ? "," : "") + std::to_string(values[i]);
  return crc32(text) & 0x7fffffffu;
}

// ---- what one call (one case on one buffer) looks like ------------------------------------------------

struct CallSpec {
  int index = 0;
  std::string name;
  bool fp8 = false;
  bool with_weights = false;
  int alignment = 1;
  bool worst = false;
  int num_bias = 0;
  bool combine_weights = false;
  int channels = 1;
  int num_worst = 0;  // filled from the inputs
  bool abort = false;  // the last rank skips this call (see the header)
};

struct RankInputs {
  int num_tokens = 0;
  std::vector<int64_t> topk_idx;    // [N, K]
  std::vector<float> topk_weights;  // [N, K], 0 where idx is -1
  std::vector<uint8_t> x, x2;       // [N, hidden_bytes]
  std::vector<float> scales, scales2;  // [N, num_scales] (fp8)
  std::vector<uint16_t> bias0, bias1;  // [N, hidden] bf16
};

struct Expected {
  std::vector<int> num_tokens_per_rank;    // [R]
  std::vector<int> num_tokens_per_expert;  // [E]
  std::vector<uint8_t> is_token_in_rank;   // [N, R]
  std::vector<int> channel_pos;            // [N, R]
  std::vector<int> send_count;             // [C, R]
  std::vector<int> recv_start;             // [R*C + 1]
  int num_recv = 0;
  int num_rows = 0;                        // allocated rows: num_recv, or num_worst_tokens
  std::vector<int> per_expert;             // [L] (empty in num_worst mode)
  std::vector<std::pair<int, int>> sources;  // (source rank, token) of each received row
  std::vector<uint8_t> recv_x, recv_x2;    // [rows, hidden_bytes]
  std::vector<float> recv_scales, recv_scales2;
  std::vector<int64_t> recv_idx;           // [rows, K]
  std::vector<float> recv_w;               // [rows, K]
  // combine: this rank's inputs and outputs
  std::vector<uint16_t> y;                 // [rows, hidden] bf16
  std::vector<float> cw;                   // [rows, K]
  std::vector<uint16_t> combined;          // [N, hidden]
  std::vector<float> combined_w;           // [N, K]
};

struct World {
  Options opt;
  std::vector<CallSpec> calls;
  std::vector<std::vector<RankInputs>> inputs;      // [call][rank]
  std::vector<std::vector<Expected>> expected;      // [call][rank]
  int64_t buffer_bytes = 0;
  int num_experts() const { return opt.experts_per_rank * opt.ranks; }
  int num_scales(const CallSpec& c) const { return c.fp8 ? opt.hidden / in::kScaleBlock : 0; }
  int64_t hidden_bytes(const CallSpec& c) const { return c.fp8 ? opt.hidden : int64_t(opt.hidden) * 2; }
};

void fill_bf16_rows(Rng& rng, std::vector<uint8_t>& out, int rows, int hidden) {
  out.resize(size_t(rows) * hidden * 2);
  for (int r = 0; r < rows; ++r) {
    const float scale = 1.0f + 4.0f * rng.uniform();
    for (int h = 0; h < hidden; ++h) {
      const uint16_t v = to_bf16((rng.uniform() * 2.0f - 1.0f) * scale);
      std::memcpy(&out[(size_t(r) * hidden + h) * 2], &v, 2);
    }
  }
}
RankInputs make_inputs(const World& w, const CallSpec& c, int rank) {
  const Options& o = w.opt;
  Rng rng(mix(mix(o.seed, uint64_t(c.index) + 1), uint64_t(rank) + 101));
  RankInputs in;
  in.num_tokens = rank == o.ranks - 1 ? 0 : std::max(0, o.tokens - 3 * rank - rng.below(3));
  const int n = in.num_tokens, k = o.topk, e = w.num_experts();
  in.topk_idx.assign(size_t(n) * k, -1);
  in.topk_weights.assign(size_t(n) * k, 0.0f);
  for (int t = 0; t < n; ++t) {
    std::vector<int> perm(e);
    for (int i = 0; i < e; ++i) perm[i] = i;
    for (int i = 0; i < k; ++i) std::swap(perm[i], perm[i + rng.below(e - i)]);  // distinct experts
    for (int i = 0; i < k; ++i) {
      const bool masked = t == 1 || rng.uniform() < 0.2f;  // token 1 goes nowhere
      in.topk_idx[size_t(t) * k + i] = masked ? -1 : perm[i];
      in.topk_weights[size_t(t) * k + i] = masked ? 0.0f : 0.1f + rng.uniform();
    }
  }
  const int hb = int(w.hidden_bytes(c)), ns = w.num_scales(c);
  if (c.fp8) {
    in.x.resize(size_t(n) * hb);
    in.x2.resize(size_t(n) * hb);
    for (auto& b : in.x) b = uint8_t(rng.next());
    for (auto& b : in.x2) b = uint8_t(rng.next());
    in.scales.resize(size_t(n) * ns);
    in.scales2.resize(size_t(n) * ns);
    for (auto& s : in.scales) s = 0.001f + rng.uniform();
    for (auto& s : in.scales2) s = 0.001f + rng.uniform();
  } else {
    fill_bf16_rows(rng, in.x, n, o.hidden);
    fill_bf16_rows(rng, in.x2, n, o.hidden);
  }
  in.bias0 = bf16_vector(rng, size_t(n) * o.hidden, 0.1f);
  in.bias1 = bf16_vector(rng, size_t(n) * o.hidden, 0.1f);
  return in;
}

// The documented protocol, as plain loops (intranode.hpp, intranode_layout.cuh).
void compute_expected(World& w, int call) {
  const Options& o = w.opt;
  const CallSpec& c = w.calls[call];
  const int R = o.ranks, C = c.channels, K = o.topk, L = o.experts_per_rank, E = w.num_experts();
  const int hb = int(w.hidden_bytes(c)), ns = w.num_scales(c), H = o.hidden;
  std::vector<RankInputs>& ins = w.inputs[call];
  std::vector<Expected>& ex = w.expected[call];
  ex.assign(R, Expected{});
  if (c.abort) return;  // nothing to compare: the call must fail

  // Layout and the sender-side handle.
  for (int s = 0; s < R; ++s) {
    const RankInputs& x = ins[s];
    Expected& e = ex[s];
    const int n = x.num_tokens;
    e.num_tokens_per_rank.assign(R, 0);
    e.num_tokens_per_expert.assign(E, 0);
    e.is_token_in_rank.assign(size_t(n) * R, 0);
    for (int t = 0; t < n; ++t) {
      for (int k = 0; k < K; ++k) {
        const int64_t id = x.topk_idx[size_t(t) * K + k];
        if (id < 0) continue;
        e.num_tokens_per_expert[id] += 1;  // distinct experts per token
        e.is_token_in_rank[size_t(t) * R + id / L] = 1;
      }
      for (int r = 0; r < R; ++r) e.num_tokens_per_rank[r] += e.is_token_in_rank[size_t(t) * R + r];
    }
    e.channel_pos.assign(size_t(n) * R, 0);
    e.send_count.assign(size_t(C) * R, 0);
    for (int ch = 0; ch < C; ++ch) {
      int begin, end;
      in::channel_token_range(n, C, ch, begin, end);
      for (int r = 0; r < R; ++r) {
        int running = 0;
        for (int t = begin; t < end; ++t) {
          e.channel_pos[size_t(t) * R + r] = running;
          running += e.is_token_in_rank[size_t(t) * R + r];
        }
        e.send_count[size_t(ch) * R + r] = running;
      }
    }
  }
  if (c.worst) {
    int all = 0;
    for (int s = 0; s < R; ++s) all += ins[s].num_tokens;
    w.calls[call].num_worst = all + 3;  // as tests/gpu/test_intranode.py: every token, plus padding
  }
  const int num_worst = w.calls[call].num_worst;

  // Receiver side: rows in (source, channel, token) order.
  for (int d = 0; d < R; ++d) {
    Expected& e = ex[d];
    e.recv_start.assign(size_t(R) * C + 1, 0);
    int row = 0;
    for (int s = 0; s < R; ++s)
      for (int ch = 0; ch < C; ++ch) {
        e.recv_start[size_t(s) * C + ch] = row;
        int begin, end;
        in::channel_token_range(ins[s].num_tokens, C, ch, begin, end);
        for (int t = begin; t < end; ++t)
          if (ex[s].is_token_in_rank[size_t(t) * R + d]) {
            e.sources.emplace_back(s, t);
            ++row;
          }
      }
    e.recv_start[size_t(R) * C] = row;
    e.num_recv = row;
    e.num_rows = c.worst ? num_worst : row;
    if (!c.worst) {
      e.per_expert.assign(L, 0);
      for (int s = 0; s < R; ++s)
        for (int l = 0; l < L; ++l) e.per_expert[l] += ex[s].num_tokens_per_expert[d * L + l];
      for (int& v : e.per_expert) v = (v + c.alignment - 1) / c.alignment * c.alignment;
    }
    const int rows = e.num_rows;
    e.recv_x.assign(size_t(rows) * hb, 0);
    e.recv_x2.assign(size_t(rows) * hb, 0);
    e.recv_scales.assign(size_t(rows) * ns, 0.0f);
    e.recv_scales2.assign(size_t(rows) * ns, 0.0f);
    e.recv_idx.assign(size_t(rows) * K, -1);
    e.recv_w.assign(size_t(rows) * K, 0.0f);
    for (int i = 0; i < e.num_recv; ++i) {
      const auto [s, t] = e.sources[i];
      const RankInputs& x = ins[s];
      std::memcpy(&e.recv_x[size_t(i) * hb], &x.x[size_t(t) * hb], hb);
      std::memcpy(&e.recv_x2[size_t(i) * hb], &x.x2[size_t(t) * hb], hb);
      for (int j = 0; j < ns; ++j) {
        e.recv_scales[size_t(i) * ns + j] = x.scales[size_t(t) * ns + j];
        e.recv_scales2[size_t(i) * ns + j] = x.scales2[size_t(t) * ns + j];
      }
      for (int k = 0; k < K; ++k) {
        const int64_t id = x.topk_idx[size_t(t) * K + k];
        const bool mine = id >= int64_t(d) * L && id < int64_t(d + 1) * L;
        e.recv_idx[size_t(i) * K + k] = mine ? id - int64_t(d) * L : -1;
        e.recv_w[size_t(i) * K + k] = mine && c.with_weights ? x.topk_weights[size_t(t) * K + k] : 0.0f;
      }
    }
    // Combine inputs of this rank: fresh rows (padding rows too) and weights.
    Rng rng(mix(mix(o.seed, uint64_t(call) + 1), uint64_t(d) + 7777));
    e.y = bf16_vector(rng, size_t(rows) * H, 2.0f);
    e.cw.resize(size_t(rows) * K);
    for (auto& v : e.cw) v = rng.uniform() * 2.0f - 0.5f;
  }

  // Combine, on each source rank: rank-ascending float sum from 0, then bias0, bias1, one rounding.
  for (int s = 0; s < R; ++s) {
    const RankInputs& x = ins[s];
    Expected& e = ex[s];
    const int n = x.num_tokens;
    e.combined.assign(size_t(n) * H, 0);
    e.combined_w.assign(size_t(n) * K, 0.0f);
    for (int ch = 0; ch < C; ++ch) {
      int begin, end;
      in::channel_token_range(n, C, ch, begin, end);
      for (int t = begin; t < end; ++t) {
        std::vector<float> acc(H, 0.0f), wacc(K, 0.0f);
        for (int r = 0; r < R; ++r) {
          if (!e.is_token_in_rank[size_t(t) * R + r]) continue;
          const int row = ex[r].recv_start[size_t(s) * C + ch] + e.channel_pos[size_t(t) * R + r];
          for (int h = 0; h < H; ++h) acc[h] += from_bf16(ex[r].y[size_t(row) * H + h]);
          for (int k = 0; k < K; ++k) wacc[k] += ex[r].cw[size_t(row) * K + k];
        }
        for (int h = 0; h < H; ++h) {
          if (c.num_bias >= 1) acc[h] += from_bf16(x.bias0[size_t(t) * H + h]);
          if (c.num_bias >= 2) acc[h] += from_bf16(x.bias1[size_t(t) * H + h]);
          e.combined[size_t(t) * H + h] = to_bf16(acc[h]);
        }
        for (int k = 0; k < K; ++k) e.combined_w[size_t(t) * K + k] = wacc[k];
      }
    }
  }
}

// ---- the rank threads ----------------------------------------------------------------------------------

struct Shared {
  World* world = nullptr;
  HostBarrier* barrier = nullptr;
  RankOutcomes* outcomes = nullptr;
  std::vector<std::string> handles;
};

// The context of a call's MISMATCH lines.
Checker checker(const World& w, int rank, int call) {
  std::ostringstream os;
  os << "rank " << rank << " call " << call << " (" << w.calls[call].name << ", " << w.calls[call].channels
     << " channels, seed " << w.opt.seed << ")";
  return Checker{os.str(), w.opt.max_reports};
}

void sync_stream() { EP_CUDA_CHECK(cudaStreamSynchronize(nullptr)); }  // this rank's device's stream

// The abort case: the last rank never launches this call; every other rank's notify must time out
// in its start rendezvous (or stop on a peer's abort broadcast) and raise an error that names the
// missing rank as the peer. The buffer is unusable afterwards: this is the last call.
void run_abort_call(Shared& sh, ep_comm::IpcBuffer& buf, DeviceArena& mem, int rank, int call) {
  const World& w = *sh.world;
  const Options& o = w.opt;
  const CallSpec& c = w.calls[call];
  const RankInputs& x = w.inputs[call][rank];
  const int R = o.ranks, C = c.channels, K = o.topk, L = o.experts_per_rank, E = w.num_experts();
  const int missing = R - 1;
  Checker check = checker(w, rank, call);
  if (rank == missing) {
    log_line(o.verbose, "rank " + std::to_string(rank) + " call " + std::to_string(call) + " (abort): skipped on purpose");
    return;
  }
  const int n = x.num_tokens;
  auto* d_idx = mem.upload(x.topk_idx);
  auto* d_ntpr = static_cast<int*>(mem.alloc(sizeof(int) * R));
  auto* d_ntpe = static_cast<int*>(mem.alloc(sizeof(int) * E));
  auto* d_in_rank = static_cast<bool*>(mem.alloc(size_t(n) * R));
  ep_comm::layout::DispatchLayoutArgs la{};
  la.topk_idx = d_idx;
  la.num_tokens = n;
  la.num_topk = K;
  la.num_ranks = R;
  la.num_experts = E;
  la.ranks_per_node = R;
  la.num_tokens_per_rank = d_ntpr;
  la.num_tokens_per_expert = d_ntpe;
  la.is_token_in_rank = d_in_rank;
  EP_CUDA_CHECK(cudaSetDevice(rank));
  ep_comm::layout::launch_get_dispatch_layout(la, nullptr);

  const int64_t hb = w.hidden_bytes(c);
  in::NotifyArgs a{};
  a.is_token_in_rank = d_in_rank;
  a.num_tokens_per_expert = d_ntpe;
  a.num_tokens = n;
  a.num_channels = C;
  a.num_local_experts = L;
  a.expert_alignment = 1;
  a.signature = signature("notify", {hb, 0, K, 0, C, o.slots, L});
  a.num_slots = o.slots;
  a.slot_bytes = in::dispatch_slot_bytes(hb, 0, K);
  a.channel_pos = static_cast<int*>(mem.alloc(sizeof(int) * size_t(n) * R));
  a.send_count = static_cast<int*>(mem.alloc(sizeof(int) * size_t(C) * R));
  a.recv_start = static_cast<int*>(mem.alloc(sizeof(int) * (size_t(R) * C + 1)));
  std::string error;
  const auto start = std::chrono::steady_clock::now();
  try {
    buf.activate();
    a.recv_counters = buf.arm_recv_counters();
    in::launch_notify(buf.context(o.abort_timeout_s), a, nullptr);
    (void)buf.wait_recv_counts(L, o.abort_timeout_s);
  } catch (const std::exception& ex) {
    error = ex.what();
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  sync_stream();
  if (error.empty()) {
    check.fail("rank " + std::to_string(missing) + " skipped the call, but notify returned counts instead of an error");
  } else if (error.find("peer " + std::to_string(missing)) == std::string::npos) {
    check.fail("the error does not name the missing rank " + std::to_string(missing) + " as the peer: " + error);
  } else {
    std::ostringstream os;
    os << "rank " << rank << " call " << call << " (abort): raised after " << waited << " s as expected: " << error;
    log_line(o.verbose, os.str());
  }
}

// One call: layout, notify, dispatch, cached dispatch, combine; then compare.
void run_call(Shared& sh, ep_comm::IpcBuffer& buf, DeviceArena& mem, int rank, int call) {
  const World& w = *sh.world;
  const Options& o = w.opt;
  const CallSpec& c = w.calls[call];
  const RankInputs& x = w.inputs[call][rank];
  const Expected& e = w.expected[call][rank];
  const int R = o.ranks, C = c.channels, K = o.topk, L = o.experts_per_rank, E = w.num_experts(), H = o.hidden;
  const int n = x.num_tokens, ns = w.num_scales(c);
  const int64_t hb = w.hidden_bytes(c);
  const double timeout_s = o.timeout_s;
  Checker check = checker(w, rank, call);
  auto after_op = [&] {
    if (o.sync_each) sync_stream();
  };

  // ---- get_dispatch_layout (bindings: get_dispatch_layout) ----
  auto* d_idx = mem.upload(x.topk_idx);
  auto* d_ntpr = static_cast<int*>(mem.alloc(sizeof(int) * R));
  auto* d_ntpe = static_cast<int*>(mem.alloc(sizeof(int) * E));
  auto* d_in_rank = static_cast<bool*>(mem.alloc(size_t(n) * R));
  {
    EP_CUDA_CHECK(cudaSetDevice(rank));
    ep_comm::layout::DispatchLayoutArgs a{};
    a.topk_idx = d_idx;
    a.num_tokens = n;
    a.num_topk = K;
    a.num_ranks = R;
    a.num_experts = E;
    a.ranks_per_node = R;
    a.num_tokens_per_rank = d_ntpr;
    a.num_tokens_per_rdma_rank = nullptr;
    a.num_tokens_per_expert = d_ntpe;
    a.is_token_in_rank = d_in_rank;
    ep_comm::layout::launch_get_dispatch_layout(a, nullptr);
    after_op();
  }

  // ---- notify (+ wait_recv_counts) ----
  const auto* d_w = c.with_weights ? mem.upload(x.topk_weights) : nullptr;
  const auto* d_x = mem.upload(x.x);
  const auto* d_scales = c.fp8 ? mem.upload(x.scales) : nullptr;
  auto* d_channel_pos = static_cast<int*>(mem.alloc(sizeof(int) * size_t(n) * R));
  auto* d_send_count = static_cast<int*>(mem.alloc(sizeof(int) * size_t(C) * R));
  auto* d_recv_start = static_cast<int*>(mem.alloc(sizeof(int) * (size_t(R) * C + 1)));
  const int64_t dispatch_slot = in::dispatch_slot_bytes(hb, ns, K);
  EP_HOST_ASSERT(in::layout_bytes(R, C, o.slots, dispatch_slot) <= buf.num_bytes(), "dispatch does not fit the buffer");
  const std::vector<long long> fields{hb, ns, K, c.with_weights ? 1 : 0, C, o.slots, L};
  const bool report_to_host = c.num_worst == 0;
  int num_rows = 0;
  std::vector<int> per_expert;
  {
    buf.activate();
    in::NotifyArgs a{};
    a.is_token_in_rank = d_in_rank;
    a.num_tokens_per_expert = d_ntpe;
    a.num_tokens = n;
    a.num_channels = C;
    a.num_local_experts = L;
    a.expert_alignment = c.alignment;
    a.num_worst_tokens = c.num_worst;
    a.signature = signature("notify", fields);
    a.recv_counters = report_to_host ? buf.arm_recv_counters() : nullptr;
    a.num_slots = o.slots;
    a.slot_bytes = dispatch_slot;
    a.channel_pos = d_channel_pos;
    a.send_count = d_send_count;
    a.recv_start = d_recv_start;
    in::launch_notify(buf.context(timeout_s), a, nullptr);
    if (report_to_host) {
      auto counts = buf.wait_recv_counts(L, timeout_s);
      num_rows = counts.first;
      per_expert = counts.second;
    } else {
      num_rows = c.num_worst;
    }
    after_op();
  }
  if (num_rows != e.num_rows) {
    // The rows the host allocates come from here: nothing later can be compared. Stop this rank
    // (its peers then time out on it, or the driver's watchdog ends the run).
    check.fail("num_recv_tokens = " + std::to_string(num_rows) + ", expected " + std::to_string(e.num_rows));
    throw ep_comm::Error("receive count mismatch (see MISMATCH above)");
  }

  // ---- dispatch ----
  const int rows = num_rows;
  auto* d_recv_x = mem.alloc(size_t(rows) * hb);
  auto* d_recv_scales = c.fp8 ? static_cast<float*>(mem.alloc(sizeof(float) * size_t(rows) * ns)) : nullptr;
  auto* d_recv_idx = static_cast<int64_t*>(mem.alloc(sizeof(int64_t) * size_t(rows) * K));
  auto* d_recv_w = c.with_weights ? static_cast<float*>(mem.alloc(sizeof(float) * size_t(rows) * K)) : nullptr;
  {
    buf.activate();
    in::DispatchArgs a{};
    a.x = d_x;
    a.x_scales = d_scales;
    a.topk_idx = d_idx;
    a.topk_weights = d_w;
    a.num_tokens = n;
    a.hidden_bytes = hb;
    a.num_scales = ns;
    a.num_topk = K;
    a.num_local_experts = L;
    a.is_token_in_rank = d_in_rank;
    a.channel_pos = d_channel_pos;
    a.send_count = d_send_count;
    a.recv_start = d_recv_start;
    a.num_channels = C;
    a.num_slots = o.slots;
    a.recv_x = d_recv_x;
    a.recv_x_scales = d_recv_scales;
    a.recv_topk_idx = d_recv_idx;
    a.recv_topk_weights = d_recv_w;
    a.num_recv_rows = rows;
    a.signature = signature("dispatch", fields);
    in::launch_dispatch(buf.context(timeout_s), a, nullptr);
    buf.check_error();
    after_op();
  }

  // ---- cached dispatch: new payload, the handle's layout, no top-k ----
  const auto* d_x2 = mem.upload(x.x2);
  const auto* d_scales2 = c.fp8 ? mem.upload(x.scales2) : nullptr;
  auto* d_recv_x2 = mem.alloc(size_t(rows) * hb);
  auto* d_recv_scales2 = c.fp8 ? static_cast<float*>(mem.alloc(sizeof(float) * size_t(rows) * ns)) : nullptr;
  {
    const std::vector<long long> cached_fields{hb, ns, 0, 0, C, o.slots, 0};
    EP_HOST_ASSERT(in::layout_bytes(R, C, o.slots, in::dispatch_slot_bytes(hb, ns, 0)) <= buf.num_bytes(),
                   "cached dispatch does not fit the buffer");
    buf.activate();
    in::DispatchArgs a{};
    a.x = d_x2;
    a.x_scales = d_scales2;
    a.num_tokens = n;
    a.hidden_bytes = hb;
    a.num_scales = ns;
    a.num_topk = 0;
    a.num_local_experts = 0;
    a.is_token_in_rank = d_in_rank;
    a.channel_pos = d_channel_pos;
    a.send_count = d_send_count;
    a.recv_start = d_recv_start;
    a.num_channels = C;
    a.num_slots = o.slots;
    a.recv_x = d_recv_x2;
    a.recv_x_scales = d_recv_scales2;
    a.num_recv_rows = rows;
    a.signature = signature("cached-dispatch", cached_fields);
    in::launch_dispatch(buf.context(timeout_s), a, nullptr);
    buf.check_error();
    after_op();
  }

  // ---- combine ----
  const int combine_topk = c.combine_weights ? K : 0;
  const auto* d_y = mem.upload(e.y);
  const auto* d_cw = c.combine_weights ? mem.upload(e.cw) : nullptr;
  const auto* d_bias0 = c.num_bias >= 1 ? mem.upload(x.bias0) : nullptr;
  const auto* d_bias1 = c.num_bias >= 2 ? mem.upload(x.bias1) : nullptr;
  auto* d_combined = mem.alloc(sizeof(uint16_t) * size_t(n) * H);
  auto* d_combined_w = c.combine_weights ? static_cast<float*>(mem.alloc(sizeof(float) * size_t(n) * K)) : nullptr;
  {
    const int64_t slot = in::combine_slot_bytes(int64_t(H) * 2, combine_topk);
    EP_HOST_ASSERT(in::layout_bytes(R, C, o.slots, slot) <= buf.num_bytes(), "combine does not fit the buffer");
    buf.activate();
    in::CombineArgs a{};
    a.x = d_y;
    a.topk_weights = d_cw;
    a.bias0 = d_bias0;
    a.bias1 = d_bias1;
    a.num_tokens = n;
    a.hidden = H;
    a.num_topk = combine_topk;
    a.is_token_in_rank = d_in_rank;
    a.channel_pos = d_channel_pos;
    a.send_count = d_send_count;
    a.recv_start = d_recv_start;
    a.num_channels = C;
    a.num_slots = o.slots;
    a.combined_x = d_combined;
    a.combined_topk_weights = d_combined_w;
    a.signature = signature("combine", {int64_t(H) * 2, combine_topk, C, o.slots});
    in::launch_combine(buf.context(timeout_s), a, nullptr);
    buf.check_error();
  }
  sync_stream();
  buf.check_error();

  // ---- compare ----
  check.equal("layout num_tokens_per_rank", download<int>(d_ntpr, R), e.num_tokens_per_rank, R);
  check.equal("layout num_tokens_per_expert", download<int>(d_ntpe, E), e.num_tokens_per_expert, E);
  check.equal("layout is_token_in_rank", download<uint8_t>(d_in_rank, size_t(n) * R), e.is_token_in_rank, R);
  check.equal("handle channel_pos", download<int>(d_channel_pos, size_t(n) * R), e.channel_pos, R);
  check.equal("handle send_count", download<int>(d_send_count, size_t(C) * R), e.send_count, R);
  check.equal("handle recv_start", download<int>(d_recv_start, size_t(R) * C + 1), e.recv_start, 0);
  if (report_to_host) check.equal("num_recv_tokens_per_expert", per_expert, e.per_expert, 0);
  check.equal("recv_x", download<uint8_t>(d_recv_x, size_t(rows) * hb), e.recv_x, int(hb));
  if (c.fp8) check.equal("recv_x_scales", download<float>(d_recv_scales, size_t(rows) * ns), e.recv_scales, ns);
  check.equal("recv_topk_idx", download<int64_t>(d_recv_idx, size_t(rows) * K), e.recv_idx, K);
  if (c.with_weights) check.equal("recv_topk_weights", download<float>(d_recv_w, size_t(rows) * K), e.recv_w, K);
  check.equal("cached recv_x", download<uint8_t>(d_recv_x2, size_t(rows) * hb), e.recv_x2, int(hb));
  if (c.fp8)
    check.equal("cached recv_x_scales", download<float>(d_recv_scales2, size_t(rows) * ns), e.recv_scales2, ns);
  check.equal("combined_x", download<uint16_t>(d_combined, size_t(n) * H), e.combined, H);
  if (c.combine_weights)
    check.equal("combined_topk_weights", download<float>(d_combined_w, size_t(n) * K), e.combined_w, K);
  std::ostringstream os;
  os << "rank " << rank << " call " << call << " (" << c.name << ", " << C << " channels, " << n << " tokens, "
     << rows << " rows): " << (check.ok ? "ok" : "MISMATCH");
  log_line(o.verbose, os.str());
}

void rank_main(Shared& sh, int rank) {
  const World& w = *sh.world;
  const Options& o = w.opt;
  DeviceArena mem;
  std::unique_ptr<ep_comm::IpcBuffer> buf;
  bool setup_ok = false;
  try {
    EP_CUDA_CHECK(cudaSetDevice(rank));
    buf = std::make_unique<ep_comm::IpcBuffer>(rank, o.ranks, rank, w.buffer_bytes);
    sh.handles[rank] = buf->ipc_handle();
    setup_ok = true;
  } catch (const std::exception& ex) {
    sh.outcomes->error(rank, std::string("setup: ") + ex.what());
  }
  sh.barrier->wait();  // every handle is published (the all_gather of intranode.py)
  try {
    if (setup_ok) buf->open_peers(sh.handles);
  } catch (const std::exception& ex) {
    sh.outcomes->error(rank, std::string("open_peers: ") + ex.what());
    setup_ok = false;
  }
  sh.barrier->wait();  // every rank opened every peer (the errors all_gather of intranode.py)
  if (sh.outcomes->any_error) setup_ok = false;

  if (setup_ok) {
    try {
      for (int call = 0; call < int(w.calls.size()); ++call) {
        if (w.calls[call].abort)
          run_abort_call(sh, *buf, mem, rank, call);
        else
          run_call(sh, *buf, mem, rank, call);
      }
    } catch (const std::exception& ex) {
      sh.outcomes->error(rank, ex.what());
    }
    (void)cudaStreamSynchronize(nullptr);  // this rank's kernels are done (also after an error)
  }
  sh.outcomes->finished.fetch_add(1);
  // Nobody frees its buffer while a peer may still write into it (the dist.barrier of the tests).
  sh.barrier->wait();
  if (buf) buf->destroy();
}

}  // namespace

int main(int argc, char** argv) {
  World w;
  if (!parse(argc, argv, w.opt)) return 2;
  const Options& o = w.opt;
  install_fault_reporter();

  // Every call (iteration x case), channel counts alternating on the same buffer.
  for (int it = 0; it <= o.iterations; ++it)
    for (const std::string& name : o.cases) {
      if ((name == "abort") != (it == o.iterations)) continue;  // abort: once, last
      CallSpec c;
      c.index = int(w.calls.size());
      c.name = name;
      if (name == "bf16") {
        c.with_weights = true, c.alignment = 1, c.num_bias = 2, c.combine_weights = true;
      } else if (name == "fp8") {
        c.fp8 = true, c.with_weights = false, c.alignment = 4, c.num_bias = 0, c.combine_weights = false;
      } else if (name == "worst") {
        c.worst = true, c.with_weights = true, c.alignment = 2, c.num_bias = 1, c.combine_weights = false;
      } else {
        c.abort = true;
      }
      c.channels = c.index % 2 == 0 ? o.channels : std::max(1, o.channels / 2);
      w.calls.push_back(c);
    }
  w.inputs.resize(w.calls.size());
  w.expected.resize(w.calls.size());
  for (int call = 0; call < int(w.calls.size()); ++call) {
    for (int r = 0; r < o.ranks; ++r) w.inputs[call].push_back(make_inputs(w, w.calls[call], r));
    compute_expected(w, call);
    // The size hint the Python side uses (Config.get_nvl_buffer_size_hint(hidden * 2, R)).
    w.buffer_bytes = std::max<int64_t>(w.buffer_bytes,
                                       in::buffer_bytes(int64_t(o.hidden) * 2, o.ranks, w.calls[call].channels, o.slots));
  }
  // Each rank runs up to two kernels of 2 * channels blocks at once.
  warn_if_too_many_fibers("intranode_driver", 2L * o.ranks * 2 * o.channels * in::dispatch_block_threads());
  std::fprintf(stderr,
               "intranode_driver: %d ranks, %d tokens, hidden %d, channels %d, slots %d, %d experts, top-%d, seed %llu, "
               "%zu calls, buffer %lld bytes\n",
               o.ranks, o.tokens, o.hidden, o.channels, o.slots, w.num_experts(), o.topk, (unsigned long long)o.seed,
               w.calls.size(), (long long)w.buffer_bytes);

  Shared sh;
  sh.world = &w;
  HostBarrier barrier(o.ranks);
  sh.barrier = &barrier;
  RankOutcomes outcomes(o.ranks);
  sh.outcomes = &outcomes;
  sh.handles.assign(o.ranks, std::string());

  std::vector<std::thread> ranks;
  for (int r = 0; r < o.ranks; ++r) ranks.emplace_back(rank_main, std::ref(sh), r);
  std::ostringstream ok_text;
  ok_text << "OK: " << w.calls.size() << " calls on " << o.ranks << " ranks matched the reference (seed " << o.seed
          << ")";
  return wait_for_ranks(outcomes, ranks, o.deadline_s, o.seed, ok_text.str());
}
