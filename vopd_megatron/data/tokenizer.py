"""One small tokenizer interface over the formats prompts arrive in.

The trainer needs four things from a tokenizer: text -> ids (`encode`), chat
messages -> ids (`apply_chat_template`), the EOS id that stops a completion,
and the vocabulary size to check token ids against the model. `load_tokenizer`
accepts

- a `tokenizer.json` file (Hugging Face `tokenizers`),
- a directory of Hugging Face tokenizer files (`AutoTokenizer`, local files
  only; brings the chat template of `tokenizer_config.json` /
  `chat_template.jinja` when there is one),
- a sentencepiece `*.model` file (or a directory holding only
  `tokenizer.model`), as Megatron-LM's `--tokenizer-model`.

`fingerprint()` summarises the vocabulary (id -> token string) and the rules
that segment text (BPE merges, or sentencepiece scores) as hashes, so that the
student's and the teacher's tokenizers can be compared: the distillation loss
pairs their logits token id by token id, which is meaningless unless both
vocabularies are the same table (`check_compatible`).

Hugging Face backends are imported lazily: `transformers` is needed only when
a Hugging Face tokenizer is loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, MissingDependency, MissingFileError


@dataclass(frozen=True)
class Fingerprint:
    kind: str
    """Backend: "hf" or "sentencepiece"."""
    vocab_size: int
    """Token ids in [0, vocab_size) are valid (added tokens included)."""
    vocab_sha: str
    """sha256 of the id -> token string table."""
    segmentation_sha: str | None
    """sha256 of the merges (BPE) or piece scores (sentencepiece); None if unknown."""


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


class Tokenizer:
    """What the trainer uses of a tokenizer; build it with `load_tokenizer`."""

    def __init__(self, path: Path, *, hf=None, sp=None):
        assert (hf is None) != (sp is None)
        self.path, self._hf, self._sp = path, hf, sp

    @property
    def vocab_size(self) -> int:
        return len(self._hf) if self._hf is not None else self._sp.get_piece_size()

    @property
    def eos_id(self) -> int | None:
        if self._hf is not None:
            return self._hf.eos_token_id
        eos = self._sp.eos_id()
        return eos if eos >= 0 else None

    @property
    def has_chat_template(self) -> bool:
        return self._hf is not None and bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer adds
        to a sequence on its own (Hugging Face post-processor; BOS for a
        sentencepiece model that defines one)."""
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=add_special_tokens))
        ids = self._sp.encode(text)
        bos = self._sp.bos_id()
        return [bos] + ids if add_special_tokens and bos >= 0 else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens such as EOS dropped by default): what graders read."""
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [t for t in ids if not (self._sp.is_control(t) or self._sp.is_unknown(t))]
        return self._sp.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat (`[{"role": ..., "content": ...}]`) rendered by the
        tokenizer's template, ending with the assistant turn's opening."""
        if not self.has_chat_template:
            raise ValueError(f"tokenizer {self.path} has no chat template (a Hugging Face tokenizer "
                             "directory whose tokenizer_config.json has a 'chat_template' provides one)")
        # Render to text, then encode without special tokens: the template
        # writes its own BOS, and encode's would double it.
        text = self._hf.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def fingerprint(self) -> Fingerprint:
        if self._hf is not None:
            vocab = sorted(self._hf.get_vocab().items(), key=lambda kv: kv[1])
            seg = None
            backend = getattr(self._hf, "backend_tokenizer", None)
            if backend is not None:
                model = json.loads(backend.to_str())["model"]
                seg = _sha([model.get("type"), model.get("merges")])
            return Fingerprint("hf", self.vocab_size, _sha(vocab), seg)
        n = self._sp.get_piece_size()
        pieces = [self._sp.id_to_piece(i) for i in range(n)]
        scores = [self._sp.get_score(i) for i in range(n)]
        return Fingerprint("sentencepiece", n, _sha(list(enumerate(pieces))), _sha(scores))

    def __repr__(self):
        backend = "hf" if self._hf is not None else "sentencepiece"
        return f"Tokenizer({str(self.path)!r}, {backend}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `Tokenizer` from a tokenizer.json, a Hugging Face tokenizer directory,
    or a sentencepiece model file. A file that does not parse as what it claims
    to be is a `DataError` naming it (never the backend's bare exception)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"tokenizer {path} does not exist")
    if path.is_dir():
        hf_files = [f for f in ("tokenizer_config.json", "tokenizer.json") if (path / f).is_file()]
        if hf_files:
            return Tokenizer(path, hf=_parsed(path, "a Hugging Face tokenizer directory", _auto_tokenizer))
        if (path / "tokenizer.model").is_file():
            return Tokenizer(path, sp=_sentencepiece(path / "tokenizer.model"))
        raise MissingFileError(f"tokenizer directory {path} has none of tokenizer_config.json, "
                               "tokenizer.json, tokenizer.model")
    if path.suffix == ".json":
        return Tokenizer(path, hf=_parsed(path, "a Hugging Face tokenizer.json", _fast_tokenizer))
    return Tokenizer(path, sp=_sentencepiece(path))  # Megatron's --tokenizer-model: a .model file


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int | None, flag: str = "--vocab-size") -> None:
    """DataError if the tokenizer can produce ids the model has no row for
    (a model may have more rows than the tokenizer has tokens, not fewer)."""
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but {flag} is "
                        f"{vocab_size}: ids {vocab_size}..{tokenizer.vocab_size - 1} have no row in the model "
                        f"(set {flag} to at least {tokenizer.vocab_size})")


def check_compatible(student: Tokenizer, teacher: Tokenizer) -> None:
    """Raise DataError unless both tokenizers map the same ids to the same tokens
    (and, where both formats expose it, segment text the same way)."""
    a, b = student.fingerprint(), teacher.fingerprint()
    problems = []
    if a.vocab_size != b.vocab_size:
        problems.append(f"vocabulary sizes differ ({a.vocab_size} vs {b.vocab_size})")
    elif a.vocab_sha != b.vocab_sha:
        problems.append("same size but different id -> token tables")
    if a.kind == b.kind and a.segmentation_sha != b.segmentation_sha:
        problems.append("different merges/scores (the same text would tokenize differently)")
    if problems:
        raise DataError(f"student tokenizer {student.path} and teacher tokenizer {teacher.path} are "
                         f"incompatible: {'; '.join(problems)}. Distillation compares logits token id by "
                         "token id, so both models need the same tokenizer.")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependency("loading a Hugging Face tokenizer needs `transformers` "
                                "(pip install transformers)") from None
    return transformers


def _auto_tokenizer(path: Path):
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        file = path / name
        if file.is_file():  # name the broken file, not just the directory
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"tokenizer file {file} is not valid JSON ({exc})") from None
    return _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _fast_tokenizer(path: Path):
    return _transformers().PreTrainedTokenizerFast(tokenizer_file=str(path))


def _parsed(path: Path, what: str, load):
    """load(path), with any parse failure of the backend reported as a DataError naming the file."""
    try:
        return load(path)
    except (MissingDependency, DataError):
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers/transformers raise bare Exception subclasses
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"tokenizer {path} cannot be read as {what} (corrupt or not a tokenizer?): {detail}") from exc


def _sentencepiece(path: Path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as exc:
        raise DataError(f"tokenizer {path} is not a sentencepiece model ({exc})") from None
    return sp
