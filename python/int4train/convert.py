"""convert_ / unconvert_: swap a model's linear layers for Int4Linear in place, and back.

Every recipe, "fp" included, goes through Int4Linear and the core op, so that ablations compare like
with like. Layer ids (part of every random stream) are assigned in module order.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .attention import Int4MultiheadAttention
from .config import Recipe, RecipeLike
from .nn import Int4Linear, _Weights

FilterFn = Callable[[nn.Module, str], bool]


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2's linear layers): y = x W + b with W of shape
    # (in_features, out_features). Recognised by name so that transformers stays optional.
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
    )


def _is_convertible(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not isinstance(module, Int4Linear)) or _is_hf_conv1d(
        module
    )


def _from_conv1d(conv: nn.Module, recipe: Recipe, layer_id: int, process_group) -> Int4Linear:
    # The (out, in) weight of a Conv1D as a fresh Parameter (the values, transposed).
    w = conv.weight
    source = _Weights(
        nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad), conv.bias
    )
    layer = Int4Linear.from_linear(
        source, recipe=recipe, layer_id=layer_id, process_group=process_group
    )
    layer._source_conv1d = type(conv)  # unconvert_ gives a Conv1D back
    return layer


def _inside_attention(model: nn.Module) -> dict:
    """The out_proj layers of nn.MultiheadAttention modules, by name, each with its module: its
    forward runs F.multi_head_attention_forward, which reads out_proj.weight and out_proj.bias
    itself and never calls out_proj, so an Int4Linear there alone would not run (and its step sizes
    would get no gradient); Int4MultiheadAttention converts the two together."""
    return {
        f"{name}.out_proj" if name else "out_proj": module
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.MultiheadAttention)
    }


_FAST_PATH_GUARD = "_int4train_fast_path_guard"  # the hook handle on a guarded encoder layer
_NESTED_BEFORE = "_int4train_use_nested_tensor"  # an encoder's use_nested_tensor before convert_


def _no_fast_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: nn.TransformerEncoderLayer skips its fused fast path
    when a hook is attached to it or to a submodule."""
    return None


def _encoder_blocks(model: nn.Module):
    """The modules with a fused inference fast path: nn.TransformerEncoderLayer and -Encoder."""
    return (m for m in model.modules()
            if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)))


def _holds_int4(module: nn.Module) -> bool:
    return any(isinstance(m, Int4Linear) for m in module.modules())


def _guard_fast_paths(model: nn.Module) -> None:
    """In eval mode without gradients, nn.TransformerEncoderLayer runs one fused kernel on the raw
    weights of its linear layers instead of calling them, and nn.TransformerEncoder turns a padded
    batch into a nested tensor for it: either would run a converted block in full precision. Blocks
    with an Int4Linear keep to the module path (a do-nothing hook; the encoder's use_nested_tensor
    off); unconvert_ undoes both."""
    for module in _encoder_blocks(model):
        if not _holds_int4(module):
            continue
        if isinstance(module, nn.TransformerEncoderLayer) and not hasattr(module, _FAST_PATH_GUARD):
            setattr(module, _FAST_PATH_GUARD, module.register_forward_pre_hook(_no_fast_path))
        if isinstance(module, nn.TransformerEncoder) and not hasattr(module, _NESTED_BEFORE):
            setattr(module, _NESTED_BEFORE, getattr(module, "use_nested_tensor", False))
            module.use_nested_tensor = False


def _unguard_fast_paths(model: nn.Module) -> None:
    for module in _encoder_blocks(model):
        if _holds_int4(module):
            continue
        handle = module.__dict__.pop(_FAST_PATH_GUARD, None)
        if handle is not None:
            handle.remove()
        if _NESTED_BEFORE in module.__dict__:
            module.use_nested_tensor = module.__dict__.pop(_NESTED_BEFORE)


def _first_names(names: list) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _check_convertible(module: nn.Module, name: str) -> None:
    """ValueError (naming the layer) for a layer whose weight an Int4Linear cannot take over."""
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"int4train.convert_: {name} ({type(module).__name__}) has not been initialised: run "
            "one forward pass first, so that its shape is known, then convert"
        )
    if not isinstance(module.weight, nn.Parameter):
        raise ValueError(
            f"int4train.convert_: the weight of {name} is computed, not a Parameter "
            "(torch.nn.utils.parametrize, weight_norm, spectral_norm), and an Int4Linear would "
            "freeze its present value; remove the parametrization first or leave the layer out "
            "with filter_fn"
        )


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_(
    model: nn.Module,
    recipe: RecipeLike = "hq_lss",
    filter_fn: Optional[FilterFn] = None,
    seed: Optional[int] = None,
    process_group=None,
) -> nn.Module:
    """Replaces, in place, every nn.Linear of `model` (and every transformers Conv1D, as in GPT-2)
    for which filter_fn(module, qualified_name) is true (default: all) by an Int4Linear of `recipe`.

    nn.Linear layers keep their own weight and bias Parameters (tied weights stay tied; an optimizer
    built before the conversion still holds them, though not the new step sizes: build it after).
    A Conv1D's weight is transposed into a new (out, in) Parameter. Layer ids are assigned 0, 1, ...
    in module order over the converted layers
    (after any Int4Linear already in the model). `seed` overrides the recipe's seed.
    nn.MultiheadAttention (as in nn.TransformerEncoderLayer) computes its projections inside
    F.multi_head_attention_forward from raw weights (its out_proj module is never called), so it is
    replaced whole by an Int4MultiheadAttention (four Int4Linear layers, ids in that order); one it
    does not support (kdim or vdim other than embed_dim, bias_k / bias_v, add_zero_attn) is left in
    full precision with a warning naming it. Attention modules that call their linear layers
    (Hugging Face models, the training CLI's) have those converted as any other.
    nn.TransformerEncoderLayer and nn.TransformerEncoder blocks holding converted layers are kept
    off PyTorch's fused inference fast path (which would skip their linear layers in eval mode
    without gradients).
    `process_group`: the data-parallel group of the model's replicas (DDP, FSDP; e.g.
    torch.distributed.group.WORLD), given to every new layer (Int4Linear.process_group). Returns `model`
    (converted in place; a bare nn.Linear passed as `model` cannot be replaced in place, so
    convert_ returns its Int4Linear instead).
    """
    r = Recipe.of(recipe, seed)
    if _is_convertible(model) or isinstance(model, nn.MultiheadAttention):
        if filter_fn is not None and not filter_fn(model, ""):
            return model
        if isinstance(model, nn.MultiheadAttention):
            if not Int4MultiheadAttention.supports(model):
                _warn_attention_left(["the model"])
                return model
        else:
            _check_convertible(model, "the model")
        return _convert_one(model, r, 0, process_group)
    targets = []
    # Layers converted by an earlier call keep their ids; new ones continue after them.
    next_id = len({id(m) for m in model.modules() if isinstance(m, Int4Linear)})
    attention = _inside_attention(model)
    left = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        if isinstance(module, nn.MultiheadAttention):
            if filter_fn is None or filter_fn(module, name):
                (targets if Int4MultiheadAttention.supports(module) else left).append(
                    (name, module)
                )
            continue
        if not _is_convertible(module) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if name in attention:
            # Converted with its attention module, or else never called: see the warning.
            if not any(t is attention[name] for _, t in targets + left):
                left.append((name, module))
            continue
        _check_convertible(module, name)
        targets.append((name, module))
    own_forward = [
        f"{n} ({type(m).__name__})"
        for n, m in targets
        if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward
    ]
    if own_forward:
        warnings.warn(
            f"int4train.convert_: {_first_names(own_forward)}: subclass(es) of nn.Linear with a "
            "forward of their own, which Int4Linear (the quantized x W^T + b) replaces, dropping "
            "whatever else it did; leave such layers out with filter_fn if that matters",
            stacklevel=2,
        )
    if left:
        _warn_attention_left([n for n, _ in left])
    # One replacement per distinct module (a module registered under two names stays shared).
    replacement = {}
    for name, module in targets:
        if id(module) not in replacement:
            replacement[id(module)] = _convert_one(module, r, next_id, process_group)
            next_id += 4 if isinstance(module, nn.MultiheadAttention) else 1
        _set_child(model, name, replacement[id(module)])
    _guard_fast_paths(model)
    return model


def _warn_attention_left(names: list) -> None:
    warnings.warn(
        f"int4train.convert_: nn.MultiheadAttention left in full precision ({_first_names(names)}):"
        " Int4MultiheadAttention takes key and value of the query's size, without bias_k / bias_v"
        " or add_zero_attn, and an out_proj converted without its attention module would never"
        " run (F.multi_head_attention_forward reads its weight); a filter_fn must select both or"
        " neither",
        stacklevel=3,
    )


def _carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """`old`'s forward and backward hooks registered on `new` (as torch.ao.quantization's
    swap_module carries them), so that a swap keeps what a user attached to the layer."""
    for hid, hook in old._forward_pre_hooks.items():
        new.register_forward_pre_hook(hook, with_kwargs=hid in old._forward_pre_hooks_with_kwargs)
    for hid, hook in old._forward_hooks.items():
        new.register_forward_hook(
            hook,
            with_kwargs=hid in old._forward_hooks_with_kwargs,
            always_call=hid in old._forward_hooks_always_called,
        )
    for hook in old._backward_pre_hooks.values():
        new.register_full_backward_pre_hook(hook)
    for hook in old._backward_hooks.values():
        if old._is_full_backward_hook:
            new.register_full_backward_hook(hook)
        else:
            new.register_backward_hook(hook)
    return new


def _convert_one(module: nn.Module, recipe: Recipe, layer_id: int, process_group) -> nn.Module:
    if isinstance(module, nn.MultiheadAttention):
        return _carry_hooks(
            module, Int4MultiheadAttention.from_mha(module, recipe, layer_id, process_group)
        )
    if _is_hf_conv1d(module):
        layer = _from_conv1d(module, recipe, layer_id, process_group)
    else:
        layer = Int4Linear.from_linear(
            module, recipe=recipe, layer_id=layer_id, process_group=process_group
        )
    layer.train(module.training)
    return _carry_hooks(module, layer)


def unconvert_(model: nn.Module) -> nn.Module:
    """Replaces, in place, every Int4Linear of `model` by the plain module it came from: nn.Linear
    holding the trained weight and bias Parameters (or a transformers Conv1D with the weight
    transposed back; an Int4MultiheadAttention becomes an nn.MultiheadAttention with its
    projections packed back), so that state_dict() loads with strict=True into the never-converted
    model.
    Step sizes and the other quantization state are dropped. Returns `model` (or, for a bare
    Int4Linear, its replacement)."""
    if isinstance(model, (Int4Linear, Int4MultiheadAttention)):
        return _unconvert_one(model)
    replacement = {}
    inside = ()  # name prefixes of the attention modules given back (their layers go with them)
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or name.startswith(inside):
            continue
        if isinstance(module, Int4MultiheadAttention):
            inside += (name + ".",)
        elif not isinstance(module, Int4Linear):
            continue
        if id(module) not in replacement:
            replacement[id(module)] = _unconvert_one(module)
        _set_child(model, name, replacement[id(module)])
    _unguard_fast_paths(model)
    return model


def _unconvert_one(layer: nn.Module) -> nn.Module:
    if isinstance(layer, Int4MultiheadAttention):
        return _carry_hooks(layer, layer.to_mha())
    conv_type = getattr(layer, "_source_conv1d", None)
    if conv_type is None:
        return _carry_hooks(layer, layer.to_linear())
    conv = conv_type(layer.out_features, layer.in_features)
    w = layer.weight
    conv.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    conv.bias = layer.bias
    conv.train(layer.training)
    return _carry_hooks(layer, conv.to(device=w.device))
