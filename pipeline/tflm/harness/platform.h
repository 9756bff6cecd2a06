// Board support for the emulated MPS2 boards (platform.cc).
#ifndef CNN_DEPLOY_PLATFORM_H_
#define CNN_DEPLOY_PLATFORM_H_
#include <cstdint>

extern "C" {
int semihost_open(const char* name, int mode);  // mode 1: read binary, 5: write binary
int semihost_close(int handle);
int semihost_length(int handle);
int semihost_read(int handle, void* buffer, int bytes);
int semihost_write(int handle, const void* buffer, int bytes);
__attribute__((noreturn)) void semihost_exit(int code);
void report(const char* format, ...);  // one line to the host (qemu's stderr)
void clock_start(void);
uint64_t clock_ticks(void);  // 25 MHz SysTick: 40 instructions a tick under qemu -icount shift=0
void cycle_mark(void);  // a phase boundary for the host's block profiler (pipeline/cycles); no effect on a board
}

#endif  // CNN_DEPLOY_PLATFORM_H_
