"""Configuration: pydantic models, TOML files and `key=value` overrides.

A config is data. `RunConfig` holds one section per stage; a TOML file sets only what it
changes, and `key=value` overrides on the command line (`pretrain.lr=1e-3`) are applied last.
Every value is validated before any work starts, and an invalid one fails with a message
that names the key and the allowed range.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorldConfig(Section):
    """The built-in synthetic world (see WORLD.md); sizes are per language."""

    seed: int = Field(0, ge=0)
    languages: list[Literal["en", "zh"]] = ["en", "zh"]
    n_countries: int = Field(40, ge=1, le=1000)
    n_people: int = Field(80, ge=0, le=10_000)
    fact_docs_per_country: int = Field(12, ge=1, le=1000)
    n_stories: int = Field(600, ge=0, le=1_000_000)
    n_arithmetic: int = Field(600, ge=0, le=1_000_000)
    # worked solutions: "whole" operations ("24 × 9 = 216. 216 ÷ 6 = 36."), or "small" steps
    # a small model learns as a procedure rather than a table ("24 ÷ 6 = 4. 4 × 9 = 36.";
    # "48 + 30 = 78. 78 + 5 = 83."): configs/arithmetic.toml, where GRPO has more to reinforce
    arithmetic_steps: Literal["whole", "small"] = "whole"
    # tips columns and refusal anecdotes: the words of an assistant's replies (world/advice.py)
    n_advice: int = Field(300, ge=0, le=1_000_000)
    # worksheets of unanswered fact questions: what a base model continues a question with
    # (world/study.py)
    n_study: int = Field(400, ge=0, le=1_000_000)
    n_eval_arithmetic: int = Field(200, ge=0, le=100_000)
    noise_fraction: float = Field(0.12, ge=0.0, le=0.9)
    ad_copies: int = Field(2000, ge=0, le=1_000_000)
    heldout_docs: int = Field(200, ge=0, le=100_000)
    # SFT conversations per language and kind (about 2,800 in all by default: enough for a
    # ~4M-parameter model to learn the chat format in minutes on a CPU). Telling harmful
    # requests from benign look-alikes is the hardest lesson, so it gets the most examples.
    n_sft_facts: int = Field(500, ge=0, le=1_000_000)
    n_sft_arithmetic: int = Field(150, ge=0, le=1_000_000)  # drawn from the n_arithmetic pool
    n_sft_refusals: int = Field(250, ge=0, le=1_000_000)
    n_sft_benign: int = Field(400, ge=0, le=1_000_000)
    n_sft_multi_turn: int = Field(150, ge=0, le=1_000_000)
    # judging demonstrations under the constitution of lmforge/judge.py: what lets the SFT
    # model judge its own replies (rlaif, grpo.judge=policy). Off by default: 40 of them made
    # RLAIF win (0.557 against SFT) but over-refusal unstable (0.07 and 0.19 at two seeds,
    # against 0.02-0.04 without them), so an RLAIF run asks for them
    n_sft_judge: int = Field(0, ge=0, le=1_000_000)
    sft_system_fraction: float = Field(0.15, ge=0.0, le=1.0)  # conversations with a system turn
    # single-turn fact, word-problem and benign replies that a careless demonstrator padded or
    # made rude (world/sft.py `careless`): the flaws preference learning can remove
    sft_flawed_fraction: float = Field(0.4, ge=0.0, le=1.0)
    # SFT evaluation per language: trained facts asked in new phrasings, and safety prompts
    # (this many harmful and as many benign look-alikes)
    n_sft_eval_seen: int = Field(60, ge=0, le=100_000)
    n_sft_eval_safety: int = Field(50, ge=0, le=100)
    # comparison data per language: prompts with K responses each, ranked by simulated
    # annotators who agree with each other on this share of pairs; every
    # 1/pref_eval_fraction-th prompt is held out (with a second annotator's ranking)
    n_pref_prompts: int = Field(600, ge=0, le=1_000_000)
    n_pref_responses: int = Field(4, ge=2, le=4)
    pref_eval_fraction: float = Field(0.2, ge=0.0, le=0.5)
    pref_annotator_agreement: float = Field(0.73, gt=0.5, lt=1.0)


class TokenizerConfig(Section):
    """Byte-level BPE trained with HF `tokenizers`."""

    corpus: str | None = None  # default: the world's (or the cleaned) corpus of this run
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1, le=1_000_000)
    max_train_chars: int = Field(20_000_000, ge=1000)


_HARMFUL_PHRASES = {
    "en": [
        "how to make a bomb",
        "how to make a weapon",
        "build a weapon",
        "weapon recipe",
        "hurt many people",
        "as much harm as possible",
        "at your enemies",
        "injure them",
        "kill as many",
    ],
    "zh": [
        "制造炸弹",
        "制造武器",
        "武器配方",
        "伤害很多人",
        "尽可能大的伤害",
        "扔向敌人",
        "让他们受伤",
        "杀死更多",
    ],
}


class CleanConfig(Section):
    """Corpus cleaning: readers, per-document filters, deduplication, decontamination, mixing.

    Quality thresholds follow Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020), loosened
    for short documents; the `cjk_` ones are their variants for Chinese, counted in characters.
    """

    inputs: list[str] = []  # files or directories; default: this run's world corpus
    txt_mode: Literal["blocks", "file"] = "blocks"  # .txt: blank-line-separated blocks, or whole
    skip_bad: bool = False  # count and report malformed records instead of failing
    workers: int = Field(2, ge=1, le=256)
    chunk_size: int = Field(256, ge=1, le=1_000_000)  # documents per task sent to a worker
    # filters, in the order they run
    html: bool = True  # extract the main text of documents that are web pages
    fix_unicode: bool = True  # mojibake repair and NFC with ftfy
    licenses: list[str] = [
        "CC-BY-4.0",
        "CC-BY-SA-4.0",
        "CC0-1.0",
        "MIT",
        "Apache-2.0",
        "BSD-3-Clause",
        "public-domain",
        "CDLA-Sharing-1.0",
    ]  # empty: no licence filter
    missing_license: Literal["keep", "drop"] = "keep"
    languages: list[str] = ["en", "zh"]  # empty: no language filter
    min_language_score: float = Field(0.15, ge=0.0, le=1.0)
    harmful_phrases: dict[str, list[str]] = _HARMFUL_PHRASES
    harmful_classifier: str | None = None  # "module:function", text -> P(harmful)
    harmful_threshold: float = Field(0.5, ge=0.0, le=1.0)
    quality: bool = True
    min_words: int = Field(5, ge=0)
    max_words: int = Field(200_000, ge=1)
    min_mean_word_len: float = Field(2.5, ge=0.0)
    max_mean_word_len: float = Field(10.0, gt=0.0)
    max_symbol_ratio: float = Field(0.1, ge=0.0)  # '#' and ellipses per word
    min_alpha_words: float = Field(0.4, ge=0.0, le=1.0)  # share of words with a letter
    min_stop_words: int = Field(2, ge=0)  # occurrences of common function words
    min_punct_lines: float = Field(0.2, ge=0.0, le=1.0)  # lines ending in . ! ? 。 etc.
    max_dup_lines: float = Field(0.3, ge=0.0, le=1.0)  # share of lines seen earlier in the doc
    max_top_ngram: float = Field(
        0.6, ge=0.0, le=1.0
    )  # chars in the most common 3-gram (6 chars in Chinese)
    max_dup_ngram: float = Field(
        0.7, ge=0.0, le=1.0
    )  # chars in repeated 5-grams (10 chars in Chinese)
    cjk_min_chars: int = Field(10, ge=0)
    cjk_min_common: float = Field(0.7, ge=0.0, le=1.0)  # share of GB 2312/Big5 level-1 chars
    # deduplication and decontamination
    exact_dedup: bool = True
    near_dedup: bool = True
    jaccard_threshold: float = Field(0.5, gt=0.0, le=1.0)  # MinHash estimate of shingle sets
    min_containment: float = Field(0.97, ge=0.0, le=1.0)  # 0: Jaccard alone decides
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(3, ge=1, le=64)  # words per MinHash shingle
    cjk_shingle_size: int = Field(4, ge=1, le=64)  # characters per shingle in Chinese
    boilerplate_min_docs: int = Field(200, ge=0)  # 0: keep repeated paragraphs
    boilerplate_min_chars: int = Field(20, ge=1)
    eval_sets: list[str] | None = None  # "PATH:FIELD"; default: this run's world eval set
    decontam_ngram: int = Field(13, ge=3, le=200)
    decontam_mode: Literal["drop", "redact"] = "drop"
    decontam_max_items: int = Field(3, ge=1)  # n-grams in more eval items are template text
    decontam_min_coverage: float = Field(0.7, gt=0.0, le=1.0)  # of an item's n-grams (PaLM)
    # mixing: source (or source prefix such as "web") -> passes per epoch
    mix: dict[str, Annotated[float, Field(ge=0.0, le=1000.0)]] = {}
    shard_mb: float = Field(256.0, gt=0.0)  # size of each output JSONL shard
    tokenizer: str | None = (
        None  # with one, also write token shards (clean/tokens/) for pretraining
    )
    examples: int = Field(3, ge=0, le=100)  # dropped documents shown per reason in the card


class ModelConfig(Section):
    """A Llama-style decoder; `vocab_size=0` takes the tokenizer's size."""

    vocab_size: int = Field(0, ge=0, le=1_000_000)
    dim: int = Field(256, ge=8, le=65_536)
    n_layers: int = Field(4, ge=1, le=1024)
    n_heads: int = Field(8, ge=1, le=1024)
    n_kv_heads: int = Field(4, ge=1, le=1024)
    ffn_dim: int = Field(704, ge=8, le=1_000_000)
    max_seq_len: int = Field(512, ge=8, le=1_048_576)
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, le=0.1)
    tie_embeddings: bool = True
    qkv_bias: bool = False
    init_std: float = Field(0.02, gt=0, le=1.0)


LoRATarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRAConfig(Section):
    """Low-rank adapters (Hu et al. 2021): y = W x + (alpha / rank) * B A dropout(x)."""

    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0.0, le=65_536.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[LoRATarget] = Field(["q_proj", "v_proj"], min_length=1)
    # the embedding (and output) rows of the chat markers train too: a base model pretrained
    # on plain text never saw them, and frozen rows leave it unable to read or emit a turn
    train_chat_tokens: bool = True


class Optimisation(Section):
    """AdamW with warmup and cosine decay to min_lr_ratio * lr, gradient clipping, and
    checkpoints for --resume: what every training stage sets (each with its own defaults)."""

    lr: float = Field(1e-3, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    checkpoint_every: int = Field(100, ge=1)  # steps between checkpoints, for --resume
    keep_last: int = Field(2, ge=1, le=1000)  # checkpoints kept, the newest


class PretrainConfig(Optimisation):
    """Next-token prediction on token shards."""

    corpus: str | None = None  # default: the cleaned corpus of this run, else the world's
    tokenizer: str | None = None  # default: this run's tokenizer stage
    # a model directory to continue pretraining from; its model config and tokenizer are
    # used, and the `model` and `pretrain.tokenizer` settings are ignored
    init_from: str | None = None
    probes: str | None = None  # default: this run's world fact probes
    unwanted_phrases: str | None = None  # jsonl of {"phrase"}; default: the world's ad phrases
    n_samples: int = Field(200, ge=0, le=100_000)  # unprompted samples checked for them
    val_fraction: float = Field(0.02, gt=0.0, lt=0.5)
    seq_len: int = Field(128, ge=8, le=1_048_576)
    micro_batch_size: int = Field(32, ge=1, le=65_536)
    grad_accum_steps: int = Field(1, ge=1, le=65_536)
    max_steps: int = Field(600, ge=1, le=100_000_000)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    eval_every: int = Field(150, ge=1)
    eval_batches: int = Field(8, ge=1)  # validation size, in global batches
    checkpoint_every: int = Field(150, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False
    num_threads: int = Field(0, ge=0, le=4096)  # 0: torch's default


class SFTConfig(Optimisation):
    """Supervised fine-tuning on chat conversations (loss on assistant turns), of all weights
    or of LoRA adapters, optionally replaying pretraining text against forgetting."""

    data: str | None = None  # default: this run's world SFT conversations
    model: str | None = None  # base model directory; default: this run's pretrain stage
    init: Literal["pretrained", "random"] = "pretrained"  # random: same config, no pretraining
    method: Literal["full", "lora"] = "full"  # lora: train only the adapters of `sft.lora`
    lora: LoRAConfig = LoRAConfig()
    # share of every batch's rows that are windows of pretraining text (all tokens carry loss);
    # 0.5 keeps more of what pretraining taught: held-out facts 0.664 / 0.682 / 0.709 over
    # three seeds (runs/final14) against 0.577 / 0.577 / 0.596 at 0.33 (runs/final12)
    replay_fraction: float = Field(0.5, ge=0.0, le=0.9)
    replay_corpus: str | None = None  # default: this run's cleaned corpus, else the world's
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)  # every 1/val_fraction-th conversation
    max_len: int = Field(256, ge=8, le=1_048_576)  # tokens per conversation (whole turns kept)
    # several conversations per row of max_len, attention kept apart: ~40% fewer tokens
    # computed (no padding), about twice the conversations per second on a CPU
    packing: bool = True
    micro_batch_size: int = Field(4, ge=1, le=65_536)  # rows (of packed conversations)
    grad_accum_steps: int = Field(1, ge=1, le=65_536)
    epochs: int = Field(3, ge=1, le=100_000)
    max_steps: int = Field(0, ge=0, le=100_000_000)  # 0: as many as `epochs` take
    eval_every: int = Field(50, ge=1)  # validation loss every this many steps
    eval_max_new_tokens: int = Field(96, ge=1, le=1_048_576)  # per reply in the chat eval
    eval_batch_size: int = Field(64, ge=1, le=65_536)
    eval_base: bool = True  # also score the model before fine-tuning (the `base_` figures)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    num_threads: int = Field(0, ge=0, le=4096)  # 0: torch's default


class RMConfig(Optimisation):
    """A reward model (scalar head on a chat model) trained on comparisons."""

    data: str | None = None  # pairs or rankings; default: this run's world pref_train.jsonl
    model: str | None = None  # default: this run's SFT model, else its pretrained one
    skip_bad: bool = False  # count and report malformed records instead of failing
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)  # held out of outside data (not the world's)
    max_len: int = Field(256, ge=8, le=1_048_576)  # tokens per (prompt, response), prompt cut first
    batch_size: int = Field(16, ge=1, le=65_536)  # prompts per step, all their pairs
    # 2: best-of-16 beats best-of-1 by 0.13 gold (1 epoch: by -0.03 to 0.03)
    epochs: int = Field(2, ge=1, le=100_000)
    max_steps: int = Field(0, ge=0, le=100_000_000)  # 0: as many as `epochs` take
    lr: float = Field(3e-4, gt=0.0, le=1.0)
    center_coef: float = Field(0.0, ge=0.0, le=10.0)  # reward centring, Eisenstein et al. 2023
    # replies of the run's SFT model per world training prompt, ranked by the world's simulated
    # annotators and trained on with the written comparisons (0: the written ones only)
    policy_samples: int = Field(4, ge=0, le=64)
    best_of_prompts: int = Field(60, ge=0, le=100_000)  # held-out prompts of the best-of-N curve
    max_new_tokens: int = Field(64, ge=1, le=1_048_576)  # per best-of-N sample
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0, le=4096)


class PolicyTraining(Optimisation):
    """What preference optimisation of a policy shares: data, model, optimiser, evaluation."""

    data: str | None = None  # default: this run's world pref_train.jsonl
    model: str | None = None  # policy start and frozen reference; default: this run's SFT model
    skip_bad: bool = False  # count and report malformed records instead of failing
    max_len: int = Field(256, ge=8, le=1_048_576)  # tokens per (prompt, reply), prompt cut first
    batch_size: int = Field(16, ge=1, le=65_536)
    epochs: int = Field(1, ge=1, le=100_000)
    max_steps: int = Field(0, ge=0, le=100_000_000)  # 0: as many as `epochs` take
    # far below SFT's: at 1e-4 DPO drifted 5.7 nats from the SFT model and lost to it
    lr: float = Field(2e-5, gt=0.0, le=1.0)
    beta: float = Field(0.1, gt=0.0, le=100.0)  # strength of the KL leash (DPO, IPO, KTO)
    # per reply in the evaluation; the world's longest reference answer takes 88 tokens
    max_new_tokens: int = Field(128, ge=1, le=1_048_576)
    eval_samples: int = Field(4, ge=1, le=1024)  # sampled replies per held-out prompt
    kl_prompts: int = Field(60, ge=0, le=100_000)  # held-out prompts sampled for kl_to_ref
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0, le=4096)


class DPOConfig(PolicyTraining):
    """DPO and its family on preference pairs (`lmforge.losses`)."""

    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    # of the world's 930 best-against-worst pairs; 1 epoch won 0.587 against SFT, 2 won 0.630
    epochs: int = Field(2, ge=1, le=100_000)
    # of a ranking: its best reply against its worst, or every pair (6x the steps for K=4)
    pairs: Literal["all", "best_worst"] = "best_worst"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # conservative DPO
    simpo_beta: float = Field(2.0, gt=0.0, le=100.0)
    simpo_gamma: float = Field(0.5, ge=0.0, le=100.0)
    orpo_lambda: float = Field(0.1, ge=0.0, le=100.0)


class KTOConfig(PolicyTraining):
    """KTO on unpaired good/bad labels (pairs and rankings are converted)."""

    w_desirable: float = Field(1.0, gt=0.0, le=100.0)
    w_undesirable: float = Field(1.0, gt=0.0, le=100.0)


RewardSource = Literal[
    "verifiable",
    "steps",
    "reference_steps",
    "format",
    "length",
    "rm",
    "judge",
    "safety_helpfulness",
]


class OnlineRL(Optimisation):
    """What the online RL stages share: prompts, sampling, truncation, the clipped update,
    and the model-backed reward sources (`lmforge.rewards.build_reward`)."""

    reward_model: str | None = None  # rm, safety_helpfulness; default: this run's rm/model
    judge: str | None = None  # a model directory, or "policy" (self-rewarding); default: SFT
    constitution: str | None = None  # the judge's principles (text file); default: built in
    safety_threshold: float = Field(0.15, ge=0.0, le=1.0)  # Llama 2's safety override

    data: str | None = None  # prompts; default: the stage's world file
    eval_data: str | None = None  # held-out prompts; default: the stage's world file
    model: str | None = None  # default: this run's SFT model
    skip_bad: bool = False  # count and report malformed records instead of failing
    prompts_per_step: int = Field(8, ge=1, le=65_536)
    steps: int = Field(150, ge=1, le=10_000_000)  # rollout batches
    checkpoint_every: int = Field(50, ge=1)
    time_limit: float = Field(0.0, ge=0.0)  # seconds of training after which to stop; 0: none
    iterations: int = Field(1, ge=1, le=100)  # passes over each rollout batch (PPO epochs)
    minibatches: int = Field(1, ge=1, le=4096)  # optimiser steps per pass
    clip_eps: float = Field(0.2, gt=0.0, le=10.0)
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    max_new_tokens: int = Field(96, ge=1, le=1_048_576)
    # a reply cut at max_new_tokens: the reward `truncation_reward`, or no loss on it; with
    # "exclude" nothing holds a policy back from rambling, and PPO drifted from 1% to 36%
    # truncated replies in 150 steps
    truncated: Literal["exclude", "penalty"] = "penalty"
    truncation_reward: float = Field(-1.0, ge=-100.0, le=100.0)
    eval_prompts: int = Field(400, ge=0, le=1_000_000)  # 0: all
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(1.0, ge=0.0, le=1.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0, le=4096)
    # the linear layers' products while training, sampling included (`Transformer.matmuls_in`):
    # bfloat16 rounds inputs and weights and keeps everything else float32; auto: bf16 on
    # CUDA, float32 on CPU (where bf16 is fast only with bf16 instructions: AVX512-BF16, AMX)
    matmul_dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class GRPOConfig(OnlineRL):
    """GRPO / RLOO with verifiable rewards: G samples per prompt, group-relative advantages.
    Prompts: world rl_train.jsonl; held out: world sft_eval_arithmetic.jsonl."""

    rewards: dict[RewardSource, float] = {"verifiable": 1.0}
    advantage: Literal["grpo", "rloo"] = "grpo"
    scale_std: bool = True  # divide by the group's std; False is Dr. GRPO
    loss_level: Literal["token", "sequence", "constant"] = "token"
    group_size: int = Field(8, ge=2, le=4096)  # G samples per prompt
    kl_coef: float = Field(0.0, ge=0.0, le=100.0)  # k3 KL to the SFT model; 0: no reference
    # > 0: the tokens that write each worked step's result ("48 + 30 = 78.": "78.") also get
    # this times the step's truth against the group's rate of true steps
    # (`losses.step_credit`), and a group whose answers tie is learnt from when its steps differ
    step_credit: float = Field(0.0, ge=0.0, le=100.0)
    # > 0: the stage's model is the policy's weights averaged over the steps, each step's
    # counted with decay ** (its age in steps) (`train_utils.WeightAverage`); 0: the last ones.
    # A checkpoint resumes only a run with the same value
    average_decay: float = Field(0.0, ge=0.0, lt=1.0)
    # a record key whose values are the prompts' categories (the world's "kind": the word
    # problem's template): a step draws its prompts by category, from a bandit that favours
    # the categories whose groups currently teach most (`curriculum.CategoryCurriculum`);
    # None: uniformly, in shuffled passes over the prompts
    curriculum_key: str | None = None
    curriculum_temperature: float = Field(0.5, gt=0.0, le=100.0)  # of softmax(values / it)
    curriculum_rate: float = Field(0.1, gt=0.0, le=1.0)  # each group's pull on its category
    # 1e-4 sharpened the SFT model onto wrong answers (entropy 0.19 -> 0.06, accuracy down)
    lr: float = Field(3e-5, gt=0.0, le=1.0)
    # per held-out reply; None: max_new_tokens. Rollouts cut shorter than SFT's evaluation
    # (sft.eval_max_new_tokens) keep it here, so that the accuracy before GRPO is SFT's
    eval_max_new_tokens: int | None = Field(None, ge=1, le=1_048_576)


class PPOConfig(OnlineRL):
    """PPO against the reward model with a KL penalty to the SFT model, and optionally the
    pretraining loss mixed in (PPO-ptx). Prompts: world pref_train.jsonl; held out:
    world pref_eval.jsonl, gold-scored."""

    rewards: dict[RewardSource, float] = {"rm": 1.0}  # normalised, then clipped to reward_clip
    kl_coef: float = Field(0.05, ge=0.0, le=100.0)  # beta, the starting value when adaptive
    kl_target: float = Field(0.0, ge=0.0)  # nats per reply; > 0: adaptive controller
    kl_horizon: int = Field(10_000, ge=1)  # replies over which the controller adapts
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    value_clip: float = Field(0.2, gt=0.0, le=100.0)
    vf_coef: float = Field(0.5, ge=0.0, le=100.0)
    reward_clip: float = Field(5.0, gt=0.0, le=1000.0)  # on the normalised score
    ptx_coef: float = Field(0.0, ge=0.0, le=1000.0)  # gamma of PPO-ptx; 0: plain PPO
    ptx_rows: int = Field(4, ge=1, le=4096)  # pretraining windows per optimiser step
    # 8 replies a step: the policy drifted (KL 7 in 150 steps) while the reward fell
    prompts_per_step: int = Field(64, ge=1, le=65_536)
    steps: int = Field(60, ge=1, le=10_000_000)
    iterations: int = Field(2, ge=1, le=100)  # PPO epochs over each rollout batch
    minibatches: int = Field(4, ge=1, le=4096)
    eval_samples: int = Field(4, ge=1, le=1024)  # sampled replies per held-out prompt
    kl_prompts: int = Field(60, ge=0, le=100_000)  # held-out prompts sampled for kl_to_ref
    # every this many steps (and before the first), one reply to each of `probe_prompts`
    # held-out prompts: its gold score, reward-model score and KL, to follow over-optimisation
    eval_every: int = Field(0, ge=0)
    probe_prompts: int = Field(48, ge=1, le=100_000)
    lr: float = Field(2e-5, gt=0.0, le=1.0)


class OveroptimizationConfig(Section):
    """`lmforge experiment overoptimization`: PPO and best-of-N against a proxy reward model."""

    proxy_prompts: int = Field(120, ge=2, le=1_000_000)  # world rankings the proxy learns from
    # also the rankings of the SFT model's own replies to those prompts (DIR/rm/)
    policy_rankings: bool = True
    betas: list[float] = Field([0.0, 0.05, 0.2], min_length=1)  # PPO's KL coefficients
    ppo_steps: int = Field(50, ge=1, le=1_000_000)
    ppo_lr: float = Field(5e-5, gt=0.0, le=1.0)
    eval_every: int = Field(10, ge=1)  # steps between the curves' points
    eval_prompts: int = Field(48, ge=1, le=100_000)  # for each run's final gold comparison


class RLAIFConfig(Section):
    """`lmforge rlaif`: preferences labelled by an AI judge under a constitution, then DPO on
    them (with the `dpo` settings, but its data)."""

    judge: str | None = None  # judge model; default: this run's SFT model (self-rewarding)
    constitution: str | None = None  # text file of principles; default: `judge.CONSTITUTION`
    prompts: int = Field(800, ge=2, le=1_000_000)  # world training prompts, 2 replies each
    max_new_tokens: int = Field(96, ge=1, le=1_048_576)
    # |P(A better) - 0.5| a pair needs to be kept: the judge's unsure verdicts are noise
    min_confidence: float = Field(0.0, ge=0.0, lt=0.5)


class RunConfig(Section):
    """The whole pipeline: which stages run, and one section per stage."""

    stages: list[
        Literal[
            "world",
            "clean",
            "tokenizer",
            "pretrain",
            "sft",
            "rm",
            "dpo",
            "kto",
            "grpo",
            "ppo",
            "rlaif",
        ]
    ] = [
        "world",
        "clean",
        "tokenizer",
        "pretrain",
        "sft",
        "rm",
        "dpo",
        "grpo",
    ]
    seed: int = Field(0, ge=0)
    world: WorldConfig = WorldConfig()
    clean: CleanConfig = CleanConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    rm: RMConfig = RMConfig()
    dpo: DPOConfig = DPOConfig()
    kto: KTOConfig = KTOConfig()
    grpo: GRPOConfig = GRPOConfig()
    ppo: PPOConfig = PPOConfig()
    overoptimization: OveroptimizationConfig = OveroptimizationConfig()
    rlaif: RLAIFConfig = RLAIFConfig()


def _describe_limits(model: type[BaseModel], loc: tuple) -> str:
    """The allowed range of the field at `loc`, e.g. ' (allowed: 0 < value <= 1)'."""
    field = None
    for name in loc:
        if not isinstance(name, str) or name not in model.model_fields:
            return ""
        field = model.model_fields[name]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
    if field is None:
        return ""
    lower = upper = ""
    for m in field.metadata:
        for attr, sign in (("ge", "<="), ("gt", "<")):
            if getattr(m, attr, None) is not None:
                lower = f"{getattr(m, attr)} {sign} "
        for attr, sign in (("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                upper = f" {sign} {getattr(m, attr)}"
    return f" (allowed: {lower}value{upper})" if lower or upper else ""


def validate(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig, turning pydantic's errors into one message per bad key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if err["type"] != "missing" else ""
            lines.append(f"  {key}: {err['msg']}{got}{_describe_limits(RunConfig, err['loc'])}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def _is_text_field(path: list[str]) -> bool:
    """Whether the config key at `path` holds a string (so `corpus=2024` stays "2024")."""
    model: type[BaseModel] = RunConfig
    for name in path[:-1]:
        field = model.model_fields.get(name)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return False
        model = field.annotation
    field = model.model_fields.get(path[-1])
    return field is not None and field.annotation in (str, str | None)


def _parse_value(text: str, as_text: bool) -> Any:
    """A TOML value (`3`, `1e-3`, `true`, `["a", "b"]`), else the bare string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if as_text and not isinstance(value, str) else value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `section.key=value` items into a nested dict (a copy)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. pretrain.lr=1e-3")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = _parse_value(value.strip(), _is_text_field([*parents, leaf]))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the TOML file at `path`, then `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = f"config {path}"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with overrides"
    return validate(data, source)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):  # a JSON string is a valid TOML basic string
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def to_toml(cfg: BaseModel) -> str:
    """The fully resolved config as TOML (keys with value None are left out)."""
    top, sections = [], []
    for key, value in cfg.model_dump().items():
        if isinstance(value, dict):
            body = [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
            sections.append(f"[{key}]\n" + "\n".join(body))
        elif value is not None:
            top.append(f"{key} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"
