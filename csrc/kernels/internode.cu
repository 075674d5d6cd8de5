// Internode high-throughput dispatch and combine: NVSHMEM puts between nodes, direct NVLink stores
// (through nvshmem_ptr) inside a node. Offsets come from kernels/common/internode_layout.cuh.
//
// Dispatch (one block per channel c; a source's tokens are split into C contiguous ranges):
//   sender warps     for each destination node n: stage every token of my range that has a rank in
//                    node n into rdma_send[n][c], put it to the rank with my local index there
//                    (the "forwarder"), each put announcing its slots in the arrival word of its
//                    first slot (SET with the put); finally rdma_done = tag(epoch, total). The slot
//                    header holds the token's final row at each rank of node n, known everywhere
//                    from the notified R x R count matrix:
//                    row = sum_{s' < s} count[s'][d] + (index of the token among s's tokens for d).
//   forwarder warps  for each source node m: copy each arrived slot verbatim into the NVL ring
//                    (source s, c) of every local rank it goes to; publish tails (with a done bit at
//                    the end) and hand the RDMA slots back (rdma_head, ADD).
//   receiver warps   for each source rank s: copy slots of ring (s, c) to their explicit rows.
// Rows are explicit, so arrival order never matters: the output is deterministic.
//
// Combine (same channels, reverse direction):
//   sender warps     for each source rank s: the rows received from s in channel c (ascending token)
//                    go to the forwarder of s in my node, NVL ring keyed (my local index, node of s).
//   forwarder warps  for each source node m: merge the L rings of source s=(m, my local) by token
//                    (each ring ascending), sum the rows of one token in local-rank order in float32,
//                    stage the partial (bf16, or float32 with float_partials) and put it to s (an
//                    arrival word SET with the put).
//   receiver warps   for each of my tokens (ascending, W warps in rounds): add the partials of the
//                    nodes the token went to in node order, then the biases, round to bf16.
//
// Every wait polls local memory with a timeout that lands in the error slot (rank, phase, peer).
#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <climits>
#include <string>

#include "kernels/common/internode_launch.cuh"
#include "kernels/common/internode_layout.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/timeout.cuh"
#include "kernels/common/launch.cuh"
#include "runtime/errors.hpp"

namespace ep_comm {
namespace internode {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- memory helpers (names carry their ordering) ----------------------------------------------

using ptx::ld_volatile_f32;
using ptx::ld_volatile_i32;
using ptx::ld_volatile_v4;

__device__ __forceinline__ uint64_t ld_acquire_u64(const void* ptr) {
  return ptx::ld_acquire_sys(reinterpret_cast<const unsigned long long*>(ptr));
}
__device__ __forceinline__ void st_release_u64(void* ptr, uint64_t value) {
  ptx::st_release_sys(reinterpret_cast<unsigned long long*>(ptr), static_cast<unsigned long long>(value));
}
__device__ __forceinline__ void st_relaxed_u64(void* ptr, uint64_t value) {
  ptx::st_relaxed_sys(reinterpret_cast<unsigned long long*>(ptr), static_cast<unsigned long long>(value));
}

// A word the network writes (an NVSHMEM signal: put-with-signal or signal op), read through
// NVSHMEM, which issues whatever consistency operation the transport needs (proxy-based transports,
// some IBGDA set-ups) where a raw load would not; the fence then makes it an acquire, so what the
// signal published is visible. Words peers store through NVLink pointers use ld_acquire_u64.
__device__ __forceinline__ uint64_t network_signal(const void* ptr) {
  // NVSHMEM's declaration takes a non-const pointer; the word is only read.
  const uint64_t word = nvshmem_signal_fetch(const_cast<uint64_t*>(static_cast<const uint64_t*>(ptr)));
  ptx::fence_acq_rel_sys();
  return word;
}

// Value of a tagged word of this epoch, or `fallback` when the word is from an older call.
__device__ __forceinline__ uint32_t tagged_value(const void* ptr, uint32_t epoch, uint32_t fallback) {
  const uint64_t word = ld_acquire_u64(ptr);
  return tag_epoch(word) == epoch ? tag_value(word) : fallback;
}

// A word others keep updating, read once by lane 0 and broadcast, so that every lane sees the
// same value and warp-uniform control flow stays uniform. The shuffle orders no memory, and a
// fence in a lane that did not read the word synchronises it with nobody: __syncwarp (which
// orders memory among its lanes) passes lane 0's acquire on, so data published before the word is
// visible to every lane (ThreadSanitizer on the emulator reported the fence-only version).
__device__ __forceinline__ uint32_t warp_tagged_value(const void* ptr, uint32_t epoch, uint32_t fallback, int lane) {
  uint32_t v = 0;
  if (lane == 0) v = tagged_value(ptr, epoch, fallback);
  v = __shfl_sync(0xffffffffu, v, 0);
  __syncwarp();
  return v;
}
// The same for network-written words: an ADD counter, or a tagged word.
__device__ __forceinline__ int warp_network_counter(const void* ptr, int lane) {
  int v = 0;
  if (lane == 0) v = int(network_signal(ptr));
  v = __shfl_sync(0xffffffffu, v, 0);
  __syncwarp();
  return v;
}
__device__ __forceinline__ uint32_t warp_network_tagged(const void* ptr, uint32_t epoch, uint32_t fallback, int lane) {
  uint32_t v = 0;
  if (lane == 0) {
    const uint64_t word = network_signal(ptr);
    v = tag_epoch(word) == epoch ? tag_value(word) : fallback;
  }
  v = __shfl_sync(0xffffffffu, v, 0);
  __syncwarp();
  return v;
}

using ptx::named_barrier;

// Warp copy of `bytes` (multiple of 16) from read-only input to any destination.
__device__ __forceinline__ void warp_copy_from_input(void* dst, const void* src, int64_t bytes, int lane) {
  const int64_t n = bytes / kVec;
  auto* d = reinterpret_cast<int4*>(dst);
  const auto* s = reinterpret_cast<const int4*>(src);
  for (int64_t i = lane; i < n; i += 32) ptx::st_na_global(d + i, ptx::ld_nc_global(s + i));
}

// Warp copy of `bytes` (multiple of 16) out of a ring that others write.
__device__ __forceinline__ void warp_copy_from_ring(void* dst, const void* src, int64_t bytes, int lane) {
  const int64_t n = bytes / kVec;
  auto* d = reinterpret_cast<int4*>(dst);
  const auto* s = reinterpret_cast<const int4*>(src);
  for (int64_t i = lane; i < n; i += 32) ptx::st_na_global(d + i, ld_volatile_v4(s + i));
}

// Sends slots [first, first + count) of a ring of `capacity` slots (wrapping) to its reader: one
// put-with-signal per contiguous piece, whose SET of the arrival word at the piece's first slot
// lands after that put's own data (NVSHMEM orders a put before its own signal only). Every piece
// announces itself, so puts may land in any order (unordered transports, several queue pairs) and
// need no fence between them, which would cost a round trip per batch where nvshmem_fence is a
// quiet (IBGDA); the reader walks the words in ring order (warp_ring_arrived). In place (the reader
// is this rank and `staging` is its ring), a release store of the word publishes the slots. Whole
// warp; the slots' stores were fenced by every lane and the warp synced.
__device__ __forceinline__ void send_ring_range(uint8_t* staging, uint8_t* ring, uint64_t* arrival, int64_t slot_bytes,
                                                int capacity, int first, int count, uint32_t epoch, int pe,
                                                bool in_place, int lane) {
  int position = first;
  while (count > 0) {
    const int begin = position % capacity;
    const int piece = count < capacity - begin ? count : capacity - begin;
    const uint64_t word = arrival_tag(epoch, position, capacity, piece);
    if (in_place) {
      if (lane == 0) st_release_u64(arrival + begin, word);
    } else {
      nvshmemx_putmem_signal_nbi_warp(ring + int64_t(begin) * slot_bytes, staging + int64_t(begin) * slot_bytes,
                                      size_t(piece) * size_t(slot_bytes), arrival + begin, word, NVSHMEM_SIGNAL_SET,
                                      pe);
    }
    position += piece;
    count -= piece;
  }
}

// Where the delivered part of a ring ends: walks its arrival words from `frontier` (a piece start)
// while they announce pieces of this call and lap. Lane 0 reads through NVSHMEM (an acquire) and
// broadcasts; __syncwarp passes the acquire on to the warp (see warp_tagged_value).
__device__ __forceinline__ int warp_ring_arrived(const void* arrival, int frontier, int capacity, uint32_t epoch,
                                                 int lane) {
  int f = frontier;
  if (lane == 0) {
    const auto* words = static_cast<const uint64_t*>(arrival);
    for (int n; (n = arrival_slots(network_signal(words + f % capacity), epoch, f, capacity)) > 0;) f += n;
  }
  f = __shfl_sync(kFullMask, f, 0);
  __syncwarp();
  return f;
}

// An error recorded before this kernel started (a notify timeout or layout mismatch, more rows than
// num_worst_tokens in an earlier dispatch whose combine is queued without a host check, ...) means
// the counts this kernel would trust are garbage: e.g. combine would read x and recv_src_token past
// their rows. Block-uniform; peers waiting on this rank time out and report.
__device__ __forceinline__ bool earlier_error(const DeviceErrorSlot* slot) {
  return __syncthreads_or(threadIdx.x == 0 && error_reported(slot)) != 0;
}

// Progress watchdog of one warp's polling loop. stop() is the loop's verdict on an idle spin, the
// same for every lane: lane 0 decides and broadcasts (lanes read the timer and the error slot at
// different moments, and a warp split there would leave lanes waiting in its collectives). The
// error slot is host memory (a PCIe read): looked at every kErrorPollSpins idle spins only.
struct Watchdog {
  static constexpr int kTimedOut = 1, kPeerFailed = 2;
  static constexpr unsigned kErrorPollSpins = 64;
  long long last;
  unsigned idle_spins;
  __device__ __forceinline__ void progressed() {
    last = global_timer_ns();
    idle_spins = 0;
  }
  __device__ __forceinline__ int stop(long long timeout_ns, const DeviceErrorSlot* slot, int lane) {
    int verdict = 0;
    if (lane == 0) {
      if (spin_timed_out(last, timeout_ns)) verdict = kTimedOut;
      else if (++idle_spins % kErrorPollSpins == 0 && error_reported(slot)) verdict = kPeerFailed;
    }
    return __shfl_sync(kFullMask, verdict, 0);
  }
};

// ---- notify ------------------------------------------------------------------------------------

__global__ void notify_kernel(Common cm, NotifyArgs a) {
  // Every thread reads the call number before the barrier below, after which thread 0 stores it.
  cm.epoch = *static_cast<volatile uint64_t*>(cm.epoch_word) + 1;
  const Layout& lay = cm.layout;
  const int num_ranks = lay.num_ranks;
  const int parity = int(cm.epoch & 1);
  const int ints = a.row_ints;

  if (ints > 0) {
    for (int i = threadIdx.x; i < num_ranks * ints; i += blockDim.x) {
      const int dst = i / ints, j = i % ints;
      int value;
      if (j < num_ranks) value = a.num_tokens_per_rank[j];
      else if (j == num_ranks) value = a.num_tokens;
      else value = a.num_tokens_per_expert[dst * a.num_local_experts + (j - num_ranks - 1)];
      reinterpret_cast<int*>(cm.buffer + lay.notify_send(dst))[j] = value;
    }
  }
  ptx::fence_acq_rel_sys();  // the staged rows are read by the put (or the NIC)
  __syncthreads();
  if (threadIdx.x == 0) *cm.epoch_word = cm.epoch;  // advanced even if this notify fails

  // The flag carries tag(epoch, signature of the call's layout): ranks that disagree on it (another
  // channel count, ring size, hidden, top-k, scales or call kind) would put into each other's rings
  // at different offsets, so the mismatch is reported here, before any ring is touched.
  const uint32_t epoch32 = uint32_t(cm.epoch);
  const uint64_t flag_word = make_tag(epoch32, a.signature);
  uint64_t* my_flag = reinterpret_cast<uint64_t*>(cm.buffer + lay.notify_flag(parity, cm.rank));
  for (int dst = threadIdx.x; dst < num_ranks; dst += blockDim.x) {
    if (ints > 0) {
      nvshmem_putmem_signal_nbi(cm.buffer + lay.notify_recv(parity, cm.rank), cm.buffer + lay.notify_send(dst),
                                size_t(ints) * 4, my_flag, flag_word, NVSHMEM_SIGNAL_SET, dst);
    } else {
      nvshmemx_signal_op(my_flag, flag_word, NVSHMEM_SIGNAL_SET, dst);
    }
  }

  // A flag of this parity holds this epoch or the one two calls back (a peer cannot be two calls
  // ahead: it would need my flag of the call in between), so wait for the exact epoch.
  bool failed = false;
  for (int src = threadIdx.x; src < num_ranks && !failed; src += blockDim.x) {
    const void* flag = cm.buffer + lay.notify_flag(parity, src);
    const long long start = global_timer_ns();
    unsigned spins = 0;
    uint64_t word = network_signal(flag);
    while (tag_epoch(word) != epoch32) {
      if (spin_timed_out(start, cm.timeout_ns)) {
        report_timeout(cm.error_slot, cm.rank, kPhaseInternodeNotify, src, (long long)word);
        failed = true;
        break;
      }
      if (++spins % Watchdog::kErrorPollSpins == 0 && error_reported(cm.error_slot)) {  // host memory: PCIe
        failed = true;
        break;
      }
      word = network_signal(flag);
    }
    if (!failed && tag_value(word) != a.signature) {
      report_error(cm.error_slot, kErrorInvalidInput, cm.rank, kPhaseInternodeNotify, src, tag_value(word));
      failed = true;
    }
  }
  // On failure the rows are not all there: leave the outputs alone (the host raises the error; the
  // dispatch/combine kernel queued next sees it and does nothing).
  if (__syncthreads_or(failed)) {
    if (threadIdx.x == 0) nvshmem_quiet();  // PE-wide: one thread, after the barrier, covers the block's puts
    return;
  }
  // Every peer is past its previous call (its kernels ended with a quiet), so every credit ADD of
  // that call has landed: zero its rdma_head array for the next call. Peers add to it only in the
  // next call, after this rank's next notify, which this kernel precedes.
  const int64_t next_heads = lay.rdma_head(parity ^ 1, 0, 0);
  for (int i = threadIdx.x; i < lay.num_nodes * kMaxChannels; i += blockDim.x)
    st_relaxed_u64(cm.buffer + next_heads + int64_t(i) * 8, 0);

  if (ints > 0 && a.rank_matrix != nullptr) {
    for (int i = threadIdx.x; i < num_ranks * (num_ranks + 1); i += blockDim.x) {
      const int src = i / (num_ranks + 1), j = i % (num_ranks + 1);
      a.rank_matrix[i] = ld_volatile_i32(cm.buffer + lay.notify_recv(parity, src) + int64_t(j) * 4);
    }
    for (int j = threadIdx.x; j < 1 + a.num_local_experts; j += blockDim.x) {
      const int column = j == 0 ? cm.rank : num_ranks + j;  // rows for me, then my experts' counts
      int sum = 0;
      for (int src = 0; src < num_ranks; ++src)
        sum += ld_volatile_i32(cm.buffer + lay.notify_recv(parity, src) + int64_t(column) * 4);
      a.recv_info[j] = sum;
    }
  }
  // nvshmem_quiet completes every put of the PE, so one thread after a block barrier suffices (with
  // IBGDA, each calling thread would drain the queue pairs again).
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
}

// ---- dispatch ----------------------------------------------------------------------------------

// Shared state of one dispatch block (dynamic shared memory, laid out by dispatch_smem()).
struct DispatchShared {
  uint8_t** peer_base;   // [L] nvshmem_ptr of each same-node rank's buffer
  int* column_prefix;    // [R] rows before mine at each destination
  int* send_next;        // [N] next token to scan, per destination node (te + 1 when done)
  int* send_count;       // [N] slots sent
  int* fwd_arrived;      // [N] RDMA slots delivered, per source node (a piece boundary)
  int* fwd_consumed;     // [N] RDMA slots consumed, per source node
  int* fwd_total;        // [N] tokens the source node will send (-1 unknown)
  int* fwd_done;         // [N]
  int* fwd_nvl_sent;     // [N][L]
  int* fwd_nvl_head;     // [N][L]
  int* recv_consumed;    // [R]
  int* recv_done;        // [R]
};

__host__ __device__ inline int64_t dispatch_smem_bytes(int num_ranks, int ranks_per_node) {
  const int nodes = num_ranks / ranks_per_node;
  return int64_t(ranks_per_node) * 8 + (int64_t(num_ranks) * 3 + int64_t(nodes) * 6 + int64_t(nodes) * ranks_per_node * 2) * 4;
}

__device__ DispatchShared dispatch_smem(uint8_t* raw, int num_ranks, int ranks_per_node) {
  const int nodes = num_ranks / ranks_per_node;
  DispatchShared s;
  s.peer_base = reinterpret_cast<uint8_t**>(raw);
  int* p = reinterpret_cast<int*>(raw + int64_t(ranks_per_node) * 8);
  s.column_prefix = p; p += num_ranks;
  s.send_next = p; p += nodes;
  s.send_count = p; p += nodes;
  s.fwd_arrived = p; p += nodes;
  s.fwd_consumed = p; p += nodes;
  s.fwd_total = p; p += nodes;
  s.fwd_done = p; p += nodes;
  s.fwd_nvl_sent = p; p += nodes * ranks_per_node;
  s.fwd_nvl_head = p; p += nodes * ranks_per_node;
  s.recv_consumed = p; p += num_ranks;
  s.recv_done = p; p += num_ranks;
  return s;
}

__device__ void dispatch_sender(const Common& cm, const DispatchArgs& a, DispatchShared& sh, int warp, int lane,
                                const DispatchSlot& slot, int64_t slot_bytes, int capacity) {
  const Layout& lay = cm.layout;
  const int R = lay.num_ranks, L = lay.ranks_per_node, N = lay.num_nodes, c = blockIdx.x;
  const int my_node = cm.rank / L, my_local = cm.rank % L;
  const uint32_t epoch = uint32_t(cm.epoch);
  const int parity = int(cm.epoch & 1);  // this call's rdma_head array
  int tb, te;
  channel_token_range(a.num_tokens, lay.num_channels, c, tb, te);
  for (int n = warp; n < N; n += kDispatchSendWarps) {
    if (lane == 0) sh.send_next[n] = tb, sh.send_count[n] = 0;
  }
  __syncwarp();

  Watchdog watchdog;
  watchdog.progressed();
  while (true) {
    bool all_done = true, progressed = false;
    for (int n = warp; n < N; n += kDispatchSendWarps) {
      int t = sh.send_next[n];
      if (t > te) continue;
      all_done = false;
      const int forwarder = n * L + my_local;
      int sent = sh.send_count[n];
      const int head = warp_network_counter(cm.buffer + lay.rdma_head(parity, n, c), lane);
      const int batch_begin = sent;
      // Tokens for my own node go to my own forwarder (myself): write its ring directly.
      const bool in_place = forwarder == cm.rank;
      uint8_t* staging = cm.buffer + (in_place ? lay.rdma_recv(my_node, c) : lay.rdma_send(n, c));
      while (t < te && sent - batch_begin < a.rdma_chunk && sent - head < capacity) {
        int dst_row = -1;
        if (lane < L) {
          const int d = n * L + lane;
          if (a.is_token_in_rank[int64_t(t) * R + d])
            dst_row = sh.column_prefix[d] + a.token_rank_cumsum[int64_t(t) * R + d] - 1;
        }
        if (__ballot_sync(kFullMask, dst_row >= 0) != 0) {
          uint8_t* s = staging + int64_t(sent % capacity) * slot_bytes;
          if (lane == 0) reinterpret_cast<int*>(s)[0] = t;
          if (lane < L) reinterpret_cast<int*>(s)[1 + lane] = dst_row;
          warp_copy_from_input(s + slot.hidden_offset(), static_cast<const uint8_t*>(a.x) + int64_t(t) * a.hidden_bytes,
                               a.hidden_bytes, lane);
          float* scales = reinterpret_cast<float*>(s + slot.scales_offset());
          for (int i = lane; i < a.num_scales; i += 32)
            scales[i] = a.x_scales[int64_t(t) * a.scale_token_stride + int64_t(i) * a.scale_hidden_stride];
          if (lane < a.num_topk) {
            reinterpret_cast<int*>(s + slot.topk_idx_offset())[lane] = int(a.topk_idx[int64_t(t) * a.num_topk + lane]);
            reinterpret_cast<float*>(s + slot.topk_weights_offset())[lane] =
                a.topk_weights != nullptr ? a.topk_weights[int64_t(t) * a.num_topk + lane] : 0.0f;
          }
          ++sent;
        }
        ++t;
      }
      if (sent > batch_begin) {
        ptx::fence_acq_rel_sys();  // staged bytes visible to whoever executes the put
        __syncwarp();
        send_ring_range(staging, cm.buffer + lay.rdma_recv(my_node, c),
                        reinterpret_cast<uint64_t*>(cm.buffer + lay.rdma_arrival(my_node, c)), slot_bytes, capacity,
                        batch_begin, sent - batch_begin, epoch, forwarder, in_place, lane);
      }
      if (t != sh.send_next[n]) progressed = true;
      if (t == te) {
        // Everything of this channel for node n is on its way: tell the forwarder how much.
        if (lane == 0)
          nvshmemx_signal_op(reinterpret_cast<uint64_t*>(cm.buffer + lay.rdma_done(my_node, c)),
                             make_tag(epoch, uint32_t(sent)), NVSHMEM_SIGNAL_SET, forwarder);
        t = te + 1;
        progressed = true;
      }
      __syncwarp();
      if (lane == 0) sh.send_next[n] = t, sh.send_count[n] = sent;
      __syncwarp();
    }
    if (all_done) break;
    if (progressed) {
      watchdog.progressed();
    } else if (const int stop = watchdog.stop(cm.timeout_ns, cm.error_slot, lane); stop != 0) {
      if (stop == Watchdog::kTimedOut) {
        int waiting = -1;
        for (int n = warp; n < N; n += kDispatchSendWarps)
          if (sh.send_next[n] <= te) { waiting = n * L + my_local; break; }
        if (lane == 0) report_timeout(cm.error_slot, cm.rank, kPhaseDispatchSend, waiting, c);
      }
      break;
    }
  }
}

__device__ void dispatch_forwarder(const Common& cm, const DispatchArgs& a, DispatchShared& sh, int warp, int lane,
                                   int64_t slot_bytes, int rdma_capacity, int nvl_capacity) {
  const Layout& lay = cm.layout;
  const int L = lay.ranks_per_node, N = lay.num_nodes, c = blockIdx.x;
  const int my_node = cm.rank / L, my_local = cm.rank % L;
  const uint32_t epoch = uint32_t(cm.epoch);
  const int parity = int(cm.epoch & 1);  // this call's rdma_head array
  for (int m = warp; m < N; m += kDispatchForwardWarps) {
    if (lane == 0) sh.fwd_arrived[m] = 0, sh.fwd_consumed[m] = 0, sh.fwd_total[m] = -1, sh.fwd_done[m] = 0;
    if (lane < L) sh.fwd_nvl_sent[m * L + lane] = 0, sh.fwd_nvl_head[m * L + lane] = 0;
  }
  __syncwarp();

  Watchdog watchdog;
  watchdog.progressed();
  while (true) {
    bool all_done = true, progressed = false;
    for (int m = warp; m < N; m += kDispatchForwardWarps) {
      if (sh.fwd_done[m]) continue;
      all_done = false;
      const int source = m * L + my_local;
      int total = sh.fwd_total[m];
      if (total < 0) total = int(warp_network_tagged(cm.buffer + lay.rdma_done(m, c), epoch, uint32_t(-1), lane));
      const int tail = warp_ring_arrived(cm.buffer + lay.rdma_arrival(m, c), sh.fwd_arrived[m], rdma_capacity, epoch,
                                         lane);
      int consumed = sh.fwd_consumed[m];
      // Lane l < L tracks the NVL ring (source, c) at local rank l.
      int nvl_sent = 0, nvl_head = 0;
      if (lane < L) {
        nvl_sent = sh.fwd_nvl_sent[m * L + lane];
        nvl_head = max(sh.fwd_nvl_head[m * L + lane],
                       int(tagged_value(cm.buffer + lay.nvl_head(lane * N + m, c), epoch, 0)));
      }
      __syncwarp();  // lane l acquired ring l's head, but every lane writes ring l's slots below
      const uint8_t* ring = cm.buffer + lay.rdma_recv(m, c);
      const int batch_begin = consumed;
      while (consumed < tail && consumed - batch_begin < a.nvl_chunk) {
        const uint8_t* src = ring + int64_t(consumed % rdma_capacity) * slot_bytes;
        const int row = lane < L ? ld_volatile_i32(src + 4 + 4 * lane) : -1;
        const bool room = row < 0 || nvl_sent - nvl_head < nvl_capacity;
        if (!__all_sync(kFullMask, room)) break;
        const unsigned targets = __ballot_sync(kFullMask, row >= 0);
        for (unsigned bits = targets; bits != 0; bits &= bits - 1) {
          const int l = __ffs(bits) - 1;
          const int slot_index = __shfl_sync(kFullMask, nvl_sent, l) % nvl_capacity;
          uint8_t* dst = sh.peer_base[l] + lay.nvl_ring(source, c) + int64_t(slot_index) * slot_bytes;
          warp_copy_from_ring(dst, src, slot_bytes, lane);
        }
        if (row >= 0) ++nvl_sent;
        ++consumed;
      }
      const bool finished = total >= 0 && consumed == total;
      if (consumed > batch_begin || finished) {
        ptx::fence_acq_rel_sys();  // release this warp's NVLink stores before the tails
        __syncwarp();
        if (lane < L)
          st_release_u64(sh.peer_base[lane] + lay.nvl_tail(source, c),
                         make_tag(epoch, uint32_t(nvl_sent) | (finished ? kDoneBit : 0u)));
        if (consumed > batch_begin && lane == 0)
          nvshmemx_signal_op(reinterpret_cast<uint64_t*>(cm.buffer + lay.rdma_head(parity, my_node, c)),
                             uint64_t(consumed - batch_begin), NVSHMEM_SIGNAL_ADD, source);
        progressed = true;
      }
      __syncwarp();
      if (lane == 0) sh.fwd_arrived[m] = tail, sh.fwd_consumed[m] = consumed, sh.fwd_total[m] = total,
                     sh.fwd_done[m] = finished;
      if (lane < L) sh.fwd_nvl_sent[m * L + lane] = nvl_sent, sh.fwd_nvl_head[m * L + lane] = nvl_head;
      __syncwarp();
    }
    if (all_done) break;
    if (progressed) {
      watchdog.progressed();
    } else if (const int stop = watchdog.stop(cm.timeout_ns, cm.error_slot, lane); stop != 0) {
      if (stop == Watchdog::kTimedOut) {
        int waiting = -1;
        for (int m = warp; m < N; m += kDispatchForwardWarps)
          if (!sh.fwd_done[m]) { waiting = m * L + my_local; break; }
        if (lane == 0) report_timeout(cm.error_slot, cm.rank, kPhaseInternodeDispatchForward, waiting, c);
      }
      break;
    }
  }
}

__device__ void dispatch_receiver(const Common& cm, const DispatchArgs& a, DispatchShared& sh, int warp, int lane,
                                  const DispatchSlot& slot, int64_t slot_bytes, int nvl_capacity) {
  const Layout& lay = cm.layout;
  const int R = lay.num_ranks, L = lay.ranks_per_node, N = lay.num_nodes, c = blockIdx.x;
  const int my_local = cm.rank % L;
  const uint32_t epoch = uint32_t(cm.epoch);
  const int expert_begin = cm.rank * a.num_local_experts;
  for (int s = warp; s < R; s += kDispatchRecvWarps)
    if (lane == 0) sh.recv_consumed[s] = 0, sh.recv_done[s] = 0;
  __syncwarp();

  Watchdog watchdog;
  watchdog.progressed();
  while (true) {
    bool all_done = true, progressed = false;
    for (int s = warp; s < R; s += kDispatchRecvWarps) {
      if (sh.recv_done[s]) continue;
      all_done = false;
      const uint32_t word = warp_tagged_value(cm.buffer + lay.nvl_tail(s, c), epoch, 0, lane);
      const int count = int(word & ~kDoneBit);
      const bool done = (word & kDoneBit) != 0;
      int consumed = sh.recv_consumed[s];
      const int batch_begin = consumed;
      const uint8_t* ring = cm.buffer + lay.nvl_ring(s, c);
      while (consumed < count) {
        const uint8_t* src = ring + int64_t(consumed % nvl_capacity) * slot_bytes;
        const int token = ld_volatile_i32(src);
        const int row = ld_volatile_i32(src + 4 + 4 * my_local);
        if (row < 0 || row >= a.num_recv_rows) {
          if (lane == 0) report_error(cm.error_slot, kErrorInvalidInput, cm.rank, kPhaseDispatchRecv, s, row);
        } else {
          warp_copy_from_ring(static_cast<uint8_t*>(a.recv_x) + int64_t(row) * a.hidden_bytes,
                              src + slot.hidden_offset(), a.hidden_bytes, lane);
          for (int i = lane; i < a.num_scales; i += 32)
            a.recv_x_scales[int64_t(row) * a.num_scales + i] = ld_volatile_f32(src + slot.scales_offset() + 4 * i);
          if (lane < a.num_topk && a.recv_topk_idx != nullptr) {
            const int expert = ld_volatile_i32(src + slot.topk_idx_offset() + 4 * lane);
            const int local = expert - expert_begin;
            const bool mine = expert >= 0 && local >= 0 && local < a.num_local_experts;
            a.recv_topk_idx[int64_t(row) * a.num_topk + lane] = mine ? local : -1;
            if (a.recv_topk_weights != nullptr)
              a.recv_topk_weights[int64_t(row) * a.num_topk + lane] =
                  mine ? ld_volatile_f32(src + slot.topk_weights_offset() + 4 * lane) : 0.0f;
          }
          if (lane == 0) a.recv_src_token[row] = token;
        }
        ++consumed;
      }
      if (consumed > batch_begin) {
        __syncwarp();
        // Slots read: hand them back to the forwarder (rank with the source's local index here).
        if (lane == 0)
          st_release_u64(sh.peer_base[s % L] + lay.nvl_head(my_local * N + s / L, c),
                         make_tag(epoch, uint32_t(consumed)));
        progressed = true;
      }
      const bool finished = done && consumed == count;
      __syncwarp();
      if (lane == 0) sh.recv_consumed[s] = consumed, sh.recv_done[s] = finished;
      __syncwarp();
    }
    if (all_done) break;
    if (progressed) {
      watchdog.progressed();
    } else if (const int stop = watchdog.stop(cm.timeout_ns, cm.error_slot, lane); stop != 0) {
      if (stop == Watchdog::kTimedOut) {
        int waiting = -1;
        for (int s = warp; s < R; s += kDispatchRecvWarps)
          if (!sh.recv_done[s]) { waiting = s; break; }
        if (lane == 0) report_timeout(cm.error_slot, cm.rank, kPhaseDispatchRecv, waiting, c);
      }
      break;
    }
  }
}

__global__ void __launch_bounds__((kDispatchSendWarps + kDispatchForwardWarps + kDispatchRecvWarps) * 32, 1)
dispatch_kernel(Common cm, DispatchArgs a) {
  cm.epoch = *static_cast<volatile uint64_t*>(cm.epoch_word);  // notify, queued before, advanced it
  EP_DYNAMIC_SHARED(uint8_t, smem_raw);
  if (earlier_error(cm.error_slot)) return;
  const Layout& lay = cm.layout;
  const int R = lay.num_ranks, L = lay.ranks_per_node;
  DispatchShared sh = dispatch_smem(smem_raw, R, L);
  const int my_node = cm.rank / L;
  for (int l = threadIdx.x; l < L; l += blockDim.x)
    sh.peer_base[l] = static_cast<uint8_t*>(nvshmem_ptr(cm.buffer, my_node * L + l));
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    int prefix = 0;
    for (int s = 0; s < cm.rank; ++s) prefix += a.rank_matrix[s * (R + 1) + d];
    sh.column_prefix[d] = prefix;
  }
  __syncthreads();
  bool peers_ok = true;
  for (int l = 0; l < L; ++l) peers_ok = peers_ok && sh.peer_base[l] != nullptr;

  const DispatchSlot slot(a.hidden_bytes, a.num_scales, a.num_topk, L);
  const int64_t slot_bytes = slot.bytes();
  const int rdma_capacity = lay.rdma_capacity(slot_bytes);
  const int nvl_capacity = lay.nvl_capacity(slot_bytes);
  const int warp = threadIdx.x / 32, lane = ptx::lane_id();
  if (!peers_ok) {
    if (threadIdx.x == 0) report_error(cm.error_slot, kErrorInvalidInput, cm.rank, kPhaseDispatchSend, -1, 1);
  } else if (warp < kDispatchSendWarps) {
    dispatch_sender(cm, a, sh, warp, lane, slot, slot_bytes, rdma_capacity);
  } else if (warp < kDispatchSendWarps + kDispatchForwardWarps) {
    dispatch_forwarder(cm, a, sh, warp - kDispatchSendWarps, lane, slot_bytes, rdma_capacity, nvl_capacity);
  } else {
    dispatch_receiver(cm, a, sh, warp - kDispatchSendWarps - kDispatchForwardWarps, lane, slot, slot_bytes,
                      nvl_capacity);
  }
  __syncthreads();  // every role's puts issued: one PE-wide quiet covers them
  if (threadIdx.x == 0) nvshmem_quiet();
}

// ---- combine -----------------------------------------------------------------------------------

struct CombineShared {
  uint8_t** peer_base;        // [L]
  const uint8_t** slot_ptr;   // [kCombineForwardWarps][kMaxLocalRanks] ring slots being reduced
  int* send_next;             // [R] next row to send, per source rank
  int* send_end;              // [R]
  int* send_count;            // [R]
  int* send_head;             // [R]
  int* send_done;             // [R]
  int* fwd_sent;              // [N] RDMA slots sent per source node
  int* fwd_done;              // [N]
  int* fwd_consumed;          // [N][L]
  int* recv_arrived;          // [N] RDMA slots delivered per node (a piece boundary)
  int* recv_base;             // [N] RDMA slots consumed per node (at round starts)
  int* recv_hit;              // [kCombineRecvWarps][N] 1 if the warp's token went to node n
  int* recv_pos;              // [kCombineRecvWarps][N] its slot position in ring n, or -1
  int* recv_abort;            // [1]
};

__host__ __device__ inline int64_t combine_smem_bytes(int num_ranks, int ranks_per_node) {
  const int nodes = num_ranks / ranks_per_node;
  return int64_t(ranks_per_node) * 8 + int64_t(kCombineForwardWarps) * kMaxLocalRanks * 8 +
         (int64_t(num_ranks) * 5 + int64_t(nodes) * 4 + int64_t(nodes) * ranks_per_node +
          2 * int64_t(kCombineRecvWarps) * nodes + 1) * 4;
}

__device__ CombineShared combine_smem(uint8_t* raw, int num_ranks, int ranks_per_node) {
  const int nodes = num_ranks / ranks_per_node;
  CombineShared s;
  s.peer_base = reinterpret_cast<uint8_t**>(raw);
  s.slot_ptr = reinterpret_cast<const uint8_t**>(raw + int64_t(ranks_per_node) * 8);
  int* p = reinterpret_cast<int*>(raw + int64_t(ranks_per_node) * 8 + int64_t(kCombineForwardWarps) * kMaxLocalRanks * 8);
  s.send_next = p; p += num_ranks;
  s.send_end = p; p += num_ranks;
  s.send_count = p; p += num_ranks;
  s.send_head = p; p += num_ranks;
  s.send_done = p; p += num_ranks;
  s.fwd_sent = p; p += nodes;
  s.fwd_done = p; p += nodes;
  s.fwd_consumed = p; p += nodes * ranks_per_node;
  s.recv_arrived = p; p += nodes;
  s.recv_base = p; p += nodes;
  s.recv_hit = p; p += kCombineRecvWarps * nodes;
  s.recv_pos = p; p += kCombineRecvWarps * nodes;
  s.recv_abort = p; p += 1;
  return s;
}

// First index in [begin, end) whose token is >= value (tokens ascending).
__device__ __forceinline__ int lower_bound_token(const int* tokens, int begin, int end, int value) {
  while (begin < end) {
    const int mid = (begin + end) / 2;
    if (tokens[mid] < value) begin = mid + 1;
    else end = mid;
  }
  return begin;
}

__device__ void combine_sender(const Common& cm, const CombineArgs& a, CombineShared& sh, int warp, int lane,
                               const CombineSlot& slot, int64_t slot_bytes, int nvl_capacity) {
  const Layout& lay = cm.layout;
  const int R = lay.num_ranks, L = lay.ranks_per_node, N = lay.num_nodes, C = lay.num_channels, c = blockIdx.x;
  const int my_local = cm.rank % L;
  const uint32_t epoch = uint32_t(cm.epoch);
  const int64_t row_bytes = int64_t(a.hidden) * 2;
  for (int s = warp; s < R; s += kCombineSendWarps) {
    int prefix = 0;
    for (int s2 = 0; s2 < s; ++s2) prefix += a.rank_matrix[s2 * (R + 1) + cm.rank];
    const int count = a.rank_matrix[s * (R + 1) + cm.rank];
    int tb, te;
    channel_token_range(a.rank_matrix[s * (R + 1) + R], C, c, tb, te);
    // Rows of s are [prefix, prefix + count) of x and recv_src_token: never index past num_recv_rows,
    // whatever the saved matrix says (an overflowing num_worst_tokens dispatch already reported).
    const bool bad = count < 0 || prefix < 0 || prefix + count > a.num_recv_rows;
    if (bad && lane == 0)
      report_error(cm.error_slot, kErrorInvalidInput, cm.rank, kPhaseCombineSend, s, (long long)prefix + count);
    const int first = bad ? 0 : lower_bound_token(a.recv_src_token, prefix, prefix + count, tb);
    const int last = bad ? 0 : lower_bound_token(a.recv_src_token, first, prefix + count, te);
    if (lane == 0) sh.send_next[s] = first, sh.send_end[s] = last, sh.send_count[s] = 0, sh.send_head[s] = 0,
                   sh.send_done[s] = 0;
  }
  __syncwarp();

  Watchdog watchdog;
  watchdog.progressed();
  while (true) {
    bool all_done = true, progressed = false;
    for (int s = warp; s < R; s += kCombineSendWarps) {
      if (sh.send_done[s]) continue;
      all_done = false;
      const int key = my_local * N + s / L;
      uint8_t* peer = sh.peer_base[s % L];
      int next = sh.send_next[s];
      const int end = sh.send_end[s];
      int sent = sh.send_count[s];
      const int head = max(sh.send_head[s], int(warp_tagged_value(cm.buffer + lay.nvl_head(s, c), epoch, 0, lane)));
      const int batch_begin = sent;
      while (next < end && sent - batch_begin < a.nvl_chunk && sent - head < nvl_capacity) {
        uint8_t* dst = peer + lay.nvl_ring(key, c) + int64_t(sent % nvl_capacity) * slot_bytes;
        if (lane == 0) reinterpret_cast<int*>(dst)[0] = a.recv_src_token[next];
        warp_copy_from_input(dst + slot.payload_offset(), static_cast<const uint8_t*>(a.x) + int64_t(next) * row_bytes,
                             row_bytes, lane);
        if (lane < a.num_topk)
          reinterpret_cast<float*>(dst + slot.weights_offset())[lane] =
              a.topk_weights != nullptr ? a.topk_weights[int64_t(next) * a.num_topk + lane] : 0.0f;
        ++next;
        ++sent;
      }
      const bool finished = next == end;
      if (sent > batch_begin || finished) {
        ptx::fence_acq_rel_sys();
        __syncwarp();
        if (lane == 0)
          st_release_u64(peer + lay.nvl_tail(key, c), make_tag(epoch, uint32_t(sent) | (finished ? kDoneBit : 0u)));
        progressed = true;
      }
      __syncwarp();
      if (lane == 0) sh.send_next[s] = next, sh.send_count[s] = sent, sh.send_head[s] = head, sh.send_done[s] = finished;
      __syncwarp();
    }
    if (all_done) break;
    if (progressed) {
      watchdog.progressed();
    } else if (const int stop = watchdog.stop(cm.timeout_ns, cm.error_slot, lane); stop != 0) {
      if (stop == Watchdog::kTimedOut) {
        int waiting = -1;
        for (int s = warp; s < R; s += kCombineSendWarps)
          if (!sh.send_done[s]) { waiting = (cm.rank / L) * L + s % L; break; }
        if (lane == 0) report_timeout(cm.error_slot, cm.rank, kPhaseCombineSend, waiting, c);
      }
      break;
    }
  }
}

__device__ void combine_forwarder(const Common& cm, const CombineArgs& a, CombineShared& sh, int warp, int lane,
                                  const CombineSlot& nvl_slot, int64_t nvl_slot_bytes, int nvl_capacity,
                                  const CombineSlot& rdma_slot, int64_t rdma_slot_bytes, int rdma_capacity) {
  const Layout& lay = cm.layout;
  const int L = lay.ranks_per_node, N = lay.num_nodes, c = blockIdx.x;
  const int my_node = cm.rank / L, my_local = cm.rank % L;
  const uint32_t epoch = uint32_t(cm.epoch);
  const int parity = int(cm.epoch & 1);  // this call's rdma_head array
  const uint8_t** slot_ptr = sh.slot_ptr + warp * kMaxLocalRanks;
  for (int m = warp; m < N; m += kCombineForwardWarps) {
    if (lane == 0) sh.fwd_sent[m] = 0, sh.fwd_done[m] = 0;
    if (lane < L) sh.fwd_consumed[m * L + lane] = 0;
  }
  __syncwarp();

  Watchdog watchdog;
  watchdog.progressed();
  while (true) {
    bool all_done = true, progressed = false;
    for (int m = warp; m < N; m += kCombineForwardWarps) {
      if (sh.fwd_done[m]) continue;
      all_done = false;
      const int source = m * L + my_local;
      int sent = sh.fwd_sent[m];
      const int head = warp_network_counter(cm.buffer + lay.rdma_head(parity, m, c), lane);
      // Lane l < L reads the ring written by local rank l for this source.
      const uint8_t* ring = lane < L ? cm.buffer + lay.nvl_ring(lane * N + m, c) : nullptr;
      int consumed = lane < L ? sh.fwd_consumed[m * L + lane] : 0;
      const int consumed_before = consumed;
      // My own node's partials go to the source in my own node, myself: write my ring directly.
      const bool in_place = source == cm.rank;
      uint8_t* staging = cm.buffer + (in_place ? lay.rdma_recv(my_node, c) : lay.rdma_send(m, c));
      const int batch_begin = sent;
      bool finished = false;
      while (sent - batch_begin < a.rdma_chunk && sent - head < rdma_capacity) {
        int token = INT_MAX;
        bool ready = true;
        if (lane < L) {
          const uint32_t word = tagged_value(cm.buffer + lay.nvl_tail(lane * N + m, c), epoch, 0);
          if (consumed < int(word & ~kDoneBit)) {
            token = ld_volatile_i32(ring + int64_t(consumed % nvl_capacity) * nvl_slot_bytes);
          } else if ((word & kDoneBit) == 0) {
            ready = false;
          }
        }
        if (!__all_sync(kFullMask, ready)) break;
        const int smallest = __reduce_min_sync(kFullMask, token);
        if (smallest == INT_MAX) {
          finished = true;
          break;
        }
        const unsigned take = __ballot_sync(kFullMask, lane < L && token == smallest);
        if (lane < L) slot_ptr[lane] = ring + int64_t(consumed % nvl_capacity) * nvl_slot_bytes;
        __syncwarp();
        uint8_t* dst = staging + int64_t(sent % rdma_capacity) * rdma_slot_bytes;
        if (lane == 0) reinterpret_cast<int*>(dst)[0] = smallest;
        // Sum in local-rank order, float32: 8 bf16 in, 8 partial elements out per step.
        for (int i = lane; i < a.hidden / 8; i += 32) {
          float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (unsigned bits = take; bits != 0; bits &= bits - 1) {
            const int l = __ffs(bits) - 1;
            const int4 v = ld_volatile_v4(slot_ptr[l] + nvl_slot.payload_offset() + int64_t(i) * 16);
            const auto* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += __bfloat162float(h[j]);
          }
          if (a.float_partials) {
            auto* out = reinterpret_cast<int4*>(dst + rdma_slot.payload_offset() + int64_t(i) * 32);
            ptx::st_na_global(out, make_int4(__float_as_int(acc[0]), __float_as_int(acc[1]), __float_as_int(acc[2]),
                                             __float_as_int(acc[3])));
            ptx::st_na_global(out + 1, make_int4(__float_as_int(acc[4]), __float_as_int(acc[5]),
                                                 __float_as_int(acc[6]), __float_as_int(acc[7])));
          } else {
            int4 packed;
            auto* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = __float2bfloat16_rn(acc[j]);
            ptx::st_na_global(reinterpret_cast<int4*>(dst + rdma_slot.payload_offset() + int64_t(i) * 16), packed);
          }
        }
        if (lane < a.num_topk) {
          float w = 0.0f;
          for (unsigned bits = take; bits != 0; bits &= bits - 1) {
            const int l = __ffs(bits) - 1;
            w += ld_volatile_f32(slot_ptr[l] + nvl_slot.weights_offset() + 4 * lane);
          }
          reinterpret_cast<float*>(dst + rdma_slot.weights_offset())[lane] = w;
        }
        __syncwarp();
        if ((take >> lane) & 1u) ++consumed;
        ++sent;
      }
      if (sent > batch_begin) {
        ptx::fence_acq_rel_sys();
        __syncwarp();
        send_ring_range(staging, cm.buffer + lay.rdma_recv(my_node, c),
                        reinterpret_cast<uint64_t*>(cm.buffer + lay.rdma_arrival(my_node, c)), rdma_slot_bytes,
                        rdma_capacity, batch_begin, sent - batch_begin, epoch, source, in_place, lane);
        progressed = true;
      }
      // Hand consumed NVL slots back to their writers.
      if (__any_sync(kFullMask, consumed != consumed_before)) {
        if (lane < L && consumed != consumed_before)
          st_release_u64(sh.peer_base[lane] + lay.nvl_head(source, c), make_tag(epoch, uint32_t(consumed)));
        progressed = true;
      }
      if (finished) progressed = true;
      __syncwarp();
      if (lane == 0) sh.fwd_sent[m] = sent, sh.fwd_done[m] = finished;
      if (lane < L) sh.fwd_consumed[m * L + lane] = consumed;
      __syncwarp();
    }
    if (all_done) break;
    if (progressed) {
      watchdog.progressed();
    } else if (const int stop = watchdog.stop(cm.timeout_ns, cm.error_slot, lane); stop != 0) {
      if (stop == Watchdog::kTimedOut) {
        int waiting = -1;
        for (int m = warp; m < N; m += kCombineForwardWarps)
          if (!sh.fwd_done[m]) { waiting = m * L + my_local; break; }
        if (lane == 0) report_timeout(cm.error_slot, cm.rank, kPhaseInternodeCombineForward, waiting, c);
      }
      break;
    }
  }
}

__device__ void combine_receiver(const Common& cm, const CombineArgs& a, CombineShared& sh, int warp, int lane,
                                 int num_warps, const CombineSlot& slot, int64_t slot_bytes, int capacity) {
  const Layout& lay = cm.layout;
  const int R = lay.num_ranks, L = lay.ranks_per_node, N = lay.num_nodes, c = blockIdx.x;
  const int my_node = cm.rank / L, my_local = cm.rank % L;
  const uint32_t epoch = uint32_t(cm.epoch);
  const int parity = int(cm.epoch & 1);  // this call's rdma_head array
  const int num_threads = num_warps * 32;
  int tb, te;
  channel_token_range(a.num_tokens, lay.num_channels, c, tb, te);
  if (warp == 0) {
    for (int n = lane; n < N; n += 32) sh.recv_base[n] = 0, sh.recv_arrived[n] = 0;
    if (lane == 0) sh.recv_abort[0] = 0;
  }
  named_barrier(1, num_threads);

  volatile int* abort = sh.recv_abort;  // polled inside spin loops: never cached in a register
  int* hit = sh.recv_hit + warp * N;
  int* pos = sh.recv_pos + warp * N;
  for (int round_begin = tb; round_begin < te; round_begin += num_warps) {
    const int t = round_begin + warp;
    const bool active = t < te;
    for (int n = lane; n < N; n += 32) {
      int any = 0;
      if (active)
        for (int l = 0; l < L && !any; ++l) any = a.is_token_in_rank[int64_t(t) * R + n * L + l] ? 1 : 0;
      hit[n] = any;
    }
    named_barrier(1, num_threads);
    if (warp == 0) {
      // Wait until every node's ring holds this round's slots. One lane per node walks the arrival
      // words (an acquire each); the barrier below hands what they acquired to every warp.
      for (int n = lane; n < N; n += 32) {
        int need = sh.recv_base[n];
        for (int w = 0; w < num_warps; ++w) need += sh.recv_hit[w * N + n];
        const auto* words = reinterpret_cast<const uint64_t*>(cm.buffer + lay.rdma_arrival(n, c));
        int arrived = sh.recv_arrived[n];
        const long long start = global_timer_ns();
        unsigned spins = 0;
        while (!*abort && arrived < need) {
          const int slots = arrival_slots(network_signal(words + arrived % capacity), epoch, arrived, capacity);
          if (slots > 0) {
            arrived += slots;
            continue;
          }
          if (spin_timed_out(start, cm.timeout_ns)) {
            report_timeout(cm.error_slot, cm.rank, kPhaseCombineRecv, n * L + my_local, round_begin);
            *abort = 1;
          }
          // A failure elsewhere (this kernel's sender/forwarder, another block) means the slots may
          // never come: stop now rather than after the full timeout. The slot is host memory (a PCIe
          // read), so look every 256 polls only. Setting abort keeps every receiver warp going
          // through the round's named barriers (nobody leaves early).
          if ((++spins & 255u) == 0 && error_reported(cm.error_slot)) *abort = 1;
        }
        sh.recv_arrived[n] = arrived;
      }
    }
    named_barrier(1, num_threads);
    if (active) {
      // Slot of my token in each node's ring: consumed so far + earlier tokens of this round there.
      for (int n = lane; n < N; n += 32) {
        int p = -1;
        if (hit[n]) {
          p = sh.recv_base[n];
          for (int w = 0; w < warp; ++w) p += sh.recv_hit[w * N + n];
          const int seen = ld_volatile_i32(cm.buffer + lay.rdma_recv(n, c) + int64_t(p % capacity) * slot_bytes);
          if (seen != t && !*abort) {
            report_error(cm.error_slot, kErrorInvalidInput, cm.rank, kPhaseCombineRecv, n * L + my_local, seen);
            *abort = 1;
          }
        }
        pos[n] = p;
      }
      __syncwarp();
      const auto* bias0 = static_cast<const __nv_bfloat16*>(a.bias0);
      const auto* bias1 = static_cast<const __nv_bfloat16*>(a.bias1);
      auto* out = static_cast<__nv_bfloat16*>(a.out);
      for (int i = lane; i < a.hidden / 8; i += 32) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int n = 0; n < N; ++n) {
          const int p = pos[n];
          if (p < 0) continue;
          const uint8_t* slot_payload = cm.buffer + lay.rdma_recv(n, c) + int64_t(p % capacity) * slot_bytes +
                                        slot.payload_offset();
          if (a.float_partials) {
            const uint8_t* src = slot_payload + int64_t(i) * 32;
            const int4 lo = ld_volatile_v4(src), hi = ld_volatile_v4(src + 16);
            acc[0] += __int_as_float(lo.x), acc[1] += __int_as_float(lo.y);
            acc[2] += __int_as_float(lo.z), acc[3] += __int_as_float(lo.w);
            acc[4] += __int_as_float(hi.x), acc[5] += __int_as_float(hi.y);
            acc[6] += __int_as_float(hi.z), acc[7] += __int_as_float(hi.w);
          } else {
            const int4 v = ld_volatile_v4(slot_payload + int64_t(i) * 16);
            const auto* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += __bfloat162float(h[j]);
          }
        }
        const int64_t base = int64_t(t) * a.hidden + int64_t(i) * 8;
        if (bias0 != nullptr) {
          const int4 b = ptx::ld_nc_global(reinterpret_cast<const int4*>(bias0 + base));
          const auto* h = reinterpret_cast<const __nv_bfloat16*>(&b);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] += __bfloat162float(h[j]);
        }
        if (bias1 != nullptr) {
          const int4 b = ptx::ld_nc_global(reinterpret_cast<const int4*>(bias1 + base));
          const auto* h = reinterpret_cast<const __nv_bfloat16*>(&b);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] += __bfloat162float(h[j]);
        }
        int4 packed;
        auto* o = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = __float2bfloat16_rn(acc[j]);
        *reinterpret_cast<int4*>(out + base) = packed;
      }
      if (a.out_weights != nullptr && lane < a.num_topk) {
        float w = 0.0f;
        for (int n = 0; n < N; ++n) {
          const int p = pos[n];
          if (p < 0) continue;
          w += ld_volatile_f32(cm.buffer + lay.rdma_recv(n, c) + int64_t(p % capacity) * slot_bytes +
                               slot.weights_offset() + 4 * lane);
        }
        a.out_weights[int64_t(t) * a.num_topk + lane] = w;
      }
    }
    named_barrier(1, num_threads);
    if (warp == 0) {
      // Every slot of this round is read: advance and hand the slots back to the forwarders.
      for (int n = lane; n < N; n += 32) {
        int added = 0;
        for (int w = 0; w < num_warps; ++w) added += sh.recv_hit[w * N + n];
        if (added > 0) {
          sh.recv_base[n] += added;
          nvshmemx_signal_op(reinterpret_cast<uint64_t*>(cm.buffer + lay.rdma_head(parity, my_node, c)),
                             uint64_t(added), NVSHMEM_SIGNAL_ADD, n * L + my_local);
        }
      }
    }
    named_barrier(1, num_threads);
  }
}

__global__ void __launch_bounds__((kCombineSendWarps + kCombineForwardWarps + kCombineRecvWarps) * 32, 1)
combine_kernel(Common cm, CombineArgs a) {
  cm.epoch = *static_cast<volatile uint64_t*>(cm.epoch_word);  // notify, queued before, advanced it
  EP_DYNAMIC_SHARED(uint8_t, smem_raw);
  if (earlier_error(cm.error_slot)) return;
  const Layout& lay = cm.layout;
  const int R = lay.num_ranks, L = lay.ranks_per_node;
  CombineShared sh = combine_smem(smem_raw, R, L);
  const int my_node = cm.rank / L;
  for (int l = threadIdx.x; l < L; l += blockDim.x)
    sh.peer_base[l] = static_cast<uint8_t*>(nvshmem_ptr(cm.buffer, my_node * L + l));
  __syncthreads();
  bool peers_ok = true;
  for (int l = 0; l < L; ++l) peers_ok = peers_ok && sh.peer_base[l] != nullptr;

  const CombineSlot nvl_slot(int64_t(a.hidden) * 2, a.num_topk);
  const CombineSlot rdma_slot(int64_t(a.hidden) * combine_partial_bytes(a.float_partials), a.num_topk);
  const int64_t nvl_slot_bytes = nvl_slot.bytes(), rdma_slot_bytes = rdma_slot.bytes();
  const int nvl_capacity = lay.nvl_capacity(nvl_slot_bytes);
  const int rdma_capacity = lay.rdma_capacity(rdma_slot_bytes);
  const int num_recv_warps = rdma_capacity < kCombineRecvWarps ? rdma_capacity : kCombineRecvWarps;
  const int warp = threadIdx.x / 32, lane = ptx::lane_id();
  if (!peers_ok) {
    if (threadIdx.x == 0) report_error(cm.error_slot, kErrorInvalidInput, cm.rank, kPhaseCombineSend, -1, 1);
  } else if (warp < kCombineSendWarps) {
    combine_sender(cm, a, sh, warp, lane, nvl_slot, nvl_slot_bytes, nvl_capacity);
  } else if (warp < kCombineSendWarps + kCombineForwardWarps) {
    combine_forwarder(cm, a, sh, warp - kCombineSendWarps, lane, nvl_slot, nvl_slot_bytes, nvl_capacity, rdma_slot,
                      rdma_slot_bytes, rdma_capacity);
  } else if (warp - kCombineSendWarps - kCombineForwardWarps < num_recv_warps) {
    combine_receiver(cm, a, sh, warp - kCombineSendWarps - kCombineForwardWarps, lane, num_recv_warps, rdma_slot,
                     rdma_slot_bytes, rdma_capacity);
  }
  __syncthreads();  // every role's puts issued: one PE-wide quiet covers them
  if (threadIdx.x == 0) nvshmem_quiet();
}

}  // namespace

// ---- host launchers ----------------------------------------------------------------------------

void launch_notify(const Common& common, const NotifyArgs& args, cudaStream_t stream) {
  EP_LAUNCH_KERNEL(notify_kernel, 1, 256, 0, stream, common, args);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_dispatch(const Common& common, const DispatchArgs& args, cudaStream_t stream) {
  const Layout& lay = common.layout;
  const DispatchSlot slot(args.hidden_bytes, args.num_scales, args.num_topk, lay.ranks_per_node);
  EP_HOST_ASSERT(lay.rdma_capacity(slot.bytes()) >= 1 && lay.nvl_capacity(slot.bytes()) >= 1,
                 "internode dispatch: a " + std::to_string(slot.bytes()) + "-byte token does not fit the rings");
  const int64_t smem = dispatch_smem_bytes(lay.num_ranks, lay.ranks_per_node);
  constexpr int threads = (kDispatchSendWarps + kDispatchForwardWarps + kDispatchRecvWarps) * 32;
  if (smem > 48 * 1024)
    EP_CUDA_CHECK(cudaFuncSetAttribute(dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  EP_LAUNCH_KERNEL(dispatch_kernel, lay.num_channels, threads, size_t(smem), stream, common, args);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_combine(const Common& common, const CombineArgs& args, cudaStream_t stream) {
  const Layout& lay = common.layout;
  const CombineSlot nvl_slot(int64_t(args.hidden) * 2, args.num_topk);
  const CombineSlot rdma_slot(int64_t(args.hidden) * combine_partial_bytes(args.float_partials), args.num_topk);
  EP_HOST_ASSERT(lay.rdma_capacity(rdma_slot.bytes()) >= 1 && lay.nvl_capacity(nvl_slot.bytes()) >= 1,
                 "internode combine: a token does not fit the rings");
  const int64_t smem = combine_smem_bytes(lay.num_ranks, lay.ranks_per_node);
  constexpr int threads = (kCombineSendWarps + kCombineForwardWarps + kCombineRecvWarps) * 32;
  if (smem > 48 * 1024)
    EP_CUDA_CHECK(cudaFuncSetAttribute(combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  EP_LAUNCH_KERNEL(combine_kernel, lay.num_channels, threads, size_t(smem), stream, common, args);
  EP_CUDA_CHECK_LAUNCH();
}

}  // namespace internode
}  // namespace ep_comm
