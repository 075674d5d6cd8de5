// The intranode runtime: one rank's NVLink buffer, the CUDA IPC mappings of its peers' buffers,
// the host-mapped receive counters and the host-mapped error slot.
//
// Life cycle (driven from Python, ep_comm/backends/intranode.py):
//   IpcBuffer(rank, R, device, bytes)   cudaMalloc + zero the buffer, map the counters
//   ipc_handle()                        this rank's cudaIpcMemHandle_t as bytes
//   open_peers(handles of all ranks)    Python all_gathers the handles through the user's group;
//                                       every other rank's handle is opened (also when it lives
//                                       on the same device); this rank uses its own pointer
//   context()                           what the kernels need (intranode.hpp)
//   destroy()                           idempotent: sync, close the peer mappings, free everything
//
// Not thread-safe: one Python thread drives one buffer, as with any torch stream work.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/intranode.hpp"
#include "runtime/error_slot.hpp"

namespace ep_comm {

class IpcBuffer {
 public:
  IpcBuffer(int rank, int num_ranks, int device, int64_t num_bytes);
  ~IpcBuffer();
  IpcBuffer(const IpcBuffer&) = delete;
  IpcBuffer& operator=(const IpcBuffer&) = delete;

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  int64_t num_bytes() const { return num_bytes_; }
  bool is_open() const { return open_; }
  bool is_destroyed() const { return destroyed_; }
  void* local_ptr() const { return local_; }

  // cudaIpcMemHandle_t of this rank's buffer (64 bytes).
  std::string ipc_handle() const;
  // handles[r] is what rank r's ipc_handle() returned; handles[rank()] is ignored.
  void open_peers(const std::vector<std::string>& handles);

  // Kernel view; timeout_s becomes a budget in global-timer nanoseconds.
  intranode::Context context(double timeout_s) const;

  // Makes this buffer's device current for our CUDA runtime (torch's current device is not ours).
  void activate() const;

  // Host-mapped receive counters: arm before launching a notify that reports to the host, then
  // wait. Returns (num_recv_tokens, per-local-expert counts rounded up to the alignment). Raises
  // the device's error if one was recorded, or a host timeout naming the rank.
  intranode::RecvCounters* arm_recv_counters();
  std::pair<int, std::vector<int>> wait_recv_counts(int num_local_experts, double timeout_s) const;

  // The first device error recorded so far (sticky: a failed exchange leaves peers out of step).
  bool has_error() const;
  void check_error() const;
  std::string error_message() const;

  // Synchronises the device, closes the peer mappings and frees the buffer and mapped memory.
  // Safe to call twice and after failures; never throws.
  void destroy() noexcept;

 private:
  void require_usable(const char* what) const;

  int rank_;
  int num_ranks_;
  int device_;
  int64_t num_bytes_;
  void* local_ = nullptr;
  std::vector<void*> peers_;  // peers_[r]: rank r's buffer mapped here (local_ for r == rank)
  intranode::RecvCounters* counters_host_ = nullptr;
  intranode::RecvCounters* counters_device_ = nullptr;
  std::unique_ptr<ErrorSlotHost> error_slot_;
  bool open_ = false;
  bool destroyed_ = false;
};

}  // namespace ep_comm
