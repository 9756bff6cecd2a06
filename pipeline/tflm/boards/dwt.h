// The Cortex-M DWT cycle counter (ARMv7-M architecture reference manual, C1.8): enabled through the debug
// monitor's TRCENA bit; the Cortex-M7 also locks the DWT until its Lock Access Register is written.
#ifndef CNN_DEPLOY_DWT_H_
#define CNN_DEPLOY_DWT_H_
#include <stdint.h>

#define DWT_DEMCR_REG (*(volatile uint32_t *)0xE000EDFCu)
#define DWT_CTRL_REG (*(volatile uint32_t *)0xE0001000u)
#define DWT_CYCCNT_REG (*(volatile uint32_t *)0xE0001004u)
#define DWT_LAR_REG (*(volatile uint32_t *)0xE0001FB0u)

static inline void dwt_start(int unlock) {
  DWT_DEMCR_REG |= 1u << 24;  // TRCENA
  if (unlock) DWT_LAR_REG = 0xC5ACCE55u;
  DWT_CYCCNT_REG = 0;
  DWT_CTRL_REG |= 1u;  // CYCCNTENA
}

#endif  // CNN_DEPLOY_DWT_H_
