// Where everything lives in one rank's NVLink buffer, for the intranode (CUDA IPC) kernels.
//
// This is the ONLY place that computes offsets into the buffer: the host sizes the buffer and
// checks a call fits with these functions, and the kernels address queues, counters and payload
// slots with the same functions, so the two cannot disagree. It compiles as plain C++ too (g++
// for the bindings, tests of the sizes run on CPU through _C).
//
// One rank's buffer (all offsets in bytes from its base, every region 128-byte aligned):
//
//   local state   epoch (u64), finished-block count (u32), failed flag (u64, tagged)  this rank only
//                 abort[2] u64 [epoch parity]: (epoch << 32) | who failed in that call, and how
//                 (pack_abort), written by any rank (this one too) whose kernel of that epoch
//                 recorded a timeout; every wait of every rank polls its own word (tagged)
//   started[2][R] u64 [epoch parity][peer p]: (epoch << 32) | p's call signature, written by p
//                 when its kernel of that epoch starts (tagged)
//   notify        u64 [R src][kMaxChannels] tokens src sends me in channel c     (tagged)
//                 u64 [R src][kMaxLocalExperts] src's tokens for my local expert e (tagged)
//                 u64 [R src]              reserved (was notify's signature; signatures now
//                                          travel in `started`, checked by every kernel)
//   ring tails    u64 [R writer][kMaxChannels] slots `writer` has filled in ring (writer -> me, c)
//   ring heads    u64 [R reader][kMaxChannels] slots `reader` has drained from ring (me -> reader, c)
//   ring slots    [R writer][C][num_slots][slot_bytes]   payload of ring (writer -> me, c)
//
// Every control word (everything before the ring slots) has a fixed address for the buffer's life:
// the per-channel regions are sized and indexed by kMaxChannels, not by the call's channel count.
// Otherwise a call with more channels than the previous one would move its tails/heads (and the
// signature) onto bytes the previous call left in its ring slots, and a payload word whose upper
// half happens to equal the current epoch (e.g. a pair of small local expert ids) would read as a
// valid tagged counter.
//
// A ring lives in its READER's buffer (the writer stores into it through the peer pointer),
// its tail next to it; its head lives in the WRITER's buffer (the reader stores it remotely), so
// every spin-wait polls local memory. "Tagged" words hold (epoch << 32) | value: a word from an
// older kernel carries an older epoch and reads as "nothing yet", so nothing is ever reset.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EP_HOST_DEVICE inline
#endif

namespace ep_comm {
namespace intranode {

constexpr int kMaxRanks = 8;            // one NVLink domain; masks and shared arrays use it
constexpr int kMaxChannels = 128;       // num_sms / 2 (notify keeps [R][C] in shared memory)
constexpr int kMaxLocalExperts = 1024;  // notify reserves this many per-expert words per source
constexpr int kMaxTopk = 32;
constexpr int kScaleBlock = 128;        // FP8 channels per float32 scale
constexpr int64_t kRegionAlign = 128;
constexpr int64_t kVectorBytes = 16;    // payload moves in 16-byte vectors

EP_HOST_DEVICE int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Contiguous split of `num_tokens` into `num_channels` ranges; channel c owns [begin, end).
// Tokens of one source reach a receiver channel by channel, so this split fixes the row order.
EP_HOST_DEVICE void channel_token_range(int num_tokens, int num_channels, int channel, int& begin,
                                        int& end) {
  const int per_channel = (num_tokens + num_channels - 1) / num_channels;
  begin = per_channel * channel < num_tokens ? per_channel * channel : num_tokens;
  end = begin + per_channel < num_tokens ? begin + per_channel : num_tokens;
}

// One dispatch ring slot: [hidden payload][float32 scales][int32 local expert ids][float32 weights]
// Expert ids travel already translated to the receiver's local ids (-1 elsewhere), weights already
// zeroed where the id is -1, so the receiver only copies.
struct DispatchSlot {
  int64_t hidden_bytes;
  int num_scales;
  int num_topk;
  EP_HOST_DEVICE DispatchSlot(int64_t hidden_bytes_, int num_scales_, int num_topk_)
      : hidden_bytes(hidden_bytes_), num_scales(num_scales_), num_topk(num_topk_) {}
  EP_HOST_DEVICE int64_t scales_offset() const { return align_up(hidden_bytes, kVectorBytes); }
  EP_HOST_DEVICE int64_t topk_idx_offset() const {
    return scales_offset() + align_up(int64_t(num_scales) * 4, kVectorBytes);
  }
  EP_HOST_DEVICE int64_t topk_weights_offset() const {
    return topk_idx_offset() + align_up(int64_t(num_topk) * 4, kVectorBytes);
  }
  EP_HOST_DEVICE int64_t bytes() const {
    return topk_weights_offset() + align_up(int64_t(num_topk) * 4, kVectorBytes);
  }
};

// One combine ring slot: [bf16 hidden payload][float32 top-k weights]
struct CombineSlot {
  int64_t hidden_bytes;
  int num_topk;
  EP_HOST_DEVICE CombineSlot(int64_t hidden_bytes_, int num_topk_)
      : hidden_bytes(hidden_bytes_), num_topk(num_topk_) {}
  EP_HOST_DEVICE int64_t topk_weights_offset() const { return align_up(hidden_bytes, kVectorBytes); }
  EP_HOST_DEVICE int64_t bytes() const {
    return topk_weights_offset() + align_up(int64_t(num_topk) * 4, kVectorBytes);
  }
};

struct BufferLayout {
  int num_ranks;
  int num_channels;
  int num_slots;       // ring capacity in tokens (Config.num_max_nvl_chunked_recv_tokens)
  int64_t slot_bytes;  // bytes of one ring slot for this call (DispatchSlot / CombineSlot)

  EP_HOST_DEVICE BufferLayout(int num_ranks_, int num_channels_, int num_slots_, int64_t slot_bytes_)
      : num_ranks(num_ranks_), num_channels(num_channels_), num_slots(num_slots_),
        slot_bytes(align_up(slot_bytes_, kVectorBytes)) {}

  // -- region starts --------------------------------------------------------------------------
  EP_HOST_DEVICE int64_t local_state_begin() const { return 0; }
  EP_HOST_DEVICE int64_t started_begin() const { return local_state_begin() + kRegionAlign; }
  EP_HOST_DEVICE int64_t notify_channel_begin() const {
    return started_begin() + align_up(int64_t(2) * num_ranks * 8, kRegionAlign);
  }
  EP_HOST_DEVICE int64_t notify_expert_begin() const {
    return notify_channel_begin() + align_up(int64_t(num_ranks) * kMaxChannels * 8, kRegionAlign);
  }
  EP_HOST_DEVICE int64_t tail_begin() const {
    return notify_expert_begin() + align_up(int64_t(num_ranks) * kMaxLocalExperts * 8, kRegionAlign);
  }
  EP_HOST_DEVICE int64_t head_begin() const {
    return tail_begin() + align_up(int64_t(num_ranks) * kMaxChannels * 8, kRegionAlign);
  }
  EP_HOST_DEVICE int64_t slots_begin() const {
    return head_begin() + align_up(int64_t(num_ranks) * kMaxChannels * 8, kRegionAlign);
  }
  EP_HOST_DEVICE int64_t ring_bytes() const { return int64_t(num_slots) * slot_bytes; }
  EP_HOST_DEVICE int64_t total_bytes() const {
    return align_up(slots_begin() + int64_t(num_ranks) * num_channels * ring_bytes(), kRegionAlign);
  }

  // -- individual words and slots ---------------------------------------------------------------
  EP_HOST_DEVICE int64_t epoch_offset() const { return local_state_begin(); }
  EP_HOST_DEVICE int64_t finished_blocks_offset() const { return local_state_begin() + 8; }
  // u64, 0 until a kernel of this rank records its first error, then make_tagged(epoch of that
  // kernel, 1) for good (sticky, like the error slot, which the next kernel also reads before its
  // rendezvous, but the slot cannot say which kernel failed). The epoch tells an earlier call's failure
  // from one that a sibling block of the running kernel recorded a moment ago. Its address
  // depends on nothing (local_state_begin() is 0): code without a layout reaches it too.
  static EP_HOST_DEVICE int64_t failed_offset() { return 16; }
  // abort[epoch parity]: a healthy peer is at most one kernel ahead, so a failure in the next call
  // never overwrites the news of this one before it is read. Fixed address, like failed_offset().
  static EP_HOST_DEVICE int64_t abort_offset(uint64_t epoch) { return 24 + int64_t(epoch & 1) * 8; }
  // started[parity][peer]: a healthy peer can be at most one kernel ahead (its next rendezvous
  // needs my word of that next epoch), so the slot of this epoch's parity is not overwritten
  // before it is read (a failed peer may run ahead: see start_rendezvous).
  EP_HOST_DEVICE int64_t started_offset(uint64_t epoch, int peer) const {
    return started_begin() + (int64_t(epoch & 1) * num_ranks + peer) * 8;
  }
  EP_HOST_DEVICE int64_t notify_channel_offset(int src, int channel) const {
    return notify_channel_begin() + (int64_t(src) * kMaxChannels + channel) * 8;
  }
  EP_HOST_DEVICE int64_t notify_expert_offset(int src, int local_expert) const {
    return notify_expert_begin() + (int64_t(src) * kMaxLocalExperts + local_expert) * 8;
  }
  EP_HOST_DEVICE int64_t tail_offset(int writer, int channel) const {
    return tail_begin() + (int64_t(writer) * kMaxChannels + channel) * 8;
  }
  EP_HOST_DEVICE int64_t head_offset(int reader, int channel) const {
    return head_begin() + (int64_t(reader) * kMaxChannels + channel) * 8;
  }
  EP_HOST_DEVICE int64_t ring_offset(int writer, int channel) const {
    return slots_begin() + (int64_t(writer) * num_channels + channel) * ring_bytes();
  }
  // Position `position` of a ring (counted from 0 within one kernel) uses slot position % num_slots.
  EP_HOST_DEVICE int64_t slot_offset(int writer, int channel, int64_t position) const {
    return ring_offset(writer, channel) + (position % num_slots) * slot_bytes;
  }
};

// The slot any call with rows of up to `hidden_bytes` may need: a dispatch slot with FP8-style
// scales for hidden_bytes / 128 channels and kMaxTopk ids and weights, or a combine slot of the
// same hidden bytes. Callers size for bf16 rows (hidden * 2), which also covers FP8 dispatch.
EP_HOST_DEVICE int64_t max_slot_bytes(int64_t hidden_bytes) {
  const int64_t dispatch =
      DispatchSlot(hidden_bytes, int(hidden_bytes / kScaleBlock), kMaxTopk).bytes();
  const int64_t combine = CombineSlot(hidden_bytes, kMaxTopk).bytes();
  return dispatch > combine ? dispatch : combine;
}

// What Config.get_nvl_buffer_size_hint returns (through _C.intranode_buffer_bytes).
EP_HOST_DEVICE int64_t intranode_buffer_bytes(int64_t hidden_bytes, int num_ranks, int num_channels,
                                              int num_slots) {
  return BufferLayout(num_ranks, num_channels, num_slots, max_slot_bytes(hidden_bytes)).total_bytes();
}

// Tagged words: (epoch << 32) | value. The epoch is the per-rank kernel counter (identical on all
// ranks because every rank launches the same sequence of communication kernels).
EP_HOST_DEVICE uint64_t make_tagged(uint64_t epoch, uint32_t value) {
  return (epoch << 32) | uint64_t(value);
}
EP_HOST_DEVICE bool tag_matches(uint64_t word, uint64_t epoch) {
  return (word >> 32) == (epoch & 0xffffffffull);
}
// A counter from an older kernel counts as 0 for this one.
EP_HOST_DEVICE uint32_t tagged_count(uint64_t word, uint64_t epoch) {
  return tag_matches(word, epoch) ? uint32_t(word & 0xffffffffull) : 0u;
}

// The value of an abort word (and the detail of the error a peer records when it sees one): the
// rank whose kernel failed, the error code and phase it recorded, and the peer it was waiting for
// (-1: none). Bit 31 is set, so the value is never 0.
struct AbortInfo {
  int rank;
  int code;
  int phase;
  int peer;
};
EP_HOST_DEVICE uint32_t pack_abort(int rank, int code, int phase, int peer) {
  return 0x80000000u | (uint32_t(code & 0x7f) << 24) | (uint32_t(phase & 0xff) << 16) |
         (uint32_t((peer + 1) & 0xff) << 8) | uint32_t(rank & 0xff);
}
EP_HOST_DEVICE AbortInfo unpack_abort(uint32_t value) {
  AbortInfo info;
  info.rank = int(value & 0xffu);
  info.peer = int((value >> 8) & 0xffu) - 1;
  info.phase = int((value >> 16) & 0xffu);
  info.code = int((value >> 24) & 0x7fu);
  return info;
}

}  // namespace intranode
}  // namespace ep_comm
