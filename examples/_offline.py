"""A tiny random-init Qwen2.5-VL with its own tokenizer and processor, saved to a directory: the examples' ``--tiny``.

The examples train a real checkpoint (``--model Qwen/Qwen2.5-VL-3B-Instruct``); their tests and a machine without the
hub use this instead. The model is ``portvlm.models.tiny``'s (the one tiny-model factory; its token ids: image 250,
video 251, vision start/end 252/253); the tokenizer is a word-level ``tokenizers`` model over the same 256 ids with
Qwen's chat markers; the processor is transformers' own Qwen2.5-VL processor over a PIL image processor whose patch,
merge and temporal sizes are the model's. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

# Qwen's chat template, cut to what the examples send: text and image parts, an optional generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("user", "assistant", "system", "what", "is", "in", "the", "image", "a", "red", "blue", "square", "circle",
         "describe", "colour", "it", "yes", "no")
IMAGE_SIDE = 56  # 56×56 px → a 4×4 grid of 14-px patches → 4 merged image tokens


def tokenizer():
    """A word-level fast tokenizer over the tiny vocab (256 ids) with Qwen's chat and vision markers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from portvlm.models import tiny

    special = {"<pad>": tiny.PAD, "<s>": tiny.BOS, "<|im_end|>": tiny.EOS, "<|im_start|>": 3, "<unk>": 4,
               "<|image_pad|>": tiny.IMG, "<|video_pad|>": tiny.VID, "<|vision_start|>": tiny.VSTART,
               "<|vision_end|>": tiny.VEND}
    vocab = dict(special)
    for i, word in enumerate(WORDS):
        vocab[word] = 5 + i
    for i in range(tiny.VOCAB):  # every id decodes (a random model samples any of them)
        if i not in vocab.values():
            vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=[k for k in special if k.startswith("<|")])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def processor():
    """transformers' Qwen2.5-VL processor over the tiny tokenizer and a PIL image processor of the model's geometry."""
    import transformers

    from portvlm.models import tiny

    vision = tiny.config("qwen2_5vl").vision_config  # the processor's geometry is the model's
    image_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    images = image_cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                       temporal_patch_size=vision.temporal_patch_size, min_pixels=IMAGE_SIDE**2,
                       max_pixels=(2 * IMAGE_SIDE)**2)
    if transformers.utils.is_torchvision_available():
        return transformers.Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer(),
                                                chat_template=CHAT_TEMPLATE)
    return _image_only_processor_class()(image_processor=images, tokenizer=tokenizer(), chat_template=CHAT_TEMPLATE)


def _image_only_processor_class():
    """Qwen2.5-VL's processor without its video processor: transformers 5.x checks that one is a
    ``BaseVideoProcessor``, which needs torchvision; the examples send images only, and CI installs no torchvision."""
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2_5_VLProcessor


def save_tiny(path) -> str:
    """Build the tiny model and tokenizer and ``save_pretrained`` them to ``path``; returns the path (``processor()``
    builds the processor: the torchvision-free one has no Auto class to load it by).

    A saved directory, not an object: TRL builds its reference model from the policy's ``config._name_or_path``.
    """
    from portvlm.models import tiny

    path = Path(path)
    tiny.build("qwen2_5vl").save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def images(n: int, seed: int = 0):
    """``n`` small PIL images (red or blue squares on noise), as a dataset's image column holds them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 255, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        pixels[14:42, 14:42] = (200, 30, 30) if i % 2 == 0 else (30, 30, 200)
        out.append(Image.fromarray(pixels))
    return out
