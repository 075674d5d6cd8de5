// The emulated NVSHMEM (csrc/emulator/nvshmem.cpp): two PEs as threads of this process, each on
// its own device, calling the API from the host (the same entry points kernels use).
#include <nvshmem.h>
#include <nvshmemx.h>

#include <atomic>
#include <functional>
#include <thread>

#include "harness.hpp"

namespace {

constexpr int kPes = 2;

// Runs body(pe) on kPes threads, each an initialised PE on device `pe`; finalises after.
void run_pes(const std::function<void(int)>& body) {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  CHECK(nvshmemx_get_uniqueid(&id) == 0, "nvshmemx_get_uniqueid");
  std::vector<std::thread> threads;
  for (int pe = 0; pe < kPes; ++pe) {
    threads.emplace_back([&, pe] {
      CUDA_OK(cudaSetDevice(pe));
      nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
      CHECK(nvshmemx_set_attr_uniqueid_args(pe, kPes, &id, &attr) == 0, "set_attr");
      attr.args.cuda_device_id = pe;
      int provided = 0;
      CHECK(nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, {3, 0, 0}) ==
                0,
            "init of PE %d", pe);
      CHECK(nvshmem_my_pe() == pe && nvshmem_n_pes() == kPes, "PE numbering");
      CHECK(nvshmemx_init_status() == NVSHMEM_STATUS_IS_INITIALIZED, "init status");
      body(pe);
      nvshmem_finalize();
    });
  }
  for (auto& t : threads) t.join();
}

uint64_t load(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

// nvshmem_ptr maps every peer, or (NVSHMEM_DISABLE_P2P=1) only the PE's own heap; not symmetric
// memory maps to nothing.
EMU_CASE(nvshmem_ptr_modes) {
  const bool p2p = std::getenv("NVSHMEM_DISABLE_P2P") == nullptr;
  run_pes([&](int pe) {
    auto* buffer = static_cast<uint64_t*>(nvshmem_malloc(4096));
    CHECK(buffer != nullptr, "malloc");
    CHECK(nvshmem_ptr(buffer, pe) == buffer, "own PE maps to itself");
    void* peer = nvshmem_ptr(buffer, 1 - pe);
    CHECK((peer != nullptr) == p2p, "peer mapping %p with p2p=%d", peer, p2p);
    int local = 0;
    CHECK(nvshmem_ptr(&local, 1 - pe) == nullptr, "a stack address is not symmetric");
    if (p2p) {
      __atomic_store_n(static_cast<uint64_t*>(peer), 100 + pe, __ATOMIC_RELEASE);  // a store through the mapping
      nvshmem_barrier_all();
      CHECK(load(buffer) == static_cast<uint64_t>(100 + (1 - pe)), "the peer's store through nvshmem_ptr");
    }
    nvshmem_barrier_all();
    nvshmem_free(buffer);
  });
  std::printf("p2p %d\n", p2p);
  return 0;
}

// With background delivery off (EP_COMM_EMU_NVSHMEM_DELAY_US=-1): a put is still in flight after
// the call, reads its source when delivered (so the source's later contents arrive), and quiet
// completes it.
EMU_CASE(nvshmem_put_in_flight_until_quiet) {
  run_pes([&](int pe) {
    auto* dst = static_cast<uint64_t*>(nvshmem_malloc(64 * sizeof(uint64_t)));
    auto* src = static_cast<uint64_t*>(nvshmem_malloc(64 * sizeof(uint64_t)));
    for (int i = 0; i < 64; ++i) dst[i] = src[i] = 0;
    nvshmem_barrier_all();
    if (pe == 0) {
      for (int i = 0; i < 64; ++i) src[i] = 1;
      nvshmem_putmem_nbi(dst, src, 64 * sizeof(uint64_t), 1);
      for (int i = 0; i < 64; ++i) src[i] = 2;  // reused before the quiet: the new contents travel
      nvshmem_fence();  // without it the add may land first and the put overwrite it
      nvshmemx_signal_op(dst + 63, 7, NVSHMEM_SIGNAL_ADD, 1);
      std::printf("issued\n");
    }
    nvshmem_barrier_all();  // a barrier completes the caller's operations first
    if (pe == 1) {
      for (int i = 0; i < 63; ++i) CHECK(load(dst + i) == 2, "element %d is %llu after the barrier", i,
                                         static_cast<unsigned long long>(load(dst + i)));
      CHECK(load(dst + 63) == 9, "put, fence, signal-add: %llu", static_cast<unsigned long long>(load(dst + 63)));
    }
    nvshmem_barrier_all();
    nvshmem_free(src);
    nvshmem_free(dst);
  });
  return 0;
}

// Receiver-side view of ordering under background delivery: PE 0 puts a value and then sets a
// flag, `trials` times, with a fence between them, or with a put-with-signal, or with nothing;
// PE 1 waits for each flag and reads the value. Ordered variants must never show a stale value;
// the unordered one must show one at least once (the emulated network reorders).
EMU_CASE(nvshmem_ordering) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 300;
  int stale[3] = {0, 0, 0};
  const char* names[3] = {"fence", "put_signal", "none"};
  std::atomic<int> consumed{0};  // trials PE 1 has read: PE 0 issues one at a time, so none is drained early
  run_pes([&](int pe) {
    auto* data = static_cast<uint64_t*>(nvshmem_malloc(3 * trials * sizeof(uint64_t)));
    auto* flags = static_cast<uint64_t*>(nvshmem_malloc(3 * trials * sizeof(uint64_t)));
    auto* src = static_cast<uint64_t*>(nvshmem_malloc(3 * trials * sizeof(uint64_t)));
    for (int i = 0; i < 3 * trials; ++i) data[i] = flags[i] = 0, src[i] = 1000 + i;
    nvshmem_barrier_all();
    for (int mode = 0; mode < 3; ++mode) {
      for (int t = 0; t < trials; ++t) {
        const int i = mode * trials + t;
        if (pe == 0) {
          if (mode == 1) {
            nvshmem_putmem_signal_nbi(data + i, src + i, sizeof(uint64_t), flags + i, 1, NVSHMEM_SIGNAL_SET, 1);
          } else {
            nvshmem_putmem_nbi(data + i, src + i, sizeof(uint64_t), 1);
            if (mode == 0) nvshmem_fence();
            nvshmemx_signal_op(flags + i, 1, NVSHMEM_SIGNAL_SET, 1);
          }
          while (consumed.load() <= i) std::this_thread::yield();
        } else {
          while (load(flags + i) != 1) {
          }
          if (__atomic_load_n(data + i, __ATOMIC_RELAXED) != static_cast<uint64_t>(1000 + i)) ++stale[mode];
          consumed.store(i + 1);
        }
      }
      nvshmem_barrier_all();
    }
    nvshmem_free(src);
    nvshmem_free(flags);
    nvshmem_free(data);
  });
  for (int mode = 0; mode < 3; ++mode) std::printf("RESULT stale %s %d\n", names[mode], stale[mode]);
  CHECK(stale[0] == 0 && stale[1] == 0, "an ordered flag arrived before its data");
  CHECK(stale[2] > 0, "%d unordered puts never arrived after their flag: the network does not reorder", trials);
  return 0;
}

// A network put must read registered (symmetric) memory: a private source is a device fault.
EMU_CASE(nvshmem_private_source) {
  run_pes([&](int pe) {
    auto* dst = static_cast<uint64_t*>(nvshmem_malloc(4096));
    if (pe == 0) {
      static uint64_t private_source[8];
      nvshmem_putmem_nbi(dst, private_source, sizeof(private_source), 1);  // @tag private_source_put
    }
    nvshmem_barrier_all();
    nvshmem_free(dst);
  });
  CUDA_OK(cudaSetDevice(0));
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// nvshmem_malloc is collective with one size: PEs that disagree all get NULL (and a message).
EMU_CASE(nvshmem_asymmetric_malloc) {
  std::atomic<int> nulls{0};
  run_pes([&](int pe) {
    void* p = nvshmem_malloc(pe == 0 ? 4096 : 8192);
    if (p == nullptr) ++nulls;
    void* q = nvshmem_malloc(4096);  // the PEs stay in step afterwards
    CHECK(q != nullptr, "a symmetric malloc after a refused one");
    nvshmem_free(q);
  });
  CHECK(nulls == kPes, "%d of %d PEs got NULL from an asymmetric nvshmem_malloc", nulls.load(), kPes);
  return 0;
}

}  // namespace
