"""Tokenizer loading and prompt datasets (vopd_megatron.data), with tokenizers
built in the test: a WordLevel/BPE `tokenizers` model, a Hugging Face directory
with a chat template in tokenizer_config.json, a sentencepiece model trained on
a few sentences. No downloads."""
import json

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, pre_tokenizers, processors, trainers  # noqa: E402

from vopd_megatron.data import check_compatible, load_prompt_dataset, load_tokenizer  # noqa: E402

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>",
         "hello", "world", "what", "is", "two", "plus", "three", "?", "be", "brief"]
CHAT_TEMPLATE = ("<s> {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog",
          "a stitch in time saves nine and the early bird catches the worm",
          "distillation moves knowledge from a teacher to a student model",
          "on policy sampling draws completions from the student itself"] * 4


def word_level(words=WORDS):
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def save_json(tok, path):
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face tokenizer directory with a chat template."""
    d = tmp_path_factory.mktemp("hf_tok")
    t = word_level()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    save_json(t, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def tok(hf_dir):
    return load_tokenizer(hf_dir)


def train_sentencepiece(prefix, sentences, vocab_size):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(prefix),
                                   vocab_size=vocab_size, model_type="bpe", minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tok", CORPUS, 48)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write(path, records):
    if path.suffix == ".parquet":
        keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist keeps row 0's keys only
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
        return path
    return write_jsonl(path, records)


# --- tokenizers ------------------------------------------------------------

def test_tokenizer_json_file(tmp_path):
    vocab = {w: i for i, w in enumerate(WORDS)}
    t = load_tokenizer(save_json(word_level(), tmp_path / "tokenizer.json"))
    assert t.vocab_size == len(WORDS)
    assert t.encode("hello world ?") == [vocab["hello"], vocab["world"], vocab["?"]]
    assert not t.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hello"}])


def test_hf_directory_chat_template(tok):
    vocab = {w: i for i, w in enumerate(WORDS)}
    assert tok.eos_id == vocab["</s>"]
    assert tok.encode("hello world") == [vocab["<s>"], vocab["hello"], vocab["world"]]
    assert tok.encode("hello world", add_special_tokens=False) == [vocab["hello"], vocab["world"]]
    ids = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "what is two plus three ?"}])
    expected = ["<s>", "<|system|>", "be", "brief", "<|user|>", "what", "is", "two", "plus", "three", "?",
                "<|assistant|>"]
    assert ids == [vocab[w] for w in expected]


def test_sentencepiece_model(sp_model):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    t = load_tokenizer(sp_model)
    text = "the student samples from itself"
    assert t.vocab_size == ref.get_piece_size() == 48
    assert t.encode(text, add_special_tokens=False) == ref.encode(text)
    assert t.encode(text) == [ref.bos_id()] + ref.encode(text)
    assert t.eos_id == ref.eos_id()
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": text}])
    # A directory holding only tokenizer.model is the same tokenizer.
    d = sp_model.parent / "dir"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert load_tokenizer(d).fingerprint() == t.fingerprint()


def test_missing_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.json")):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="has none of"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")


# --- compatibility ---------------------------------------------------------

def test_compatible_identical(tmp_path, hf_dir, sp_model):
    a = load_tokenizer(hf_dir)
    b = load_tokenizer(save_json(word_level(), tmp_path / "tokenizer.json"))  # same table, other format
    check_compatible(a, b)
    assert a.fingerprint() == b.fingerprint()
    check_compatible(load_tokenizer(sp_model), load_tokenizer(sp_model))


def test_incompatible_vocab_size(tmp_path, tok):
    other = load_tokenizer(save_json(word_level(WORDS + ["extra"]), tmp_path / "t.json"))
    with pytest.raises(ValueError, match=r"vocabulary sizes differ \(16 vs 17\)"):
        check_compatible(tok, other)


def test_incompatible_permuted_table(tmp_path, tok):
    permuted = WORDS[:6] + WORDS[6:][::-1]  # same tokens, other ids
    other = load_tokenizer(save_json(word_level(permuted), tmp_path / "t.json"))
    with pytest.raises(ValueError, match="different id -> token tables"):
        check_compatible(tok, other)


def test_incompatible_merges(tmp_path):
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}
    x = load_tokenizer(save_json(HFTokenizer(models.BPE(vocab, [("a", "b")])), tmp_path / "x.json"))
    y = load_tokenizer(save_json(HFTokenizer(models.BPE(vocab, [("b", "c")])), tmp_path / "y.json"))
    assert x.encode("abc") != y.encode("abc")
    with pytest.raises(ValueError, match="different merges"):
        check_compatible(x, y)


def test_incompatible_trained(tmp_path, sp_model):
    bpe = HFTokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    other_sp = train_sentencepiece(tmp_path / "other", CORPUS[:2] * 4, 40)
    with pytest.raises(ValueError, match="incompatible"):
        check_compatible(load_tokenizer(save_json(bpe, tmp_path / "bpe.json")),
                         load_tokenizer(save_json(word_level(), tmp_path / "wl.json")))
    with pytest.raises(ValueError, match="incompatible"):
        check_compatible(load_tokenizer(sp_model), load_tokenizer(other_sp))


# --- prompt datasets -------------------------------------------------------

MIXED = [{"prompt": "hello world"},
         {"messages": [{"role": "user", "content": "what is two plus three ?"}]},
         {"prompt_ids": [6, 7, 6]}]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip_mixed_forms(tmp_path, tok, suffix):
    path = write(tmp_path / f"p{suffix}", MIXED)
    prompts, report = load_prompt_dataset(path, tok, max_prompt_tokens=64)
    assert prompts == [tok.encode("hello world"),
                       tok.apply_chat_template(MIXED[1]["messages"]),
                       [6, 7, 6]]
    assert report["total"] == report["kept"] == 3 and report["skipped_too_long"] == 0
    assert report["forms"] == {"text": 1, "chat": 1, "ids": 1}


def test_jsonl_and_parquet_agree(tmp_path, tok):
    records = [{"prompt": " ".join(["hello"] * n)} for n in range(1, 6)] + MIXED
    a = load_prompt_dataset(write(tmp_path / "p.jsonl", records), tok, 64)
    b = load_prompt_dataset(write(tmp_path / "p.parquet", records), tok, 64)
    assert a[0] == b[0] and a[1]["forms"] == b[1]["forms"]


def test_chat_template_for_text_prompts(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "what is two plus three ?"}])
    plain, _ = load_prompt_dataset(path, tok, 64, prompt_field="question")
    chat, report = load_prompt_dataset(path, tok, 64, prompt_field="question", use_chat_template=True)
    assert plain == [tok.encode("what is two plus three ?")]
    assert chat == [tok.apply_chat_template([{"role": "user", "content": "what is two plus three ?"}])]
    assert chat != plain and report["forms"] == {"chat": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_budget_skips_and_counts(tmp_path, tok, suffix):
    lengths = [1, 5, 3, 4, 2, 6]
    budget = 3
    path = write(tmp_path / f"p{suffix}", [{"prompt_ids": list(range(n))} for n in lengths])
    prompts, report = load_prompt_dataset(path, tok, max_prompt_tokens=budget)
    assert [len(p) for p in prompts] == [n for n in lengths if n <= budget]  # order kept, boundary kept
    assert report["skipped_too_long"] == sum(n > budget for n in lengths)
    assert report["kept"] + report["skipped_too_long"] == report["total"] == len(lengths)


def test_all_too_long(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world what"}])
    with pytest.raises(ValueError, match="none of its 1 prompts fits in 2 tokens"):
        load_prompt_dataset(path, tok, 2)


@pytest.mark.parametrize("suffix,where", [(".jsonl", ":2"), (".parquet", " row 1")])
def test_missing_prompt_field(tmp_path, tok, suffix, where):
    path = write(tmp_path / f"p{suffix}", [{"question": "hello"}, {"answer": "world"}])
    with pytest.raises(ValueError, match=f"{where}: missing prompt field 'question'"):
        load_prompt_dataset(path, tok, 64, prompt_field="question")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_empty_dataset(tmp_path, tok, suffix):
    path = tmp_path / f"p{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    else:
        path.write_text("\n  \n")
    with pytest.raises(ValueError, match="has no records"):
        load_prompt_dataset(path, tok, 64)


def test_unknown_extension_and_missing_file(tmp_path, tok):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhello\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'"):
        load_prompt_dataset(csv, tok, 64)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_dataset(tmp_path / "nope.jsonl", tok, 64)


def test_text_needs_tokenizer(tmp_path):
    ids_only = write_jsonl(tmp_path / "ids.jsonl", [{"prompt_ids": [1, 2]}])
    assert load_prompt_dataset(ids_only, None, 64)[0] == [[1, 2]]
    for rec in ({"prompt": "hello"}, {"messages": [{"role": "user", "content": "hello"}]}):
        path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": [1]}, rec])
        with pytest.raises(ValueError, match=r"p\.jsonl:2: a (text|chat) prompt needs a tokenizer"):
            load_prompt_dataset(path, None, 64)


def test_chat_without_template(tmp_path):
    t = load_tokenizer(save_json(word_level(), tmp_path / "tokenizer.json"))
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hello"}]}])
    with pytest.raises(ValueError, match="no chat template"):
        load_prompt_dataset(path, t, 64)


def test_bad_records(tmp_path, tok):
    cases = [({"prompt": ""}, "empty prompt"),
             ({"prompt_ids": [1, 99]}, r"outside the vocabulary \[0, 16\)"),
             ({"messages": [{"role": "user"}]}, "needs 'role' and 'content'"),
             ({"prompt": 3}, "neither a string")]
    for rec, msg in cases:
        path = write_jsonl(tmp_path / "p.jsonl", [rec])
        with pytest.raises(ValueError, match=msg):
            load_prompt_dataset(path, tok, 64, vocab_size=tok.vocab_size)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hello"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_prompt_dataset(tmp_path / "bad.jsonl", tok, 64)


@pytest.mark.parametrize("chat", [False, True])
def test_sft_prompts_are_tokenized_as_training_prompts_and_eval_problems(tmp_path, tok, chat):
    """The same text gives the same ids as a vopd-sft prompt, a vopd-train prompt and an
    evaluation problem, with a tokenizer that adds a BOS (and through the chat template):
    a teacher or warm-up trained by vopd-sft sees its prompts in the form it is sampled
    and evaluated with. The completion continues the sequence: no BOS of its own."""
    from vopd_megatron.eval import load_eval_problems
    from vopd_megatron.training.sft import load_sft_rows

    text = "what is two plus three ?"
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": text, "completion": "hello world"}])
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text}])
    write_jsonl(tmp_path / "eval.jsonl", [{"problem": text, "answer": "5"}])
    eos, bos = WORDS.index("</s>"), WORDS.index("<s>")
    (row,) = load_sft_rows(tmp_path / "sft.jsonl", tok, eos, seq_length=64, use_chat_template=chat)
    (train,), _ = load_prompt_dataset(tmp_path / "prompts.jsonl", tok, 64, use_chat_template=chat)
    (problem,), _ = load_eval_problems(tmp_path / "eval.jsonl", tok, 64, use_chat_template=chat)
    assert row.prompt_ids == train == problem.prompt_ids
    assert row.prompt_ids[0] == bos and row.prompt_ids.count(bos) == 1
    assert (WORDS.index("<|user|>") in row.prompt_ids) == chat
    assert row.completion_ids == [WORDS.index("hello"), WORDS.index("world"), eos]
