"""Record formats and chat templates: normalisation of real datasets, exact assistant masks."""

from __future__ import annotations

import json

import pytest

from lmpipe.data.adapters import gsm8k_model_solutions
from lmpipe.data.formats import SkipRecord, detect_format, encode_record, normalize
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "tool", "content": "calculator: 5"},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "It is 8."},
]

# ChatML as Qwen ships it (the template text is the de-facto standard format).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bpe(texts=None) -> Tokenizer:
    corpus = texts or [m["content"] for m in CONVERSATION] * 20
    return Tokenizer.train_bpe(corpus, vocab_size=300)


def _masked_text(tok: Tokenizer, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)


def test_builtin_template_masks_exactly_the_assistant_turns():
    tok = _bpe()
    ids, mask = tok.encode_chat(CONVERSATION)
    assert _masked_text(tok, ids, mask) == "2 plus 3 is 5.<|end|>It is 8.<|end|>"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|bos|><|system|>You are terse.<|end|><|user|>What is 2 plus 3?<|end|>"
        "<|assistant|>2 plus 3 is 5.<|end|><|tool|>calculator: 5<|end|>"
        "<|user|>And 4 plus 4?<|end|><|assistant|>It is 8.<|end|><|eos|>"
    )
    _, last_only = tok.encode_chat(CONVERSATION, train_on="last")
    assert _masked_text(tok, ids, last_only) == "It is 8.<|end|>"


def test_hf_chat_template_masks_assistant_content_and_end_token(tmp_path):
    """An HF tokenizer with its own chat template: lmpipe renders exactly what
    transformers' apply_chat_template renders, and masks content + <|im_end|>."""
    from transformers import PreTrainedTokenizerFast

    base = _bpe()
    base.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    base.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"})
    )
    tok = Tokenizer.from_pretrained(str(tmp_path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf.chat_template = CHATML
    assert tok.render_chat(CONVERSATION) == hf.apply_chat_template(CONVERSATION, tokenize=False)
    ids, mask = tok.encode_chat(CONVERSATION)
    assert _masked_text(tok, ids, mask) == "2 plus 3 is 5.<|im_end|>It is 8.<|im_end|>"
    assert tok.turn_end_id == tok.backend.token_to_id("<|im_end|>")
    tok.save(tmp_path / "saved")
    assert Tokenizer.load(tmp_path / "saved").hash == tok.hash


def test_real_multiturn_alpaca_and_gsm8k_records(shared_data):
    """Real records: a GSM8K question/answer via field mapping and an Alpaca seed task
    become chats whose masked tokens are exactly the answers."""
    gsm = json.loads((shared_data / "gsm8k" / "train.jsonl").open().readline())
    seed = json.loads((shared_data / "alpaca_seed" / "seed_tasks.jsonl").open().readline())
    chat_a = normalize(gsm, "chat", "gsm8k:1", {"question": "instruction", "answer": "output"})
    chat_b = normalize(seed, detect_format(seed, "seed:1"), "seed:1")
    assert chat_b["messages"][1]["content"] == seed["instances"][0]["output"]
    tok = _bpe([gsm["question"], gsm["answer"], seed["instruction"]])
    for chat, answer in ((chat_a, gsm["answer"]), (chat_b, seed["instances"][0]["output"])):
        ((ids, mask),) = encode_record(chat, "chat", tok)
        assert _masked_text(tok, ids, mask) == answer + "<|end|>"
    conversation = chat_a["messages"] + [
        {"role": "user", "content": "Explain again."},
        {"role": "assistant", "content": "Sure: 72."},
    ]
    ids, mask = tok.encode_chat(conversation)
    assert _masked_text(tok, ids, mask) == gsm["answer"] + "<|end|>Sure: 72.<|end|>"


def test_gsm8k_prompts_keep_their_answer(shared_data):
    record = json.loads((shared_data / "gsm8k" / "test.jsonl").open().readline())
    prompt = normalize(record, detect_format(record, "t:1"), "t:1")
    assert prompt["prompt"] == [{"role": "user", "content": record["question"]}]
    assert prompt["answer"].endswith("#### 18")


def test_gsm8k_model_solutions_become_real_preference_pairs(shared_data):
    path = shared_data / "gsm8k" / "example_model_solutions.jsonl"
    pairs, skipped = [], 0
    for i, line in enumerate(path.open()):
        raw = json.loads(line)
        try:
            pairs.append((raw, normalize(gsm8k_model_solutions(raw, f"x:{i}"), "preference", "x")))
        except SkipRecord:
            skipped += 1
    assert len(pairs) == 1163 and skipped == 1319 - 1163  # as the data README says
    raw, pair = pairs[0]
    assert pair["chosen"] == raw["ground_truth"]
    wrong = [v["solution"] for v in raw.values() if isinstance(v, dict) and not v["is_correct"]]
    assert pair["rejected"] in wrong and pair["rejected"] != pair["chosen"]


@pytest.mark.parametrize(
    ("record", "fmt", "expected"),
    [
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            "chat",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
        ),
        (
            {"instruction": "Add.", "input": "2 and 2", "output": "4"},
            "chat",
            {
                "messages": [
                    {"role": "user", "content": "Add.\n\n2 and 2"},
                    {"role": "assistant", "content": "4"},
                ]
            },
        ),
        (
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Go away.",
            },
            "preference",
            {
                "prompt": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Joke?"},
                ],
                "chosen": "No.",
                "rejected": "Go away.",
            },
        ),
        (
            {
                "prompt": "Q?",
                "chosen": [
                    {"role": "user", "content": "Q?"},
                    {"role": "assistant", "content": "A"},
                ],
                "rejected": [
                    {"role": "user", "content": "Q?"},
                    {"role": "assistant", "content": "B"},
                ],
            },
            "preference",
            {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "A", "rejected": "B"},
        ),
        (
            {"question": "Q?", "answer": 7},
            "prompt",
            {"prompt": [{"role": "user", "content": "Q?"}], "answer": "7"},
        ),
    ],
)
def test_raw_shapes_are_detected_and_normalised(record, fmt, expected):
    assert detect_format(record, "f:1") == fmt
    assert normalize(record, fmt, "f:1") == expected


def test_preference_documents_share_the_prompt_and_mask_only_the_response():
    tok = _bpe()
    pair = {
        "prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
        "chosen": "5.",
        "rejected": "6.",
    }
    (c_ids, c_mask), (r_ids, r_mask) = encode_record(pair, "preference", tok)
    assert _masked_text(tok, c_ids, c_mask) == "5.<|end|>"
    assert _masked_text(tok, r_ids, r_mask) == "6.<|end|>"
    prompt_len = c_mask.index(1)
    assert c_ids[:prompt_len] == r_ids[:prompt_len]


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"messages": [{"role": "wizard", "content": "x"}]}, "chat", "unknown role 'wizard'"),
        ({"messages": [{"role": "user"}]}, "chat", "message 0 needs 'role' and 'content'"),
        ({"prompt": "p", "chosen": "a"}, "preference", "no 'rejected' field"),
        ({"text": 3}, "text", "'text' must be a string"),
    ],
)
def test_malformed_records_name_where(record, fmt, message):
    with pytest.raises(DataError, match=message) as info:
        normalize(record, fmt, "data.jsonl:7")
    assert str(info.value).startswith("data.jsonl:7:")


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        (
            {"prompt": "p", "chosen": "same", "rejected": " same "},
            "preference",
            "chosen_equals_rejected",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "no_assistant_turn"),
    ],
)
def test_unusable_records_are_skipped_with_a_reason(record, fmt, reason):
    with pytest.raises(SkipRecord) as info:
        normalize(record, fmt, "x:1")
    assert info.value.reason == reason
