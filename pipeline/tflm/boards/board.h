// A board layer: the handful of functions the benchmark firmware (pipeline/tflm/benchmark) needs from a board.
// One C file per board implements them (mps2.c, nucleo_l4r5zi.c, nucleo_h743zi.c), with its linker script beside it.
#ifndef CNN_DEPLOY_BOARD_H_
#define CNN_DEPLOY_BOARD_H_
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void board_init(void);            // clocks, the UART's pins and the UART itself at `baud`
void board_uart_init(uint32_t baud);
void board_putc(char c);          // blocks until the UART takes it
char board_getc(void);            // blocks until a byte arrives
uint32_t board_clock_hz(void);    // the core's clock: DWT cycles per second
int board_cycle_counter(void);    // 1 where the DWT cycle counter counts (0 on the emulated boards: it reads 0)
uint32_t board_cycles(void);      // DWT CYCCNT (wraps every 2^32 cycles: 35 s at 120 MHz)
const char* board_name(void);

#ifdef __cplusplus
}
#endif

#endif  // CNN_DEPLOY_BOARD_H_
