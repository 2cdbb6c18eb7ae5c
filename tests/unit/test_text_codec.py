"""The hot-path encode/decode (app/text_codec.py) against transformers' own calls.

Two kinds of tokenizer: the default model's byte-level BPE (GPT-2 style, SmolLM2) and a
SentencePiece-style one built here (Metaspace, a BOS added by the post-processor: how
Mistral's and Llama's tokenizers are laid out).
"""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app import text_codec
from app.settings import DEFAULT_MODEL_DIR
from bench.workload import load_prompts

TEXTS = [
    "",
    "Hello world",
    "  leading, trailing and  double  spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "ünïcödé, 日本語, emoji 🤖👍🏽 and a lone combining mark \u0301",
    "special tokens in the text: <|im_start|>user\nhi<|im_end|> <s> </s> <|endoftext|>",
    "numbers 3.14159 and code: def f(x): return x**2  # comment",
    "repeated " * 50,
    *load_prompts()[:8],
]


def sentencepiece_style() -> PreTrainedTokenizerFast:
    rust = Tokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    rust.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello, world! Numbers 3.14."] * 20
    rust.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    )
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", rust.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", params=["byte-level BPE", "SentencePiece-style"])
def tokenizer(request):
    if request.param == "byte-level BPE":
        return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    return sentencepiece_style()


def test_the_direct_path_is_taken_for_transformers_fast_tokenizers(tokenizer):
    # Otherwise the equality tests below would compare transformers with itself.
    assert text_codec._rust(tokenizer) is tokenizer.backend_tokenizer


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers(tokenizer, add_special_tokens):
    for text in TEXTS:
        want = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert text_codec.encode(tokenizer, text, add_special_tokens) == want, text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("clean_up", [False, True])
def test_decode_equals_transformers(tokenizer, skip_special_tokens, clean_up):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        # Also a cut that ends inside a multi-byte character, as generation can.
        for cut in (ids, ids[: len(ids) // 2 + 1]):
            want = tokenizer.decode(
                cut, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up
            )
            assert text_codec.decode(tokenizer, cut, skip_special_tokens, clean_up) == want


def test_split_special_tokens_is_honoured():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, split_special_tokens=True)
    text = "<|im_start|>user"
    want = tokenizer.encode(text)
    assert text_codec.encode(tokenizer, text) == want
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in want


def test_truncation_set_on_the_rust_tokenizer_goes_through_transformers():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    text = "a prompt that is longer than three tokens"
    # transformers' encode lifts the truncation (DO_NOT_TRUNCATE); so must we.
    assert text_codec.encode(tokenizer, text) == AutoTokenizer.from_pretrained(
        DEFAULT_MODEL_DIR
    ).encode(text)


def test_a_class_that_overrides_a_step_is_not_bypassed():
    base = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)

    class Shouting(type(base)):  # type: ignore[misc]
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = Shouting.from_pretrained(DEFAULT_MODEL_DIR)
    assert text_codec._rust(shouting) is None
    ids = shouting.encode("hello there")
    assert text_codec.decode(shouting, ids, True, False) == "HELLO THERE"
