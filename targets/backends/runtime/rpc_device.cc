/*
 * rpc_device: serves one TVM RPC session on an already-connected socket, on the target.
 *
 *   rpc_device FD WORKDIR
 *
 * FD is a socket whose RPC handshake the host side (graphopt/targets/rpc.py) has completed;
 * WORKDIR receives uploaded files. Registers the two server functions the Python server defines
 * (tvm.rpc.server.workpath, tvm.rpc.server.load_module), then runs TVM's rpc.ServerLoop on FD
 * until the client closes the session. Linked with libtvm_runtime (RPC, time evaluator) and
 * libtvm_runtime_extra (random_fill_for_measure, used by MetaSchedule's RPCRunner).
 * Exit codes: 0 session ended, 2 usage error, 4 runtime lacks rpc.ServerLoop, 5 session error.
 */
#include <tvm/ffi/any.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace ffi = tvm::ffi;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s FD WORKDIR\n", argv[0]);
    return 2;
  }
  char* end = nullptr;
  long fd = std::strtol(argv[1], &end, 10);
  if (*end != '\0' || fd < 0) {
    std::fprintf(stderr, "rpc_device: FD must be a non-negative integer, got %s\n", argv[1]);
    return 2;
  }
  const std::string work = std::string(argv[2]) + "/";
  try {
    ffi::Function::SetGlobal(
        "tvm.rpc.server.workpath",
        ffi::Function::FromTyped([work](ffi::String path) { return ffi::String(work + std::string(path)); }),
        true);
    ffi::Function::SetGlobal(
        "tvm.rpc.server.load_module",
        ffi::Function::FromTyped([work](ffi::String name) { return ffi::Module::LoadFromFile(work + std::string(name)); }),
        true);
    auto loop = ffi::Function::GetGlobal("rpc.ServerLoop");
    if (!loop.has_value()) {
      std::fprintf(stderr, "rpc_device: this libtvm_runtime has no rpc.ServerLoop (built without RPC)\n");
      return 4;
    }
    (*loop)(static_cast<int64_t>(fd));
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "rpc_device: %s: %s\n", e.kind().c_str(), e.message().c_str());
    return 5;
  }
  return 0;
}
