"""What a latent-reasoning student trains on, from a cache made with --rkv-slots: per sample the
question (the prompt, in the student's tokens, then begin-of-thought), the written chain of
thought (for the optional cross-entropy that keeps the student's teacher mode), end-of-thought
and the final answer line, and the teacher's compressed chain-of-thought K/V (R-KV slots)."""

from __future__ import annotations

import torch

from kava_common import KavaError
from kava_common.rope import inverse_frequencies, unrotate

BOT, EOT = "<|begin_of_thought|>", "<|end_of_thought|>"


def add_thought_tokens(tok, model=None, log=None) -> tuple[int, int]:
    """The begin- and end-of-thought tokens, added to the student's tokenizer as special tokens
    where it lacks them (saved with it), and rows for them in the model's input embedding (and a
    tied head), said to `log`; returns their ids."""
    from transformers.utils import logging as hf_logging
    missing = [t for t in (BOT, EOT) if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    resized = model is not None and model.get_input_embeddings().num_embeddings < len(tok)
    if resized:
        was = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()       # its notice of mean resizing: said below in kava's words
        try:
            model.resize_token_embeddings(len(tok))
        finally:
            hf_logging.set_verbosity(was)
    bot, eot = tok.convert_tokens_to_ids([BOT, EOT])
    if missing and log:
        log(f"added {' and '.join(missing)} to the student's tokenizer (ids {bot}, {eot}; saved with it), "
            + ("new embedding rows drawn from the mean and covariance of the others" if resized else
               "on embedding rows that no token used"))
    return bot, eot


def check_slots(cache, steps: int | None = None) -> None:
    """A latent run takes M steps against M slots: KavaError naming the cache where it has no
    R-KV slots, or (`steps` given) another number of them."""
    have = cache.meta.rkv_slots
    if not have:
        raise KavaError(f"{cache.path}: made without --rkv-slots; a latent student learns from the teacher's "
                        "compressed chain-of-thought K/V: run stage 1 with --rkv-slots M")
    if steps is not None and have != steps:
        raise KavaError(f"{cache.path}: holds {have} R-KV slots per layer and KV head, and --latent {steps} takes "
                        f"{steps} latent steps against as many: give --latent {have}, or re-select {steps} slots "
                        f"from the cache without the teacher (python -m kava_common.recompress {cache.path} "
                        f"--rkv-slots {steps})")


class LatentData(torch.utils.data.Dataset):
    """The samples of one cache with R-KV slots, tokenized for the student `tok`."""

    def __init__(self, cache, tok, bot_id: int, eot_id: int, keys: str = "post_rope"):
        check_slots(cache)
        if tok.eos_token_id is None:
            raise KavaError("the student's tokenizer has no EOS token to end the answer with")
        self.cache, self.tok, self.bot, self.eot = cache, tok, bot_id, eot_id
        self.hidden = bool(cache.meta.store_hidden)
        self.rope = None
        if keys == "pre_rope":                 # the slots' keys un-rotated from their positions
            self.rope = cache.meta.rope
            try:
                inverse_frequencies(self.rope, cache.meta.head_dim)
            except ValueError as e:
                raise KavaError(f"{cache.path}: latent_keys pre_rope: {e}; use latent_keys post_rope") from None

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        s = self.cache.text(i)
        text, (r0, r1) = s["text"], s["char_segments"]["reasoning"]
        enc = self.tok
        question = enc(text[:r0].rstrip(" "), add_special_tokens=True)["input_ids"]      # the prompt as evaluate builds it
        cot = enc(text[r0:r1], add_special_tokens=False)["input_ids"]
        answer = enc(text[r1:], add_special_tokens=False)["input_ids"] + [enc.eos_token_id]   # "\n#### N", EOS
        r = self.cache.rkv(i)
        k = r["k"] if self.rope is None else unrotate(r["k"].float(), r["index"], self.rope)
        return {"question": question + [self.bot], "cot": cot, "suffix": [self.eot] + answer,
                "slots_k": k, "slots_v": r["v"], "slot_mask": r["mask"][0, 0], "row": s["row"],
                **({"hidden": self.cache.hidden(i)} if self.hidden else {})}


def pad_ids(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as (B, T) ids padded with `pad_id` on the left or the right, and their mask."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, x in enumerate(seqs):
        where = slice(width - len(x), width) if left else slice(0, len(x))
        ids[b, where], mask[b, where] = torch.tensor(x, dtype=torch.long), 1
    return ids, mask


def collate_latent(items: list[dict], pad_id: int) -> dict:
    """A batch: questions left-padded (so that every sample's latents sit at the same positions),
    the suffix (end-of-thought, answer, EOS) and the written chain of thought right-padded, the
    slots stacked: `slots_k`, `slots_v` (B, L, H, M, D), `slot_mask` (B, M)."""
    def pad(seqs, left: bool):
        return pad_ids(seqs, pad_id, left)

    q, qm = pad([it["question"] for it in items], left=True)
    # the written sequence (question, chain of thought, answer) and the tokens it predicts: the
    # thought's and the answer's
    w, wm = pad([it["question"][:-1] + it["cot"] + it["suffix"][1:] for it in items], left=False)
    wce = torch.zeros_like(wm)
    for b, it in enumerate(items):
        wce[b, len(it["question"]) - 1:len(it["question"]) - 1 + len(it["cot"]) + len(it["suffix"]) - 1] = 1
    s, sm = pad([it["suffix"] for it in items], left=False)
    c, cm = pad([it["cot"] or [pad_id] for it in items], left=False)
    cm[[b for b, it in enumerate(items) if not it["cot"]]] = 0
    return {"question_ids": q, "question_mask": qm, "suffix_ids": s, "suffix_mask": sm, "cot_ids": c, "cot_mask": cm,
            "slots_k": torch.stack([it["slots_k"] for it in items]),
            "slots_v": torch.stack([it["slots_v"] for it in items]),
            "slot_mask": torch.stack([it["slot_mask"] for it in items]), "rows": [it["row"] for it in items],
            # the written tokens (question, thought markers, answer) as one sequence, for what every
            # batch offers the trainer: its sample and token counts, and the K/V capture check
            "input_ids": torch.cat([q, s], 1), "attention_mask": torch.cat([qm, sm], 1), "bad_rows": [],
            "written_ids": w, "written_mask": wm, "written_ce": wce,
            **({"hidden": torch.stack([it["hidden"] for it in items])} if "hidden" in items[0] else {})}
