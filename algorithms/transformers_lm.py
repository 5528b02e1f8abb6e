"""Text generation with a local HuggingFace causal language model.

The model directory is loaded once per worker process (``local_files_only``: the
server never reaches a model hub) and kept on its device; each request renders the
prompt, trims it to fit the context, and decodes only the newly generated tokens.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from algorithms.base import Completion, Emit, GenerationRequest
from algorithms.generation_batch import GenerationBatch, Sampling
from algorithms.textstream import IncrementalDecoder, StreamedText

DEFAULT_MODEL_PATH = "smollm2-135m-instruct"
T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A temperature this small samples as greedy decoding does, and dividing the logits by
# it overflows them to inf (NaN probabilities: a crash). vLLM's _SAMPLING_EPS.
GREEDY_BELOW_TEMPERATURE = 1e-5


def resolve_device(device: str) -> torch.device:
    """Map a deployment device to torch: ``"cpu:N"`` is the CPU (torch has only one)."""
    if device == "cpu" or device.startswith("cpu:"):
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Pick the weights' dtype; ``"auto"`` means bfloat16 wherever it is fast, else float32.

    Measured on 2 CPU cores with SmolLM2: with native bfloat16 (``avx512_bf16`` or AMX)
    batch 16 decodes ~10x batch 1's tokens/s in bfloat16; without it PyTorch emulates
    bfloat16 matmuls and batch 16 in bfloat16 is slower than in float32 (26 vs 62
    tok/s), so such CPUs, AVX-512 or not, stay in float32. GPUs use bfloat16 when they
    support it.
    """
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes in bfloat16 itself: the ``avx512_bf16`` or ``amx_bf16``
    flag (Linux's /proc/cpuinfo), or AMX as torch reports it. Plain AVX-512 is not
    enough: it converts, and loses to float32 in batches."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool({"avx512_bf16", "amx_bf16"} & flags) or "AMX" in torch.backends.cpu.get_cpu_capability()


class TextGeneration:
    """Answer a prompt with a local causal LM (chat template applied when the model has one).

    Options, from the deployment's ``options`` table:

    - ``model_path``: a local model directory. The config loader resolves a relative path
      against ``<data_dir>/models/``; the default names the SmolLM2 demo model that
      ``manage.py preparemodels`` builds there.
    - ``max_new_tokens``, ``temperature`` (0 = greedy, deterministic), ``top_p``, ``seed``
      (reseeds before every request, so a prompt and seed always give the same answer).
    - ``dtype``: ``"auto"`` (see :func:`resolve_dtype`), ``"float32"``, ``"bfloat16"``, ``"float16"``.
    - ``max_context_tokens``: prompt + answer cap, lowered to the model's own position limit;
      a longer prompt loses its beginning.
    """

    # Requests decoded together unless the deployment sets `max_batch`: batch 16 gives
    # 6-10x one request's tokens/s on a 2-core CPU (bench/batching.py), more on a GPU.
    default_max_batch = 16

    def __init__(
        self,
        device: str = "cpu",
        model_path: str = DEFAULT_MODEL_PATH,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        dtype: str = "auto",
        max_context_tokens: int = 2048,
    ) -> None:
        _check_sampling_options(max_new_tokens, temperature, top_p)
        self.model_path = _existing_model_dir(model_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.tokenizer = self._load_tokenizer()
        self.model = self._load_model()
        self.prompt_budget = self._prompt_budget(max_context_tokens)

    def run(self, input_text: str) -> str:
        """Generate an answer to ``input_text`` and return only the new text."""
        return self.complete(input_text).text

    def complete(self, input_text: str) -> Completion:
        """Like :meth:`run`, with token counts and the reason generation stopped."""
        prompt_ids = self.encode_prompt(self.render_prompt(input_text))
        config = self._generation_config(self.max_new_tokens, self.temperature, self.top_p)
        new_ids = self._generate_new_tokens(prompt_ids, config, self.seed)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        return Completion(
            text=text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids),
            finish_reason=self._finish_reason(new_ids),
        )

    def generate(self, request: GenerationRequest, emit: Emit) -> Completion:
        """Answer ``request``, handing each settled piece of text to ``emit`` as it is decoded.

        The request's sampling values override the deployment's; ``max_tokens`` is capped
        by the deployment's ``max_new_tokens`` (the prompt budget was sized for it).
        """
        prompt_ids = self.tokenize(request)
        stream = StreamedText(emit, request.stop)
        decoder = IncrementalDecoder(self._decode)
        self._generate_new_tokens(
            prompt_ids,
            self._request_generation_config(request),
            seed=_override(request.seed, self.seed),
            stopping_criteria=StoppingCriteriaList([_StreamEachToken(decoder, stream)]),
        )
        stream.add(decoder.flush())
        stream.close()
        return stream.completion(len(prompt_ids), len(decoder.token_ids), self._finish_reason(decoder.token_ids))

    def start_batch(self) -> GenerationBatch:
        """A continuous batch for this model: requests join and leave it between decode
        steps (the device worker's engine drives it); each answers as `generate` would."""
        return GenerationBatch(
            model=self.model,
            prepare=self._batch_member,
            decode=self._decode,
            stop_token_ids=frozenset(self._stop_token_ids()),
            pad_token_id=self.tokenizer.pad_token_id,
            device=self.device,
        )

    def _batch_member(self, request: GenerationRequest) -> tuple[list[int], int, Sampling]:
        config = self._request_generation_config(request)
        sampling = Sampling(
            temperature=(config.temperature or 0.0) if config.do_sample else 0.0,
            top_p=config.top_p or 1.0,
            top_k=config.top_k if config.do_sample else None,
            seed=_override(request.seed, self.seed),
        )
        return self.tokenize(request), config.max_new_tokens, sampling

    def render_prompt(self, input_text: str) -> str:
        """The text the model sees: the chat template around a user turn, or the raw text."""
        if not self.tokenizer.chat_template:
            return input_text
        messages = [{"role": "user", "content": input_text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``, keeping its end when it is longer than the context allows.

        The end is kept because it holds the question and, with a chat template, the
        assistant header the model must continue from. An empty prompt becomes the start
        token, as in :meth:`tokenize`: the model needs one position to continue from.
        """
        # A rendered chat template already contains its special tokens.
        return self._encode(prompt, add_special_tokens=not self.tokenizer.chat_template) or [self._start_token_id()]

    def render_messages(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for a chat: the model's chat template, or a plain one without it.

        The plain template (for models that ship no chat template) writes each message
        as ``"{role}: {content}\\n"`` with the role as given (``system``, ``user``,
        ``assistant``), then ``"assistant:"`` for the model to continue, e.g.
        ``"system: Be brief.\\nuser: Hi\\nassistant:"``.
        """
        if self.tokenizer.chat_template:
            turns = [{"role": m["role"], "content": m["content"]} for m in messages]
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt ids :meth:`generate` feeds the model for ``request``, already truncated.

        Messages go through :meth:`render_messages`; a ``prompt`` is raw text encoded with
        the tokenizer's usual special tokens. An empty prompt becomes the start token,
        because the model needs at least one position to continue from.
        """
        if (request.messages is None) == (request.prompt is None):
            raise ValueError("a generation request needs exactly one of messages and prompt")
        if request.messages is not None:
            text = self.render_messages(request.messages)
            # A rendered chat template already contains its special tokens.
            ids = self._encode(text, add_special_tokens=not self.tokenizer.chat_template)
        else:
            ids = self._encode(request.prompt, add_special_tokens=True)
        return ids or [self._start_token_id()]

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """How many prompt tokens :meth:`generate` would use for ``request`` (``/v1/tokenize``)."""
        return len(self.tokenize(request))

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` takes for this model, without special tokens."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(
            text,
            add_special_tokens=add_special_tokens,
            truncation=True,
            max_length=self.prompt_budget,
        )

    def _decode(self, token_ids: Sequence[int]) -> str:
        # No space clean-up: it can rewrite text already streamed (" ." -> ".").
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _start_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        if tokenizer.pad_token is None:
            # generate() needs a pad id; the end-of-text token is the usual stand-in.
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"  # see encode_prompt
        return tokenizer

    def _load_model(self) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype, local_files_only=True)
        return model.to(self.device).eval()

    def _prompt_budget(self, max_context_tokens: int) -> int:
        context = min(max_context_tokens, self._model_context_limit())
        budget = context - self.max_new_tokens
        if budget < 1:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) leaves no room for a prompt in a context of {context} tokens"
            )
        return budget

    def _model_context_limit(self) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return int(limit) if limit else 1 << 30

    def _generate_new_tokens(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        seed: int | None,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> list[int]:
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            if seed is not None:
                # Seeded per request, so the same prompt and seed give the same answer.
                torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                stopping_criteria=stopping_criteria,
            )
        return output[0, len(prompt_ids) :].tolist()

    def _request_generation_config(self, request: GenerationRequest) -> GenerationConfig:
        max_new_tokens = min(request.max_tokens, self.max_new_tokens)
        temperature = _override(request.temperature, self.temperature)
        top_p = _override(request.top_p, self.top_p)
        _check_sampling_options(max_new_tokens, temperature, top_p)
        return self._generation_config(max_new_tokens, temperature, top_p)

    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float) -> GenerationConfig:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.pad_token_id = self.tokenizer.pad_token_id
        config.max_length = None
        if temperature < GREEDY_BELOW_TEMPERATURE:
            config.do_sample = False
            config.temperature, config.top_p, config.top_k = None, None, None
        else:
            config.do_sample = True
            config.temperature, config.top_p = temperature, top_p
        return config

    def _finish_reason(self, new_ids: Sequence[int]) -> str:
        return "stop" if new_ids and new_ids[-1] in self._stop_token_ids() else "length"

    def _stop_token_ids(self) -> set[int]:
        stop_ids = self.model.generation_config.eos_token_id
        return set(stop_ids) if isinstance(stop_ids, list) else {stop_ids}


class _StreamEachToken(StoppingCriteria):
    """Decode and emit each new token the moment it exists, and stop when the stream is done.

    This is a stopping criterion rather than a ``BaseStreamer`` because of the order
    inside ``generate`` (transformers 5.x): criteria run on each new token *before*
    the streamer gets it, so a flag set by a streamer is only seen one step later, after
    the model has spent a forward pass on a token nobody wants. Here a stop string or a
    cancellation ends generation on the very token that caused it.
    """

    def __init__(self, decoder: IncrementalDecoder, stream: StreamedText) -> None:
        self.decoder = decoder
        self.stream = stream

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: object) -> torch.Tensor:
        # One request per call, so row 0 is the only row.
        self.stream.add(self.decoder.push(int(input_ids[0, -1])))
        return torch.full((input_ids.shape[0],), self.stream.done, dtype=torch.bool, device=input_ids.device)


def _override(value: T | None, default: T) -> T:
    """The request's value, or the deployment's default when the request left it out."""
    return default if value is None else value


def _check_sampling_options(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _existing_model_dir(model_path: str | os.PathLike[str]) -> Path:
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model directory at {path} (no config.json); for a built-in model run `python manage.py preparemodels`"
        )
    return path
