"""Write a self-distilled MSN training set: offline prompts, answered by the base model itself.

    python scripts/distill_data.py --model SmolLM2-135M-Instruct.Q4_1.gguf --output data/

The responses are the base model's own greedy answers (the recipe of Medusa-2 and EAGLE), so
fine-tuning on them teaches MSN's noise robustness without moving the model's output
distribution. Prompts are made offline and seeded, over eight kinds of task:

- code: functions of the standard library, from their names, signatures and docstrings;
- writing, qa, translation, maths, reasoning: templates filled from word lists and numbers;
- summarisation and rag: paragraphs of the standard library's module documentation.

Every 10th prompt is held out (`heldout.jsonl`), the rest is `train.jsonl`, less the answers
that loop (more than `--max-repetition` of their word 4-grams repeated). Generation is
batched (left padding, prompts sorted by length) and written as it goes; a rerun resumes where
an interrupted one stopped. Answers cut at `--max-new-tokens` are marked `"truncated": true`,
so that training does not teach the model to stop there.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
from pathlib import Path

import torch
from tqdm import tqdm

from msn.bench import repeated_ngram_share

HOLDOUT_EVERY = 10
STDLIB_MODULES = [
    "base64", "bisect", "calendar", "colorsys", "csv", "datetime", "difflib", "fnmatch",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html", "ipaddress",
    "itertools", "json", "keyword", "math", "operator", "os.path", "pathlib", "pprint",
    "queue", "random", "re", "secrets", "shlex", "shutil", "statistics", "string",
    "textwrap", "time", "urllib.parse", "uuid", "zlib", "collections", "contextlib",
    "copy", "decimal", "enum", "graphlib", "inspect", "locale", "logging", "numbers",
    "platform", "sched", "struct", "tempfile", "threading", "timeit", "tokenize", "typing",
    "unicodedata", "warnings", "weakref", "zipfile",
]  # fmt: skip
TOPICS = [
    "the ocean", "autumn leaves", "a lighthouse", "city traffic", "a lost key", "morning coffee",
    "a mountain hike", "an old bicycle", "the first snow", "a library", "a robot learning to paint",
    "a garden in spring", "a rainy afternoon", "a train journey", "a campfire", "the moon",
    "a busy kitchen", "a quiet village", "friendship", "a science fair", "a thunderstorm",
    "a market at dawn", "an empty stadium", "a paper boat", "a winter night",
]  # fmt: skip
WRITING = [
    "Write a short poem about {topic}.",
    "Write a three-sentence story about {topic}.",
    "Describe {topic} in one vivid paragraph.",
    "Write a haiku about {topic}.",
    "Give me a catchy title for a blog post about {topic}.",
    "Write a short diary entry about {topic}.",
]
TASKS = [
    "learning a new language", "keeping a houseplant alive", "saving money each month",
    "preparing for a job interview", "sleeping better", "running a first 5 km race",
    "organising a small workspace", "cooking rice", "writing clear emails", "studying for exams",
    "starting a vegetable garden", "giving a short presentation", "reading more books",
    "taking care of a puppy", "packing for a weekend trip", "staying focused while working",
]  # fmt: skip
ADVICE = [
    "Give three tips for {task}.",
    "What are common mistakes people make when {task}?",
    "Write a short checklist for {task}.",
    "Explain in a few sentences how to get started with {task}.",
]
CONCEPTS = [
    "photosynthesis", "gravity", "inflation", "a black hole", "the water cycle", "democracy",
    "machine learning", "an atom", "evolution", "a volcano", "electricity", "the immune system",
    "compound interest", "a vaccine", "climate", "the internet", "a rainbow", "an earthquake",
    "the stock market", "DNA", "a recession", "renewable energy", "the Roman Empire",
    "a prime number", "the speed of light", "an ecosystem", "a database", "encryption",
    "a hurricane", "the printing press",
]  # fmt: skip
QUESTIONS = [
    "What is {concept}?",
    "Explain {concept} to a ten-year-old.",
    "Why is {concept} important?",
    "Give two interesting facts about {concept}.",
    "What is a common misconception about {concept}?",
    "How would you explain {concept} in a single sentence?",
]
REWRITES = [
    "Rewrite this sentence in a more formal tone: {sentence}.",
    "Turn this sentence into a question: {sentence}.",
]
SENTENCES = [
    "The weather is nice today", "I would like a cup of tea", "Where is the train station",
    "My brother plays the piano every evening", "We are going to the beach tomorrow",
    "This book is very interesting", "Can you help me carry these boxes",
    "The museum opens at nine in the morning", "She forgot her umbrella at home",
    "The children are playing in the park", "I am learning to cook", "The shop closes early",
    "He runs five kilometres every morning", "Please close the window", "The soup is too hot",
    "Our team won the match last night", "I need a new pair of shoes", "It is raining again",
]  # fmt: skip
LANGUAGES = ["French", "Spanish", "German", "Italian"]
NAMES = ["Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"]
ITEMS = ["apples", "books", "pencils", "cookies", "stamps", "marbles", "tickets", "eggs"]


def stdlib_functions() -> list[tuple[str, str, str, str]]:
    """(module, name, signature, first docstring sentence) of documented public functions."""
    found = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            if getattr(obj, "__module__", "").split(".")[0] != module_name.split(".")[0]:
                continue
            doc = inspect.getdoc(obj) or ""
            first = re.split(r"(?<=\.)\s", doc.strip().replace("\n", " "), maxsplit=1)[0]
            if not 20 <= len(first) <= 200:
                continue
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            found.append((module_name, name, signature, first))
    return found


def module_paragraphs() -> list[tuple[str, str]]:
    """(module, paragraph) prose from module docstrings, 200-900 characters each."""
    paragraphs = []
    for module_name in STDLIB_MODULES:
        doc = inspect.getdoc(importlib.import_module(module_name)) or ""
        for block in doc.split("\n\n"):
            text = " ".join(block.split())
            tabular = "===" in text or "---" in text or text.startswith((">>>", "-", "*"))
            if 200 <= len(text) <= 900 and not tabular:
                paragraphs.append((module_name, text))
    return paragraphs


def code_prompts(rng: random.Random) -> list[tuple[str, str]]:
    prompts = []
    for module, name, signature, first in stdlib_functions():
        style = rng.randrange(3)
        if style == 0:
            text = f"Write a Python function `{name}{signature}`. Its job: {first}"
        elif style == 1:
            text = f"Explain what `{module}.{name}` does in Python and show a short example."
        else:
            text = f"When would I use `{module}.{name}` in Python? {first}"
        prompts.append(("code", text))
    return prompts


def maths_prompts(rng: random.Random, count: int) -> list[tuple[str, str]]:
    prompts = []
    for _ in range(count):
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 9)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        prompts.append(("maths", rng.choice([
            f"{name} has {a + b} {item} and gives away {b}. How many are left?",
            f"What is {a} times {c}? Show your working.",
            f"Solve for x: {c}x + {b} = {c * a + b}.",
            f"A box holds {c} {item}. How many boxes are needed for {a * c + b} {item}?",
            f"What is {a}% of {b * 10}?",
            f"{name} reads {c} pages a day. How many days to read {a * c} pages?",
        ])))  # fmt: skip
    return prompts


def reasoning_prompts(rng: random.Random, count: int) -> list[tuple[str, str]]:
    prompts = []
    for _ in range(count):
        x, y, z = rng.sample(NAMES, 3)
        prompts.append(("reasoning", rng.choice([
            f"{x} is taller than {y}, and {y} is taller than {z}. Who is the shortest? Explain.",
            f"{x} arrived before {y} but after {z}. Who arrived first?",
            f"If all {rng.choice(ITEMS)} in the box are red and this one is in the box, "
            "what colour is it? Explain your reasoning.",
            f"{x} says {y} is lying. {y} says {z} is lying. {z} says both {x} and {y} are "
            "lying. Who is telling the truth?",
            f"Is it possible for {x} to be both older and younger than {y}? Why?",
        ])))  # fmt: skip
    return prompts


def make_prompts(seed: int) -> list[tuple[str, str]]:
    """(category, prompt) pairs, deduplicated, in a seeded order."""
    rng = random.Random(seed)
    prompts = code_prompts(rng)
    prompts += [("writing", t.format(topic=topic)) for t in WRITING for topic in TOPICS]
    prompts += [("writing", t.format(task=task)) for t in ADVICE for task in TASKS]
    prompts += [("qa", t.format(concept=c)) for t in QUESTIONS for c in CONCEPTS]
    prompts += [
        ("translation", f"Translate into {language}: {sentence}.")
        for sentence in SENTENCES
        for language in LANGUAGES
    ]
    prompts += [("writing", t.format(sentence=s)) for t in REWRITES for s in SENTENCES]
    for module, paragraph in module_paragraphs():
        prompts.append(("summarisation", f"Summarise in one sentence: {paragraph}"))
        prompts.append(
            ("rag", f"Context: {paragraph}\n\nQuestion: What is the `{module}` module used for?")
        )
    prompts += maths_prompts(rng, 260)
    prompts += reasoning_prompts(rng, 160)
    prompts = list(dict.fromkeys(prompts))
    rng.shuffle(prompts)
    return prompts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model: checkpoint directory or .gguf")
    parser.add_argument("--output", required=True, help="directory for train/heldout JSONL")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (smoke)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weights for generation; bfloat16 is 2-3x faster on CPUs with AMX/AVX512-BF16, and "
        "its greedy answers can part from float32's at near-ties",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-repetition",
        type=float,
        default=1.0,
        help="train only on answers whose repeated word 4-grams are at most this share "
        "(default 1.0: all; the shipped adapter was built with all)",
    )
    return parser.parse_args()


def load_hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from msn.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    return model, tokenizer


@torch.inference_mode()
def answer_batch(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers to `prompts`, with whether each hit the length limit."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():  # (B, new)
        ended = tokenizer.eos_token_id in row
        row = row[: row.index(tokenizer.eos_token_id)] if ended else row
        answers.append({"response": tokenizer.decode(row), "truncated": not ended})
    return answers


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.seed)
    if args.limit:
        prompts = prompts[: args.limit]
    model, tokenizer = load_hf_model(args.model, getattr(torch, args.dtype))

    # Answers are appended as they come (resume reads them back), then split at the end.
    answers_path = output / "answers.jsonl"
    done = {}
    if answers_path.is_file():
        for line in answers_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            done[record["id"]] = record
    todo = [i for i in range(len(prompts)) if i not in done]
    todo.sort(key=lambda i: len(prompts[i][1]))  # similar lengths share a batch: less padding
    with answers_path.open("a", encoding="utf-8") as f, tqdm(total=len(prompts)) as bar:
        bar.update(len(done))
        for start in range(0, len(todo), args.batch_size):
            ids = todo[start : start + args.batch_size]
            texts = [prompts[i][1] for i in ids]
            batch = answer_batch(model, tokenizer, texts, args.max_new_tokens)
            for i, answer in zip(ids, batch, strict=True):
                category, prompt = prompts[i]
                done[i] = {"id": i, "category": category, "prompt": prompt, **answer,
                           "dtype": args.dtype}  # fmt: skip
                f.write(json.dumps(done[i]) + "\n")
            f.flush()
            bar.update(len(ids))

    # Looping answers (a small model's failure mode) would teach loops: the training split
    # leaves them out. The held-out split keeps every answer, to measure the model as it is.
    splits, looping = {"train": [], "heldout": []}, 0
    for i in range(len(prompts)):
        if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
            splits["heldout"].append(done[i])
        elif repeated_ngram_share(done[i]["response"]) > args.max_repetition:
            looping += 1
        else:
            splits["train"].append(done[i])
    for name, records in splits.items():
        with (output / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    truncated = sum(r["truncated"] for r in done.values())
    print(
        f"{len(splits['train'])} train and {len(splits['heldout'])} held-out examples in "
        f"{output} ({truncated} answers cut at {args.max_new_tokens} tokens; {looping} looping "
        f"answers left out of train)"
    )


if __name__ == "__main__":
    main()
