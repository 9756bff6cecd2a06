// Runs the model over every input in inputs.bin (int8, one tensor after another) and writes outputs.bin,
// reporting instructions per inference, per layer (first inference), arena and stack use to the host.
// cycle_mark() bounds each inference and each operator of the first one, for the host's block profiler.
#include <cstdint>
#include <cstring>

#include "model_data.h"
#include "model_settings.h"
#include "platform.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_profiler_interface.h"

extern "C" uint32_t __stack_limit, __stack_top;  // from the linker script

namespace {

constexpr uint32_t kInstructionsPerTick = 40;  // SysTick at 25 MHz, qemu -icount shift=0: 1 ns per instruction
constexpr int kMaxEvents = 512;
alignas(16) uint8_t tensor_arena[kTensorArenaSize];

// Per-operator instruction counts of one inference (TFLM calls it around every op).
class LayerCounter : public tflite::MicroProfilerInterface {
 public:
  uint32_t BeginEvent(const char* tag) override {
    if (!recording_ || count_ >= kMaxEvents) return kMaxEvents;
    cycle_mark();  // the operator's block counts start here
    tags_[count_] = tag;
    start_[count_] = clock_ticks();
    return count_++;
  }
  void EndEvent(uint32_t handle) override {
    if (handle < kMaxEvents) {
      end_[handle] = clock_ticks();
      cycle_mark();
    }
  }
  void Report() const {
    for (int i = 0; i < count_; ++i) {
      report("layer %d %s %lu\n", i, tags_[i], static_cast<unsigned long>((end_[i] - start_[i]) * kInstructionsPerTick));
    }
  }
  void Stop() { recording_ = false; }
  bool recording() const { return recording_; }

 private:
  const char* tags_[kMaxEvents];
  uint64_t start_[kMaxEvents], end_[kMaxEvents];
  int count_ = 0;
  bool recording_ = true;
};

// The stack below the current frame is painted, and later scanned for the deepest word written.
constexpr uint32_t kPaint = 0xA5A5A5A5u;

void paint_stack() {
  volatile uint32_t here = 0;
  for (uint32_t* p = &__stack_limit; p < reinterpret_cast<uint32_t*>(const_cast<uint32_t*>(&here)) - 32; ++p) *p = kPaint;
}

uint32_t stack_used() {
  uint32_t* p = &__stack_limit;
  while (*p == kPaint) ++p;
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(&__stack_top) - reinterpret_cast<uintptr_t>(p));
}

}  // namespace

int main() {
  paint_stack();
  clock_start();
  static ModelOpResolver resolver;
  if (RegisterModelOps(resolver) != kTfLiteOk) return 3;
  static LayerCounter counter;
  const tflite::Model* model = tflite::GetModel(g_model_data);
  tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, kTensorArenaSize, nullptr, &counter);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    report("error allocating tensors in an arena of %u bytes\n", static_cast<unsigned>(kTensorArenaSize));
    return 2;
  }
  report("arena_used %u\n", static_cast<unsigned>(interpreter.arena_used_bytes()));
  TfLiteTensor* input = interpreter.input(0);
  TfLiteTensor* output = interpreter.output(0);
  int in_file = semihost_open("inputs.bin", 1);
  int out_file = semihost_open("outputs.bin", 5);
  if (in_file < 0 || out_file < 0) return 4;
  int samples = semihost_length(in_file) / static_cast<int>(input->bytes);
  for (int i = 0; i < samples; ++i) {
    if (semihost_read(in_file, input->data.int8, static_cast<int>(input->bytes)) != 0) return 5;
    cycle_mark();  // one inference lies between this mark and the next, outside the clock's reads
    uint64_t start = clock_ticks();
    if (interpreter.Invoke() != kTfLiteOk) return 6;
    uint64_t ticks = clock_ticks() - start;
    cycle_mark();
    if (counter.recording()) {
      counter.Report();
      counter.Stop();
    }
    report("inference %d %lu\n", i, static_cast<unsigned long>(ticks * kInstructionsPerTick));
    semihost_write(out_file, output->data.int8, static_cast<int>(output->bytes));
  }
  semihost_close(in_file);
  semihost_close(out_file);
  report("stack_used %lu\n", static_cast<unsigned long>(stack_used()));
  return 0;
}
