// The th_* functions of MLPerf Tiny's benchmark API (submitter_implemented.h, mlcommons/tiny) for a TFLite Micro
// model: the harness's own internally_implemented.cpp parses the host's commands (`name`, `profile`, `db load N`,
// `db <hex>`, `infer N W`, `results`, each ended by '%') and calls these. The board layer (pipeline/tflm/boards)
// gives the UART and the DWT cycle counter. Besides the official lines, `results` also prints the int8 output
// (m-results-int8-[...], for the host's bit-exact check) and the DWT cycles of the last timed inferences
// (m-dwt-cycles-[...]); the official runner ignores lines it does not know.
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "api/internally_implemented.h"
#include "api/submitter_implemented.h"
#include "board.h"
#include "model_data.h"
#include "model_settings.h"
#include "tensorflow/lite/micro/micro_interpreter.h"

#ifndef BENCHMARK_BAUD
#define BENCHMARK_BAUD 115200
#endif

namespace {

alignas(16) uint8_t tensor_arena[kTensorArenaSize];
tflite::MicroInterpreter* interpreter = nullptr;
uint32_t timed_start = 0, timed_cycles = 0, last_reading = 0;
uint64_t elapsed_cycles = 0;  // DWT's 32 bits wrap every 35 s at 120 MHz: timestamps accumulate the deltas

// A float as the official runner reads it (nano printf has no %f): sign, integer part and 6 decimals.
void print_score(float value, const char* separator) {
  const char* sign = value < 0 ? "-" : "";
  float magnitude = value < 0 ? -value : value;
  uint32_t whole = static_cast<uint32_t>(magnitude);
  uint32_t millionths = static_cast<uint32_t>((magnitude - static_cast<float>(whole)) * 1e6f + 0.5f);
  if (millionths >= 1000000u) {
    whole += 1;
    millionths -= 1000000u;
  }
  th_printf("%s%lu.%06lu%s", sign, static_cast<unsigned long>(whole), static_cast<unsigned long>(millionths), separator);
}

}  // namespace

void th_serialport_initialize(void) {
  board_init();
  board_uart_init(BENCHMARK_BAUD);
}

void th_timestamp_initialize(void) {
  last_reading = board_cycles();
  th_printf(EE_MSG_TIMESTAMP_MODE);
  th_timestamp();
}

void th_final_initialize(void) {
  static ModelOpResolver resolver;
  if (RegisterModelOps(resolver) != kTfLiteOk) {
    th_printf("e-[an operator of the model is not registered]\r\n");
    return;
  }
  static tflite::MicroInterpreter instance(tflite::GetModel(g_model_data), resolver, tensor_arena, kTensorArenaSize);
  if (instance.AllocateTensors() != kTfLiteOk) {
    th_printf("e-[the model's tensors do not fit an arena of %u bytes]\r\n", static_cast<unsigned>(kTensorArenaSize));
    return;
  }
  interpreter = &instance;
  th_printf("m-board-[%s]\r\n", board_name());
  th_printf("m-arena-used-[%u]\r\n", static_cast<unsigned>(instance.arena_used_bytes()));
}

void th_load_tensor(void) {
  if (interpreter == nullptr) return;
  TfLiteTensor* input = interpreter->input(0);
  size_t loaded = ee_get_buffer(input->data.uint8, input->bytes);
  if (loaded != input->bytes) {
    th_printf("e-[db holds %u bytes; the model's input takes %u]\r\n", static_cast<unsigned>(loaded),
              static_cast<unsigned>(input->bytes));
  }
}

void th_infer(void) {
  if (interpreter == nullptr) {
    th_printf("e-[no model: its initialisation failed]\r\n");
  } else if (interpreter->Invoke() != kTfLiteOk) {
    th_printf("e-[Invoke failed]\r\n");
  }
}

void th_pre(void) { timed_start = board_cycles(); }

void th_post(void) { timed_cycles = board_cycles() - timed_start; }

void th_results(void) {
  if (interpreter == nullptr) return;
  TfLiteTensor* output = interpreter->output(0);
  int count = static_cast<int>(output->bytes);
  th_printf("m-results-[");
  for (int i = 0; i < count; ++i) {
    print_score(kOutputScale * static_cast<float>(output->data.int8[i] - kOutputZeroPoint), i + 1 < count ? "," : "");
  }
  th_printf("]\r\nm-results-int8-[");
  for (int i = 0; i < count; ++i) th_printf(i + 1 < count ? "%d," : "%d", output->data.int8[i]);
  th_printf("]\r\n");
  if (board_cycle_counter()) th_printf("m-dwt-cycles-[%lu]\r\n", static_cast<unsigned long>(timed_cycles));
}

void th_timestamp(void) {
  if (!board_cycle_counter()) {
    th_printf("m-timing-[unavailable: %s has no cycle counter]\r\n", board_name());
    th_printf(EE_MSG_TIMESTAMP, 0ul);
    return;
  }
  uint32_t now = board_cycles();
  elapsed_cycles += now - last_reading;
  last_reading = now;
  th_printf(EE_MSG_TIMESTAMP, static_cast<unsigned long>(elapsed_cycles / (board_clock_hz() / 1000000u)));
}

void th_printf(const char* format, ...) {
  char line[160];
  va_list args;
  va_start(args, format);
  int length = vsnprintf(line, sizeof(line), format, args);
  va_end(args);
  for (int i = 0; i < length && i < static_cast<int>(sizeof(line)) - 1; ++i) board_putc(line[i]);
}

char th_getchar(void) { return board_getc(); }

void th_command_ready(char volatile* msg) { ee_serial_command_parser_callback(const_cast<char*>(msg)); }

int th_strncmp(const char* a, const char* b, size_t n) { return strncmp(a, b, n); }
char* th_strncpy(char* dest, const char* src, size_t n) { return strncpy(dest, src, n); }
size_t th_strnlen(const char* text, size_t n) {  // strnlen is POSIX, not in strict C++17's <cstring>
  size_t length = 0;
  while (length < n && text[length]) ++length;
  return length;
}
char* th_strcat(char* dest, const char* src) { return strcat(dest, src); }
char* th_strtok(char* text, const char* separators) { return strtok(text, separators); }
int th_atoi(const char* text) { return atoi(text); }
void* th_memset(void* b, int c, size_t len) { return memset(b, c, len); }
void* th_memcpy(void* dst, const void* src, size_t n) { return memcpy(dst, src, n); }
int th_vprintf(const char* format, va_list args) {
  char line[160];
  int length = vsnprintf(line, sizeof(line), format, args);
  for (int i = 0; i < length && i < static_cast<int>(sizeof(line)) - 1; ++i) board_putc(line[i]);
  return length;
}

int main(void) {
  ee_benchmark_initialize();
  for (;;) ee_serial_callback(th_getchar());
}
