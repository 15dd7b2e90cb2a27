"""Stand-in for openvla/openvla-7b's `modeling_prismatic.py` (written for these tests, not copied).

It keeps the published model's contract and its habits that break under transformers 5, so the
adapter's handling of them is tested offline:
- patch embeddings are spliced into the sequence right after <BOS>, so `logits` are longer than
  `input_ids` by the number of patches;
- `_supports_sdpa` is a property reading `self.language_model`, which does not exist yet when
  transformers 5's `PreTrainedModel.__init__` asks;
- `tie_weights(self)` takes no arguments (transformers 5 passes some);
- `prepare_inputs_for_generation` keeps only the last token whenever `past_key_values` is not
  None, and `forward` then takes the cached, text-only branch (transformers 5 passes an empty
  cache on the first step, so the image would never be seen); batch size 1 only;
- no `GenerationMixin` base: transformers adds it when the class is loaded through an Auto class.
The vision tower is two small conv patchifiers (the real one: DINOv2 + SigLIP from timm).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from .configuration_prismatic import OpenVLAConfig, PrismaticConfig

IGNORE_INDEX = -100


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.use_fused_vision_backbone = config.use_fused_vision_backbone
        p, d = config.patch_size, config.vision_dim
        self.featurizer = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.fused_featurizer = nn.Conv2d(3, d, kernel_size=p, stride=p) if self.use_fused_vision_backbone else None
        self.embed_dim = d * (2 if self.use_fused_vision_backbone else 1)

    def forward(self, pixel_values):
        if not self.use_fused_vision_backbone:
            return self.featurizer(pixel_values).flatten(2).transpose(1, 2)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        a = self.featurizer(img).flatten(2).transpose(1, 2)
        b = self.fused_featurizer(img_fused).flatten(2).transpose(1, 2)
        return torch.cat([a, b], dim=2)


class PrismaticProjector(nn.Module):
    def __init__(self, vision_dim, llm_dim):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, x):
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


@dataclass
class PrismaticCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor = None
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    projector_features: torch.FloatTensor | None = None


class PrismaticPreTrainedModel(PreTrainedModel):
    config_class = PrismaticConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["PrismaticProjector"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn_2 = True

    def _init_weights(self, module):
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)

    @property
    def _supports_sdpa(self):
        return self.language_model._supports_sdpa


class PrismaticForConditionalGeneration(PrismaticPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision_backbone = PrismaticVisionBackbone(config)
        self.projector = PrismaticProjector(self.vision_backbone.embed_dim, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(
            config.text_config, attn_implementation=config._attn_implementation
        )
        self.vocab_size = config.text_config.vocab_size
        self.pad_token_id = config.pad_token_id
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def tie_weights(self):
        self.language_model.tie_weights()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        labels=None,
        inputs_embeds=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        output_projector_features=None,
        return_dict=None,
    ):
        use_cache = use_cache and not self.training
        projected = None
        if input_ids.shape[1] == 1:  # cached generation: text only
            assert input_ids.shape[0] == 1, "Generation is only currently supported for batch size of 1!"
            assert past_key_values is not None, "You must provide `past_key_values` during cached generation!"
            out = self.language_model(
                input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            )  # fmt: skip
        elif pixel_values is None:
            assert past_key_values is None
            out = self.language_model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            )  # fmt: skip
        elif input_ids.shape[0] == pixel_values.shape[0]:
            assert past_key_values is None, "Unexpected key `past_key_values` provided during language-only forward!"
            projected = self.projector(self.vision_backbone(pixel_values))
            embeds = self.get_input_embeddings()(input_ids)
            embeds = torch.cat([embeds[:, :1], projected, embeds[:, 1:]], dim=1)  # patches after <BOS>
            mask = None
            if attention_mask is not None:
                ones = torch.ones(projected.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
                mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            mm_labels = None
            if labels is not None:
                ignore = torch.full(projected.shape[:2], IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
                mm_labels = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)
            out = self.language_model(
                inputs_embeds=embeds, attention_mask=mask, labels=mm_labels, use_cache=use_cache,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            )  # fmt: skip
        else:
            raise ValueError("Non-homogenous batch of (text, image) input -- forward() does not support mixed batches!")
        return PrismaticCausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            projector_features=projected,
        )

    def prepare_inputs_for_generation(
        self, input_ids=None, past_key_values=None, inputs_embeds=None, pixel_values=None, attention_mask=None, **kwargs
    ):
        if input_ids is not None and input_ids.shape[0] > 1:
            raise ValueError("Generation with batch size > 1 is not currently supported!")
        if past_key_values is not None:
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache"),
        }


class OpenVLAForActionPrediction(PrismaticForConditionalGeneration):
    config_class = OpenVLAConfig

    def __init__(self, config):
        super().__init__(config)
        self.norm_stats = config.norm_stats
        self.vocab_size = self.config.text_config.vocab_size - self.config.pad_to_multiple_of
