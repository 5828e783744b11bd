// adamw_math.cuh: the hyperparameters every rung of the adamw ladder takes, in the form today's kernel
// (csrc/adamw.cu) takes them: everything that is the same for all elements is folded on the host.
//   p = p (1 - lr wd);  m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
//   p = p - step_size m / (sqrt(v) / sqrt(1 - beta2^step) + eps),  step_size = lr / (1 - beta1^step)
#pragma once

#include <cmath>

struct AdamWStep {
    float decay;                  // 1 - lr * weight_decay
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
    float eps;
    float step_size;              // lr / (1 - beta1^step)
};

inline AdamWStep adamw_fold(float lr, float beta1, float beta2, float eps, float weight_decay, int step) {
    AdamWStep h;
    h.decay = 1.0f - lr * weight_decay;
    h.one_minus_beta1 = 1.0f - beta1;
    h.beta2 = beta2;
    h.one_minus_beta2 = 1.0f - beta2;
    h.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2), step)));
    h.eps = eps;
    h.step_size = static_cast<float>(lr / (1.0 - std::pow(static_cast<double>(beta1), step)));
    return h;
}

// One element's update, on registers (m and v updated in place, the new parameter returned).
__device__ __forceinline__ float adamw_update(float p, float g, float& m, float& v, const AdamWStep& h) {
    m += h.one_minus_beta1 * (g - m);
    v = h.beta2 * v + h.one_minus_beta2 * g * g;
    return p * h.decay - h.step_size * m / (sqrtf(v) / h.bias_correction2_sqrt + h.eps);
}
