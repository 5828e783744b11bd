"""pyllmc.optim.AdamW: torch.optim.AdamW's update in one fused kernel launch per step.

    opt = pyllmc.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    for step ...:
        for group in opt.param_groups: group["lr"] = schedule(step)   # free: no recompilation
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

The math is torch.optim.AdamW's (decoupled weight decay, bias correction, no amsgrad):
    p = p * (1 - lr * wd);  m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g^2
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Precision:
- float32 params: updated in place; the same result as torch.optim.AdamW within float32
  rounding (the "torch" backend is bitwise torch.optim.AdamW(foreach=False)).
- bfloat16 / float16 params with master_weights=True (the default): the optimizer keeps an
  fp32 master copy (state "master"), updates it, and writes the param back from it, rounded
  to nearest even, or for bf16 with stochastic_rounding=True rounded stochastically with a
  counter-based hash of (seed, step, element index): reproducible bit for bit, and the same
  bits on every backend. The master copy is made from the param at the first step: to
  overwrite the weights later, load a state_dict or make a new optimizer.
- bfloat16 / float16 params with master_weights=False: the update reads the param, computes
  in fp32 and rounds straight back into it (m and v stay fp32). Updates smaller than half a
  bf16 ulp of the weight are lost unless stochastic_rounding=True: use it in this mode.
- Gradients may be float32 or the param's dtype. A param whose grad is None is skipped
  (its step count does not advance, as in torch). Sparse gradients: ValueError.

State per param, torch.optim's format: {"step": float32 CPU scalar tensor, "exp_avg",
"exp_avg_sq", and "master" for low-precision params with master weights}, all fp32.
state_dict() / load_state_dict() round-trip exactly (load keeps them fp32, unlike
torch.optim, which would cast them to the param dtype), so training continues bit for bit.

CUDA graphs: the default step reads its step count on the host and passes lr, the bias
corrections and the RNG key by value (CUDA) or through a pinned host copy (Triton), so a
captured step would replay the capture's values for ever; step() refuses to be captured then.
With capturable=True (torch.optim.AdamW's option) the step counts live on the params' device,
lr may be a device tensor (group["lr"].fill_(...) between replays), and each tensor's
hyperparameter row is computed on the device every step, with torch.optim.AdamW(capturable=True)'s
float32 tensor math, and read by the kernels from device memory. Run one step before capturing
(the usual warm-up): it builds the device tables, which nothing may copy from the host during
the capture.

Backends (pyllmc.backend rules with the params' device; backend= pins one):
- "cuda": csrc/adamw.cu, one launch for every tensor of the step (a device table of
  pointers, rebuilt only when a pointer changes; the per-step hyperparameters travel by value
  in the launch). More than 32 distinct (group, step) pairs in one step take one more launch
  per 32.
- "triton": kernels/adamw.py, the same table, one launch per kind of tensor (param dtype,
  grad dtype, master or not, stochastic or not, aligned or not): one per step in practice,
  plus a tiny host-to-device copy of the hyperparameters, from pinned memory so that the
  CPU does not wait for the GPU.
- "torch": a plain per-tensor loop of torch ops, the reference (what CPU training runs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from . import backends as _backends
from .ops._common import graph_capture_underway

# Device table layout, shared with csrc/adamw.cu (AdamWTensor / AdamWHyper) and kernels/adamw.py.
_TABLE_COLUMNS = 10  # param, grad, master, exp_avg, exp_avg_sq, numel, first_chunk, rng_offset, hyper_row, flags
_HYPER_COLUMNS = 8   # decay, 1-beta1, beta2, 1-beta2, sqrt(bias_correction2), eps, step_size, rng key bits
_CUDA_CHUNK = 2048   # elements per CUDA block (adamw_chunk_size() in the extension)
_MAX_ROWS = 32       # hyperparameter rows per launch (kMaxRows in csrc/adamw.cu)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/common.cuh DType
_FLAG_VECTOR = 1 << 8
_FLAG_STOCHASTIC = 1 << 9
_STATE_FP32_KEYS = ("exp_avg", "exp_avg_sq", "master")
_MASK32 = 0xFFFFFFFF


# ---- the counter-based RNG of stochastic rounding (same bits in all three backends) ------

def hash32(x: int) -> int:
    """The "lowbias32" integer hash on a Python int in [0, 2^32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def rng_key(seed: int, step: int) -> int:
    """The 32-bit key of one step: element i of the step draws hash32(lo(i) ^ hash32(hi(i) ^ key))."""
    seed_key = hash32((seed & _MASK32) ^ hash32((seed >> 32) & _MASK32))
    return hash32(seed_key ^ (step & _MASK32))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x * c mod 2^32 for int64 x in [0, 2^32) without int64 overflow: split c in 16-bit halves
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def element_random(index: torch.Tensor, key: int) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) for each int64 element index of the step keyed by `key`."""
    hi = _hash32_tensor((index >> 32) ^ key)
    return _hash32_tensor((index & _MASK32) ^ hi)


def bf16_stochastic_round(x: torch.Tensor, index: torch.Tensor, key: int) -> torch.Tensor:
    """x (float32) rounded to bfloat16 up in magnitude with probability (dropped bits) / 2^16.

    Unbiased (E[result] = x); NaN stays NaN. Adding 16 random bits below bf16's mantissa
    carries into it exactly that often; the result's low 16 bits are zero, so the final
    conversion to bf16 is exact.
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    bits = (bits + (element_random(index, key) & 0xFFFF)) & 0xFFFF0000
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    rounded = bits.view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: a copy from pageable memory makes the CPU
    wait for the GPU's queue (the step would stall on it), a copy from pinned memory does not.
    torch's caching host allocator keeps the pinned block alive until the copy has run."""
    if device.type != "cuda":
        return host.to(device)
    if graph_capture_underway():
        raise RuntimeError("AdamW(capturable=True): a device table would be copied from the host during a CUDA "
                           "graph capture (the first step, or the params, their gradients' addresses or a float "
                           "hyperparameter changed); run step() once outside the capture first, and keep "
                           "gradients in place (zero_grad(set_to_none=False)) between warm-up and capture")
    return host.pin_memory().to(device, non_blocking=True)


# ---- the optimizer ---------------------------------------------------------------------------

@dataclass
class _Item:
    """One param updated this step."""
    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    group: dict
    row_key: tuple     # (group index, step): which hyperparameter row it uses
    rng_offset: int    # its first element's index in the optimizer's RNG index space


@dataclass
class _Hyper:
    """The hyperparameters of one (group, step), in Python floats (double), as torch.optim computes them."""
    decay: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    step_size: float
    bias_correction2_sqrt: float
    key: int

    def row(self) -> list:
        """The float32 row of the kernels (the key goes in as its bits, see _hyper_tensor)."""
        return [self.decay, 1 - self.beta1, self.beta2, 1 - self.beta2, self.bias_correction2_sqrt, self.eps,
                self.step_size, 0.0]


def _check_hyperparameters(where: str, lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, torch.Tensor) and (lr.numel() != 1 or lr.dtype != torch.float32):
        raise ValueError(f"{where}: a tensor lr must hold one float32 value; got {lr.dtype} {tuple(lr.shape)}")
    if not float(lr) >= 0.0:
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {beta}")
    if not float(eps) >= 0.0:
        raise ValueError(f"{where}: eps must be >= 0, got {eps}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}")


class AdamW(torch.optim.Optimizer):
    """AdamW with fused multi-tensor CUDA / Triton kernels and optional fp32 master weights.

    Args:
        params: tensors or param groups (dicts); each group may set its own lr, betas, eps,
            weight_decay, master_weights, stochastic_rounding, seed.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (weight decay is decoupled and
            applied only where weight_decay > 0).
        master_weights: keep an fp32 master copy of bf16/fp16 params (ignored for fp32 params).
        stochastic_rounding: round bf16 params stochastically when writing them back.
        seed: seeds the stochastic rounding (with the step and the element index).
        capturable: step() may be captured in a CUDA graph (see the module docstring); lr may then
            be a 0-dim float32 tensor on the params' device. A setting of the whole optimizer.
        backend: "cuda" | "triton" | "torch" | None (pyllmc's backend resolution for the params' device).
    """

    def __init__(self, params, lr: float = 6e-4, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 master_weights: bool = True, stochastic_rounding: bool = False, seed: int = 0,
                 capturable: bool = False, backend: Optional[str] = None):
        _check_hyperparameters("AdamW", lr, betas, eps, weight_decay)
        if backend is not None and backend not in _backends.BACKENDS:
            raise ValueError(f"AdamW: unknown backend {backend!r}; expected one of {_backends.BACKENDS} or None")
        self.backend = backend
        self._device: Optional[torch.device] = None
        self._table_cache: dict = {}      # launch position -> (key, device table)
        self._chunk_map_cache: dict = {}  # launch position -> (key, device chunk -> tensor map)
        self._constants_cache: Optional[tuple] = None  # capturable: (key, device per-tensor constants)
        self.capturable = bool(capturable)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        master_weights=bool(master_weights), stochastic_rounding=bool(stochastic_rounding),
                        seed=int(seed), capturable=self.capturable)
        super().__init__(params, defaults)

    # ---- construction checks

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        merged = {**self.defaults, **param_group}
        _check_hyperparameters("AdamW param group", merged["lr"], merged["betas"], merged["eps"],
                               merged["weight_decay"])
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"AdamW: params must be tensors, got {type(p).__name__}")
            if p.dtype not in _DTYPE_CODES:
                raise ValueError(f"AdamW: params must have dtype float32, bfloat16 or float16; got {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"AdamW: params must be contiguous (got strides {p.stride()} for shape "
                                 f"{tuple(p.shape)})")
            if p.dtype == torch.float16 and merged["stochastic_rounding"]:
                raise ValueError("AdamW: stochastic_rounding is implemented for bfloat16 params only; "
                                 "got a float16 param")
            if self._device is None:
                self._device = p.device
            elif p.device != self._device:
                raise ValueError(f"AdamW: all params must be on one device; got {p.device} and {self._device}")
        if bool(merged["capturable"]) != self.capturable:
            raise ValueError(f"AdamW: capturable is a setting of the whole optimizer ({self.capturable}); "
                             f"a param group may not change it")
        lr = merged["lr"]
        if isinstance(lr, torch.Tensor):
            if self.capturable and self._device is not None and lr.device != self._device:
                raise ValueError(f"AdamW(capturable=True): a tensor lr must be on the params' device "
                                 f"{self._device}; got {lr.device}")
        super().add_param_group({**param_group, "params": params})

    # ---- state_dict: keep the fp32 state fp32

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict, but m, v and the master copy stay float32 (torch would
        cast them to the param dtype) and every tensor is copied, so training continues exactly."""
        saved_groups = state_dict["param_groups"]
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in saved_groups))
        params = list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_ids) != len(params):
            raise ValueError(f"AdamW.load_state_dict: the state has {len(saved_ids)} params, "
                             f"this optimizer {len(params)}")
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid, {})
            for key in _STATE_FP32_KEYS:
                if key in saved and tuple(saved[key].shape) != tuple(p.shape):
                    raise ValueError(f"AdamW.load_state_dict: state {key!r} has shape {tuple(saved[key].shape)} "
                                     f"but its param has shape {tuple(p.shape)}")
        for group in saved_groups:
            for option in ("amsgrad", "maximize"):
                if group.get(option):
                    raise ValueError(f"AdamW.load_state_dict: {option}=True is not supported")
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a torch.optim.AdamW state lacks pyllmc's options
            for option, default in self.defaults.items():
                group.setdefault(option, default)
            group["capturable"] = self.capturable  # where the step counts live is this optimizer's choice
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            state = self.state[p]
            for key in _STATE_FP32_KEYS:
                if key in saved:
                    state[key] = saved[key].detach().to(device=p.device, dtype=torch.float32,
                                                        memory_format=torch.contiguous_format, copy=True)
            step = saved.get("step")
            if step is not None:
                state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                             device=p.device if self.capturable else "cpu")
        self._table_cache.clear()

    # ---- the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.capturable and graph_capture_underway():
            raise RuntimeError("AdamW.step() is being captured in a CUDA graph, but this optimizer reads its step "
                               "count on the host and passes lr and the bias corrections by value: every replay "
                               "would repeat the captured step's values. Create it with capturable=True")
        items, hypers = self._gather()
        if not items:
            return loss
        backend = _backends.resolve(self.backend, self._device)
        if backend == "torch":
            if self.capturable:
                self._step_torch_capturable(items)
            else:
                self._step_torch(items, hypers)
        else:
            self._step_kernels(items, hypers, backend)
        return loss

    def _gather(self):
        """The params with a gradient (state initialized, step advanced) and their hyperparameter rows."""
        items: list[_Item] = []
        hypers: dict[tuple, _Hyper] = {}
        device_steps = []  # capturable: the step counts, advanced on the device in one launch
        rng_offset = 0
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                offset = rng_offset
                rng_offset += p.numel()
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse or grad.layout != torch.strided:
                    raise ValueError("AdamW does not support sparse gradients")
                if grad.dtype not in (torch.float32, p.dtype):
                    raise ValueError(f"AdamW: a gradient must be float32 or its param's dtype ({p.dtype}); "
                                     f"got {grad.dtype}")
                if grad.device != p.device or grad.shape != p.shape:
                    raise ValueError(f"AdamW: a gradient must match its param's device and shape; got "
                                     f"{grad.device} {tuple(grad.shape)} for {p.device} {tuple(p.shape)}")
                if not p.is_contiguous():
                    raise ValueError("AdamW: params must be contiguous")
                state = self.state[p]
                if not state or (group["master_weights"] and p.dtype != torch.float32 and "master" not in state):
                    self._init_state(p, group, state)  # also: a loaded torch.optim state has no master copy
                if self.capturable:
                    # one hyperparameter row per tensor (its own step count), computed on the device
                    device_steps.append(state["step"])
                    items.append(_Item(p, grad, state, group, ("tensor", len(items)), offset))
                    continue
                state["step"] += 1
                step = int(state["step"].item())
                row_key = (group_index, step)
                if row_key not in hypers:
                    hypers[row_key] = self._hyper(group, step)
                items.append(_Item(p, grad, state, group, row_key, offset))
        if device_steps:
            torch._foreach_add_(device_steps, 1.0)
        return items, hypers

    @staticmethod
    def _init_state(p: torch.Tensor, group: dict, state: dict) -> None:
        """Fills what `state` lacks: zero moments at step 0, the master copy from the param."""
        if "step" not in state:
            # capturable: on the device, where a captured step advances it (torch.optim's format)
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if group["capturable"] else "cpu")
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if p.dtype != torch.float32 and group["master_weights"] and "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True)

    @staticmethod
    def _hyper(group: dict, step: int) -> _Hyper:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        weight_decay = float(group["weight_decay"])
        _check_hyperparameters("AdamW param group", lr, (beta1, beta2), group["eps"], weight_decay)
        # exactly torch.optim.AdamW's Python-float arithmetic
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return _Hyper(decay=1 - lr * weight_decay, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                      eps=float(group["eps"]), step_size=lr / bias_correction1,
                      bias_correction2_sqrt=bias_correction2**0.5, key=rng_key(group["seed"], step))

    def _device_hyper(self, items: list) -> torch.Tensor:
        """capturable: (len(items), 8) float32 on the params' device, row i the hyperparameters of
        items[i], from its device step count and its group's lr (a tensor, or a float), with
        torch.optim.AdamW(capturable=True)'s float32 tensor math, so that a CUDA graph recomputes
        them from what the device holds at each replay. The float hyperparameters travel in a
        cached device table (copied again only when one changes)."""
        groups = [item.group for item in items]
        columns = []
        for g in groups:
            beta1, beta2 = (float(b) for b in g["betas"])
            lr = g["lr"]
            columns.append((1 - beta1, beta1, beta2, 1 - beta2, float(g["weight_decay"]), float(g["eps"]),
                            float("nan") if isinstance(lr, torch.Tensor) else float(lr)))
        seed_keys = [hash32((g["seed"] & _MASK32) ^ hash32((g["seed"] >> 32) & _MASK32)) for g in groups]
        key = (tuple(columns), tuple(seed_keys))
        if self._constants_cache is None or self._constants_cache[0] != key:
            self._constants_cache = (key, (_to_device(torch.tensor(columns, dtype=torch.float32), self._device),
                                           _to_device(torch.tensor(seed_keys, dtype=torch.int64), self._device)))
        constants, seed_key = self._constants_cache[1]
        one_minus_beta1, beta1, beta2, one_minus_beta2, weight_decay, eps, float_lr = constants.unbind(1)
        lr = torch.stack([g["lr"].reshape(()) if isinstance(g["lr"], torch.Tensor) else float_lr[i]
                          for i, g in enumerate(groups)])
        step = torch.stack([item.state["step"] for item in items])  # (n,) float32
        bias_correction1 = 1 - beta1.pow(step)
        bias_correction2 = 1 - beta2.pow(step)
        rng = _hash32_tensor(seed_key ^ (step.to(torch.int64) & _MASK32))  # rng_key(seed, step) on the device
        rng_bits = torch.where(rng >= 2**31, rng - 2**32, rng).to(torch.int32).view(torch.float32)
        return torch.stack([1 - lr * weight_decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2.sqrt(),
                            eps, lr / bias_correction1, rng_bits], dim=1)

    # ---- torch backend: the reference

    def _step_torch(self, items: list, hypers: dict) -> None:
        for item in items:
            h = hypers[item.row_key]
            p, state = item.param, item.state
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            if p.dtype == torch.float32:
                target = p
            else:
                target = state["master"] if "master" in state else p.float()
            grad = item.grad.float()
            # torch.optim.AdamW's single-tensor update, op for op
            if h.weight_decay != 0:
                target.mul_(h.decay)
            exp_avg.lerp_(grad, 1 - h.beta1)
            exp_avg_sq.mul_(h.beta2).addcmul_(grad, grad, value=1 - h.beta2)
            denom = (exp_avg_sq.sqrt() / h.bias_correction2_sqrt).add_(h.eps)
            target.addcdiv_(exp_avg, denom, value=-h.step_size)
            if target is not p:
                if p.dtype == torch.bfloat16 and item.group["stochastic_rounding"]:
                    index = torch.arange(p.numel(), dtype=torch.int64, device=p.device) + item.rng_offset
                    p.copy_(bf16_stochastic_round(target.reshape(-1), index, h.key).view(p.shape))
                else:
                    p.copy_(target)  # round to nearest even

    def _step_torch_capturable(self, items: list) -> None:
        """torch.optim.AdamW(capturable=True, foreach=False)'s update, op for op: every per-step
        value is a device tensor (the step count, lr when it is one)."""
        for item in items:
            p, state, group = item.param, item.state, item.group
            exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
            lr, weight_decay, eps = group["lr"], float(group["weight_decay"]), float(group["eps"])
            beta1, beta2 = (float(b) for b in group["betas"])
            target = p if p.dtype == torch.float32 else (state["master"] if "master" in state else p.float())
            grad = item.grad.float()
            if weight_decay != 0:
                target.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size_neg = (lr / bias_correction1).neg()
            denom = (exp_avg_sq.sqrt() / (bias_correction2.sqrt() * step_size_neg)).add_(eps / step_size_neg)
            target.addcdiv_(exp_avg, denom)
            if target is not p:
                if p.dtype == torch.bfloat16 and group["stochastic_rounding"]:
                    seed = group["seed"]
                    key = _hash32_tensor(hash32((seed & _MASK32) ^ hash32((seed >> 32) & _MASK32))
                                         ^ (step.to(torch.int64) & _MASK32))
                    index = torch.arange(p.numel(), dtype=torch.int64, device=p.device) + item.rng_offset
                    p.copy_(bf16_stochastic_round(target.reshape(-1), index, key).view(p.shape))
                else:
                    p.copy_(target)

    # ---- cuda / triton backends

    def _step_kernels(self, items: list, hypers: dict, backend: str) -> None:
        if backend == "cuda":
            chunk = _CUDA_CHUNK
        else:
            from .ops._common import triton_kernels

            chunk = triton_kernels("adamw").block_size(self._device)
        rows = []  # per item: the table row without first_chunk / hyper_row, plus its kind
        grads = []  # keeps contiguous / aligned copies of gradients alive until the launch
        for item in items:
            p, state = item.param, item.state
            grad = item.grad if item.grad.is_contiguous() else item.grad.contiguous()
            if grad.data_ptr() % 16 != 0:
                grad = grad.clone()
            grads.append(grad)
            master = state.get("master")
            pointers = (p.data_ptr(), grad.data_ptr(), 0 if master is None else master.data_ptr(),
                        state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr())
            aligned = all(ptr % 16 == 0 for ptr in pointers)
            stochastic = p.dtype == torch.bfloat16 and bool(item.group["stochastic_rounding"])
            flags = (_DTYPE_CODES[p.dtype] | (_DTYPE_CODES[grad.dtype] << 4) | (_FLAG_VECTOR if aligned else 0)
                     | (_FLAG_STOCHASTIC if stochastic else 0))
            kind = () if backend == "cuda" else (p.dtype, grad.dtype, master is not None, stochastic, aligned)
            rows.append((kind, pointers, p.numel(), item.rng_offset, item.row_key, flags))

        # Launches: one per kind (triton) and per _MAX_ROWS hyperparameter rows (rows passed by
        # value; capturable: all rows in one device table, read by the kernel, any number of them).
        launches: dict = {}
        for row in rows:
            launches.setdefault(row[0], []).append(row)
        position = 0
        if self.capturable:
            device_hyper = self._device_hyper(items)
            local = {item.row_key: i for i, item in enumerate(items)}
            for kind, kind_rows in launches.items():
                self._launch(backend, position, kind, kind_rows, None, local, chunk, device_hyper)
                position += 1
            del grads
            return
        for kind, kind_rows in launches.items():
            row_keys = list(dict.fromkeys(r[4] for r in kind_rows))
            for start in range(0, len(row_keys), _MAX_ROWS):
                batch_keys = row_keys[start:start + _MAX_ROWS]
                local = {k: i for i, k in enumerate(batch_keys)}
                batch = [r for r in kind_rows if r[4] in local]
                self._launch(backend, position, kind, batch, [hypers[k] for k in batch_keys], local, chunk)
                position += 1
        del grads

    def _launch(self, backend: str, position: int, kind: tuple, batch: list, hyper_rows: Optional[list],
                local: dict, chunk: int, device_hyper: Optional[torch.Tensor] = None) -> None:
        """One kernel launch over `batch`; its hyperparameters: the host rows `hyper_rows`, or
        (capturable) the device table `device_hyper`, whose row local[row_key] is a tensor's."""
        device = self._device
        counts = tuple(-(-numel // chunk) for _, _, numel, _, _, _ in batch)
        table_rows, first_chunk = [], 0
        for (_, pointers, numel, rng_offset, row_key, flags), count in zip(batch, counts):
            table_rows.append((*pointers, numel, first_chunk, rng_offset, local[row_key], flags))
            first_chunk += count
        num_chunks = first_chunk
        if num_chunks == 0:
            return
        table = self._cached(self._table_cache, position, (backend, tuple(table_rows)),
                             lambda: _to_device(torch.tensor(table_rows, dtype=torch.int64), device))
        chunk_map = self._cached(self._chunk_map_cache, position, (backend, chunk, counts),
                                 lambda: _to_device(torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32),
                                                                            torch.tensor(counts)), device))
        if device_hyper is None:
            hyper = torch.tensor([h.row() for h in hyper_rows], dtype=torch.float32)
            hyper.view(torch.int32)[:, _HYPER_COLUMNS - 1] = torch.tensor(
                [h.key - 2**32 if h.key >= 2**31 else h.key for h in hyper_rows], dtype=torch.int32)
        if backend == "cuda":
            from .ops._common import cuda_ext, cuda_launch

            with cuda_launch(table) as stream:
                if device_hyper is not None:  # read by the kernel when it runs: what a graph replay needs
                    cuda_ext().adamw_step_device_hyper(tensors=table.data_ptr(), num_tensors=len(table_rows),
                                                       chunk_to_tensor=chunk_map.data_ptr(), num_chunks=num_chunks,
                                                       chunk_size=chunk, hyper=device_hyper.data_ptr(),
                                                       num_hyper_rows=device_hyper.shape[0], stream=stream)
                else:  # hyper stays on the host: the launcher copies its rows into the launch's parameters
                    cuda_ext().adamw_step(tensors=table.data_ptr(), num_tensors=len(table_rows),
                                          chunk_to_tensor=chunk_map.data_ptr(), num_chunks=num_chunks,
                                          chunk_size=chunk, hyper=hyper.data_ptr(), num_hyper_rows=len(hyper_rows),
                                          stream=stream)
        else:
            from .ops._common import triton_kernels, triton_launch

            param_dtype, grad_dtype, has_master, stochastic, aligned = kind
            with triton_launch(table):
                triton_kernels("adamw").adamw_step(
                    table, chunk_map, _to_device(hyper, device) if device_hyper is None else device_hyper,
                    param_dtype=param_dtype, grad_dtype=grad_dtype, has_master=has_master, stochastic=stochastic,
                    aligned=aligned, block_size=chunk)

    @staticmethod
    def _cached(cache: dict, position: int, key, build):
        hit = cache.get(position)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        cache[position] = (key, value)
        return value
