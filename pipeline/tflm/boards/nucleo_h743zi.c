// NUCLEO-H743ZI2 (STM32H743ZI, Cortex-M7): SYSCLK 480 MHz from PLL1 on HSI (64 MHz), USART3 on PD8 (TX) / PD9 (RX),
// which the board routes to the ST-LINK's virtual COM port (UM2407, 6.9), the caches on, and the DWT cycle counter
// (the M7 locks it until its Lock Access Register is written). The sequence is the reference manual's (RM0433):
// the LDO supply, voltage scale 1 then 0 through SYSCFG's overdrive (6.8.6, 480 MHz needs VOS0), 4 flash wait
// states and write high frequency 2 for a 240 MHz AXI clock (4.3.8, table 17) before the switch.
#include "board.h"
#include "dwt.h"
#include "stm32h7xx.h"

#define SYSCLK_HZ 480000000u
#define PCLK1_HZ 120000000u  // AHB /2, APB1 /2: USART3's kernel clock

static void wait_until(volatile uint32_t* reg, uint32_t mask, uint32_t value) {
  while ((*reg & mask) != value) {
  }
}

static void clock_480mhz(void) {
  PWR->CR3 = (PWR->CR3 & ~(PWR_CR3_SCUEN | PWR_CR3_BYPASS)) | PWR_CR3_LDOEN;  // the H743's LDO supplies the core
  wait_until(&PWR->CSR1, PWR_CSR1_ACTVOSRDY, PWR_CSR1_ACTVOSRDY);
  PWR->D3CR |= PWR_D3CR_VOS;  // scale 1
  wait_until(&PWR->D3CR, PWR_D3CR_VOSRDY, PWR_D3CR_VOSRDY);
  RCC->APB4ENR |= RCC_APB4ENR_SYSCFGEN;
  (void)RCC->APB4ENR;
  SYSCFG->PWRCR |= SYSCFG_PWRCR_ODEN;  // scale 0 (overdrive)
  wait_until(&PWR->D3CR, PWR_D3CR_VOSRDY, PWR_D3CR_VOSRDY);
  FLASH->ACR = FLASH_ACR_LATENCY_4WS | FLASH_ACR_WRHIGHFREQ_1;
  wait_until(&FLASH->ACR, FLASH_ACR_LATENCY, FLASH_ACR_LATENCY_4WS);
  // HSI 64 MHz / M=4 = 16 MHz into the VCO (range 8-16 MHz), x N=60 = 960 MHz, / P=2 = 480 MHz
  RCC->PLLCKSELR = (RCC->PLLCKSELR & ~(RCC_PLLCKSELR_PLLSRC | RCC_PLLCKSELR_DIVM1)) | (4u << RCC_PLLCKSELR_DIVM1_Pos);
  RCC->PLLCFGR = (RCC->PLLCFGR & ~0x1FFu) | (3u << RCC_PLLCFGR_PLL1RGE_Pos) | RCC_PLLCFGR_DIVP1EN;
  RCC->PLL1DIVR = ((60u - 1u) << RCC_PLL1DIVR_N1_Pos) | ((2u - 1u) << RCC_PLL1DIVR_P1_Pos) |
                  ((4u - 1u) << RCC_PLL1DIVR_Q1_Pos) | ((2u - 1u) << RCC_PLL1DIVR_R1_Pos);
  RCC->CR |= RCC_CR_PLL1ON;
  wait_until(&RCC->CR, RCC_CR_PLL1RDY, RCC_CR_PLL1RDY);
  RCC->D1CFGR = RCC_D1CFGR_HPRE_DIV2 | RCC_D1CFGR_D1PPRE_DIV2;  // AXI/AHB 240 MHz, APB3 120 MHz
  RCC->D2CFGR = RCC_D2CFGR_D2PPRE1_DIV2 | RCC_D2CFGR_D2PPRE2_DIV2;  // APB1, APB2 120 MHz
  RCC->D3CFGR = RCC_D3CFGR_D3PPRE_DIV2;  // APB4 120 MHz
  RCC->CFGR = (RCC->CFGR & ~RCC_CFGR_SW) | RCC_CFGR_SW_PLL1;
  wait_until(&RCC->CFGR, RCC_CFGR_SWS, RCC_CFGR_SWS_PLL1);
  SystemCoreClock = SYSCLK_HZ;
}

void board_init(void) {
  clock_480mhz();
  SCB_EnableICache();
  SCB_EnableDCache();
  dwt_start(1);
}

void board_uart_init(uint32_t baud) {
  RCC->AHB4ENR |= RCC_AHB4ENR_GPIODEN;
  RCC->APB1LENR |= RCC_APB1LENR_USART3EN;
  (void)RCC->APB1LENR;
  RCC->D2CCIP2R &= ~RCC_D2CCIP2R_USART28SEL;  // kernel clock: PCLK1
  GPIOD->MODER = (GPIOD->MODER & ~(GPIO_MODER_MODE8 | GPIO_MODER_MODE9)) | GPIO_MODER_MODE8_1 | GPIO_MODER_MODE9_1;
  GPIOD->OSPEEDR |= GPIO_OSPEEDR_OSPEED8 | GPIO_OSPEEDR_OSPEED9;
  GPIOD->AFR[1] = (GPIOD->AFR[1] & ~(GPIO_AFRH_AFSEL8 | GPIO_AFRH_AFSEL9)) | (7u << GPIO_AFRH_AFSEL8_Pos) |
                  (7u << GPIO_AFRH_AFSEL9_Pos);  // AF7: USART3
  USART3->CR1 = 0;
  USART3->BRR = (PCLK1_HZ + baud / 2u) / baud;  // oversampling by 16
  USART3->CR1 = USART_CR1_TE | USART_CR1_RE | USART_CR1_UE;  // 8N1
}

void board_putc(char c) {
  while (!(USART3->ISR & USART_ISR_TXE_TXFNF)) {
  }
  USART3->TDR = (uint8_t)c;
}

char board_getc(void) {
  for (;;) {
    uint32_t isr = USART3->ISR;
    if (isr & USART_ISR_ORE) USART3->ICR = USART_ICR_ORECF;  // a byte lost while busy: the host resends the command
    if (isr & USART_ISR_RXNE_RXFNE) return (char)USART3->RDR;
  }
}

uint32_t board_clock_hz(void) { return SYSCLK_HZ; }
int board_cycle_counter(void) { return 1; }
uint32_t board_cycles(void) { return DWT_CYCCNT_REG; }
const char* board_name(void) { return "NUCLEO-H743ZI"; }
