// graphopt runner: loads a Relax VM library (model.so), feeds raw input tensors to its entry
// function, and writes every output tensor as a raw little-endian file.
//
// usage: runner MODEL.so [options] [INPUT.bin ...]
//   --input PATH:DTYPE:SHAPE  one input (repeatable), e.g. x.bin:float32:1,3,32,32 (scalar: x.bin:int64:)
//   --manifest FILE           take input dtypes/shapes from FILE's "inputs" (graphopt manifest.json);
//                             the input files are then given positionally, in order
//   --out-dir DIR             where output_<i>.bin are written (default: .)
//   --repeat N                inferences to time (default 1); with 0 and no warm-up, only load the
//                             model and read the inputs (the baseline of differential instruction
//                             counting) and write no outputs
//   --warmup N                inferences run before the timed/counted ones (default 0)
//   --threads N               TVM worker threads (sets TVM_NUM_THREADS; default: TVM's choice)
//   --entry NAME              VM function to call (default: main)
// stdout, one line per output (nested tuples flattened depth-first), then a timing line:
//   output <i> dtype=<dtype> shape=<d0,d1,...> file=<path>
//   timing load_ms=<ms> run_ms=<ms, warm-up excluded> per_inference_ms=<ms> repeat=<N>
// exit codes: 0 ok, 2 usage, 3 input/output file, 4 model load, 5 inference, 6 unsupported output.
// Input files must hold exactly numel * itemsize bytes in C order; any other size is refused.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

enum Exit { kOk = 0, kUsage = 2, kFile = 3, kLoad = 4, kRun = 5, kOutput = 6 };

struct Failure {
  int code;
  std::string message;
};

[[noreturn]] void Fail(int code, const std::string& message) { throw Failure{code, message}; }

struct InputSpec {
  std::string path;
  DLDataType dtype;
  std::vector<int64_t> shape;
};

// TVM kernels assume 64-byte aligned buffers.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
    if (!t->data) Fail(kFile, "out of memory allocating an input tensor");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

DLDataType ParseDType(const std::string& s, const std::string& what) {
  try {
    DLDataType t = ffi::StringToDLDataType(s);
    if (t.lanes != 1 || t.bits == 0) Fail(kUsage, what + ": unsupported dtype '" + s + "'");
    return t;
  } catch (const ffi::Error&) {
    Fail(kUsage, what + ": unknown dtype '" + s + "' (e.g. float32, int8, uint8, int32, int64)");
  }
}

std::vector<int64_t> ParseShape(const std::string& s, const std::string& what) {
  std::vector<int64_t> shape;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    char* end = nullptr;
    long long d = std::strtoll(tok.c_str(), &end, 10);
    if (tok.empty() || *end != '\0' || d < 0) Fail(kUsage, what + ": bad shape '" + s + "' (want e.g. 1,3,32,32)");
    shape.push_back(d);
  }
  return shape;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s;
}

InputSpec ParseInputArg(const std::string& arg) {
  // PATH:DTYPE:SHAPE; PATH may itself contain ':' so split from the right.
  size_t c2 = arg.rfind(':');
  size_t c1 = c2 == std::string::npos || c2 == 0 ? std::string::npos : arg.rfind(':', c2 - 1);
  if (c1 == std::string::npos) Fail(kUsage, "--input '" + arg + "': expected PATH:DTYPE:SHAPE");
  std::string what = "--input " + arg;
  return {arg.substr(0, c1), ParseDType(arg.substr(c1 + 1, c2 - c1 - 1), what), ParseShape(arg.substr(c2 + 1), what)};
}

std::vector<InputSpec> ReadManifest(const std::string& path, const std::vector<std::string>& files) {
  std::ifstream f(path);
  if (!f) Fail(kFile, "cannot open manifest " + path);
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ffi::String err;
  ffi::Any root = ffi::json::Parse(text, &err);
  if (!err.empty()) Fail(kFile, "manifest " + path + ": invalid JSON: " + std::string(err));
  auto obj = root.as<ffi::Map<ffi::Any, ffi::Any>>();
  if (!obj || !obj->count(ffi::String("inputs"))) Fail(kFile, "manifest " + path + ": no \"inputs\" list");
  auto inputs = obj->at(ffi::String("inputs")).as<ffi::Array<ffi::Any>>();
  if (!inputs) Fail(kFile, "manifest " + path + ": \"inputs\" is not a list");
  if (inputs->size() != files.size()) {
    Fail(kUsage, "manifest " + path + " lists " + std::to_string(inputs->size()) + " inputs but " +
                     std::to_string(files.size()) + " input files were given");
  }
  std::vector<InputSpec> specs;
  for (size_t i = 0; i < files.size(); ++i) {
    std::string what = "manifest input #" + std::to_string(i);
    auto entry = (*inputs)[i].as<ffi::Map<ffi::Any, ffi::Any>>();
    if (!entry || !entry->count(ffi::String("dtype")) || !entry->count(ffi::String("shape"))) {
      Fail(kFile, what + ": needs \"dtype\" and \"shape\"");
    }
    auto dtype = entry->at(ffi::String("dtype")).as<ffi::String>();
    auto dims = entry->at(ffi::String("shape")).as<ffi::Array<ffi::Any>>();
    if (!dtype || !dims) Fail(kFile, what + ": \"dtype\" must be a string and \"shape\" a list");
    std::vector<int64_t> shape;
    for (const ffi::Any& d : *dims) {
      auto v = d.as<int64_t>();
      if (!v) Fail(kUsage, what + " has a symbolic dimension; pass --input PATH:DTYPE:SHAPE instead");
      shape.push_back(*v);
    }
    specs.push_back({files[i], ParseDType(std::string(*dtype), what), shape});
  }
  return specs;
}

ffi::Tensor LoadInput(const InputSpec& spec, size_t index) {
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(spec.shape), spec.dtype, cpu);
  size_t want = ffi::GetDataSize(t);
  std::ifstream f(spec.path, std::ios::binary | std::ios::ate);
  if (!f) Fail(kFile, "input #" + std::to_string(index) + ": cannot open " + spec.path);
  size_t have = static_cast<size_t>(f.tellg());
  if (have != want) {
    Fail(kFile, "input #" + std::to_string(index) + ": " + spec.path + " has " + std::to_string(have) +
                    " bytes, expected " + std::to_string(want) + " for " +
                    std::string(ffi::DLDataTypeToString(spec.dtype)) + "[" + ShapeString(spec.shape) + "]");
  }
  f.seekg(0);
  if (want && !f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(want))) {
    Fail(kFile, "input #" + std::to_string(index) + ": short read on " + spec.path);
  }
  return t;
}

// Depth-first flattening of (nested) tuple results into tensors.
void Flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out, const std::string& where) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = v.as<ffi::Array<ffi::Any>>()) {
    for (size_t i = 0; i < arr->size(); ++i) Flatten((*arr)[i], out, where + "[" + std::to_string(i) + "]");
  } else {
    Fail(kOutput, "output " + where + " is a " + v.GetTypeKey() + "; only tensors and tuples of tensors are supported");
  }
}

void WriteOutput(const ffi::Tensor& t, size_t index, const std::string& out_dir) {
  std::string where = "output #" + std::to_string(index);
  const DLTensor* d = t.GetDLTensorPtr();
  if (d->device.device_type != kDLCPU) Fail(kOutput, where + " is not on the CPU");
  if (!t.IsContiguous()) Fail(kOutput, where + " is not contiguous");
  std::vector<int64_t> shape(d->shape, d->shape + d->ndim);
  std::string path = out_dir + "/output_" + std::to_string(index) + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) Fail(kFile, where + ": cannot write " + path + ": " + std::strerror(errno));
  size_t n = ffi::GetDataSize(*d);
  bool ok = std::fwrite(static_cast<const char*>(d->data) + d->byte_offset, 1, n, f) == n;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) Fail(kFile, where + ": write to " + path + " failed");
  std::printf("output %zu dtype=%s shape=%s file=%s\n", index, std::string(ffi::DLDataTypeToString(d->dtype)).c_str(),
              ShapeString(shape).c_str(), path.c_str());
}

long ParseCount(const std::string& flag, const char* value) {
  char* end = nullptr;
  long n = std::strtol(value, &end, 10);
  if (*value == '\0' || *end != '\0' || n < 0) Fail(kUsage, flag + " wants a non-negative integer, got '" + value + "'");
  return n;
}

const char* kUsageText =
    "usage: runner MODEL.so [--input PATH:DTYPE:SHAPE ...] [--manifest manifest.json INPUT.bin ...]\n"
    "              [--out-dir DIR] [--repeat N] [--warmup N] [--threads N] [--entry NAME]\n";

int Run(int argc, char** argv) {
  if (argc < 2) Fail(kUsage, kUsageText);
  if (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsageText, stdout);
    return kOk;
  }
  std::string model = argv[1], manifest, out_dir = ".", entry = "main";
  std::vector<InputSpec> specs;
  std::vector<std::string> positional;
  long repeat = 1, warmup = 0;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) Fail(kUsage, a + " needs a value");
      return argv[++i];
    };
    if (a == "--input") specs.push_back(ParseInputArg(value()));
    else if (a == "--manifest") manifest = value();
    else if (a == "--out-dir") out_dir = value();
    else if (a == "--repeat") repeat = ParseCount(a, value());
    else if (a == "--warmup") warmup = ParseCount(a, value());
    else if (a == "--threads") setenv("TVM_NUM_THREADS", std::to_string(ParseCount(a, value())).c_str(), 1);
    else if (a == "--entry") entry = value();
    else if (a.rfind("--", 0) == 0) Fail(kUsage, "unknown option " + a + "\n" + kUsageText);
    else positional.push_back(a);
  }
  if (model.find('/') == std::string::npos) model = "./" + model;  // dlopen would search the library path
  if (!manifest.empty()) {
    if (!specs.empty()) Fail(kUsage, "give inputs either with --input or with --manifest, not both");
    specs = ReadManifest(manifest, positional);
  } else if (!positional.empty()) {
    Fail(kUsage, "positional input files need --manifest (or use --input PATH:DTYPE:SHAPE)");
  }

  auto t0 = std::chrono::steady_clock::now();
  ffi::Function main_fn;
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(model);
    auto load_exec = lib->GetFunction("vm_load_executable");
    if (!load_exec) Fail(kLoad, model + " is not a Relax VM library (no vm_load_executable)");
    ffi::Module vm = (*load_exec)().cast<ffi::Module>();
    // (device type, device id, allocator): kDLCPU, 0, pooled allocator (2)
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    auto fn = vm->GetFunction(entry);
    if (!fn) Fail(kLoad, model + " has no VM function '" + entry + "'");
    main_fn = *fn;
  } catch (const ffi::Error& e) {
    Fail(kLoad, "loading " + model + " failed: " + e.kind() + ": " + e.message());
  }
  std::vector<ffi::Tensor> inputs;
  for (size_t i = 0; i < specs.size(); ++i) inputs.push_back(LoadInput(specs[i], i));
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  auto t_loaded = std::chrono::steady_clock::now();

  ffi::Any result;
  auto infer = [&](long n) {
    try {
      for (long r = 0; r < n; ++r) main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    } catch (const ffi::Error& e) {
      Fail(kRun, "running '" + entry + "' failed: " + e.kind() + ": " + e.message());
    }
  };
  infer(warmup);
  auto t1 = std::chrono::steady_clock::now();
  infer(repeat);
  auto t2 = std::chrono::steady_clock::now();

  if (repeat > 0 || warmup > 0) {
    std::vector<ffi::Tensor> outputs;
    Flatten(result, &outputs, "result");
    for (size_t i = 0; i < outputs.size(); ++i) WriteOutput(outputs[i], i, out_dir);
  }
  double load_ms = std::chrono::duration<double, std::milli>(t_loaded - t0).count();
  double run_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
  std::printf("timing load_ms=%.3f run_ms=%.3f per_inference_ms=%.3f repeat=%ld\n", load_ms, run_ms,
              repeat ? run_ms / repeat : 0.0, repeat);
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const Failure& f) {
    std::fprintf(stderr, "runner: error: %s\n", f.message.c_str());
    return f.code;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "runner: error: %s\n", e.what());
    return kRun;
  }
}
