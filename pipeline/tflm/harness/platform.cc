// Board support for the emulated MPS2 boards: semihosting I/O (ARM's semihosting calls through bkpt 0xab),
// TFLM's log and clock hooks, and the C++ runtime pieces a bare-metal image must provide.
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "platform.h"

extern "C" {

static int semihost(int op, void* block) {
  register int r0 __asm__("r0") = op;
  register void* r1 __asm__("r1") = block;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

int semihost_open(const char* name, int mode) {
  int length = 0;
  while (name[length]) ++length;
  uintptr_t block[3] = {reinterpret_cast<uintptr_t>(name), static_cast<uintptr_t>(mode),
                        static_cast<uintptr_t>(length)};
  return semihost(0x01, block);
}

int semihost_close(int handle) {
  uintptr_t block[1] = {static_cast<uintptr_t>(handle)};
  return semihost(0x02, block);
}

int semihost_length(int handle) {
  uintptr_t block[1] = {static_cast<uintptr_t>(handle)};
  return semihost(0x0C, block);
}

// SYS_READ and SYS_WRITE return how many bytes were NOT transferred
int semihost_read(int handle, void* buffer, int bytes) {
  uintptr_t block[3] = {static_cast<uintptr_t>(handle), reinterpret_cast<uintptr_t>(buffer),
                        static_cast<uintptr_t>(bytes)};
  return semihost(0x06, block);
}

int semihost_write(int handle, const void* buffer, int bytes) {
  uintptr_t block[3] = {static_cast<uintptr_t>(handle), reinterpret_cast<uintptr_t>(buffer),
                        static_cast<uintptr_t>(bytes)};
  return semihost(0x05, block);
}

void semihost_print(const char* text) { semihost(0x04, const_cast<char*>(text)); }

__attribute__((noreturn)) void semihost_exit(int code) {
  uintptr_t block[2] = {0x20026, static_cast<uintptr_t>(code)};  // ADP_Stopped_ApplicationExit, exit code
  semihost(0x20, block);
  for (;;) {
  }
}

void report(const char* format, ...) {
  char line[256];
  va_list args;
  va_start(args, format);
  vsnprintf(line, sizeof(line), format, args);
  va_end(args);
  semihost_print(line);
}

// ---- TFLM's hooks ----
void DebugLog(const char* format, va_list args) {
  char line[256];
  vsnprintf(line, sizeof(line), format, args);
  semihost_print(line);
}

int DebugVsnprintf(char* buffer, size_t buf_size, const char* format, va_list vlist) {
  return vsnprintf(buffer, buf_size, format, vlist);
}

// ---- the instruction clock: SysTick at 25 MHz; under qemu -icount shift=0 one tick is 40 instructions ----
#define SYST_CSR (*reinterpret_cast<volatile uint32_t*>(0xE000E010))
#define SYST_RVR (*reinterpret_cast<volatile uint32_t*>(0xE000E014))
#define SYST_CVR (*reinterpret_cast<volatile uint32_t*>(0xE000E018))
static volatile uint32_t wraps = 0;

void SysTick_Handler(void) { wraps = wraps + 1; }

void clock_start(void) {
  SYST_RVR = 0xFFFFFF;
  SYST_CVR = 0;
  SYST_CSR = 0x7;  // processor clock, interrupt on wrap, enabled
  while (SYST_CVR == 0) {
  }  // the counter reads 0 until its first reload
}

uint64_t clock_ticks(void) {
  uint32_t before, value;
  do {
    before = wraps;
    value = SYST_CVR;
  } while (before != wraps);
  return (static_cast<uint64_t>(before) << 24) + (0xFFFFFFu - value);
}

// ---- phase marks: the block-profile plugin splits its counts wherever this function runs ----
__attribute__((noinline)) void cycle_mark(void) { __asm__ volatile("" ::: "memory"); }

// ---- the C++ runtime a bare-metal image provides itself ----
void* __dso_handle = nullptr;
int __aeabi_atexit(void*, void (*)(void*), void*) { return 0; }
void __cxa_pure_virtual(void) { semihost_exit(98); }
void abort(void) { semihost_exit(97); }
}

void operator delete(void*) noexcept {}
void operator delete(void*, size_t) noexcept {}

namespace tflite {
uint32_t ticks_per_second() { return 25000000; }
uint32_t GetCurrentTimeTicks() { return static_cast<uint32_t>(clock_ticks()); }
}  // namespace tflite
