"""Memory preflight: the peak resident memory of every stage of a job, known before anything is downloaded.

The engine holds one decoder layer at a time, so a stage's peak follows from a few tensors whose
sizes config.json and the spec give: the process's own runtime (Python, torch, transformers, the
tokenizer), the weights outside the layers (embeddings, head), the widest layer's weights, and
then what the stage adds:

- compression with calibration data keeps every calibration token's hidden state ([tokens, hidden])
  and, while a layer is compressed (layer_pass.py), a norm's output of the same size, the
  attention's output, or the MLP's inner activation ([tokens, intermediate], the widest), plus the
  MLP's per-chunk temporaries. Those kept activations take the model's dtype in memory, 16 bits
  with a compact `activation_storage`, or only the pieces in use when they are spilled to disk
  (activations.py). GPTQ aimed at the float model (`float_target`) keeps every one of those
  activations twice (the float model's beside the compressed model's), a float copy of the layer,
  and the cross term and a damped factor beside the Hessian. One group's X^T X at a time (float32, input features squared), and while GPTQ
  or SparseGPT solves it, the Hessian and the damped inverse's factors (two more matrices of that
  size at once) and float32 copies of the stacked weights. The embeddings and head are not held
  while the layers are compressed: they are read before (to embed the samples) and after (to be
  written, or quantized). A layer the split does not drive
  (mixture-of-experts MLPs) keeps every Linear's X^T X of the layer at once, and its outputs beside
  its inputs;
- perplexity, read layer by layer from disk (streamed_eval.py), keeps every window's hidden state
  twice (a layer's inputs and outputs) and one window's logits ([window, vocab], float32);
- answers and self-generated calibration load the whole float model, with its KV cache.

Pure and torch-free: the runner measures its own runtime and reads config.json, and everything
here is arithmetic over numbers, so the estimate can be tested on configs alone.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from modelpress.contract import (MIN_PERPLEXITY_TOKENS, MIN_SEQUENCE_LENGTH, SELF_GENERATED, ActivationStorage, JobSpec,
                                 MemoryEstimate, StageMemory, human_bytes)

MiB = 1 << 20
F32 = 4
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
# What the runtime grows by after the preflight has measured it: the tokenizer (and the text it
# tokenized) from the first stage that reads data, the datasets library from compression on.
TOKENIZER = 48 * MiB
LIBRARIES = 64 * MiB
TOKEN_CHUNK = 4096  # tokens per call of a token-wise part (layer_pass.TOKEN_CHUNK)
MLP_CHUNK = 1024  # tokens per call of the MLP (layer_pass.MLP_CHUNK)
DROPPED_CHUNK = 16384  # tokens per piece of the MLP's norm output (layer_pass.DROPPED_CHUNK)
# `auto` tries these in order: exact ones first, the 16-bit dtype only where it halves something
AUTO_STORAGE: tuple[ActivationStorage, ...] = ("memory", "bfloat16", "disk")
EVAL_WINDOW = 512  # tokens per perplexity window (runner.run.evaluate)
GENERATION_BATCH = 16  # self-generated samples per batch (runner.data.SELF_GENERATED_BATCH)
GENERATION_LENGTH = 512  # tokens per self-generated sample, at most (runner.data.SELF_GENERATED_MAX_LENGTH)
PROMPT_TOKENS = 256  # a prompt's tokens, for the answers' KV cache
# The multiples below are live copies counted in the engine's code and checked against measured
# peaks (bench/memory_bench.py).
# float32 [in, in] matrices live while GPTQ/SparseGPT factors a damped Hessian (second_order.py:
# the Hessian, made in the accumulated X^T X's place, and two more at once: its damped reordered
# copy and the Cholesky factor, then the flipped factor and the inverse factor), and through the
# sweep (the Hessian, the inverse factor) with float32 copies of the stacked weight (in sweep
# order, in natural order, the observer's grouped copy) and, for a clip search (gptq.row_searched),
# the int8 codes of the best run so far; the stack itself is in the weights' dtype.
# The scale refit after a sweep (gptq.least_squares_scales) holds the Hessian and its damped copy
# with float32 temporaries of half the stack at a time (its codes, weights and products): less
# than the sweep's.
HESSIAN_COPIES = 3
# float_target's move (gptq.float_target): the cross term and the damped Hessian's factor, beside
# the Hessian, before the solve's own copies
FLOAT_TARGET_COPIES = 2
SWEEP_HESSIANS = 2
WEIGHT_COPIES = 3
SEARCH_CODES = 1  # bytes per weight: a clip search's best codes, counted for every sweep
# round-to-nearest of a weight: one float32 temporary and the dequantized weight (gptq.py,
# quantize.py work in place); reading a compressed weight back: its int8 codes, the float32 weight
# and the result in the model's dtype (checkpoint_reader.py)
ROUNDING_TEMPORARIES = F32
DEQUANTIZE_TEMPORARIES = 1 + F32
MLP_TEMPORARIES = 5  # [chunk, intermediate] tensors alive in one MLP call (gate, its activation, up, the product, the copy out)
LOGITS = 2  # [window, vocab] float32 tensors alive while a window's loss is taken (the logits, their log-softmax)
KV_COPIES = 2  # a growing KV cache is copied as it grows (torch.cat), and sampling keeps its own tensors
# glibc keeps freed blocks below its mmap threshold on the heap, and the threshold rises (up to
# 32 MiB) as larger blocks are freed: compression leaves heap holes about a Linear's weight in
# float32 each (the widest below the threshold: blocks past it go back to the system), a few when
# it runs first, a dozen after a stage that ran the model (evaluation, self-generation) has raised
# the threshold
MMAP_THRESHOLD_MAX = 32 * MiB
# vLLM's own process in the servable check, besides the weights it loads and its KV cache: measured
# 0.75 GB resident in all for SmolLM2 on the CPU build (0.32), with about 0.3 GB of it the weights
SERVE_RUNTIME = 480 * MiB
HEAP_HOLES = 4
HEAP_HOLES_AFTER_MODEL = 12
# and the torch threads' own malloc arenas, more of them the busier the machine: the same
# calibration run peaks up to a tenth apart from one run to the next
ARENAS = 48 * MiB
DEQUANTIZING_LOAD = 0.3  # of the whole model, what transformers' compressed-tensors loader holds beside the weights


class NoShape(ValueError):
    """config.json does not say enough to estimate from (a field it lacks)."""


def _first(config: Mapping[str, Any], *names: str) -> Any:
    return next((config[n] for n in names if isinstance(config.get(n), int) and not isinstance(config.get(n), bool)), None)


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer as its config.json describes it."""

    hidden: int
    intermediate: int  # a dense MLP's inner width
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    tied: bool
    dtype_bytes: int  # of the weights, and so of the activations
    experts: int = 0  # routed experts per mixture-of-experts MLP
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # a shared expert's inner width (Qwen2-MoE), 0: none
    positions: int = 4096

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Shape":
        """The shape from config.json (a multimodal model's `text_config` when it has one); NoShape names what is missing."""
        text = config.get("text_config")
        if "hidden_size" not in config and isinstance(text, Mapping):
            config = {**text, **{k: config[k] for k in ("dtype", "torch_dtype") if k in config and k not in text}}
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first(config, "num_attention_heads", "n_head")
        vocab = _first(config, "vocab_size")
        missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                                  ("vocab_size", vocab)) if not v]
        if missing:
            raise NoShape(f"config.json has no {missing[0]}")
        experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts") or 0
        intermediate = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
        expert_intermediate = (_first(config, "moe_intermediate_size") or intermediate) if experts else 0
        shared = _first(config, "shared_expert_intermediate_size") or (_first(config, "n_shared_experts") or 0) * expert_intermediate
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        return cls(
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            kv_heads=_first(config, "num_key_value_heads") or heads,
            head_dim=_first(config, "head_dim") or hidden // heads,
            vocab=vocab,
            layers=layers,
            tied=bool(config.get("tie_word_embeddings", False)),
            dtype_bytes=DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4),
            experts=experts,
            expert_intermediate=expert_intermediate,
            shared_intermediate=shared,
            positions=_first(config, "max_position_embeddings", "n_positions") or 4096,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def attention_params(self) -> int:
        return self.hidden * (2 * self.q_width + 2 * self.kv_width)

    @property
    def mlp_params(self) -> int:
        if not self.moe:
            return 3 * self.hidden * self.intermediate
        routed = self.experts * (3 * self.hidden * self.expert_intermediate + self.hidden)
        return routed + 3 * self.hidden * self.shared_intermediate

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total_params(self) -> int:
        return self.outside_params + self.layers * self.layer_params

    def stacks(self) -> list[tuple[int, int]]:
        """(rows, columns) of the weights solved together on one input: q/k/v, o, gate/up, down
        (per expert in a mixture-of-experts MLP)."""
        inner = self.expert_intermediate if self.moe else self.intermediate
        found = [(self.q_width + 2 * self.kv_width, self.hidden), (self.hidden, self.q_width), (2 * inner, self.hidden),
                 (self.hidden, inner)]
        if self.shared_intermediate:
            found += [(2 * self.shared_intermediate, self.hidden), (self.hidden, self.shared_intermediate)]
        return found

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of each Linear of one layer (one expert's, in a mixture-of-experts MLP)."""
        inner = max(self.expert_intermediate if self.moe else self.intermediate, self.shared_intermediate)
        return [(self.q_width, self.hidden), (self.kv_width, self.hidden), (self.hidden, self.q_width), (inner, self.hidden),
                (self.hidden, inner)]

    def layer_gram_bytes(self) -> int:
        """Every targeted Linear's X^T X of one layer at once, as the generic path keeps them."""
        h, inner = self.hidden, self.expert_intermediate if self.moe else self.intermediate
        attention = 3 * h * h + self.q_width**2
        per_mlp = 2 * h * h + inner * inner
        shared = 2 * h * h + self.shared_intermediate**2 if self.shared_intermediate else 0
        return F32 * (attention + max(self.experts, 1) * per_mlp + shared)


@dataclass(frozen=True)
class Work:
    """What a job asks of the model, in the numbers its memory follows."""

    samples: int = 0  # calibration samples; 0: the recipe reads no data
    sequence: int = 0  # tokens per calibration sample
    hessians: bool = False  # X^T X per group (GPTQ, SparseGPT, AWQ), and a second-order solve
    float_stream: bool = False  # the float model's activations carried beside the compressed ones (float_target)
    self_generated: bool = False
    perplexity_tokens: int = 0  # 0: no perplexity
    prompts: int = 0
    new_tokens: int = 0
    head_quantized: bool = False  # round-to-nearest on the head (a recipe without data that does not ignore it)
    on_host: bool = True  # False: the engine's tensors sit on an accelerator, host memory holds the runtime and transfers
    activations: str = "memory"  # where the calibration activations are kept (an ActivationStorage), or "auto"
    served_kv_cache: int = 0  # bytes of vLLM's KV cache in the servable check; 0: no such check

    @property
    def tokens(self) -> int:
        return self.samples * self.sequence


@dataclass(frozen=True)
class Stage:
    """One stage's estimated peak of the whole process, and the part of it that dominates."""

    name: str
    bytes: int
    largest: str  # what takes the most of it, for people


def _solve_bytes(shape: Shape, hessians: bool, float_stream: bool = False) -> int:
    """The widest temporaries of compressing one layer's weights: a second-order solve of a stack
    sharing one input (its X^T X included), or round-to-nearest of a Linear."""
    d = shape.dtype_bytes
    if hessians:
        copies = HESSIAN_COPIES + (FLOAT_TARGET_COPIES if float_stream else 0)
        return max(max(F32 * copies * c * c, F32 * (SWEEP_HESSIANS * c * c + WEIGHT_COPIES * r * c) + SEARCH_CODES * r * c) + d * r * c
                   for r, c in shape.stacks())
    return max((ROUNDING_TEMPORARIES + d) * r * c for r, c in shape.linears())


def _layer_bytes(shape: Shape) -> int:
    """One layer being compressed: each Linear's weight (as read, then its dequantized
    replacement) and its int8 codes, the widest Linear's replacement beside its original, and the
    next layer's weights, read ahead meanwhile (weights.ReadAhead)."""
    return shape.layer_params * (2 * shape.dtype_bytes + 1) + shape.dtype_bytes * max(r * c for r, c in shape.linears())


def _compress(shape: Shape, work: Work, base: int) -> Stage:
    d, h = shape.dtype_bytes, shape.hidden
    if not work.on_host:
        return Stage("compress", base + shape.layer_params * d, "the widest decoder layer, passing through")
    after_model = work.perplexity_tokens or work.prompts or work.self_generated
    hole = max((F32 * r * c for r, c in shape.linears() if F32 * r * c <= MMAP_THRESHOLD_MAX), default=0)
    holes = (HEAP_HOLES_AFTER_MODEL if after_model else HEAP_HOLES) * hole
    outside = shape.outside_params * d  # before and after the layers, not with them
    head = ((ROUNDING_TEMPORARIES + d) * shape.vocab * h + (shape.vocab * h * d if shape.tied else 0)) if work.head_quantized else 0
    if not work.samples:
        layer = _layer_bytes(shape) + _solve_bytes(shape, False)
        largest = "the widest decoder layer" if layer > outside + head else "the embeddings and head"
        return Stage("compress", base + holes + max(layer, outside + head), largest)
    tokens = work.tokens
    streams = 2 if work.float_stream else 1
    kept = _kept_bytes(work.activations, d) * streams  # every kept activation, in each stream
    hidden = tokens * h * kept
    base += holes + ARENAS + tokens * 24  # and the samples' token ids: tensors, the dataset handed to the engine, its copy
    float_layer = shape.layer_params * d if work.float_stream else 0
    resident = base + _layer_bytes(shape) + float_layer + streams * _pieces_in_use(shape, work)
    upcast = min(tokens, TOKEN_CHUNK) * max(c for _, c in shape.stacks()) * F32 if d != F32 else 0  # a chunk of input, in float32
    solve = _solve_bytes(shape, work.hessians, work.float_stream) + streams * upcast
    if shape.moe:  # generic path: inputs, outputs, every X^T X of the layer, per-sample temporaries
        per_sample = MLP_TEMPORARIES * work.sequence * max(shape.expert_intermediate, shape.shared_intermediate) * d
        grams = shape.layer_gram_bytes() if work.hessians else 0
        return Stage("compress", resident + 2 * hidden + grams + max(solve, per_sample),
                     f"calibration activations, {human_bytes(2 * hidden)}")
    attention = tokens * shape.q_width * kept
    inner = tokens * shape.intermediate * kept
    scores = 2 * shape.heads * work.sequence**2 * F32
    phases = [
        2 * hidden + solve,  # the hidden states and the attention's norm output
        2 * hidden + attention + scores,
        hidden + attention + solve,
        # the MLP's norm output drains as its inner activation is built, one stream at a time
        hidden + hidden // streams + inner + MLP_TEMPORARIES * min(tokens, MLP_CHUNK) * shape.intermediate * d,
        hidden + inner + solve,
    ]
    return Stage("compress", max(resident + max(phases), base + outside + hidden), f"calibration activations, {human_bytes(hidden + inner)}")


def _kept_bytes(storage: str, d: int) -> int:
    """Bytes a kept activation takes per element: the model's dtype, 16 bits, or none resident (disk)."""
    return 0 if storage == "disk" else min(d, 2) if storage in ("bfloat16", "float16") else d


def _pieces_in_use(shape: Shape, work: Work) -> int:
    """What storage other than `memory` holds besides the kept activations: the pieces being read
    and written, widened to the model's dtype (a block of the MLP's norm output and its source
    rows, and a piece each of an input, an output and a residual update)."""
    if work.activations == "memory":
        return 0
    d, tokens = shape.dtype_bytes, work.tokens
    widest = max(shape.intermediate, shape.expert_intermediate, shape.q_width, shape.hidden)
    return 2 * min(tokens, DROPPED_CHUNK) * shape.hidden * d + 3 * min(tokens, TOKEN_CHUNK) * widest * d


def _perplexity(shape: Shape, work: Work, base: int, compressed: bool) -> Stage:
    d = shape.dtype_bytes
    name = "compressed perplexity" if compressed else "perplexity"
    if not work.on_host:
        return Stage(name, base + shape.layer_params * d, "the widest decoder layer, passing through")
    window = min(EVAL_WINDOW, shape.positions)
    tokens = -(-work.perplexity_tokens // window) * window
    hidden = 2 * tokens * shape.hidden * d  # a layer's inputs and outputs, every window
    logits = LOGITS * window * shape.vocab * F32
    layer_pass = MLP_TEMPORARIES * window * max(shape.intermediate, shape.expert_intermediate) * d + 2 * shape.heads * window**2 * F32
    widest = max(r * c for r, c in shape.linears() + ([(shape.vocab, shape.hidden)] if work.head_quantized else []))
    dequantize = (DEQUANTIZE_TEMPORARIES + d) * widest if compressed else 0
    weights = shape.outside_params * d + shape.layer_params * d
    return Stage(name, base + weights + hidden + max(logits, layer_pass, dequantize), f"one window's logits, {human_bytes(logits)}")


def _whole_model(shape: Shape, batch: int, length: int, overhead: float = 0.0) -> int:
    """A loaded float model, what its loader holds beside it, and its KV cache for `batch` sequences of `length` tokens."""
    d = shape.dtype_bytes
    weights = shape.total_params * d
    cache = KV_COPIES * 2 * shape.layers * batch * length * shape.kv_width * d
    step = batch * (LOGITS * shape.vocab * F32 + MLP_TEMPORARIES * max(shape.intermediate, shape.expert_intermediate) * d)
    return int(weights * (1 + overhead)) + cache + step


def estimate(shape: Shape, work: Work, runtime: int) -> list[Stage]:
    """Every stage's estimated peak (the whole process's resident memory), in the order they run.

    `runtime` is the process's resident memory when the preflight runs (torch and transformers
    imported); the tokenizer and the libraries loaded later are added to it.
    """
    reading, compressing = runtime + TOKENIZER, runtime + TOKENIZER + LIBRARIES
    stages = [Stage("runtime", reading, "Python, torch, transformers and the tokenizer")]
    if work.self_generated and work.samples:
        model = _whole_model(shape, GENERATION_BATCH, min(work.sequence, GENERATION_LENGTH))
        stages.append(Stage("self-generation", reading + model, "the whole float model"))
    if work.perplexity_tokens:
        stages.append(_perplexity(shape, work, reading, compressed=False))
    if work.prompts:
        stages.append(Stage("answers", reading + _whole_model(shape, 1, PROMPT_TOKENS + work.new_tokens), "the whole float model"))
    stages.append(_compress(shape, work, compressing))
    if work.perplexity_tokens:
        stages.append(_perplexity(shape, work, compressing, compressed=True))
    if work.prompts:
        model = _whole_model(shape, 1, PROMPT_TOKENS + work.new_tokens, DEQUANTIZING_LOAD)
        stages.append(Stage("compressed answers", compressing + model, "the whole model, dequantized"))
    if work.served_kv_cache:
        stages.append(_servable(shape, work, compressing))
    return stages


def _servable(shape: Shape, work: Work, base: int) -> Stage:
    """vLLM in a process of its own beside the runner (the pod's limit counts both): its runtime,
    and on the host its KV cache and the weights at the model's dtype (the packed ones are smaller)."""
    if not work.on_host:
        return Stage("servable", base + SERVE_RUNTIME, "vLLM's runtime; the model and its KV cache are on the accelerator")
    return Stage("servable", base + SERVE_RUNTIME + work.served_kv_cache + shape.total_params * shape.dtype_bytes,
                 f"vLLM's KV cache, {human_bytes(work.served_kv_cache)} (VLLM_CPU_KVCACHE_SPACE)")


# --- the verdict -------------------------------------------------------------------------------------


ANSWERS = ("answers", "compressed answers")  # stages skipped, not refused, when they would not fit


@dataclass(frozen=True)
class Verdict:
    """The estimate as the job's first progress event carries it, and what the runner does about it."""

    estimate: MemoryEstimate
    activations: ActivationStorage  # where compression keeps the calibration activations
    answers_skipped: str | None  # why the prompts will not be answered (the whole model would not fit)
    problem: str | None  # why the job is refused (exit 2), naming the settings that would fit


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with fits(n), for fits monotone (true up to some n); 0 when none."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _compress_fix(shape: Shape, work: Work, runtime: int, limit: int) -> str:
    """The calibration settings that would fit under `limit`, or what would have to change instead."""
    def fits(**change: Any) -> bool:
        return _compress_fits(shape, replace(work, **change), runtime, limit)

    other = next((k for k in _storages(shape, work) if k != work.activations and fits(activations=k)), None)
    ways = [f"activationStorage {other}" + (" (activations offloaded to the scratch volume)" if other == "disk" else "")] if other else []
    samples = _largest(lambda n: fits(samples=n), work.samples - 1)
    sequence = _largest(lambda n: fits(sequence=n), work.sequence - 1)
    sequence = sequence if sequence >= MIN_SEQUENCE_LENGTH else 0
    if not samples and not sequence and not other:
        return "no smaller calibration set fits; give the job more memory"
    ways += ([f"numSamples {samples} at maxSequenceLength {work.sequence}"] if samples else []) + (
        [f"maxSequenceLength {sequence} at numSamples {work.samples}"] if sequence else [])
    storage = f" (activationStorage {work.activations})" if work.activations != "memory" else ""
    return f"{' or '.join(ways)} would fit{storage}"


def _storages(shape: Shape, work: Work) -> list[ActivationStorage]:
    """The activation storages `auto` may pick, in order: on an accelerator only memory, and 16
    bits only where the model computes in more."""
    if not work.on_host:
        return ["memory"]
    return [k for k in AUTO_STORAGE if k != "bfloat16" or shape.dtype_bytes > 2]


def _compress_fits(shape: Shape, work: Work, runtime: int, limit: int) -> bool:
    return _compress(shape, work, runtime + TOKENIZER + LIBRARIES).bytes <= limit


def choose_storage(shape: Shape, work: Work, runtime: int, limit: int | None) -> ActivationStorage:
    """`auto` resolved: the first storage whose compression fits under `limit` (memory when none
    is known, or when the recipe keeps no activations), else the most frugal one, which the
    refusal's settings are then reckoned with."""
    if work.activations != "auto":
        return work.activations  # type: ignore[return-value]
    candidates = _storages(shape, work)
    if limit is None or not work.samples:
        return "memory"
    return next((k for k in candidates if _compress_fits(shape, replace(work, activations=k), runtime, limit)), candidates[-1])


def verdict(shape: Shape, work: Work, runtime: int, limit: int | None) -> Verdict:
    """The estimate against `limit` (bytes; None: no limit known): answers that would not fit are
    skipped, and any other stage that would not fit refuses the job with the settings that would.
    An `auto` activation storage is resolved first (`choose_storage`)."""
    work = replace(work, activations=choose_storage(shape, work, runtime, limit))
    stages = estimate(shape, work, runtime)
    answers_skipped = None
    answering = max((s.bytes for s in stages if s.name in ANSWERS), default=0)
    if limit is not None and answering > limit:
        answers_skipped = (f"answers need the whole model in memory, about {human_bytes(answering)} in all, "
                           f"more than the {human_bytes(limit)} this job may use")
    counted = [s for s in stages if not (answers_skipped and s.name in ANSWERS)]
    peak = max(counted, key=lambda s: s.bytes)
    problems = []
    if limit is not None:
        for stage in (s for s in counted if s.bytes > limit):
            need = f"needs about {human_bytes(stage.bytes)} at its peak ({stage.largest}), more than the {human_bytes(limit)} memory limit"
            if stage.name == "runtime":
                problems.append(f"memory limit: the runtime alone {need}; give the job more memory")
                break
            if stage.name == "self-generation":
                problems.append(f"spec.calibration.dataset: self-generated calibration loads the whole model and {need}; "
                                "give a calibration dataset instead")
            elif stage.name in ("perplexity", "compressed perplexity"):
                compressed = stage.name != "perplexity"
                base = runtime + TOKENIZER + (LIBRARIES if compressed else 0)
                tokens = _largest(lambda n: _perplexity(shape, replace(work, perplexity_tokens=n), base, compressed).bytes <= limit,
                                  work.perplexity_tokens - 1)
                fix = f"maxTokens {tokens} would fit" if tokens >= MIN_PERPLEXITY_TOKENS else "no shorter evaluation fits; give the job more memory"
                problems.append(f"spec.evaluation.perplexity.maxTokens: {stage.name} {need}; {fix}")
            elif stage.name == "compress" and work.samples:
                problems.append(f"spec.calibration.numSamples: compression {need}; {_compress_fix(shape, work, runtime, limit)}")
            elif stage.name == "compress":
                problems.append(f"memory limit: compression {need}; give the job more memory")
            elif stage.name == "servable":
                problems.append(f"spec.evaluation.servable: vLLM's check {need}; lower VLLM_CPU_KVCACHE_SPACE (GiB) in the "
                                "runner's environment, give the job more memory, or set servable: false")
    estimate_event = MemoryEstimate(
        peak_bytes=peak.bytes,
        peak_stage=peak.name,
        limit_bytes=limit,
        activation_storage=work.activations if work.samples else None,
        stages=[StageMemory(stage=s.name, bytes=s.bytes, skipped=True if answers_skipped and s.name in ANSWERS else None)
                for s in stages],
    )
    return Verdict(estimate_event, work.activations, answers_skipped, "; ".join(dict.fromkeys(problems)) or None)


def head_ignored(ignore: list[str]) -> bool:
    """Whether an ignore list spares the head (`lm_head`, by name or pattern)."""
    return any(p == "lm_head" or (p.startswith("re:") and re.match(p[3:], "lm_head")) for p in ignore)


def job_work(spec: JobSpec, modifiers: list[Any], on_host: bool, kv_cache_gib: float = 0.0) -> Work:
    """What the job asks of the model, from its spec and its recipe's modifiers (read by their
    `needs_data`, `needs_hessians`, `needs_float_inputs`, `quantizes` and `ignore`); `kv_cache_gib` is the servable
    check's KV cache (VLLM_CPU_KVCACHE_SPACE)."""
    needs_data = any(m.needs_data() for m in modifiers)
    calibration, evaluation = spec.calibration, spec.evaluation
    self_generated = calibration.dataset == SELF_GENERATED
    sequence = min(calibration.max_sequence_length, GENERATION_LENGTH) if self_generated else calibration.max_sequence_length
    return Work(
        samples=calibration.num_samples if needs_data else 0,
        sequence=sequence if needs_data else 0,
        hessians=any(m.needs_hessians() for m in modifiers),
        float_stream=needs_data and any(m.needs_float_inputs() for m in modifiers),
        self_generated=self_generated and needs_data,
        perplexity_tokens=evaluation.perplexity.max_tokens if evaluation.perplexity is not None else 0,
        prompts=len(evaluation.prompts),
        new_tokens=evaluation.max_new_tokens,
        # a recipe that reads data refuses to target the head (it sits outside the layers)
        head_quantized=not needs_data and any(m.quantizes and not head_ignored(list(getattr(m, "ignore", []))) for m in modifiers),
        on_host=on_host,
        activations=calibration.activation_storage,
        served_kv_cache=int(kv_cache_gib * (1 << 30)) if evaluation.servable else 0,
    )


def lines(estimate: MemoryEstimate) -> list[str]:
    """The estimate for people: a line per stage."""
    limit = f", limit {human_bytes(estimate.limit_bytes)}" if estimate.limit_bytes else ""
    storage = f", activations in {estimate.activation_storage}" if estimate.activation_storage else ""
    width = max(len(s.stage) for s in estimate.stages)
    out = [f"memory estimate: peak {human_bytes(estimate.peak_bytes)} ({estimate.peak_stage}{limit}{storage})"]
    for s in estimate.stages:
        note = "  (skipped: would not fit)" if s.skipped else ""
        out.append(f"  {s.stage:<{width}}  {human_bytes(s.bytes):>10}{note}")
    return out
