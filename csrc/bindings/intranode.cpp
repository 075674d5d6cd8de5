// Python bindings of the intranode (NVLink / CUDA IPC) runtime and kernels, and of the GPU
// dispatch layout. Everything crosses as ints (device pointers, sizes, cudaStream_t) or bytes.
//
// dispatch / combine raise a recorded device error only AFTER launching (notify not at all): a kernel
// launched on a failed buffer does no work, but its start rendezvous tells every peer "this rank
// failed", so they skip the same call at once instead of timing out waiting for it (e.g. the
// dispatch right after a notify that found more rows than num_worst_tokens).
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings/registry.hpp"
#include "kernels/common/intranode_layout.cuh"
#include "kernels/intranode.hpp"
#include "kernels/layout.hpp"
#include "runtime/errors.hpp"
#include "runtime/ipc_buffer.hpp"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t stream_of(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

py::dict layout_offsets(int num_ranks, int num_channels, int num_slots, int64_t slot_bytes) {
  const ep_comm::intranode::BufferLayout l(num_ranks, num_channels, num_slots, slot_bytes);
  py::dict d;
  d["started"] = l.started_begin();
  d["notify_channel"] = l.notify_channel_begin();
  d["notify_expert"] = l.notify_expert_begin();
  d["tail"] = l.tail_begin();
  d["head"] = l.head_begin();
  d["slots"] = l.slots_begin();
  d["slot_bytes"] = l.slot_bytes;
  d["ring_bytes"] = l.ring_bytes();
  d["total"] = l.total_bytes();
  return d;
}

}  // namespace

void register_intranode(py::module_& m) {
  using ep_comm::IpcBuffer;
  namespace in = ep_comm::intranode;

  // ---- sizes (no GPU needed) -----------------------------------------------------------------
  m.def("intranode_buffer_bytes", &in::buffer_bytes, py::arg("hidden_bytes"), py::arg("num_ranks"),
        py::arg("num_channels"), py::arg("num_max_nvl_chunked_recv_tokens"),
        "NVLink buffer bytes for rows of up to hidden_bytes (bf16 or FP8 dispatch with <= 32 top-k, combine).");
  m.def("intranode_layout_bytes", &in::layout_bytes, py::arg("num_ranks"), py::arg("num_channels"),
        py::arg("num_slots"), py::arg("slot_bytes"), "Bytes one call with these ring parameters addresses.");
  m.def("intranode_dispatch_slot_bytes", &in::dispatch_slot_bytes, py::arg("hidden_bytes"), py::arg("num_scales"),
        py::arg("num_topk"));
  m.def("intranode_combine_slot_bytes", &in::combine_slot_bytes, py::arg("hidden_bytes"), py::arg("num_topk"));
  m.def("intranode_layout_offsets", &layout_offsets, py::arg("num_ranks"), py::arg("num_channels"),
        py::arg("num_slots"), py::arg("slot_bytes"), "Region starts of the NVLink buffer (for tests).");
  m.attr("INTRANODE_MAX_RANKS") = in::kNumMaxRanks;
  m.attr("INTRANODE_MAX_CHANNELS") = in::kMaxChannels;
  m.attr("INTRANODE_MAX_LOCAL_EXPERTS") = in::kNumMaxLocalExpertsHost;
  m.attr("INTRANODE_MAX_TOPK") = in::kMaxTopk;

  // ---- layout ---------------------------------------------------------------------------------
  m.def(
      "get_dispatch_layout",
      [](std::uintptr_t topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts, int ranks_per_node,
         std::uintptr_t num_tokens_per_rank, std::uintptr_t num_tokens_per_rdma_rank,
         std::uintptr_t num_tokens_per_expert, std::uintptr_t is_token_in_rank, int device, std::uintptr_t stream) {
        EP_CUDA_CHECK(cudaSetDevice(device));
        ep_comm::layout::DispatchLayoutArgs args{};
        args.topk_idx = ptr<const int64_t>(topk_idx);
        args.num_tokens = num_tokens;
        args.num_topk = num_topk;
        args.num_ranks = num_ranks;
        args.num_experts = num_experts;
        args.ranks_per_node = ranks_per_node;
        args.num_tokens_per_rank = ptr<int>(num_tokens_per_rank);
        args.num_tokens_per_rdma_rank = ptr<int>(num_tokens_per_rdma_rank);
        args.num_tokens_per_expert = ptr<int>(num_tokens_per_expert);
        args.is_token_in_rank = ptr<bool>(is_token_in_rank);
        ep_comm::layout::launch_get_dispatch_layout(args, stream_of(stream));
      },
      py::arg("topk_idx"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("num_ranks"), py::arg("num_experts"),
      py::arg("ranks_per_node"), py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_rdma_rank"),
      py::arg("num_tokens_per_expert"), py::arg("is_token_in_rank"), py::arg("device"), py::arg("stream"),
      "Launch the layout kernel; num_tokens_per_rdma_rank may be 0 (not computed).");

  // ---- runtime + kernels --------------------------------------------------------------------
  // module_local: ep_comm._C and ep_comm._C_emu both bind this C++ type, each for itself.
  py::class_<IpcBuffer>(m, "IntranodeBuffer", "One rank's NVLink buffer and its peers' IPC mappings.",
                        py::module_local())
      .def(py::init<int, int, int, int64_t>(), py::arg("rank"), py::arg("num_ranks"), py::arg("device"),
           py::arg("num_bytes"))
      .def("ipc_handle", [](const IpcBuffer& b) { return py::bytes(b.ipc_handle()); })
      .def(
          "open_peers",
          [](IpcBuffer& b, const std::vector<py::bytes>& handles) {
            std::vector<std::string> raw;
            raw.reserve(handles.size());
            for (const auto& h : handles) raw.emplace_back(h);
            b.open_peers(raw);
          },
          py::arg("handles"))
      .def("destroy", &IpcBuffer::destroy, py::call_guard<py::gil_scoped_release>())
      .def("has_error", &IpcBuffer::has_error)
      .def("check_error", &IpcBuffer::check_error)
      .def("error_message", &IpcBuffer::error_message)
      .def_property_readonly("local_ptr", [](const IpcBuffer& b) { return reinterpret_cast<std::uintptr_t>(b.local_ptr()); })
      .def_property_readonly("num_bytes", &IpcBuffer::num_bytes)
      .def_property_readonly("is_open", &IpcBuffer::is_open)
      .def_property_readonly("is_destroyed", &IpcBuffer::is_destroyed)
      .def(
          "notify",
          [](IpcBuffer& b, std::uintptr_t is_token_in_rank, std::uintptr_t num_tokens_per_expert, int num_tokens,
             int num_channels, int num_local_experts, int expert_alignment, int num_worst_tokens,
             std::uint32_t signature, bool report_to_host, int num_slots, int64_t slot_bytes,
             std::uintptr_t channel_pos, std::uintptr_t send_count, std::uintptr_t recv_start, double timeout_s,
             std::uintptr_t stream) {
            b.activate();
            in::NotifyArgs args{};
            args.is_token_in_rank = ptr<const bool>(is_token_in_rank);
            args.num_tokens_per_expert = ptr<const int>(num_tokens_per_expert);
            args.num_tokens = num_tokens;
            args.num_channels = num_channels;
            args.num_local_experts = num_local_experts;
            args.expert_alignment = expert_alignment;
            args.num_worst_tokens = num_worst_tokens;
            args.signature = signature;
            args.recv_counters = report_to_host ? b.arm_recv_counters() : nullptr;
            args.num_slots = num_slots;
            args.slot_bytes = slot_bytes;
            args.channel_pos = ptr<int>(channel_pos);
            args.send_count = ptr<int>(send_count);
            args.recv_start = ptr<int>(recv_start);
            // No error check here: the dispatch launched next raises it, after launching (the
            // peers' dispatch waits for ours), and wait_recv_counts raises it too.
            in::launch_notify(b.context(timeout_s), args, stream_of(stream));
          },
          py::arg("is_token_in_rank"), py::arg("num_tokens_per_expert"), py::arg("num_tokens"), py::arg("num_channels"),
          py::arg("num_local_experts"), py::arg("expert_alignment"), py::arg("num_worst_tokens"), py::arg("signature"),
          py::arg("report_to_host"), py::arg("num_slots"), py::arg("slot_bytes"), py::arg("channel_pos"),
          py::arg("send_count"), py::arg("recv_start"), py::arg("timeout_s"), py::arg("stream"))
      .def("wait_recv_counts", &IpcBuffer::wait_recv_counts, py::arg("num_local_experts"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(),
           "Block until notify reported (num_recv_tokens, [per-local-expert counts]); raises on device errors.")
      .def(
          "dispatch",
          [](IpcBuffer& b, std::uintptr_t x, std::uintptr_t x_scales, std::uintptr_t topk_idx,
             std::uintptr_t topk_weights, int num_tokens, int64_t hidden_bytes, int num_scales, int num_topk,
             int num_local_experts, std::uintptr_t is_token_in_rank, std::uintptr_t channel_pos,
             std::uintptr_t send_count, std::uintptr_t recv_start, int num_channels, int num_slots,
             std::uintptr_t recv_x, std::uintptr_t recv_x_scales, std::uintptr_t recv_topk_idx,
             std::uintptr_t recv_topk_weights, int num_recv_rows, std::uint32_t signature, double timeout_s,
             std::uintptr_t stream) {
            b.activate();
            in::DispatchArgs args{};
            args.x = ptr<const void>(x);
            args.x_scales = ptr<const float>(x_scales);
            args.topk_idx = ptr<const int64_t>(topk_idx);
            args.topk_weights = ptr<const float>(topk_weights);
            args.num_tokens = num_tokens;
            args.hidden_bytes = hidden_bytes;
            args.num_scales = num_scales;
            args.num_topk = num_topk;
            args.num_local_experts = num_local_experts;
            args.is_token_in_rank = ptr<const bool>(is_token_in_rank);
            args.channel_pos = ptr<const int>(channel_pos);
            args.send_count = ptr<const int>(send_count);
            args.recv_start = ptr<const int>(recv_start);
            args.num_channels = num_channels;
            args.num_slots = num_slots;
            args.recv_x = ptr<void>(recv_x);
            args.recv_x_scales = ptr<float>(recv_x_scales);
            args.recv_topk_idx = ptr<int64_t>(recv_topk_idx);
            args.recv_topk_weights = ptr<float>(recv_topk_weights);
            args.num_recv_rows = num_recv_rows;
            args.signature = signature;
            in::launch_dispatch(b.context(timeout_s), args, stream_of(stream));
            b.check_error();  // after the launch: see the comment at the top
          },
          py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("num_tokens"),
          py::arg("hidden_bytes"), py::arg("num_scales"), py::arg("num_topk"), py::arg("num_local_experts"),
          py::arg("is_token_in_rank"), py::arg("channel_pos"), py::arg("send_count"), py::arg("recv_start"),
          py::arg("num_channels"), py::arg("num_slots"), py::arg("recv_x"), py::arg("recv_x_scales"),
          py::arg("recv_topk_idx"), py::arg("recv_topk_weights"), py::arg("num_recv_rows"), py::arg("signature"),
          py::arg("timeout_s"), py::arg("stream"))
      .def(
          "combine",
          [](IpcBuffer& b, std::uintptr_t x, std::uintptr_t topk_weights, std::uintptr_t bias0, std::uintptr_t bias1,
             int num_tokens, int hidden, int num_topk, std::uintptr_t is_token_in_rank, std::uintptr_t channel_pos,
             std::uintptr_t send_count, std::uintptr_t recv_start, int num_channels, int num_slots,
             std::uintptr_t combined_x, std::uintptr_t combined_topk_weights, std::uint32_t signature, double timeout_s,
             std::uintptr_t stream) {
            b.activate();
            in::CombineArgs args{};
            args.x = ptr<const void>(x);
            args.topk_weights = ptr<const float>(topk_weights);
            args.bias0 = ptr<const void>(bias0);
            args.bias1 = ptr<const void>(bias1);
            args.num_tokens = num_tokens;
            args.hidden = hidden;
            args.num_topk = num_topk;
            args.is_token_in_rank = ptr<const bool>(is_token_in_rank);
            args.channel_pos = ptr<const int>(channel_pos);
            args.send_count = ptr<const int>(send_count);
            args.recv_start = ptr<const int>(recv_start);
            args.num_channels = num_channels;
            args.num_slots = num_slots;
            args.combined_x = ptr<void>(combined_x);
            args.combined_topk_weights = ptr<float>(combined_topk_weights);
            args.signature = signature;
            in::launch_combine(b.context(timeout_s), args, stream_of(stream));
            b.check_error();  // after the launch: see the comment at the top
          },
          py::arg("x"), py::arg("topk_weights"), py::arg("bias0"), py::arg("bias1"), py::arg("num_tokens"),
          py::arg("hidden"), py::arg("num_topk"), py::arg("is_token_in_rank"), py::arg("channel_pos"),
          py::arg("send_count"), py::arg("recv_start"), py::arg("num_channels"), py::arg("num_slots"),
          py::arg("combined_x"), py::arg("combined_topk_weights"), py::arg("signature"), py::arg("timeout_s"),
          py::arg("stream"));
}
