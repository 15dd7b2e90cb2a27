"""Stand-in for openvla/openvla-7b's `configuration_prismatic.py` (written for these tests, not copied).

Same class names, model types and fields that refine-train reads: a fused two-backbone vision
config, a Llama `text_config`, `norm_stats`, `n_action_bins`, `pad_to_multiple_of`.
"""

from transformers import AutoConfig, PretrainedConfig


class PrismaticConfig(PretrainedConfig):
    model_type = "prismatic"
    is_composition = False

    def __init__(
        self,
        use_fused_vision_backbone=True,
        image_sizes=(32, 32),
        patch_size=8,
        vision_dim=16,
        text_config=None,
        pad_to_multiple_of=0,
        **kwargs,
    ):
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.image_sizes = list(image_sizes)
        self.patch_size = patch_size
        self.vision_dim = vision_dim
        self.pad_to_multiple_of = pad_to_multiple_of
        text_config = text_config or {"model_type": "llama"}
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        super().__init__(**kwargs)


class OpenVLAConfig(PrismaticConfig):
    model_type = "openvla"

    def __init__(self, norm_stats=None, n_action_bins=256, **kwargs):
        self.norm_stats = norm_stats
        self.n_action_bins = n_action_bins
        super().__init__(**kwargs)
