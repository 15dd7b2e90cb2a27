"""OpenVLA (`openvla/openvla-7b`: Prismatic, DINOv2 + SigLIP fused, Llama 2; remote code).

Its weights (15 GB) and remote code come from the Hub, which tests never touch; the tests run a
tiny stand-in that keeps the published code's contract (`tests/train/openvla_standin/`). What it
needs: `trust_remote_code=True`, the class its `auto_map` names for `AutoModelForVision2Seq`, the
prompt `In: {prompt}\\nOut:` (OpenVLA's), the processor's 224x224 images (two normalisations
stacked on channels), and the Llama decoder at `language_model.model.layers`. OpenVLA's own action
tokens are the same scheme as refine-train's (`vocab_size - digitize`, `vocab_size` being the
tokenizer's 32000), so its `norm_stats` and ours line up. Its remote code needs `timm` 0.9.10-0.9.16
(it refuses others): `pip install "refinevla[openvla]"`.

OpenVLA's code was written for transformers 4.40; `transformers5_compat` patches the five places
where transformers 5 breaks it (each reproduced by the stand-in):
- `_supports_sdpa` is a property reading `self.language_model`, which `PreTrainedModel.__init__`
  asks for before the model has one: construction fails. It becomes a plain `True` — the
  property's own answer for its Llama backbone.
- `tie_weights(self)` takes no arguments; transformers 5 passes `missing_keys`/`recompute_mapping`.
- `prepare_inputs_for_generation` keeps only the last token whenever `past_key_values` is not None;
  transformers 5 passes an empty cache on the first step (named `cache` since 5.x), so
  `pixel_values` would never be consumed and every image would give the same action
  (openvla/openvla#346), or the cache would never be used. Replaced by one in transformers 5's terms.
- Its output dataclass declares `past_key_values`, which transformers 5's ModelOutput renames to
  `cache` on construction: every forward fails. Rebound to the same dataclass with `cache`.
- It has no `GenerationMixin` base; transformers adds one only when loading through an Auto class,
  and `AutoModelForVision2Seq` is gone. Added here, and `_auto_class` is set so `save_pretrained`
  copies the remote code into refine-train's checkpoints.
And one place in its processor (`image_processor_compat`): transformers 5.2x's
`ImageProcessingMixin.from_dict` reads `cls.valid_kwargs` (a TypedDict of the keyword arguments a
processor takes on top of its saved dict), which `PrismaticImageProcessor` — a bare
`ImageProcessingMixin` written before that attribute existed — does not define: loading fails with
`AttributeError: ... has no attribute 'valid_kwargs'`. It gets an empty one (it takes everything
through its saved dict), so the class, not a surviving transformers internal, decides what it reads.
Its forward splices the image patches in after <BOS>, so its logits are longer than the input ids:
`text_logits` drops the patch positions. It generates one row at a time (batch size 1 only).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, ClassVar, TypedDict

from ..errors import TrainError
from .base import ModelAdapter

AUTO_CLASS = "AutoModelForVision2Seq"  # the auto_map key OpenVLA registers under (gone in transformers 5)


def transformers5_compat(cls: Any) -> Any:
    """OpenVLA's remote class, made loadable and generating under transformers 5 (idempotent)."""
    if getattr(cls, "_refinevla_compat", False):
        return cls
    from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

    cls = add_generation_mixin_to_remote_model(cls)  # type: ignore[no-untyped-call]
    if isinstance(inspect.getattr_static(cls, "_supports_sdpa", None), property):
        cls._supports_sdpa = True
    tie = cls.tie_weights
    params = inspect.signature(tie).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()) and "recompute_mapping" not in params:

        def tie_weights(self: Any, *args: Any, **kwargs: Any) -> None:
            tie(self)

        cls.tie_weights = tie_weights
    cls.prepare_inputs_for_generation = _prepare_inputs_for_generation
    _rename_cache_fields(sys.modules[cls.__module__])
    cls._auto_class = AUTO_CLASS
    cls._refinevla_compat = True
    return cls


def _prepare_inputs_for_generation(
    self: Any,
    input_ids: Any,
    cache: Any = None,
    past_key_values: Any = None,
    pixel_values: Any = None,
    attention_mask: Any = None,
    use_cache: Any = None,
    **_: Any,
) -> dict[str, Any]:
    """OpenVLA's two forward branches in transformers 5's terms: while the cache is empty (transformers 5
    passes an empty one, named `cache`, on the first step), the whole prompt with the image; then the
    last token against the cache. OpenVLA's own version keys on `past_key_values is not None` and would
    skip the image (openvla/openvla#346)."""
    cache = cache if cache is not None else past_key_values
    if cache is not None and cache.get_seq_length() > 0:
        return {"input_ids": input_ids[:, -1:], "past_key_values": cache, "use_cache": use_cache}
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "use_cache": use_cache,
    }


def _rename_cache_fields(module: Any) -> None:
    """transformers 5 names a ModelOutput's cache field `cache`: generation reads `outputs["cache"]`, and
    building OpenVLA's output dataclass, which declares `past_key_values`, either fails (early 5.x renames
    the argument to `cache` on construction) or, from 5.2x on (which accepts the old name for a class that
    declares it), builds an output whose cache generation never finds, so every step recomputes the image.
    Rebind it in its module to the same dataclass with the field named `cache` (`out.past_key_values`
    still reads it). Keyed on transformers' own output classes, not on how construction behaves."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils.generic import ModelOutput

    if "cache" not in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}:
        return  # a transformers that still names the field past_key_values (4.x): generation reads it there
    for name, obj in list(vars(module).items()):
        if not (isinstance(obj, type) and issubclass(obj, ModelOutput) and dataclasses.is_dataclass(obj)):
            continue
        fields = dataclasses.fields(obj)
        if "past_key_values" not in {f.name for f in fields}:
            continue
        spec = [
            ("cache" if f.name == "past_key_values" else f.name, Any, dataclasses.field(default=None)) for f in fields
        ]
        setattr(module, name, dataclasses.make_dataclass(name, spec, bases=(ModelOutput,)))


class _NoExtraKwargs(TypedDict):
    """No keyword arguments beyond the saved dict (what OpenVLA's image processor takes)."""


def image_processor_compat(cls: Any) -> Any:
    """OpenVLA's remote image-processor class, loadable by transformers 5.2x's `from_dict` (idempotent)."""
    if getattr(cls, "valid_kwargs", None) is None:
        cls.valid_kwargs = _NoExtraKwargs
    return cls


def remote_image_processor_class(path: str) -> Any | None:
    """The remote-code image-processor class a checkpoint names, or None. Looked up where transformers
    looks: `processor_config.json`'s `image_processor` entry (what transformers 5 saves, so
    refine-train's checkpoints), else `preprocessor_config.json` (what `openvla/openvla-7b` ships)."""
    import json
    from pathlib import Path

    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.utils.hub import cached_file

    for name, entry in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        resolved = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if resolved is None:
            continue
        data = json.loads(Path(resolved).read_text(encoding="utf-8"))
        data = (data.get(entry) or {}) if entry else data
        ref = (data.get("auto_map") or {}).get("AutoImageProcessor")
        if ref is not None:
            return get_class_from_dynamic_module(ref, path)
    return None


class OpenVLAAdapter(ModelAdapter):
    family: ClassVar[str] = "openvla"
    model_types: ClassVar[tuple[str, ...]] = ("openvla",)
    trust_remote_code: ClassVar[bool] = True
    batched_generation: ClassVar[bool] = False
    language_model_path: ClassVar[str] = "language_model"

    def load_model(self, path: str, dtype: Any) -> Any:
        """The class named by the checkpoint's `auto_map` (transformers 5 has no AutoModelForVision2Seq)."""
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        ref = (getattr(config, "auto_map", None) or {}).get(AUTO_CLASS)
        if ref is None:
            raise TrainError(f"{path}: config.json has no auto_map.{AUTO_CLASS} (not an OpenVLA checkpoint?)")
        cls = transformers5_compat(get_class_from_dynamic_module(ref, path))
        return cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=True)

    def load_processor(self, path: str) -> Any:
        """AutoProcessor, after making the checkpoint's own image-processor class loadable: the same
        class object is what AutoProcessor then resolves (transformers caches the dynamic module)."""
        cls = remote_image_processor_class(path)
        if cls is not None:
            image_processor_compat(cls)
        return super().load_processor(path)

    def image_size(self, processor: Any) -> tuple[int, int]:
        size = processor.image_processor.input_sizes[0]  # (3, H, W)
        return int(size[1]), int(size[2])

    def wrap_prompt(self, prompt: str) -> str:
        return f"In: {prompt}\nOut:"

    def text_logits(self, logits: Any, n_text: int) -> Any:
        """[<BOS>, patches..., text[1:]] -> [<BOS>, text[1:]]."""
        import torch

        extra = logits.shape[1] - n_text
        if extra == 0:
            return logits
        return torch.cat([logits[:, :1], logits[:, 1 + extra :]], dim=1)

    def language_model(self, model: Any) -> Any:
        return model.language_model.model

    def lm_head(self, model: Any) -> Any:
        return model.language_model.lm_head

    def vision_modules(self, model: Any) -> list[Any]:
        return [model.vision_backbone, model.projector]
