"""Each primitive of the language, on both backends (in-process Engine and RuntimeEndpoint over HTTP), checked
against the same prompts sent by hand through `Engine.generate` (greedy, float32)."""

from __future__ import annotations

import pytest

from radixlm import Engine
from radixlm import lang as sgl
from radixlm.lang.backend import Backend

GREEDY = {"temperature": 0.0}


def by_hand(engine: Engine, prompt: str, **params) -> str:
    return engine.generate(prompt, {**GREEDY, **params})["text"]


def test_gen_is_the_engines_greedy_output(backend: Backend, engine: Engine) -> None:
    @sgl.function
    def story(s, start):
        s += start + sgl.gen("more", max_tokens=12, temperature=0)
        s += " and then" + sgl.gen("end", max_tokens=6, temperature=0, stop=[" the"])

    st = story.run(start="Once upon a time", backend=backend)
    first = by_hand(engine, "Once upon a time", max_new_tokens=12)
    second = by_hand(engine, "Once upon a time" + first + " and then", max_new_tokens=6, stop=[" the"])
    assert st["more"] == first and first
    assert st["end"] == second
    assert st.text() == "Once upon a time" + first + " and then" + second
    meta = st.get_meta_info("more")
    assert meta["completion_tokens"] == 12 or meta["finish_reason"]["type"] == "stop"


def test_run_level_defaults_and_gen_overrides(backend: Backend, engine: Engine) -> None:
    @sgl.function
    def two(s):
        s += "The river" + sgl.gen("a")  # run's defaults: 5 tokens, greedy
        s += "." + sgl.gen("b", max_tokens=3)

    st = two.run(backend=backend, max_new_tokens=5, temperature=0)
    a = by_hand(engine, "The river", max_new_tokens=5)
    assert st["a"] == a
    assert st["b"] == by_hand(engine, "The river" + a + ".", max_new_tokens=3)


def test_roles_render_through_the_models_chat_template(backend: Backend, engine: Engine) -> None:
    @sgl.function
    def chat(s, q):
        s += sgl.system("Be brief.")
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))
        with s.user():
            s += "And then?"
        s += sgl.assistant_begin() + sgl.gen("more", max_tokens=4, temperature=0) + sgl.assistant_end()

    st = chat.run(q="Hi there", backend=backend)
    tok = engine.tokenizer_manager.tokenizer
    msgs = st.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    # The state's text is the conversation as the template writes it.
    assert st.text() == tok.apply_chat_template(msgs, tokenize=False)
    head = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    # Inside a role block, a gen stops where the template closes the turn.
    assert st["answer"] == by_hand(engine, head, max_new_tokens=8, stop=["<|im_end|>"])
    assert msgs[2]["content"] == st["answer"].lstrip()


def test_role_blocks_do_not_nest(backend: Backend) -> None:
    @sgl.function
    def nested(s):
        s += sgl.user_begin() + sgl.assistant_begin()

    with pytest.raises(ValueError, match="do not nest"):
        nested.run(backend=backend)


def test_select_takes_the_best_normalized_choice(backend: Backend, engine: Engine) -> None:
    choices = ["red", "green", "deep blue sea"]

    @sgl.function
    def pick(s):
        s += "The best color is " + sgl.select("color", choices=choices)

    st = pick.run(backend=backend)
    meta = st.get_meta_info("color")
    scores = meta["normalized_prompt_logprobs"]
    assert st["color"] == choices[max(range(3), key=scores.__getitem__)]
    assert st.text() == "The best color is " + st["color"]
    # The scores are the engine's prompt logprobs of each choice's own tokens, averaged.
    tm = engine.tokenizer_manager
    prefix_ids = tm.encode("The best color is ")
    for c, score, toks in zip(choices, scores, meta["input_token_logprobs"]):
        ids = tm.encode("The best color is " + c)
        start = next(i for i, (a, b) in enumerate(zip(prefix_ids, ids)) if a != b)
        assert [t for _, t in toks] == ids[start:]
        out = engine.generate(
            input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=start
        )
        lps = [e[0] for e in out["meta_info"]["input_token_logprobs"]]
        assert score == pytest.approx(sum(lps) / len(lps), abs=1e-4)


def test_gen_with_choices_is_select(backend: Backend) -> None:
    @sgl.function
    def pick(s):
        s += "Answer: " + sgl.gen("a", choices=["yes", "no"])
        s += " / " + sgl.select("b", choices=["yes", "no"])

    st = pick.run(backend=backend)
    assert st["a"] == st["b"] and st["a"] in ("yes", "no")


def test_select_methods(backend: Backend) -> None:
    choices = ["cat", "dog", "small river"]
    picks = {}
    for method in (
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ):

        @sgl.function
        def pick(s, method=method):
            s += "My favourite animal is the " + sgl.select("x", choices=choices, choices_method=method)

        st = pick.run(backend=backend)
        picks[type(method).__name__] = (st["x"], st.get_meta_info("x"))
    x, meta = picks["UnconditionalLikelihoodNormalized"]
    values = meta["normalized_unconditional_prompt_logprobs"]
    assert x == choices[max(range(3), key=values.__getitem__)]
    x, meta = picks["GreedyTokenSelection"]
    first = [row[0] for row in meta["greedy_logprob_matrix"]]
    assert x == choices[max(range(3), key=first.__getitem__)] or first.count(max(first)) > 1


def test_fork_and_join(backend: Backend, engine: Engine) -> None:
    @sgl.function
    def tree(s):
        s += "Three ideas about the garden:"
        forks = s.fork(3)
        forks += lambda i: f" Idea {i + 1}:"
        for f in forks:
            f += sgl.gen("idea", max_tokens=6, temperature=0)
        forks.join()
        s += " Best:" + sgl.gen("best", max_tokens=4, temperature=0)

    st = tree.run(backend=backend)
    ideas = [
        by_hand(engine, f"Three ideas about the garden: Idea {i + 1}:", max_new_tokens=6) for i in range(3)
    ]
    assert st["idea"] == ideas
    # Joined by gathering variables, the parent's text goes on from the fork point.
    assert st["best"] == by_hand(engine, "Three ideas about the garden: Best:", max_new_tokens=4)


def test_join_concate_and_append(backend: Backend, engine: Engine) -> None:
    @sgl.function
    def both(s):
        s += "Two lines:"
        forks = s.fork(2)
        forks += [" first", " second"]
        forks += sgl.gen("x", max_tokens=3, temperature=0)
        forks.join("concate_and_append")

    st = both.run(backend=backend)
    a = by_hand(engine, "Two lines: first", max_new_tokens=3)
    b = by_hand(engine, "Two lines: second", max_new_tokens=3)
    assert st.text() == "Two lines: first" + a + " second" + b


def test_run_batch_matches_single_runs(backend: Backend) -> None:
    @sgl.function
    def qa(s, question):
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, temperature=0)

    questions = [f"what is {w}?" for w in ("water", "light", "music", "paper", "money")]
    batch = qa.run_batch(
        [{"question": q} for q in questions], backend=backend, num_threads=3, progress_bar=True
    )
    single = [qa.run(question=q, backend=backend)["answer"] for q in questions]
    assert [st["answer"] for st in batch] == single
    assert [st["answer"] for st in qa.run_batch([(q,) for q in questions], backend=backend)] == single


def test_stream_yields_the_same_text(backend: Backend) -> None:
    @sgl.function
    def story(s):
        s += "Once upon a time" + sgl.gen("story", max_tokens=10, temperature=0)

    done = story.run(backend=backend)
    st = story.run(backend=backend, stream=True)
    pieces = list(st.text_iter("story"))
    assert "".join(pieces) == done["story"]
    assert st["story"] == done["story"]
    assert "".join(story.run(backend=backend, stream=True).text_iter()) == done.text()


def test_state_variables(backend: Backend) -> None:
    @sgl.function
    def prog(s):
        s["given"] = 42
        s += "x" + sgl.gen("g", max_tokens=2, temperature=0)
        return s["given"] + 1

    st = prog.run(backend=backend)
    assert st["given"] == 42 and st.ret_value == 43
    assert "g" in st and "missing" not in st
    with pytest.raises(KeyError):
        st["missing"]


def test_a_program_inside_a_program(backend: Backend) -> None:
    @sgl.function
    def inner(s, word):
        s += " " + word

    @sgl.function
    def outer(s):
        s += "Hello"
        inner(s, "world")

    assert outer.run(backend=backend).text() == "Hello world"


def test_image_is_reserved(backend: Backend) -> None:
    @sgl.function
    def look(s):
        s += sgl.user(sgl.image("cat.png") + "What is this?")

    with pytest.raises(NotImplementedError, match="image"):
        look.run(backend=backend)


def test_a_refused_request_is_raised_in_the_program(backend: Backend) -> None:
    @sgl.function
    def bad(s):
        s += "x" + sgl.gen("g", max_tokens=2, top_p=5.0)

    with pytest.raises(sgl.BackendError, match="top_p"):
        bad.run(backend=backend)


def test_an_error_in_a_branch_reaches_the_program(backend: Backend) -> None:
    @sgl.function
    def bad(s):
        s += "x"
        forks = s.fork(2)
        forks += sgl.gen("g", max_tokens=2, top_p=5.0)
        forks.join()

    with pytest.raises(RuntimeError, match="top_p"):
        bad.run(backend=backend)
