"""The engine: one model, one long document in the cache, many questions against it.

``ingest`` pre-fills the document in chunks and checkpoints the cache at its end; ``ask`` restores that state,
pre-fills only the earlier turns of its conversation and the question, and streams the answer. The document sits
inside the chat template's first user turn and the conversation follows it, so the document's cache serves every
question of every conversation (the streaming/retrieval split does not depend on the question).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from duo_qserve import environment
from duo_qserve.cache import CacheConfig, CacheSpec, DuoKVCache
from duo_qserve.conversation import Conversation, Turn
from duo_qserve.decode_graph import GraphedDecoder
from duo_qserve.distributed import ContextGroup, ShardedKVCache, TokenShards
from duo_qserve.environment import REPO_ROOT
from duo_qserve.evidence import attention_mass, top_passages
from duo_qserve.kernels.int8_gemm import tuned_row_counts
from duo_qserve.loading import LoadedModel, load_model
from duo_qserve.model import rope_cos_sin
from duo_qserve.patterns import AttentionPattern, load_pattern, reorder_heads, uniform_pattern
from duo_qserve.planner import max_tokens_for_budget, workspace_bytes
from duo_qserve.sampling import AnswerGuard, Sampling, check_max_new_tokens, sample

PATTERNS_DIR = REPO_ROOT / "attn_patterns"
CALIBRATION_DIR = Path(__file__).parent / "quant" / "calibration"
ANSWER_RESERVE = 1024  # tokens kept free after the document for a question and its answer


class Cancelled(RuntimeError):
    """A running pre-fill or answer was stopped by ``Engine.cancel()``."""


class QuestionTooLong(ValueError):
    def __init__(self, question: str, tokens: int, room: int, document_tokens: int):
        shown = question if len(question) <= 60 else question[:57] + "..."
        super().__init__(
            f"the question {shown!r} has {tokens:,} tokens but only {room:,} are left in the cache after the "
            f"document's {document_tokens:,} (for the question and at least one answer token): shorten the "
            f"question, or load the document into an engine with a larger max_tokens"
        )
        self.tokens, self.room = tokens, room


class DocumentTooLarge(ValueError):
    def __init__(self, tokens: int, fits: int):
        super().__init__(
            f"the document has {tokens:,} tokens but the cache holds {fits:,} document tokens with these settings "
            f"(after keeping {ANSWER_RESERVE} for questions and answers): raise the streaming-head ratio, lower "
            f"kv_bits, or shorten the document"
        )
        self.tokens, self.fits = tokens, fits


@dataclass
class DocumentInfo:
    title: str
    tokens: int  # document prompt tokens held in the cache (template prefix included)
    sha256: str  # of the token ids: identifies the cached document
    prefill_seconds: float
    loaded_by: str = ""
    prefilled: int = 0  # tokens pre-filled by this ingest (fewer than ``tokens`` after a resume)
    # the token ids (int32), kept by ``ingest`` and ``library.load`` for ``ask(evidence=True)``
    ids: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class EngineSettings:
    model: str = "default"
    device: str | None = None  # None: CUDA if available, else CPU
    dtype: torch.dtype | None = None
    pattern: str | None = "auto"  # "auto": attn_patterns/<model name>/ if present; None: all retrieval heads
    sparsity: float = 0.5  # fraction of KV heads that become streaming heads
    kv_bits: int = 4
    key_group: int = 128
    sink: int | None = None  # None: the pattern's sink_size
    recent: int | None = None
    chunk_size: int | None = None  # None: 32768 on CUDA, 512 on CPU
    max_tokens: int | None = None  # None: what fits in GPU memory (CUDA) or 32768 (CPU)
    w8a8: bool | None = None  # None: on for CUDA (when available), off for CPU
    # how on-the-fly W8A8 prepares the model: a recipe file (quant.recipe: rotation and/or SmoothQuant statistics
    # of calibration text; "auto": the one shipped for this model in duo_qserve/quant/calibration/, if any; None:
    # plain W8A8)
    smoothing: str | None = "auto"


@dataclass
class GenerationStats:
    question_tokens: int = 0
    answer_tokens: int = 0
    ttft_s: float = 0.0  # restore + earlier turns + question pre-fill + first token
    decode_ms_per_token: float = 0.0
    ended_by: str = ""  # one of sampling.ENDED_BY: "eos", "max_tokens", "repetition", "stop", "cancel"
    history_turns: int = 0  # earlier turns of the conversation the question followed
    history_tokens: int = 0
    dropped_turns: int = 0  # oldest turns this question dropped from the context: they no longer fit
    # with ``ask(evidence=True)``: the passages the retrieval heads attended to most (evidence.top_passages, in
    # document positions) and the seconds the pass took
    evidence: list[dict] = field(default_factory=list)
    evidence_s: float = 0.0


class Engine:
    """One model and the cache it answers from.

    With a ``group`` (``duo_qserve.distributed``: context parallelism, one engine per rank, started by torchrun)
    every cache is a ``ShardedKVCache`` holding this rank's share of the retrieval tokens, decode steps replay a
    CUDA graph that captures each layer's all-gather where the group is NCCL's (gloo's decode eagerly), and rank
    0's sampled token and cancel decide for every rank. Every rank must then make the
    same calls in the same order (SPMD). Without one, the single-device engine, with no collectives."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings, group: ContextGroup | None = None):
        self.settings, self.loaded, self.group = settings, loaded, group
        self.model, self.tokenizer, self.args = loaded.model, loaded.tokenizer, loaded.model.args
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.pattern = self._resolve_pattern(settings.pattern)
        mask, self.sparsity = self.pattern.retrieval_mask(settings.sparsity)
        self.retrieval_heads = reorder_heads(self.model, mask)
        prequantized = getattr(self.model, "w8a8", None) is not None  # a W8A8 checkpoint was loaded
        self.w8a8 = prequantized or (
            settings.w8a8 if settings.w8a8 is not None else self.device.type == "cuda"
        )
        if self.w8a8 and not prequantized:
            from duo_qserve.quant.recipe import quantize_with_recipe
            from duo_qserve.quant.w8a8 import quantize_model_w8a8

            recipe = self._resolve_smoothing(settings.smoothing)
            if recipe is None:
                quantize_model_w8a8(self.model)
            else:
                quantize_with_recipe(self.model, recipe)
        self.cache_config = CacheConfig(
            kv_bits=settings.kv_bits,
            key_group=settings.key_group,
            sink_tokens=settings.sink if settings.sink is not None else self.pattern.sink_size,
            recent_tokens=settings.recent if settings.recent is not None else self.pattern.recent_size,
        )
        cuda = self.device.type == "cuda"
        self.chunk_size = settings.chunk_size or (32768 if cuda else 512)
        self.shards = TokenShards(group.world_size if group else 1, self.cache_config.key_group)
        self.capacity = self._cache_spec(settings.max_tokens)  # the largest cache one document may have
        self.cache = self._new_cache(self.capacity)
        # decode steps replay a CUDA graph (DUO_QSERVE_DECODE_GRAPH=0: eager); made per cache, see _decode_step.
        # With context parallelism the graph captures the merge's NCCL all-gather; gloo's cannot be captured.
        self.decode_graph = cuda and environment.decode_graph() and (group is None or group.in_cuda_graphs)
        self._decoder: GraphedDecoder | None = None
        self.document: DocumentInfo | None = None
        self.last = GenerationStats()
        self.prefilled_tokens = 0  # every token that went through a forward pass, for accounting and tests
        self._cancel = threading.Event()
        self._jobs = 0  # nesting depth of the job holding ``lock`` (read and written under it)
        # One GPU job at a time; re-entrant so a caller can hold it around calls (``job``).
        self.lock = threading.RLock()
        self._doc_prefix, self._question_suffix, self._turn_end = self._template_parts()
        self.conversation_in_cache = (0, 0)  # (turns, tokens) after the document, for the context readout
        self._stop_ids = self._eos_ids()

    @classmethod
    def from_settings(cls, settings: EngineSettings, group: ContextGroup | None = None) -> Engine:
        """Load ``settings.model`` on ``settings.device`` (None: CUDA if available; with a ``group``, the rank's
        device) and build the engine on it."""
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if group is not None and group.device.type == "cuda":
            device = group.device
        return cls(load_model(settings.model, device, settings.dtype), settings, group)

    @classmethod
    def from_pretrained(cls, model: str = "default", **kwargs) -> Engine:
        """``from_settings(EngineSettings(model, **kwargs))``."""
        return cls.from_settings(EngineSettings(model=model, **kwargs))

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _resolve_pattern(self, pattern: str | None) -> AttentionPattern:
        if pattern is None:
            return uniform_pattern(self.args)
        if pattern == "auto":
            candidate = PATTERNS_DIR / self.loaded.name
            if not candidate.is_dir():
                return uniform_pattern(self.args)  # no trained pattern for this model: plain full attention
            pattern = str(candidate)
        p = load_pattern(pattern)
        p.check_fits(self.args)
        return p

    def _resolve_smoothing(self, smoothing: str | None) -> Path | None:
        if smoothing == "auto":
            shipped = CALIBRATION_DIR / f"{self.loaded.name}.safetensors"
            return shipped if shipped.is_file() else None
        return None if smoothing is None else Path(smoothing)

    def _cache_spec(self, max_tokens: int | None) -> CacheSpec:
        if max_tokens is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                # weights are already resident: plan the rest of free memory for cache + workspace
                merging = self.group.world_size if self.group else 0
                budget = free - workspace_bytes(self.args, self.chunk_size, self.dtype.itemsize, merging)
                plan = max_tokens_for_budget(
                    self.args, self.retrieval_heads, self.cache_config, budget, w8a8=False, chunk_size=0,
                    dtype=self.dtype, include_fixed=False, world_size=self.shards.world_size,
                )  # fmt: skip
                max_tokens = plan.tokens
            else:
                max_tokens = 32768
        return self._spec(max_tokens)

    def _spec(self, max_tokens: int) -> CacheSpec:
        """This rank's tensors for a cache of ``max_tokens`` (all of them without context parallelism)."""
        return self.shards.rank_spec(
            self.args, self.retrieval_heads, self.cache_config, max_tokens, self.dtype
        )

    def _new_cache(self, spec: CacheSpec) -> DuoKVCache:
        if self.group is None:
            return DuoKVCache(spec, self.device)
        return ShardedKVCache(spec, self.device, self.group)

    def _template_parts(self) -> tuple[str, str, str]:
        """Split the chat template around the turns: (text before the document, text after a question, text
        between an answer and the next question)."""
        doc, question, answer, again = "\x00DOC\x00", "\x00QUESTION\x00", "\x00ANSWER\x00", "\x00AGAIN\x00"
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return "Document:\n", "\n\nAnswer:", "\n\nQuestion: "
        text = tok.apply_chat_template(
            [{"role": "user", "content": doc + question}], tokenize=False, add_generation_prompt=True
        )
        before, rest = text.split(doc)
        _, after = rest.split(question)
        turns = tok.apply_chat_template(
            [{"role": "user", "content": doc + question}, {"role": "assistant", "content": answer},
             {"role": "user", "content": again}], tokenize=False, add_generation_prompt=True,
        )  # fmt: skip
        turn_end = turns.split(answer)[1].split(again)[0]
        bos = getattr(tok, "bos_token", None)
        if bos and not before.startswith(bos) and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
            before = bos + before
        return before, after, turn_end

    def _eos_ids(self) -> set[int]:
        tok, ids = self.tokenizer, set()
        if tok is None:
            return ids
        eos = self.args.extra.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>"):
            tid = tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                ids.add(tid)
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def document_ids(self, text: str) -> list[int]:
        """The ids ``ingest`` puts in the cache for ``text``: the chat template's opening, the text, a break."""
        return self.encode(self._doc_prefix + text + "\n\n")

    @property
    def document_text_start(self) -> int:
        """Where the text starts in ``document_ids``: the chat template's opening comes first."""
        return len(self.encode(self._doc_prefix))

    def question_ids(self, question: str) -> list[int]:
        """The ids ``ask`` adds after the document for ``question``: the question and the template's close."""
        return self.encode(question + self._question_suffix)

    @property
    def max_document_tokens(self) -> int:
        """Document tokens the engine can hold (in a cache of ``capacity``)."""
        return max(self.capacity.max_tokens - ANSWER_RESERVE, 0)

    def cache_spec_for(self, document_tokens: int) -> CacheSpec:
        """The cache for a document of ``document_tokens`` tokens and ``ANSWER_RESERVE`` more (at most
        ``capacity``): several documents can then stay resident at once, each in a cache of its own size."""
        tokens = min(document_tokens + ANSWER_RESERVE, self.capacity.max_tokens)
        return self._spec(tokens)

    def new_cache(self, document_tokens: int) -> DuoKVCache:
        """An empty cache of ``cache_spec_for(document_tokens)``, for ``use``."""
        return self._new_cache(self.cache_spec_for(document_tokens))

    def use(self, cache: DuoKVCache, document: DocumentInfo | None) -> None:
        """Make ``cache`` (from ``new_cache``, holding ``document`` or nothing) the one the engine pre-fills and
        answers from; waits for the running job, so a switch never lands inside one."""
        with self.job():
            self.cache, self.document = cache, document
            self.conversation_in_cache = (0, 0)

    def warm_up(self, on_progress: Callable[[str], None] | None = None) -> float:
        """Compile and auto-tune the kernels that a pre-fill and an answer launch, and capture a decode graph, on
        a scratch cache; returns the seconds it took.

        Triton compiles each kernel at its first launch and auto-tunes its GEMMs per power-of-two row count, and a
        CUDA graph is captured at the first decode step: left to the first question, that made the first answer
        seconds slower than the later ones. Call this at model load instead. The scratch pre-fill fills the
        streaming ring and one quantized key group; pre-fills of 8 to ``TUNE_MAX_M`` tokens tune the GEMMs for
        every input length a question, a follow-up or a document chunk can have; decode steps run across the next
        key-group boundary, so the fused decode step, the code kernel and the tail commit all run; and one pass
        finds a short answer's passages, so the evidence under the first answer compiles nothing. Everything the
        engine holds is put back as it was: its cache (the scratch one is freed), document, context readout,
        decoder, ``last`` and ``prefilled_tokens``. A decode graph belongs to one cache, so a book's first answer
        still captures its own, with every kernel already compiled (one step). On the CPU nothing compiles: a
        minimal pass (8 tokens, 2 steps) runs the same code. ``on_progress`` gets a short message before each stage.
        Runs as one job (see ``cancel``). With context parallelism there is no evidence pass.
        """
        c, cuda = self.cache_config, self.device.type == "cuda"
        document = c.sink_tokens + c.recent_tokens + c.key_group if cuda else 8
        questions = tuple(m for m in tuned_row_counts() if m >= 8) if cuda else ()
        gen = torch.Generator().manual_seed(0)
        # the last 6 ids: a 2-token context and a 4-token answer for the passages pass
        ids = torch.randint(self.args.vocab_size, (document + sum(questions) + 6,), generator=gen).tolist()
        say = on_progress or (lambda message: None)
        t0 = time.perf_counter()
        with self.job(), torch.inference_mode():
            saved = (self.cache, self.document, self.conversation_in_cache, self._decoder, self.last)
            tokens = self.prefilled_tokens
            self.cache, self._decoder = self.new_cache(len(ids)), None
            try:
                say("compiling the pre-fill kernels")
                self._prefill(ids[:document])
                self.cache.checkpoint()
                say("tuning for question-sized inputs")
                start = document
                for n in questions:
                    self._prefill(ids[start : start + n])
                    start += n
                say("capturing the decode graph")
                steps = (-self.cache.seq_len) % c.key_group + 2 if cuda else 2
                for _ in range(steps):
                    self._decode_step(ids[0])
                if self.group is None:
                    say("finding an answer's passages")
                    attention_mass(self.model, self.cache, document, ids[-6:-4], ids[-4:], self.chunk_size)
                if cuda:
                    torch.cuda.synchronize(self.device)
            finally:
                self.cache, self.document, self.conversation_in_cache, self._decoder, self.last = saved
                self.prefilled_tokens = tokens
        return time.perf_counter() - t0

    def chunk_seconds(self, prefixes: Sequence[int], reps: int = 2, cold: bool = True) -> list[float]:
        """Estimated seconds of one pre-fill chunk (``chunk_size`` tokens) after a prefix of each length, timed
        cheaply: one block, the one with the most retrieval heads, runs a chunk of random hidden states on a
        scratch cache of that many (meaningless) tokens. A chunk costs the model's layers times that block's cost
        with no prefix, plus its growth with the prefix times the model's retrieval heads over the block's
        (streaming heads cost the same at every prefix; the embedding and the last row's logits are small). Each
        time is the fastest of ``reps`` runs, taken in turns across the prefixes: other work on the machine only
        ever adds. With ``cold`` the CPU's caches are flushed before each run, as a chunk's pass through every layer
        leaves them (one layer's keys would stay cached and look cheap). ``duo_qserve.eta``'s ``PrefillClock`` takes
        these as its prior. Runs as one job; the engine's own cache is not touched."""
        layer = max(range(self.args.n_layers), key=lambda i: self.retrieval_heads[i])
        m, group = self.chunk_size, self.cache_config.key_group
        # a rank of a context-parallel engine attends only its share of the prefix
        lengths = [
            self.shards.held(min(p, self.capacity.max_tokens - m) // group * group, 0) for p in prefixes
        ]
        block = self.model.layers[layer]
        h = torch.randn(m, self.args.dim, generator=torch.Generator().manual_seed(0)).to(
            self.device, self.dtype
        )
        with self.job(), torch.inference_mode():
            tokens = max([0, *lengths]) + m  # a plain cache: the probe's block runs on this rank alone
            cache = DuoKVCache(
                CacheSpec(self.args, self.retrieval_heads, self.cache_config, tokens, self.dtype), self.device
            )

            flush = torch.empty(64 << 20, dtype=torch.uint8) if cold and self.device.type == "cpu" else None
            best = [math.inf] * (len(lengths) + 1)
            for rep in range(-1, reps):  # pass -1, with no prefix only, pays the first call's overheads
                for i, n in enumerate([0, *lengths][: 1 if rep < 0 else None]):
                    positions = torch.arange(n, n + m, device=self.device)
                    rope = rope_cos_sin(self.model.inv_freq.to(self.device), positions)
                    cache.set_length(n)
                    if flush is not None:
                        flush.fill_(rep % 256)
                    t0 = time.perf_counter()
                    block(h, rope, cache)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    if rep >= 0:
                        best[i] = min(best[i], time.perf_counter() - t0)
            base, scale = best[0], sum(self.retrieval_heads) / max(self.retrieval_heads[layer], 1)
            return [self.args.n_layers * base + scale * max(t - base, 0.0) for t in best[1:]]

    def document_tokens_at(self, sparsity: float) -> int:
        """Document tokens that would fit in the bytes of ``capacity`` with ``sparsity`` streaming heads
        (what a re-load at that ratio would offer)."""
        mask, _ = self.pattern.retrieval_mask(sparsity)
        plan = max_tokens_for_budget(
            self.args, [int(m.sum()) for m in mask], self.cache_config, self.capacity.nbytes,
            w8a8=False, chunk_size=0, dtype=self.dtype, include_fixed=False, world_size=self.shards.world_size,
        )  # fmt: skip
        return max(plan.tokens - ANSWER_RESERVE, 0)

    def smallest_sparsity_for(self, n_tokens: int, steps: int = 20) -> float | None:
        """The smallest streaming-head ratio (in 1/steps increments) at which ``n_tokens`` document tokens fit."""
        for i in range(steps + 1):
            if self.document_tokens_at(i / steps) >= n_tokens:
                return i / steps
        return None

    # ---- work ------------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the job that holds the engine now (at its next chunk or token), or, when none does, the next job
        to start: a cancel that comes just before a job starts is not lost.

        A job is one ``ingest`` or ``ask`` (from the call until the answer stream ends or is closed), or everything
        done inside ``with engine.job():`` (as ``duo_qserve.library`` does around its calls). The cancel
        flag is cleared when the outermost job ends, so a cancel never reaches past the job it came during; a
        cancelled ``ingest`` raises ``Cancelled``, a cancelled ``ask`` ends its answer early.
        """
        self._cancel.set()

    @contextmanager
    def job(self) -> Iterator[None]:
        """Hold the engine for one GPU job: other threads wait; the outermost job's end clears ``cancel``."""
        with self.lock:
            self._jobs += 1
            try:
                yield
            finally:
                self._jobs -= 1
                if self._jobs == 0:
                    self._cancel.clear()

    def reset(self) -> None:
        self.cache.reset()
        self.document = None
        self.conversation_in_cache = (0, 0)

    def attach_document(self, info: DocumentInfo) -> DocumentInfo:
        """Take the cache's current state, written in by ``duo_qserve.library`` from a saved book, as the
        document ``info`` describes: checkpoint it, so every question starts from it, and return ``info``."""
        with self.job(), torch.inference_mode():
            self.cache.checkpoint()
            if self.device.type == "cuda":
                self._warm_cache(info.ids)
            self.document = info
            self.conversation_in_cache = (0, 0)
            return info

    def ingest(
        self,
        document: str | Sequence[int],
        on_progress: Callable[[int, int], None] | None = None,
        title: str = "document",
        loaded_by: str = "",
        resume: bool = False,
    ) -> DocumentInfo:
        """Pre-fill the document (text, or ids from ``document_ids``) and checkpoint the cache at its end.

        Safe from any thread: it runs as one job (see ``cancel``). A document that does not fit is refused before
        any work; a cancelled pre-fill leaves no document loaded. ``resume=True`` continues from the tokens the
        cache already holds (a partial pre-fill restored by ``duo_qserve.library``, which checks that they are
        this document's first tokens).
        """
        with self.job(), torch.inference_mode():
            ids = self.document_ids(document) if isinstance(document, str) else list(document)
            fits = max(self.cache.max_tokens - ANSWER_RESERVE, 0)  # the cache in use (see ``use``)
            if len(ids) > fits:
                raise DocumentTooLarge(len(ids), fits)
            first = self.cache.seq_len if resume else 0
            if not resume:
                self.reset()
            self.document = None
            t0 = time.perf_counter()
            try:
                self._prefill(ids, first, on_progress, then="no document is loaded")
            except BaseException:
                self.reset()
                raise
            self.cache.checkpoint()
            seconds = time.perf_counter() - t0
            if self.device.type == "cuda":
                self._warm_cache(ids)
            self.document = DocumentInfo(
                title,
                len(ids),
                token_sha256(ids),
                seconds,
                loaded_by,
                prefilled=len(ids) - first,
                ids=np.asarray(ids, dtype=np.int32),
            )
            return self.document

    def _warm_cache(self, ids: Sequence[int] | None) -> None:
        """Answer a tiny question (8 of ``ids`` and 2 decode steps) on the document just checkpointed in the cache,
        then restore the checkpoint. On a GPU (where ``ingest`` and ``attach_document`` call it) the kernels that
        this cache's sizes select (the split count of the decode attention and its merge, the pre-fill over this
        prefix) compile now, and the cache's decode graph is captured, so the first question about a book is as
        fast as the later ones: ``warm_up`` covers what every cache shares, this what depends on the book.
        Nothing else changes: the cache holds the checkpoint again, counters and ``last`` are as they were. A
        cancel that comes this late leaves the document loaded."""
        if ids is None or len(ids) == 0 or self.cache.max_tokens - self.cache.seq_len < 16:
            return
        tokens, last = self.prefilled_tokens, self.last
        try:
            self._prefill(list(ids[:8]))
            for token in ids[:2]:
                self._decode_step(int(token))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Cancelled:
            pass
        finally:
            self.cache.restore()
            self.prefilled_tokens, self.last = tokens, last

    def _prefill(
        self,
        ids: Sequence[int],
        first: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        then: str = "",
    ) -> torch.Tensor:
        """Run ``ids[first:]`` through the model in chunks of ``chunk_size`` after what the cache holds; returns
        the last token's logits. Raises ``Cancelled`` between chunks once ``cancel`` was called, and a
        RuntimeError on GPU out-of-memory, their messages ending with ``then`` (what the caller does about it:
        it puts the cache back)."""
        tensor = torch.tensor(ids, dtype=torch.long, device=self.device)
        logits = None
        for start in range(first, len(ids), self.chunk_size):
            if self._cancelled():
                raise Cancelled(f"pre-fill stopped after {start:,} of {len(ids):,} tokens; {then}")
            chunk = tensor[start : start + self.chunk_size]
            try:
                logits = self.model(chunk, self.cache, last_only=True)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                raise RuntimeError(
                    f"the GPU ran out of memory pre-filling tokens {start:,}+ of {len(ids):,}: lower chunk_size "
                    f"(now {self.chunk_size:,}) or max_tokens; {then}"
                ) from None
            self.prefilled_tokens += chunk.numel()
            if on_progress:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                on_progress(start + chunk.numel(), len(ids))
        return logits

    def _cancelled(self) -> bool:
        """Whether ``cancel`` stopped the running job; with context parallelism rank 0's flag, so that every rank
        stops at the same chunk or token."""
        cancelled = self._cancel.is_set()
        return cancelled if self.group is None else bool(self.group.from_leader(cancelled)[0])

    def _next_token(self, guard: AnswerGuard, logits: torch.Tensor, params: Sampling, gen) -> int | None:
        """The next answer token, or None when the job was cancelled. With context parallelism rank 0 samples and
        every rank takes its token: the ranks' logits agree, but which token comes next must not hang on rounding."""
        token = -1
        if (self.group is None or self.group.is_leader) and not self._cancel.is_set():
            token = sample(guard.adjust(logits[-1]), params.temperature, params.top_p, gen)
        if self.group is not None:
            token = self.group.from_leader(token)[0]
        return None if token < 0 else token

    def ask(
        self,
        question: str,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        conversation: Conversation | None = None,
        meta: dict | None = None,
        evidence: bool = False,
        **sampling: float | int | None,
    ) -> Iterator[str]:
        """Stream the answer to ``question`` about the ingested document as text pieces.

        ``sampling``: the fields of ``Sampling`` (temperature, top_p, repetition_penalty, no_repeat_ngram,
        repeat_stop, seed); unset ones take its chat defaults. They are checked here (ValueError). The stream is
        one job (see ``cancel``): it holds the engine from its first piece until it ends or is closed, so consume
        it on one thread and close it (``close()``, or a ``with contextlib.closing(...)``) when stopping early.

        With a ``conversation`` the question follows its earlier turns (the oldest are dropped when they no
        longer leave room for the question and ``max_new_tokens``), and the answer is added to it as a turn,
        with ``meta``, when the stream ends, however it ends. A question that does not fit in the room the
        document leaves is refused (``QuestionTooLong``) before any work; the document's checkpoint is restored
        before every question, so nothing an answer does reaches the next one except through its conversation.
        ``last.ended_by`` says how the answer ended. With ``evidence``, once the answer has ended (at its end or at
        a Stop; not when an error or a closed stream cut it off), one more pass finds the passages the retrieval
        heads attended to most while answering (``duo_qserve.evidence``) into ``last.evidence``; decoding is the
        same either way.
        """
        check_max_new_tokens(max_new_tokens)
        unknown = set(sampling) - set(Sampling.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown sampling parameters {sorted(unknown)}; known: {', '.join(Sampling.__dataclass_fields__)}"
            )
        params = Sampling(**sampling)
        if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a sequence of strings, got {stop!r}")
        if evidence and self.group is not None:
            raise ValueError("evidence is not available with context parallelism yet: ask without it")
        stream = self._answer(
            question, max_new_tokens, params, tuple(stop), conversation, meta or {}, evidence
        )
        return stream if self.group is None else self._to_the_end(stream)

    def _to_the_end(self, stream: Iterator[str]) -> Iterator[str]:
        """``stream`` that, closed early, still ends on every rank: it cancels and runs the answer on to its next
        token, where rank 0's cancel reaches the other ranks (closed at once, rank 0 would leave them waiting
        inside the next decode step's collective)."""
        ended = False
        try:
            for piece in stream:  # noqa: UP028 (``yield from`` would close ``stream`` with this generator)
                yield piece
            ended = True
        finally:
            if not ended:
                self.cancel()
                for _ in stream:
                    pass

    def _context(
        self, question: str, q_ids: list[int], max_new_tokens: int, conversation: Conversation | None
    ) -> tuple[list[Turn], int]:
        """The earlier turns the question follows and the answer's token budget, after dropping the oldest turns
        that leave no room for ``max_new_tokens``; ``QuestionTooLong`` when the question alone does not fit."""
        room = self.cache.max_tokens - self.document.tokens
        if len(q_ids) >= room:
            raise QuestionTooLong(question, len(q_ids), room, self.document.tokens)
        if conversation is None:
            return [], min(max_new_tokens, room - len(q_ids))
        turns = conversation.context(self.document.sha256)
        while turns and sum(len(t.ids) for t in turns) + len(q_ids) + max_new_tokens > room:
            conversation.drop_oldest()
            turns = turns[1:]
        history = sum(len(t.ids) for t in turns)
        return turns, min(max_new_tokens, room - history - len(q_ids))

    def _answer(
        self,
        question: str,
        max_new_tokens: int,
        params: Sampling,
        stop: tuple,
        conversation: Conversation | None,
        meta: dict,
        evidence: bool,
    ) -> Iterator[str]:
        with self.job(), torch.inference_mode():
            if self.document is None:
                raise RuntimeError("no document is loaded: ingest one first")
            doc = self.document
            t0 = time.perf_counter()
            q_ids = self.question_ids(question)
            dropped = conversation.dropped if conversation else 0
            history, max_new_tokens = self._context(question, q_ids, max_new_tokens, conversation)
            history_ids = [i for t in history for i in t.ids]
            self.cache.restore()
            self.conversation_in_cache = (len(history), len(history_ids))
            gen = torch.Generator(device=self.device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            stats = GenerationStats(
                question_tokens=len(q_ids),
                history_turns=len(history),
                history_tokens=len(history_ids),
                dropped_turns=(conversation.dropped if conversation else 0) - dropped,
                ended_by="cancel",
            )
            self.last = stats
            out_ids: list[int] = []
            text_so_far = ""
            ended = False  # the answer ran to its end (a Stop included), not out through an exception
            try:
                try:
                    logits = self._prefill(history_ids + q_ids, then="the document is kept")
                except Cancelled:
                    return
                guard = AnswerGuard(params, logits.shape[-1], self.device)
                t_first = None
                stats.ended_by = "max_tokens"
                for _ in range(max_new_tokens):
                    token = self._next_token(guard, logits, params, gen)
                    if token is None:
                        stats.ended_by = "cancel"
                        break
                    if t_first is None:
                        t_first = time.perf_counter()
                        stats.ttft_s = t_first - t0
                    if token in self._stop_ids:
                        stats.ended_by = "eos"
                        break
                    out_ids.append(token)
                    repeating = guard.add(token)
                    text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                    cut = _first_stop(text, stop)
                    piece_end = cut if cut is not None else len(text)
                    # A trailing U+FFFD is half a multi-byte character: wait for the rest.
                    if not text.endswith("\ufffd") or cut is not None:
                        if piece_end > len(text_so_far):  # shown once yielded: a stream closed there keeps it
                            piece, text_so_far = text[len(text_so_far) : piece_end], text[:piece_end]
                            yield piece
                    if cut is not None or repeating:
                        stats.ended_by = "stop" if cut is not None else "repetition"
                        break
                    if len(out_ids) == max_new_tokens:
                        break
                    logits = self._decode_step(token)
                    stats.answer_tokens = len(out_ids)
                stats.answer_tokens = len(out_ids)
                ended = True
                if t_first is not None and len(out_ids) > 1:
                    stats.decode_ms_per_token = (time.perf_counter() - t_first) * 1000 / (len(out_ids) - 1)
            except GeneratorExit:
                stats.ended_by = "cancel"  # the caller closed the stream
                raise
            finally:
                stats.answer_tokens = len(out_ids)
                if evidence and ended and out_ids:
                    t_evidence = time.perf_counter()
                    mass, focus = attention_mass(
                        self.model, self.cache, doc.tokens, history_ids + q_ids, out_ids, self.chunk_size
                    )
                    stats.evidence = top_passages(mass, focus, self.document_text_start)
                    stats.evidence_s = time.perf_counter() - t_evidence
                self.conversation_in_cache = (len(history), len(history_ids) + len(q_ids) + len(out_ids))
                if conversation is not None:
                    conversation.turns.append(
                        self._turn(question, q_ids, out_ids, text_so_far, doc, stats, meta)
                    )

    def _turn(
        self,
        question: str,
        q_ids: list[int],
        out_ids: list[int],
        text: str,
        doc: DocumentInfo,
        stats: GenerationStats,
        meta: dict,
    ) -> Turn:
        """The finished turn; its tokens are the answer's own where its text is all of them (an answer cut at a
        stop string or half a character is re-encoded from the text that was shown)."""
        shown = self.tokenizer.decode(out_ids, skip_special_tokens=True) == text
        answer_ids = out_ids if shown else self.encode(text)
        ids = q_ids + answer_ids + self.encode(self._turn_end)
        return Turn(question, text, doc.title, doc.sha256, ids, dict(vars(stats)), dict(meta))

    def _decode_step(self, token: int) -> torch.Tensor:
        """Logits [1, vocab] after one more token: a CUDA-graph replay where it can (the logits are then a
        buffer the next step overwrites), else the eager model step."""
        if not self.decode_graph:
            return self.model(torch.tensor([token], device=self.device), self.cache, last_only=True)
        if (
            self._decoder is None
            or self._decoder.cache is not self.cache
            or self._decoder.model is not self.model
        ):
            self._decoder = GraphedDecoder(self.model, self.cache)  # a new cache or model: capture again
        return self._decoder.step(token)

    def answer(self, question: str, **kwargs) -> str:
        return "".join(self.ask(question, **kwargs))

    # ---- reporting -------------------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def stats(self) -> dict:
        cache = self.cache.spec.bytes_by_component()
        mem = {"weights": self.weight_bytes(), **cache}
        if self.device.type == "cuda":
            used = torch.cuda.memory_allocated(self.device)
            mem["workspace"] = max(used - sum(mem.values()), 0)
            free, total = torch.cuda.mem_get_info(self.device)
            device_mem = {"kind": "gpu", "name": torch.cuda.get_device_name(self.device), "total": total,
                          "used": total - free, "peak_allocated": torch.cuda.max_memory_allocated(self.device)}  # fmt: skip
        else:
            rss = _process_rss()
            mem["workspace"] = max(rss - sum(mem.values()), 0)
            device_mem = {
                "kind": "cpu",
                "name": "CPU (process memory)",
                "total": _machine_memory(),
                "used": rss,
            }
        return {
            "model": self.loaded.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "w8a8": self.w8a8,
            "smoothquant": bool((getattr(self.model, "w8a8", None) or {}).get("smoothquant")),
            "rotated": bool((getattr(self.model, "w8a8", None) or {}).get("rotation")),
            "kv_bits": self.cache_config.kv_bits,
            "key_group": self.cache_config.key_group,
            "pattern": self.pattern.name,
            "sparsity": self.sparsity,
            "retrieval_heads": list(self.retrieval_heads),
            "sink_tokens": self.cache_config.sink_tokens,
            "recent_tokens": self.cache_config.recent_tokens,
            "context_tokens": self.cache.seq_len,
            "document_tokens": self.document.tokens if self.document else 0,
            "capacity_tokens": self.cache.max_tokens,
            "memory": mem,
            "device_memory": device_mem,
            "ranks": self._rank_stats(),
            "last_answer": vars(self.last).copy(),
            "prefill_tokens_per_s": (self.document.prefilled / self.document.prefill_seconds)
            if self.document and self.document.prefill_seconds
            else 0.0,
        }

    def _rank_stats(self) -> dict:
        """Capacity and memory per rank and over every rank (one rank without context parallelism). Every rank
        allocates the same tensors, so a total is the world size times one rank's: no collective, and ``stats``
        stays callable from any thread of any rank."""
        w, spec = self.shards.world_size, self.cache.spec
        per_rank = {"weights": self.weight_bytes(), **spec.bytes_by_component()}
        return {
            "world_size": w,
            "rank": self.group.rank if self.group else 0,
            "block_tokens": self.shards.block,
            "capacity_tokens": self.cache.max_tokens,
            "capacity_tokens_per_rank": self.shards.held(self.cache.max_tokens, 0),
            "held_tokens_per_rank": [self.shards.held(self.cache.seq_len, r) for r in range(w)],
            "memory_per_rank": per_rank,
            "memory_total": {name: n * w for name, n in per_rank.items()},
        }


def token_sha256(ids: Sequence[int]) -> str:
    """Identity of a tokenized document (sha256 of its int64 token ids): the library and the app match on it."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _process_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _machine_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
