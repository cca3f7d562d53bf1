"""`msn bench`: run decoders over a Spec-Bench style prompt set and report their speed.

Questions come in Spec-Bench's ``question.jsonl`` format (``question_id``, ``category``,
``turns``); multi-turn questions feed each method's own earlier answers back, as Spec-Bench
does (all methods are lossless, so the prompts agree across methods). For each method the
output directory gets ``answers-<method>.jsonl`` in Spec-Bench's answer layout (per turn: text,
new tokens, decoding steps, accept lengths, wall time), and for the run ``report.md`` (per
category tokens per step, tokens/s and speed-up over greedy), ``report.png`` and
``summary.json``.

``--batch-size N ...`` then decodes the first turns of all questions with ``msn.generate_batch``
at each batch size and adds throughput (new tokens of all rows per second) beside batch-1
latency, each row checked against the same method's batch-1 output of that prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

# Bench method name -> keyword arguments of msn.generate.
METHODS: dict[str, dict[str, Any]] = {
    "greedy": {"method": "greedy"},
    "jacobi": {"method": "jacobi"},
    "tr-jacobi": {"method": "tr-jacobi"},
    "tr-jacobi-noretrieval": {"method": "tr-jacobi", "retrieval": False},
}
DEFAULT_METHODS = ("greedy", "jacobi", "tr-jacobi")
BASELINE = "greedy"
SAMPLED = "-sample"  # --do-sample adds "<method>-sample" beside each method
OVERALL = "overall"
WARMUP_TOKENS = 8


class GenerationResult(Protocol):
    """The part of ``msn.generate``'s result the benchmark reads."""

    output_ids: Any  # [1, L + new] tensor or nested list
    new_tokens: int
    steps: int
    accept_lengths: Sequence[int]


# (prompt token ids, bench method name, max new tokens) -> result
GenerateFn = Callable[[list[int], str, int], GenerationResult]


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TurnRecord:
    """One method's answer to one turn of one question."""

    method: str
    question_id: int | str
    category: str
    turn: int
    prompt_tokens: int
    new_tokens: int
    steps: int
    accept_lengths: tuple[int, ...]
    wall_seconds: float
    text: str
    stop_reason: str | None = None  # as msn.generate reports it ("eos", "length", "context")


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """Totals of one method over one category (or ``OVERALL``)."""

    category: str
    method: str
    turns: int
    new_tokens: int
    steps: int
    accepted: int  # tokens emitted by decoding steps: new tokens minus each turn's prefill token
    seconds: float
    speedup: float | None  # tokens/s over the baseline's on the same category
    repetition: float = math.nan  # mean share of repeated word 4-grams in the answers

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens per decoding step (Spec-Bench's mean accepted length): greedy is 1.

        The first token of each turn comes from the prefill pass, which is not a step, so it
        is not counted; new tokens / steps would credit every turn with one free token.
        """
        return self.accepted / self.steps if self.steps else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class BatchRow:
    """One method decoding every prompt with ``msn.generate_batch`` at one batch size."""

    method: str
    batch_size: int
    prompts: int
    new_tokens: int
    steps: int  # decoding steps summed over the rows
    accepted: int  # tokens emitted by decoding steps (new tokens minus each prefill token)
    seconds: float  # wall time of the whole call
    identical: int  # rows equal to the same method's batch-1 output of that prompt
    compared: int  # rows with a batch-1 output to compare with
    speedup: float | None = None  # tokens/s over greedy's at the same batch size

    @property
    def tokens_per_step(self) -> float:
        return self.accepted / self.steps if self.steps else math.nan

    @property
    def tokens_per_second(self) -> float:
        """Throughput: new tokens of all rows per second of the call."""
        return self.new_tokens / self.seconds if self.seconds > 0 else math.nan


# (prompts, bench method name, max new tokens, batch size) -> one result per prompt, in order
BatchFn = Callable[[list[list[int]], str, int, int], Sequence[GenerationResult]]


# -- questions --------------------------------------------------------------------------------


def default_questions_path() -> Path:
    """The small prompt set shipped with the package (a few per Spec-Bench category)."""
    return Path(str(resources.files("msn") / "assets" / "bench_questions.jsonl"))


def parse_questions(lines: Iterable[str], source: str = "<questions>") -> list[Question]:
    """Parse and validate ``question.jsonl`` lines; errors name ``source:line``."""
    questions: list[Question] = []
    seen: dict[int | str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = [key for key in ("question_id", "category", "turns") if key not in item]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        qid, category, turns = item["question_id"], item["category"], item["turns"]
        if isinstance(qid, bool) or not isinstance(qid, int | str):
            raise ValueError(f"{where}: question_id must be an int or a string, got {qid!r}")
        if not isinstance(category, str) or not category:
            raise ValueError(f"{where}: category must be a non-empty string, got {category!r}")
        if (
            not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) and t.strip() for t in turns)
        ):
            raise ValueError(f"{where}: turns must be a non-empty list of non-empty strings")
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid!r} (first on line {seen[qid]})")
        seen[qid] = lineno
        questions.append(Question(qid, category, tuple(turns)))
    if not questions:
        raise ValueError(f"{source}: no questions")
    return questions


def load_questions(path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"questions file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        return parse_questions(f, source=str(path))


# -- running ----------------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of a conversation so far, ready for the assistant's next answer."""
    if chat:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return list(tokenizer(text)["input_ids"])


def run_questions(
    questions: Sequence[Question],
    methods: Sequence[str],
    generate_fn: GenerateFn,
    tokenizer: Any,
    max_new_tokens: int,
    chat: bool = False,
    warmup: bool = True,
    progress: bool = True,
    context_len: int | None = None,
    done: Collection[tuple[str, int | str]] = (),
    on_answer: Callable[[str, list[TurnRecord]], None] | None = None,
) -> list[TurnRecord]:
    """Answer every turn of every question with every method; time each generate call.

    Methods run interleaved per question, so that load drifts on a shared machine hit all of
    them alike. ``warmup`` first runs each method once, untimed, on a short generation. A turn
    whose prompt does not fit ``context_len`` tokens is skipped with the question's later
    turns (they are longer still), so a small-context model can run the whole set.
    ``(method, question_id)`` pairs in ``done`` are skipped (answered by an earlier run), and
    ``on_answer(method, records)`` receives each question's answer as soon as it is complete.
    """
    from tqdm.auto import tqdm

    todo = [m for m in methods if any((m, q.question_id) not in done for q in questions)]
    if warmup and todo:
        first = [{"role": "user", "content": questions[0].turns[0]}]
        prompt = encode_prompt(tokenizer, first, chat)
        for method in todo:
            if context_len is None or len(prompt) < context_len:
                generate_fn(prompt, method, min(WARMUP_TOKENS, max_new_tokens))
    records: list[TurnRecord] = []
    total = len(methods) * sum(len(q.turns) for q in questions)
    with tqdm(total=total, desc="msn bench", unit="turn", disable=not progress) as bar:
        for question in questions:
            for method in methods:
                if (method, question.question_id) not in done:
                    answer = _answer(
                        question, method, generate_fn, tokenizer, max_new_tokens, chat, context_len
                    )
                    records += answer
                    if on_answer is not None and answer:
                        on_answer(method, answer)
                bar.update(len(question.turns))
    return records


def _answer(
    question: Question,
    method: str,
    generate_fn: GenerateFn,
    tokenizer: Any,
    max_new_tokens: int,
    chat: bool,
    context_len: int | None,
) -> list[TurnRecord]:
    messages: list[dict[str, str]] = []
    records = []
    for turn, content in enumerate(question.turns):
        messages.append({"role": "user", "content": content})
        prompt = encode_prompt(tokenizer, messages, chat)
        if context_len is not None and len(prompt) >= context_len:
            break
        start = time.perf_counter()
        try:
            result = generate_fn(prompt, method, max_new_tokens)
        except ValueError as err:
            raise ValueError(
                f"question {question.question_id!r} turn {turn + 1}, method {method}: {err}"
            ) from err
        seconds = time.perf_counter() - start
        output = _as_list(result.output_ids)
        text = tokenizer.decode(output[len(prompt) :], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": text})
        records.append(
            TurnRecord(
                method=method,
                question_id=question.question_id,
                category=question.category,
                turn=turn,
                prompt_tokens=len(prompt),
                new_tokens=int(result.new_tokens),
                steps=int(result.steps),
                accept_lengths=tuple(int(n) for n in result.accept_lengths),
                wall_seconds=seconds,
                text=text,
                stop_reason=getattr(result, "stop_reason", None),
            )
        )
    return records


def _as_list(output_ids: Any) -> list[int]:
    """The single row of ``output_ids`` ([1, L] tensor or nested list) as a list of ints."""
    rows = output_ids.tolist() if hasattr(output_ids, "tolist") else list(output_ids)
    return [int(t) for t in rows[0]]


def first_turn_prompts(
    questions: Sequence[Question], tokenizer: Any, chat: bool, context_len: int | None
) -> list[list[int]]:
    """The first turn of every question that fits the context: the batched runs' prompts.

    Later turns are left out: their prompts hold the earlier answers, which a batch decodes
    at the same time.
    """
    prompts = []
    for question in questions:
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": question.turns[0]}], chat)
        if context_len is None or len(prompt) < context_len:
            prompts.append(prompt)
    return prompts


def run_batches(
    prompts: Sequence[list[int]],
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    batch_fn: BatchFn,
    max_new_tokens: int,
    singles: dict[tuple[str, tuple[int, ...]], list[int]],
    warmup: bool = True,
) -> list[BatchRow]:
    """Decode all ``prompts`` with every method at every batch size and time each call.

    ``singles`` maps (method, prompt) to the output of that method's batch-1 ``generate``
    call: each row is compared with it, so identical outputs are checked, not assumed. Methods
    run interleaved per batch size; speed-ups are over greedy at the same batch size.
    """
    if warmup:
        for method in methods:
            batch_fn(list(prompts[:2]), method, min(WARMUP_TOKENS, max_new_tokens), 2)
    rows: list[BatchRow] = []
    for size in batch_sizes:
        group = []
        for method in methods:
            start = time.perf_counter()
            results = batch_fn(list(prompts), method, max_new_tokens, size)
            seconds = time.perf_counter() - start
            outputs = [_as_list(r.output_ids) for r in results]
            known = [singles.get((method, tuple(p))) for p in prompts]
            pairs = [(o, k) for o, k in zip(outputs, known, strict=True) if k is not None]
            group.append(
                BatchRow(
                    method=method,
                    batch_size=size,
                    prompts=len(prompts),
                    new_tokens=sum(int(r.new_tokens) for r in results),
                    steps=sum(int(r.steps) for r in results),
                    accepted=sum(sum(r.accept_lengths) for r in results),
                    seconds=seconds,
                    identical=sum(o == k for o, k in pairs),
                    compared=len(pairs),
                )
            )
        base = next((r for r in group if r.method == BASELINE), None)
        for row in group:
            speedup = None
            if base is not None and base.tokens_per_second > 0:
                speedup = row.tokens_per_second / base.tokens_per_second
            rows.append(dataclasses.replace(row, speedup=speedup))
    return rows


def batch_table(rows: Sequence[BatchRow], single_rates: dict[str, float]) -> str:
    """Throughput per method and batch size, beside the batch-1 ``generate`` rate."""
    lines = [
        "| method | batch size | prompts | new tokens | tokens/step | tokens/s (all rows) "
        "| vs greedy (same batch) | batch-1 generate tokens/s | identical to batch 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        speedup = "n/a" if row.speedup is None else f"{row.speedup:.2f}x"
        identical = f"{row.identical}/{row.compared}" if row.compared else "n/a"
        lines.append(
            f"| {row.method} | {row.batch_size} | {row.prompts} | {row.new_tokens} "
            f"| {_fmt(row.tokens_per_step)} | {_fmt(row.tokens_per_second, 1)} | {speedup} "
            f"| {_fmt(single_rates.get(row.method), 1)} | {identical} |"
        )
    return "\n".join(lines)


def tree_pays(rows: Sequence[BatchRow]) -> dict[str, list[int]]:
    """For each method but greedy, the batch sizes at which it beat greedy's throughput."""
    return {
        method: [r.batch_size for r in rows if r.method == method and (r.speedup or 0) > 1]
        for method in dict.fromkeys(r.method for r in rows)
        if method != BASELINE
    }


# -- reporting --------------------------------------------------------------------------------


def aggregate(records: Sequence[TurnRecord], baseline: str = BASELINE) -> list[ReportRow]:
    """Per category (first-seen order, then ``OVERALL``) and method, totals and speed-up."""
    methods = list(dict.fromkeys(r.method for r in records))
    categories = list(dict.fromkeys(r.category for r in records))
    rows = []
    for category in [*categories, OVERALL]:
        group = [r for r in records if category in (OVERALL, r.category)]
        totals = {m: _totals(category, m, [r for r in group if r.method == m]) for m in methods}
        base = totals.get(baseline)
        for method in methods:
            row = totals[method]
            speedup = None
            # Sampled methods are measured against plain sampling where it ran.
            reference = totals.get(baseline + SAMPLED) if method.endswith(SAMPLED) else None
            reference = reference or base
            if reference is not None and reference.tokens_per_second > 0:
                speedup = row.tokens_per_second / reference.tokens_per_second
            rows.append(dataclasses.replace(row, speedup=speedup))
    return rows


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of an answer's word n-grams that already occurred earlier in it (0: none repeats).

    A looping answer ("the cat the cat the cat ...") scores near 1; ordinary prose a few
    percent. It reads how degenerate the answers are, since the speed figures alone reward
    loops (retrieval copies them).
    """
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _totals(category: str, method: str, records: list[TurnRecord]) -> ReportRow:
    shares = [repeated_ngram_share(r.text) for r in records]
    return ReportRow(
        category=category,
        method=method,
        turns=len(records),
        new_tokens=sum(r.new_tokens for r in records),
        steps=sum(r.steps for r in records),
        accepted=sum(sum(r.accept_lengths) for r in records),
        seconds=sum(r.wall_seconds for r in records),
        speedup=None,
        repetition=sum(shares) / len(shares) if shares else math.nan,
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[ReportRow]) -> str:
    lines = [
        "| category | method | turns | new tokens | steps | tokens/step | extra tokens/step "
        "| tokens/s | speed-up | repeated 4-grams |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mta = row.tokens_per_step
        speedup = "n/a" if row.speedup is None else f"{row.speedup:.2f}x"
        lines.append(
            f"| {row.category} | {row.method} | {row.turns} | {row.new_tokens} | {row.steps} "
            f"| {_fmt(mta)} | {_fmt(mta - 1)} | {_fmt(row.tokens_per_second, 1)} | {speedup} "
            f"| {_fmt(100 * row.repetition, 0)}% |"
        )
    return "\n".join(lines)


def write_report(
    output_dir: Path,
    records: Sequence[TurnRecord],
    settings: dict[str, Any],
    run: dict[str, Any] | None = None,
) -> list[ReportRow]:
    """Write the answers, ``report.md``, ``report.png`` and ``summary.json``; return the rows.

    ``run`` (see ``run_identity``) is stored with every answer, so that a later run can tell
    whether they are its own to resume.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    for method in dict.fromkeys(r.method for r in records):
        with (output_dir / f"answers-{method}.jsonl").open("w", encoding="utf-8") as f:
            for answer in answers_for(records, method):
                f.write(json.dumps(_with_run(answer, run), ensure_ascii=False) + "\n")
    rows = aggregate(records)
    header = "\n".join(f"- {key}: {value}" for key, value in settings.items())
    (output_dir / "report.md").write_text(
        f"# msn bench\n\n{header}\n\n{markdown_table(rows)}\n", encoding="utf-8"
    )
    summary = {
        "settings": settings,
        "rows": [
            {
                **dataclasses.asdict(row),
                "tokens_per_step": row.tokens_per_step,
                "tokens_per_second": row.tokens_per_second,
            }
            for row in rows
        ],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    try:
        plot_report(rows, output_dir / "report.png", title=plot_title(settings))
    except ImportError as err:  # no plotting backend: the tables above are the report
        print(
            f"msn bench: report.png not drawn ({err}); pip install matplotlib for the chart",
            file=sys.stderr,
        )
    return rows


def answers_for(records: Sequence[TurnRecord], method: str) -> list[dict[str, Any]]:
    """One Spec-Bench style answer per question: per-turn lists under ``choices[0]``."""
    by_question: dict[int | str, list[TurnRecord]] = {}
    for record in records:
        if record.method == method:
            by_question.setdefault(record.question_id, []).append(record)
    answers = []
    for qid, turns in by_question.items():
        turns = sorted(turns, key=lambda r: r.turn)
        answers.append(
            {
                "question_id": qid,
                "category": turns[0].category,
                "method": method,
                "choices": [
                    {
                        "index": 0,
                        "turns": [r.text for r in turns],
                        "prompt_tokens": [r.prompt_tokens for r in turns],
                        "new_tokens": [r.new_tokens for r in turns],
                        "decoding_steps": [r.steps for r in turns],
                        # Spec-Bench's layout: one flat list over the turns.
                        "accept_lengths": [n for r in turns for n in r.accept_lengths],
                        "accept_lengths_per_turn": [list(r.accept_lengths) for r in turns],
                        "wall_time": [r.wall_seconds for r in turns],
                        "stop_reason": [r.stop_reason for r in turns],
                    }
                ],
            }
        )
    return answers


# -- incremental answers and resume ----------------------------------------------------------


def run_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """What must agree for earlier answers to be resumed: model, device, dtype, lengths, chat."""
    keys = ("model", "device", "dtype", "max new tokens", "chat template")
    return {key: settings[key] for key in keys if key in settings}


def _with_run(answer: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    return answer if run is None else {**answer, "run": run}


def check_output_dir(output_dir: Path) -> None:
    """Fail before any decoding when the answers and the report could not be written."""
    probe = output_dir / ".msn-bench-write-check"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"--output {output_dir}: cannot write there ({err.strerror or err}); pass a "
            "writable directory"
        ) from err


def append_answer(
    output_dir: Path, method: str, records: Sequence[TurnRecord], run: dict[str, Any]
) -> None:
    """Append one question's answer to ``answers-<method>.jsonl`` as soon as it is complete."""
    (answer,) = answers_for(records, method)
    with (output_dir / f"answers-{method}.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(_with_run(answer, run), ensure_ascii=False) + "\n")
        f.flush()


def answer_records(answer: dict[str, Any]) -> list[TurnRecord]:
    """The per-turn records of one answer line (the inverse of ``answers_for``)."""
    choice = answer["choices"][0]
    return [
        TurnRecord(
            method=answer["method"],
            question_id=answer["question_id"],
            category=answer["category"],
            turn=turn,
            prompt_tokens=int(choice["prompt_tokens"][turn]),
            new_tokens=int(choice["new_tokens"][turn]),
            steps=int(choice["decoding_steps"][turn]),
            accept_lengths=tuple(int(n) for n in choice["accept_lengths_per_turn"][turn]),
            wall_seconds=float(choice["wall_time"][turn]),
            text=choice["turns"][turn],
            stop_reason=choice["stop_reason"][turn],
        )
        for turn in range(len(choice["turns"]))
    ]


def load_answers(
    output_dir: Path, methods: Sequence[str], run: dict[str, Any], restart: bool = False
) -> list[TurnRecord]:
    """Answers that an interrupted run with the same identity left in ``output_dir``.

    A line cut short by the interruption is dropped (and the file rewritten without it);
    answers of another run (other model, lengths, ...) are an error unless ``restart``, which
    discards them all.
    """
    records: list[TurnRecord] = []
    for method in methods:
        path = output_dir / f"answers-{method}.jsonl"
        if not path.is_file():
            continue
        if restart:
            path.unlink()
            continue
        kept: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                answer = json.loads(line)
                found = answer_records(answer)
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # an incomplete last line, or not an answer of ours
            if answer.get("run") != run:
                raise ValueError(
                    f"--output {output_dir} holds answers of another run ({path.name}: "
                    f"{answer.get('run')}, this run: {run}); pass --restart to replace them, "
                    "or choose another --output"
                )
            records += found
            kept.append(line)
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    return records


def summarize_trees(trees: Sequence[dict]) -> str:
    """The trees one method used over a run: nodes, depth, step time (see GenerationResult)."""
    names = sorted({t.get("tree", "?") for t in trees})
    nodes = sum(t.get("mean_nodes", 1.0) for t in trees) / len(trees)
    depth = max(t.get("max_depth", 0) for t in trees)
    text = f"{', '.join(names)}: {nodes:.2f} nodes on average, max depth {depth}"
    for key, label in (("predicted_step_ms", "predicted"), ("measured_step_ms", "measured")):
        values = [t[key] for t in trees if t.get(key) is not None]
        if values:
            text += f", {label} step {sum(values) / len(values):.1f} ms"
    return text


def plot_title(settings: dict[str, Any]) -> str:
    """Model, device, dtype and thread count, for the chart."""
    model = Path(str(settings.get("model", "?"))).name
    keys = ("device", "dtype", "threads")
    return f"{model}: " + ", ".join(f"{k} {settings[k]}" for k in keys if k in settings)


def plot_report(rows: Sequence[ReportRow], path: Path, title: str | None = None) -> None:
    """Grouped bars per category: tokens per step, and speed-up (or tokens/s) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(dict.fromkeys(r.category for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    has_speedup = any(r.speedup is not None for r in rows)
    panels: list[tuple[str, Callable[[ReportRow], float]]] = [
        ("tokens per step", lambda r: r.tokens_per_step),
        (
            ("speed-up over greedy", lambda r: r.speedup if r.speedup is not None else math.nan)
            if has_speedup
            else ("tokens/s", lambda r: r.tokens_per_second)
        ),
    ]
    lookup = {(r.category, r.method): r for r in rows}
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.2 * len(categories)), 7.0))
    for ax, (title, value) in zip(axes, panels, strict=True):
        for i, method in enumerate(methods):
            xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(categories))]
            ax.bar(xs, [value(lookup[c, method]) for c in categories], width, label=method)
        ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_title(title)
        ax.axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="checkpoint directory, .gguf file or hub id (default: the default model)"
    )
    parser.add_argument(
        "--questions",
        type=Path,
        help="Spec-Bench question.jsonl (default: the small set shipped with msn)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(DEFAULT_METHODS),
        help="decoders to compare (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per turn (default 128)")
    from msn.commands import chat_template

    chat_template.add_arguments(parser, raw_help="send the turns as plain text")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("msn-bench"),
        help="output directory (default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="model dtype (default: the checkpoint's on a GPU, float32 on the CPU)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        metavar="N",
        help="also decode the first turns of all questions with msn.generate_batch at each "
        "batch size N, and report throughput (tokens/s over all rows) beside batch-1 latency, "
        "with each row checked against its batch-1 output",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also run transformers' own generate on the same checkpoint: greedy "
        "(hf-greedy) and prompt lookup (hf-prompt-lookup)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard answers already in --output (by default an interrupted run resumes)",
    )
    from msn.commands import sampling

    sampling.add_arguments(parser)  # --do-sample runs "<method>-sample" beside each method


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as err:
        print(f"msn bench: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    batch_sizes = list(dict.fromkeys(getattr(args, "batch_size", None) or []))
    if any(size < 1 for size in batch_sizes):
        raise ValueError(f"--batch-size values must be >= 1, got {batch_sizes}")
    questions = load_questions(args.questions or default_questions_path())[: args.limit]
    methods = list(dict.fromkeys(args.methods))
    if args.model is not None and not args.model.strip():
        raise ValueError("--model is empty; pass a checkpoint directory, or leave it out")
    check_output_dir(args.output)  # before any decoding, not after it

    import torch

    import msn

    model_path = args.model if args.model is not None else _default_model_path(msn)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or (None if str(device).startswith("cuda") else "float32")
    model = msn.load_model(model_path, device=device, dtype=dtype)
    tokenizer = msn.load_tokenizer(model_path)
    from msn.commands import chat_template

    args.chat = chat_template.use_chat_template(args, tokenizer, model_path)

    from msn import baselines
    from msn.commands import sampling

    sample = sampling.options(args) if hasattr(args, "do_sample") else {}
    sample = sample if sample.get("do_sample") else {}  # greedy methods take no seed here
    if sample:
        methods += [m + SAMPLED for m in methods if m in METHODS]
    reference = None
    if getattr(args, "baselines", False):
        reference = baselines.load_reference(model_path, dtype=model.dtype, device=device)
        methods += [m for m in baselines.METHODS if m not in methods]
    trees: dict[str, list[dict]] = {}
    singles: dict[tuple[str, tuple[int, ...]], list[int]] = {}  # batch-1 outputs

    def generate_fn(prompt: list[int], method: str, max_new_tokens: int) -> GenerationResult:
        if method in baselines.METHODS:
            return baselines.generate_reference(reference, prompt, max_new_tokens, method)
        options = METHODS[method.removesuffix(SAMPLED)]
        if method.endswith(SAMPLED):
            options = {**options, **sample}
        result = msn.generate(model, prompt, max_new_tokens=max_new_tokens, **options)
        if getattr(result, "tree", None):
            trees.setdefault(method, []).append(result.tree)
        if method in METHODS and max_new_tokens == args.max_new_tokens:
            singles[method, tuple(prompt)] = _as_list(result.output_ids)
        return result

    run = run_identity(
        {
            "model": str(model_path),
            "device": str(device),
            "dtype": str(getattr(model, "dtype", args.dtype)).removeprefix("torch."),
            "max new tokens": args.max_new_tokens,
            "chat template": "yes" if args.chat else "no",
        }
    )
    if sample:  # answers sampled with other filters are another run's
        run["sampling"] = sampling.describe(sample, seed=False)
    wanted = {q.question_id for q in questions}
    earlier = [
        r for r in load_answers(args.output, methods, run, args.restart) if r.question_id in wanted
    ]
    if earlier:
        print(
            f"msn bench: resuming, {len({(r.method, r.question_id) for r in earlier})} answers "
            f"already in {args.output} (--restart starts over)",
            file=sys.stderr,
        )
    records = earlier + run_questions(
        questions,
        methods,
        generate_fn,
        tokenizer,
        args.max_new_tokens,
        chat=args.chat,
        progress=not args.no_progress,
        context_len=getattr(model, "max_seq_len", None),
        done={(r.method, r.question_id) for r in earlier},
        on_answer=lambda method, answer: append_answer(args.output, method, answer, run),
    )
    if not records:
        raise ValueError(f"no prompt fits the model's context of {model.max_seq_len} tokens")
    planned = len(methods) * sum(len(q.turns) for q in questions)
    settings = {
        "model": str(model_path),
        "device": device,
        "dtype": str(getattr(model, "dtype", args.dtype)).removeprefix("torch."),
        "questions": f"{args.questions or 'built-in set'} ({len(questions)} questions)",
        "max new tokens": args.max_new_tokens,
        "chat template": "yes" if args.chat else "no",
        "turns skipped (prompt longer than the model's context)": planned - len(records),
        "threads": torch.get_num_threads(),
        **({"sampling (methods named -sample)": sampling.describe(sample)} if sample else {}),
        **{f"tree ({m})": summarize_trees(t) for m, t in trees.items()},
    }
    rows = write_report(args.output, records, settings, run)
    print(markdown_table([r for r in rows if r.category == OVERALL]))
    if batch_sizes:
        single_rates = {r.method: r.tokens_per_second for r in rows if r.category == OVERALL}
        prompts = first_turn_prompts(questions, tokenizer, args.chat, model.max_seq_len)

        from msn.drafts import output_memory

        def batch_fn(prompts, method, max_new_tokens, batch_size):
            # The batch-1 run stored its answers to these very prompts in the output memory:
            # each pass starts without them, or retrieval would recall whole answers.
            output_memory(model).clear()
            return msn.generate_batch(
                model, prompts, max_new_tokens, batch_size=batch_size, **METHODS[method]
            )

        batch_methods = [m for m in methods if m in METHODS]
        batch_rows = run_batches(
            prompts, batch_methods, batch_sizes, batch_fn, args.max_new_tokens, singles
        )
        write_batch_report(args.output, batch_rows, single_rates)
        print(batch_table(batch_rows, single_rates))
        for method, sizes in tree_pays(batch_rows).items():
            print(f"{method} beats greedy's throughput at batch sizes: {sizes or 'none'}")
    print(f"report: {args.output / 'report.md'}")
    return 0


def write_batch_report(
    output_dir: Path, rows: Sequence[BatchRow], single_rates: dict[str, float]
) -> None:
    """Append the batched throughput table to ``report.md`` and its rows to ``summary.json``."""
    report = output_dir / "report.md"
    text = report.read_text(encoding="utf-8")
    section = (
        "\n## Batched throughput (msn.generate_batch, first turns)\n\n"
        f"{batch_table(rows, single_rates)}\n"
    )
    report.write_text(text + section, encoding="utf-8")
    summary_path = output_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["batch"] = [
        {**dataclasses.asdict(r), "tokens_per_second": r.tokens_per_second} for r in rows
    ]
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _default_model_path(msn_module: Any) -> str:
    default = getattr(msn_module, "default_model_path", None)
    if default is None:
        raise ValueError("no --model given and this msn build has no default model; pass --model")
    return str(default())
