/* Cortex-M test-harness startup for QEMU's mps2/mps3 boards (graphopt; not part of a model library).
 * Vector table, FPU enable, .data copied from its load address in the code region, then newlib's
 * rdimon _start (zeroes .bss, semihosting argv/stdio, main, exit). Any fault exits QEMU through
 * semihosting with a non-zero code, so a crash never hangs a run. */
#include <stddef.h>
#include <stdint.h>

extern void _start(void);
extern uint32_t __stack_top, __data_load__, __data_start__, __data_end__;
extern char end, __heap_limit;

/* The heap runs from the end of .bss to __heap_limit (rdimon's own _sbrk trusts the semihosting
 * SYS_HEAPINFO answer, which does not match every board's memory map, e.g. mps3-an547). */
void* _sbrk(ptrdiff_t incr);

void* _sbrk(ptrdiff_t incr) {
  static char* brk = &end;
  if (incr > &__heap_limit - brk) return (void*)-1;
  brk += incr;
  return brk - incr;
}

void Reset_Handler(void);

void Reset_Handler(void) {
  const uint32_t* src = &__data_load__;
  for (uint32_t* dst = &__data_start__; dst < &__data_end__;) *dst++ = *src++;
#if defined(__ARM_FP)
  volatile uint32_t* cpacr = (uint32_t*)0xE000ED88u;
  *cpacr |= 0xFu << 20; /* CP10/CP11 full access */
  __asm volatile("dsb\n isb");
#endif
  _start();
  for (;;) {
  }
}

static void Fault_Handler(void) {
  /* semihosting SYS_EXIT, ADP_Stopped_RunTimeErrorUnknown */
  register uint32_t r0 __asm("r0") = 0x18u;
  register uint32_t r1 __asm("r1") = 0x20024u;
  __asm volatile("bkpt 0xab" : : "r"(r0), "r"(r1));
  for (;;) {
  }
}

__attribute__((section(".vectors"), used)) const void* const graphopt_vector_table[16] = {
    &__stack_top, (void*)Reset_Handler, (void*)Fault_Handler, (void*)Fault_Handler,
    (void*)Fault_Handler, (void*)Fault_Handler, (void*)Fault_Handler, 0, 0, 0, 0,
    (void*)Fault_Handler, (void*)Fault_Handler, 0, (void*)Fault_Handler, (void*)Fault_Handler,
};
