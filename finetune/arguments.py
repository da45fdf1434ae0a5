"""Training arguments: typed dataclasses, loadable from a YAML recipe plus ``--key value`` overrides.

A recipe is a YAML mapping of :class:`TrainArguments` fields; ``lora`` is a nested mapping of
:class:`LoraArguments` fields. Unknown keys and values of the wrong type are errors that list the valid
keys, raised before anything runs::

    model_path: runs/stage1/model
    output_dir: runs/stage2
    num_negatives: 3
    lora: {rank: 8, alpha: 16}

Overrides address nested fields with dots: ``--lora.rank 16 --max_steps 50``; values are parsed as
YAML (``true``, ``1e-4``, ``[q_proj, v_proj]``, ``{mscoco_t2i: 2}``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

__all__ = ["LoraArguments", "RunArguments", "TrainArguments", "ArgumentsError", "load_arguments", "parse_overrides"]

MixedPrecision = Literal["no", "bf16", "fp16"]
Scheduler = Literal["linear", "cosine", "constant"]
ExportDtype = Literal["float32", "bfloat16", "float16"]


class ArgumentsError(ValueError):
    """A recipe or override has unknown keys, missing required keys, or invalid values."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    if default is dataclasses.MISSING:
        return field(metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class LoraArguments:
    """LoRA adapters (peft) on the language model."""

    enabled: bool = _help("train LoRA adapters on the language model (off: see full_finetune)", True)
    rank: int = _help("adapter rank r", 16)
    alpha: float = _help("adapter scaling numerator (scale = alpha / rank)", 32.0)
    dropout: float = _help("dropout on the adapter input", 0.1)
    target_modules: list[str] = _help("language-model module names that get adapters",
                                      factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class RunArguments:
    """What every training run of this package has: checkpoints, output directory, optimiser, schedule, precision.

    :class:`TrainArguments` (the bi-encoder) and
    :class:`~mmembed_rag.finetune.reranker_train.RerankerTrainArguments` (the reranker) extend it with their own
    fields and checks (:meth:`problems`).
    """

    what: ClassVar[str] = "training arguments"

    model_path: str = _help("base checkpoint (directory or hub id)")
    output_dir: str = _help("where checkpoints/ and the exported model/ go")
    overwrite_output_dir: bool = _help("allow a non-empty output_dir (its checkpoints/ and model/ are replaced)",
                                       False)
    resume_from: str | None = _help("'latest' (newest checkpoint in output_dir, or a fresh start) "
                                    "or a checkpoint directory", None)
    lora: LoraArguments = _help("LoRA settings (adapters on the language model)", factory=LoraArguments)
    full_finetune: bool = _help("train every parameter (lora.enabled must be false)", False)
    batch_size: int = _help("queries per step, all processes together", 32)
    learning_rate: float = _help("peak learning rate", 1e-4)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    lr_scheduler: Scheduler = _help("learning-rate decay after warmup", "linear")
    warmup_steps: int = _help("linear warmup steps", 0)
    max_steps: int = _help("optimisation steps", 1000)
    max_grad_norm: float | None = _help("gradient clipping norm; null: no clipping", 1.0)
    seed: int = _help("seeds weight init, batches, negatives and dropout", 42)
    save_every: int = _help("checkpoint every N steps (0: no intermediate checkpoints, only the export)", 0)
    keep_checkpoints: int = _help("newest checkpoints kept (0: all)", 2)
    mixed_precision: MixedPrecision = _help("'no', 'bf16' or 'fp16' (falls back to 'no' where unsupported)", "no")
    max_length: int = _help("text tokens per prompt (per user text) before image expansion", 512)
    export_dtype: ExportDtype | None = _help("dtype of the exported weights; null: float32 (the training dtype)",
                                             None)
    log_every: int = _help("log the loss every N steps", 10)
    show_progress: bool = _help("show a progress bar", True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values that types alone do not.

        Raises:
            ArgumentsError: listing every problem found.
        """
        problems = self.problems()
        if problems:
            raise ArgumentsError(f"invalid {self.what}:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with the values (subclasses add theirs to these)."""
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("batch_size", "max_steps", "log_every", "max_length") if getattr(self, name) < 1]
        problems += [f"{name} must be >= 0, got {getattr(self, name)}"
                     for name in ("warmup_steps", "save_every", "keep_checkpoints") if getattr(self, name) < 0]
        if self.lora.enabled and self.full_finetune:
            problems.append("lora.enabled and full_finetune are exclusive (set lora.enabled: false)")
        if self.lora.enabled and (self.lora.rank < 1 or not self.lora.target_modules):
            problems.append("lora needs rank >= 1 and at least one target module")
        if not 0 <= self.lora.dropout < 1:
            problems.append(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable), the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)


@dataclass
class TrainArguments(RunArguments):
    """Everything one bi-encoder training run needs (a checkpoint in the released MM-Embed format as
    ``model_path``); see the module docstring for the YAML form.

    ``batch_size`` counts queries per optimisation step over all processes together: the batch
    sampler yields batches of that size and each process takes its contiguous slice, so the
    contrastive batch (and the result) does not depend on the number of processes.

    The default temperature, 0.02, is the value commonly used for InfoNCE on LLM-based embedders
    (E5-Mistral and NV-Embed-style training use 0.01 to 0.05); scores are cosine similarities,
    so logits are scaled by 50. We could not confirm MM-Embed's own value from its paper offline;
    tune it per run.
    """

    train_pooling: bool = _help("keep the pooling head (latent_attention_model) trainable", True)
    temperature: float = _help("InfoNCE temperature", 0.02)
    gradient_cache_chunk_size: int | None = _help("items per forward with gradient caching; null: no caching",
                                                  None)
    num_negatives: int | None = _help("cap on given negatives per query (in-batch negatives always apply); "
                                      "null: all the example has", 1)
    gradient_checkpointing: bool = _help("recompute activations in backward (language model and vision tower)",
                                         False)
    task_mixing: dict[str, float] = _help("task key -> sampling weight, for the batch sampler", factory=dict)
    data_factory: str | None = _help("CLI only: 'module:function' called with these arguments, returning "
                                     "the examples or (examples, batch_sampler)", None)
    data_options: dict[str, Any] = _help("CLI only: keyword arguments for data_factory", factory=dict)

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.gradient_cache_chunk_size is not None and self.gradient_cache_chunk_size < 1:
            problems.append(f"gradient_cache_chunk_size must be >= 1 or null, got {self.gradient_cache_chunk_size}")
        if self.num_negatives is not None and self.num_negatives < 0:
            problems.append(f"num_negatives must be >= 0 or null, got {self.num_negatives}")
        if not (self.lora.enabled or self.full_finetune or self.train_pooling):
            problems.append("nothing to train: enable lora, full_finetune or train_pooling")
        bad = {k: v for k, v in self.task_mixing.items() if v < 0}
        if bad:
            problems.append(f"task_mixing weights must be >= 0, got {bad}")
        if self.data_factory is not None and ":" not in self.data_factory:
            problems.append(f"data_factory must look like 'package.module:function', got {self.data_factory!r}")
        return problems

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "arguments") -> TrainArguments:
        """Build from a (possibly nested) mapping, checking keys and types.

        Raises:
            ArgumentsError: unknown keys (with the valid ones listed), missing required keys, wrong types.
        """
        return _build(cls, data, source, prefix="")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | Sequence[str] | None = None) -> TrainArguments:
        """Load a YAML recipe, then apply overrides (a mapping of dotted keys, or ``--key value`` tokens)."""
        return load_arguments(path, overrides)

    @staticmethod
    def describe() -> str:
        """One line per key (dotted for nested ones) with its type, default and help."""
        return "\n".join(f"  {key}: {text}" for key, text in _keys(TrainArguments, "").items())


def _keys(cls: type, prefix: str) -> dict[str, str]:
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_keys(hints[f.name], f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        out[prefix + f.name] = f"{_type_name(hints[f.name])}, {default}; {f.metadata.get('help', '')}"
    return out


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _unknown(keys: Sequence[str], valid: Sequence[str], where: str) -> ArgumentsError:
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ArgumentsError(f"{where}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(sorted(valid))}")


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ArgumentsError(f"{source}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, "
                             f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _unknown([prefix + str(k) for k in unknown], list(_keys(cls, prefix)), source)
    missing = [prefix + name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ArgumentsError(f"{source}: missing required key(s) {', '.join(missing)}")
    values = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value if value is not None else {}, source, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, tp, f"{source}: {prefix}{name}")
    try:
        return cls(**values)
    except ArgumentsError as err:
        raise ArgumentsError(f"{source}: {err}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against (and lightly converted to) type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ArgumentsError as err:
                errors.append(str(err))
        raise ArgumentsError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value not in args:
            raise ArgumentsError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ArgumentsError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ArgumentsError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ArgumentsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArgumentsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ArgumentsError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ArgumentsError(f"{where}: unsupported field type {_type_name(tp)}")


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``["--lora.rank", "8", "--full_finetune=true"]`` -> ``{"lora.rank": 8, "full_finetune": True}``.

    Raises:
        ArgumentsError: a token that is not ``--key`` or a key without a value.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ArgumentsError(f"expected --key value, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ArgumentsError(f"--{key} needs a value")
            raw = tokens[i + 1]
            i += 1
        out[key.replace("-", "_")] = yaml.safe_load(raw) if raw != "" else ""
        i += 1
    return out


def _apply(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ArgumentsError(f"override {dotted!r}: {part!r} is not a mapping")
        node = child
    node[leaf] = value


def load_arguments(path: str | Path | None, overrides: Mapping[str, Any] | Sequence[str] | None = None
                   ) -> TrainArguments:
    """Read a YAML recipe (or start empty with ``path=None``) and apply dotted-key overrides.

    Args:
        path: the recipe file.
        overrides: ``{"lora.rank": 8}`` or CLI tokens ``["--lora.rank", "8"]``.

    Raises:
        ArgumentsError: unknown or missing keys, wrong types, invalid values (the message names the file).
        FileNotFoundError: no such recipe.
    """
    data: dict[str, Any] = {}
    source = "arguments"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ArgumentsError(f"{path}: not valid YAML ({err})") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ArgumentsError(f"{path}: a recipe is a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    if overrides:
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(list(overrides))
        for key, value in overrides.items():
            _apply(data, key, value)
        source += " + overrides"
    return TrainArguments.from_dict(data, source)
