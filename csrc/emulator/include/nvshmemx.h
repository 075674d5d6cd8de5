// NVSHMEM's extended host API for the emulated device: unique-id initialisation and init status
// (see nvshmem.h for the model).
#pragma once

#include "nvshmem.h"

enum {
  NVSHMEMX_SUCCESS = 0,
  NVSHMEMX_ERROR_INVALID_VALUE = 1,
  NVSHMEMX_ERROR_OUT_OF_MEMORY = 2,
  NVSHMEMX_ERROR_NOT_SUPPORTED = 3,
  NVSHMEMX_ERROR_SYMMETRY = 4,
  NVSHMEMX_ERROR_GPU_NOT_SELECTED = 5,
  NVSHMEMX_ERROR_COLLECTIVE_LAUNCH_FAILED = 6,
  NVSHMEMX_ERROR_INTERNAL = 7,
};

enum {
  NVSHMEM_STATUS_NOT_INITIALIZED = 0,
  NVSHMEM_STATUS_IS_BOOTSTRAPPED,
  NVSHMEM_STATUS_IS_INITIALIZED,
  NVSHMEM_STATUS_LIMITED_MPG,
  NVSHMEM_STATUS_FULL_MPG,
};

enum { NVSHMEMX_INIT_WITH_UNIQUEID = 1 << 4 };

// What rank 0 creates and every PE passes to initialisation: where the bootstrap page is.
struct nvshmemx_uniqueid_t {
  char internal[128];
};
#define NVSHMEMX_UNIQUEID_INITIALIZER {}

struct nvshmemx_uniqueid_args_t {
  int myrank;
  int nranks;
  nvshmemx_uniqueid_t* id;
};

struct nvshmemx_init_args_t {
  int cuda_device_id;
  nvshmemx_uniqueid_args_t uid_args;
};

struct nvshmemx_init_attr_t {
  nvshmemx_init_args_t args;
};
#define NVSHMEMX_INIT_ATTR_INITIALIZER {{-1, {-1, -1, nullptr}}}

struct nvshmemi_version_t {
  int major;
  int minor;
  int patch;
};

int nvshmemx_get_uniqueid(nvshmemx_uniqueid_t* id);
int nvshmemx_set_attr_uniqueid_args(int rank, int nranks, const nvshmemx_uniqueid_t* id,
                                    nvshmemx_init_attr_t* attr);
// Returns 0 or an NVSHMEMX_ERROR_* after printing why; a failed initialisation leaves the status
// at NVSHMEM_STATUS_IS_BOOTSTRAPPED, as NVSHMEM's does.
int nvshmemi_init_thread(int requested, int* provided, unsigned int flags, nvshmemx_init_attr_t* attr,
                         nvshmemi_version_t version);
int nvshmemx_init_status();
