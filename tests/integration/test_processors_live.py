"""The transformers-rules processor on the real server: batch isolation, sampled
requests (whose rules we check as properties, since sampling has no oracle token for
token), n > 1, and a fuzz over random valid combinations that must never hurt the engine.
"""

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration

EOS = 2


def chat(url: str, prompt: str, kwargs: dict, **extra) -> httpx.Response:
    payload = {"prompt": prompt, "return_full_text": False, "generate_kwargs": kwargs, **extra}
    return httpx.post(url + "/chat", json=payload, timeout=600)


def token_ids(reply: httpx.Response) -> list[list[int]]:
    return [[t["id"] for t in s["tokens"]] for s in reply.json()["sequences"]]


def ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


GREEDY_A = (
    "Once upon a time, in a small village,",
    {"do_sample": False, "max_new_tokens": 16, "no_repeat_ngram_size": 2, "output_scores": True},
)
GREEDY_B = (
    "The capital of France is",
    {"do_sample": False, "max_new_tokens": 16, "output_scores": True},
)
GREEDY_C = (
    "def fibonacci(n):",
    {
        "do_sample": False,
        "max_new_tokens": 16,
        "repetition_penalty": 1.3,
        "bad_words_ids": [[220], [28, 28]],
        "output_scores": True,
    },
)
SAMPLED = (
    "The three primary colors are",
    {
        "do_sample": True,
        "typical_p": 0.7,
        "temperature": 0.9,
        "max_new_tokens": 16,
        "no_repeat_ngram_size": 3,
        "num_return_sequences": 2,
    },
)
PLAIN_SAMPLED = ("Water boils at", {"do_sample": True, "max_new_tokens": 16})


def test_batch_isolation(server_url):
    """Each greedy request gets, in a mixed concurrent batch, the tokens it gets alone."""
    alone = {}
    for prompt, kwargs in (GREEDY_A, GREEDY_B, GREEDY_C):
        r = chat(server_url, prompt, kwargs)
        assert r.status_code == 200, r.text
        alone[prompt] = token_ids(r)
    mixed = [GREEDY_A, GREEDY_B, GREEDY_C, SAMPLED, PLAIN_SAMPLED] * 3
    random.Random(0).shuffle(mixed)
    with ThreadPoolExecutor(len(mixed)) as pool:
        replies = list(pool.map(lambda job: chat(server_url, *job), mixed))
    for (prompt, kwargs), r in zip(mixed, replies, strict=True):
        assert r.status_code == 200, r.text
        if not kwargs["do_sample"]:
            assert token_ids(r) == alone[prompt], prompt


def test_sampled_rules_hold(server_url, hf_tokenizer):
    """Sampling with n > 1: every child sequence obeys its rules, each with its own state."""
    prompt = "List some fruits: apple, banana, apple, banana,"
    prompt_ids = hf_tokenizer.encode(prompt)
    banned_word = [hf_tokenizer.encode(" apple", add_special_tokens=False)[0]]
    kwargs = {
        "do_sample": True,
        "temperature": 1.2,
        "typical_p": 0.9,
        "num_return_sequences": 4,
        "max_new_tokens": 24,
        "no_repeat_ngram_size": 2,
        "encoder_no_repeat_ngram_size": 3,
        "bad_words_ids": [banned_word, [11, 29]],
        "min_new_tokens": 10,
        "output_scores": True,
    }
    for _ in range(3):
        r = chat(server_url, prompt, kwargs)
        assert r.status_code == 200, r.text
        outputs = token_ids(r)
        assert len(outputs) == 4
        for out in outputs:
            full = prompt_ids + out
            for i in range(len(prompt_ids), len(full)):  # no generated token repeats a bigram
                assert tuple(full[i - 1 : i + 1]) not in ngrams(full[:i], 2), "a bigram repeated"
            assert not set(ngrams(out, 3)) & set(ngrams(prompt_ids, 3)), "a prompt trigram"
            assert banned_word[0] not in out
            spans = range(len(prompt_ids) - 1, len(full) - 1)
            assert all(full[i : i + 2] != [11, 29] for i in spans)
            assert EOS not in out[:10], "eos before min_new_tokens"
        for seq in r.json()["sequences"]:
            assert seq["sequence_score"] == pytest.approx(sum(t["logprob"] for t in seq["tokens"]))


def test_forced_tokens_under_sampling(server_url, hf_tokenizer):
    # min_new_tokens keeps a sampled eos from ending a sequence before the forced one.
    kwargs = {
        "do_sample": True,
        "max_new_tokens": 6,
        "min_new_tokens": 6,
        "forced_bos_token_id": 30,
        "forced_eos_token_id": 31,
        "num_return_sequences": 3,
        "output_scores": True,
    }
    r = chat(server_url, "Hi", kwargs)
    assert r.status_code == 200, r.text
    assert len(hf_tokenizer.encode("Hi")) == 1
    for out, seq in zip(token_ids(r), r.json()["sequences"], strict=True):
        assert out[0] == 30 and out[-1] == 31 and len(out) == 6
        # A forced token has all the probability mass.
        assert seq["tokens"][0]["logprob"] == pytest.approx(0.0, abs=1e-6)


def random_kwargs(rng: random.Random) -> dict:
    kwargs: dict = {"max_new_tokens": rng.randint(1, 6), "do_sample": rng.random() < 0.6}
    if kwargs["do_sample"]:
        kwargs["num_return_sequences"] = rng.choice([1, 1, 2, 3])
        kwargs["temperature"] = rng.choice([0.3, 0.7, 1.0, 1.5])
        kwargs["top_k"] = rng.choice([0, 1, 10, 50, 49152])
        kwargs["top_p"] = rng.choice([1.0, 0.9, 0.5, 0.01])
    choices = {
        "typical_p": lambda: rng.choice([1.0, 0.99, 0.5, 0.05, 1e-6]),
        "repetition_penalty": lambda: rng.choice([1.0, 0.5, 1.3, 10.0, 1e-3]),
        "no_repeat_ngram_size": lambda: rng.choice([0, 1, 2, 3, 7, 50, 2048]),
        "encoder_no_repeat_ngram_size": lambda: rng.choice([0, 1, 2, 4, 2048]),
        "bad_words_ids": lambda: (
            [
                [rng.randrange(49152) for _ in range(rng.randint(1, 3))]
                for _ in range(rng.randint(1, 6))
            ]
            + [[0], [49151], [13, 13, 13]]
        ),
        "min_new_tokens": lambda: rng.choice([0, 1, 5, 100]),
        "min_length": lambda: rng.choice([0, 3, 50]),
        "forced_bos_token_id": lambda: rng.choice([0, 1, 2, 49151]),
        "forced_eos_token_id": lambda: rng.choice([0, 2, 13, 49151]),
        "remove_invalid_values": lambda: rng.choice([True, False, None]),
        "output_scores": lambda: rng.random() < 0.5,
        "return_dict_in_generate": lambda: rng.random() < 0.3,
        "eos_token_id": lambda: rng.choice([[], 2, [2, 13]]),
    }
    for key in rng.sample(sorted(choices), rng.randint(1, 6)):
        kwargs[key] = choices[key]()
    return kwargs


def test_fuzz_random_valid_combinations(server_url):
    rng = random.Random(1234)
    prompts = [
        "Hi",
        "The capital of France is",
        "a a a a a a a a",
        "1, 2, 3, 4, 5, 6,",
        "def f(x):\n    return x",
    ]
    jobs = [(rng.choice(prompts), random_kwargs(rng)) for _ in range(60)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: chat(server_url, *job), jobs))
    statuses = [r.status_code for r in replies]
    bad = [
        (job, r.status_code, r.text)
        for job, r in zip(jobs, replies, strict=True)
        if not (r.status_code == 200 or 400 <= r.status_code < 500)
    ]
    assert not bad, bad
    assert statuses.count(200) >= 40, statuses
    for (_, kwargs), r in zip(jobs, replies, strict=True):
        scores = kwargs.get("output_scores") or kwargs.get("return_dict_in_generate")
        if r.status_code == 200 and scores:
            assert all(s["tokens"] is not None for s in r.json()["sequences"])
    # The engine survived all of it.
    assert httpx.get(server_url + "/health", timeout=10).status_code == 200
    r = chat(server_url, "The capital of France is", {"do_sample": False, "max_new_tokens": 4})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"no_repeat_ngram_size": -1},
        {"no_repeat_ngram_size": 10**6},
        {"bad_words_ids": [[1, [2]]]},
        {"bad_words_ids": [[10**9]]},
        {"bad_words_ids": []},
        {"forced_eos_token_id": 10**9},
        {"typical_p": 0},
        {"remove_invalid_values": "sometimes"},
    ],
)
def test_invalid_values_are_400s_before_the_engine(server_url, kwargs):
    r = chat(server_url, "Hello", {"max_new_tokens": 2, **kwargs})
    assert r.status_code in (400, 422), r.text
    assert httpx.get(server_url + "/health", timeout=10).status_code == 200
