"""The scalar function whose curvature the operators represent, one batch at a time.

An objective yields batches and, for each, evaluates the loss as a differentiable function of the
parameters, optionally at a displaced point ``theta + d``. Two kinds exist:

- :class:`ModelObjective` evaluates ``loss_fn(model(inputs), targets)`` through
  ``torch.func.functional_call``: the model's own parameters and buffers are never written (buffers
  are cloned per evaluation, so BatchNorm running statistics stay untouched).
- :class:`ClosureObjective` calls a user closure ``func() -> loss`` that reads the parameters
  directly; a displaced point is set in place (through ``p.data``: version counters untouched)
  and restored bitwise, also on an exception.

Every evaluation of a batch runs under the same fixed random seed with the global random state
saved and restored, so dropout draws the same mask in every product (the operator stays a fixed
matrix) and the user's random state is never consumed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from .data import Batch, DataSource
from .layout import as_tensor_list
from .validation import check_positive_int, check_seed

__all__ = ["ClosureObjective", "ModelObjective", "check_scalar_loss", "resolve_params"]

Evaluation = tuple[torch.Tensor, list[torch.Tensor]]


@contextmanager
def isolated_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run the body with the generators of ``device`` (and the CPU) seeded, then restore them."""
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if cuda_devices:
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        yield


def differentiable_attention() -> AbstractContextManager:
    """Run ``F.scaled_dot_product_attention`` with PyTorch's math backend.

    Its fused backends (flash, memory-efficient) have backward passes without derivatives of
    their own, so a Hessian or GGN product through a transformer raised "derivative for
    aten::_scaled_dot_product_flash_attention..._backward is not implemented". The math backend
    computes the same attention with differentiable operations (more memory for long sequences).
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no fused-backend selection to undo
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def check_scalar_loss(loss: Any, where: str) -> torch.Tensor:
    """Raise a clear error unless ``loss`` is a real scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss {where} must be a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"the loss {where} must be a scalar, got shape {tuple(loss.shape)}; use a loss "
            "function with reduction='mean' or 'sum'"
        )
    return loss.reshape(())


def resolve_params(model: nn.Module, params: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """The parameters to differentiate: all of ``model``'s that require grad by default."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
        if not chosen:
            raise ValueError("params: the model has no parameters that require grad")
        return chosen
    chosen = as_tensor_list(params, "params")
    owned = {id(p) for p in model.parameters()}
    for i, p in enumerate(chosen):
        if id(p) not in owned:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model"
            )
    return check_differentiable(chosen)


def check_differentiable(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Raise unless ``params`` is non-empty, every tensor requires grad and none appears twice."""
    if not params:
        raise ValueError("params must contain at least one parameter, got an empty sequence")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params must not contain the same parameter twice")
    return params


OutputSelector = str | int | Callable[[Any], torch.Tensor] | None


def output_selector(output: OutputSelector) -> Callable[[Any], Any] | None:
    """What picks the tensor the loss is computed from out of the model's output.

    ``None`` keeps the output as it is; a string is a key (``"logits"`` of a mapping, or an
    attribute such as Hugging Face's ``.logits``); an integer indexes a tuple; a callable is
    applied to the output.
    """
    if output is None or callable(output):
        return output
    if isinstance(output, bool) or not isinstance(output, str | int):
        raise TypeError(
            f"output must be None, a key (str), an index (int) or a callable, got "
            f"{type(output).__name__}"
        )

    def select(value: Any) -> Any:
        if isinstance(output, str) and not isinstance(value, Mapping) and hasattr(value, output):
            return getattr(value, output)
        try:
            return value[output]
        except (KeyError, IndexError, TypeError) as error:
            keys = f" (keys: {list(value)})" if isinstance(value, Mapping) else ""
            raise ValueError(
                f"output={output!r} does not select anything from the model's output, a "
                f"{type(value).__name__}{keys}"
            ) from error

    return select


def _floating_dtypes(tensors: Iterable[torch.Tensor]) -> set[torch.dtype]:
    return {t.dtype for t in tensors if t.is_floating_point()}


def _explain_dtype_mismatch(error: Exception, batch: Batch, state: dict) -> None:
    """Raise a ``TypeError`` naming the batch when the model failed on data of another floating
    dtype than its parameters (e.g. float64 inputs, float32 model); otherwise return."""
    data, model = _floating_dtypes(batch.input_tensors()), _floating_dtypes(state.values())
    if data and model and not data <= model:
        names = sorted(str(d).replace("torch.", "") for d in data - model)
        have = sorted(str(d).replace("torch.", "") for d in model)
        raise TypeError(
            f"batch {batch.index}: the inputs are {', '.join(names)} but the model's parameters "
            f"are {', '.join(have)}; convert one of them (x.to(torch.{have[0]}) for each batch, "
            f"or model.to(torch.{names[0]})). The model raised: {type(error).__name__}: {error}"
        ) from error


def _explain_length_mismatch(error: Exception, batch: Batch, output: Any) -> None:
    """Raise a ``ValueError`` naming the batch when the loss failed on targets whose first
    dimension differs from the output's; otherwise return."""
    if not isinstance(output, torch.Tensor) or output.dim() == 0 or batch.targets.dim() == 0:
        return
    if output.shape[0] != batch.targets.shape[0]:
        raise ValueError(
            f"batch {batch.index}: the model returned {output.shape[0]} outputs (shape "
            f"{tuple(output.shape)}) but the targets hold {batch.targets.shape[0]} (shape "
            f"{tuple(batch.targets.shape)}); every batch must be (inputs, targets) of the same "
            f"samples. The loss raised: {type(error).__name__}: {error}"
        ) from error


def _explain_structured_output(error: Exception, batch: Batch, output: Any) -> None:
    """Raise a ``TypeError`` naming what the model returned and the ``output=`` that picks a
    tensor out of it, when the loss failed on an output that is not a tensor (a dict, a tuple,
    a Hugging Face ``ModelOutput``); otherwise return."""
    if isinstance(output, torch.Tensor):
        return
    described, fix = output_fix(output)
    raise TypeError(
        f"batch {batch.index}: loss_fn was given the model's output ({described}) instead of "
        f"a tensor, and raised; {fix}. The loss raised: {type(error).__name__}: {error}"
    ) from error


def output_fix(output: Any) -> tuple[str, str]:
    """What the model returned, in words, and the ``output=`` that picks the tensor the loss
    most likely wants from it (also for ``curvop analyze``)."""
    described, choice = _describe_output(output)
    if choice is None:
        return described, "pass output=a callable that returns the tensor the loss is computed from"
    shown = f'"{choice}"' if isinstance(choice, str) else str(choice)
    return described, (
        f"pass output={shown} to the operator to compute the loss from that tensor "
        f"(curvop analyze: --output {choice})"
    )


def _describe_output(output: Any) -> tuple[str, str | int | None]:
    """What the model returned, in words, and the key, index or attribute of the tensor the loss
    most likely wants (``"logits"`` where there is one, else the first floating-point tensor)."""
    kind = type(output).__name__
    if isinstance(output, Mapping):
        items, described = list(output.items()), f"{kind} with keys {list(output)}"
    elif isinstance(output, tuple | list):
        items, described = list(enumerate(output)), f"{kind} of {len(output)} values"
    else:
        attributes = getattr(output, "__dict__", {})
        items = [(name, v) for name, v in attributes.items() if isinstance(v, torch.Tensor)]
        names = [name for name, _ in items]
        described = f"{kind} with tensor attributes {names}" if names else kind
    candidates = [
        name
        for name, value in items
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    ]
    choice = "logits" if "logits" in candidates else next(iter(candidates), None)
    return described, choice


def _explain_swapped_arguments(
    error: Exception, batch: Batch, output: torch.Tensor, loss_fn: Callable
) -> None:
    """Raise a ``TypeError`` when the loss failed on integer targets and a floating-point output
    but works with the two swapped (``lambda targets, output: ...``); otherwise return."""
    targets = batch.targets
    if targets.is_floating_point() or not output.is_floating_point():
        return
    try:
        with torch.no_grad():
            swapped = loss_fn(targets, output)
    except Exception:
        return
    if isinstance(swapped, torch.Tensor):
        raise TypeError(
            f"batch {batch.index}: loss_fn raised on (output, targets) but works on (targets, "
            f"output): it is called as loss_fn(output, targets), with the model's output "
            f"({output.dtype}, shape {tuple(output.shape)}) first and the targets "
            f"({targets.dtype}, shape {tuple(targets.shape)}) second, and its arguments look "
            f"swapped; swap them in its definition. The loss raised: {type(error).__name__}: "
            f"{error}"
        ) from error


# losses that compare output and targets element by element and only warn when their shapes
# differ, then broadcast (a (N, 1) output against (N,) targets gives a wrong (N, N) loss)
BROADCASTING_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
BROADCASTING_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)


def _check_shapes_match(batch: Batch, output: Any, loss_fn: Callable) -> None:
    """Raise a ``ValueError`` when an element-wise loss of torch's got an output and targets of
    different shapes (which it would silently broadcast); otherwise return."""
    elementwise = isinstance(loss_fn, BROADCASTING_LOSSES) or any(
        loss_fn is function for function in BROADCASTING_FUNCTIONS
    )
    if elementwise and isinstance(output, torch.Tensor) and output.shape != batch.targets.shape:
        raise ValueError(_shape_mismatch(batch, output, "loss_fn would broadcast them"))


def _explain_shape_mismatch(error: Exception, batch: Batch, output: torch.Tensor) -> None:
    """Raise a ``ValueError`` when the loss failed on floating-point targets whose shape does
    not broadcast against the output's; otherwise return."""
    targets = batch.targets
    if not targets.is_floating_point() or output.shape == targets.shape:
        return
    try:
        torch.broadcast_shapes(output.shape, targets.shape)
    except RuntimeError:
        reason = f"loss_fn raised {type(error).__name__}: {error}"
        raise ValueError(_shape_mismatch(batch, output, reason)) from error


def _shape_mismatch(batch: Batch, output: torch.Tensor, reason: str) -> str:
    """The message of a shape mismatch between ``output`` and the targets, with the fix."""
    shape, targets = tuple(output.shape), batch.targets
    if output.dim() == targets.dim() + 1 and shape[-1] == 1:
        fix = ": targets.unsqueeze(-1)"
    elif output.dim() == 2 and targets.dim() == 1:
        fix = (
            f" (one value per output; for class labels, one-hot targets "
            f"F.one_hot(labels, {shape[1]}).to(output.dtype), or nn.CrossEntropyLoss with the "
            "integer labels)"
        )
    else:
        fix = ""
    return (
        f"batch {batch.index}: the targets have shape {tuple(targets.shape)} but the model's "
        f"output {shape}, and {reason}; give targets of the output's shape {shape}{fix}"
    )


def _check_loss_instance(loss_fn: Any) -> None:
    """Raise a clear ``TypeError`` unless ``loss_fn`` is callable as ``loss_fn(output, targets)``
    (a loss class such as ``nn.CrossEntropyLoss`` instead of an instance would be constructed
    with the output as its first argument)."""
    if isinstance(loss_fn, type) and issubclass(loss_fn, nn.Module):
        prefix = "nn." if loss_fn.__module__.startswith("torch.nn") else ""
        raise TypeError(
            f"loss_fn must be a loss instance, got the class {prefix}{loss_fn.__name__}; pass an "
            f"instance: {prefix}{loss_fn.__name__}()"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


class ModelObjective:
    """``loss_fn(model(inputs), targets)`` per batch, as a pure function of ``params``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        data: Any,
        params: list[torch.Tensor],
        output: OutputSelector = None,
    ):
        _check_loss_instance(loss_fn)
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.select = output_selector(output)
        position = {id(p): i for i, p in enumerate(params)}
        # every name of every parameter, tied weights included: (name, index in params or None, tensor)
        self._slots = [
            (name, position.get(id(q)), q)
            for name, q in model.named_parameters(remove_duplicate=False)
        ]
        self.source = DataSource(data, params[0].device)
        # no buffers: a forward at the parameters' own values cannot write any state, so it may
        # call the model itself (functional_call's parameter swap costs ~5% of a small product)
        self._stateless = next(model.buffers(), None) is None

    def batches(self) -> Iterator[Batch]:
        return iter(self.source)

    def output(
        self, batch: Batch, values: Sequence[torch.Tensor], dtype: torch.dtype | None = None
    ) -> Any:
        """``model(inputs)`` with ``params`` replaced by ``values``; buffers cloned, never written.

        With ``dtype``, the other parameters, the floating-point buffers and ``batch`` are
        evaluated in that dtype (``values`` must already have it).
        """
        own = dtype is None and len(values) == len(self.params) and self._stateless
        if own and all(v is p for v, p in zip(values, self.params, strict=True)):
            state = None
        else:
            state = {n: q.detach() if i is None else values[i] for n, i, q in self._slots}
            state.update(
                {n: b.clone() for n, b in self.model.named_buffers(remove_duplicate=False)}
            )
        if dtype is not None:
            state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
            batch = batch.cast(dtype)
        args, kwargs = batch.model_args()
        with isolated_rng(self.params[0].device, batch.index), differentiable_attention():
            try:
                if state is None:
                    output = self.model(*args, **kwargs)
                else:
                    output = functional_call(self.model, state, args, kwargs, tie_weights=False)
            except Exception as error:
                _explain_dtype_mismatch(error, batch, state or dict(self.model.state_dict()))
                raise
        return output if self.select is None else self.select(output)

    def loss_of_output(self, batch: Batch, output: Any) -> torch.Tensor:
        """``loss_fn(output, targets)`` of ``batch``, checked to be a scalar; when the loss
        raises, the likely mistake (an output that is not a tensor, targets of another length or
        shape, swapped arguments) is named, with the loss's error chained."""
        try:
            loss = self.loss_fn(output, batch.targets)
        except Exception as error:
            _explain_structured_output(error, batch, output)  # returns for a tensor only
            _explain_length_mismatch(error, batch, output)
            _explain_swapped_arguments(error, batch, output, self.loss_fn)
            _explain_shape_mismatch(error, batch, output)
            raise
        _check_shapes_match(batch, output, self.loss_fn)
        return check_scalar_loss(loss, f"of batch {batch.index}")

    def loss_function(self, batch: Batch) -> Callable[..., torch.Tensor]:
        """The loss of ``batch`` as a pure function of the parameters' values, for ``torch.func``."""
        return lambda *values: self.loss_of_output(batch, self.output(batch, values))

    @contextmanager
    def evaluated(
        self,
        batch: Batch,
        displacement: Sequence[torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Yield ``(loss, leaves)``: the loss at ``params + displacement`` and the leaf tensors
        to differentiate it with respect to (the parameters themselves when not displaced).

        With ``dtype`` (another precision than the parameters'), the whole evaluation runs in
        it: parameters, buffers and the floating-point tensors of the batch are converted
        (exactly, when ``dtype`` is wider), and the leaves have that dtype.
        """
        if dtype is None and displacement is None:
            leaves = self.params
        else:
            leaves = _displaced_leaves(self.params, displacement, dtype)
        output = self.output(batch, leaves, dtype)
        yield self.loss_of_output(batch.cast(dtype) if dtype else batch, output), leaves


class ClosureObjective:
    """A closure ``func() -> scalar loss`` reading ``params``; ``num_samples`` evaluations.

    Each evaluation ``s`` runs under random seed ``seed + s``, so a stochastic ``func`` gives
    ``num_samples`` different draws, while all evaluations within one product (finite
    differences) share the same draw. ``seed=None`` draws a fresh seed from the operating
    system once, at construction: each new objective sees new random numbers, each product of
    one objective the same ones.
    """

    def __init__(
        self,
        func: Callable[[], torch.Tensor],
        params: torch.Tensor | Sequence[torch.Tensor],
        *,
        num_samples: int = 1,
        seed: int | None = None,
    ):
        if not callable(func):
            raise TypeError(f"func must be callable, got {type(func).__name__}")
        self.func, self.params = func, check_differentiable(as_tensor_list(params, "params"))
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.seed = secrets.randbelow(2**62) if seed is None else check_seed(seed)

    def batches(self) -> Iterator[Batch]:
        scalar = torch.zeros(())
        return (Batch(s, None, scalar) for s in range(self.num_samples))

    @contextmanager
    def evaluated(
        self,
        batch: Batch,
        displacement: Sequence[torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Yield ``(loss, params)`` with the parameters displaced in place, restored bitwise.

        The parameters are written through ``p.data``, which leaves their version counters as
        they were: a graph the caller built before (``loss = f(params)``) still backpropagates
        afterwards, instead of raising "modified by an inplace operation".

        ``dtype`` must be ``None``: a closure reads its parameters and data itself, so it can
        only be evaluated in their own precision.
        """
        if dtype is not None:
            raise ValueError("a closure can only be evaluated in its parameters' own dtype")
        saved = [p.detach().clone() for p in self.params] if displacement is not None else []
        try:
            if displacement is not None:
                for p, d in zip(self.params, displacement, strict=True):
                    p.data.add_(d)
            with isolated_rng(self.params[0].device, self.seed + batch.index):
                loss = check_scalar_loss(self.func(), "returned by func")
            yield loss, self.params
        finally:
            for p, original in zip(self.params, saved, strict=False):
                p.data.copy_(original)


def _displaced_leaves(
    params: Sequence[torch.Tensor],
    displacement: Sequence[torch.Tensor] | None,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """Fresh leaves ``params + displacement`` (or copies of ``params``), in ``dtype`` if given."""
    values = [p.detach().to(dtype) if dtype else p.detach() for p in params]
    if displacement is not None:
        values = [value + d for value, d in zip(values, displacement, strict=True)]
    return [value.requires_grad_() for value in values]
