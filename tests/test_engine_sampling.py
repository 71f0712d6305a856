"""Each sampling parameter changes the output the way it should, through the whole engine."""

import asyncio

import pytest

from gridserve.entrypoints.engine import Engine
from gridserve.errors import InvalidParamError, RequestTooLargeError
from tests.smollm import assert_no_leak


@pytest.fixture(scope="module")
def engine():
    e = Engine(max_total_tokens=4096, show_progress=False, log_level="warning")
    yield e
    assert_no_leak(e)
    e.shutdown()


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.apply_chat_template([{"role": "user", "content": "Tell me a story about a dragon."}])


def gen(engine, prompt, **params):
    return engine.generate(prompt, {"max_new_tokens": 24, **params})


def test_seeded_sampling_is_reproducible(engine, prompt):
    a = gen(engine, prompt, temperature=1.0, seed=7)
    b = gen(engine, prompt, temperature=1.0, seed=7)
    c = gen(engine, prompt, temperature=1.0, seed=8)
    assert a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]
    # the same seeded request gives the same tokens when batched with others
    batch = engine.generate([prompt, "Hello", prompt], [{"max_new_tokens": 24, "temperature": 1.0, "seed": s}
                                                        for s in (7, 1, 8)])
    assert batch[0]["output_ids"] == a["output_ids"] and batch[2]["output_ids"] == c["output_ids"]


def test_top_k_1_equals_greedy(engine, prompt):
    greedy = gen(engine, prompt, temperature=0)
    assert gen(engine, prompt, temperature=1.5, top_k=1, seed=3)["output_ids"] == greedy["output_ids"]
    # a tiny top_p keeps only the most likely token too
    assert gen(engine, prompt, temperature=1.0, top_p=1e-6, seed=4)["output_ids"] == greedy["output_ids"]


def test_temperature_changes_output(engine, prompt):
    greedy = gen(engine, prompt, temperature=0)["output_ids"]
    hot = [gen(engine, prompt, temperature=2.0, seed=s)["output_ids"] for s in range(3)]
    assert any(h != greedy for h in hot)


def test_n_gives_distinct_choices(engine, prompt):
    outs = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 1.0, "n": 3, "seed": 5})
    assert len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) == 3


def test_stop_string_cuts_text(engine, prompt):
    full = gen(engine, prompt, temperature=0)
    words = full["text"].split()
    stop = words[len(words) // 2]
    out = gen(engine, prompt, temperature=0, stop=[stop])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == full["text"][: full["text"].index(stop)]
    assert stop not in out["text"]


def test_stop_token_ids_and_max_new_tokens(engine, prompt):
    full = gen(engine, prompt, temperature=0)
    tok = full["output_ids"][5]
    out = gen(engine, prompt, temperature=0, stop_token_ids=[tok])
    first = full["output_ids"].index(tok)
    assert out["output_ids"] == full["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    out = gen(engine, prompt, temperature=0, max_new_tokens=3)
    assert out["output_ids"] == full["output_ids"][:3]
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["completion_tokens"] == 3


def test_ignore_eos(engine):
    short = engine.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    out = engine.generate(short, {"temperature": 0, "max_new_tokens": 40})
    assert out["meta_info"]["finish_reason"]["type"] == "stop"  # the model ends by itself
    forced = engine.generate(short, {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True})
    assert len(forced["output_ids"]) == 40
    assert forced["output_ids"][: len(out["output_ids"])] == out["output_ids"]


def test_penalties_change_output(engine):
    rep = "one two one two one two one two one two one two"
    base = engine.generate(rep, {"temperature": 0, "max_new_tokens": 16})["output_ids"]
    for key, value in (("repetition_penalty", 1.8), ("frequency_penalty", 2.0), ("presence_penalty", 2.0)):
        out = engine.generate(rep, {"temperature": 0, "max_new_tokens": 16, key: value})["output_ids"]
        assert out != base, key
    # a penalized run repeats its own tokens less
    fp = engine.generate(rep, {"temperature": 0, "max_new_tokens": 16, "frequency_penalty": 2.0})["output_ids"]
    assert len(set(fp)) >= len(set(base))


def test_logprobs(engine, prompt):
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 8}, return_logprob=True, top_logprobs_num=3)
    lps, tops = out["meta_info"]["output_token_logprobs"], out["meta_info"]["output_top_logprobs"]
    assert len(lps) == len(tops) == len(out["output_ids"])
    for (lp, tok), top, chosen in zip(lps, tops, out["output_ids"], strict=True):
        assert tok == chosen and len(top) == 3
        assert top[0][1] == chosen and abs(top[0][0] - lp) < 1e-5  # greedy picks the top token
        assert top[0][0] >= top[1][0] >= top[2][0] and lp <= 0


def test_streaming_deltas_add_up(engine, prompt):
    final = gen(engine, prompt, temperature=0)
    chunks = list(engine.generate(prompt, {"temperature": 0, "max_new_tokens": 24}, stream=True))
    assert "".join(c["delta"] for c in chunks) == final["text"]
    assert chunks[-1]["output_ids"] == final["output_ids"] and len(chunks) > 5

    async def run():
        stream = await engine.async_generate(prompt, {"temperature": 0, "max_new_tokens": 24}, stream=True)
        return [c async for c in stream]

    assert "".join(c["delta"] for c in asyncio.run(run())) == final["text"]


def test_abandoned_stream_frees_its_kv(engine, prompt):
    stream = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 200}, stream=True)
    next(stream)
    stream.close()  # the consumer leaves: an abort reaches the scheduler
    engine.generate("Hi", {"max_new_tokens": 2})  # a round trip after the abort
    assert_no_leak(engine)


@pytest.mark.parametrize("params, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"n": 0}, "n"),
    ({"frequency_penalty": 3}, "frequency_penalty"), ({"stop": [""]}, "stop"), ({"bogus": 1}, "bogus"),
    ({"max_new_tokens": 100000}, "max_new_tokens"),
])
def test_invalid_params_name_the_field(engine, params, field):
    with pytest.raises(InvalidParamError) as e:
        engine.generate("Hello", params)
    assert e.value.param == field


def test_bad_inputs(engine):
    with pytest.raises(InvalidParamError, match="empty"):
        engine.generate(input_ids=[])
    with pytest.raises(InvalidParamError, match="input_ids"):
        engine.generate(input_ids=[1, 10**9])
    with pytest.raises(RequestTooLargeError):
        engine.generate(input_ids=[1] * 4000, sampling_params={"max_new_tokens": 200})
    # the engine still serves afterwards
    assert engine.generate("Hello", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_overlap_loop_equals_normal_loop(engine, prompt):
    """The overlap loop reads each step's tokens one step late; every sampling feature must still give the
    same tokens, logprobs, texts and finish reasons, alone and batched."""
    rep = "one two one two one two one two one two one two"
    cases = [
        (prompt, {"temperature": 0.8, "seed": 7}),
        (rep, {"temperature": 0.7, "seed": 3, "repetition_penalty": 1.3, "frequency_penalty": 0.5,
               "presence_penalty": 0.3}),
        (rep, {"temperature": 0, "frequency_penalty": 2.0}),
        (prompt, {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 11}),
        (prompt, {"temperature": 0, "stop": [" the", "."]}),
        (prompt, {"temperature": 0, "max_new_tokens": 0}),
        (prompt, {"temperature": 0, "max_new_tokens": 1}),
        ("Hello", {"temperature": 0, "max_new_tokens": 60}),  # may stop at EOS while the next step runs
    ]
    prompts = [p for p, _ in cases]
    params = [{"max_new_tokens": 16, **c} for _, c in cases]

    def run(e):
        pairs = zip(prompts, params, strict=True)
        alone = [e.generate(p, c, return_logprob=True, top_logprobs_num=2) for p, c in pairs]
        return alone + e.generate(prompts, params, return_logprob=True, top_logprobs_num=2)

    def key(o):
        m = o["meta_info"]
        return o["output_ids"], o["text"], m["finish_reason"], m["output_token_logprobs"], m["output_top_logprobs"]

    want = [key(o) for o in run(engine)]
    with Engine(max_total_tokens=4096, show_progress=False, log_level="warning",
                enable_overlap_schedule=True) as overlap:
        got = [key(o) for o in run(overlap)]
        assert_no_leak(overlap)
    for g, w in zip(got, want, strict=True):
        assert g[:3] == w[:3]
        assert [t for _, t in g[3]] == [t for _, t in w[3]]
        assert [lp for lp, _ in g[3]] == pytest.approx([lp for lp, _ in w[3]], abs=1e-4)
        assert [[t for _, t in top] for top in g[4]] == [[t for _, t in top] for top in w[4]]
