// Runtime-level bindings: versions, device queries, error translation, the error slot.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#if __has_include(<non_abi/nvshmem_version.h>)
#include <non_abi/nvshmem_version.h>
#endif

#include "bindings/registry.hpp"
#include "runtime/device.hpp"
#include "runtime/error_slot.hpp"
#include "runtime/errors.hpp"

#ifndef EP_COMM_VERSION
#define EP_COMM_VERSION "unknown"  // setup.py defines it from ep_comm/version.py
#endif
#ifndef EP_COMM_CUDA_ARCHS
#define EP_COMM_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace {

std::string nvshmem_header_version() {
#ifdef NVSHMEM_VENDOR_MAJOR_VERSION
  return std::to_string(NVSHMEM_VENDOR_MAJOR_VERSION) + "." +
         std::to_string(NVSHMEM_VENDOR_MINOR_VERSION) + "." +
         std::to_string(NVSHMEM_VENDOR_PATCH_VERSION);
#else
  return "unknown";
#endif
}

py::dict slot_to_dict(const ep_comm::ErrorSlot& s) {
  py::dict d;
  d["code"] = s.code;
  d["rank"] = s.rank;
  d["phase"] = s.phase;
  d["phase_name"] = ep_comm::phase_name(s.phase);
  d["peer"] = s.peer;
  d["detail"] = s.detail;
  return d;
}

}  // namespace

void register_runtime(py::module_& m) {
  m.def("version", [] { return std::string(EP_COMM_VERSION); },
        "ep_comm version this extension was built from.");
  m.def("cuda_runtime_version", [] { return CUDART_VERSION; },
        "CUDART_VERSION the extension was compiled against, e.g. 13000.");
  m.def("nvshmem_version", &nvshmem_header_version,
        "NVSHMEM header version (major.minor.patch) the extension was compiled against.");
  m.def("build_info", [] {
    py::dict d;
    d["version"] = EP_COMM_VERSION;
    d["cuda_runtime_version"] = CUDART_VERSION;
    d["nvshmem_version"] = nvshmem_header_version();
    d["cuda_archs"] = EP_COMM_CUDA_ARCHS;
    return d;
  });

  m.def("device_count", &ep_comm::device_count,
        "Visible CUDA devices; 0 when there is no driver or no device.");
  m.def("current_device", &ep_comm::current_device);
  m.def(
      "get_device_properties",
      [](int device) {
        const ep_comm::DeviceProperties p = ep_comm::get_device_properties(device);
        py::dict d;
        d["name"] = p.name;
        d["num_sms"] = p.num_sms;
        d["major"] = p.major;
        d["minor"] = p.minor;
        d["total_memory"] = p.total_memory;
        d["max_shared_memory_per_block_optin"] = p.max_shared_memory_per_block_optin;
        d["pci_bus_id"] = p.pci_bus_id;
        d["pci_device_id"] = p.pci_device_id;
        return d;
      },
      py::arg("device"), "Properties of one device; raises RuntimeError without a device.");

  // Tests use these to check that statuses become readable Python errors.
  m.def(
      "check_cuda_status",
      [](int status) {
        if (status != 0)
          ep_comm::detail::throw_cuda_error(status, "check_cuda_status", __FILE__, __LINE__);
      },
      py::arg("status"), "Raise RuntimeError for a nonzero cudaError_t value.");
  m.def(
      "check_nvshmem_status",
      [](int status) {
        if (status != 0)
          ep_comm::detail::throw_nvshmem_error(status, "check_nvshmem_status", __FILE__, __LINE__);
      },
      py::arg("status"), "Raise RuntimeError for a nonzero NVSHMEM status.");

  // Error slot: phases, codes, the message, and the host-mapped slot itself.
  m.def("phase_name", &ep_comm::phase_name, py::arg("phase"));
  m.def(
      "describe_device_error",
      [](int code, int rank, int phase, int peer, long long detail) {
        return ep_comm::describe_error(ep_comm::ErrorSlot{code, rank, phase, peer, detail});
      },
      py::arg("code"), py::arg("rank"), py::arg("phase"), py::arg("peer"),
      py::arg("detail") = 0, "The message ErrorSlot.check() raises for these fields.");
  py::dict phases;
  for (int p = 0; p < ep_comm::kPhaseCount; ++p) phases[py::int_(p)] = ep_comm::phase_name(p);
  m.attr("PHASES") = phases;
  m.attr("ERROR_TIMEOUT") = static_cast<int>(ep_comm::kErrorTimeout);
  m.attr("ERROR_INVALID_INPUT") = static_cast<int>(ep_comm::kErrorInvalidInput);

  // module_local: ep_comm._C and ep_comm._C_emu both bind this C++ type, each for itself.
  py::class_<ep_comm::ErrorSlotHost>(m, "ErrorSlot", "Host-mapped slot where kernels record their first error.",
                                     py::module_local())
      .def(py::init<>())
      .def_property_readonly("device_ptr",
                             [](const ep_comm::ErrorSlotHost& s) {
                               return reinterpret_cast<std::uintptr_t>(s.device_ptr());
                             })
      .def("has_error", &ep_comm::ErrorSlotHost::has_error)
      .def("snapshot", [](const ep_comm::ErrorSlotHost& s) { return slot_to_dict(s.snapshot()); })
      .def("check", &ep_comm::ErrorSlotHost::check_and_throw,
           "Raise RuntimeError if a kernel recorded an error.")
      .def("reset", &ep_comm::ErrorSlotHost::reset)
      .def(
          "_write_for_test",
          [](ep_comm::ErrorSlotHost& s, int code, int rank, int phase, int peer, long long detail) {
            ep_comm::ErrorSlot* h = s.host_ptr();
            h->rank = rank;
            h->phase = phase;
            h->peer = peer;
            h->detail = detail;
            __atomic_store_n(&h->code, code, __ATOMIC_RELEASE);
          },
          py::arg("code"), py::arg("rank"), py::arg("phase"), py::arg("peer"),
          py::arg("detail") = 0);
}
