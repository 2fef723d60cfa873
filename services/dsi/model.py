"""The DSI models: a small T5 trained from a config (MiniLM tokenizer) and, for the measured
comparison, SmolLM2-135M fine-tuned as a decoder-only docid generator.

Both spell a docid with dedicated tokens appended to the vocabulary (``<d0>``, ``<d1>``, ...)
plus an end token, and both decode with the same trie-constrained beam search: at every step the
logits are masked to the trie children of each beam's prefix, so only valid docids come out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from services.dsi.docids import Docid, Trie

#: Tokens of the document text fed to the indexing task (DSI's L).
DEFAULT_DOC_TOKENS = 32
#: Tokens of a query fed to the retrieval task.
DEFAULT_QUERY_TOKENS = 32


def text_tokenizer() -> Any:
    """The MiniLM word-piece tokenizer (shipped with the embedder package, so offline)."""
    from transformers import AutoTokenizer

    from shared.models import embedder_path

    return AutoTokenizer.from_pretrained(str(embedder_path()))


@dataclass(frozen=True)
class T5Shape:
    """Size of the from-scratch T5; the defaults train on two CPU cores in minutes."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1


class DsiModel(Protocol):
    """What training and decoding need from a docid generator."""

    def ensure_docid_tokens(self, count: int) -> None: ...

    def loss(
        self, texts: Sequence[str], docids: Sequence[Docid], max_tokens: int
    ) -> torch.Tensor: ...

    def parameters(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def symbols(self, docid: Docid) -> list[int]: ...

    def docid_of_symbols(self, symbols: Sequence[int]) -> Docid: ...

    def beam_search(
        self, texts: Sequence[str], trie: Trie, beam: int, max_tokens: int, max_steps: int
    ) -> list[list[tuple[list[int], float]]]: ...


class _DocidVocabulary:
    """Docid tokens ``base + value`` appended to the text vocabulary, plus the end token.

    Decoding works in a small *symbol* space (symbol 0 = end, symbol ``v + 1`` = docid value
    ``v``): the output layer is evaluated only on those rows, because constrained decoding can
    never pick any other token and a 30k-way softmax per step would dominate CPU training.
    """

    base_vocab: int
    n_docid_tokens: int
    end_id: int
    model: Any  # the wrapped transformers model

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    def parameters(self) -> Any:
        return self.model.parameters()

    def train(self, mode: bool = True) -> Any:
        return self.model.train(mode)

    def symbols(self, docid: Docid) -> list[int]:
        return [part + 1 for part in docid] + [0]

    def docid_of_symbols(self, symbols: Sequence[int]) -> Docid:
        return tuple(s - 1 for s in symbols if s != 0)

    def symbol_token_ids(self) -> torch.Tensor:
        """Token id of every symbol, indexed by symbol."""
        return torch.tensor(
            [self.end_id, *range(self.base_vocab, self.base_vocab + self.n_docid_tokens)]
        )


def _constrained_beam_search(
    step_logprobs: Any,
    batch: int,
    trie: Trie,
    beam: int,
    max_steps: int,
    n_symbols: int,
    device: torch.device,
) -> list[list[tuple[list[int], float]]]:
    """Beam search where each beam may only take a child of its prefix in ``trie``.

    ``step_logprobs(beam_rows, prefixes)`` returns log-probabilities ``(len(prefixes), n_symbols)``
    of the next symbol for symbol prefixes of the given query rows. Finished beams (last symbol
    0, the end) carry forward with their score unchanged. Returns, per query, up to ``beam``
    complete symbol sequences with their summed log-probabilities, best first.
    """
    prefixes: list[list[int]] = [[] for _ in range(batch)]
    rows = list(range(batch))
    scores = torch.zeros(batch, device=device)
    for _ in range(max_steps):
        finished = [bool(p) and p[-1] == 0 for p in prefixes]
        if all(finished):
            break
        logprobs = step_logprobs(rows, prefixes).float()
        mask = torch.full_like(logprobs, float("-inf"))
        for i, prefix in enumerate(prefixes):
            if finished[i]:
                mask[i, 0] = 0.0
                logprobs[i, 0] = 0.0
            else:
                allowed = trie.children(prefix)
                if allowed:
                    mask[i, allowed] = 0.0
        candidate = scores[:, None] + logprobs + mask  # (beams, n_symbols)
        new_prefixes: list[list[int]] = []
        new_rows: list[int] = []
        new_scores: list[torch.Tensor] = []
        members_of: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            members_of.setdefault(row, []).append(i)
        for query in range(batch):
            members = members_of.get(query, [])
            if not members:
                continue
            block = candidate[members].reshape(-1)
            top = torch.topk(block, min(beam, block.numel()))
            for value, flat in zip(top.values, top.indices.tolist(), strict=True):
                if not torch.isfinite(value):
                    continue
                source = members[flat // n_symbols]
                symbol = flat % n_symbols
                base = prefixes[source]
                new_prefixes.append(base if finished[source] else [*base, symbol])
                new_rows.append(query)
                new_scores.append(value)
        if not new_prefixes:
            return [[] for _ in range(batch)]
        prefixes, rows = new_prefixes, new_rows
        scores = torch.stack(new_scores)
    results: list[list[tuple[list[int], float]]] = [[] for _ in range(batch)]
    for prefix, row, score in zip(prefixes, rows, scores.tolist(), strict=True):
        if prefix and prefix[-1] == 0 and trie.contains(prefix):
            results[row].append((prefix, float(score)))
    for ranked in results:
        ranked.sort(key=lambda item: -item[1])
    return results


class T5Dsi(_DocidVocabulary):
    """A T5 encoder-decoder initialised at random from a config, over the MiniLM vocabulary.

    ``docid_head=True`` (the DSI model) unties the output layer and evaluates it only on docid
    symbols; ``False`` (the query generator) keeps T5's usual tied text-to-text head.
    """

    kind = "t5"

    def __init__(
        self,
        shape: T5Shape = T5Shape(),
        tokenizer: Any = None,
        seed: int = 0,
        *,
        docid_head: bool = True,
    ) -> None:
        from transformers import T5Config, T5ForConditionalGeneration

        self.tokenizer = tokenizer if tokenizer is not None else text_tokenizer()
        self.shape = shape
        self.docid_head = docid_head
        self.base_vocab = len(self.tokenizer)
        self.n_docid_tokens = 0
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.end_id = int(self.tokenizer.sep_token_id)
        config_fields: dict[str, Any] = dict(
            vocab_size=self.base_vocab,
            d_model=shape.d_model,
            d_kv=shape.d_model // shape.heads,
            d_ff=shape.d_ff,
            num_layers=shape.layers,
            num_decoder_layers=shape.layers,
            num_heads=shape.heads,
            dropout_rate=shape.dropout,
            pad_token_id=self.pad_id,
            eos_token_id=self.end_id,
            decoder_start_token_id=self.pad_id,
            tie_word_embeddings=not docid_head,
        )
        config = T5Config(**config_fields)
        torch.manual_seed(seed)
        # transformers' stubs are partial; the model is used through its documented API.
        self.model: Any = T5ForConditionalGeneration(config)

    def ensure_docid_tokens(self, count: int) -> None:
        """Grow the vocabulary (embeddings and head) so docid values ``0..count-1`` have tokens.
        Old rows are kept, so earlier docids keep what they learned (DSI++ resizes per corpus)."""
        if count <= self.n_docid_tokens:
            return
        old = self.base_vocab + self.n_docid_tokens
        self.model.resize_token_embeddings(self.base_vocab + count, mean_resizing=False)
        with torch.no_grad():
            for weights in (
                self.model.get_input_embeddings().weight,
                self.model.get_output_embeddings().weight,
            ):
                weights[old:] = torch.randn_like(weights[old:]) * weights[: self.base_vocab].std()
        self.n_docid_tokens = count

    def _encode(self, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), max_length=max_tokens, truncation=True, padding=True, return_tensors="pt"
        )
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def _symbol_logits(
        self,
        encoded: torch.Tensor,
        attention_mask: torch.Tensor,
        prefixes: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Logits over symbols at every decoder position for right-padded symbol prefixes
        (each decoder input starts with T5's start token, then the prefix's docid tokens)."""
        token_of = self.symbol_token_ids().to(self.device)
        width = max(len(p) for p in prefixes) + 1
        decoder_ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.long)
        for i, prefix in enumerate(prefixes):
            if prefix:
                decoder_ids[i, 1 : len(prefix) + 1] = token_of[torch.tensor(list(prefix))]
        decoder_ids = decoder_ids.to(self.device)
        hidden = self.model.get_decoder()(
            input_ids=decoder_ids,
            encoder_hidden_states=encoded,
            encoder_attention_mask=attention_mask,
        ).last_hidden_state
        head = self.model.get_output_embeddings().weight[token_of]
        # T5's own tied head rescales by d_model ** -0.5; without it the random init starts
        # with huge logits (initial loss ~100 instead of ~log(symbols)).
        logits: torch.Tensor = (hidden * self.shape.d_model**-0.5) @ head.T
        return logits

    def loss(self, texts: Sequence[str], docids: Sequence[Docid], max_tokens: int) -> torch.Tensor:
        inputs = self._encode(texts, max_tokens)
        encoded = self.model.get_encoder()(**inputs).last_hidden_state
        targets = [self.symbols(d) for d in docids]
        # Teacher forcing: the decoder sees the target minus its last symbol.
        logits = self._symbol_logits(encoded, inputs["attention_mask"], [t[:-1] for t in targets])
        width = logits.shape[1]
        labels = torch.full((len(targets), width), -100, dtype=torch.long)
        for i, target in enumerate(targets):
            labels[i, : len(target)] = torch.tensor(target)
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1).to(self.device),
            ignore_index=-100,
        )

    def seq2seq_loss(
        self, sources: Sequence[str], targets: Sequence[str], max_tokens: int
    ) -> torch.Tensor:
        """Text-to-text loss over the full vocabulary (the query generator)."""
        inputs = self._encode(sources, max_tokens)
        target = self.tokenizer(
            list(targets), max_length=max_tokens, truncation=True, padding=True, return_tensors="pt"
        )["input_ids"][:, 1:]  # drop [CLS]; the decoder starts from pad
        labels = target.masked_fill(target == self.pad_id, -100)
        loss: torch.Tensor = self.model(**inputs, labels=labels.to(self.device)).loss
        return loss

    @torch.no_grad()
    def beam_search(
        self, texts: Sequence[str], trie: Trie, beam: int, max_tokens: int, max_steps: int
    ) -> list[list[tuple[list[int], float]]]:
        self.model.eval()
        inputs = self._encode(texts, max_tokens)
        encoded = self.model.get_encoder()(**inputs).last_hidden_state

        def step_logprobs(rows: list[int], prefixes: list[list[int]]) -> torch.Tensor:
            index = torch.tensor(rows, device=self.device)
            logits = self._symbol_logits(encoded[index], inputs["attention_mask"][index], prefixes)
            last = torch.tensor([len(p) for p in prefixes], device=self.device)
            picked = logits[torch.arange(len(prefixes), device=self.device), last]
            return torch.log_softmax(picked, dim=-1)

        return _constrained_beam_search(
            step_logprobs, len(texts), trie, beam, max_steps, self.n_docid_tokens + 1, self.device
        )

    @torch.no_grad()
    def generate_text(
        self, sources: Sequence[str], max_tokens: int, count: int, max_new_tokens: int, seed: int
    ) -> list[list[str]]:
        """Sample ``count`` texts per source (the query generator's doc -> query)."""
        self.model.eval()
        torch.manual_seed(seed)
        inputs = self._encode(sources, max_tokens)
        output = self.model.generate(
            **inputs,
            do_sample=True,
            top_k=20,
            no_repeat_ngram_size=2,  # a small generator otherwise loops on one word
            num_return_sequences=count,
            max_new_tokens=max_new_tokens,
        )
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [texts[i * count : (i + 1) * count] for i in range(len(sources))]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / "model.pt")
        meta = {
            "shape": asdict(self.shape),
            "n_docid_tokens": self.n_docid_tokens,
            "docid_head": self.docid_head,
        }
        (directory / "model.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, tokenizer: Any = None) -> T5Dsi:
        meta = json.loads((directory / "model.json").read_text())
        model = cls(T5Shape(**meta["shape"]), tokenizer, docid_head=bool(meta["docid_head"]))
        model.ensure_docid_tokens(int(meta["n_docid_tokens"]))
        state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        model.model.load_state_dict(state)
        return model

    def copy(self) -> T5Dsi:
        clone = T5Dsi(self.shape, self.tokenizer, docid_head=self.docid_head)
        clone.ensure_docid_tokens(self.n_docid_tokens)
        clone.model.load_state_dict(self.model.state_dict())
        return clone


class CausalDsi(_DocidVocabulary):
    """SmolLM2-135M fine-tuned to continue ``<text> =>`` with docid tokens (decoder-only DSI)."""

    kind = "smollm2"

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        embeddings: Any = self.model.get_input_embeddings()
        self.base_vocab = int(embeddings.weight.shape[0])
        self.n_docid_tokens = 0
        self.end_id = int(self.tokenizer.eos_token_id)
        self.pad_id = self.end_id
        self.separator: list[int] = self.tokenizer(" =>", add_special_tokens=False)["input_ids"]

    def ensure_docid_tokens(self, count: int) -> None:
        if count <= self.n_docid_tokens:
            return
        self.model.resize_token_embeddings(self.base_vocab + count, mean_resizing=True)
        self.n_docid_tokens = count

    def _prompt(self, text: str, max_tokens: int) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        return ids + self.separator

    def _last_symbol_logits(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Symbol logits after the last token of each token sequence (left-padded batch)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) :] = torch.tensor(list(seq))
            mask[i, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
        ).last_hidden_state
        head = self.model.get_output_embeddings().weight[self.symbol_token_ids().to(self.device)]
        logits: torch.Tensor = hidden[:, -1] @ head.T
        return logits

    def loss(self, texts: Sequence[str], docids: Sequence[Docid], max_tokens: int) -> torch.Tensor:
        """Cross-entropy over symbols for each docid position (teacher forcing, one pass)."""
        token_of = self.symbol_token_ids()
        rows: list[tuple[list[int], list[int]]] = []
        for text, docid in zip(texts, docids, strict=True):
            prompt = self._prompt(text, max_tokens)
            target = self.symbols(docid)
            tokens = [int(token_of[s]) for s in target]
            rows.append((prompt + tokens[:-1], target))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row_ids, target) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            mask[i, : len(row_ids)] = 1
            # position p predicts token p + 1: the docid starts after the prompt's last token
            first = len(row_ids) - len(target)
            labels[i, first : first + len(target)] = torch.tensor(target)
        hidden = self.model.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        head = self.model.get_output_embeddings().weight[token_of.to(self.device)]
        logits = hidden @ head.T
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1).to(self.device),
            ignore_index=-100,
        )

    @torch.no_grad()
    def beam_search(
        self, texts: Sequence[str], trie: Trie, beam: int, max_tokens: int, max_steps: int
    ) -> list[list[tuple[list[int], float]]]:
        self.model.eval()
        prompts = [self._prompt(t, max_tokens) for t in texts]
        token_of = self.symbol_token_ids()

        def step_logprobs(rows: list[int], prefixes: list[list[int]]) -> torch.Tensor:
            sequences = [
                prompts[r] + [int(token_of[s]) for s in p]
                for r, p in zip(rows, prefixes, strict=True)
            ]
            return torch.log_softmax(self._last_symbol_logits(sequences), dim=-1)

        return _constrained_beam_search(
            step_logprobs, len(texts), trie, beam, max_steps, self.n_docid_tokens + 1, self.device
        )


def build_trie(model: _DocidVocabulary, docids: Sequence[Docid]) -> Trie:
    trie = Trie()
    for docid in docids:
        trie.add(model.symbols(docid))
    return trie


def max_decode_steps(docids: Sequence[Docid]) -> int:
    return max((len(d) for d in docids), default=0) + 1


def lr_for_step(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up then constant (small DSI models need a high, steady rate)."""
    return base_lr * min(1.0, (step + 1) / max(1, warmup)) if warmup else base_lr
