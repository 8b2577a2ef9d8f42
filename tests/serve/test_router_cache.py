"""role.policy=cache_aware over real processes: router + 2 prefill + 2 decode, every worker
with cache=radix, driven by the official openai client."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from tests.conftest import engine_cfg
from tests.disagg.procs import Worker

pytestmark = pytest.mark.timeout(600)


def rooms_ok(decs) -> dict[int, int]:
    """Rooms each live decode worker has completed."""
    return {i: d.stats()["rooms_ok"] for i, d in enumerate(decs) if d.proc.poll() is None}


def served_by(decs, before: dict[int, int]) -> int:
    (i,) = [i for i, n in rooms_ok(decs).items() if n > before.get(i, 0)]
    return i


def test_conversation_follows_its_decode_worker_and_survives_its_death(tiny_ckpt):
    """Guards against cache-aware routing sending a conversation's next turn to a decode
    worker that does not hold it (the decode-side cache would only hit by luck), against
    cached_tokens not reaching the client through the router, and against a conversation
    ending when the worker holding it dies (it must continue elsewhere, correctly)."""
    from toolkit.engine.engine import Engine
    from toolkit.engine.request import SamplingParams

    pres = [Worker("prefill", ["cache=radix"]) for _ in range(2)]
    decs = [Worker("decode", ["cache=radix"]) for _ in range(2)]
    router = Worker("router", [f"role.prefill_urls=[{pres[0].url},{pres[1].url}]",
                               f"role.decode_urls=[{decs[0].url},{decs[1].url}]", "role.health_interval_s=0.3",
                               "role.policy=cache_aware", "role.cache_aware_block=4"])
    ref = Engine(tiny_ckpt, engine_cfg(chunk_size=16))
    try:
        client = OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        convs = [[{"role": "system", "content": f"Conversation {k}: answer briefly."}] for k in range(3)]
        home = {}
        for turn in range(4):
            for k, msgs in enumerate(convs):
                msgs.append({"role": "user", "content": f"question {turn} of {k}"})
                if turn == 3 and k == 0:  # the worker holding conversation 0 dies before its last turn
                    decs[home[0]].kill()
                    t0 = time.time()
                    while httpx.get(router.url + "/health").json()["healthy_decode"] != 1:
                        assert time.time() - t0 < 30, "the router never noticed the dead decode worker"
                        time.sleep(0.1)
                before = rooms_ok(decs)
                r = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=6, temperature=0,
                                                   extra_body={"ignore_eos": True})
                prompt = ref.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
                want = ref.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].text
                assert r.choices[0].message.content == want, (turn, k)
                i = served_by(decs, before)
                cached = r.usage.prompt_tokens_details.cached_tokens
                if turn == 0:
                    home[k] = i
                elif decs[home[k]].proc.poll() is not None:
                    assert i != home[k]  # its worker died: continued elsewhere (correct, as checked above)
                    home[k] = i
                else:
                    assert i == home[k], f"turn {turn} of conversation {k} went to another decode worker"
                    assert cached > 0, (turn, k)
                msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    finally:
        for w in (router, *pres, *decs):
            w.stop()
