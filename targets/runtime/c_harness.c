/* Test harness for a graphopt runtime-free C library (graphopt; not part of a model library).
 * usage: harness REPEAT   reads input_<i>.bin, runs the library REPEAT times, writes
 * output_<i>.bin (bare metal: files through semihosting). Prints "graphopt-harness stack=N"
 * (bytes of stack the inferences used, bare metal only; -1 elsewhere).
 * Exit codes: 0 ok, 2 usage, 3 input file, 4 output file, 5 inference failed.
 * harness_inference_done() runs after every inference: an address for the instruction counter's marks.
 * Build defines: HARNESS_HEADER ("graphopt_<name>.h"), HARNESS_RUN (graphopt_<name>_run),
 * HARNESS_ALIGN (the library's buffer alignment), HARNESS_INPUT_BYTES / HARNESS_OUTPUT_BYTES
 * (comma-separated byte sizes), HARNESS_TOTAL_BYTES (their sum, each rounded up to HARNESS_ALIGN). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include HARNESS_HEADER

static const size_t in_bytes[] = {HARNESS_INPUT_BYTES};
static const size_t out_bytes[] = {HARNESS_OUTPUT_BYTES};
#define NUM_INPUTS (int)(sizeof in_bytes / sizeof in_bytes[0])
#define NUM_OUTPUTS (int)(sizeof out_bytes / sizeof out_bytes[0])
static uint8_t buffers[HARNESS_TOTAL_BYTES] __attribute__((aligned(HARNESS_ALIGN)));

void harness_inference_done(void);
__attribute__((noinline)) void harness_inference_done(void) { __asm volatile("" ::: "memory"); }

#if defined(__arm__) && !defined(__linux__)
#define PAINT_BYTES 65536u
#define PAINT 0xA5u
/* Fill the free stack below this frame, run, and find the lowest byte that changed. */
static __attribute__((noinline)) long run_measured(int repeat, const void* const* in, void* const* out, int* rc) {
  uintptr_t sp;
  __asm volatile("mov %0, sp" : "=r"(sp));
  volatile uint8_t* top = (volatile uint8_t*)(sp - 256u); /* leave this frame's callees alone */
  volatile uint8_t* p;
  for (p = top - PAINT_BYTES; p < top; ++p) *p = PAINT;
  for (int r = 0; r < repeat && *rc == 0; ++r) {
    *rc = HARNESS_RUN(in, out);
    harness_inference_done();
  }
  for (p = top - PAINT_BYTES; p < top && *p == PAINT; ++p) {
  }
  return (long)(sp - (uintptr_t)p);
}
#else
static long run_measured(int repeat, const void* const* in, void* const* out, int* rc) {
  for (int r = 0; r < repeat && *rc == 0; ++r) {
    *rc = HARNESS_RUN(in, out);
    harness_inference_done();
  }
  return -1;
}
#endif

int main(int argc, char** argv) {
  const void* in[NUM_INPUTS];
  void* out[NUM_OUTPUTS];
  char name[32];
  size_t at = 0;
  int rc = 0;
  if (argc < 2) return 2;
  int repeat = atoi(argv[1]);
  for (int i = 0; i < NUM_INPUTS; ++i) {
    snprintf(name, sizeof name, "input_%d.bin", i);
    FILE* f = fopen(name, "rb");
    if (!f || fread(buffers + at, 1, in_bytes[i], f) != in_bytes[i]) return 3;
    fclose(f);
    in[i] = buffers + at;
    at += (in_bytes[i] + HARNESS_ALIGN - 1) / HARNESS_ALIGN * HARNESS_ALIGN;
  }
  for (int i = 0; i < NUM_OUTPUTS; ++i) {
    out[i] = buffers + at;
    at += (out_bytes[i] + HARNESS_ALIGN - 1) / HARNESS_ALIGN * HARNESS_ALIGN;
  }
  long stack = run_measured(repeat, in, out, &rc);
  if (rc != 0) {
    printf("graphopt-harness error=%d\n", rc);
    return 5;
  }
  for (int i = 0; repeat > 0 && i < NUM_OUTPUTS; ++i) {
    snprintf(name, sizeof name, "output_%d.bin", i);
    FILE* f = fopen(name, "wb");
    if (!f || fwrite(out[i], 1, out_bytes[i], f) != out_bytes[i]) return 4;
    fclose(f);
  }
  printf("graphopt-harness stack=%ld\n", stack);
  return 0;
}
