/* Shared by the CPU kernels (cpu_build.py compiles each C source with this folder on the include path, and a
   header's text is part of every library's digest). */
#ifndef COMPRESS_BF16_H
#define COMPRESS_BF16_H
#include <stdint.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* bf16 -> fp32 is exact: the 16 bits become the high half */
ALWAYS_INLINE float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16, round to nearest even, as torch's .to(torch.bfloat16) (NaN stays a quiet NaN) */
ALWAYS_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : rounded);
}
#endif
