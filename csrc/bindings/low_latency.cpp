// Bindings of the low-latency mode: NVSHMEM setup, the per-Buffer runtime and its four launchers.
// Pointers and streams travel as Python ints (uintptr_t); nothing here knows torch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings/registry.hpp"
#include "kernels/common/low_latency_launch.cuh"
#include "kernels/common/low_latency_layout.cuh"
#include "runtime/nvshmem_runtime.hpp"

namespace py = pybind11;

namespace {

using ep_comm::LowLatencyRuntime;
namespace ll = ep_comm::low_latency;

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// ValueError (std::invalid_argument) for sizes the layout cannot describe.
void check_sizes(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("low_latency_buffer_bytes: " + what); };
  if (num_max_tokens <= 0) fail("num_max_dispatch_tokens_per_rank must be positive, got " + std::to_string(num_max_tokens));
  if (hidden <= 0 || hidden % 8 != 0) fail("hidden must be a positive multiple of 8, got " + std::to_string(hidden));
  if (num_ranks <= 0) fail("num_ranks must be positive, got " + std::to_string(num_ranks));
  if (num_experts <= 0 || num_experts % num_ranks != 0)
    fail("num_experts must be a positive multiple of num_ranks (" + std::to_string(num_ranks) + "), got " +
         std::to_string(num_experts));
}

py::dict layout_dict(const ll::Layout& l) {
  py::dict d;
  d["num_max_tokens"] = l.num_max_tokens;
  d["hidden"] = l.hidden;
  d["num_ranks"] = l.num_ranks;
  d["num_experts"] = l.num_experts;
  d["experts_per_rank"] = l.experts_per_rank;
  d["slot_bytes"] = l.slot_bytes;
  d["ack_offset"] = l.ack_offset;
  d["dispatch_count_offset"] = l.dispatch_count_offset;
  d["dispatch_arrived_offset"] = l.dispatch_arrived_offset;
  d["combine_arrived_offset"] = l.combine_arrived_offset;
  d["control_bytes"] = l.control_bytes;
  d["dispatch_staging_offset"] = l.dispatch_staging_offset;
  d["combine_staging_offset"] = l.combine_staging_offset;
  d["recv_offset_0"] = l.recv_offset[0];
  d["recv_offset_1"] = l.recv_offset[1];
  d["recv_half_bytes"] = l.recv_half_bytes;
  d["total_bytes"] = l.total_bytes;
  return d;
}

}  // namespace

void register_low_latency(py::module_& m) {
  m.def(
      "low_latency_buffer_bytes",
      [](int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
        check_sizes(num_max_tokens, hidden, num_ranks, num_experts);
        return ll::buffer_bytes(num_max_tokens, hidden, num_ranks, num_experts);
      },
      py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"),
      "Bytes of NVSHMEM symmetric buffer low-latency mode needs for these sizes (both halves).");
  m.def(
      "low_latency_layout",
      [](int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
        check_sizes(num_max_tokens, hidden, num_ranks, num_experts);
        return layout_dict(ll::make_layout(num_max_tokens, hidden, num_ranks, num_experts));
      },
      py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"),
      "Offsets (bytes) of every region of the low-latency buffer, as the kernels address it.");
  m.attr("LOW_LATENCY_MAX_TOPK") = ll::kMaxTopk;

  // ---- NVSHMEM, process-wide ----
  m.def("nvshmem_unique_id_bytes", &ep_comm::nvshmem_runtime::unique_id_bytes);
  m.def(
      "nvshmem_get_unique_id", [] { return py::bytes(ep_comm::nvshmem_runtime::get_unique_id()); },
      "A fresh NVSHMEM unique id (create on rank 0, give to every rank).");
  m.def(
      "nvshmem_acquire",
      [](py::bytes unique_id, int rank, int num_ranks, int device, const std::string& group_key) {
        std::string id = unique_id;
        py::gil_scoped_release release;
        ep_comm::nvshmem_runtime::acquire(id, rank, num_ranks, device, group_key);
      },
      py::arg("unique_id"), py::arg("rank"), py::arg("num_ranks"), py::arg("device"), py::arg("group_key") = "",
      "Initialise NVSHMEM (first call; collective) or take another reference. Raises instead of exiting; "
      "a failed initialisation is recorded, and every later call raises it (one initialisation per process).");
  m.def("nvshmem_init_failure", &ep_comm::nvshmem_runtime::init_failure,
        "The first failed NVSHMEM initialisation of this process, as nvshmem_acquire raised it; '' if none.");
  m.def("nvshmem_initialised_here", &ep_comm::nvshmem_runtime::initialised_here,
        "Whether ep_comm initialised NVSHMEM in this process and has not finalised it (referenced, or up but "
        "abandoned).");
  m.def("nvshmem_abandon", &ep_comm::nvshmem_runtime::abandon, py::arg("reason"), py::arg("finalize"),
        py::call_guard<py::gil_scoped_release>(),
        "After an initialising nvshmem_acquire that failed on some rank: give back its reference, record the "
        "failure, and with finalize=True (every rank together, only if NVSHMEM came up on every rank) finalise.");
  m.def("nvshmem_release", &ep_comm::nvshmem_runtime::release, py::call_guard<py::gil_scoped_release>(),
        "Drop a reference; the last finalises NVSHMEM (collective).");
  m.def("nvshmem_reference_count", &ep_comm::nvshmem_runtime::reference_count);
  m.def("nvshmem_init_status", &ep_comm::nvshmem_runtime::init_status,
        "nvshmemx_init_status(): 0 none, 1 bootstrapped, 2 initialised, 3 limited MPG, 4 full MPG.");
  m.def("nvshmem_my_pe", &ep_comm::nvshmem_runtime::my_pe);
  m.def("nvshmem_n_pes", &ep_comm::nvshmem_runtime::num_pes);

  // ---- one low-latency Buffer ----
  // module_local: ep_comm._C and ep_comm._C_emu both bind this C++ type, each for itself.
  py::class_<LowLatencyRuntime>(m, "LowLatencyRuntime",
                                "NVSHMEM symmetric buffer, device state and error slot of one low-latency Buffer.",
                                py::module_local())
      .def(py::init<int64_t, int, int, bool, double>(), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
           py::arg("use_p2p"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("destroy", &LowLatencyRuntime::destroy, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("destroyed", &LowLatencyRuntime::destroyed)
      .def_property_readonly("buffer_ptr", &LowLatencyRuntime::buffer_ptr)
      .def_property_readonly("num_bytes", &LowLatencyRuntime::num_bytes)
      .def_property_readonly("num_sms", &LowLatencyRuntime::num_sms)
      .def_property_readonly("timeout_ns", &LowLatencyRuntime::timeout_ns)
      .def("peer_is_p2p", &LowLatencyRuntime::peer_is_p2p, py::arg("peer"))
      .def("has_error", &LowLatencyRuntime::has_error)
      .def("check_error", &LowLatencyRuntime::check_error)
      .def("quiet", &LowLatencyRuntime::quiet, py::call_guard<py::gil_scoped_release>(),
           "Wait for the device, then complete this rank's outstanding NVSHMEM operations (acks).")
      .def("clean", &LowLatencyRuntime::clean, py::arg("num_max_tokens"), py::arg("hidden"), py::arg("num_experts"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "layout",
          [](const LowLatencyRuntime& rt, int64_t num_max_tokens, int64_t hidden, int64_t num_experts) {
            return layout_dict(rt.layout(num_max_tokens, hidden, num_experts));
          },
          py::arg("num_max_tokens"), py::arg("hidden"), py::arg("num_experts"))
      .def(
          "dispatch_send",
          [](LowLatencyRuntime& rt, int64_t num_max_tokens, int64_t hidden, int64_t num_experts, uintptr_t x,
             uintptr_t topk_idx, int num_tokens, int num_topk, bool use_fp8, bool round_scale, uintptr_t token_slot,
             uintptr_t send_count, uintptr_t call_epoch, uintptr_t stream) {
            ll::DispatchSendArgs a{};
            a.x = as_ptr<const void>(x);
            a.topk_idx = as_ptr<const int64_t>(topk_idx);
            a.num_tokens = num_tokens;
            a.num_topk = num_topk;
            a.use_fp8 = use_fp8;
            a.round_scale = round_scale;
            a.token_slot = as_ptr<int32_t>(token_slot);
            a.send_count = as_ptr<int32_t>(send_count);
            a.call_epoch = as_ptr<unsigned long long>(call_epoch);
            rt.dispatch_send(num_max_tokens, hidden, num_experts, a, as_stream(stream));
          },
          py::arg("num_max_tokens"), py::arg("hidden"), py::arg("num_experts"), py::arg("x"), py::arg("topk_idx"),
          py::arg("num_tokens"), py::arg("num_topk"), py::arg("use_fp8"), py::arg("round_scale"),
          py::arg("token_slot"), py::arg("send_count"), py::arg("call_epoch"), py::arg("stream"))
      .def(
          "dispatch_recv",
          [](LowLatencyRuntime& rt, int64_t num_max_tokens, int64_t hidden, int64_t num_experts, uintptr_t call_epoch,
             bool use_fp8, bool use_ue8m0, uintptr_t recv_x, uintptr_t recv_scales, uintptr_t recv_count,
             uintptr_t recv_layout, uintptr_t cumulative_stats, uintptr_t stream) {
            ll::DispatchRecvArgs a{};
            a.call_epoch = as_ptr<const unsigned long long>(call_epoch);
            a.use_fp8 = use_fp8;
            a.use_ue8m0 = use_ue8m0;
            a.recv_x = as_ptr<void>(recv_x);
            a.recv_scales = as_ptr<void>(recv_scales);
            a.recv_count = as_ptr<int32_t>(recv_count);
            a.recv_layout = as_ptr<int32_t>(recv_layout);
            a.cumulative_stats = as_ptr<int32_t>(cumulative_stats);
            rt.dispatch_recv(num_max_tokens, hidden, num_experts, a, as_stream(stream));
          },
          py::arg("num_max_tokens"), py::arg("hidden"), py::arg("num_experts"), py::arg("call_epoch"),
          py::arg("use_fp8"), py::arg("use_ue8m0"), py::arg("recv_x"), py::arg("recv_scales"),
          py::arg("recv_count"), py::arg("recv_layout"), py::arg("cumulative_stats"), py::arg("stream"))
      .def(
          "combine_send",
          [](LowLatencyRuntime& rt, int64_t num_max_tokens, int64_t hidden, int64_t num_experts, uintptr_t x,
             bool zero_copy, uintptr_t recv_layout, uintptr_t call_epoch, uintptr_t stream) {
            ll::CombineSendArgs a{};
            a.x = as_ptr<const void>(x);
            a.zero_copy = zero_copy;
            a.recv_layout = as_ptr<const int32_t>(recv_layout);
            a.call_epoch = as_ptr<unsigned long long>(call_epoch);
            rt.combine_send(num_max_tokens, hidden, num_experts, a, as_stream(stream));
          },
          py::arg("num_max_tokens"), py::arg("hidden"), py::arg("num_experts"), py::arg("x"), py::arg("zero_copy"),
          py::arg("recv_layout"), py::arg("call_epoch"), py::arg("stream"))
      .def(
          "combine_recv",
          [](LowLatencyRuntime& rt, int64_t num_max_tokens, int64_t hidden, int64_t num_experts, uintptr_t call_epoch,
             uintptr_t topk_idx, uintptr_t topk_weights, uintptr_t token_slot, uintptr_t send_count, int num_tokens,
             int num_topk, uintptr_t out, uintptr_t stream) {
            ll::CombineRecvArgs a{};
            a.call_epoch = as_ptr<const unsigned long long>(call_epoch);
            a.topk_idx = as_ptr<const int64_t>(topk_idx);
            a.topk_weights = as_ptr<const float>(topk_weights);
            a.token_slot = as_ptr<const int32_t>(token_slot);
            a.send_count = as_ptr<const int32_t>(send_count);
            a.num_tokens = num_tokens;
            a.num_topk = num_topk;
            a.out = as_ptr<void>(out);
            rt.combine_recv(num_max_tokens, hidden, num_experts, a, as_stream(stream));
          },
          py::arg("num_max_tokens"), py::arg("hidden"), py::arg("num_experts"), py::arg("call_epoch"),
          py::arg("topk_idx"), py::arg("topk_weights"), py::arg("token_slot"), py::arg("send_count"),
          py::arg("num_tokens"), py::arg("num_topk"), py::arg("out"), py::arg("stream"));
}
