// Host-side interface of the interconnect microbenchmarks (csrc/kernels/microbench.cu), used by
// ep_comm/bench/interconnect.py through bindings/microbench.cpp. Plain C++ (no device code), so the
// host compiler can include it. Pointers are raw device addresses, streams are cudaStream_t; the
// caller has made the right device current (these launchers know nothing of torch's device).
//
//   sm_copy        a grid-stride 16-byte copy by the SMs: with `dst` a peer's CUDA-IPC mapping this
//                  measures NVLink / P2P bandwidth by SM stores (what the intranode kernels do).
//   put_bench      NVSHMEM block-scoped puts (optionally with a signal add) of one message, `iters`
//                  times, then one quiet: bandwidth of NVSHMEM's transport to `dst_pe`.
//   pingpong       one thread per PE bounces a small put-with-signal to a peer and back: latency.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ep_comm {
namespace microbench {

// Threads per block of the copy and put kernels.
constexpr int kNumThreads = 512;

// Copies num_bytes from src to dst (any alignment; 16-byte vectors where both are 16-byte
// aligned, bytes for the tail). num_blocks <= 0: one block per SM of the current device (fewer
// when there is not enough work). Asynchronous on `stream`; src must not change while it runs.
void launch_sm_copy(void* dst, const void* src, int64_t num_bytes, int num_blocks, cudaStream_t stream);

// Every block puts its share (16-byte aligned split) of [src, src + num_bytes) to the same
// offsets at dst on `dst_pe`, `iters` times, with nvshmemx_putmem_nbi_block, or, when `signal` is
// not null, nvshmemx_putmem_signal_nbi_block adding 1 to `signal` on dst_pe per block and
// iteration; then thread 0 of every block calls nvshmem_quiet. `dst`, `src` and `signal` are
// symmetric addresses of this PE. Asynchronous on `stream`.
void launch_put_bench(uint8_t* dst, const uint8_t* src, int64_t num_bytes, int dst_pe, int iters, uint64_t* signal,
                      int num_blocks, cudaStream_t stream);

// What one pingpong call measured.
struct PingPongResult {
  long long elapsed_ns;  // global-timer time of the timed rounds (the initiator's clock is the one to use)
  int rounds_done;       // rounds completed, counting the untimed first one
  int timed_out;         // 1: a wait gave up after timeout_ns (rounds_done says where)
};

// Synchronous (waits for `stream`). Both PEs call it at the same time with the same arguments but
// opposite `initiator`. Round r (1-based, r = 1..iters + 1): the initiator puts num_bytes from
// msg to msg on `peer` and adds 1 to `signal` there (put-with-signal), then waits until its own
// `signal` reaches r; the responder waits for r, then answers the same way. Round 1 is an untimed
// handshake (both kernels are running when the clock starts); rounds 2..iters + 1 are timed.
// The last wait of each PE resets its own signal to 0, so calls can follow one another; after a
// timeout the signal words are undefined (recreate the buffer). `msg`, `signal`: symmetric.
PingPongResult run_pingpong(uint8_t* msg, int64_t num_bytes, uint64_t* signal, int peer, bool initiator, int iters,
                            long long timeout_ns, cudaStream_t stream);

// nvshmem_quiet() in a one-thread kernel: completes this PE's outstanding NVSHMEM operations.
void launch_quiet(cudaStream_t stream);

}  // namespace microbench
}  // namespace ep_comm
