"""On-device checks: transports (emulated Raspberry Pi, SSH boards, TFLM), the runner copied to a board, and
the accuracy regression test."""
