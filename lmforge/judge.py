"""An AI judge: a chat model asked, under a written constitution, whether replies are good.

The judge reads the constitution as its system message and answers one word. Its verdict is
read from the probabilities of that word rather than from a sampled reply, so it is a number
in [0, 1] and costs one forward pass:

- `score`: "Does the answer follow the principles? Reply Yes or No." gives
  P(Yes) / (P(Yes) + P(No));
- `prefer`: "Which answer follows the principles better? Reply A or B." gives
  P(A) / (P(A) + P(B)), asked in both orders and averaged,
  p = (p(A first) + 1 - p(B first)) / 2, which cancels a preference for a position
  (Zheng et al. 2023 found strong judges favour the first answer).

Any chat model can judge, the policy itself included (self-rewarding, Yuan et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

# terse, because every verdict (and every judging demonstration in SFT) reads it whole
CONSTITUTION = """A good answer:
1. is true and answers the question;
2. works a word problem in steps and ends with "Answer: N";
3. is short;
4. is polite;
5. refuses harm, and only harm."""

SCORE_QUESTION = (
    "Question: {question}\n\nAnswer: {answer}\n\n"
    "Does the answer follow the principles? Reply Yes or No."
)
COMPARE_QUESTION = (
    "Question: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Which answer follows the principles better? Reply A or B."
)
MAX_ANSWER_CHARS = 400  # a runaway reply is cut: the judge's context holds the whole prompt


def read_constitution(path: str | Path | None) -> str:
    """The constitution text of a file, or the built-in one."""
    if path is None:
        return CONSTITUTION
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path}: the constitution is empty")
    return text


def _question(messages: list[dict]) -> str:
    return messages[-1]["content"]


@dataclass
class Judge:
    model: Transformer
    tokenizer: Tokenizer
    constitution: str = CONSTITUTION
    batch_size: int = 32

    def _verdict_token(self, word: str) -> int:
        return self.tokenizer.encode(word)[0]

    @torch.inference_mode()
    def _odds(self, questions: list[str], first: str, second: str) -> torch.Tensor:
        """P(first) / (P(first) + P(second)) of the judge's reply's first token, per question."""
        yes, no = self._verdict_token(first), self._verdict_token(second)
        if yes == no:
            raise ValueError(f"judge: {first!r} and {second!r} start with the same token")
        context = self.model.cfg.max_seq_len
        prompts = []
        for q in questions:
            messages = [
                {"role": "system", "content": self.constitution},
                {"role": "user", "content": q},
            ]
            ids = self.tokenizer.render_chat(messages, add_generation_prompt=True)[0]
            prompts.append(ids[-context:])  # an over-long prompt keeps its end, the question
        device = next(self.model.parameters()).device
        odds = []
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i : i + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            for row, p in enumerate(batch):
                ids[row, : len(p)] = torch.tensor(p)
            # right padding: a row's last real position sees none of the padding after it,
            # and is the only one whose logits are wanted
            last = torch.zeros(ids.shape, dtype=torch.bool)
            last[torch.arange(len(batch)), [len(p) - 1 for p in batch]] = True
            logits = self.model.logits_at(ids.to(device), last.to(device))  # (B, V)
            pair = logits[:, [yes, no]].float().log_softmax(-1)
            odds.append(pair[:, 0].exp().cpu())
        return torch.cat(odds)

    def score(self, contexts: list[list[dict]], replies: list[str]) -> torch.Tensor:
        """(N,) P(the reply follows the constitution), judged alone."""
        questions = [
            SCORE_QUESTION.format(question=_question(m), answer=r[:MAX_ANSWER_CHARS])
            for m, r in zip(contexts, replies)
        ]
        return self._odds(questions, "Yes", "No")

    def prefer(self, contexts: list[list[dict]], a: list[str], b: list[str]) -> dict:
        """P(a is better than b) per item, asked in both orders: {"p_a": (N,), "p_a_first":
        (N,), "p_a_second": (N,)}; the two orders agree when both are on the same side of 0.5."""

        def ask(first: list[str], second: list[str]) -> torch.Tensor:
            questions = [
                COMPARE_QUESTION.format(
                    question=_question(m), a=x[:MAX_ANSWER_CHARS], b=y[:MAX_ANSWER_CHARS]
                )
                for m, x, y in zip(contexts, first, second)
            ]
            return self._odds(questions, "A", "B")

        a_first = ask(a, b)
        a_second = 1 - ask(b, a)
        return {"p_a": (a_first + a_second) / 2, "p_a_first": a_first, "p_a_second": a_second}
