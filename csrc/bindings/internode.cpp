// Bindings of the internode mode: buffer sizing (the one layout function, for Config and tests),
// the per-Buffer runtime and its three launchers. Pointers and streams travel as Python ints.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "bindings/registry.hpp"
#include "kernels/common/internode_launch.cuh"
#include "kernels/common/internode_layout.cuh"
#include "runtime/internode_runtime.hpp"

namespace py = pybind11;

namespace {

using ep_comm::InternodeRuntime;
namespace in = ep_comm::internode;

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// ranks_per_node 0: EP_COMM_RANKS_PER_NODE when set, else min(8, num_ranks) (Config's hints know no group).
int resolve_ranks_per_node(int num_ranks, int ranks_per_node) {
  if (ranks_per_node > 0) return ranks_per_node;
  const char* env = std::getenv("EP_COMM_RANKS_PER_NODE");
  if (env != nullptr && *env != '\0') return std::atoi(env);
  return num_ranks < 8 ? num_ranks : 8;
}

void check_sizes(int64_t hidden_bytes, int num_ranks, int ranks_per_node, int num_channels, int ring_tokens) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("internode_rdma_buffer_bytes: " + what); };
  if (hidden_bytes <= 0 || hidden_bytes % 16 != 0)
    fail("hidden_bytes must be a positive multiple of 16, got " + std::to_string(hidden_bytes));
  if (num_ranks <= 0) fail("num_ranks must be positive, got " + std::to_string(num_ranks));
  if (ranks_per_node <= 0 || num_ranks % ranks_per_node != 0)
    fail("ranks_per_node (" + std::to_string(ranks_per_node) + ") must divide num_ranks (" + std::to_string(num_ranks) + ")");
  if (ranks_per_node > in::kMaxLocalRanks)
    fail("at most " + std::to_string(in::kMaxLocalRanks) + " ranks per node, got " + std::to_string(ranks_per_node));
  if (num_channels <= 0 || num_channels > in::kMaxChannels)
    fail("num_channels must be in 1.." + std::to_string(in::kMaxChannels) + ", got " + std::to_string(num_channels));
  if (ring_tokens <= 0 || ring_tokens > in::kMaxRdmaRingTokens)
    fail("num_max_rdma_chunked_recv_tokens must be in 1.." + std::to_string(in::kMaxRdmaRingTokens) + ", got " +
         std::to_string(ring_tokens));
}

py::dict layout_dict(const in::Layout& l) {
  py::dict d;
  d["num_ranks"] = l.num_ranks;
  d["ranks_per_node"] = l.ranks_per_node;
  d["num_nodes"] = l.num_nodes;
  d["num_channels"] = l.num_channels;
  d["rdma_ring_bytes"] = l.rdma_ring_bytes;
  d["nvl_ring_bytes"] = l.nvl_ring_bytes;
  d["notify_recv_begin"] = l.notify_recv_begin();
  d["rdma_arrival_begin"] = l.rdma_arrival_begin();
  d["ring_slots"] = l.ring_slots;
  d["nvl_tail_begin"] = l.nvl_tail_begin();
  d["rdma_send_begin"] = l.rdma_send_begin();
  d["rdma_recv_begin"] = l.rdma_recv_begin();
  d["nvl_ring_begin"] = l.nvl_ring_begin();
  d["total_bytes"] = l.total_bytes();
  return d;
}

}  // namespace

void register_internode(py::module_& m) {
  m.def(
      "internode_rdma_buffer_bytes",
      [](int64_t hidden_bytes, int num_ranks, int num_channels, int ring_tokens, int ranks_per_node) -> int64_t {
        ranks_per_node = resolve_ranks_per_node(num_ranks, ranks_per_node);
        if (ranks_per_node > 0 && num_ranks % ranks_per_node == 0 && num_ranks / ranks_per_node <= 1)
          return 0;  // one node: the intranode kernels run, no RDMA buffer needed
        check_sizes(hidden_bytes, num_ranks, ranks_per_node, num_channels, ring_tokens);
        return in::buffer_bytes(hidden_bytes, num_ranks, ranks_per_node, num_channels, ring_tokens);
      },
      py::arg("hidden_bytes"), py::arg("num_ranks"), py::arg("num_channels"),
      py::arg("num_max_rdma_chunked_recv_tokens"), py::arg("ranks_per_node") = 0,
      "Bytes of NVSHMEM symmetric buffer (num_rdma_bytes) the internode kernels need for rows of hidden_bytes "
      "(bf16 basis: 2 * hidden). ranks_per_node 0: EP_COMM_RANKS_PER_NODE, else min(8, num_ranks). 0 for one node.");
  m.def(
      "internode_layout",
      [](int64_t hidden_bytes, int num_ranks, int num_channels, int ring_tokens, int ranks_per_node) {
        check_sizes(hidden_bytes, num_ranks, ranks_per_node, num_channels, ring_tokens);
        return layout_dict(in::Layout(hidden_bytes, num_ranks, ranks_per_node, num_channels, ring_tokens));
      },
      py::arg("hidden_bytes"), py::arg("num_ranks"), py::arg("num_channels"),
      py::arg("num_max_rdma_chunked_recv_tokens"), py::arg("ranks_per_node"),
      "Offsets (bytes) of the regions of the internode buffer, as the kernels address them.");
  m.def(
      "internode_check_buffer",
      [](int64_t num_bytes, int64_t hidden_bytes, int num_ranks, int ranks_per_node, int num_channels,
         int ring_tokens) {
        return ep_comm::internode_checked_layout(num_bytes, hidden_bytes, num_ranks, ranks_per_node, num_channels,
                                                 ring_tokens)
            .total_bytes();
      },
      py::arg("num_bytes"), py::arg("hidden_bytes"), py::arg("num_ranks"), py::arg("ranks_per_node"),
      py::arg("num_channels"), py::arg("ring_tokens"),
      "The check every internode call runs before launching: bytes needed, or RuntimeError naming them.");
  m.attr("INTERNODE_MAX_LOCAL_RANKS") = in::kMaxLocalRanks;
  m.attr("INTERNODE_MAX_CHANNELS") = in::kMaxChannels;
  m.attr("INTERNODE_MAX_LOCAL_EXPERTS") = in::kMaxLocalExperts;
  m.attr("INTERNODE_MAX_TOPK") = in::kMaxTopk;

  // module_local: ep_comm._C and ep_comm._C_emu both bind this C++ type, each for itself.
  py::class_<InternodeRuntime>(m, "InternodeRuntime",
                               "NVSHMEM symmetric buffer and error slot of one internode Buffer.",
                               py::module_local())
      .def(py::init<int64_t, int, int, int, double>(), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
           py::arg("ranks_per_node"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("destroy", &InternodeRuntime::destroy, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("destroyed", &InternodeRuntime::destroyed)
      .def_property_readonly("buffer_ptr", &InternodeRuntime::buffer_ptr)
      .def_property_readonly("num_bytes", &InternodeRuntime::num_bytes)
      .def_property_readonly("timeout_ns", &InternodeRuntime::timeout_ns)
      .def("local_peers_mapped", &InternodeRuntime::local_peers_mapped)
      .def("has_error", &InternodeRuntime::has_error)
      .def("check_error", &InternodeRuntime::check_error)
      .def(
          "required_bytes",
          [](const InternodeRuntime& rt, int64_t hidden_bytes, int num_channels, int ring_tokens) {
            return rt.layout(hidden_bytes, num_channels, ring_tokens).total_bytes();
          },
          py::arg("hidden_bytes"), py::arg("num_channels"), py::arg("ring_tokens"),
          "Bytes this call needs; raises RuntimeError naming them when the buffer is smaller.")
      .def(
          "notify",
          [](InternodeRuntime& rt, int64_t hidden_bytes, int num_channels, int ring_tokens,
             int row_ints, uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_expert, int num_tokens,
             int num_local_experts, uintptr_t rank_matrix, uintptr_t recv_info, uintptr_t stream,
             uint32_t signature) {
            in::NotifyArgs a{};
            a.signature = signature;
            a.row_ints = row_ints;
            a.num_tokens_per_rank = as_ptr<const int>(num_tokens_per_rank);
            a.num_tokens_per_expert = as_ptr<const int>(num_tokens_per_expert);
            a.num_tokens = num_tokens;
            a.num_local_experts = num_local_experts;
            a.rank_matrix = as_ptr<int>(rank_matrix);
            a.recv_info = as_ptr<int>(recv_info);
            rt.notify(hidden_bytes, num_channels, ring_tokens, a, as_stream(stream));
          },
          py::arg("hidden_bytes"), py::arg("num_channels"), py::arg("ring_tokens"),
          py::arg("row_ints"), py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_expert"), py::arg("num_tokens"),
          py::arg("num_local_experts"), py::arg("rank_matrix"), py::arg("recv_info"), py::arg("stream"),
          py::arg("signature") = 0u,
          "Count exchange and barrier; `signature` (uint32) digests the call's layout and must match on "
          "every rank, or every rank records an invalid-input error in notify.")
      .def(
          "dispatch",
          [](InternodeRuntime& rt, int64_t hidden_bytes_layout, int num_channels, int ring_tokens,
             uintptr_t x, int64_t hidden_bytes, uintptr_t x_scales, int num_scales, int64_t scale_token_stride,
             int64_t scale_hidden_stride, uintptr_t topk_idx, uintptr_t topk_weights, int num_topk,
             uintptr_t is_token_in_rank, uintptr_t token_rank_cumsum, uintptr_t rank_matrix, int num_tokens,
             int num_local_experts, uintptr_t recv_x, uintptr_t recv_x_scales, uintptr_t recv_topk_idx,
             uintptr_t recv_topk_weights, uintptr_t recv_src_token, int num_recv_rows, int rdma_chunk, int nvl_chunk,
             uintptr_t stream) {
            in::DispatchArgs a{};
            a.x = as_ptr<const void>(x);
            a.hidden_bytes = hidden_bytes;
            a.x_scales = as_ptr<const float>(x_scales);
            a.num_scales = num_scales;
            a.scale_token_stride = scale_token_stride;
            a.scale_hidden_stride = scale_hidden_stride;
            a.topk_idx = as_ptr<const int64_t>(topk_idx);
            a.topk_weights = as_ptr<const float>(topk_weights);
            a.num_topk = num_topk;
            a.is_token_in_rank = as_ptr<const bool>(is_token_in_rank);
            a.token_rank_cumsum = as_ptr<const int>(token_rank_cumsum);
            a.rank_matrix = as_ptr<const int>(rank_matrix);
            a.num_tokens = num_tokens;
            a.num_local_experts = num_local_experts;
            a.recv_x = as_ptr<void>(recv_x);
            a.recv_x_scales = as_ptr<float>(recv_x_scales);
            a.recv_topk_idx = as_ptr<int64_t>(recv_topk_idx);
            a.recv_topk_weights = as_ptr<float>(recv_topk_weights);
            a.recv_src_token = as_ptr<int>(recv_src_token);
            a.num_recv_rows = num_recv_rows;
            a.rdma_chunk = rdma_chunk;
            a.nvl_chunk = nvl_chunk;
            if (num_topk > in::kMaxTopk)
              throw std::invalid_argument("internode dispatch supports top-k up to " + std::to_string(in::kMaxTopk) +
                                          ", got " + std::to_string(num_topk));
            rt.dispatch(hidden_bytes_layout, num_channels, ring_tokens, a, as_stream(stream));
          },
          py::arg("layout_hidden_bytes"), py::arg("num_channels"), py::arg("ring_tokens"),
          py::arg("x"), py::arg("hidden_bytes"), py::arg("x_scales"), py::arg("num_scales"),
          py::arg("scale_token_stride"), py::arg("scale_hidden_stride"), py::arg("topk_idx"), py::arg("topk_weights"),
          py::arg("num_topk"), py::arg("is_token_in_rank"), py::arg("token_rank_cumsum"), py::arg("rank_matrix"),
          py::arg("num_tokens"), py::arg("num_local_experts"), py::arg("recv_x"), py::arg("recv_x_scales"),
          py::arg("recv_topk_idx"), py::arg("recv_topk_weights"), py::arg("recv_src_token"), py::arg("num_recv_rows"),
          py::arg("rdma_chunk"), py::arg("nvl_chunk"), py::arg("stream"))
      .def(
          "combine",
          [](InternodeRuntime& rt, int64_t hidden_bytes_layout, int num_channels, int ring_tokens,
             uintptr_t x, uintptr_t topk_weights, int num_topk, int hidden, uintptr_t rank_matrix,
             uintptr_t recv_src_token, int num_recv_rows, uintptr_t is_token_in_rank, int num_tokens,
             uintptr_t bias0, uintptr_t bias1, uintptr_t out, uintptr_t out_weights, int rdma_chunk, int nvl_chunk,
             uintptr_t stream, bool float_partials) {
            in::CombineArgs a{};
            a.x = as_ptr<const void>(x);
            a.topk_weights = as_ptr<const float>(topk_weights);
            a.num_topk = num_topk;
            a.hidden = hidden;
            a.rank_matrix = as_ptr<const int>(rank_matrix);
            a.recv_src_token = as_ptr<const int>(recv_src_token);
            a.num_recv_rows = num_recv_rows;
            a.is_token_in_rank = as_ptr<const bool>(is_token_in_rank);
            a.num_tokens = num_tokens;
            a.bias0 = as_ptr<const void>(bias0);
            a.bias1 = as_ptr<const void>(bias1);
            a.out = as_ptr<void>(out);
            a.out_weights = as_ptr<float>(out_weights);
            a.rdma_chunk = rdma_chunk;
            a.nvl_chunk = nvl_chunk;
            a.float_partials = float_partials;
            if (num_topk > in::kMaxTopk)
              throw std::invalid_argument("internode combine supports top-k up to " + std::to_string(in::kMaxTopk) +
                                          ", got " + std::to_string(num_topk));
            if (hidden % 8 != 0)
              throw std::invalid_argument("internode combine needs hidden % 8 == 0, got " + std::to_string(hidden));
            rt.combine(hidden_bytes_layout, num_channels, ring_tokens, a, as_stream(stream));
          },
          py::arg("layout_hidden_bytes"), py::arg("num_channels"), py::arg("ring_tokens"),
          py::arg("x"), py::arg("topk_weights"), py::arg("num_topk"), py::arg("hidden"), py::arg("rank_matrix"),
          py::arg("recv_src_token"), py::arg("num_recv_rows"), py::arg("is_token_in_rank"), py::arg("num_tokens"),
          py::arg("bias0"),
          py::arg("bias1"), py::arg("out"), py::arg("out_weights"), py::arg("rdma_chunk"), py::arg("nvl_chunk"),
          py::arg("stream"), py::arg("float_partials") = false,
          "float_partials: node partials cross the network as float32 (default bf16, half the bytes).");
}
