"""Prompts with verifiable answers for online RL: the world's `rl_train.jsonl`
({"messages", "answer", "lang", "kind"}) or GSM8K ({"question", "answer": "... #### 72"}).
Other keys of a record (a category such as "kind" or "level") are kept."""

from __future__ import annotations

from pathlib import Path

from lmforge.data.readers import DataError, SkipReport, read_records
from lmforge.data.sft import checked_messages
from lmforge.rewards import answer_value


def to_prompt(record: dict, where: str) -> dict:
    """One record as {"messages" (ending on a user turn), "answer" (float), "lang"}, with
    the record's other keys."""
    if "messages" in record:
        messages = checked_messages(record["messages"], where)
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the last message must be the user's prompt")
    elif isinstance(record.get("question"), str):
        messages = [{"role": "user", "content": record["question"]}]
    else:
        raise DataError(f"{where}: needs 'messages' or a string 'question'")
    if "answer" not in record:
        raise DataError(f"{where}: needs 'answer'")
    try:
        answer = answer_value(record["answer"])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    other = {k: v for k, v in record.items() if k not in ("messages", "question", "answer")}
    return {**other, "messages": messages, "answer": answer, "lang": record.get("lang", "en")}


def read_prompts(path: str | Path, skips: SkipReport | None = None) -> list[dict]:
    """Every record of `path` as `to_prompt` gives it; a malformed one raises a DataError
    naming its file and line, or with `skips` is recorded there and left out."""
    prompts = []
    for where, record in read_records(path, skips):
        try:
            prompts.append(to_prompt(record, where))
        except DataError as e:
            if skips is None:
                raise
            skips.add(where, str(e))
    return prompts
