"""Tiny, randomly initialised models and a character-level chat tokenizer for fast tests.

Nothing here touches the disk or a hub: a test gets a working (model, tokenizer) pair in
milliseconds, with the same chat-template shape (ChatML) as the embedded SmolLM2 model.
"""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(tokenizer, seed: int = 0, *, hidden: int = 64, layers: int = 2, dtype=torch.float32, **overrides):
    """A random Llama-architecture causal LM over the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def last_logits(model, ids: list[int]) -> torch.Tensor:
    """The float32 next-token logits ``[1, V]`` after ``ids``, without a cache: what an engine step sees."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[:, -1].float()


# One short exemplar turn for runs on the tiny character-level tokenizer, whose rows the arithmetic
# set's default pair would fill past the test configs' max_length.
SHORT_EXEMPLAR = [{"prompt": "1+1?", "response": "1 + 1 = 2\nThe answer is \\boxed{2}."}]
