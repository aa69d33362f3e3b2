"""Pairwise judging (evaluate/judge.py): the order-swap rule and the statistics by hand, an OpenAI-compatible endpoint
played by a tiny FastAPI stub whose verdict is computed from the two answers (it prefers the shorter one) or follows
the position, an endpoint that does not answer, and a reward-model run as the judge."""
import json
import socket
import threading
import time

import pytest
import torch

from conftest import write_jsonl
from test_train import tiny_cfg
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.judge import JUDGE_USER, decide, parse_verdict, request_text, summarise


def test_two_orders_decide_a_pair_and_the_statistics_by_hand():
    assert decide("A", "B") == "win" and decide("B", "A") == "loss"
    assert decide("A", "A") == "tie" and decide("B", "B") == "tie" and decide(None, "B") == "tie"
    assert parse_verdict("B") == "B" and parse_verdict("Response A is better.") == "A" and parse_verdict("neither") is None
    s = summarise(["win"] * 7 + ["loss"] * 2 + ["tie"])
    assert (s["wins"], s["losses"], s["ties"], s["judged"]) == (7, 2, 1, 10)
    assert s["win_rate"] == round(7 / 9, 4) and s["win_rate_ties_half"] == 0.75      # (7 + 0.5) / 10
    # exact sign test, 7 of 9: 2 x (C(9,0) + C(9,1) + C(9,2)) / 2^9 = 2 x 46 / 512 = 0.179688
    assert s["p_sign_test"] == pytest.approx(0.179688, abs=1e-6)
    assert request_text([{"role": "user", "content": "Hi?"}]) == "Hi?"
    assert request_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}]) == "User: a\nAssistant: b\nUser: c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(prompt: str) -> tuple[str, str]:
    """The stub reads the two answers back out of the judging prompt."""
    head, tail = JUDGE_USER.split("{a}")
    middle, end = tail.split("{b}")
    rest = prompt.split(head.split("{request}")[1], 1)[1]
    a, rest = rest.split(middle, 1)
    return a, rest[: len(rest) - len(end)]


@pytest.fixture
def stub_judge():
    """An OpenAI-compatible endpoint on a free port: `mode` "shorter" answers the letter of the shorter answer (the
    first on a tie), "first" always A. Yields (url, state)."""
    import uvicorn
    from fastapi import FastAPI, Request

    state = {"mode": "shorter", "calls": 0}
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "judge-1", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state["calls"] += 1
        assert body["model"] == "judge-1" and body["temperature"] == 0
        a, b = _answers(body["messages"][-1]["content"])
        letter = "A" if state["mode"] == "first" or len(a) <= len(b) else "B"
        return {"id": "x", "object": "chat.completion", "model": "judge-1",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": letter}, "finish_reason": "stop"}]}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", state
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def short_answer_run(tmp_path, tiny_model_dir):
    """A full fine-tune of the tiny model on one-word answers: its answers differ from the base's."""
    from tunesmith.train.loop import train

    data = write_jsonl(tmp_path / "short.jsonl", [{"prompt": f"Tell me about {i}.", "completion": "ok"} for i in range(40)])
    return train(tiny_cfg(tmp_path, tiny_model_dir, data, "method.name=full", "method.freeze_embeddings=false",
                          "train.max_steps=6", "train.lr=1e-2", "output.name=short")).run_dir


def test_an_endpoint_judge_with_swapped_positions(short_answer_run, stub_judge):
    from tunesmith.evaluate.judge import judge_runs

    url, state = stub_judge
    said = []
    r = judge_runs(short_answer_run, url, "judge-1", n=8, max_new_tokens=12, log=said.append)
    assert r["judged"] == len(r["pairs"]) == 8 == r["examples"] and state["calls"] == 16   # each pair twice
    for p in r["pairs"]:  # what a judge preferring the shorter answer must decide, worked out from the texts
        want = "win" if len(p["tuned"]) < len(p["other"]) else "loss" if len(p["tuned"]) > len(p["other"]) else "tie"
        assert p["outcome"] == want, p
    assert r["wins"] + r["losses"] > 0  # answers of different lengths: decided pairs (the tiny base says "", the
    # tuned model repeats a token: the stub prefers the base, and the swap rule must give that as losses, not wins)
    assert r["wins"] + r["losses"] + r["ties"] == 8 and 0 <= r["p_sign_test"] <= 1
    assert any(line.startswith("tuned vs base:") for line in said)
    kept = list((short_answer_run / "evaluations").glob("*-judge.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["judge_model"] == "judge-1"
    # a judge that always picks the first position decides nothing: every pair is a tie
    state["mode"] = "first"
    biased = judge_runs(short_answer_run, url, "judge-1", n=8, max_new_tokens=12, log=said.append)
    assert biased["ties"] == 8 and biased["win_rate"] is None and biased["first_position_picked"] == 1.0
    assert biased["orders_agree"] == 0.0
    with pytest.raises(TunesmithError, match="does not serve model 'nope'; it serves: judge-1"):
        judge_runs(short_answer_run, url, "nope")


def test_a_judge_endpoint_that_does_not_answer_stops_before_anything_loads(tmp_path, capsys):
    from tunesmith.cli.main import main

    run = tmp_path / "runs" / "r"
    (run / "final").mkdir(parents=True)   # no config, no model: nothing may be read before the endpoint is checked
    url = f"http://127.0.0.1:{_free_port()}/v1"
    assert main(["eval", str(run), "--judge", url, "--judge-model", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"judge endpoint {url} does not answer" in err
    assert main(["eval", str(run), "--judge", url, "--samples", "4"]) == 2
    assert "two evaluations" in capsys.readouterr().err
    assert main(["eval", str(run), "--judge", url]) == 2
    assert "--judge-model NAME" in capsys.readouterr().err
    assert main(["eval", str(run), "--judge", str(tmp_path / "nowhere")]) == 2
    assert "neither an endpoint" in capsys.readouterr().err
    assert not (run / "evaluations").exists()


def test_a_reward_model_run_as_the_judge(tmp_path, tiny_model_dir, short_answer_run):
    from tunesmith.evaluate.judge import judge_runs
    from tunesmith.objectives.rewards import RewardModelScorer, Rollouts
    from tunesmith.train.loop import train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Tell me about {i}.", "chosen": "ok",
                                                    "rejected": f"Well, {i} is a long story to tell."} for i in range(40)])
    rm = train(tiny_cfg(tmp_path, tiny_model_dir, pairs, "task=reward", "method.name=full", "train.max_steps=12",
                        "train.lr=1e-3", "output.name=rm")).run_dir
    r = judge_runs(short_answer_run, str(rm), n=6, max_new_tokens=12, log=lambda *a: None)
    assert r["judged"] == 6 and "orders_agree" not in r
    scorer = RewardModelScorer(str(rm), torch.device("cpu"))
    for p in r["pairs"]:  # the verdict is the reward model's scores of the two answers, scored alone
        conv = [{"role": "user", "content": p["request"]}]
        t, o = scorer(Rollouts(["p", "p"], [p["tuned"], p["other"]], [[1], [1]], [conv, conv], {}))
        assert p["tuned_score"] == pytest.approx(t, abs=1e-4) and p["other_score"] == pytest.approx(o, abs=1e-4)
        assert p["outcome"] == ("win" if t > o else "loss" if t < o else "tie")
    # several judges (`--judge RM1 RM2`): the models answer once, each judge judges those answers, one file each
    from tunesmith.cli.main import main

    before = set((short_answer_run / "evaluations").glob("*-judge.json"))
    assert main(["eval", str(short_answer_run), "--judge", str(rm), str(rm), "-n", "6", "--max-new-tokens", "12"]) == 0
    made = sorted(set((short_answer_run / "evaluations").glob("*-judge.json")) - before)
    both = [json.loads(f.read_text()) for f in made]
    assert len(both) == 2 and both[0]["judge"] == both[1]["judge"] == str(rm)
    assert [p["tuned"] for p in both[0]["pairs"]] == [p["tuned"] for p in both[1]["pairs"]] == [p["tuned"] for p in r["pairs"]]
    assert [p["tuned_score"] for p in both[1]["pairs"]] == [p["tuned_score"] for p in r["pairs"]]
    # a second judge that cannot judge stops the command before anything loads (the first is not run alone)
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(TunesmithError, match="does not answer"):
        judge_runs(short_answer_run, [str(rm), url], "m")
    with pytest.raises(TunesmithError, match="a reward-model judge run needs none"):
        judge_runs(short_answer_run, [str(rm)], "m")
    assert set((short_answer_run / "evaluations").glob("*-judge.json")) == before | set(made)
    with pytest.raises(TunesmithError, match="must be a reward model"):
        judge_runs(short_answer_run, str(short_answer_run))
