// NUCLEO-L4R5ZI (STM32L4R5ZI, Cortex-M4F): SYSCLK 120 MHz from the PLL on HSI16, LPUART1 on PG7 (TX) / PG8 (RX),
// which the board routes to the ST-LINK's virtual COM port (UM2179, 6.9), and the DWT cycle counter.
// Register names from ST's device header (cmsis-device-l4); the sequence is the reference manual's (RM0432):
// range 1 boost mode (5.1.8) and 5 flash wait states (3.3.3, table 12) before the clock rises above 80 MHz, and
// the AHB prescaler at /2 for the switch to the PLL, then /1 (6.2.9: the HAL's RCC_ClockConfig does the same).
#include "board.h"
#include "dwt.h"
#include "stm32l4xx.h"

#define SYSCLK_HZ 120000000u

static void wait_until(volatile uint32_t* reg, uint32_t mask, uint32_t value) {
  while ((*reg & mask) != value) {
  }
}

static void clock_120mhz(void) {
  RCC->APB1ENR1 |= RCC_APB1ENR1_PWREN;
  (void)RCC->APB1ENR1;
  PWR->CR5 &= ~PWR_CR5_R1MODE;  // range 1 boost: needed above 80 MHz
  wait_until(&PWR->SR2, PWR_SR2_VOSF, 0);
  FLASH->ACR = (FLASH->ACR & ~FLASH_ACR_LATENCY) | FLASH_ACR_LATENCY_5WS | FLASH_ACR_PRFTEN | FLASH_ACR_ICEN |
               FLASH_ACR_DCEN;
  wait_until(&FLASH->ACR, FLASH_ACR_LATENCY, FLASH_ACR_LATENCY_5WS);
  RCC->CR |= RCC_CR_HSION;
  wait_until(&RCC->CR, RCC_CR_HSIRDY, RCC_CR_HSIRDY);
  RCC->CR &= ~RCC_CR_PLLON;
  wait_until(&RCC->CR, RCC_CR_PLLRDY, 0);
  // HSI16 / M=2 = 8 MHz into the VCO, x N=30 = 240 MHz, / R=2 = 120 MHz
  RCC->PLLCFGR = RCC_PLLCFGR_PLLSRC_HSI | ((2u - 1u) << RCC_PLLCFGR_PLLM_Pos) | (30u << RCC_PLLCFGR_PLLN_Pos) |
                 (0u << RCC_PLLCFGR_PLLR_Pos) | RCC_PLLCFGR_PLLREN;
  RCC->CR |= RCC_CR_PLLON;
  wait_until(&RCC->CR, RCC_CR_PLLRDY, RCC_CR_PLLRDY);
  RCC->CFGR = (RCC->CFGR & ~RCC_CFGR_HPRE) | RCC_CFGR_HPRE_DIV2;  // the intermediate step above 80 MHz
  RCC->CFGR = (RCC->CFGR & ~RCC_CFGR_SW) | RCC_CFGR_SW_PLL;
  wait_until(&RCC->CFGR, RCC_CFGR_SWS, RCC_CFGR_SWS_PLL);
  for (volatile int i = 0; i < 200; ++i) {
  }  // at least 1 us at the intermediate AHB clock
  RCC->CFGR &= ~RCC_CFGR_HPRE;  // AHB, APB1 and APB2 all at 120 MHz
  SystemCoreClock = SYSCLK_HZ;
}

void board_init(void) {
  clock_120mhz();
  dwt_start(0);
}

void board_uart_init(uint32_t baud) {
  RCC->APB1ENR1 |= RCC_APB1ENR1_PWREN;
  PWR->CR2 |= PWR_CR2_IOSV;  // port G's pins PG2..PG15 sit on VDDIO2, which is off until declared valid
  RCC->AHB2ENR |= RCC_AHB2ENR_GPIOGEN;
  RCC->APB1ENR2 |= RCC_APB1ENR2_LPUART1EN;
  (void)RCC->APB1ENR2;
  RCC->CCIPR &= ~RCC_CCIPR_LPUART1SEL;  // kernel clock: PCLK1 (120 MHz)
  // PG7 and PG8 to alternate function 8 (LPUART1), very high speed
  GPIOG->MODER = (GPIOG->MODER & ~(GPIO_MODER_MODE7 | GPIO_MODER_MODE8)) | GPIO_MODER_MODE7_1 | GPIO_MODER_MODE8_1;
  GPIOG->OSPEEDR |= GPIO_OSPEEDR_OSPEED7 | GPIO_OSPEEDR_OSPEED8;
  GPIOG->AFR[0] = (GPIOG->AFR[0] & ~GPIO_AFRL_AFSEL7) | (8u << GPIO_AFRL_AFSEL7_Pos);
  GPIOG->AFR[1] = (GPIOG->AFR[1] & ~GPIO_AFRH_AFSEL8) | (8u << GPIO_AFRH_AFSEL8_Pos);
  LPUART1->CR1 = 0;
  LPUART1->BRR = (uint32_t)(((uint64_t)SYSCLK_HZ * 256u + baud / 2u) / baud);  // LPUART: 256 x f_ck / baud
  LPUART1->CR1 = USART_CR1_TE | USART_CR1_RE | USART_CR1_UE;  // 8N1
}

void board_putc(char c) {
  while (!(LPUART1->ISR & USART_ISR_TXE_TXFNF)) {
  }
  LPUART1->TDR = (uint8_t)c;
}

char board_getc(void) {
  for (;;) {
    uint32_t isr = LPUART1->ISR;
    if (isr & USART_ISR_ORE) LPUART1->ICR = USART_ICR_ORECF;  // a byte lost while busy: the host resends the command
    if (isr & USART_ISR_RXNE_RXFNE) return (char)LPUART1->RDR;
  }
}

uint32_t board_clock_hz(void) { return SYSCLK_HZ; }
int board_cycle_counter(void) { return 1; }
uint32_t board_cycles(void) { return DWT_CYCCNT_REG; }
const char* board_name(void) { return "NUCLEO-L4R5ZI"; }
