import json
from dataclasses import dataclass

import pytest

import msn
from msn import bench
from msn.bench import (
    OVERALL,
    Question,
    TurnRecord,
    aggregate,
    answers_for,
    load_questions,
    markdown_table,
    parse_questions,
    repeated_ngram_share,
    run_questions,
    write_report,
)
from msn.cli import main as cli_main

SPEC_BENCH_CATEGORIES = {
    "mt_bench",
    "translation",
    "summarization",
    "qa",
    "math_reasoning",
    "rag",
    "code",
}


class CharTokenizer:
    """One token per character; a chat template that tags each message with its role."""

    chat_template = "tagged"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def decode(self, ids, skip_special_tokens):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


@dataclass
class StubResult:
    output_ids: list[list[int]]
    new_tokens: int
    steps: int
    accept_lengths: list[int]


class StubGenerate:
    """Answers 'ok' padded with '!' to max_new_tokens; greedy 1 token/step, others 2."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, method, max_new_tokens):
        self.calls.append((list(prompt), method, max_new_tokens))
        new = [ord(c) for c in ("ok" + "!" * max_new_tokens)[:max_new_tokens]]
        per_step = 1 if method == "greedy" else 2
        accept = [per_step] * (max_new_tokens // per_step) + [max_new_tokens % per_step] * (
            max_new_tokens % per_step > 0
        )
        return StubResult([list(prompt) + new], len(new), len(accept), accept)


def record(method, category, new_tokens, steps, seconds, qid=1, turn=0):
    """A turn whose steps emitted new_tokens - 1 tokens (the first came from the prefill)."""
    share, extra = divmod(new_tokens - 1, steps)
    accept = tuple(share + (i < extra) for i in range(steps))
    return TurnRecord(method, qid, category, turn, 10, new_tokens, steps, accept, seconds, "")


def write_lines(tmp_path, lines):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- questions --------------------------------------------------------------------------------


def test_default_questions_cover_spec_bench_categories():
    questions = load_questions(bench.default_questions_path())
    categories = [q.category for q in questions]
    assert set(categories) == SPEC_BENCH_CATEGORIES
    assert all(categories.count(c) >= 3 for c in SPEC_BENCH_CATEGORIES)
    assert any(len(q.turns) > 1 for q in questions)


def test_parse_questions_valid_and_blank_lines():
    lines = [
        json.dumps({"question_id": 81, "category": "qa", "turns": ["Why?"]}),
        "",
        json.dumps({"question_id": "x", "category": "code", "turns": ["a", "b"], "extra": 1}),
    ]
    assert parse_questions(lines) == [
        Question(81, "qa", ("Why?",)),
        Question("x", "code", ("a", "b")),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"question_id": 2, "turns": ["a"]}', "missing field"),
        ('{"question_id": 2, "category": "qa", "turns": []}', "turns must be"),
        ('{"question_id": 2, "category": "qa", "turns": "a"}', "turns must be"),
        ('{"question_id": 2, "category": "qa", "turns": ["a", 3]}', "turns must be"),
        ('{"question_id": 2, "category": "", "turns": ["a"]}', "category"),
        ('{"question_id": null, "category": "qa", "turns": ["a"]}', "question_id"),
        ('{"question_id": 1, "category": "qa", "turns": ["a"]}', r"duplicate .* line 1"),
    ],
)
def test_parse_questions_errors_name_the_line(tmp_path, bad_line, message):
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi"]})
    path = write_lines(tmp_path, [good, "", bad_line])
    with pytest.raises(ValueError, match=message) as info:
        load_questions(path)
    assert f"{path}:3:" in str(info.value)


def test_load_questions_missing_or_empty(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no questions"):
        load_questions(write_lines(tmp_path, [""]))


# -- running with a stub ----------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
def test_run_questions_feeds_answers_back(chat):
    questions = [Question(1, "mt_bench", ("Hi", "More")), Question(2, "qa", ("Why",))]
    generate = StubGenerate()
    records = run_questions(
        questions, ["greedy", "tr-jacobi"], generate, CharTokenizer(), 5, chat=chat, progress=False
    )
    # One warm-up call per method, then every turn of every question per method.
    assert [c[1:] for c in generate.calls[:2]] == [("greedy", 5), ("tr-jacobi", 5)]
    assert len(generate.calls) == 2 + 6
    assert [(r.question_id, r.method, r.turn) for r in records] == [
        (1, "greedy", 0),
        (1, "greedy", 1),
        (1, "tr-jacobi", 0),
        (1, "tr-jacobi", 1),
        (2, "greedy", 0),
        (2, "tr-jacobi", 0),
    ]
    second_prompt = CharTokenizer().decode(generate.calls[3][0], skip_special_tokens=True)
    assert "Hi" in second_prompt and "ok!!!" in second_prompt and "More" in second_prompt
    assert ("<assistant>ok!!!<user>More" in second_prompt) == chat
    first = records[0]
    assert (first.new_tokens, first.steps, first.accept_lengths, first.text) == (
        5,
        5,
        (1,) * 5,
        "ok!!!",
    )
    assert records[2].accept_lengths == (2, 2, 1)
    assert first.prompt_tokens == len(generate.calls[2][0])


def test_run_questions_skips_turns_beyond_the_context():
    questions = [Question(1, "mt_bench", ("Hi", "More")), Question(2, "qa", ("x" * 40,))]
    generate = StubGenerate()
    # Turn 1 of question 1 has 1 + 2 + 2 prompt tokens, turn 2 has 1 + 2 + 2 + 5 + 2 + 4 + 2.
    records = run_questions(
        questions, ["greedy"], generate, CharTokenizer(), 5, progress=False, context_len=10
    )
    assert [(r.question_id, r.turn) for r in records] == [(1, 0)]
    assert len(generate.calls) == 1 + 1


def test_run_questions_names_the_failing_turn():
    def failing(prompt, method, max_new_tokens):
        raise ValueError("context full")

    with pytest.raises(ValueError, match=r"question 7 turn 1, method jacobi: context full"):
        run_questions(
            [Question(7, "qa", ("x",))], ["jacobi"], failing, CharTokenizer(), 4, warmup=False
        )


# -- aggregation and report -------------------------------------------------------------------


def synthetic_records():
    return [
        record("greedy", "qa", 100, 100, 10.0, qid=1),
        record("greedy", "code", 50, 50, 5.0, qid=2),
        record("greedy", "code", 50, 50, 5.0, qid=2, turn=1),
        record("tr-jacobi", "qa", 100, 50, 5.0, qid=1),
        record("tr-jacobi", "code", 50, 20, 2.0, qid=2),
        record("tr-jacobi", "code", 50, 30, 3.0, qid=2, turn=1),
    ]


def test_aggregate():
    rows = {(r.category, r.method): r for r in aggregate(synthetic_records())}
    assert [k for k in rows] == [
        ("qa", "greedy"),
        ("qa", "tr-jacobi"),
        ("code", "greedy"),
        ("code", "tr-jacobi"),
        (OVERALL, "greedy"),
        (OVERALL, "tr-jacobi"),
    ]
    code = rows["code", "tr-jacobi"]
    assert (code.turns, code.new_tokens, code.steps, code.accepted) == (2, 100, 50, 98)
    assert code.tokens_per_step == pytest.approx(98 / 50)  # the prefill's tokens not counted
    assert rows["qa", "greedy"].tokens_per_step == pytest.approx(99 / 100)
    assert code.tokens_per_second == pytest.approx(20.0)
    assert code.speedup == pytest.approx(2.0)
    assert rows["qa", "greedy"].speedup == pytest.approx(1.0)
    overall = rows[OVERALL, "tr-jacobi"]
    assert (overall.new_tokens, overall.steps, overall.seconds) == (200, 100, 10.0)
    assert overall.speedup == pytest.approx(2.0)


def test_aggregate_without_baseline_has_no_speedup():
    rows = aggregate([r for r in synthetic_records() if r.method != "greedy"])
    assert all(r.speedup is None for r in rows)
    assert "n/a |" in markdown_table(rows)


def test_markdown_table():
    table = markdown_table(aggregate(synthetic_records()))
    assert "| code | tr-jacobi | 2 | 100 | 50 | 1.96 | 0.96 | 20.0 | 2.00x |" in table
    assert table.count("\n") == 2 + 6 - 1


def test_write_report(tmp_path):
    records = synthetic_records()
    rows = write_report(tmp_path / "out", records, {"model": "stub"})
    out = tmp_path / "out"
    assert len(rows) == 6
    assert "- model: stub" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][-1]["speedup"] == pytest.approx(2.0)
    lines = (out / "answers-tr-jacobi.jsonl").read_text().splitlines()
    answers = [json.loads(line) for line in lines]
    assert answers == answers_for(records, "tr-jacobi")
    code = answers[1]["choices"][0]
    assert answers[1]["question_id"] == 2
    assert code["new_tokens"] == [50, 50]
    assert code["decoding_steps"] == [20, 30]
    assert code["wall_time"] == [2.0, 3.0]
    per_turn = [list(records[4].accept_lengths), list(records[5].accept_lengths)]
    assert code["accept_lengths_per_turn"] == per_turn
    assert code["accept_lengths"] == per_turn[0] + per_turn[1]  # Spec-Bench's flat list


# -- command line -----------------------------------------------------------------------------


def test_cli_reports_bad_questions_file(tmp_path, capsys):
    path = write_lines(tmp_path, ['{"question_id": 1}'])
    assert cli_main(["bench", "--model", "unused", "--questions", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1: missing field(s) category, turns" in err


def test_cli_without_model_or_default(tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(msn, "default_model_path", raising=False)
    assert cli_main(["bench", "--limit", "1", "--output", str(tmp_path)]) == 2
    assert "pass --model" in capsys.readouterr().err


class StubModel:
    max_seq_len = 1000
    dtype = "stub"


@pytest.fixture
def stub_msn(monkeypatch):
    """msn.load_model / load_tokenizer / generate replaced by stubs; returns the calls."""
    calls = []

    def generate(model, prompt, max_new_tokens, **options):
        calls.append(options)
        return StubGenerate()(prompt, options["method"], max_new_tokens)

    monkeypatch.setattr(msn, "load_model", lambda path, device, dtype: StubModel())
    monkeypatch.setattr(msn, "load_tokenizer", lambda path: CharTokenizer())
    monkeypatch.setattr(msn, "generate", generate, raising=False)
    return calls


def test_cli_with_stub_model(stub_msn, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", "stub", "--limit", "2", "--max-new-tokens", "4", "--no-progress"]
    argv += ["--methods", "greedy", "tr-jacobi-noretrieval", "--output", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| overall | tr-jacobi-noretrieval | 4 | 16 | 8 | 2.00 | 1.00 |" in printed
    assert {"method": "tr-jacobi", "retrieval": False} in stub_msn
    assert sorted(p.name for p in out.iterdir()) == [
        "answers-greedy.jsonl",
        "answers-tr-jacobi-noretrieval.jsonl",
        "report.md",
        "report.png",
        "summary.json",
    ]
    report = (out / "report.md").read_text()
    assert "- device: cpu" in report
    assert "- turns skipped (prompt longer than the model's context): 0" in report


def test_cli_no_prompt_fits(stub_msn, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(StubModel, "max_seq_len", 3)
    argv = ["bench", "--model", "stub", "--no-progress", "--output", str(tmp_path)]
    assert cli_main(argv) == 2
    assert "no prompt fits the model's context of 3 tokens" in capsys.readouterr().err


def test_cli_chat_without_template(stub_msn, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(CharTokenizer, "chat_template", None)
    argv = ["bench", "--model", "stub", "--chat", "--device", "cpu", "--output", str(tmp_path)]
    assert cli_main(argv) == 2
    assert "has no chat template" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(msn, "generate"), reason="msn.generate is not available yet")
def test_cli_end_to_end(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    # The kernels have their own tests; interpreting them here would only cost time.
    monkeypatch.setenv("MSN_KERNELS", "torch")
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_checkpoint), "--limit", "2", "--max-new-tokens", "6"]
    argv += ["--chat", "--dtype", "float64", "--device", "cpu", "--output", str(out)]
    assert cli_main([*argv, "--no-progress"]) == 0
    assert "| overall | tr-jacobi |" in capsys.readouterr().out
    answers = {
        m: [json.loads(line) for line in (out / f"answers-{m}.jsonl").read_text().splitlines()]
        for m in bench.DEFAULT_METHODS
    }
    for method in ("jacobi", "tr-jacobi"):  # lossless: the same text as greedy
        assert [a["choices"][0]["turns"] for a in answers[method]] == [
            a["choices"][0]["turns"] for a in answers["greedy"]
        ]
    assert all(len(a["choices"][0]["turns"]) >= 1 for a in answers["greedy"])
    assert (out / "report.png").exists() and (out / "report.md").exists()


@pytest.mark.parametrize(("flag", "expected"), [(None, "yes"), ("--raw", "no")])
def test_cli_uses_the_chat_template_unless_raw(stub_msn, tmp_path, flag, expected):
    out = tmp_path / "bench"
    argv = ["bench", "--model", "stub", "--limit", "1", "--max-new-tokens", "2", "--no-progress"]
    argv += ["--methods", "greedy", "--output", str(out)] + ([flag] if flag else [])
    assert cli_main(argv) == 0
    assert f"- chat template: {expected}" in (out / "report.md").read_text()


def test_cli_batch_sizes_report_throughput_and_identical_outputs(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_checkpoint), "--limit", "3", "--max-new-tokens", "6"]
    argv += ["--dtype", "float64", "--device", "cpu", "--output", str(out), "--no-progress"]
    argv += ["--methods", "greedy", "tr-jacobi", "--batch-size", "1", "3"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["method"], r["batch_size"]): r for r in summary["batch"]}
    assert sorted(rows) == [("greedy", 1), ("greedy", 3), ("tr-jacobi", 1), ("tr-jacobi", 3)]
    for row in rows.values():  # every row compared with its batch-1 generate output, and equal
        assert row["prompts"] == 3 and row["compared"] == 3 and row["identical"] == 3
        assert row["new_tokens"] == rows["greedy", 1]["new_tokens"] > 0
    assert rows["greedy", 3]["speedup"] == 1.0
    assert "| tr-jacobi | 3 | 3 |" in printed
    assert "tr-jacobi beats greedy's throughput at batch sizes" in printed
    assert "## Batched throughput" in (out / "report.md").read_text()


def test_cli_rejects_a_zero_batch_size(tmp_path, capsys):
    argv = ["bench", "--model", "unused", "--batch-size", "0", "--output", str(tmp_path)]
    assert cli_main(argv) == 2
    assert "--batch-size values must be >= 1" in capsys.readouterr().err


def test_repeated_ngram_share_counts_word_4grams_seen_before():
    assert repeated_ngram_share("one two three four five six") == 0.0
    # 10 words, 7 4-grams, of which only the first four are new: abcd bcda cdab dabc
    assert repeated_ngram_share("a b c d a b c d a b") == pytest.approx(3 / 7)
    assert repeated_ngram_share("too short") == 0.0


def test_report_gives_each_category_its_repetition():
    looping = " ".join(["the tradition of"] * 10)
    records = [
        TurnRecord("greedy", 1, "mt_bench", 0, 5, 30, 30, (1,) * 30, 1.0, looping),
        TurnRecord("greedy", 2, "qa", 0, 5, 6, 6, (1,) * 6, 1.0, "Paris is the capital of France"),
    ]
    rows = {row.category: row for row in aggregate(records)}
    assert rows["mt_bench"].repetition > 0.8
    assert rows["qa"].repetition == 0.0
    assert rows[OVERALL].repetition == pytest.approx(rows["mt_bench"].repetition / 2)
    assert "| 0% |" in markdown_table(list(rows.values()))
