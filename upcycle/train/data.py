"""Training examples: records -> token ids with a loss mask -> packed or padded blocks.

- text records: every token is trained on;
- prompt/response and chat records: only the response (assistant) tokens are, including the
  end-of-turn token. With a chat template in the tokenizer the conversation is rendered with it
  (a prompt/response pair becomes a user and an assistant turn); without one, prompt and
  response are joined by a newline and chats become ``role: content`` lines.

Spans are found on the rendered string (each assistant turn starts where the template's
rendering of the conversation up to that turn, with the generation prompt, ends), then mapped
to tokens through the tokenizer's offsets, so tokenization never has to be split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from upcycle.errors import InputError, OptionError

IGNORE = -100


@dataclass
class Blocks:
    """Fixed-length training blocks: input ids, labels (IGNORE where not trained), attention."""

    input_ids: torch.Tensor  # (N, L) long
    labels: torch.Tensor  # (N, L) long
    attention_mask: torch.Tensor  # (N, L) long

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def trained_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def _render(record: dict, tokenizer) -> tuple[str, list[tuple[int, int]] | None]:
    """The record's text and the character spans trained on (None: all of it)."""
    if "text" in record:
        return record["text"], None
    messages = record.get("messages") or [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = (
                tokenizer.apply_chat_template(
                    messages[:i], tokenize=False, add_generation_prompt=True
                )
                if i
                else ""
            )
            end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not text.startswith(end) or not end.startswith(start):
                raise InputError(
                    "the tokenizer's chat template does not render conversations prefix by "
                    "prefix, so assistant turns cannot be located; use prompt/response or text records"
                )
            spans.append((len(start), len(end)))
        return text, spans
    if "messages" not in record:
        prompt = record["prompt"] + "\n"
        return prompt + record["response"], [(len(prompt), len(prompt) + len(record["response"]))]
    text, spans = "", []
    for m in messages:
        line = f"{m['role']}: "
        if m["role"] == "assistant":
            spans.append((len(text) + len(line), len(text) + len(line) + len(m["content"])))
        text += line + m["content"] + "\n"
    return text.rstrip("\n"), spans


def encode(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of one record (plus EOS for plain texts) and which of them are trained on."""
    text, spans = _render(record, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = list(enc["input_ids"])
    if spans is None:
        mask = [True] * len(ids)
    else:
        mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    chat = "text" not in record and getattr(tokenizer, "chat_template", None)
    eos = tokenizer.eos_token_id
    if not chat and eos is not None:  # templates end turns themselves
        ids.append(eos)
        mask.append(spans is None or bool(mask and mask[-1]))
    return ids, mask


def split_records(records: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic train/held-out split by a hash of each record's content."""
    if not 0.0 <= eval_fraction < 1.0:
        raise OptionError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return records, []
    train, held = [], []
    for r in records:
        digest = hashlib.blake2b(repr(sorted(r.items())).encode(), digest_size=8).digest()
        (
            held if int.from_bytes(digest, "little") % 10000 < eval_fraction * 10000 else train
        ).append(r)
    if not train:
        raise InputError("the held-out split took every record; lower --eval-fraction")
    return train, held


def build_blocks(records: list[dict], tokenizer, seq_len: int, packing: bool = True) -> Blocks:
    """Pack all records into a stream cut into seq_len blocks, or pad/truncate each record."""
    if seq_len < 2:
        raise OptionError(f"--seq-len must be at least 2, got {seq_len}")
    encoded = [encode(r, tokenizer) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if packing:
        ids = [t for e, _ in encoded for t in e]
        mask = [m for _, ms in encoded for m in ms]
        n = len(ids) // seq_len
        if n == 0:
            raise InputError(f"the data has {len(ids)} tokens, fewer than one block of {seq_len}")
        ids_t = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
        mask_t = torch.tensor(mask[: n * seq_len]).view(n, seq_len)
        attention = torch.ones_like(ids_t)
    else:
        rows = [(e[:seq_len], m[:seq_len]) for e, m in encoded if e]
        if not rows:
            raise InputError("no record has any token")
        ids_t = torch.full((len(rows), seq_len), pad or 0, dtype=torch.long)
        mask_t = torch.zeros((len(rows), seq_len), dtype=torch.bool)
        attention = torch.zeros((len(rows), seq_len), dtype=torch.long)
        for i, (e, m) in enumerate(rows):
            ids_t[i, : len(e)] = torch.tensor(e)
            mask_t[i, : len(m)] = torch.tensor(m)
            attention[i, : len(e)] = 1
    labels = torch.where(mask_t, ids_t, torch.full_like(ids_t, IGNORE))
    blocks = Blocks(ids_t, labels, attention)
    if blocks.trained_tokens == 0:
        raise InputError("no token of the data is trained on (responses are empty?)")
    return blocks
