// Fused product of two Kronecker-sparse factors, y = x @ (X_1 X_2)^T, that keeps
// the intermediate h = x @ X_2^T in shared memory (Monarch, rank-r Monarch and
// low-rank chains).
//
// Supported chains: X_1 = (1, B1, C1, D1), X_2 = (A2, B2, C2, 1) with
// C1*D1 == A2*B2 and D1 | B2; twiddles T1 (1, D1, B1, C1) and T2 (A2, 1, B2, C2).
// Monarch with k blocks and rank r is B1 = m/k, C1 = k*r, D1 = k, A2 = k, B2 = k*r, C2 = n/k.
//
//   h[B, t]            = sum_u T2[i2, 0, j2, u] * x[B, i2*C2 + u]     t = i2*B2 + j2
//   y[B, j*D1 + k]     = sum_l T1[0, k, j, l] * h[B, l*D1 + k]
//
// With RR = B2 / D1, the h entries a block needs for its k range [k0, k0+KT)
// are t = l*D1 + k, i.e. i2 = l / RR and j2 = (l % RR)*D1 + k: for each i2 the
// block reads one C2-wide slice of its x rows and RR*KT rows of T2.
//
// A block owns BM batch rows and KT consecutive k; it computes h[m][l][k] for all
// l < C1 (stage 1, kept in shared memory as float32), then y (stage 2). The batch
// size is a runtime argument. Defaults: 4096 x 4096 Monarch with 64 blocks.
#include "ks_common.cuh"

#ifndef B1
#define B1 64
#endif
#ifndef C1
#define C1 64
#endif
#ifndef D1
#define D1 64
#endif
#ifndef A2
#define A2 64
#endif
#ifndef B2
#define B2 64
#endif
#ifndef C2
#define C2 64
#endif
#ifndef BM
#define BM 16  // batch rows per block
#endif
#ifndef KT
#define KT 8  // values of k per block
#endif
#ifndef UC
#define UC 64  // stage-1 reduction chunk along u
#endif
#ifndef NTHREADS
#define NTHREADS 256
#endif

#define RR (B2 / D1)
#define NKT ((D1 + KT - 1) / KT)
#define OUT1 ((BM * RR * KT + NTHREADS - 1) / NTHREADS)
#define IN_FEATURES (A2 * C2)
#define OUT_FEATURES (B1 * D1)

extern "C" __global__ void __launch_bounds__(NTHREADS)
ks_monarch(const act_t* __restrict__ x, const act_t* __restrict__ T2, const act_t* __restrict__ T1,
           act_t* __restrict__ y, int batch) {
    __shared__ float sH[BM * C1 * KT];        // h[m][l][k]
    __shared__ float sX[BM * UC];             // x[m, i2*C2 + u0 + u]
    __shared__ float sT[RR * KT * (UC + 1)];  // T2[i2, 0, (rr*D1 + k), u0 + u]; +1 avoids bank conflicts
    const int tid = threadIdx.x;
    // k tiles fastest: the NKT blocks that share a slab of x rows run together and reuse it from L2
    const int k0 = (blockIdx.x % NKT) * KT;
    const long long m0 = (long long)(blockIdx.x / NKT) * BM;

    for (int i2 = 0; i2 < A2; ++i2) {
        float acc[OUT1];
#pragma unroll
        for (int o = 0; o < OUT1; ++o) acc[o] = 0.f;
        for (int u0 = 0; u0 < C2; u0 += UC) {
            for (int e = tid; e < BM * UC; e += NTHREADS) {
                const int m = e / UC, u = e % UC;
                sX[e] = (m0 + m < batch && u0 + u < C2)
                            ? act_to_float(x[(m0 + m) * IN_FEATURES + i2 * C2 + u0 + u])
                            : 0.f;
            }
            for (int e = tid; e < RR * KT * UC; e += NTHREADS) {
                const int u = e % UC, kk = (e / UC) % KT, rr = e / (UC * KT);
                const int j2 = rr * D1 + k0 + kk;
                sT[(rr * KT + kk) * (UC + 1) + u] =
                    (k0 + kk < D1 && u0 + u < C2) ? act_to_float(T2[(i2 * B2 + j2) * C2 + u0 + u]) : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int o = 0; o < OUT1; ++o) {
                const int e = tid + o * NTHREADS;
                if (e < BM * RR * KT) {
                    const int kk = e % KT, rr = (e / KT) % RR, m = e / (KT * RR);
                    const float* xs = sX + m * UC;
                    const float* ts = sT + (rr * KT + kk) * (UC + 1);
                    float s = acc[o];
#pragma unroll 8
                    for (int u = 0; u < UC; ++u) s = fmaf(xs[u], ts[u], s);
                    acc[o] = s;
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int o = 0; o < OUT1; ++o) {
            const int e = tid + o * NTHREADS;
            if (e < BM * RR * KT) {
                const int kk = e % KT, rr = (e / KT) % RR, m = e / (KT * RR);
                sH[(m * C1 + i2 * RR + rr) * KT + kk] = acc[o];
            }
        }
    }
    __syncthreads();

    // Stage 2: neighbouring threads take neighbouring k, which are adjacent in y.
    for (int e = tid; e < BM * B1 * KT; e += NTHREADS) {
        const int kk = e % KT, j = (e / KT) % B1, m = e / (KT * B1);
        const int k = k0 + kk;
        if (m0 + m < batch && k < D1) {
            const act_t* t1 = T1 + (k * B1 + j) * C1;
            const float* h = sH + m * C1 * KT + kk;
            float s = 0.f;
#pragma unroll 8
            for (int l = 0; l < C1; ++l) s = fmaf(act_to_float(t1[l]), h[l * KT], s);
            y[(m0 + m) * OUT_FEATURES + j * D1 + k] = float_to_act(s);
        }
    }
}
