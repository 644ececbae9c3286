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
#endif
