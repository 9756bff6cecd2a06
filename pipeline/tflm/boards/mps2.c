// The emulated MPS2 boards (qemu's mps2-an386, Cortex-M4, and mps2-an500, Cortex-M7): CMSDK APB UART0 at
// 0x40004000 (ARM DDI 0479C, 4.5) connected to qemu's first -serial, no clock to set up (qemu runs at 25 MHz
// nominal), and no cycle counter: qemu does not emulate the DWT's CYCCNT (it reads 0), so the firmware reports its
// timing as unavailable and the host keeps the cycle engine's estimate.
#include "board.h"

#define UART0_DATA (*(volatile uint32_t *)0x40004000u)
#define UART0_STATE (*(volatile uint32_t *)0x40004004u)
#define UART0_CTRL (*(volatile uint32_t *)0x40004008u)
#define UART0_INTSTATUS (*(volatile uint32_t *)0x4000400Cu)
#define UART0_BAUDDIV (*(volatile uint32_t *)0x40004010u)
#define CTRL_TX_EN 1u
#define CTRL_RX_EN 2u
#define CTRL_RX_INT_EN 8u
#define INT_RX 2u
#define UART0_RX_IRQ 0u
#define NVIC_ISER0 (*(volatile uint32_t *)0xE000E100u)
#define NVIC_ICPR0 (*(volatile uint32_t *)0xE000E280u)
#define STATE_TX_FULL 1u
#define STATE_RX_FULL 2u
#define CLOCK_HZ 25000000u  // the MPS2 FPGA images' system clock (AN386/AN500)

void board_init(void) {}

void board_uart_init(uint32_t baud) {
  UART0_BAUDDIV = CLOCK_HZ / baud;  // qemu ignores the rate but refuses to send with a divider under 16
  // TX and RX enabled, and the RX interrupt (IRQ 0 on AN386 and AN500), taken by no handler: with interrupts
  // masked, a WFI waits for the next byte. A busy-polling core keeps qemu from delivering input: ~1 ms a byte.
  UART0_CTRL = CTRL_TX_EN | CTRL_RX_EN | CTRL_RX_INT_EN;
  __asm volatile("cpsid i" ::: "memory");
  NVIC_ISER0 = 1u << UART0_RX_IRQ;
}

void board_putc(char c) {
  while (UART0_STATE & STATE_TX_FULL) {
  }
  UART0_DATA = (uint8_t)c;
}

char board_getc(void) {
  while (!(UART0_STATE & STATE_RX_FULL)) {
    __asm volatile("wfi" ::: "memory");
  }
  char c = (char)UART0_DATA;
  UART0_INTSTATUS = INT_RX;  // write 1 to clear
  NVIC_ICPR0 = 1u << UART0_RX_IRQ;
  return c;
}

uint32_t board_clock_hz(void) { return CLOCK_HZ; }
int board_cycle_counter(void) { return 0; }
uint32_t board_cycles(void) { return 0; }
const char* board_name(void) { return "emulated MPS2"; }
