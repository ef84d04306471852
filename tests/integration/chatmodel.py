"""A tiny random Llama checkpoint with a real Hugging Face tokenizer and a chat template.

The tokenizer is a byte-level BPE trained here on a few sentences (deterministic), saved with the
checkpoint the way a downloaded model ships it (tokenizer.json + tokenizer_config.json with its
chat template), so `AutoTokenizer.from_pretrained` and `apply_chat_template` work offline.
"""
from __future__ import annotations

from pathlib import Path

from petals_protocol.models.synthetic import make_random_checkpoint

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Petals runs large language models over a swarm of volunteers' daemons.",
    "Hello, how are you today? I am fine, thank you.",
    "<|system|>You are a helpful assistant.\n<|user|>What is a swarm?\n<|assistant|>Many peers.",
]
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
VOCAB_SIZE = 320


def make_chat_model(path: Path, *, num_layers: int = 6) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    assert [fast.bos_token_id, fast.eos_token_id, fast.pad_token_id] == [0, 1, 2]
    make_random_checkpoint(path, "llama", num_layers=num_layers, hidden_size=64, num_heads=4,
                           vocab_size=VOCAB_SIZE, seed=5, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    fast.save_pretrained(path)
    return path
