// graphopt kernel runner: loads a compiled TIR kernel library (kernel.so), calls one function on
// deterministic synthetic tensors, for instruction counting under qemu-user (an ARM performance
// PROXY: instructions, not time).
//
// usage: kernel_runner KERNEL.so FUNC REPEAT DTYPE:D0,D1,... [DTYPE:SHAPE ...]
//   calls FUNC once (warm-up) and then REPEAT times; REPEAT 0 (warm-up only) is the baseline of
//   differential counting. Single-threaded (TVM_NUM_THREADS=1).
// exit codes: 0 ok, 2 usage, 4 load error, 5 call error.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
    if (!t->data) { std::fprintf(stderr, "out of memory\n"); std::exit(4); }
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// Small deterministic values: floats in [-1, 1), integers in [-8, 8) (unsigned: [0, 16)).
void Fill(DLTensor* t) {
  size_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= static_cast<size_t>(t->shape[i]);
  unsigned state = 12345u;
  for (size_t i = 0; i < n; ++i) {
    state = state * 1103515245u + 12345u;
    int v = static_cast<int>((state >> 16) & 15u);
    char* p = static_cast<char*>(t->data) + i * (t->dtype.bits / 8);
    if (t->dtype.code == kDLFloat && t->dtype.bits == 32) {
      *reinterpret_cast<float*>(p) = (v - 8) / 8.0f;
    } else if (t->dtype.code == kDLFloat && t->dtype.bits == 64) {
      *reinterpret_cast<double*>(p) = (v - 8) / 8.0;
    } else {  // integers, little-endian: the low bytes of a small value
      long long s = (t->dtype.code == kDLInt) ? v - 8 : v;
      size_t bytes = t->dtype.bits / 8 ? t->dtype.bits / 8 : 1;
      std::memcpy(p, &s, bytes <= sizeof s ? bytes : sizeof s);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: kernel_runner KERNEL.so FUNC REPEAT DTYPE:SHAPE...\n");
    return 2;
  }
  setenv("TVM_NUM_THREADS", "1", 1);
  long repeat = std::strtol(argv[3], nullptr, 10);
  std::vector<ffi::Tensor> tensors;
  try {
    DLDevice cpu{kDLCPU, 0};
    for (int i = 4; i < argc; ++i) {
      std::string a = argv[i];
      size_t colon = a.find(':');
      if (colon == std::string::npos) { std::fprintf(stderr, "bad tensor spec %s\n", argv[i]); return 2; }
      std::vector<int64_t> shape;
      std::string dims = a.substr(colon + 1);
      for (size_t pos = 0; pos < dims.size();) {
        size_t comma = dims.find(',', pos);
        if (comma == std::string::npos) comma = dims.size();
        shape.push_back(std::strtoll(dims.substr(pos, comma - pos).c_str(), nullptr, 10));
        pos = comma + 1;
      }
      ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape),
                                               ffi::StringToDLDataType(a.substr(0, colon)), cpu);
      Fill(const_cast<DLTensor*>(t.GetDLTensorPtr()));  // freshly allocated, not shared
      tensors.push_back(t);
    }
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "bad tensor spec: %s\n", e.what());
    return 2;
  }
  ffi::Function fn;
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    auto f = lib->GetFunction(argv[2]);
    if (!f.has_value()) { std::fprintf(stderr, "no function %s in %s\n", argv[2], argv[1]); return 4; }
    fn = *f;
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "load error: %s\n", e.what());
    return 4;
  }
  std::vector<ffi::AnyView> args(tensors.begin(), tensors.end());
  ffi::Any rv;
  try {
    for (long r = 0; r <= repeat; ++r) fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &rv);
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "call error: %s\n", e.what());
    return 5;
  }
  std::printf("ok calls=%ld\n", repeat + 1);
  return 0;
}
