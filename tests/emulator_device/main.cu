// The cases' entry point: `emulator_device_cases <case> [args]`, `emulator_device_cases --list`.
#include "harness.hpp"

std::map<std::string, emu_test::CaseFn>& emu_test::registry() {
  static std::map<std::string, CaseFn> cases;
  return cases;
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  auto& cases = emu_test::registry();
  if (argc < 2 || std::strcmp(argv[1], "--list") == 0) {
    for (const auto& [name, fn] : cases) std::printf("%s\n", name.c_str());
    return argc < 2 ? 2 : 0;
  }
  auto it = cases.find(argv[1]);
  if (it == cases.end()) {
    std::printf("unknown case %s\n", argv[1]);
    return 2;
  }
  const int rc = it->second(argc - 1, argv + 1);
  if (rc == 0) std::printf("PASS\n");
  std::fflush(stdout);
  return rc;
}
