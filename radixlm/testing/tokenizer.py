"""A byte-level BPE tokenizer trained locally, in well under a second, on a corpus generated in code.

Why train one instead of shipping a file: the test models must be written with no downloads, and a
tokenizer trained here from a seeded corpus is byte-for-byte reproducible, small, and exercises what
real ones do: byte-level BPE (any byte sequence encodes, no UNK), multi-byte UTF-8 characters that
are sometimes one token and sometimes split across tokens (so incremental detokenization must hold
back partial characters), ChatML special tokens, and a Jinja chat template.

The tokenizer does not depend on the model seed: every model folder of a size shares it.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Special tokens get the first ids, in this order (the BPE trainer puts them first).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2

# Like Qwen2.5-Instruct: no BOS is added to prompts, the chat turn ends with <|im_end|> (the EOS),
# and <|endoftext|> doubles as pad and BOS id (configs want a BOS id; nothing prepends it).
BOS_TOKEN = ENDOFTEXT
EOS_TOKEN = IM_END
PAD_TOKEN = ENDOFTEXT

# The BPE vocabulary the trainer is asked for. The corpus is rich enough that it always gets there;
# if a future `tokenizers` merged differently and stopped short, filler tokens pad it back up so
# that the tiny model's vocab_size never changes.
BPE_VOCAB_SIZE = 2048

# ChatML, as Qwen2.5 renders it (without its tool-calling branches or default system prompt).
# `content` may be a string or an OpenAI-style list of parts; only text parts are rendered.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_WORDS = """
the of and to in is was for on that with as by at from it be this are or an which have has not but
had they his her one all were we their been more when there can who will would about into than time
other some what so out up only them its also these then two may first any new like our over such after
most years where through between many see well back three way even because each under much before
good people world great work state life still here long day again know little made part place right
small take large found year high old think every last house write same another home place never city
water light night story point river music paper field color money power market system program question
number family friend school garden window table letter morning evening summer winter spring autumn
green blue red yellow white black purple orange silver golden bright dark quiet loud warm cold quick
slow happy simple strong gentle careful clever brave honest curious patient lucky famous modern ancient
build carry change choose climb close cook count cross dance draw dream drink drive eat explain fall
fill find finish fly follow forget give grow hear help hold hope jump keep laugh learn leave listen
live look love meet move open paint play pull push reach read remember run say sell send show sing
sit sleep speak stand start stay stop swim talk teach tell travel try turn understand visit wait walk
want wash watch wonder
apple bread butter cheese coffee dinner egg flower forest fruit island lake lemon meadow mountain ocean
orchard pepper planet rabbit rain road salt sand seed sky snow soup star stone sugar sun tea tiger tree
valley village wind wolf cloud candle bridge castle harbor lantern library machine engine kernel cache
token matrix vector tensor signal memory thread socket server client request answer model layer batch
prefix radix queue stream buffer packet router scheduler compiler
quickly slowly carefully happily softly rarely often always sometimes together almost perhaps already
yesterday today tomorrow
""".split()

# Multi-byte characters. The common ones become single tokens; the ones used once are left as byte
# sequences that split a character across tokens, which is what exercises incremental detokenization.
_COMMON_MULTIBYTE = [
    "café",
    "naïve",
    "résumé",
    "über",
    "señor",
    "中文",
    "日本",
    "東京",
    "Привет",
    "🙂",
    "🚀",
    "€",
]
_RARE_MULTIBYTE = ["Ω", "ß", "ø", "ł", "ğ", "ç", "한국어", "ภาษาไทย", "🎉", "🌍", "🦙", "✨", "→", "½", "°C"]
_PUNCT_END = [".", ".", ".", "!", "?", "...", ";", ":"]


def _corpus(num_sentences: int = 6000) -> list[str]:
    """English-like sentences with numbers, punctuation, quotes and some multi-byte text."""
    rng = random.Random(20240601)  # fixed: the tokenizer must be identical for every model seed
    lines: list[str] = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        roll = rng.random()
        if roll < 0.25:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 99999)))
        elif roll < 0.35:
            words.insert(rng.randrange(len(words) + 1), f"{rng.randint(0, 999)}.{rng.randint(0, 99)}")
        elif roll < 0.45:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_COMMON_MULTIBYTE))
        if rng.random() < 0.15:
            i = rng.randrange(len(words))
            words[i] = f'"{words[i]}"'
        if rng.random() < 0.2:
            i = rng.randrange(len(words))
            words[i] = words[i] + ","
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(_PUNCT_END))
    # Each rare character once: below min_frequency, so it is never merged into a single token.
    lines.append(" ".join(_RARE_MULTIBYTE))
    # A little code and chat-looking text, since prompts in tests look like that too.
    lines += ["def f(x):\n    return x * 2\n", "User: hi\nAssistant: hello!\n", "a\tb\n\nc  d"]
    return lines


def _filler(i: int) -> str:
    return f"<|extra_{i}|>"


@functools.lru_cache(maxsize=1)
def _base_tokenizer_json() -> str:
    """The trained tokenizer as tokenizer.json text (cached: training is deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols: any input encodes, no UNK, whatever the corpus held.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if [vocab[t] for t in SPECIAL_TOKENS] != [ENDOFTEXT_ID, IM_START_ID, IM_END_ID]:
        raise RuntimeError(f"special token ids moved: {[vocab[t] for t in SPECIAL_TOKENS]}")
    return _pad_vocab(data, BPE_VOCAB_SIZE)


def _pad_vocab(data: dict, size: int) -> str:
    """Append filler entries to the BPE *model* vocab so every id below `size` is a real token.

    Fillers go into model.vocab, not added_tokens: ~150k added tokens make AutoTokenizer load take
    5+ s (measured), while ~150k plain vocab entries load in ~0.2 s. No merge produces them, so they
    never come out of encode; decode turns them into their literal text (all printable ASCII, which
    byte-level decoding maps to itself). An id outside the vocab would decode to "" and
    convert_ids_to_tokens would give None, which detokenizers tend to trip over.
    """
    vocab = data["model"]["vocab"]
    n = len(vocab)
    for i in range(size - n):
        vocab[_filler(i)] = n + i
    return json.dumps(data, ensure_ascii=False)


def tokenizer_vocab_size() -> int:
    """Number of ids of the tiny tokenizer (what a `tiny` config's vocab_size is set to)."""
    return len(json.loads(_base_tokenizer_json())["model"]["vocab"])


def write_tokenizer(out: str | os.PathLike, *, vocab_size: int, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json so that AutoTokenizer.from_pretrained loads them.

    vocab_size: pad the vocabulary with `<|extra_N|>` fillers up to this many ids, so that every id a
    model with that vocab_size can sample decodes to something (the 0.5b shape has 151936).
    """
    out = pathlib.Path(out)
    text = _base_tokenizer_json()
    base_size = tokenizer_vocab_size()
    if vocab_size < base_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {base_size} ids")
    if vocab_size > base_size:
        text = _pad_vocab(json.loads(text), vocab_size)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    config = {
        # The generic class: it takes tokenizer.json as is. Without it AutoTokenizer would pick the
        # model type's own tokenizer class (LlamaTokenizer, GemmaTokenizer, ...), which in
        # transformers 5 rebuilds its pipeline (prefix spaces, BOS) instead of using ours.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # Otherwise decode(" .") may become "." and text would not round-trip.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
