// gelu_math.cuh: the one formula every rung of the gelu_forward ladder computes, so that two rungs
// differ only in how threads are mapped onto memory (the subject of the ladder).
//   gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))      (GPT-2's tanh approximation)
#pragma once

__device__ __forceinline__ float gelu_tanh(float x) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}
