// What a bare-metal image on a real board provides itself: TFLM's log (to the UART: the board has no semihosting
// host, where a bkpt would halt it) and clock, the C++ runtime's few hooks, and the _init/_fini that ST's startup
// file reaches through __libc_init_array (the image links without the C runtime's start files).
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "board.h"

extern "C" {

void DebugLog(const char* format, va_list args) {
  char line[160];
  int length = vsnprintf(line, sizeof(line), format, args);
  for (int i = 0; i < length && i < static_cast<int>(sizeof(line)) - 1; ++i) board_putc(line[i]);
}

int DebugVsnprintf(char* buffer, size_t size, const char* format, va_list args) {
  return vsnprintf(buffer, size, format, args);
}

void _init(void) {}
void _fini(void) {}
void* __dso_handle = nullptr;
int __aeabi_atexit(void*, void (*)(void*), void*) { return 0; }
void __cxa_pure_virtual(void) {
  for (;;) {
  }
}
void abort(void) {
  for (;;) {
  }
}
}

void operator delete(void*) noexcept {}
void operator delete(void*, size_t) noexcept {}

namespace tflite {
uint32_t ticks_per_second() { return board_clock_hz(); }
uint32_t GetCurrentTimeTicks() { return board_cycles(); }
}  // namespace tflite
