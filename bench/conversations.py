"""The prefix scenario's workload: users in groups behind one long system prompt, in
conversations that grow turn by turn.

Shaped like llm-d's shared-prefix benchmark (groups of users whose requests start with their
group's system prompt) plus multi-turn chat: turn k sends the system prompt, every earlier
question and answer, and a new question, so each turn's prompt starts with the whole of the
last one and its answer. A router that sends a conversation back where its history is cached
skips nearly all of its prefill; one that does not pays for the whole prompt again.

The answers are the sim's own: the sim is deterministic (`modelfleet.sim.content`: the reply
is a function of the rendered prompt and the sim's seed), so they are computed here ahead of
time. Every contender sends the same bytes whatever came back, the next turn's prompt starts
exactly where the sim cached the last turn, and the output tokens of each turn are known
without trusting any contender to count them.

Conversation `i` is a pure function of (shape, seed, i): the eight client processes of the
independent-clients run build their own share of conversations and get the same ones a single
client would.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from bench.measure import Sample
from bench.workload import WORDS
from modelfleet.sim.content import chat_prompt, reply_pieces


@dataclass(frozen=True)
class Shape:
    """How big the conversations are; `hot_share` set: one group carries that share of them."""

    groups: int = 16
    system_words: int = 1200
    question_words: int = 40
    turns: int = 4
    max_tokens: int = 16
    hot_share: float | None = None
    sim_seed: int = 0  # the sims' --seed: their answers depend on it

    def describe(self) -> str:
        spread = (f"group 0 carries {self.hot_share:.0%} of the conversations, the rest spread "
                  f"evenly" if self.hot_share else "groups drawn evenly")
        return (f"{self.groups} groups, each with its own {self.system_words}-word system prompt; "
                f"conversations of {self.turns} turns, each turn a new {self.question_words}-word "
                f"question after the whole history, up to {self.max_tokens} tokens answered; "
                f"{spread}")


@dataclass(frozen=True)
class Turn:
    """One request of a conversation: what a contender sends (`messages`, `max_tokens`, as a
    ChatCall offers them) and what the sim will answer."""

    session: int
    group: int
    turn: int
    messages: list[dict[str, str]] = field(compare=False)
    max_tokens: int
    output_tokens: int  # the length of the sim's deterministic answer


@lru_cache(maxsize=64)
def system_prompt(seed: int, group: int, words: int) -> str:
    """Group `group`'s system prompt: its first words name the group, so that prompts of
    different groups differ from their first block on."""
    rng = random.Random(f"system:{seed}:{group}")
    return (f"You are assistant {group} of team {seed}. Follow these rules. "
            + " ".join(rng.choice(WORDS) for _ in range(words)))


@lru_cache(maxsize=16384)
def conversation(shape: Shape, seed: int, index: int) -> list[Turn]:
    """Conversation `index`: its group and its turns, each with the sim's answer known
    (cached: every contender sends the same conversations, and building one costs ~3 ms)."""
    rng = random.Random(f"conversation:{seed}:{index}")
    if shape.hot_share is not None and (shape.groups == 1 or rng.random() < shape.hot_share):
        group = 0
    elif shape.hot_share is not None:
        group = rng.randrange(1, shape.groups)
    else:
        group = rng.randrange(shape.groups)
    messages = [{"role": "system", "content": system_prompt(seed, group, shape.system_words)}]
    turns = []
    for k in range(shape.turns):
        question = (f"[user {index}, question {k + 1}] "
                    + " ".join(rng.choice(WORDS) for _ in range(shape.question_words)))
        messages.append({"role": "user", "content": question})
        pieces, _ = reply_pieces(shape.sim_seed, chat_prompt(messages)[0], shape.max_tokens,
                                 leading_space=False)
        turns.append(Turn(index, group, k, list(messages), shape.max_tokens, len(pieces)))
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return turns


async def converse(send: Callable[[Turn, float], Awaitable[Sample]], shape: Shape, seed: int,
                   indices: Iterator[int], concurrency: int, *, duration_s: float | None,
                   max_turns: int | None = None) -> tuple[list[Sample], float]:
    """`concurrency` users, each taking the next conversation from `indices` and sending its
    turns one after another (the next turn once the last is answered); returns the samples
    and the wall time.

    Time-boxed by `duration_s`: at its end the turns still in flight are cancelled and left
    out, so a slow contender's backlog cannot stretch the run and every contender is measured
    over the same seconds. With `max_turns` the run instead ends once that many turns have
    been sent and answered (tiny runs for tests). `send(turn, t0)` must never raise.
    """
    samples: list[Sample] = []
    started = itertools.count()
    t0 = time.perf_counter()

    async def user() -> None:
        for index in indices:
            for turn in conversation(shape, seed, index):
                if max_turns is not None and next(started) >= max_turns:
                    return
                samples.append(await send(turn, t0))

    users = [asyncio.create_task(user()) for _ in range(concurrency)]
    try:
        await asyncio.wait(users, timeout=duration_s)
        for task in users:
            if task.done() and not task.cancelled():
                task.result()  # a bug in `send` must not pass silently
    finally:
        for task in users:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    wall = time.perf_counter() - t0
    return samples, (duration_s if duration_s is not None and max_turns is None else wall)
