/* Reset and exception handlers for the emulated MPS2 boards: copy .data, zero .bss, enable the FPU, run the
   C++ constructors, call main, and leave through semihosting so qemu exits with main's return value. */
#include <stdint.h>
#include <string.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start, __bss_end, __stack_top;
extern void (*__init_array_start[])(void);
extern void (*__init_array_end[])(void);
int main(void);
__attribute__((noreturn)) void semihost_exit(int code);
void SysTick_Handler(void);

void Reset_Handler(void) {
  /* hard-float code faults until CP10/CP11 are enabled */
  *(volatile uint32_t *)0xE000ED88 |= (0xFu << 20);
  __asm volatile("dsb\n isb");
  memcpy(&__data_start, &__data_load, (uintptr_t)&__data_end - (uintptr_t)&__data_start);
  memset(&__bss_start, 0, (uintptr_t)&__bss_end - (uintptr_t)&__bss_start);
  for (void (**f)(void) = __init_array_start; f < __init_array_end; ++f) (*f)();
  semihost_exit(main());
}

static void Fault_Handler(void) { semihost_exit(99); }

__attribute__((section(".vectors"), used)) const void *const vectors[16] = {
    &__stack_top, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, SysTick_Handler};
