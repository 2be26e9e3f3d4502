"""Tiny models of real architectures and locally trained tokenizers, for the demo, the tests and
the benchmarks.

Nothing here downloads anything: tokenizers are trained with `tokenizers` on text we generate,
models are built from configs with random weights.
"""

from __future__ import annotations

import torch

# Real shapes for benchmarks: the published Qwen2.5 hyperparameters (weights stay random).
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True)
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True)
# The original setup's pair: a Qwen2-7B teacher (Qwen's tokenizer) and a TinyLlama-1.1B student
# (Llama's 32,000-token SentencePiece vocabulary), as their published configs give them.
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                rope_theta=1000000.0, tie_word_embeddings=False)
TINYLLAMA_11B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                     rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

EOS = "<|endoftext|>"
BOS = "<s>"


def train_tokenizer(texts, vocab_size: int = 384, add_bos: bool = False):
    """A byte-level BPE tokenizer trained on `texts` (any Unicode input encodes). Digits are
    split one per token, as Qwen2's tokenizer does, so arithmetic stays learnable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    specials = [EOS] + ([BOS] if add_bos else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    if add_bos:
        bos_id = tk.token_to_id(BOS)
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    kw = {"bos_token": BOS} if add_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS, **kw)


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, head_dim: int | None = None, intermediate: int | None = None,
                max_positions: int = 1024, tok=None):
    """A config of a real architecture ('qwen2' or 'llama') at toy size."""
    from transformers import LlamaConfig, Qwen2Config
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads,
              head_dim=head_dim or hidden // heads, intermediate_size=intermediate or 2 * hidden,
              max_position_embeddings=max_positions, tie_word_embeddings=True)
    if tok is not None:
        kw.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id)
    return cls(**kw)


def build_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text of synthetic problems in the prompt template, for tokenizer training."""
    from kava_common.prompt import format_sample
    from kava_common.synthetic import synthetic_problems
    return [format_sample(q, a).text for q, a in synthetic_problems(n, "train", seed)]


def demo_pair(tok) -> tuple:
    """The demo's teacher and student configs (Qwen2, tokenizer `tok`): a 4-layer teacher with 2
    KV heads x head_dim 64 and a 2-layer student with 1 KV head x 16. Every 4-bit linear's output
    width is a multiple of 32 (bitsandbytes' CPU kernel)."""
    teacher = tiny_config("qwen2", len(tok), hidden=128, layers=4, heads=4, kv_heads=2, head_dim=64,
                          intermediate=256, tok=tok)
    student = tiny_config("qwen2", len(tok), hidden=64, layers=2, heads=4, kv_heads=1, head_dim=16,
                          intermediate=128, tok=tok)
    return teacher, student
