"""Continuous batching for a HuggingFace causal LM: many requests decode together,
one token each per forward pass, and each joins or leaves between two passes.

Every member keeps its own prompt, limits, stop strings, sampling values and stream;
only the forward pass is shared. The rows of the key/value cache are left-padded to
one length (padding masked out, positions counted per row, as `generate` does for a
padded batch), the joiners of one step are prefilled together (left-padded the same
way) and their cache padded into the batch's, and a member that ends is cut out of
every layer at once, freeing its slot.

Why not `generate` on a padded batch: it runs until the slowest member ends, and
nobody can join. Why not transformers' own continuous-batching manager: measured on
this CPU (paged attention, eager) it gave ~4.6x at 16 over its own batch of 1 and was
slower than plain `generate` at batch 1; this loop reaches the raw model's batched
speed through the same forward pass `generate` uses (`bench/batching.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from algorithms.base import Completion, Emit, GenerationRequest
from algorithms.textstream import IncrementalDecoder, StreamedText


@dataclass(frozen=True)
class Sampling:
    """How one member picks its next token: greedy at temperature 0, else sampled with
    its own generator, so a seed gives the same answer whoever else is in the batch."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None


@dataclass
class Member:
    """One request in the batch: what it has made and how it must stop."""

    handle: int
    prompt_tokens: int
    max_new_tokens: int
    sampling: Sampling
    decoder: IncrementalDecoder
    stream: StreamedText
    generator: torch.Generator | None
    position: int  # the position id of the next token fed to the model
    last_token: int = 0
    ended_by: str = ""  # "stop" (end-of-text) or "length"; "" while it runs
    done: bool = False

    @property
    def made(self) -> int:
        return len(self.decoder.token_ids)

    def completion(self) -> Completion:
        self.stream.add(self.decoder.flush())
        self.stream.close()
        return self.stream.completion(self.prompt_tokens, self.made, self.ended_by or "length")


@dataclass
class GenerationBatch:
    """The requests one deployment decodes together. Only the device's worker thread
    calls it: `add` (prefill joiners together), `step` (one token for every member),
    `remove` (one leaves now)."""

    model: PreTrainedModel
    prepare: Callable[[GenerationRequest], tuple[list[int], int, Sampling]]  # prompt ids, max new tokens, sampling
    decode: Callable[[Sequence[int]], str]
    stop_token_ids: frozenset[int]
    pad_token_id: int
    device: torch.device
    members: list[Member] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # [rows, columns]: 1 for a real position, 0 for padding
    _handles: int = 0

    def __len__(self) -> int:
        return len(self.members)

    def add(self, joiners: Sequence[tuple[GenerationRequest, Emit]]) -> list[tuple[int, Completion | None]]:
        """Prefill new members together (one forward pass, their prompts left-padded to
        one length) and give each its first token; they decode with the others from the
        next `step`. Returns a handle per joiner, in order, with its completion if that
        first token already ended it (end-of-text, a stop string, `max_tokens` 1, a
        cancel)."""
        members, prompts = [], []
        for request, emit in joiners:
            prompt_ids, max_new_tokens, sampling = self.prepare(request)
            self._handles += 1
            members.append(
                Member(
                    handle=self._handles,
                    prompt_tokens=len(prompt_ids),
                    max_new_tokens=max_new_tokens,
                    sampling=sampling,
                    decoder=IncrementalDecoder(self.decode),
                    stream=StreamedText(emit, request.stop),
                    generator=_generator_for(sampling, self.device),
                    position=len(prompt_ids),
                )
            )
            prompts.append(prompt_ids)
        if not members:
            return []
        cache, mask, logits = self._prefill(prompts)
        for member, token in zip(members, self._pick(logits, members), strict=True):
            self._accept(member, token)
        staying = [row for row, member in enumerate(members) if not member.done]
        if staying:
            self._join([members[row] for row in staying], cache, mask, staying)
        return [(m.handle, m.completion() if m.done else None) for m in members]

    def _prefill(self, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One forward pass over the joiners' prompts, left-padded, positions counted per
        row (as `generate` does for a padded batch): their cache, mask and last logits."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=self.device)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        return cache, mask, output.logits[:, -1, :]

    def step(self) -> list[tuple[int, Completion]]:
        """One forward pass: every member gets its next token. Returns the members that
        ended on it (they have left the batch already)."""
        if not self.members:
            return []
        rows = len(self.members)
        input_ids = torch.tensor([[m.last_token] for m in self.members], dtype=torch.long, device=self.device)
        positions = torch.tensor([[m.position] for m in self.members], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=self.mask.dtype, device=self.device)], dim=1)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        tokens = self._pick(output.logits[:, -1, :], self.members)
        for member, token in zip(self.members, tokens, strict=True):
            member.position += 1
            self._accept(member, token)
        return self._drop([m for m in self.members if m.done])

    def remove(self, handle: int) -> Completion | None:
        """Take a member out now (its deadline passed); what it made so far."""
        member = next((m for m in self.members if m.handle == handle), None)
        if member is None:
            return None
        return self._drop([member])[0][1]

    def _accept(self, member: Member, token: int) -> None:
        member.last_token = token
        member.stream.add(member.decoder.push(token))
        if token in self.stop_token_ids:
            member.ended_by, member.done = "stop", True
        elif member.made >= member.max_new_tokens:
            member.ended_by, member.done = "length", True
        elif member.stream.done:
            member.done = True

    def _pick(self, logits: torch.Tensor, members: Sequence[Member]) -> list[int]:
        """Each member's next token from its row of logits, by its own sampling values."""
        greedy = logits.argmax(dim=-1).tolist()
        picked = []
        for row, member in enumerate(members):
            if member.sampling.temperature == 0:
                picked.append(int(greedy[row]))
            else:
                picked.append(_sample(logits[row : row + 1].float(), member.sampling, member.generator))
        return picked

    def _join(self, members: list[Member], cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> None:
        """Pad the joiners' cache (their `rows` of it) and the batch's to one length and
        stack them."""
        if len(rows) < mask.shape[0]:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            mask = mask.index_select(0, index)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
            self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
        self.members.extend(members)
        self._trim_padding()

    def _drop(self, leaving: list[Member]) -> list[tuple[int, Completion]]:
        if not leaving:
            return []
        gone = {m.handle for m in leaving}
        keep = [row for row, m in enumerate(self.members) if m.handle not in gone]
        self.members = [self.members[row] for row in keep]
        if not self.members:
            self.cache, self.mask = None, None
        else:
            self._keep_rows(keep)
        return [(m.handle, m.completion()) for m in leaving]

    def _keep_rows(self, keep: list[int]) -> None:
        """Cut the rows that left out of every layer, then the columns that are only
        padding for the rows that stay (a long member leaving frees their width)."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask.index_select(0, index)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self._trim_padding()

    def _trim_padding(self) -> None:
        first_used = int(self.mask.any(dim=0).nonzero()[0])
        if first_used:
            self.mask = self.mask[:, first_used:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first_used:], layer.values[:, :, first_used:]


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`tensor` with zeros in front along `dim` up to `width` (cache: [rows, heads, seq, dim])."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _generator_for(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    scores = logits / sampling.temperature
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator)[0, 0])
