"""Preference data: pairs, HH-RLHF dialogues and rankings to (context, chosen, rejected)
pairs for DPO, IPO, ORPO and reward models; unpaired labels to (context, completion,
desirable) for KTO.

Record formats (ARCHITECTURE.md), which one file may mix:

- pair: `{"prompt" or "messages", "chosen": str, "rejected": str, "margin"?: number}`.
- HH-RLHF pair: `{"chosen": str, "rejected": str}` with no prompt, each a whole dialogue
  `"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."`, the two
  sharing every turn but the final Assistant reply. The context is the text they share up to
  their last shared `\\n\\nAssistant:` marker and each reply is the rest of its dialogue
  (`hh_pair` says why not each dialogue's own last marker).
- ranking: `{"prompt" or "messages", "responses": [str, ...], "ranking": [int, ...]}`, the
  ranking listing indices into responses, best first.
- unpaired label (KTO only): `{"prompt" or "messages", "completion": str, "label": bool}`.

The context is `"prompt"`, one user turn (unwrapped from the Alpaca template, as in SFT), or
`"messages"`, a list of {role, content} turns that ends with the user turn the responses
answer.

Rules:

- Rankings give every ordered pair: K responses give K(K-1)/2 pairs, the better-ranked
  response chosen. Each pair weighs 1/(K(K-1)/2), so every ranking (one prompt) weighs 1 in
  total however many responses it has. This is InstructGPT's rule (Ouyang et al. 2022),
  which trains on all pairs of one prompt as a single batch element: as separate examples a
  prompt with many responses would count K(K-1)/2 times, and its pairs, each response in
  K-1 of them, would overfit. If some of its pairs are dropped (equal responses), the
  ranking's kept pairs share its weight of 1.
- A pair whose chosen and rejected texts are equal (after stripping) teaches nothing (its
  loss is a constant, log 2 for DPO and a reward model) and only dilutes the batch: it is
  dropped as *identical*.
- An HH-RLHF pair whose dialogues differ before the final reply is not a comparison of two
  replies to one conversation: it is dropped as *mismatched* (`dropped_mismatched_prompt`).
- Drops are counted and their first file:lines reported; nothing is dropped silently.
- A malformed record (missing keys, wrong types, an unknown shape, a ranking that is not a
  permutation, a margin that is not a number, an HH context whose turns do not alternate)
  raises a DataError naming file:line and the problem; or, when the caller passes a
  SkipReport, is added to it and counted (about 0.3% of the HH-RLHF helpful test split has
  a context with a broken turn marker such as "Humans:").

KTO (`read_labelled`) reads unpaired labels and also converts the other formats: a pair's
chosen reply is desirable and its rejected one undesirable (after the same drops); a
ranking's top K//2 responses are desirable and its bottom K//2 undesirable, and the middle
response of an odd K, neither clearly good nor bad, is dropped (and counted).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.data.readers import DataError, SkipReport, read_records
from lmforge.data.sft import checked_messages, unwrap_alpaca
from lmforge.losses import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer

MAX_DROPPED_WHERE = 20  # enough to find the bad records, without a list as long as the file


@dataclass
class Pair:
    """A preferred and a dispreferred reply to one context."""

    messages: list[dict]  # the context, ending with a user turn
    chosen: str
    rejected: str
    where: str  # file:line of the record it came from
    margin: float = 0.0
    weight: float = 1.0  # 1/(K(K-1)/2) for pairs from a ranking of K responses


@dataclass
class Labelled:
    """One reply to a context, labelled desirable or not (KTO)."""

    messages: list[dict]
    completion: str
    desirable: bool
    where: str


@dataclass
class _Drops:
    """Counts of dropped pairs and where the first ones came from."""

    identical: int = 0
    mismatched: int = 0
    where: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.where) < MAX_DROPPED_WHERE:
            self.where.append(where)


# ---- HH-RLHF --------------------------------------------------------------------------------
# A turn marker is "Human:" or "Assistant:" after a blank line, or at the very start (some
# copies of the data strip the leading blank line).
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_HUMAN, _HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def hh_dialogue(text: str, where: str) -> list[dict]:
    """An HH-RLHF dialogue as messages (user/assistant, contents stripped); raises a
    DataError naming `where` unless it starts with a Human turn, alternates, and has an
    Assistant turn."""
    parts = _HH_TURN.split(text)
    # parts = [text before the first marker, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise DataError(f"{where}: HH-RLHF dialogue does not start with a '\\n\\nHuman:' turn")
    roles, contents = parts[1::2], parts[2::2]
    for n, role in enumerate(roles):
        if role != ("Human" if n % 2 == 0 else "Assistant"):
            raise DataError(
                f"{where}: HH-RLHF dialogue turns do not alternate Human/Assistant "
                f"(turn {n} is a second {role} turn in a row)"
            )
    if len(roles) < 2:
        raise DataError(f"{where}: HH-RLHF dialogue has no Assistant turn")
    return [{"role": _HH_ROLES[r], "content": c.strip()} for r, c in zip(roles, contents)]


def _hh_checked(record: dict, where: str) -> tuple[str, str]:
    """The chosen and rejected dialogues of an HH-RLHF record, each checked to open with a
    Human turn and to hold an Assistant turn."""
    texts = _strings(record, where, "chosen", "rejected")
    for side, text in zip(("chosen", "rejected"), texts):
        if not text.lstrip().startswith("Human:"):
            raise DataError(
                f"{where}: {side!r} is not an HH-RLHF dialogue (does not start with a "
                "'\\n\\nHuman:' turn)"
            )
        if _HH_ASSISTANT not in text:
            raise DataError(f"{where}: {side!r} HH-RLHF dialogue has no Assistant turn")
    return texts[0], texts[1]


def hh_pair(record: dict, where: str) -> Pair | None:
    """The pair of an HH-RLHF record; None when the two dialogues are *mismatched*.

    The context is the text both dialogues share up to their last shared Assistant marker,
    and each reply is the rest of its own dialogue. Splitting each dialogue at its own last
    marker instead would cut wrongly where a sampled reply runs on into text that looks like
    turns ("...\\n\\nHumans: ...\\n\\nAssistant: ..."): that text is part of the reply, and a
    reason it was preferred or not. The context must then be a well-formed dialogue ending
    on a Human turn (`hh_dialogue`). The pair is mismatched when the dialogues share no
    Assistant marker, or both replies run on into a further Human turn: either way they
    diverge before the final reply, so they answer different conversations.
    """
    chosen, rejected = _hh_checked(record, where)
    margin = _margin(record, where)
    cut = os.path.commonprefix([chosen, rejected]).rfind(_HH_ASSISTANT)
    if cut < 0:
        return None
    replies = [text[cut + len(_HH_ASSISTANT) :] for text in (chosen, rejected)]
    if all(_HH_HUMAN in reply for reply in replies):
        return None
    # The empty final Assistant turn makes hh_dialogue check that the context ends on Human.
    messages = hh_dialogue(chosen[: cut + len(_HH_ASSISTANT)], where)[:-1]
    return Pair(messages, replies[0].strip(), replies[1].strip(), where, margin)


# ---- checked fields -------------------------------------------------------------------------
def _strings(record: dict, where: str, *keys: str) -> list[str]:
    for key in keys:
        if key not in record:
            raise DataError(f"{where}: record needs {key!r} (got keys {sorted(record)})")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, not {type(record[key]).__name__}")
    return [record[key] for key in keys]


def _margin(record: dict, where: str) -> float:
    # None counts as absent: a parquet file has the column in every row once any row has it.
    margin = record.get("margin")
    if margin is None:
        return 0.0
    # bool is an int subclass, but True is no margin; NaN or inf would poison the loss.
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
        raise DataError(f"{where}: 'margin' must be a finite number, not {margin!r}")
    return float(margin)


def context_messages(record: dict, where: str) -> list[dict]:
    """The context of a preference record ("prompt" or "messages"), checked.

    `sft.to_messages` is not reused because it requires an assistant turn, which a context
    must not end with; its role set and Alpaca unwrapping are."""
    if ("prompt" in record) == ("messages" in record):
        raise DataError(
            f"{where}: record needs exactly one of 'prompt' or 'messages' (got keys {sorted(record)})"
        )
    if "prompt" in record:
        (prompt,) = _strings(record, where, "prompt")
        return [{"role": "user", "content": unwrap_alpaca(prompt, where)}]
    messages = checked_messages(record["messages"], where)
    if messages[-1]["role"] != "user":
        raise DataError(
            f"{where}: 'messages' must end with the user turn the responses answer, "
            f"not a {messages[-1]['role']} turn"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _ranking(record: dict, where: str) -> tuple[list[str], list[int]]:
    """(responses, ranking) of a ranking record, checked."""
    responses, ranking = record.get("responses"), record.get("ranking")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: 'responses' must be a list of strings")
    if len(responses) < 2:
        raise DataError(f"{where}: a ranking needs at least 2 responses, got {len(responses)}")
    if (
        not isinstance(ranking, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
        or sorted(ranking) != list(range(len(responses)))
    ):
        raise DataError(
            f"{where}: 'ranking' must be a permutation of 0..{len(responses) - 1} "
            f"(indices into 'responses', best first), got {ranking!r}"
        )
    return responses, ranking


def _shape(record: dict, where: str) -> str:
    """Which format a record is in: "pair", "hh", "ranking" or "labelled"."""
    found = [
        name
        for name, keys in (
            ("pair", ("chosen", "rejected")),
            ("ranking", ("responses", "ranking")),
            ("labelled", ("completion", "label")),
        )
        if any(k in record for k in keys)
    ]
    if len(found) != 1:
        raise DataError(
            f"{where}: expected a pair ('chosen', 'rejected'), a ranking ('responses', "
            f"'ranking') or an unpaired label ('completion', 'label'); got keys {sorted(record)}"
        )
    if found[0] == "pair" and "prompt" not in record and "messages" not in record:
        return "hh"  # HH-RLHF carries its context inside each dialogue
    return found[0]


# ---- pairs ----------------------------------------------------------------------------------
def ordered_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """Every (better, worse) pair of indices of a ranking listed best first."""
    return [(better, worse) for n, better in enumerate(ranking) for worse in ranking[n + 1 :]]


def _ranking_pairs(
    messages: list[dict], responses: list[str], ranking: list[int], where: str
) -> list[Pair]:
    """Every ordered pair of a ranking, better-ranked response chosen, unweighted."""
    return [Pair(messages, responses[b], responses[w], where) for b, w in ordered_pairs(ranking)]


def _identical(pair: Pair) -> bool:
    return pair.chosen.strip() == pair.rejected.strip()


def _record_pairs(record: dict, where: str, shape: str, drops: _Drops) -> list[Pair]:
    """The kept pairs of one pair, HH or ranking record; drops are counted in `drops`."""
    if shape == "hh":
        pair = hh_pair(record, where)
        if pair is None:
            drops.add("mismatched", where)
            return []
        candidates = [pair]
    elif shape == "pair":
        chosen, rejected = _strings(record, where, "chosen", "rejected")
        margin = _margin(record, where)
        candidates = [Pair(context_messages(record, where), chosen, rejected, where, margin)]
    else:
        responses, ranking = _ranking(record, where)
        candidates = _ranking_pairs(context_messages(record, where), responses, ranking, where)
    kept = []
    for pair in candidates:
        if _identical(pair):
            drops.add("identical", where)
        else:
            kept.append(pair)
    if shape == "ranking":
        # The ranking weighs 1 in total, shared by the pairs it keeps.
        for pair in kept:
            pair.weight = 1 / len(kept)
    return kept


def _skip_or_raise(error: DataError, where: str, skips: SkipReport | None) -> None:
    """Raise a malformed record's error, or count it when the caller asked to skip."""
    if skips is None:
        raise error
    skips.add(where, str(error).removeprefix(f"{where}: "))


def read_pairs(path: str | Path, skips: SkipReport | None = None) -> tuple[list[Pair], dict]:
    """The kept pairs of a file of pair, HH-RLHF and ranking records, and a report:
    {"records", "pairs", "dropped_identical", "dropped_mismatched_prompt", "dropped_where",
    "skipped"}. A malformed record raises, or with `skips` is added there and counted."""
    pairs: list[Pair] = []
    drops = _Drops()
    records = skipped = 0
    for where, record in read_records(path, skips):
        records += 1
        try:
            shape = _shape(record, where)
            if shape == "labelled":
                raise DataError(
                    f"{where}: an unpaired label ('completion', 'label') cannot make a pair; "
                    "read it with read_labelled (KTO)"
                )
            pairs += _record_pairs(record, where, shape, drops)
        except DataError as e:
            _skip_or_raise(e, where, skips)
            skipped += 1
    report = {
        "records": records,
        "pairs": len(pairs),
        "dropped_identical": drops.identical,
        "dropped_mismatched_prompt": drops.mismatched,
        "dropped_where": drops.where,
        "skipped": skipped,
    }
    return pairs, report


# ---- unpaired labels ------------------------------------------------------------------------
def _label(record: dict, where: str) -> Labelled:
    (completion,) = _strings(record, where, "completion")
    label = record.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true or false, not {label!r}")
    return Labelled(context_messages(record, where), completion, label, where)


def _ranking_labels(record: dict, where: str, drops: _Drops) -> tuple[list[Labelled], int]:
    """Top K//2 responses desirable, bottom K//2 undesirable; and how many middle responses
    were dropped (1 for odd K). A text on both sides (repeated responses) is dropped there."""
    responses, ranking = _ranking(record, where)
    messages = context_messages(record, where)
    half = len(ranking) // 2
    top = [responses[i] for i in ranking[:half]]
    bottom = [responses[i] for i in ranking[len(ranking) - half :]]
    both = {t.strip() for t in top} & {t.strip() for t in bottom}
    labels = []
    for texts, desirable in ((top, True), (bottom, False)):
        for text in texts:
            if text.strip() in both:
                drops.add("identical", where)
            else:
                labels.append(Labelled(messages, text, desirable, where))
    return labels, len(ranking) - 2 * half


def _record_labels(record: dict, where: str, drops: _Drops) -> tuple[list[Labelled], int]:
    """The labels of one record of any format, and how many middle responses it dropped."""
    shape = _shape(record, where)
    if shape == "labelled":
        return [_label(record, where)], 0
    if shape == "ranking":
        return _ranking_labels(record, where, drops)
    labels = []
    for pair in _record_pairs(record, where, shape, drops):
        labels.append(Labelled(pair.messages, pair.chosen, True, where))
        labels.append(Labelled(pair.messages, pair.rejected, False, where))
    return labels, 0


def read_labelled(path: str | Path, skips: SkipReport | None = None) -> tuple[list[Labelled], dict]:
    """Unpaired labels for KTO, converting pair, HH-RLHF and ranking records (see the module
    docstring), and a report: {"records", "labelled", "desirable", "undesirable",
    "dropped_identical", "dropped_mismatched_prompt", "dropped_middle", "dropped_where",
    "skipped"}. A malformed record raises, or with `skips` is added there and counted."""
    labels: list[Labelled] = []
    drops = _Drops()
    records = middle = skipped = 0
    for where, record in read_records(path, skips):
        records += 1
        try:
            got, dropped = _record_labels(record, where, drops)
        except DataError as e:
            _skip_or_raise(e, where, skips)
            skipped += 1
            continue
        labels += got
        middle += dropped
    desirable = sum(label.desirable for label in labels)
    report = {
        "records": records,
        "labelled": len(labels),
        "desirable": desirable,
        "undesirable": len(labels) - desirable,
        "dropped_identical": drops.identical,
        "dropped_mismatched_prompt": drops.mismatched,
        "dropped_middle": middle,
        "dropped_where": drops.where,
        "skipped": skipped,
    }
    return labels, report


def encode_completion(
    tokenizer: Tokenizer, messages: list[dict], completion: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Inputs and next-token targets of a completion as the assistant's reply to `messages`:
    targets are -100 except on the reply and its end token, whose summed log-probability
    the preference losses compare. A conversation too long loses its oldest tokens (the
    reply itself is kept whole while it fits)."""
    ids, mask = tokenizer.render_chat([*messages, {"role": "assistant", "content": completion}])
    targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1][-max_len:], targets[-max_len:]


def collate_completions(
    rows: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs (B, T) and targets (B, T), padding ignored."""
    width = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(targets)] = torch.tensor(targets)
    return x, y


def data_figures(report: dict) -> dict:
    """A reader's report as summary figures: the file's records and what was dropped or
    skipped, named `data_*` so that they do not clash with what a stage trained on."""
    return {f"data_{k}": v for k, v in report.items() if k != "dropped_where"}
