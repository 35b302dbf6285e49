"""Smoothing mappings: which layer's output feeds which Linears, so a per-channel scale can move
between them without changing what the model computes.

A mapping pairs a smooth layer (a norm, or a Linear whose output rows are the channels) with the
balance Linears that read exactly that output. Dividing the smooth layer's output channels by s and
multiplying the balance layers' input columns by s leaves every product unchanged.

Derived per decoder layer from the usual module names:

    input_layernorm -> q/k/v (or Phi-3's fused qkv_proj)
    v_proj -> o_proj, only when v's output width equals o's input (not with grouped-query attention)
    post_attention_layernorm (Gemma 2/3: pre_feedforward_layernorm) -> gate/up (or gate_up_proj)
    up_proj -> down_proj (Phi-3: the second half of gate_up_proj's rows)

Mixture-of-experts MLPs (experts as Linears, see experts.py):

    post_attention_layernorm -> every expert's gate/up, and a shared expert's
    each expert's up -> its down; a shared expert's up -> its down

The router reads the same normed input: its columns are scaled too, so routing is unchanged.
"""

from dataclasses import dataclass
from typing import Any

import torch

from modelpress.contract import shown
from modelpress.engine.errors import ModelPressError
from modelpress.engine.experts import ExpertLinears
from modelpress.engine.targets import is_matched


@dataclass(frozen=True)
class Mapping:
    smooth: str  # full module name of the norm or Linear whose output is scaled
    balance: tuple[str, ...]  # full names of the Linears that read that output
    rows: tuple[int, int] | None = None  # the smooth Linear's output rows that form the channels (fused layers)
    scaled_too: tuple[str, ...] = ()  # read the same channels, neither quantized nor measured (MoE routers)


@dataclass(frozen=True)
class MappingSpec:
    """An explicit mapping as a recipe writes it: module patterns (exact names, `re:` or classes)."""

    smooth: str
    balance: tuple[str, ...]


def parse_smoothquant_mappings(value: Any, owner: str) -> list[MappingSpec]:
    """llm-compressor's SmoothQuant form: [[[balance patterns...], smooth pattern], ...]."""
    specs = []
    for i, item in enumerate(value):
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str)
        balance = item[0] if ok else None
        if isinstance(balance, str):
            balance = [balance]
        if not ok or not isinstance(balance, list) or not balance or not all(isinstance(b, str) for b in balance):
            raise ModelPressError(
                f"{owner}.mappings[{i}]: expected [[balance layer patterns], smooth layer pattern], "
                "e.g. [['re:.*q_proj', 're:.*k_proj', 're:.*v_proj'], 're:.*input_layernorm']"
            )
        specs.append(MappingSpec(item[1], tuple(balance)))
    return specs


def parse_awq_mappings(value: Any, owner: str) -> list[MappingSpec]:
    """llm-compressor's AWQ form: [{smooth_layer, balance_layers, activation_hook_target?}, ...].

    The hook target only tells llm-compressor whose output to compare; the search here measures
    each balance Linear's own output, so it is accepted and not needed.
    """
    specs = []
    for i, item in enumerate(value):
        keys = set(item) if isinstance(item, dict) else set()
        balance = item.get("balance_layers") if isinstance(item, dict) else None
        if (
            not {"smooth_layer", "balance_layers"} <= keys
            or keys - {"smooth_layer", "balance_layers", "activation_hook_target"}
            or not isinstance(item["smooth_layer"], str)
            or not isinstance(balance, list)
            or not balance
            or not all(isinstance(b, str) for b in balance)
        ):
            raise ModelPressError(
                f"{owner}.mappings[{i}]: expected {{smooth_layer: pattern, balance_layers: [patterns]}}, "
                "e.g. {smooth_layer: 're:.*input_layernorm', balance_layers: ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']}"
            )
        specs.append(MappingSpec(item["smooth_layer"], tuple(balance)))
    return specs


def derive_mappings(layer: torch.nn.Module, prefix: str) -> list[Mapping]:
    """The usual mappings of one decoder layer, from its module names and shapes."""

    def get(name: str) -> torch.nn.Module | None:
        try:
            return layer.get_submodule(name)
        except AttributeError:
            return None

    mappings: list[Mapping] = []
    attn_in = [n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if isinstance(get(n), torch.nn.Linear)]
    fused_qkv = isinstance(get("self_attn.qkv_proj"), torch.nn.Linear)
    if fused_qkv:
        attn_in = ["self_attn.qkv_proj"]
    if get("input_layernorm") is not None and (len(attn_in) == 3 or fused_qkv):
        mappings.append(Mapping(f"{prefix}input_layernorm", tuple(prefix + n for n in attn_in)))
    o = get("self_attn.o_proj")
    if isinstance(o, torch.nn.Linear):
        v = get("self_attn.v_proj")
        if isinstance(v, torch.nn.Linear) and not fused_qkv and v.out_features == o.in_features:
            mappings.append(Mapping(f"{prefix}self_attn.v_proj", (f"{prefix}self_attn.o_proj",)))
        if fused_qkv:
            qkv = get("self_attn.qkv_proj")
            kv = (qkv.out_features - o.in_features) // 2
            if kv == o.in_features:
                mappings.append(
                    Mapping(f"{prefix}self_attn.qkv_proj", (f"{prefix}self_attn.o_proj",), (o.in_features + kv, qkv.out_features))
                )
    mlp_norm = "pre_feedforward_layernorm" if get("pre_feedforward_layernorm") is not None else "post_attention_layernorm"
    if isinstance(get("mlp.experts"), ExpertLinears) and get(mlp_norm) is not None:
        return mappings + moe_mappings(get("mlp"), f"{prefix}mlp.", f"{prefix}{mlp_norm}")
    down = get("mlp.down_proj")
    if get(mlp_norm) is None or not isinstance(down, torch.nn.Linear):
        return mappings  # no MLP of Linears (e.g. fused MoE experts): nothing quantized to smooth for
    gate, up, gate_up = get("mlp.gate_proj"), get("mlp.up_proj"), get("mlp.gate_up_proj")
    if isinstance(gate, torch.nn.Linear) and isinstance(up, torch.nn.Linear):
        mappings.append(Mapping(f"{prefix}{mlp_norm}", (f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj")))
        if up.out_features == down.in_features:
            mappings.append(Mapping(f"{prefix}mlp.up_proj", (f"{prefix}mlp.down_proj",)))
    elif isinstance(gate_up, torch.nn.Linear):
        mappings.append(Mapping(f"{prefix}{mlp_norm}", (f"{prefix}mlp.gate_up_proj",)))
        if gate_up.out_features == 2 * down.in_features:  # rows: gate first, then up
            mappings.append(
                Mapping(f"{prefix}mlp.gate_up_proj", (f"{prefix}mlp.down_proj",), (down.in_features, gate_up.out_features))
            )
    return mappings


def moe_mappings(moe: torch.nn.Module, prefix: str, norm: str) -> list[Mapping]:
    """A MoE block's mappings: the norm feeds every expert (and a shared expert), each up feeds its down."""
    experts: ExpertLinears = moe.experts
    balance, pairs = [], []
    for e, expert in enumerate(experts):
        gate, up, down = expert.names
        balance += [f"{prefix}experts.{e}.{gate}", f"{prefix}experts.{e}.{up}"]
        pairs.append((f"{prefix}experts.{e}.{up}", f"{prefix}experts.{e}.{down}"))
    for name, module in moe.named_children():
        up, down = getattr(module, "up_proj", None), getattr(module, "down_proj", None)
        if isinstance(up, torch.nn.Linear) and isinstance(down, torch.nn.Linear) and isinstance(getattr(module, "gate_proj", None), torch.nn.Linear):
            balance += [f"{prefix}{name}.gate_proj", f"{prefix}{name}.up_proj"]
            pairs.append((f"{prefix}{name}.up_proj", f"{prefix}{name}.down_proj"))
        elif isinstance(module, torch.nn.Linear):
            balance.append(f"{prefix}{name}")  # e.g. Qwen-MoE's shared_expert_gate
    return [Mapping(norm, tuple(balance), scaled_too=routers(moe, prefix))] + [Mapping(up, (down,)) for up, down in pairs]


def routers(moe: torch.nn.Module, prefix: str) -> tuple[str, ...]:
    """The modules of a MoE block that read its input through a plain weight matrix but are not Linears."""
    return tuple(
        f"{prefix}{n}"
        for n, m in moe.named_children()
        if not isinstance(m, (torch.nn.Linear, ExpertLinears)) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
    )


def resolve_mappings(
    model: torch.nn.Module,
    layers_prefix: str,
    layers: torch.nn.ModuleList,
    specs: list[MappingSpec] | None,
    owner: str,
) -> list[Mapping]:
    """Every decoder layer's mappings: derived ones, or the explicit `specs` matched per layer.

    An explicit mapping must find its smooth layer in at least one decoder layer, exactly once per
    layer, with balance Linears beside it whose input width fits.
    """
    if specs is None:
        return [m for i, layer in enumerate(layers) for m in derive_mappings(layer, f"{layers_prefix}.{i}.")]
    mappings = []
    for k, spec in enumerate(specs):
        found = False
        for i, layer in enumerate(layers):
            prefix = f"{layers_prefix}.{i}."
            named = [(prefix + n, m) for n, m in layer.named_modules() if n]
            smooth = [n for n, m in named if is_matched(n, m, [spec.smooth])]
            if not smooth:
                continue
            if len(smooth) > 1:
                raise ModelPressError(
                    f"{owner}.mappings[{k}]: smooth layer {shown(spec.smooth)} matches {len(smooth)} modules in one decoder layer "
                    f"({smooth[:3]}); make the pattern name one, e.g. end it with '$'"
                )
            balance = tuple(n for n, m in named if isinstance(m, torch.nn.Linear) and is_matched(n, m, list(spec.balance)))
            if not balance:
                raise ModelPressError(f"{owner}.mappings[{k}]: balance layers {shown(list(spec.balance))} match no Linear beside {smooth[0]}")
            # a smooth layer outside a MoE block feeds the block's input, which its router reads too
            blocks = {n.rsplit(".experts.", 1)[0] for n in balance if ".experts." in n}
            feeding = sorted(b for b in blocks if not smooth[0].startswith(f"{b}."))
            mapping = Mapping(smooth[0], balance, scaled_too=tuple(r for b in feeding for r in routers(model.get_submodule(b), f"{b}.")))
            check_shapes(model, mapping, f"{owner}.mappings[{k}]")
            mappings.append(mapping)
            found = True
        if not found:
            raise ModelPressError(f"{owner}.mappings[{k}]: smooth layer {shown(spec.smooth)} matches no module in the decoder layers; check the name")
    return mappings


def channels(model: torch.nn.Module, mapping: Mapping) -> int:
    """How many output channels the smooth layer scales."""
    smooth = model.get_submodule(mapping.smooth)
    if mapping.rows is not None:
        return mapping.rows[1] - mapping.rows[0]
    if isinstance(smooth, torch.nn.Linear):
        return smooth.out_features
    weight = getattr(smooth, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ModelPressError(f"mappings: smooth layer {mapping.smooth} ({type(smooth).__name__}) is neither a Linear nor a norm with a weight vector")
    return weight.numel()


def check_shapes(model: torch.nn.Module, mapping: Mapping, where: str) -> None:
    width = channels(model, mapping)
    for name in (*mapping.balance, *mapping.scaled_too):
        fan_in = model.get_submodule(name).weight.shape[1]
        if fan_in != width:
            raise ModelPressError(
                f"{where}: {mapping.smooth} has {width} output channels but {name} reads {fan_in}; "
                "a smooth layer must feed its balance layers directly (e.g. not v_proj -> o_proj with grouped-query attention)"
            )


@dataclass(frozen=True)
class NormFold:
    """A norm and the modules that read its output: its weight moves into their input columns."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class RotationLayout:
    """One decoder layer as the residual-stream rotations see it (full module names).

    `readers` take the stream (through a folded norm) into their input columns, `writers` add
    their output rows to it; `value` holds the value heads in its rows `value_rows` (all of a
    v_proj, the last ones of a fused qkv_proj), read per head by `output`'s input columns.
    """

    norms: tuple[NormFold, ...]
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    value: str | None
    value_rows: tuple[int, int] | None
    output: str | None


def derive_rotation_layout(layer: torch.nn.Module, prefix: str, kv_heads: int, head_dim: int) -> RotationLayout:
    """A dense decoder layer's layout from its module names: the same norms -> Linears table the
    smoothing mappings use (input norm -> q/k/v or qkv_proj, the MLP's norm -> gate/up or
    gate_up_proj), o_proj and down_proj as writers, and v_proj (or qkv_proj's last rows) as values."""
    if isinstance(_child(layer, "mlp.experts"), ExpertLinears):
        raise ModelPressError(f"SpinQuantModifier: {prefix}mlp is a mixture of experts, which rotations do not support yet; drop SpinQuantModifier for this model")
    norms = tuple(
        NormFold(m.smooth, m.balance) for m in derive_mappings(layer, prefix) if not isinstance(layer.get_submodule(m.smooth[len(prefix):]), torch.nn.Linear)
    )
    writers = tuple(prefix + n for n in ("self_attn.o_proj", "mlp.down_proj") if isinstance(_child(layer, n), torch.nn.Linear))
    if len(norms) != 2 or len(writers) != 2:
        raise ModelPressError(
            f"SpinQuantModifier: {prefix[:-1]} ({type(layer).__name__}) does not have the norm -> attention -> norm -> MLP layout "
            "the derived mappings know; give mappings and norm_mappings explicitly"
        )
    value = next((n for n in ("self_attn.v_proj", "self_attn.qkv_proj") if isinstance(_child(layer, n), torch.nn.Linear)), None)
    rows = None
    if value is not None:
        out = layer.get_submodule(value).out_features
        rows = (out - kv_heads * head_dim, out)
    return RotationLayout(norms, tuple(n for f in norms for n in f.linears), writers, value and prefix + value, rows, prefix + "self_attn.o_proj")


def _child(layer: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def unfolded_norms(layer: torch.nn.Module, prefix: str, layout: RotationLayout) -> list[str]:
    """Norms of the layer that are neither folded nor per-head (q_norm/k_norm act on one head's
    features, which R1 does not touch): a norm on a sublayer's output before the residual
    (Gemma 2/3's post-attention and post-feedforward norms) cannot be rotated through."""
    folded = {f.norm for f in layout.norms}
    return [
        prefix + n
        for n, m in layer.named_modules()
        if n and "norm" in n.rsplit(".", 1)[-1].lower() and isinstance(getattr(m, "weight", None), torch.Tensor)
        and prefix + n not in folded and n.rsplit(".", 1)[-1] not in ("q_norm", "k_norm")
    ]
