#include "runtime/nvshmem_runtime.hpp"

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <mutex>
#include <string>

#include "runtime/errors.hpp"

namespace ep_comm {
namespace nvshmem_runtime {

namespace {

std::mutex g_mutex;
int g_references = 0;
int g_rank = -1;
int g_num_ranks = -1;
int g_device = -1;
std::string g_group_key;
// The first initialisation by ep_comm that failed or came up wrong in this process; empty if
// none. Sticky: a failed nvshmemi_init_thread leaves NVSHMEM bootstrapped but not initialised (it
// does not undo its bootstrap), so a second attempt would be misread as "initialised by another
// library" or run into one of NVSHMEM's exit() paths (the UID bootstrap exits when it finds its
// pre-init state gone). NVSHMEM supports one initialisation per process: restart instead.
std::string g_failure;
// NVSHMEM is initialised here but holds no reference: it came up other than asked (PE numbering),
// or came up here while a peer failed. Only all ranks together may finalise it (abandon()).
bool g_up_unreferenced = false;

std::string where(int rank, int num_ranks, int device) {
  return "rank " + std::to_string(rank) + " of " + std::to_string(num_ranks) + " (device " + std::to_string(device) +
         ")";
}

std::string earlier_failure_text() {
  return "ep_comm's NVSHMEM initialisation failed earlier in this process: " + g_failure +
         ". NVSHMEM cannot be initialised again in this process: restart the processes (all ranks)";
}

// Records `message` as this process's failed initialisation and throws it. Caller holds g_mutex.
[[noreturn]] void fail_initialisation(const std::string& message) {
  if (g_failure.empty()) g_failure = message;
  EP_HOST_ASSERT(false, message);
  throw Error(message);  // not reached
}

}  // namespace

std::size_t unique_id_bytes() { return sizeof(nvshmemx_uniqueid_t); }

std::string get_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  EP_NVSHMEM_CHECK(nvshmemx_get_uniqueid(&id));
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void acquire(const std::string& unique_id, int rank, int num_ranks, int device, const std::string& group_key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  // Before anything else: after a failed attempt NVSHMEM is in a state no call here can repair.
  EP_HOST_ASSERT(g_failure.empty(), earlier_failure_text());
  if (g_references > 0) {
    const bool same_group = group_key.empty() || g_group_key.empty() || group_key == g_group_key;
    EP_HOST_ASSERT(rank == g_rank && num_ranks == g_num_ranks && same_group,
                   "NVSHMEM is already initialised in this process as PE " + std::to_string(g_rank) + " of " +
                       std::to_string(g_num_ranks) + " over the group [" + g_group_key +
                       "]; a low-latency Buffer over the group [" + group_key + "] (rank " + std::to_string(rank) +
                       " of " + std::to_string(num_ranks) +
                       ") cannot share it (NVSHMEM can be initialised once per process: destroy the other "
                       "low-latency Buffers first, on all ranks)");
    EP_HOST_ASSERT(device == g_device, "NVSHMEM was initialised on device " + std::to_string(g_device) +
                                           ", but this Buffer uses device " + std::to_string(device));
    if (g_group_key.empty()) g_group_key = group_key;
    ++g_references;
    return;
  }
  // Argument checks touch nothing, so they are not recorded as a failed initialisation. Python
  // (ep_comm/backends/nvshmem.py) makes them before this call, agreed across ranks; these repeat
  // them for other callers: a short id would be read past its end, and NVSHMEM's bootstrap does
  // not check rank against num_ranks.
  EP_HOST_ASSERT(unique_id.size() == sizeof(nvshmemx_uniqueid_t),
                 "NVSHMEM unique id must be " + std::to_string(sizeof(nvshmemx_uniqueid_t)) + " bytes, got " +
                     std::to_string(unique_id.size()));
  EP_HOST_ASSERT(0 <= rank && rank < num_ranks, "rank " + std::to_string(rank) + " is not in [0, " +
                                                    std::to_string(num_ranks) + ")");
  // Someone else in this process (another library) initialised NVSHMEM: its PE numbering and
  // heap are not ours to reuse, and initialising twice is not supported. (ep_comm's own failed
  // attempts were caught above, by g_failure.)
  const int status_before = nvshmemx_init_status();
  EP_HOST_ASSERT(status_before == NVSHMEM_STATUS_NOT_INITIALIZED,
                 "NVSHMEM is already initialised in this process by another library (init status " +
                     std::to_string(status_before) + "); ep_comm's low-latency mode needs to initialise it itself");

  EP_CUDA_CHECK(cudaSetDevice(device));
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  EP_NVSHMEM_CHECK(nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr));
  attr.args.cuda_device_id = device;

  // From here on NVSHMEM's state changes: every failure is recorded (fail_initialisation).
  // The exiting wrappers (nvshmem_init, nvshmemx_init_attr) call this and exit() on a nonzero
  // status; calling it directly lets us raise instead.
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  const int status =
      nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  if (status != 0)
    fail_initialisation("NVSHMEM initialisation failed with status " + std::to_string(status) + " on " +
                        where(rank, num_ranks, device) +
                        "; set NVSHMEM_DEBUG=INFO for NVSHMEM's own log, and see docs/low_latency.md for transport "
                        "settings");
  // nvshmemi_init_thread also returns 0 when its second stage (heap, transports) failed: it logs
  // "continuing" and leaves NVSHMEM only bootstrapped, and the next NVSHMEM call that needs the
  // heap (nvshmem_malloc) retries that stage and exit()s if it fails again.
  const int status_after = nvshmemx_init_status();
  if (status_after < NVSHMEM_STATUS_IS_INITIALIZED)
    fail_initialisation("NVSHMEM initialisation on " + where(rank, num_ranks, device) +
                        " returned success but left NVSHMEM only bootstrapped (init status " +
                        std::to_string(status_after) +
                        "): setting up its heap or transports failed; set NVSHMEM_DEBUG=INFO for NVSHMEM's own log, "
                        "and see docs/low_latency.md for transport settings");
  const int pe = nvshmem_my_pe(), pes = nvshmem_n_pes();
  if (pe != rank || pes != num_ranks) {
    // Up, but unusable. No nvshmem_finalize here: it is collective, and peers that came up right
    // are not calling it. abandon() finalises once every rank is known to be up.
    g_up_unreferenced = true;
    fail_initialisation("NVSHMEM came up as PE " + std::to_string(pe) + " of " + std::to_string(pes) + " on " +
                        where(rank, num_ranks, device) + ", expected PE " + std::to_string(rank) + " of " +
                        std::to_string(num_ranks));
  }
  g_references = 1;
  g_rank = rank;
  g_num_ranks = num_ranks;
  g_device = device;
  g_group_key = group_key;
}

std::string init_failure() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_failure;
}

bool initialised_here() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_references > 0 || g_up_unreferenced;
}

void abandon(const std::string& reason, bool finalize) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_references > 0) {
    // Only the reference the failed initialisation itself took may be given back here.
    EP_HOST_ASSERT(g_references == 1, "cannot abandon NVSHMEM: " + std::to_string(g_references - 1) +
                                          " other references (Buffers) still use it on rank " +
                                          std::to_string(g_rank));
    g_references = 0;
    g_up_unreferenced = true;
    g_rank = g_num_ranks = g_device = -1;
    g_group_key.clear();
  }
  if (g_failure.empty()) g_failure = reason;
  if (finalize && g_up_unreferenced) {
    nvshmem_finalize();  // collective: the caller runs this on every rank together
    g_up_unreferenced = false;
  }
}

void add_reference() {
  std::lock_guard<std::mutex> lock(g_mutex);
  EP_HOST_ASSERT(g_references > 0, "NVSHMEM is not initialised (acquire it first)");
  ++g_references;
}

void release() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_references == 0) return;
  if (--g_references == 0) {
    nvshmem_finalize();
    g_rank = g_num_ranks = g_device = -1;
    g_group_key.clear();
  }
}

int reference_count() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_references;
}

bool is_initialized() { return reference_count() > 0; }

int init_status() { return nvshmemx_init_status(); }

int my_pe() {
  EP_HOST_ASSERT(is_initialized(), "NVSHMEM is not initialised");
  return nvshmem_my_pe();
}

int num_pes() {
  EP_HOST_ASSERT(is_initialized(), "NVSHMEM is not initialised");
  return nvshmem_n_pes();
}

uint8_t* malloc_zeroed(int64_t num_bytes, int rank) {
  auto* buffer = static_cast<uint8_t*>(nvshmem_malloc(static_cast<size_t>(num_bytes)));
  EP_HOST_ASSERT(buffer != nullptr, "nvshmem_malloc of " + std::to_string(num_bytes) + " bytes failed on rank " +
                                        std::to_string(rank) +
                                        " (raise NVSHMEM_SYMMETRIC_SIZE, see docs/low_latency.md)");
  EP_CUDA_CHECK(cudaMemset(buffer, 0, static_cast<size_t>(num_bytes)));
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  return buffer;
}

}  // namespace nvshmem_runtime

// ---------------------------------------------------------------------------------------------
// LowLatencyRuntime
// ---------------------------------------------------------------------------------------------

LowLatencyRuntime::LowLatencyRuntime(int64_t num_bytes, int rank, int num_ranks, bool use_p2p, double timeout_s)
    : num_bytes_(num_bytes), rank_(rank), num_ranks_(num_ranks), use_p2p_(use_p2p) {
  EP_HOST_ASSERT(num_bytes > 0, "low-latency mode needs num_rdma_bytes > 0 (see "
                                "Buffer.get_low_latency_rdma_size_hint)");
  EP_HOST_ASSERT(timeout_s > 0, "timeout must be positive");
  EP_CUDA_CHECK(cudaGetDevice(&device_));
  EP_HOST_ASSERT(nvshmem_runtime::is_initialized() && nvshmem_runtime::my_pe() == rank &&
                     nvshmem_runtime::num_pes() == num_ranks,
                 "initialise NVSHMEM (nvshmem_runtime::acquire) for this rank and group before creating a "
                 "LowLatencyRuntime");
  // Its own reference, so that the buffer is always freed before NVSHMEM is finalised.
  nvshmem_runtime::add_reference();
  try {
    EP_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_));
    timeout_ns_ = static_cast<uint64_t>(timeout_ns_from_seconds(timeout_s));

    EP_CUDA_CHECK(cudaMalloc(&state_, sizeof(low_latency::DeviceState)));
    EP_CUDA_CHECK(cudaMemset(state_, 0, sizeof(low_latency::DeviceState)));
    // Control words start at zero; peers write them only after the host barrier Python runs next.
    buffer_ = nvshmem_runtime::malloc_zeroed(num_bytes, rank);
  } catch (...) {
    // A failed nvshmem_malloc leaves the ranks out of step anyway; free what is local.
    if (state_ != nullptr) cudaFree(state_);
    state_ = nullptr;
    buffer_ = nullptr;
    nvshmem_runtime::release();
    throw;
  }
}

LowLatencyRuntime::~LowLatencyRuntime() {
  // No collective calls from a destructor (ranks destroy in different orders); destroy() frees
  // the symmetric buffer. Local memory goes here.
  if (state_ != nullptr) cudaFree(state_);
  state_ = nullptr;
}

void LowLatencyRuntime::destroy() {
  if (buffer_ == nullptr) return;
  // Deliver this rank's outstanding acks before the collective free (whose barrier then orders
  // every rank's quiet before any rank frees): a late ack would write into freed heap, possibly
  // into the next buffer nvshmem_malloc hands out.
  quiet();
  nvshmem_free(buffer_);  // collective
  buffer_ = nullptr;
  if (state_ != nullptr) cudaFree(state_);
  state_ = nullptr;
  nvshmem_runtime::release();
}

void LowLatencyRuntime::select_device() const {
  int current = -1;
  EP_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device_) EP_CUDA_CHECK(cudaSetDevice(device_));
}

bool LowLatencyRuntime::peer_is_p2p(int peer) const {
  EP_HOST_ASSERT(buffer_ != nullptr, "the low-latency buffer was destroyed");
  EP_HOST_ASSERT(0 <= peer && peer < num_ranks_, "peer out of range");
  return nvshmem_ptr(buffer_, peer) != nullptr;
}

low_latency::Layout LowLatencyRuntime::layout(int64_t num_max_tokens, int64_t hidden, int64_t num_experts) const {
  EP_HOST_ASSERT(buffer_ != nullptr, "the low-latency buffer was destroyed");
  EP_HOST_ASSERT(num_max_tokens > 0 && hidden > 0 && num_experts > 0 && num_experts % num_ranks_ == 0,
                 "invalid low-latency sizes T=" + std::to_string(num_max_tokens) + " H=" + std::to_string(hidden) +
                     " E=" + std::to_string(num_experts));
  const low_latency::Layout l = low_latency::make_layout(num_max_tokens, hidden, num_ranks_, num_experts);
  EP_HOST_ASSERT(l.total_bytes <= num_bytes_,
                 "low-latency layout for T=" + std::to_string(num_max_tokens) + ", hidden=" + std::to_string(hidden) +
                     ", num_experts=" + std::to_string(num_experts) + " needs " + std::to_string(l.total_bytes) +
                     " bytes, but num_rdma_bytes is " + std::to_string(num_bytes_));
  return l;
}

low_latency::Common LowLatencyRuntime::common(int64_t num_max_tokens, int64_t hidden, int64_t num_experts) const {
  low_latency::Common c{};
  c.buffer = buffer_;
  c.layout = layout(num_max_tokens, hidden, num_experts);
  c.state = state_;
  c.error_slot = error_slot_.device_ptr();
  c.rank = rank_;
  c.num_sms = num_sms_;
  c.timeout_ns = timeout_ns_;
  c.use_p2p = use_p2p_;
  return c;
}

void LowLatencyRuntime::quiet() {
  EP_HOST_ASSERT(buffer_ != nullptr, "the low-latency buffer was destroyed");
  select_device();
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  low_latency::launch_quiet(nullptr);
  EP_CUDA_CHECK(cudaDeviceSynchronize());
}

void LowLatencyRuntime::clean(int64_t num_max_tokens, int64_t hidden, int64_t num_experts) {
  const low_latency::Layout l = layout(num_max_tokens, hidden, num_experts);
  select_device();
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  EP_CUDA_CHECK(cudaMemset(buffer_, 0, static_cast<size_t>(l.control_bytes)));
  EP_CUDA_CHECK(cudaMemset(state_, 0, sizeof(low_latency::DeviceState)));
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  error_slot_.reset();
}

void LowLatencyRuntime::dispatch_send(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                                      const low_latency::DispatchSendArgs& args, cudaStream_t stream) {
  select_device();
  low_latency::launch_dispatch_send(common(num_max_tokens, hidden, num_experts), args, stream);
}

void LowLatencyRuntime::dispatch_recv(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                                      const low_latency::DispatchRecvArgs& args, cudaStream_t stream) {
  select_device();
  low_latency::launch_dispatch_recv(common(num_max_tokens, hidden, num_experts), args, stream);
}

void LowLatencyRuntime::combine_send(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                                     const low_latency::CombineSendArgs& args, cudaStream_t stream) {
  select_device();
  low_latency::launch_combine_send(common(num_max_tokens, hidden, num_experts), args, stream);
}

void LowLatencyRuntime::combine_recv(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                                     const low_latency::CombineRecvArgs& args, cudaStream_t stream) {
  select_device();
  low_latency::launch_combine_recv(common(num_max_tokens, hidden, num_experts), args, stream);
}

}  // namespace ep_comm
