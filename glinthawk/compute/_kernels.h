/* Shared by the C kernels: the element types they take (numbered as C_DTYPE_CODES in
 * elementwise.py), conversions that round as torch does, and multiversioning. */
#ifndef GLINTHAWK_KERNELS_H
#define GLINTHAWK_KERNELS_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* One build runs everywhere; the loader picks the widest vector unit the CPU has. */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

enum { FLOAT32 = 0, BFLOAT16 = 1 };

static inline float bf16_to_float(uint16_t bits) {
    const uint32_t widened = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

/* float32 -> bfloat16 bits, rounding to nearest even (as torch does; inputs are finite). */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline float load(const void *base, int64_t i, int dtype) {
    return dtype == FLOAT32 ? ((const float *)base)[i] : bf16_to_float(((const uint16_t *)base)[i]);
}

static inline void store(void *base, int64_t i, float value, int dtype) {
    if (dtype == FLOAT32)
        ((float *)base)[i] = value;
    else
        ((uint16_t *)base)[i] = float_to_bf16(value);
}

#endif
