// Shared helpers for the Kronecker-sparse kernels (included by ks_gemm.cu and ks_monarch.cu).
//
// No CUDA headers are included on purpose: NVRTC (used by CuPy) does not always
// find cuda_fp16.h / cuda_bf16.h, so half and bfloat16 values travel as raw
// 16-bit patterns and are converted with PTX (fp16) or bit arithmetic (bf16).
//
// Compile-time constants (pass as -D; the defaults make the file build alone):
//   DTYPE_ID   activations x / y:  0 float32, 1 float16, 2 bfloat16
//   TW_FORMAT  right-hand operand:  0 same type as the activations,
//                                   1 int8 with float32 scales, 2 fp8 e4m3fn with float32 scales
#pragma once

#ifndef DTYPE_ID
#define DTYPE_ID 0
#endif
#ifndef TW_FORMAT
#define TW_FORMAT 0
#endif

#if DTYPE_ID == 0
typedef float act_t;
#else
typedef unsigned short act_t;  // raw float16 / bfloat16 bits
#endif

#if TW_FORMAT == 0
typedef act_t tw_t;
#elif TW_FORMAT == 1
typedef signed char tw_t;
#else
typedef unsigned char tw_t;  // fp8 e4m3fn bits
#endif

__device__ __forceinline__ float act_to_float(act_t v) {
#if DTYPE_ID == 0
    return v;
#elif DTYPE_ID == 1
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#else
    return __uint_as_float(((unsigned int)v) << 16);  // bf16 is the top half of a float32
#endif
}

__device__ __forceinline__ act_t float_to_act(float f) {
#if DTYPE_ID == 0
    return f;
#elif DTYPE_ID == 1
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned int bits = __float_as_uint(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x40u);  // keep NaN a NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
    return (unsigned short)(bits >> 16);
#endif
}

// fp8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities; S.1111.111 is NaN.
__device__ __forceinline__ float e4m3_to_float(unsigned char v) {
    const unsigned int sign = (unsigned int)(v & 0x80u) << 24;
    const unsigned int exponent = (v >> 3) & 0xfu;
    const unsigned int mantissa = v & 0x7u;
    if ((v & 0x7fu) == 0x7fu) return __uint_as_float(0x7fc00000u | sign);
    if (exponent == 0) {  // subnormal: mantissa * 2^-9
        const float magnitude = (float)mantissa * 0.001953125f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

__device__ __forceinline__ float tw_to_float(tw_t v) {
#if TW_FORMAT == 0
    return act_to_float(v);
#elif TW_FORMAT == 1
    return (float)v;
#else
    return e4m3_to_float(v);
#endif
}

// Key used to order the axes of a tile when loading it: the axis with the smallest
// stride varies fastest across threads so that a warp reads consecutive addresses.
// Axes of extent 1 never vary, so they sort last.
__host__ __device__ constexpr long long axis_key(long long stride, int extent) {
    return extent > 1 ? stride : 0x7fffffffffffffffLL;
}

// Split a flat tile index e into (u, v, w) coordinates with extents (NU, NV, NW),
// fastest axis first by the keys KU, KV, KW (compile-time, so the branches fold away).
template <long long KU, long long KV, long long KW, int NU, int NV, int NW>
__device__ __forceinline__ void unflatten3(int e, int& u, int& v, int& w) {
    if (KW <= KU && KW <= KV) {
        w = e % NW;
        e /= NW;
        if (KV <= KU) { v = e % NV; u = e / NV; } else { u = e % NU; v = e / NU; }
    } else if (KV <= KU) {
        v = e % NV;
        e /= NV;
        if (KW <= KU) { w = e % NW; u = e / NW; } else { u = e % NU; w = e / NU; }
    } else {
        u = e % NU;
        e /= NU;
        if (KW <= KV) { w = e % NW; v = e / NW; } else { v = e % NV; w = e / NV; }
    }
}
