"""Training many models of one shape together: an Adam over stacked parameters with per-model settings."""
from typing import Iterable, List, Optional, Sequence, Union

import torch

__all__ = ["StackedAdam"]

_PerModel = Union[float, torch.Tensor, Sequence[float]]


class StackedAdam(torch.optim.Optimizer):
    """Adam over stacked parameters (a leading model dimension M on every parameter, as
    :func:`torch.func.stack_module_state` makes them), with a learning rate and a weight
    decay per model and a mask of the models that step (per-model early stopping).

    ``torch.optim.Adam`` takes one learning rate for a whole tensor (a tensor ``lr`` must
    have one element), so a hyperparameter study over the learning rate could not share one
    optimizer step across its models. Here ``lr`` and ``weight_decay`` are a float (every
    model) or M values, one per model; model ``i`` is updated exactly as
    ``torch.optim.Adam(lr=lr[i], weight_decay=weight_decay[i], ...)`` (the default for-loop
    / foreach algorithm, not ``fused``) would update it alone: on the CPU the same results
    bit for bit, float32 and float64 (each operation is the one torch's Adam applies, with
    the per-model factors broadcast over the model dimension); on CUDA to rounding (torch's
    CUDA kernels may fuse a multiply-add or take a reciprocal where the CPU divides).

    Early stopping: ``step(active=mask)`` updates only the models whose entry is True; a
    stopped model's parameters, moment estimates and step count stay untouched (its gradient
    is not read, so it may be anything), and it resumes where it stopped if its entry turns
    True again. Each model counts its own steps for Adam's bias correction.

    The state (``exp_avg``, ``exp_avg_sq`` of the parameter's shape, ``step`` a float32 CPU
    tensor of M counts) goes through ``state_dict`` / ``load_state_dict`` as any optimizer's.
    The per-model settings can be changed between steps by assigning
    ``param_groups[k]["lr"]`` (a float or M values); torch's learning-rate schedulers expect
    one number per group and do not apply to a per-model ``lr``.

    Args:
        params: the stacked parameters (an iterable of tensors, or of dicts as for any
            torch optimizer), each with the same leading dimension M.
        lr: the learning rate: a float, or M values (a 1-D tensor or a sequence).
        betas: Adam's (beta1, beta2), shared by every model.
        eps: added to the denominator, shared.
        weight_decay: L2 penalty (added to the gradient, as in ``torch.optim.Adam``): a float
            or M values.
        decoupled_weight_decay: decay the parameters directly instead (AdamW,
            ``torch.optim.Adam(decoupled_weight_decay=True)``).

    Per-model values given as a tensor are read to the host once per step (on a GPU, a
    small copy; keep them on the CPU to avoid it).

    Example::

        params, buffers = torch.func.stack_module_state(models)   # M models
        opt = StackedAdam(params.values(), lr=torch.logspace(-4, -2, len(models)))
        losses = torch.func.vmap(loss_fn, in_dims=(0, 0, None, None))(params, buffers, x, y)
        opt.zero_grad()
        losses.sum().backward()
        opt.step(active=~stopped)
    """

    def __init__(self, params: Iterable, lr: _PerModel = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: _PerModel = 0.0, *, decoupled_weight_decay: bool = False) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats (beta1, beta2); got {betas!r}")
        for name, value, lo, hi in (("betas[0]", betas[0], 0.0, 1.0), ("betas[1]", betas[1], 0.0, 1.0)):
            if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float; got {type(value).__name__}")
            if not lo <= value < hi:
                raise ValueError(f"{name} must be in [0, 1); got {value}")
        if isinstance(eps, (torch.Tensor, bool)) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a float; got {type(eps).__name__}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0; got {eps}")
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=weight_decay, decoupled_weight_decay=bool(decoupled_weight_decay))
        super().__init__(params, defaults)
        for group in self.param_groups:
            m = self._num_models(group)
            self._per_model(group["lr"], m, "lr")
            self._per_model(group["weight_decay"], m, "weight_decay")

    # ---- validation ----

    @staticmethod
    def _num_models(group: dict) -> int:
        """M, the leading dimension every parameter of the group shares."""
        m = None
        for p in group["params"]:
            if p.dim() == 0:
                raise ValueError("params: every parameter needs a leading model dimension (stacked, "
                                 "e.g. by torch.func.stack_module_state); got a 0-dim tensor")
            if m is None:
                m = p.shape[0]
            elif p.shape[0] != m:
                raise ValueError(f"params: every parameter must have the same leading model dimension; "
                                 f"got {m} and {p.shape[0]}")
            if p.is_complex():
                raise TypeError("params: complex parameters are not supported")
        if m is None:
            raise ValueError("params: an empty parameter group")
        return m

    @staticmethod
    def _per_model(value, m: int, name: str) -> List[float]:
        """A float or M values -> M Python floats (the numbers torch's Adam would be given)."""
        if isinstance(value, bool):
            raise TypeError(f"{name} must be a float or {m} values; got a bool")
        if isinstance(value, (int, float)):
            values = [float(value)] * m
        elif isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.numel() != m:
                raise ValueError(f"{name} must be a float or a 1-D tensor of {m} values (one per model); "
                                 f"got shape {tuple(value.shape)}")
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name} must hold real numbers; got {value.dtype}")
            values = [float(v) for v in value.detach().tolist()]
        elif isinstance(value, (list, tuple)):
            if len(value) != m:
                raise ValueError(f"{name} must be a float or {m} values (one per model); got {len(value)}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise TypeError(f"{name} must hold floats")
            values = [float(v) for v in value]
        else:
            raise TypeError(f"{name} must be a float or {m} values (one per model); got {type(value).__name__}")
        for v in values:
            if not (v >= 0.0 and v != float("inf")):
                raise ValueError(f"{name} must be finite and >= 0 for every model; got {v}")
        return values

    @staticmethod
    def _active(active, m: int) -> List[bool]:
        if active is None:
            return [True] * m
        if isinstance(active, torch.Tensor):
            if active.dtype != torch.bool:
                raise TypeError(f"active must be a bool mask; got dtype {active.dtype}")
            if active.dim() != 1 or active.numel() != m:
                raise ValueError(f"active must have one entry per model ({m}); got shape {tuple(active.shape)}")
            return [bool(a) for a in active.tolist()]
        if isinstance(active, (list, tuple)):
            if len(active) != m:
                raise ValueError(f"active must have one entry per model ({m}); got {len(active)}")
            if not all(isinstance(a, bool) for a in active):
                raise TypeError("active must hold bools")
            return list(active)
        raise TypeError(f"active must be a bool tensor or a sequence of bools; got {type(active).__name__}")

    # ---- the step ----

    @torch.no_grad()
    def step(self, closure=None, *, active: Optional[Union[torch.Tensor, Sequence[bool]]] = None):
        """One Adam step of every active model.

        Args:
            closure: re-evaluates the model and returns the loss (as for any torch optimizer).
            active: a bool mask of the M models (a 1-D tensor or a sequence); only the True
                ones step. None: every model.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            m = self._num_models(group)
            mask = self._active(active, m)
            self._group_step(group, m, mask)
        return loss

    def _group_step(self, group: dict, m: int, mask: List[bool]) -> None:
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        lrs = self._per_model(group["lr"], m, "lr")
        wds = self._per_model(group["weight_decay"], m, "weight_decay")
        rows = [i for i in range(m) if mask[i]]
        if not rows:
            return
        everyone = len(rows) == m
        # the small per-model tensors, made once per step for the parameters that share them
        made = {}

        def per_model(values: List[float], like: torch.Tensor) -> torch.Tensor:
            """(len(values), 1, ..., 1) in like's dtype and device: broadcast over each model's slice."""
            key = (tuple(values), like.dtype, like.device)
            if key not in made:
                made[key] = torch.tensor(values, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
            t = made[key]
            return t.view((len(values),) + (1,) * (like.dim() - 1))

        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("StackedAdam does not take sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros(m, dtype=torch.float32)  # like torch's Adam: float32, CPU
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = state["step"]
            if everyone:
                steps.add_(1.0)
            else:
                steps[rows] += 1.0
            counts = steps.tolist()
            # torch's Adam computes these in Python floats (double) from the step count and passes
            # them as scalars, which the kernels round to the parameter's dtype; the per-model
            # tensors below hold the same roundings, so every elementwise operation matches.
            step_size, bc2_sqrt, wd, decay = [], [], [], []
            for i in rows:
                bias_correction1 = 1 - beta1 ** counts[i]
                bias_correction2 = 1 - beta2 ** counts[i]
                step_size.append((lrs[i] / bias_correction1) * -1)
                bc2_sqrt.append(bias_correction2 ** 0.5)
                wd.append(wds[i])
                decay.append(1 - lrs[i] * wds[i])

            if everyone:
                param, grad, exp_avg, exp_avg_sq = p, p.grad, state["exp_avg"], state["exp_avg_sq"]
            else:
                if ("index", p.device) not in made:
                    made["index", p.device] = torch.tensor(rows, device=p.device)
                index = made["index", p.device]
                param, grad = p.index_select(0, index), p.grad.index_select(0, index)
                exp_avg, exp_avg_sq = state["exp_avg"].index_select(0, index), state["exp_avg_sq"].index_select(0, index)

            if any(w != 0 for w in wd):
                if group["decoupled_weight_decay"]:
                    param.mul_(per_model(decay, p))  # torch: param.mul_(1 - lr * weight_decay)
                else:
                    # torch: grad.add(param, alpha=weight_decay), one fused multiply-add per element
                    # on the CPU; addcmul with the factor as a tensor rounds the same way.
                    grad = torch.addcmul(grad, param, per_model(wd, p))
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / per_model(bc2_sqrt, p)).add_(eps)
            # torch: param.addcdiv_(exp_avg, denom, value=-step_size), which the CPU kernel
            # evaluates as param + (value * exp_avg) / denom: the factor goes on exp_avg first.
            param.addcdiv_(exp_avg * per_model(step_size, p), denom)

            if not everyone:
                p.index_copy_(0, index, param)
                state["exp_avg"].index_copy_(0, index, exp_avg)
                state["exp_avg_sq"].index_copy_(0, index, exp_avg_sq)
