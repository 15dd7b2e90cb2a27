"""Stand-in for openvla/openvla-7b's `processing_prismatic.py` (written for these tests, not copied).

The same processor contract: `PrismaticProcessor(text, images, padding=..., return_tensors=...)`
gives `input_ids`, `attention_mask` and `pixel_values` (B, 6, H, W) — the image normalised once
per fused backbone and stacked on channels; `image_processor.input_sizes` is [(3, H, W), ...].
PIL + numpy here; the real one resizes with torchvision.
"""

from typing import ClassVar

import numpy as np
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import ImageProcessingMixin


class PrismaticImageProcessor(ImageProcessingMixin):
    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(self, use_fused_vision_backbone=True, input_sizes=None, means=None, stds=None, **kwargs):
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.input_sizes = [tuple(s) for s in (input_sizes or [(3, 224, 224), (3, 224, 224)])]
        self.means = means or [(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)]
        self.stds = stds or [(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)]
        super().__init__(**kwargs)

    def apply_transform(self, img):
        planes = []
        for size, mean, std in zip(self.input_sizes, self.means, self.stds, strict=True):
            x = np.asarray(img.convert("RGB").resize((size[2], size[1])), np.float32) / 255.0
            planes.append(((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1))
        return np.concatenate(planes if self.use_fused_vision_backbone else planes[:1], axis=0)

    def preprocess(self, images, return_tensors=None, **_):
        if not isinstance(images, list):
            images = [images]
        pixel_values = np.stack([self.apply_transform(img) for img in images])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)


class PrismaticProcessor(ProcessorMixin):
    attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None):
        super().__init__(image_processor, tokenizer)

    def __call__(self, text, images, padding=False, truncation=None, max_length=None, return_tensors="pt"):
        pixel_values = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        text_inputs = self.tokenizer(
            text, return_tensors=return_tensors, padding=padding, truncation=truncation, max_length=max_length
        )
        if pixel_values.shape[0] != text_inputs.input_ids.shape[0]:
            raise ValueError("Batch is malformed; expected same number of images and text inputs!")
        return BatchFeature(data={**text_inputs, "pixel_values": pixel_values})

    def batch_decode(self, sequences, **kwargs):
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def decode(self, token_ids, **kwargs):
        return self.tokenizer.decode(token_ids, **kwargs)
