"""`SpinQuantModifier`: offline rotations (SpinQuant's R1 and R2) fused into the float weights.

llm-compressor's name and arguments. R1 rotates the residual stream (embeddings, every layer's
readers and writers, the head), R2 each attention head's value/output pair; the math is in
rotation.py. Only these two fold into the weights, so the output is a plain compressed-tensors
checkpoint. R3 and R4 rotate activations while the model runs, which vLLM does not do from a
checkpoint here: they are refused.

The rotations are built once, before calibration, from the model's widths (and, for a learned R1,
from a sample of its weights, see learned_rotation.py). Each decoder layer is then rotated as it
is read, before the modifiers after this one calibrate and quantize it; the embeddings, the final
norm and the head when the parts outside the layers are read. A head tied to the embeddings gets
its own rotated copy: the output holds one more vocab x hidden matrix.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelpress.contract import shown
from modelpress.engine.errors import ModelPressError
from modelpress.engine.learned_rotation import learn_rotation, quantizer_args
from modelpress.engine.mappings import NormFold, RotationLayout, derive_rotation_layout, unfolded_norms
from modelpress.engine.modifier import LayerState, Modifier, Plan, Planned, frozen
from modelpress.engine.quantize import QuantizedLinear
from modelpress.engine.rotation import (
    Rotation,
    build_rotation,
    commutes,
    fold_norm,
    rotate_reader,
    rotate_values,
    rotate_writer,
)
from modelpress.engine.smoothing import has_unit_offset
from modelpress.engine.statistics import ActivationStats
from modelpress.engine.targets import is_matched
from modelpress.engine.weights import find_decoder_layers, untie_from_embeddings

ReadWeight = Callable[[str], torch.Tensor]  # a parameter's float value by its full name


class SpinQuantMappings(BaseModel):
    """Where the rotations go, as llm-compressor's SpinQuantMapping writes it (module patterns).
    `attn` names the attention blocks R3 would hook; it is accepted and not needed by R1/R2."""

    model_config = ConfigDict(extra="forbid")
    embedding: str
    attn: str = "re:.*self_attn$"
    attn_q: str
    attn_k: str
    attn_v: str
    attn_o: str
    attn_head_dim: int | None = None
    mlp_in: list[str]
    mlp_out: list[str]
    lm_head: str

    @field_validator("mlp_in", "mlp_out", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class NormMapping(BaseModel):
    """A norm and the Linears reading its output, as llm-compressor's NormMapping writes it."""

    model_config = ConfigDict(extra="forbid")
    norm: str
    linears: list[str]

    @field_validator("linears", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


@dataclass(frozen=True)
class Outside:
    """The modules outside the decoder layers that R1 touches."""

    embedding: str
    head: str | None  # None when the model has no separate output projection to rotate
    norms: tuple[NormFold, ...]  # the final norm -> the head


@dataclass(frozen=True, eq=False)
class RotationPlan(Plan):
    """What the rotations touch (no module is quantized by them), and, once built, the rotations.

    `quantizer` is the plan of the quantizing modifier after this one: a learned R1 minimizes the
    quantization error of its schemes.
    """

    layouts: MappingProxyType[str, RotationLayout] = field(default_factory=lambda: MappingProxyType({}))  # by layer prefix
    outside: Outside | None = None
    hidden: int = 0
    head_dim: int = 0
    r1: Rotation | None = None
    r2: Rotation | None = None
    quantizer: Plan | None = None


class SpinQuantModifier(Modifier):
    """SpinQuant's offline rotations R1 (residual stream) and R2 (attention values), fused into the weights."""

    quantizes: ClassVar[bool] = False
    rotations: list[Literal["R1", "R2", "R3", "R4"]] = ["R1", "R2"]
    transform_type: Literal["hadamard", "random-hadamard", "random-matrix", "learned"] = "hadamard"
    randomize: bool = False
    learnable: bool = False
    precision: str = "float64"
    transform_block_size: int | None = Field(None, ge=1)
    mappings: SpinQuantMappings | None = None
    norm_mappings: list[NormMapping] | None = None
    # ModelPress's own: the seed of the random types, and the steps of a learned R1
    seed: int = 0
    learn_steps: int = Field(100, ge=0, le=100_000)

    @field_validator("rotations", mode="before")
    @classmethod
    def _rotations(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("SpinQuantModifier.rotations: give a list such as [R1, R2]")
        value = [v.upper() if isinstance(v, str) else v for v in value]
        online = [v for v in value if v in ("R3", "R4")]
        if online:
            raise ValueError(
                f"SpinQuantModifier.rotations: {', '.join(online)} rotate activations while the model runs, which vLLM cannot "
                "do from a checkpoint here; use rotations: [R1, R2]"
            )
        return value

    @field_validator("randomize", "learnable")
    @classmethod
    def _unsupported(cls, value: bool) -> bool:
        if value:
            raise ValueError("SpinQuantModifier: randomize and learnable are not supported (nor by llm-compressor 0.14); "
                             "for a rotation fitted to the weights use transform_type: learned")
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in ("float64", "torch.float64"):
            raise ValueError(f"SpinQuantModifier.precision: rotations are always fused in float64, not {shown(value)}; drop precision")
        return value

    def needs_data(self) -> bool:
        return False

    def plan(self, model: torch.nn.Module) -> RotationPlan:
        config = model.config
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = (self.mappings.attn_head_dim if self.mappings and self.mappings.attn_head_dim else None) or getattr(
            config, "head_dim", None) or hidden // heads
        block = self.transform_block_size or hidden
        self._check_block("R1", hidden, block, "hidden_size")
        if "R2" in self.rotations:
            self._check_block("R2", head_dim, head_dim, "head_dim")
        prefix, layers = find_decoder_layers(model)
        layouts = {}
        for i, layer in enumerate(layers):
            lp = f"{prefix}.{i}."
            layout = self._layout(layer, lp, kv_heads, head_dim)
            if "R1" in self.rotations:
                stray = unfolded_norms(layer, lp, layout)
                if stray:
                    raise ModelPressError(
                        f"SpinQuantModifier: {type(model).__name__} normalizes a sublayer's output before the residual ({stray[0]}), "
                        "which R1 cannot be rotated through; use rotations: [R2], or drop SpinQuantModifier for this model"
                    )
            layouts[lp] = layout
        return RotationPlan(frozen({}), layouts=MappingProxyType(layouts), outside=self._outside(model, f"{prefix}."), hidden=hidden, head_dim=head_dim)

    def _check_block(self, rotation: str, width: int, block: int, what: str) -> None:
        """A block must divide its width, and a Hadamard block be a power of two."""
        largest = width & -width  # the largest power of two dividing the width
        other = "transform_type: random-matrix"
        fix = f"set transform_block_size: {largest} or {other}" if rotation == "R1" and largest > 1 else f"use {other}"
        if width % block:
            raise ModelPressError(f"SpinQuantModifier.transform_block_size: {block} does not divide the {what} {width} ({rotation}); {fix}")
        if self.transform_type != "random-matrix" and block & (block - 1):
            raise ModelPressError(
                f"SpinQuantModifier.transform_type: {self.transform_type} needs Hadamard blocks of a power of two, and {rotation}'s "
                f"blocks are {block} wide ({what} {width}); {fix}"
            )

    def _layout(self, layer: torch.nn.Module, prefix: str, kv_heads: int, head_dim: int) -> RotationLayout:
        if self.mappings is None and self.norm_mappings is None:
            return derive_rotation_layout(layer, prefix, kv_heads, head_dim)
        derived = derive_rotation_layout(layer, prefix, kv_heads, head_dim) if self.mappings is None or self.norm_mappings is None else None
        named = [(prefix + n, m) for n, m in layer.named_modules() if n]

        def linears(patterns: list[str]) -> tuple[str, ...]:
            return tuple(n for n, m in named if isinstance(m, torch.nn.Linear) and is_matched(n, m, patterns))

        def one(pattern: str, what: str) -> str:
            found = linears([pattern])
            if len(found) != 1:
                raise ModelPressError(f"SpinQuantModifier.mappings.{what}: {shown(pattern)} matches {len(found)} Linears in {prefix[:-1]}; it must match one")
            return found[0]

        if self.mappings is not None:
            m = self.mappings
            readers = linears([m.attn_q, m.attn_k, m.attn_v, *m.mlp_in])
            writers = linears([m.attn_o, *m.mlp_out])
            value, output = one(m.attn_v, "attn_v"), one(m.attn_o, "attn_o")
            out = dict(named)[value].out_features
            rows = (out - kv_heads * head_dim, out)
        else:
            assert derived is not None
            readers, writers, value, rows, output = derived.readers, derived.writers, derived.value, derived.value_rows, derived.output
        if self.norm_mappings is not None:
            norms = []
            for k, nm in enumerate(self.norm_mappings):
                found = [n for n, mod in named if is_matched(n, mod, [nm.norm])]
                if len(found) > 1:
                    raise ModelPressError(f"SpinQuantModifier.norm_mappings[{k}].norm: {shown(nm.norm)} matches {len(found)} modules in {prefix[:-1]}; it must match one")
                if found:
                    norms.append(NormFold(found[0], linears(nm.linears)))
            norms_t = tuple(norms)
        else:
            assert derived is not None
            norms_t = derived.norms
        return RotationLayout(norms_t, readers, writers, value, rows, output)

    def _outside(self, model: torch.nn.Module, inside: str) -> Outside:
        named = [(n, m) for n, m in model.named_modules() if n and not f"{n}.".startswith(inside)]
        if self.mappings is not None:
            embedding = next((n for n, m in named if is_matched(n, m, [self.mappings.embedding])), None)
            head = next((n for n, m in named if is_matched(n, m, [self.mappings.lm_head])), None)
        else:
            modules = {id(m): n for n, m in named}
            embedding = modules.get(id(model.get_input_embeddings()))
            head = modules.get(id(model.get_output_embeddings()))
        if embedding is None:
            raise ModelPressError("SpinQuantModifier: no input embeddings found outside the decoder layers; give mappings.embedding")
        if self.norm_mappings is not None:
            norms = tuple(
                NormFold(n, tuple(x for x, mod in named if is_matched(x, mod, nm.linears)))
                for nm in self.norm_mappings for n, m in named if is_matched(n, m, [nm.norm])
            )
        else:
            final = [n for n, m in named if n.rsplit(".", 1)[-1].endswith("norm") and isinstance(getattr(m, "weight", None), torch.Tensor)]
            if len(final) != 1 or head is None:
                raise ModelPressError(f"SpinQuantModifier: expected one final norm before the head, found {final}; give norm_mappings explicitly")
            norms = (NormFold(final[0], (head,)),)
        return Outside(embedding, head, norms)

    def bind(self, plan: Plan, earlier: list[Planned], later: list[Planned]) -> Plan:
        if earlier:
            raise ModelPressError(f"recipe: SpinQuantModifier must come first, before {type(earlier[0][0]).__name__}: it rotates the float weights")
        quantizer = next((p for m, p in later if m.quantizes and len(p)), None)
        return dataclasses.replace(plan, quantizer=quantizer)

    def transform_model(self, plan: Plan, model: torch.nn.Module, read: ReadWeight) -> Plan:
        """Build the rotations, then rotate the parts outside the decoder layers (all in memory now)."""
        assert isinstance(plan, RotationPlan) and plan.outside is not None
        r1 = r2 = None
        block = self.transform_block_size or plan.hidden
        if "R1" in self.rotations:
            kind = "random-hadamard" if self.transform_type == "learned" else self.transform_type
            r1 = build_rotation(plan.hidden, block, kind, self.seed)
            if self.transform_type == "learned":
                offset = has_unit_offset(model.get_submodule(plan.outside.norms[0].norm)) if plan.outside.norms else False
                r1 = learn_rotation(r1, list(plan.layouts.values()), read, quantizer_args(plan.quantizer), self.learn_steps, self.seed, offset)
        if "R2" in self.rotations:
            kind = "hadamard" if self.transform_type == "learned" else self.transform_type
            r2 = build_rotation(plan.head_dim, plan.head_dim, kind, self.seed + 1)
        if r1 is not None:
            out = plan.outside
            if out.head is not None:
                untie_from_embeddings(model, [out.head])
            for fold in out.norms:
                self._fold(model.get_submodule, fold, r1)
            rotate_reader(model.get_submodule(out.embedding), r1)  # E -> E Q: each token's row
            if out.head is not None:
                rotate_reader(model.get_submodule(out.head), r1)
        return dataclasses.replace(plan, r1=r1, r2=r2)

    def transform_layer(self, plan: Plan, layer: torch.nn.Module, prefix: str) -> None:
        """Rotate one decoder layer's float weights as it is read, before anything calibrates it."""
        assert isinstance(plan, RotationPlan)
        layout = plan.layouts.get(prefix)
        if layout is None:
            return
        local = lambda name: layer.get_submodule(name[len(prefix):])  # noqa: E731
        if plan.r1 is not None:
            for fold in layout.norms:
                self._fold(local, fold, plan.r1)
            for name in layout.readers:
                rotate_reader(local(name), plan.r1)
            for name in layout.writers:
                rotate_writer(local(name), plan.r1)
        if plan.r2 is not None and layout.value is not None and layout.output is not None and layout.value_rows is not None:
            rotate_values(local(layout.value), layout.value_rows, local(layout.output), plan.r2, plan.head_dim)

    @staticmethod
    def _fold(get: Callable[[str], torch.nn.Module], fold: NormFold, r1: Rotation) -> None:
        norm = get(fold.norm)
        fold_norm(norm, [get(n) for n in fold.linears])
        if not commutes(norm, r1):
            raise ModelPressError(f"SpinQuantModifier: {fold.norm} ({type(norm).__name__}) is not an RMS norm, which R1 needs; drop R1 for this model")

    def apply(
        self, plan: Plan, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        return {}
