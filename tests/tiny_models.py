"""Tiny real models built offline from configs, for tests: no download, seconds to build."""

from __future__ import annotations

from pathlib import Path


def tiny_clip(folder: str | Path, image_size: int = 32, seed: int = 0) -> str:
    """A CLIP model (transformers' `CLIPModel`, random weights) and its processor, saved as a
    user's CLIP folder is: a character-level BPE tokenizer (every byte and byte-with-end-of-word
    a token, no merges) and an image processor resizing to `image_size`."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def tiny_dinov2(folder: str | Path, image_size: int = 32, seed: int = 0) -> str:
    """A DINOv2 backbone (transformers' `Dinov2Model`, random weights) and its image processor
    (resize the short side, centre-crop, ImageNet normalisation), saved as a user's folder is."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=image_size,
        patch_size=8,
    )
    torch.manual_seed(seed)
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return str(folder)


CAPTION_WORDS = (
    "a",
    "photo",
    "of",
    "digit",
    "zero",
    "one",
    "two",
    "dark",
    "bright",
    "small",
    "large",
    "centered",
    "blurry",
    "drawing",
    "the",
)


def tiny_captioner(folder: str | Path, image_size: int = 16, seed: int = 0) -> str:
    """An image-to-text model (transformers' `VisionEncoderDecoderModel`: a ViT encoder and a
    GPT-2 decoder, random weights), its image processor and a word-level tokenizer built with
    `tokenizers` over CAPTION_WORDS, saved as a user's captioning folder is."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    special = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    vocab = {w: i for i, w in enumerate([*special, *CAPTION_WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
    )
    encoder = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
    )
    decoder = GPT2Config(
        vocab_size=len(vocab),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config).eval()
    with torch.no_grad():  # special tokens score 0 (the output layer is tied): words win
        model.decoder.get_output_embeddings().weight[: len(special)] = 0.0
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
