"""Tiny random-weight models that real vLLM can serve on a CPU in seconds.

No model hub is reachable from the test machines, and a real checkpoint would make every
test slow anyway: what the tests check is the wire (tokens counted, errors, metrics,
routing), not what the model says. So the tier builds a ~1 MB Llama-architecture chat
model and a ~1 MB BERT embedding model on the spot, with tokenizers trained on
generated text. Weights are random but seeded; the WordPiece trainer orders part of its
vocabulary differently from build to build, which is one more reason the build is cached
and shared rather than repeated.

The build runs in the vLLM venv's interpreter (it has torch, transformers and
tokenizers; the test runner's does not), as `python tinymodels.py OUT_DIR`. The models
are cached under a directory named after BUILDER_VERSION: bump it whenever the build
changes, and old caches are simply ignored.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUILDER_VERSION = "tinymodels-v1"
CHAT_DIR = "tiny-llama"
EMBEDDING_DIR = "tiny-bert"
DONE = ".built"
# The CPU attention backend needs head_dim >= 32: hidden 64 with 2 heads.
CHAT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
EMBED_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=512)
VOCAB = 2048
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WORDS = ("the a model server route queue token batch fast slow reply request latency cache "
         "fleet replica health metric stream chunk prompt answer check ready start stop wait "
         "alpha beta gamma delta one two three four five six seven eight nine ten hello world "
         "Say OK yes no why how what when where who think write read send keep move").split()


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Generated text with enough variety for a 2k BPE vocabulary (letters, digits, marks)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) if rng.random() < 0.7 else
                 "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                 for _ in range(rng.randint(3, 16))]
        out.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", " 42.", " 3.14"]))
    return out


def build_chat(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>",
                                   additional_special_tokens=specials[3:],
                                   model_max_length=CHAT_CONFIG["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=True, torch_dtype="float32", **CHAT_CONFIG)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def build_embedding(out: Path) -> None:
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(
        vocab_size=VOCAB, special_tokens=specials, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=EMBED_CONFIG["max_position_embeddings"])
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), pad_token_id=fast.pad_token_id,
                        torch_dtype="float32", **EMBED_CONFIG)
    BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)


def ensure_tiny_models(python: Path | str, cache: Path) -> dict[str, Path]:
    """Build both models with `python` (the vLLM venv's) unless this builder's cache exists.

    Returns {"chat": dir, "embedding": dir}. Callers hold a lock around this (see
    conftest) so concurrent runs do not build into the same directory.
    """
    root = cache / BUILDER_VERSION
    dirs = {"chat": root / CHAT_DIR, "embedding": root / EMBEDDING_DIR}
    if not (root / DONE).exists():
        building = root.with_name(root.name + ".partial")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        started = time.monotonic()
        done = subprocess.run([str(python), __file__, str(building)], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"building the tiny models failed:\n{done.stdout}\n{done.stderr}")
        (building / DONE).write_text(json.dumps(
            {"builder": BUILDER_VERSION, "seconds": round(time.monotonic() - started, 1)}))
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)  # atomic: a cache directory is either whole or absent
    return dirs


if __name__ == "__main__":
    target = Path(sys.argv[1])
    build_chat(target / CHAT_DIR)
    build_embedding(target / EMBEDDING_DIR)
    print("built", target)
