"""Autograd for the fused ops: one torch.autograd.Function per layer kind (dense, conv,
Hamiltonian), whose setup_context/backward are also registered with
torch.library.register_autograd, so the ops differentiate when called directly and under
torch.compile.

Each forward op runs all N steps and returns the saved states (every K-th state and the
last, all N + 1 when K = 1); each backward op runs the adjoint sweep with the paper's
eq. 23 accumulation of coefficient gradients.

Legend: B batch, m width, C channels, n = L + d coefficients, N steps, K checkpoint interval.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

try:  # what Function.apply does to its arguments outside torch.func transforms (see _apply)
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - a torch without it: Function.apply itself
    _unwrap_dead_wrappers = None

from . import _cuda_archs, _ext
from ._dispatch import register_backend

__all__ = ["SplineDenseFunction", "SplineDenseSavedFunction", "SplineConvFunction", "SplineHamiltonianFunction", "spline_ode_fused",
           "spline_ode_conv_fused", "spline_ode_hamiltonian_fused", "layer_function", "run_layer"]


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the fused backward's gradients; differentiating them raises (the adjoint
    kernels have no derivative of their own)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(k, *tensors):
        # tensors: k gradients, then anchors (the layer's inputs that need gradients), inputs
        # only so that the outputs are part of the graph whenever the layer's inputs are.
        return tuple(g.view_as(g) for g in tensors[:k])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("splinet_cuda: double backward through the fused layers is not supported; "
                           "use backend='reference' for higher-order gradients")


def _loop_vmap_rule(fn: type) -> Callable:
    """torch.func.vmap rule of a layer Function: the layer once per slice of the mapped inputs
    (per-sample gradients, Jacobians), outputs stacked on dim 0. The fused kernels batch over
    B already; a vmapped dimension usually maps parameters (per-sample weights), which no
    single launch takes."""

    def vmap(info, in_dims, *inputs):
        outs = []
        for i in range(info.batch_size):
            args = [a.select(d, i) if d is not None and isinstance(a, torch.Tensor) else a
                    for a, d in zip(inputs, in_dims)]
            outs.append(fn.apply(*args))
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        stacked = tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))
        return stacked, (0,) * len(stacked)

    return vmap


def _first_order_only(grads, anchors):
    """The backward's gradients (None where absent), passed through _FirstOrderOnly when a
    graph is being built (create_graph=True, or torch.func's grad / vjp / jacrev, which always
    build it): a node that depends on every input (``anchors``) and raises if the gradients
    are differentiated again, so first-order transforms work and double backward fails with
    the reason (never a silent zero)."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    present = [g for g in grads if g is not None]
    out = iter(_FirstOrderOnly.apply(len(present), *present, *anchors))
    return tuple(None if g is None else next(out) for g in grads)


def _apply(fn: type, *args):
    """``fn.apply(*args)``, all arguments positional. Function.apply binds its arguments to
    ``forward``'s signature with inspect on every call (for defaults, which these forwards
    do not have): about 80 Python calls, 5% of a small layer's fwd+bwd (bench case ``sin``,
    B = 256, m = 4: ``python -m bench --sizes cpu``). Outside torch.func transforms and
    torch.compile's tracing, where Function.apply does nothing else, this calls the C++
    apply directly."""
    if (_unwrap_dead_wrappers is None or torch._C._are_functorch_transforms_active()
            or torch.compiler.is_compiling()):
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*_unwrap_dead_wrappers(args))


def _below_autograd(fn: Callable, *args):
    """``fn(*args)`` dispatched straight past the Autograd key, for a forward op called inside
    an autograd.Function's forward (which makes the graph itself): the op's own
    torch.library autograd wrapper, there for direct calls of the op, would otherwise bind
    its arguments in Python on every call, about a fifth of a small layer's fwd+bwd (bench
    case ``sin``).
    While torch.compile traces, the call is left to it."""
    if torch.compiler.is_compiling():
        return fn(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return fn(*args)


def layer_function(name: str, fwd: Callable[[], Callable], bwd: Callable[[], Callable]) -> type:
    """An autograd.Function over a layer's op pair, ``fwd()`` / ``bwd()`` (looked up lazily:
    the C++ ops of torch.ops.splinet_cuda, or the Triton ops of splinet_cuda/_triton.py).

    ``apply(...)`` returns ``(x_N, states)``; the saved states are not differentiable, so
    the backward op gets dLoss/dx_N alone and no zero-filled gradient of every state is
    built. ``op_setup_context``/``op_backward`` are the op's own autograd (registered with
    torch.library), used when the whole trajectory is the output.
    """
    op = fwd

    def run_backward(ctx, grad):
        x, states, weight, bias, scale = ctx.saved_tensors
        gx, gw, gb, gs = bwd()(grad, states, weight, bias, scale, *ctx.config)
        anchors = [t for t in (x, weight, bias, scale, grad) if t is not None]
        grads = _first_order_only((gx, gw, gb if ctx.has_bias else None, gs), anchors)
        return grads + (None,) * len(ctx.config)

    def save(ctx, inputs, states):
        x, weight, bias, scale, *config = inputs
        ctx.config = tuple(config)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, states, weight, bias, scale)

    def forward(*inputs):
        states = _below_autograd(op(), *inputs)
        return states[-1].clone(), states

    def setup_context(ctx, inputs, output):
        save(ctx, inputs, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient for all states

    def backward(ctx, grad_last, grad_states):
        if grad_last is None:  # x_N unused by the loss (grads are not materialised)
            grad_last = torch.zeros_like(ctx.saved_tensors[1][-1])
        return run_backward(ctx, grad_last)

    def op_setup_context(ctx, inputs, output):
        save(ctx, inputs, output)

    # Where Function.apply itself runs (torch.func transforms, tracing; see _apply) it binds
    # its arguments to inspect.signature(forward) on every call: a precomputed signature
    # saves rebuilding it.
    forward.__signature__ = inspect.signature(forward)

    def trajectory_forward(*inputs):
        return _below_autograd(op(), *inputs)

    trajectory_forward.__signature__ = inspect.signature(trajectory_forward)
    # The whole trajectory under torch.func: its grad does not differentiate an op's
    # torch.library autograd (the generated Function has no setup_context), so the trajectory
    # takes a Function of its own there (the op's autograd, as a Function).
    trajectory = type(f"{name}Trajectory", (torch.autograd.Function,), {
        "__doc__": "The forward op's trajectory (all saved states, differentiable) under torch.func transforms.",
        "forward": staticmethod(trajectory_forward), "setup_context": staticmethod(op_setup_context),
        "backward": staticmethod(run_backward)})
    trajectory.vmap = staticmethod(_loop_vmap_rule(trajectory))

    doc = ("Fused layer: the forward op runs all N steps (returns x_N and the saved states), the backward op "
           "the adjoint sweep with the eq. 23 accumulation.")
    cls = type(name, (torch.autograd.Function,), {
        "__doc__": doc, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "op_setup_context": staticmethod(op_setup_context),
        "op_backward": staticmethod(run_backward), "op": staticmethod(op), "trajectory": trajectory})
    cls.vmap = staticmethod(_loop_vmap_rule(cls))
    return cls


def _cpp_op(name: str) -> Callable[[], Callable]:
    return lambda: getattr(torch.ops.splinet_cuda, name)


SplineDenseFunction = layer_function("SplineDenseFunction", _cpp_op("spline_dense_fwd"), _cpp_op("spline_dense_bwd"))
SplineConvFunction = layer_function("SplineConvFunction", _cpp_op("spline_conv_fwd"), _cpp_op("spline_conv_bwd"))
# The Hamiltonian ops take the states packed, x = [y | z] (B, 2m), and the dense schema
# (scheme "verlet", variant "hamiltonian"), so the same wrapper serves them.
SplineHamiltonianFunction = layer_function("SplineHamiltonianFunction", _cpp_op("spline_hamiltonian_fwd"),
                                           _cpp_op("spline_hamiltonian_bwd"))


def saved_function(name: str, fwd: Callable[[], Callable], bwd: Callable[[], Callable], doc: str) -> type:
    """An autograd Function over a CPU op pair that keeps what its backward would recompute
    (``spline_{dense,conv}_fwd_saved`` / ``_bwd_saved``: the states and a value of each
    step's stages, for dense the activations, or for softplus the pre-activations, and its
    blended weights; for conv the pre-activations): ``apply(...)`` returns
    ``(x_N, states, *kept)``, none but x_N differentiable; the backward reads them instead
    of replaying each step's forward product (the gradients are those of the plain op pair,
    bit for bit)."""

    def forward(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma):
        states, *kept = fwd()(x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma)
        return (states[-1].clone(), states, *kept)

    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, *config = inputs
        _, states, *kept = output
        ctx.config = tuple(config)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, states, *kept, weight, bias, scale)
        ctx.mark_non_differentiable(states, *kept)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_last, grad_states, *grad_kept):
        x, states, *kept, weight, bias, scale = ctx.saved_tensors
        if grad_last is None:
            grad_last = torch.zeros_like(states[-1])
        gx, gw, gb, gs = bwd()(grad_last, states, *kept, weight, bias, scale, *ctx.config)
        anchors = [t for t in (x, weight, bias, scale, grad_last) if t is not None]
        grads = _first_order_only((gx, gw, gb if ctx.has_bias else None, gs), anchors)
        return grads + (None,) * len(ctx.config)

    forward.__signature__ = inspect.signature(forward)  # as in layer_function
    cls = type(name, (torch.autograd.Function,), {
        "__doc__": doc, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})
    cls.vmap = staticmethod(_loop_vmap_rule(cls))
    return cls


SplineDenseSavedFunction = saved_function(
    "SplineDenseSavedFunction", _cpp_op("spline_dense_fwd_saved"), _cpp_op("spline_dense_bwd_saved"),
    "The dense layer keeping its stages' activations and blended weights (see saved_function): fwd+bwd takes "
    "3 products a step instead of 4, and the backward blends no weight and recomputes no activation (but "
    "softplus).")
SplineConvSavedFunction = saved_function(
    "SplineConvSavedFunction", _cpp_op("spline_conv_fwd_saved"), _cpp_op("spline_conv_bwd_saved"),
    "The conv layer keeping its pre-activations (see saved_function): fwd+bwd takes 3 convolutions a stage "
    "instead of 4 (standard variant).")

# A CPU layer that keeps every state anyway (checkpoint=None) keeps what its backward would
# recompute too (the dense layer N S B m stage values and N S m^2 blended weights; the conv
# layer N S B C P pre-activations): the replay of each step's forward product is a quarter
# of fwd+bwd's arithmetic, and measured fwd+bwd on 2 threads it saved 20% at m = 64 and more
# from m = 128. At the paper's sizes it saved 14-20% on row-major chunks; on the transposed
# ones (m <= 8, B >= 256) it ties at m = 4 and costs about 10% at m = 5 (writing and reading
# back the kept values costs more than that cheap product). checkpoint= never keeps them: it
# is the memory-saving mode.
# Set by _register (plain bools: torch.compile traces _keeps_preact).
_HAS_SAVED_OPS = False
_HAS_CONV_SAVED_OPS = False


def _keeps_preact(x: torch.Tensor, checkpoint: Optional[int], return_trajectory: bool,
                  grad_needed: bool = True, conv: bool = False) -> bool:
    if not (grad_needed and checkpoint is None and not return_trajectory and x.device.type == "cpu"):
        return False
    return _HAS_CONV_SAVED_OPS if conv else _HAS_SAVED_OPS


def _grad_needed(*tensors) -> bool:
    # Without a backward (inference, torch.no_grad) nothing is kept.
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def run_layer(fn: type, x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma, return_trajectory,
         checkpoint: Optional[int]) -> torch.Tensor:
    """Runs a layer on its fused op pair: x_N through ``fn`` (no gradient of the saved
    states), or the whole trajectory through the forward op's registered autograd."""
    K = 1 if (checkpoint is None or return_trajectory) else int(checkpoint)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=x.dtype, device=x.device)
    args = (x, weight, bias, scale, steps, degree, activation, scheme, variant, float(gamma), K)
    if return_trajectory:  # the op itself, differentiable through its registered autograd
        if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
            return _apply(fn.trajectory, *args)
        return fn.op()(*args)
    if torch.compiler.is_compiling() and _under_vmap():
        # Dynamo cannot trace a Function's vmap rule (torch 2.13); it traces the op's
        # (torch.library.register_vmap), differentiable through its registered autograd.
        return fn.op()(*args)[-1]
    return _apply(fn, *args)[0]


def spline_ode_fused(x, weight, bias, scale, *, steps, degree, activation="tanh", scheme="euler",
                     variant="standard", gamma=0.0, return_trajectory=False, checkpoint=None):
    """The dense layer on the fused ops (arguments validated by splinet_cuda.spline_ode); CPU
    layers that keep every state keep their stage activations and blended weights too
    (SplineDenseSavedFunction)."""
    # Under torch.func.vmap the plain pair runs, whose vmap rules fold the mapped dimension into
    # one call of the model-dim ops (the kept tensors have no model-dim ops).
    if _keeps_preact(x, checkpoint, return_trajectory, _grad_needed(x, weight, bias, scale)) and not _under_vmap():
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scale), dtype=x.dtype, device=x.device)
        return _apply(SplineDenseSavedFunction, x, weight, bias, scale, steps, degree, activation, scheme,
                      variant, float(gamma))[0]
    return run_layer(SplineDenseFunction, x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma,
                return_trajectory, checkpoint)


def spline_ode_conv_fused(x, weight, bias, scale, *, steps, degree, activation="relu", scheme="euler",
                          variant="standard", gamma=0.0, return_trajectory=False, checkpoint=None):
    """The conv layer on the fused ops (arguments validated by splinet_cuda.spline_ode_conv); CPU
    layers that keep every state keep their pre-activations too (SplineConvSavedFunction)."""
    if _keeps_preact(x, checkpoint, return_trajectory, _grad_needed(x, weight, bias, scale), conv=True):
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scale), dtype=x.dtype, device=x.device)
        return _apply(SplineConvSavedFunction, x, weight, bias, scale, steps, degree, activation, scheme,
                      variant, float(gamma))[0]
    return run_layer(SplineConvFunction, x, weight, bias, scale, steps, degree, activation, scheme, variant, gamma,
                return_trajectory, checkpoint)


def spline_ode_hamiltonian_fused(y, z, weight, bias, scale, *, steps, degree, activation="tanh",
                                 return_trajectory=False, checkpoint=None):
    """The Hamiltonian layer on the fused ops (arguments validated by
    splinet_cuda.spline_ode_hamiltonian): (y_N, z_N), or their trajectories."""
    m = y.shape[1]
    x = torch.cat([y, z], dim=1)
    out = run_layer(SplineHamiltonianFunction, x, weight, bias, scale, steps, degree, activation, "verlet",
                    "hamiltonian", 0.0, return_trajectory, checkpoint)
    return out[..., :m], out[..., m:]


# --- torch.func.vmap: many models in one kernel call ---------------------------------------
#
# vmap over models (an ensemble: torch.func.stack_module_state + functional_call) or over
# samples (per-sample gradients) reaches the dense layer's rules in two places: the forward
# through SplineDenseFunction.vmap (torch.func calls a Function's vmap staticmethod; the
# trajectory's Function, SplineDenseFunction.trajectory, likewise), the backward (run by grad
# / vjp at a level above the vmap, on batched tensors) through the backward ops' rules,
# torch.library.register_vmap (spline_dense_bwd; spline_dense_bwd_saved for jacrev, whose
# forward ran outside the vmap); the forward op has one too (torch.compile, direct calls).
# Each runs the model-dim ops (spline_dense_fwd_models / _bwd_models): the mapped dimension
# becomes their leading model dimension and an unmapped tensor a shared one (a size-1 leading
# dim, no copy). Per-sample gradients are model-dim too: the input is mapped, the weights
# shared, and the backward returns each slice's weight gradient (a batch folded into one model
# would sum them). A gradient taken above the vmap differentiates the model-dim ops
# (SplineDenseModelsFunction, and the forward op's registered autograd). What they do not
# take (another device, the conv and Hamiltonian layers, a vmap of a vmap's outer level) runs
# once per slice (_loop_vmap_rule, _loop_op_vmap).

_HAS_MODEL_OPS = False  # set by _register: the CPU model-dim ops are built
_MODEL_DTYPES = (torch.float32, torch.float64)

try:
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter as _current_interpreter

    _VMAP_TRANSFORM = torch._C._functorch.TransformType.Vmap
except (ImportError, AttributeError):  # pragma: no cover - a torch without them: no vmap to detect
    _VMAP_TRANSFORM = None


def _under_vmap() -> bool:
    """Whether a torch.func.vmap is active around this call (the layer then takes the op pair
    whose vmap rules fold the mapped dimension)."""
    if _VMAP_TRANSFORM is None or not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():  # what Dynamo traces: the innermost transform
        return _current_interpreter().key() == _VMAP_TRANSFORM
    return any(i.key() == _VMAP_TRANSFORM for i in torch._C._functorch.get_interpreter_stack())


def _foldable(*tensors) -> bool:
    """Whether the model-dim ops take these tensors (CPU, float32 / float64)."""
    return _HAS_MODEL_OPS and all(t is None or (t.device.type == "cpu" and t.dtype in _MODEL_DTYPES)
                                  for t in tensors)


def _with_model_dim(tensors, in_dims):
    """Each tensor with its mapped dimension first, or with a leading dimension of 1 (shared by
    every model) where it is not mapped; None stays None."""
    return tuple(None if t is None else (t.movedim(d, 0) if d is not None else t.unsqueeze(0))
                 for t, d in zip(tensors, in_dims))


def _loop_op_vmap(op: Callable) -> Callable:
    """torch.library vmap rule of an op: the op once per slice, outputs stacked on dim 0."""

    def vmap(info, in_dims, *inputs):
        outs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(inputs, in_dims)))
                for i in range(info.batch_size)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        return tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0]))), (0,) * len(outs[0])

    return vmap


def _dense_fwd_models(in_dims, x, weight, bias, scale, config):
    """Every model's saved states, (M, num_saved, B, m), and its out_dim (None when nothing is
    mapped: one model)."""
    mapped = any(d is not None for d in in_dims[:4])
    states = torch.ops.splinet_cuda.spline_dense_fwd_models(*_with_model_dim((x, weight, bias, scale), in_dims),
                                                            *config)
    return (states, 0) if mapped else (states[0], None)


def _dense_function_vmap(info, in_dims, x, weight, bias, scale, *config):
    """SplineDenseFunction's vmap rule: (x_N, states) of every model in one call, through
    SplineDenseModelsFunction (differentiable when a grad or vjp runs above the vmap)."""
    if not _foldable(x, weight, bias, scale):
        return _loop_vmap_rule(SplineDenseFunction)(info, in_dims, x, weight, bias, scale, *config)
    if all(d is None for d in in_dims[:4]):  # nothing mapped: one model
        return SplineDenseFunction.apply(x, weight, bias, scale, *config), (None, None)
    return _apply(SplineDenseModelsFunction, *_with_model_dim((x, weight, bias, scale), in_dims), *config), (0, 0)


def _dense_trajectory_vmap(info, in_dims, x, weight, bias, scale, *config):
    """SplineDenseFunction.trajectory's vmap rule: every model's states in one call (the
    model-dim op, differentiable when a grad or vjp runs above the vmap)."""
    if not _foldable(x, weight, bias, scale):
        return _loop_vmap_rule(SplineDenseFunction.trajectory)(info, in_dims, x, weight, bias, scale, *config)
    return _dense_fwd_models(in_dims, x, weight, bias, scale, config)


def _dense_fwd_vmap(info, in_dims, x, weight, bias, scale, *config):
    """spline_dense_fwd's vmap rule."""
    if not _foldable(x, weight, bias, scale):
        return _loop_op_vmap(torch.ops.splinet_cuda.spline_dense_fwd)(info, in_dims, x, weight, bias, scale, *config)
    return _dense_fwd_models(in_dims, x, weight, bias, scale, config)


def _dense_bwd_vmap(info, in_dims, grad_states, states, weight, bias, scale, *config):
    """spline_dense_bwd's vmap rule: per-model gradients in one call."""
    tensors = (grad_states, states, weight, bias, scale)
    if not _foldable(*tensors):
        return _loop_op_vmap(torch.ops.splinet_cuda.spline_dense_bwd)(info, in_dims, *tensors, *config)
    gx, gw, gb, gs = torch.ops.splinet_cuda.spline_dense_bwd_models(*_with_model_dim(tensors, in_dims), *config)
    return (gx, gw, gb, gs), (0, 0, 0 if bias is not None else None, 0)


def _dense_bwd_saved_vmap(info, in_dims, grad_states, states, preact, blended, weight, bias, scale, *config):
    """spline_dense_bwd_saved's vmap rule (jacrev's vmap over the cotangents of a layer whose
    forward ran outside the vmap): the model-dim backward from the saved states alone, whose
    gradients equal the kept-values backward's bit for bit (it replays what they keep)."""
    tensors = (grad_states, states, weight, bias, scale)
    if not _foldable(*tensors) or in_dims[2] is not None or in_dims[3] is not None:
        return _loop_op_vmap(torch.ops.splinet_cuda.spline_dense_bwd_saved)(
            info, in_dims, grad_states, states, preact, blended, weight, bias, scale, *config)
    dims = (in_dims[0], in_dims[1], *in_dims[4:7])
    grads = torch.ops.splinet_cuda.spline_dense_bwd_models(*_with_model_dim(tensors, dims), *config, 1)
    return grads, (0, 0, 0 if bias is not None else None, 0)


def _dense_models_setup_context(ctx, inputs, output):
    x, weight, bias, scale, *config = inputs
    ctx.config = tuple(config)
    ctx.save_for_backward(x, output, weight, bias, scale)


def _dense_models_backward(ctx, grad):
    """spline_dense_fwd_models' autograd (a grad or vjp above a vmap differentiates what its
    rules ran): per-model gradients, summed over the models for a shared input (a leading
    dim of 1)."""
    x, states, weight, bias, scale = ctx.saved_tensors
    grads = torch.ops.splinet_cuda.spline_dense_bwd_models(grad, states, weight, bias, scale, *ctx.config)
    grads = [None if t is None else (g.sum(0, keepdim=True) if t.shape[0] == 1 and g.shape[0] != 1 else g)
             for t, g in zip((x, weight, bias, scale), grads)]
    anchors = [t for t in (x, weight, bias, scale, grad) if t is not None]
    return _first_order_only(tuple(grads), anchors) + (None,) * len(ctx.config)


class SplineDenseModelsFunction(torch.autograd.Function):
    """The model-dim ops as SplineDenseFunction runs the single-model ones: ``apply(...)``
    returns (x_N of every model (M, B, m), states (M, num_saved, B, m)), the states not
    differentiable, so that the backward op gets dLoss/dx_N alone."""

    @staticmethod
    def forward(x, weight, bias, scale, *config):
        states = _below_autograd(torch.ops.splinet_cuda.spline_dense_fwd_models, x, weight, bias, scale, *config)
        return states[:, -1].clone(), states

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dense_models_setup_context(ctx, inputs, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_last, grad_states):
        if grad_last is None:
            grad_last = torch.zeros_like(ctx.saved_tensors[1][:, -1])
        return _dense_models_backward(ctx, grad_last)


SplineDenseModelsFunction.vmap = staticmethod(_loop_vmap_rule(SplineDenseModelsFunction))  # a vmap of a vmap


def register_autocast_float32(op: str) -> None:
    """Direct calls of a forward op under torch.autocast run in float32 (16-bit floating inputs
    cast, float64 kept), as the public API runs them (splinet_cuda.spline_ode)."""
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(op, device_type, torch.float32)


def _register() -> None:
    built = {}
    for fn, op, impl in ((SplineDenseFunction, "spline_dense_fwd", spline_ode_fused),
                         (SplineConvFunction, "spline_conv_fwd", spline_ode_conv_fused),
                         (SplineHamiltonianFunction, "spline_hamiltonian_fwd", spline_ode_hamiltonian_fused)):
        if _ext.has_op(op):
            torch.library.register_autograd(f"splinet_cuda::{op}", fn.op_backward,
                                            setup_context=fn.op_setup_context)
            register_autocast_float32(f"splinet_cuda::{op}")
            built[op] = impl
    global _HAS_SAVED_OPS, _HAS_CONV_SAVED_OPS, _HAS_MODEL_OPS
    _HAS_MODEL_OPS = _ext.has_kernel("spline_dense_fwd_models", "CPU") and "spline_dense_fwd" in built
    if _HAS_MODEL_OPS:
        torch.library.register_autograd("splinet_cuda::spline_dense_fwd_models", _dense_models_backward,
                                        setup_context=_dense_models_setup_context)
        register_autocast_float32("splinet_cuda::spline_dense_fwd_models")
        SplineDenseFunction.vmap = staticmethod(_dense_function_vmap)
        SplineDenseFunction.trajectory.vmap = staticmethod(_dense_trajectory_vmap)
        torch.library.register_vmap("splinet_cuda::spline_dense_fwd", _dense_fwd_vmap)
        torch.library.register_vmap("splinet_cuda::spline_dense_bwd", _dense_bwd_vmap)
        if _ext.has_kernel("spline_dense_bwd_saved", "CPU"):
            torch.library.register_vmap("splinet_cuda::spline_dense_bwd_saved", _dense_bwd_saved_vmap)
        for op in ("spline_dense_fwd_models", "spline_dense_bwd_models"):  # a vmap of a vmap: once per slice
            torch.library.register_vmap(f"splinet_cuda::{op}", _loop_op_vmap(getattr(torch.ops.splinet_cuda, op)))
    _HAS_SAVED_OPS = _ext.has_kernel("spline_dense_fwd_saved", "CPU")
    _HAS_CONV_SAVED_OPS = _ext.has_kernel("spline_conv_fwd_saved", "CPU")
    for layer, built_here in (("dense", _HAS_SAVED_OPS), ("conv", _HAS_CONV_SAVED_OPS)):
        if built_here:
            register_autocast_float32(f"splinet_cuda::spline_{layer}_fwd_saved")
    cpu = {op: impl for op, impl in built.items() if _ext.has_kernel(op, "CPU")}
    if cpu:
        register_backend("cpu", dense=cpu.get("spline_dense_fwd"), conv=cpu.get("spline_conv_fwd"),
                         hamiltonian=cpu.get("spline_hamiltonian_fwd"), device_types=("cpu",),
                         dtypes=(torch.float32, torch.float64))
    cuda = {op: impl for op, impl in built.items() if _ext.has_kernel(op, "CUDA")}
    if cuda:  # the CUDA extension (csrc/cuda/), built when a toolkit and a CUDA torch were present
        register_backend("cuda", dense=cuda.get("spline_dense_fwd"), conv=cuda.get("spline_conv_fwd"),
                         device_types=("cuda",),
                         dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                         device_check=_cuda_archs.cuda_backend_error)


_register()
