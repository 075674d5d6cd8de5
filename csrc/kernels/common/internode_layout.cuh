// Where everything lives in one rank's internode buffer (NVSHMEM symmetric, num_rdma_bytes).
//
// The ONLY place that computes offsets into the buffer: the host sizes the buffer and checks that
// a call fits with these functions (also exposed as _C.internode_rdma_buffer_bytes), the kernels
// address rings, counters and slots with the same functions. Compiles as plain C++ too.
//
// Names: R ranks = N nodes x L local ranks; rank r = node * L + local. C channels (one block each).
// Every rank holds the same layout (symmetric heap), so a local offset is also the peer's offset.
//
//   notify_flag  u64 [2 parity][R src]            tag(epoch, call signature) of src's latest notify (SET by src)
//   notify_send  i32 [R dst][notify_ints]         my row for dst, staged for the put
//   notify_recv  i32 [2 parity][R src][notify_ints] src's row: [R counts][N_src][E_local counts]
//   rdma_done    u64 [N][kMaxChannels]            tag(epoch, total tokens) once the writer is done
//   rdma_head    u64 [2 parity][N][kMaxChannels]  slots the reader of MY ring consumed (ADD by the
//                                                 reader: two SETs may land in either order and the
//                                                 credit would go back); call e uses parity e & 1,
//                                                 and notify zeroes the other once every peer passed
//                                                 it (so call e - 1's adds have all landed)
//   nvl_tail     u64 [R][kMaxChannels]            tag(epoch, done bit | slots written)
//   nvl_head     u64 [R][kMaxChannels]            tag(epoch, slots consumed)
//   rdma_arrival u64 [N][C][rdma_ring_slots]      per slot where a put (or an in-place batch) of rdma_recv[n][c]
//                                                 starts: arrival_tag(epoch, lap, slots), SET with the
//                                                 put's own data; the reader walks them in ring order
//   rdma_send    [N][C][rdma_ring_bytes]          staging of the puts (NVSHMEM sources must be symmetric)
//   rdma_recv    [N][C][rdma_ring_bytes]          ring the peer node writes
//   nvl_ring     [R][C][nvl_ring_bytes]           ring a same-node peer writes through nvshmem_ptr
//
// Ring keys (dispatch / combine use the same regions, one call at a time):
//   dispatch RDMA  src s=(m,l) -> forwarder f=(n,l):  f.rdma_recv[m]  f.rdma_arrival[m]  f.rdma_done[m]
//                                                     s.rdma_send[n]  s.rdma_head[e & 1][n]
//   dispatch NVL   f=(n,lf) -> d=(n,ld), source s:    d.nvl_ring[s]   d.nvl_tail[s]   f.nvl_head[ld*N+m(s)]
//   combine NVL    d=(n,ld) -> f=(n,lf), source s:    f.nvl_ring[ld*N+m(s)]  f.nvl_tail[..]  d.nvl_head[s]
//   combine RDMA   f=(n,l) -> s=(m,l):                s.rdma_recv[n]  s.rdma_arrival[n]  f.rdma_send[m]
//                                                     f.rdma_head[e & 1][m]
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EP_IN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EP_IN_HOST_DEVICE inline
#endif

namespace ep_comm {
namespace internode {

constexpr int kMaxLocalRanks = 32;      // one lane per local rank in several warps
constexpr int kMaxChannels = 64;        // counter arrays are strided by this, whatever C is
constexpr int kMaxLocalExperts = 1024;  // per-expert counts travel in the notify row
constexpr int kMaxTopk = 32;            // sizing bound of the per-token metadata
constexpr int kScaleBlock = 128;        // FP8 channels per float32 scale
constexpr int64_t kAlign = 128;         // region alignment
constexpr int64_t kVec = 16;            // payloads move in 16-byte vectors

EP_IN_HOST_DEVICE int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Contiguous split of a source's tokens over channels; fixes which channel carries a token.
EP_IN_HOST_DEVICE void channel_token_range(int num_tokens, int num_channels, int channel, int& begin, int& end) {
  const int per = (num_tokens + num_channels - 1) / num_channels;
  const int b = per * channel;
  begin = b < num_tokens ? b : num_tokens;
  end = b + per < num_tokens ? b + per : num_tokens;
}

// Most slots one RDMA ring uses, whatever the slot size (rows of a call narrower than the Buffer's
// fit more): bounds the arrival words. A piece's slot count and lap share one 32-bit tag value.
EP_IN_HOST_DEVICE int rdma_ring_slots(int rdma_ring_tokens) { return 2 * rdma_ring_tokens; }
constexpr int kMaxRdmaRingTokens = 16384;

// Ring capacity of the NVL leg, in dispatch-sized slots, for a config's RDMA capacity.
EP_IN_HOST_DEVICE int nvl_ring_tokens(int rdma_ring_tokens) {
  const int t = rdma_ring_tokens / 8;
  return t < 2 ? 2 : (t > 32 ? 32 : t);
}

// One dispatch slot (both legs carry the same bytes; the forwarder copies it verbatim):
//   [i32 token][i32 dst_row[L]] [hidden payload] [f32 scales] [i32 global expert ids K] [f32 weights K]
// dst_row[l] is the row of recv_x at rank (node, l), or -1 when the token does not go there.
struct DispatchSlot {
  int64_t hidden_bytes;
  int num_scales, num_topk, ranks_per_node;
  EP_IN_HOST_DEVICE DispatchSlot(int64_t hb, int ns, int nk, int rpn)
      : hidden_bytes(hb), num_scales(ns), num_topk(nk), ranks_per_node(rpn) {}
  EP_IN_HOST_DEVICE int64_t header_bytes() const { return align_up(4 + 4 * int64_t(ranks_per_node), kVec); }
  EP_IN_HOST_DEVICE int64_t hidden_offset() const { return header_bytes(); }
  EP_IN_HOST_DEVICE int64_t scales_offset() const { return hidden_offset() + align_up(hidden_bytes, kVec); }
  EP_IN_HOST_DEVICE int64_t topk_idx_offset() const { return scales_offset() + align_up(4 * int64_t(num_scales), kVec); }
  EP_IN_HOST_DEVICE int64_t topk_weights_offset() const { return topk_idx_offset() + align_up(4 * int64_t(num_topk), kVec); }
  EP_IN_HOST_DEVICE int64_t bytes() const { return topk_weights_offset() + align_up(4 * int64_t(num_topk), kVec); }
};

// One combine slot: [i32 token, padding to 16][payload: bf16 (NVL leg) or f32 (RDMA leg) hidden][f32 weights K]
struct CombineSlot {
  int64_t payload_bytes;
  int num_topk;
  EP_IN_HOST_DEVICE CombineSlot(int64_t pb, int nk) : payload_bytes(pb), num_topk(nk) {}
  EP_IN_HOST_DEVICE int64_t payload_offset() const { return kVec; }
  EP_IN_HOST_DEVICE int64_t weights_offset() const { return payload_offset() + align_up(payload_bytes, kVec); }
  EP_IN_HOST_DEVICE int64_t bytes() const { return weights_offset() + align_up(4 * int64_t(num_topk), kVec); }
};

struct Layout {
  int num_ranks, ranks_per_node, num_nodes, num_channels, ring_slots;
  int64_t rdma_ring_bytes, nvl_ring_bytes;

  // hidden_bytes: bytes of a bf16 row (2 * hidden); ring_tokens: Config.num_max_rdma_chunked_recv_tokens.
  EP_IN_HOST_DEVICE Layout(int64_t hidden_bytes, int num_ranks_, int ranks_per_node_, int num_channels_,
                           int ring_tokens)
      : num_ranks(num_ranks_), ranks_per_node(ranks_per_node_), num_nodes(num_ranks_ / ranks_per_node_),
        num_channels(num_channels_), ring_slots(rdma_ring_slots(ring_tokens)) {
    // A slot bound for any call with rows of <= hidden_bytes: bf16 rows, or FP8 rows plus scales.
    const int max_scales = int((hidden_bytes / 2 + kScaleBlock - 1) / kScaleBlock);
    const int64_t slot = DispatchSlot(hidden_bytes, max_scales, kMaxTopk, ranks_per_node_).bytes();
    rdma_ring_bytes = align_up(int64_t(ring_tokens) * slot, kAlign);
    nvl_ring_bytes = align_up(int64_t(nvl_ring_tokens(ring_tokens)) * slot, kAlign);
  }

  EP_IN_HOST_DEVICE int notify_ints() const { return num_ranks + 1 + kMaxLocalExperts; }

  EP_IN_HOST_DEVICE int64_t notify_flag_begin() const { return 0; }
  EP_IN_HOST_DEVICE int64_t notify_send_begin() const {
    return notify_flag_begin() + align_up(2 * int64_t(num_ranks) * 8, kAlign);
  }
  EP_IN_HOST_DEVICE int64_t notify_recv_begin() const {
    return notify_send_begin() + align_up(int64_t(num_ranks) * notify_ints() * 4, kAlign);
  }
  // Counters sit at offsets that do not depend on the channel count or ring sizes (they are strided
  // by kMaxChannels): ADD counters left by a call with another config must not land elsewhere.
  EP_IN_HOST_DEVICE int64_t counters_bytes_per_node_array() const {
    return align_up(int64_t(num_nodes) * kMaxChannels * 8, kAlign);
  }
  EP_IN_HOST_DEVICE int64_t rdma_done_begin() const {
    return notify_recv_begin() + align_up(2 * int64_t(num_ranks) * notify_ints() * 4, kAlign);
  }
  EP_IN_HOST_DEVICE int64_t rdma_head_begin() const { return rdma_done_begin() + counters_bytes_per_node_array(); }
  EP_IN_HOST_DEVICE int64_t nvl_tail_begin() const { return rdma_head_begin() + 2 * counters_bytes_per_node_array(); }
  EP_IN_HOST_DEVICE int64_t nvl_head_begin() const {
    return nvl_tail_begin() + align_up(int64_t(num_ranks) * kMaxChannels * 8, kAlign);
  }
  // Tagged words: a word of another call (or config) reads as "nothing yet".
  EP_IN_HOST_DEVICE int64_t rdma_arrival_begin() const {
    return nvl_head_begin() + align_up(int64_t(num_ranks) * kMaxChannels * 8, kAlign);
  }
  EP_IN_HOST_DEVICE int64_t rdma_send_begin() const {
    return rdma_arrival_begin() + align_up(int64_t(num_nodes) * num_channels * ring_slots * 8, kAlign);
  }
  EP_IN_HOST_DEVICE int64_t rdma_recv_begin() const {
    return rdma_send_begin() + int64_t(num_nodes) * num_channels * rdma_ring_bytes;
  }
  EP_IN_HOST_DEVICE int64_t nvl_ring_begin() const {
    return rdma_recv_begin() + int64_t(num_nodes) * num_channels * rdma_ring_bytes;
  }
  EP_IN_HOST_DEVICE int64_t total_bytes() const {
    return nvl_ring_begin() + int64_t(num_ranks) * num_channels * nvl_ring_bytes;
  }

  // -- element addresses (byte offsets) ---------------------------------------------------------
  EP_IN_HOST_DEVICE int64_t notify_flag(int parity, int src) const {
    return notify_flag_begin() + (int64_t(parity) * num_ranks + src) * 8;
  }
  EP_IN_HOST_DEVICE int64_t notify_send(int dst) const {
    return notify_send_begin() + int64_t(dst) * notify_ints() * 4;
  }
  EP_IN_HOST_DEVICE int64_t notify_recv(int parity, int src) const {
    return notify_recv_begin() + (int64_t(parity) * num_ranks + src) * notify_ints() * 4;
  }
  // The arrival words of rdma_recv[node][channel], one per slot.
  EP_IN_HOST_DEVICE int64_t rdma_arrival(int node, int channel) const {
    return rdma_arrival_begin() + (int64_t(node) * num_channels + channel) * ring_slots * 8;
  }
  EP_IN_HOST_DEVICE int64_t rdma_done(int node, int channel) const {
    return rdma_done_begin() + (int64_t(node) * kMaxChannels + channel) * 8;
  }
  EP_IN_HOST_DEVICE int64_t rdma_head(int parity, int node, int channel) const {
    return rdma_head_begin() + parity * counters_bytes_per_node_array() + (int64_t(node) * kMaxChannels + channel) * 8;
  }
  EP_IN_HOST_DEVICE int64_t nvl_tail(int key, int channel) const {
    return nvl_tail_begin() + (int64_t(key) * kMaxChannels + channel) * 8;
  }
  EP_IN_HOST_DEVICE int64_t nvl_head(int key, int channel) const {
    return nvl_head_begin() + (int64_t(key) * kMaxChannels + channel) * 8;
  }
  EP_IN_HOST_DEVICE int64_t rdma_send(int node, int channel) const {
    return rdma_send_begin() + (int64_t(node) * num_channels + channel) * rdma_ring_bytes;
  }
  EP_IN_HOST_DEVICE int64_t rdma_recv(int node, int channel) const {
    return rdma_recv_begin() + (int64_t(node) * num_channels + channel) * rdma_ring_bytes;
  }
  EP_IN_HOST_DEVICE int64_t nvl_ring(int key, int channel) const {
    return nvl_ring_begin() + (int64_t(key) * num_channels + channel) * nvl_ring_bytes;
  }
  // Slots of a given size that fit one ring.
  EP_IN_HOST_DEVICE int rdma_capacity(int64_t slot_bytes) const {
    const int64_t fit = rdma_ring_bytes / slot_bytes;
    return int(fit < ring_slots ? fit : ring_slots);
  }
  EP_IN_HOST_DEVICE int nvl_capacity(int64_t slot_bytes) const { return int(nvl_ring_bytes / slot_bytes); }
};

// Tagged counter words: (epoch << 32) | value. A word from an older call reads as "nothing yet",
// so counters are never reset between calls (every call gets a fresh epoch from the host).
constexpr uint32_t kDoneBit = 0x80000000u;
EP_IN_HOST_DEVICE uint64_t make_tag(uint32_t epoch, uint32_t value) { return (uint64_t(epoch) << 32) | value; }
EP_IN_HOST_DEVICE uint32_t tag_epoch(uint64_t word) { return uint32_t(word >> 32); }
EP_IN_HOST_DEVICE uint32_t tag_value(uint64_t word) { return uint32_t(word & 0xffffffffu); }

// An arrival word: `slots` slots starting at ring position `position` (counted from the call's
// start) are delivered. The lap tells this call's successive visits of a slot apart.
EP_IN_HOST_DEVICE uint64_t arrival_tag(uint32_t epoch, int position, int capacity, int slots) {
  return make_tag(epoch, (uint32_t(position / capacity) & 0xffffu) << 16 | uint32_t(slots));
}
// Slots announced by an arrival word for `position`, or 0 when the word is from another call or lap.
EP_IN_HOST_DEVICE int arrival_slots(uint64_t word, uint32_t epoch, int position, int capacity) {
  const uint32_t value = tag_value(word);
  return tag_epoch(word) == epoch && (value >> 16) == (uint32_t(position / capacity) & 0xffffu) ? int(value & 0xffffu)
                                                                                               : 0;
}

// The bytes one Buffer needs for rows of `hidden_bytes` (bf16 basis), as _C.internode_rdma_buffer_bytes.
EP_IN_HOST_DEVICE int64_t buffer_bytes(int64_t hidden_bytes, int num_ranks, int ranks_per_node, int num_channels,
                                       int ring_tokens) {
  return Layout(hidden_bytes, num_ranks, ranks_per_node, num_channels, ring_tokens).total_bytes();
}

}  // namespace internode
}  // namespace ep_comm
