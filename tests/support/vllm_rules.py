"""What vLLM's compressed-tensors loader accepts, checked on a checkpoint directory without torch.

The rules come from two places, never from ModelPress's writer: the compressed-tensors format
(shared/reference/compressed-tensors-format.md, cited as "format §N") and vLLM's loader, cited by
file (compressed_tensors.py, utils.py and schemes/*.py under
vllm/model_executor/layers/quantization/compressed_tensors/, and the model classes under
vllm/model_executor/models/). `check_dir(output, source)` lists every problem it finds; an empty
list means vLLM would build every layer and find exactly the tensors it allocates.
"""

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FLOATS = frozenset({"F32", "F16", "BF16"})
# The shape vLLM's PerTensorScaleParameter / BasevLLMParameter loaders take for one scale: a scalar or [1].
SCALAR = ((), (1,))
# vLLM fuses these shards into one layer (packed_modules_mapping in llama.py, qwen2.py, qwen2_moe.py, ...).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Classes of vLLM's linear layers (llama.py); only a class target's substring match reads them.
LAYER_CLASS = {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear",
               "o_proj": "RowParallelLinear", "down_proj": "RowParallelLinear"}
# model_type -> (MoE block, (gate, up, down) names): the checkpoint names FusedMoE.make_expert_params_mapping
# is given in mixtral.py (w1/w3/w2 under block_sparse_moe) and qwen2_moe.py / qwen3_moe.py (gate/up/down_proj).
EXPERT_LAYOUTS = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
# is_activation_quantization_format() in utils.py: only these formats reach the W8A8 schemes.
ACTIVATION_FORMATS = frozenset(
    {"naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized"}
)


@dataclass(frozen=True)
class Tensor:
    dtype: str  # safetensors' dtype code: F32, BF16, I32, I64, I8, F8_E4M3, ...
    shape: tuple[int, ...]
    values: tuple[int, ...] | None = None  # read for small int64 tensors (weight_shape)


@dataclass(frozen=True)
class Problem:
    where: str  # a module, a tensor or a config key
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Spec:
    """One tensor vLLM allocates for a layer: the dtypes it can load and the shapes it takes."""

    dtypes: frozenset[str]
    shapes: tuple[tuple[int, ...], ...]
    values: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Expected:
    what: str  # the vLLM scheme or layer kind, for messages
    specs: dict[str, Spec]


@dataclass(frozen=True)
class Group:
    name: str
    weights: dict[str, Any]
    input_activations: dict[str, Any] | None
    format: str | None
    targets: tuple[str, ...]

    @property
    def key(self) -> str:
        """vLLM compares these three when it asks whether layers share a scheme (compressed_tensors_moe.py)."""
        return json.dumps([self.weights, self.input_activations, self.format], sort_keys=True)


def read_tensors(model_dir: Path) -> dict[str, Tensor]:
    """Every tensor's dtype and shape, from the safetensors headers (the 8-byte length, then JSON)."""
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, end = entry["data_offsets"]
                values = None
                if entry["dtype"] == "I64" and end - start <= 64:
                    f.seek(8 + size + start)
                    values = struct.unpack(f"<{(end - start) // 8}q", f.read(end - start))
                tensors[name] = Tensor(entry["dtype"], tuple(entry["shape"]), values)
    return tensors


def check_dir(output: Path, source: Path) -> list[Problem]:
    """The problems vLLM would have loading `output`, compressed from the float model at `source`."""
    config = json.loads((output / "config.json").read_text())
    return check_checkpoint(config, read_tensors(output), read_tensors(source))


def linear_shapes(source: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """The float model's Linear layers, (out, in) by module name: its 2-D weights except embeddings."""
    return {
        name.removesuffix(".weight"): (t.shape[0], t.shape[1])
        for name, t in source.items()
        if name.endswith(".weight") and len(t.shape) == 2 and "embed_tokens" not in name
    }


def check_checkpoint(config: Mapping[str, Any], tensors: Mapping[str, Tensor], source: Mapping[str, Tensor]) -> list[Problem]:
    """Every problem vLLM's loader would hit: the config, each layer's scheme, every tensor."""
    linears = linear_shapes(source)
    layout = EXPERT_LAYOUTS.get(config.get("model_type", ""))
    problems: list[Problem] = []
    experts, routers = _moe_modules(linears, layout, config, tensors, problems)
    expected: dict[str, Expected] = {}
    qc = config.get("quantization_config")
    if qc is None:  # a plain model (e.g. 2:4 pruned, weights dense with zeros): every layer in float
        expected = {m: _float(linears[m], "float layer") for m in linears}
    else:
        groups = _groups(qc, problems)
        ignore = list(qc.get("ignore") or [])
        problems += _ignore_names(ignore, linears)
        dense = [m for m in linears if m not in experts and m not in routers]
        expected.update({m: _float(linears[m], "unquantized router") for m in routers})
        _dense_layers(dense, linears, groups, ignore, expected, problems)
        _moe_layers(experts, linears, groups, ignore, expected, problems)
    problems += _compare(expected, tensors, source, linears)
    return problems


# --- config -----------------------------------------------------------------------------------


def _groups(qc: Mapping[str, Any], problems: list[Problem]) -> list[Group]:
    """The config groups, in the order vLLM reads them (_quantization_scheme_map_from_config)."""
    where = "quantization_config"
    if qc.get("quant_method") != "compressed-tensors":  # the name vLLM registers the method under (format §2)
        problems.append(Problem(f"{where}.quant_method", f"is {qc.get('quant_method')!r}; vLLM reads 'compressed-tensors'"))
    if qc.get("quantization_status") != "compressed":  # format §2: checkpoints on disk are compressed
        problems.append(Problem(f"{where}.quantization_status", f"is {qc.get('quantization_status')!r}, not 'compressed'"))
    if qc.get("sparsity_config"):  # format §11: vLLM ≥0.19.1 refuses sparse configs; write {}
        problems.append(Problem(f"{where}.sparsity_config", "is not empty; vLLM no longer reads sparse formats"))
    kv = qc.get("kv_cache_scheme")  # validate_kv_cache_scheme() in compressed_tensors.py
    fp8 = kv and kv.get("type") == "float" and kv.get("num_bits") == 8 and kv.get("symmetric")
    if kv is not None and not (fp8 and kv.get("strategy") in ("tensor", "attn_head")):
        problems.append(Problem(f"{where}.kv_cache_scheme", "vLLM reads only symmetric fp8 per-tensor or per-head KV-cache schemes"))
    groups = []
    for name, body in (qc.get("config_groups") or {}).items():
        targets = body.get("targets")
        if not targets or not isinstance(targets, list) or not isinstance(body.get("weights"), dict):
            problems.append(Problem(f"{where}.config_groups.{name}", "needs a list of targets and a weights object"))
            continue
        fmt = body.get("format") or qc.get("format")  # a group's own format wins over the model's (compressed_tensors.py)
        if fmt in (None, "mixed-precision"):  # format §2: a mixed-precision model names each group's format
            problems.append(Problem(f"{where}.config_groups.{name}.format", f"is missing and the model format is {fmt!r}"))
        groups.append(Group(name, _args(body["weights"]), _args(body.get("input_activations")), fmt, tuple(targets)))
    if not groups:
        problems.append(Problem(f"{where}.config_groups", "holds no group; vLLM has no scheme to build"))
    return groups


def _args(args: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """QuantizationArgs with compressed-tensors' defaults filled in and aliases resolved (format §2.1)."""
    if args is None:
        return None
    size = args.get("group_size")
    strategy = args.get("strategy") or ("group" if size and size > 0 else "channel" if size == -1 else "tensor")
    actorder = args.get("actorder")
    actorder = "group" if actorder in ("dynamic", True) else "weight" if actorder == "static" else actorder
    return {
        "num_bits": args.get("num_bits", 8), "type": args.get("type", "int"), "symmetric": args.get("symmetric", True),
        "strategy": strategy, "group_size": size, "block_structure": args.get("block_structure"),
        "dynamic": args.get("dynamic", False), "actorder": actorder,
    }


def _ignore_names(ignore: list[str], linears: Mapping[str, Any]) -> list[Problem]:
    """utils.py matches ignore entries as names or `re:` patterns only; one that matches no module
    (a class name, a renamed module) leaves the module it meant quantized (format §8)."""
    return [
        Problem("quantization_config.ignore", f"{entry!r} names no module of the checkpoint")
        for entry in ignore
        if not any(_name_match(m, entry) for m in linears)
    ]


# --- matching: vLLM's (utils.py) and compressed-tensors' (format §8) ------------------------------------


def _name_match(name: str, target: str) -> bool:
    """_is_equal_or_regex_match() in utils.py: equal, or `re:` + re.match (anchored at the start)."""
    return bool(re.match(target[3:], name)) if target.startswith("re:") else target == name


def _owners(groups: list[Group]) -> dict[str, Group]:
    """vLLM's target -> scheme map: targets in group order, a repeated target taking the later group."""
    owner: dict[str, Group] = {}
    for g in groups:
        for t in g.targets:
            owner[t] = g
    return owner


def _vllm_target(groups: list[Group], name: str, cls: str, shards: tuple[str, ...] = ()) -> Group | None:
    """find_matched_target() in utils.py: the layer's name first, then its class by case-insensitive
    substring, then a fused layer's shards (all must match; the first shard's target wins)."""
    owner = _owners(groups)
    for t in owner:
        if _name_match(name, t):
            return owner[t]
    for t in owner:
        if (bool(re.match(t[3:], cls)) if t.startswith("re:") else t.lower() in cls.lower()):
            return owner[t]
    if shards:
        firsts = [next((t for t in owner if _name_match(s, t)), None) for s in shards]
        if all(firsts):
            return owner[firsts[0]]
    return None


def _ct_group(name: str, groups: list[Group]) -> Group | None:
    """The scheme compressed-tensors (and transformers) give a checkpoint Linear: exact name, then
    `re:` pattern, then the class `Linear` (format §8)."""
    for kind in ("name", "regex", "class"):
        for g in groups:
            for t in g.targets:
                regex = t.startswith("re:") and re.match(t[3:], name)
                if (kind == "name" and t == name) or (kind == "regex" and regex) or (kind == "class" and t == "Linear"):
                    return g
    return None


def _ignored_by_ct(name: str, ignore: list[str]) -> bool:
    return any(_name_match(name, entry) for entry in ignore)


# --- dense layers -------------------------------------------------------------------------------


def _dense_layers(modules: list[str], linears: Mapping[str, tuple[int, int]], groups: list[Group], ignore: list[str],
                  expected: dict[str, Expected], problems: list[Problem]) -> None:
    """Each vLLM linear layer (fused where vLLM fuses): its ignore state, its scheme, its tensors."""
    present = set(modules)
    fused_shards = set()
    layers: list[tuple[str, tuple[str, ...]]] = []
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        for fused, shards in FUSED.items():
            names = tuple(f"{parent}.{s}" for s in shards)
            if leaf == shards[0] and all(n in present for n in names):
                layers.append((f"{parent}.{fused}", names))
                fused_shards.update(names)
    layers += [(m, ()) for m in modules if m not in fused_shards]
    for layer, shards in layers:
        members = shards or (layer,)
        cls = LAYER_CLASS.get(layer.rsplit(".", 1)[-1], "ColumnParallelLinear")
        if layer.rsplit(".", 1)[-1] == "lm_head":
            # the head is a ParallelLMHead, not a LinearBase: get_quant_method() in compressed_tensors.py
            # gives it no linear scheme, so it loads only a float weight
            expected[layer] = _float(linears[layer], "unquantized head")
            continue
        states = {s: _ignored_by_ct(s, ignore) for s in members}
        if shards and layer not in ignore and len(set(states.values())) > 1:
            # should_ignore_layer() in utils.py raises for shards with different ignore states
            kept = [s.rsplit(".", 1)[1] for s, v in states.items() if not v]
            problems.append(Problem(layer, f"vLLM fuses {', '.join(s.rsplit('.', 1)[1] for s in members)} but only "
                                           f"{', '.join(kept)} are quantized; ignore all of them or none"))
            continue
        if all(states.values()) or layer in ignore:
            for s in members:
                expected[s] = _float(linears[s], "float (ignored) layer")
            continue
        group = _vllm_target(groups, layer, cls, shards)
        if group is None:  # format §8: late-2025 vLLM fails the load for a layer no target matches
            problems.append(Problem(layer, "no target matches it and it is not in `ignore`"))
            continue
        own = {s: _ct_group(s, groups) for s in members}
        if shards and len({g.key if g else None for g in own.values()}) > 1:
            # find_matched_target() gives a fused layer one scheme: all shards need the same one (format §9)
            names = ", ".join(f"{s.rsplit('.', 1)[1]} ({g.name if g else 'none'})" for s, g in own.items())
            problems.append(Problem(layer, f"vLLM fuses {names} into one layer with one scheme, but they have different schemes"))
        for s, g in own.items():
            if g is not None and g.key != group.key:
                problems.append(Problem(s, f"is written with group {g.name} but vLLM gives {layer} the scheme of group {group.name}"))
        kind, why = _linear_scheme(group)
        if kind is None:
            problems.append(Problem(layer, why))
            continue
        for s in members:
            specs, why = _linear_tensors(kind, group, *linears[s])
            problems += [Problem(s, w) for w in why]
            expected[s] = Expected(f"{kind} scheme", specs)


def _linear_scheme(g: Group) -> tuple[str | None, str]:
    """The vLLM scheme class _get_scheme_from_parts() in compressed_tensors.py builds, for the schemes
    a CompressionJob can ask for; None and why when there is none."""
    w, a, fmt = g.weights, g.input_activations, g.format
    where = f"group {g.name} ({_describe(g)})"
    if w["type"] == "int" and a is None:  # _is_wNa16_group_channel()
        if w["strategy"] not in ("channel", "group") or w["dynamic"]:
            return None, f"{where}: vLLM's WNA16 reads static channel or group weights only"
        if fmt != "pack-quantized" or w["num_bits"] not in (4, 8):  # WNA16_SUPPORTED_BITS, pack-quantized only
            return None, f"{where}: vLLM reads weight-only integers only as 4 or 8 bits, pack-quantized"
        if not w["symmetric"] and w["num_bits"] == 8:  # format §10: Marlin has no uint8 with zero points; do not emit
            return None, f"{where}: vLLM's kernels have no 8-bit weights with zero points"
        return "WNA16", ""
    if fmt not in ACTIVATION_FORMATS:
        return None, f"{where}: vLLM reads these only as int-, float- or naive-quantized, not {fmt}"
    if w["type"] == "float" and w["num_bits"] == 8:
        ok_w = w["symmetric"] and not w["dynamic"] and w["strategy"] in ("tensor", "channel", "block")  # _is_fp8_w8a8/_w8a16()
        if a is None:
            return ("W8A16Fp8", "") if ok_w else (None, f"{where}: not an fp8 layout vLLM's W8A16Fp8 reads")
        ok_a = a["type"] == "float" and a["num_bits"] == 8 and (a["dynamic"] or (a["symmetric"] and a["strategy"] == "tensor"))
        return ("W8A8Fp8", "") if ok_w and ok_a else (None, f"{where}: not an fp8 layout vLLM's W8A8Fp8 reads")
    if a is not None and w["type"] == a["type"] == "int" and w["num_bits"] == a["num_bits"] == 8:
        ok_w = w["symmetric"] and not w["dynamic"] and w["strategy"] in ("tensor", "channel")
        static = a["strategy"] == "tensor" and not a["dynamic"]  # _is_static_tensor_w8a8()
        dynamic = a["strategy"] == "token" and a["dynamic"]  # _is_dynamic_token_w8a8()
        return ("W8A8Int8", "") if ok_w and (static or dynamic) else (None, f"{where}: not an int8 layout vLLM's W8A8Int8 reads")
    return None, f"{where}: vLLM has no compressed-tensors scheme for it"


def _describe(g: Group) -> str:
    w, a = g.weights, g.input_activations
    bits = f"{w['type']}{w['num_bits']} {w['strategy']}{' ' + str(w['group_size']) if w['strategy'] == 'group' else ''}"
    acts = f"{a['type']}{a['num_bits']} {'dynamic' if a['dynamic'] else 'static'} activations" if a else "no activations"
    return f"{bits} {'sym' if w['symmetric'] else 'asym'} weights, {acts}, {g.format}"


def _linear_tensors(kind: str, g: Group, out: int, inn: int) -> tuple[dict[str, Spec], list[str]]:
    """The tensors the scheme's create_weights() registers for one (out, in) layer, and shape rules it breaks."""
    w, a = g.weights, g.input_activations
    why: list[str] = []
    if kind == "WNA16":  # schemes/compressed_tensors_wNa16.py; packing rule format §6
        pack = 32 // w["num_bits"]
        size = w["group_size"] if w["strategy"] == "group" else inn
        if inn % pack:  # weight_packed is [out, in // pack_factor]: the input dim packs without padding
            why.append(f"{inn} input features do not pack into int32 words of {pack} values")
        if inn % size:  # scales are [out, in // group_size]
            why.append(f"group size {size} does not divide its {inn} input features")
        specs = {
            "weight_packed": Spec(frozenset({"I32"}), ((out, inn // pack),)),
            "weight_scale": Spec(FLOATS, ((out, inn // size),)),
            "weight_shape": Spec(frozenset({"I64"}), ((2,),), (out, inn)),
        }
        if not w["symmetric"]:  # zero points pack along the output dim: [out // pack_factor, groups]
            if out % pack:
                why.append(f"{out} output features do not pack the zero points into int32 words of {pack} values")
            specs["weight_zero_point"] = Spec(frozenset({"I32"}), ((out // pack, inn // size),))
        if w["actorder"] == "group":
            specs["weight_g_idx"] = Spec(frozenset({"I32"}), ((inn,),))
        return specs, why
    if kind in ("W8A8Fp8", "W8A16Fp8"):  # schemes/compressed_tensors_w8a8_fp8.py, compressed_tensors_w8a16_fp8.py
        weight = Spec(frozenset({"F8_E4M3"}), ((out, inn),))
        if w["strategy"] == "block":
            rows, cols = _block(w["block_structure"])
            scale = Spec(FLOATS, ((math.ceil(out / rows), math.ceil(inn / cols)),))
        else:
            scale = Spec(FLOATS, ((out, 1),) if w["strategy"] == "channel" else SCALAR)
    else:  # W8A8Int8: schemes/compressed_tensors_w8a8_int8.py
        weight = Spec(frozenset({"I8"}), ((out, inn),))
        scale = Spec(FLOATS, ((out, 1),) if w["strategy"] == "channel" else SCALAR)
    specs = {"weight": weight, "weight_scale": scale}
    if a is not None and not a["dynamic"]:  # a static activation scale per layer (per shard when fused)
        specs["input_scale"] = Spec(FLOATS, SCALAR)
        if kind == "W8A8Int8" and not a["symmetric"]:
            specs["input_zero_point"] = Spec(frozenset({"I8"}), SCALAR)
    return specs, why


def _block(structure: Any) -> tuple[int, int]:
    """block_structure as [rows, cols], or the older "RxC" text (format §2.1)."""
    rows, cols = (structure.split("x") if isinstance(structure, str) else structure)
    return int(rows), int(cols)


def _float(shape: tuple[int, int], what: str) -> Expected:
    return Expected(what, {"weight": Spec(FLOATS, (shape,))})


# --- mixture of experts -------------------------------------------------------------------------


def _moe_modules(linears: Mapping[str, Any], layout: tuple[str, tuple[str, ...]] | None, config: Mapping[str, Any],
                 tensors: Mapping[str, Tensor], problems: list[Problem]) -> tuple[dict[str, list[str]], set[str]]:
    """Expert Linears by FusedMoE layer (`...experts`), and the modules vLLM keeps in float (routers)."""
    if layout is None:
        if any(".experts." in n for n in tensors):
            problems.append(Problem("model_type", f"{config.get('model_type')!r} has experts but no known vLLM expert layout"))
        return {}, set()
    block, names = layout
    count = config.get("num_local_experts") or config.get("num_experts") or 0
    pattern = re.compile(rf"^(.+\.{block}\.experts)\.(\d+)\.({'|'.join(names)})\.\w+$")
    for name in tensors:  # FusedMoE reads experts.{e}.{gate|up|down}.* and nothing else under experts
        if f".{block}.experts." in name and not ((m := pattern.match(name)) and int(m.group(2)) < count):
            problems.append(Problem(name, f"is not named as vLLM's FusedMoE reads experts: "
                                          f"<layer>.{block}.experts.<0..{count - 1}>.<{'|'.join(names)}>.<tensor>"))
    experts: dict[str, list[str]] = {}
    for m in linears:
        if (hit := re.match(rf"^(.+\.{block}\.experts)\.\d+\.(\w+)$", m)):
            experts.setdefault(hit.group(1), []).append(m)
    # routers: ReplicatedLinear(quant_config=None) in mixtral.py / qwen2_moe.py (gate, shared_expert_gate)
    routers = {m for m in linears if m.endswith((f".{block}.gate", ".shared_expert_gate"))}
    return experts, routers


def _moe_layers(experts: Mapping[str, list[str]], linears: Mapping[str, tuple[int, int]], groups: list[Group],
                ignore: list[str], expected: dict[str, Expected], problems: list[Problem]) -> None:
    """get_moe_method() in compressed_tensors_moe.py: one scheme for all of a layer's projections,
    looked up under the names `<layer>.0.gate_proj/up_proj/down_proj` and the class FusedMoE (which a
    `Linear` target covers), then one of the MoE methods that scheme has."""
    moe_groups = list(groups)
    linear = _owners(groups).get("Linear")
    if linear is not None and "FusedMoE" not in _owners(groups):  # _add_fused_moe_to_target_scheme_map()
        moe_groups.append(Group(linear.name, linear.weights, linear.input_activations, linear.format, ("FusedMoE",)))
    for layer, members in experts.items():
        lookups = [f"{layer}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        found = [None if _ignored_by_ct(n, ignore) else _vllm_target(moe_groups, n, "FusedMoE") for n in lookups]
        if len({g.key if g else None for g in found}) > 1:
            problems.append(Problem(layer, "vLLM finds different schemes for its gate, up and down projections"))
            continue
        group = found[0]
        own = {m: None if _ignored_by_ct(m, ignore) else _ct_group(m, groups) for m in members}
        if len({g.key if g else None for g in own.values()} | {group.key if group else None}) > 1:
            problems.append(Problem(layer, "vLLM builds one FusedMoE with one scheme, but its experts' projections differ"))
            continue
        if group is None:
            for m in members:
                expected[m] = _float(linears[m], "float (ignored) layer")
            continue
        kind, why = _moe_scheme(group)
        if kind is None:
            problems.append(Problem(layer, why))
            continue
        for m in members:
            specs, why = _linear_tensors(kind, group, *linears[m])
            problems += [Problem(m, w) for w in why]
            expected[m] = Expected(f"FusedMoE {kind} method", specs)


def _moe_scheme(g: Group) -> tuple[str | None, str]:
    """The MoE methods get_moe_method() picks: WNA16 (compressed_tensors_moe_wna16*.py assert symmetric
    weights), fp8 W8A8, and int8 W8A8 with dynamic per-token activations."""
    kind, why = _linear_scheme(g)
    where = f"group {g.name} ({_describe(g)})"
    if kind == "WNA16" and not g.weights["symmetric"]:
        return None, f"{where}: vLLM's FusedMoE WNA16 methods take only symmetric weights (no zero points)"
    if kind == "W8A16Fp8":
        return None, f"{where}: vLLM's FusedMoE has no fp8 weight-only method"
    if kind == "W8A8Int8" and not g.input_activations["dynamic"]:
        return None, f"{where}: vLLM's FusedMoE reads int8 activations only dynamic per token"
    return kind, why


# --- tensors ------------------------------------------------------------------------------------


def _compare(expected: Mapping[str, Expected], tensors: Mapping[str, Tensor], source: Mapping[str, Tensor],
             linears: Mapping[str, Any]) -> list[Problem]:
    """Each layer's tensors against what vLLM allocates; everything else as the float model had it.
    A tensor vLLM has no parameter for fails its load_weights() (params_dict[name], e.g. llama.py);
    a parameter no tensor fills is refused by the default loader (weights not initialized)."""
    problems = []
    # a layer's tensors are its own, also where a problem above left it without expectations
    owned = {m: {n[len(m) + 1:] for n in tensors if n.startswith(m + ".") and "." not in n[len(m) + 1:]} for m in linears}
    claimed = {f"{m}.{s}" for m, suffixes in owned.items() for s in suffixes}
    for module, exp in expected.items():
        what, specs = exp.what, exp.specs
        bias = f"{module}.bias"
        if bias in source:
            specs = {**specs, "bias": Spec(FLOATS, (source[bias].shape,))}
        have = owned[module]
        for suffix in sorted(set(specs) - have):
            problems.append(Problem(module, f"missing {suffix}, which vLLM's {what} loads"))
        for suffix in sorted(have - set(specs)):
            problems.append(Problem(module, f"has {suffix}, for which vLLM's {what} has no parameter"))
        for suffix in sorted(have & set(specs)):
            t, spec = tensors[f"{module}.{suffix}"], specs[suffix]
            if t.dtype not in spec.dtypes:
                problems.append(Problem(module, f"{suffix} is {t.dtype}; vLLM loads {'/'.join(sorted(spec.dtypes))}"))
            if t.shape not in spec.shapes:
                shapes = " or ".join(str(list(s)) for s in spec.shapes)
                problems.append(Problem(module, f"{suffix} has shape {list(t.shape)}; vLLM allocates {shapes}"))
            elif spec.values is not None and t.values != spec.values:
                problems.append(Problem(module, f"{suffix} holds {list(t.values or ())}, not the layer's {list(spec.values)}"))
    for name, t in source.items():  # norms, embeddings: copied as they are
        if name.rpartition(".")[0] in linears:
            continue
        claimed.add(name)
        if name not in tensors:
            problems.append(Problem(name, "is missing; vLLM needs every tensor of the model"))
        elif tensors[name].shape != t.shape:
            problems.append(Problem(name, f"has shape {list(tensors[name].shape)}, the model's is {list(t.shape)}"))
    problems += [Problem(n, "belongs to no layer vLLM builds") for n in sorted(set(tensors) - claimed)]
    return problems
