"""Bad input and faults (issue #13), across modules: each gets a clear error that names the
problem and the fix, or one documented behaviour; never a deep traceback, a silent coercion,
an unsafe load or lost work."""

import json
import shutil
import sys
import warnings

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import load_file
from test_bench import CharTokenizer, StubGenerate, StubModel
from test_train import RECORDS, InterruptAfterSave, Interrupted, tiny_args

import msn
from msn.cli import main as cli_main
from msn.train import resolve_max_length, train
from msn_kernels.greedy_verify import verify_uses_triton
from msn_kernels.tree_attention import tree_attention_reference, tree_attention_triton


@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    """A private copy of the tiny checkpoint (with tokenizer), free to break."""
    path = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, path)
    return path


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return msn.load_model(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


# -- 1. corrupt or truncated safetensors ------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "generate", "train"])
def test_truncated_safetensors_are_named(checkpoint, data, tmp_path, capsys, command):
    truncate(checkpoint / "model.safetensors")
    argv = {
        "info": ["info", checkpoint],
        "generate": ["generate", "--model", checkpoint, "--prompt", "x", "--device", "cpu"],
        "train": ["train", "--model", checkpoint, "--data", data, "--output", tmp_path / "run"],
    }[command]
    assert cli_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"msn {command}: error: {checkpoint / 'model.safetensors'} is not a readable " in err
    assert "truncated or corrupt" in err and "Traceback" not in err


def test_corrupt_shard_is_named(tmp_path):
    save_tiny_llama(tmp_path / "a").save_pretrained(tmp_path / "b", max_shard_size="40KB")
    shard = sorted((tmp_path / "b").glob("model-*.safetensors"))[1]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match=f"{shard.name} is not a readable safetensors file"):
        msn.load_model(tmp_path / "b")


# -- 2. msn train reads safetensors only ------------------------------------------------------


def test_train_refuses_a_pickle_only_checkpoint(checkpoint, data, tmp_path, capsys):
    torch.save(load_file(checkpoint / "model.safetensors"), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    argv = ["train", "--model", checkpoint, "--data", data, "--output", tmp_path / "run"]
    assert cli_main([str(a) for a in [*argv, "--max-steps", "1"]]) == 2
    assert "safetensors only, since pickle files can run code" in capsys.readouterr().err
    assert not (tmp_path / "run" / "msn_train.json").exists()


# -- 3. a shard index may not leave its directory ---------------------------------------------


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_naming_files_outside_the_checkpoint_is_refused(tmp_path, capsys, where):
    save_tiny_llama(tmp_path / "source")
    outside = tmp_path / "outside.safetensors"
    shutil.move(tmp_path / "source" / "model.safetensors", outside)
    inside = tmp_path / "checkpoint"
    inside.mkdir()
    shutil.copy(tmp_path / "source" / "config.json", inside)
    shard = "../outside.safetensors" if where == "relative" else str(outside)
    weight_map = dict.fromkeys(load_file(outside), shard)
    (inside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="lies outside .*only name files inside"):
        msn.load_model(inside)
    assert cli_main(["info", str(inside)]) == 2
    assert "lies outside" in capsys.readouterr().err


# -- 4. token ids outside the vocabulary ------------------------------------------------------


@pytest.mark.parametrize("ids", [[3, 320, 5], [3, -1, 5], torch.tensor([[3, 5, 1000]])])
def test_prompt_ids_outside_the_vocabulary(model, ids):
    bad = [t for t in torch.as_tensor(ids).flatten().tolist() if not 0 <= t < 320][0]
    with pytest.raises(ValueError, match=rf"vocabulary of 320 \(valid ids are 0..319\): {bad}"):
        msn.generate(model, ids, max_new_tokens=4, method="greedy")


def test_train_with_a_tokenizer_larger_than_the_model(tmp_path, data, tiny_checkpoint):
    small = tmp_path / "small-vocab"
    save_tiny_llama(small, vocab_size=64)
    for file in tiny_checkpoint.iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(file, small)
    with pytest.raises(ValueError, match=r"outside the vocabulary of .*\(64 tokens, ids 0..63\)"):
        train(tiny_args(small, data, tmp_path / "run", "--max-steps", "1"))
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- 5. training state --------------------------------------------------------------------


def test_bad_eval_data_fails_before_training(tiny_checkpoint, data, tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "no response"}\n')
    output = tmp_path / "run"
    with pytest.raises(ValueError, match="eval.jsonl: 1 malformed line"):
        train(tiny_args(tiny_checkpoint, data, output, "--max-steps", "2", "--eval-data", bad))
    assert not (output / "checkpoints").exists()  # no training happened
    with pytest.raises(FileNotFoundError, match="--eval-data .*absent.jsonl: no such file"):
        train(tiny_args(tiny_checkpoint, data, output, "--eval-data", tmp_path / "absent.jsonl"))


def test_resumed_runs_report_the_loss_of_the_whole_run(tiny_checkpoint, data, tmp_path):
    steps = ("--max-steps", "6", "--save-steps", "3")
    straight = train(tiny_args(tiny_checkpoint, data, tmp_path / "straight", *steps))

    output = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(tiny_args(tiny_checkpoint, data, output, *steps), callbacks=[InterruptAfterSave(3)])
    resumed = train(tiny_args(tiny_checkpoint, data, output, *steps, "--resume"))
    assert resumed["global_step"] == 6
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)

    # Resuming a finished run trains nothing and keeps its numbers (not train_loss 0.0).
    again = train(tiny_args(tiny_checkpoint, data, tmp_path / "straight", *steps, "--resume"))
    assert again["global_step"] == 6
    assert again["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9)
    saved = json.loads((tmp_path / "straight" / "msn_train.json").read_text())
    assert saved["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9)
    assert saved["loss_history"] == straight["loss_history"]


@pytest.mark.parametrize("broken", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_falls_back_from_an_incomplete_checkpoint(tiny_checkpoint, data, tmp_path, broken):
    output = tmp_path / "run"
    steps = ("--max-steps", "6", "--save-steps", "3")
    with pytest.raises(Interrupted):  # killed right after checkpoint-6, before the final save
        train(tiny_args(tiny_checkpoint, data, output, *steps), callbacks=[InterruptAfterSave(6)])
    last = output / "checkpoints" / "checkpoint-6"
    if broken == "trainer_state.json":
        (last / broken).unlink()  # the Trainer writes it last: the save was cut short
    else:
        truncate(last / broken)
    summary = train(tiny_args(tiny_checkpoint, data, output, *steps, "--resume"))
    assert summary["global_step"] == 6
    assert [log["step"] for log in summary["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert (output / "model.safetensors").is_file()


# -- 6. training past the context ---------------------------------------------------------


def test_max_length_is_capped_at_the_context_and_longer_is_refused(tiny_checkpoint, data, tmp_path):
    assert resolve_max_length(None, 4096) == 1024 and resolve_max_length(None, 512) == 512
    with pytest.raises(ValueError, match="--max-length 1024 is longer than the model's context"):
        train(tiny_args(tiny_checkpoint, data, tmp_path / "a", "--max-length", "1024"))
    summary = train(tiny_args(tiny_checkpoint, data, tmp_path / "b", "--max-steps", "1"))
    assert summary["max_length"] == 256  # the tiny model's max_position_embeddings


# -- 7. trees against the vocabulary and the context ------------------------------------------


def test_tree_wider_than_the_vocabulary_is_refused(model):
    with pytest.raises(ValueError, match="321 distinct candidates .* only 320 tokens"):
        msn.generate(model, [3, 4, 5], max_new_tokens=4, method="tr-jacobi", tree="comb:321")


def test_tree_as_wide_as_the_vocabulary_still_decodes_like_greedy(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("MSN_KERNELS", "torch")  # the PyTorch kernels take trees of any size
    model = msn.load_model(tiny_checkpoint, dtype=torch.float32, max_seq_len=400)
    greedy = msn.generate(model, [3, 4, 5], max_new_tokens=4, method="greedy", eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tree fits: no fallback to greedy steps
        wide = msn.generate(model, [3, 4, 5], 4, "tr-jacobi", tree="comb:320", eos_token_id=[])
    assert torch.equal(wide.output_ids, greedy.output_ids)


def test_tree_over_the_triton_verify_limit_is_refused_up_front(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("MSN_KERNELS", raising=False)
    model = msn.load_model(tiny_checkpoint, dtype=torch.float32, max_seq_len=400)
    if not verify_uses_triton(model.dtype, model.device):
        pytest.skip("the Triton kernels are not in use here (no GPU, no TRITON_INTERPRET=1)")
    with pytest.raises(ValueError, match="320 nodes.*at most 256.*MSN_KERNELS=torch"):
        msn.generate(model, [3, 4, 5], 4, "tr-jacobi", tree="comb:319", eos_token_id=[])


def test_tree_too_large_for_the_context_warns(tiny_checkpoint):
    small = msn.load_model(tiny_checkpoint, dtype=torch.float32, max_seq_len=80)
    prompt = list(range(3, 23))  # 20 tokens leave 60 positions: paper mode needs 69
    greedy = msn.generate(small, prompt, 8, method="greedy", eos_token_id=[])
    with pytest.warns(UserWarning, match="69 nodes.* room for 60; decoding falls back"):
        tree = msn.generate(small, prompt, 8, method="tr-jacobi", tree="paper", eos_token_id=[])
    assert torch.equal(tree.output_ids, greedy.output_ids)


# -- 8. config errors name the field, before the tokenizer ------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: [c], "expected a JSON object of model settings, got a JSON list"),
        (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads must be a positive"),
        (lambda c: {**c, "hidden_size": "64x"}, "field hidden_size must be a positive integer"),
        (lambda c: {**c, "rms_norm_eps": "small"}, "rms_norm_eps must be a finite non-negative"),
        (lambda c: {**c, "rope_theta": None, "rope_scaling": "x"}, "rope_scaling must be a JSON"),
        (lambda c: {**c, "eos_token_id": "</s>"}, "eos_token_id must be a token id"),
    ],
)
def test_config_errors_name_the_field(checkpoint, change, message):
    edit_json(checkpoint / "config.json", change)
    with pytest.raises(ValueError, match=message):
        msn.load_model(checkpoint)


def test_generation_config_eos_string_is_named(checkpoint):
    edit_json(checkpoint / "generation_config.json", lambda g: {**g, "eos_token_id": "</s>"})
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token"):
        msn.load_model(checkpoint)


@pytest.mark.parametrize("command", ["generate", "train"])
def test_config_errors_are_not_blamed_on_the_tokenizer(checkpoint, data, tmp_path, capsys, command):
    edit_json(checkpoint / "config.json", lambda c: {**c, "num_attention_heads": 0})
    argv = {
        "generate": ["generate", "--model", checkpoint, "--prompt", "x", "--device", "cpu"],
        "train": ["train", "--model", checkpoint, "--data", data, "--output", tmp_path / "run"],
    }[command]
    assert cli_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "config.json: field num_attention_heads must be a positive integer, got 0" in err
    assert "tokenizer" not in err


# -- 9. msn bench keeps its work ---------------------------------------------------------


@pytest.fixture
def bench_stub(monkeypatch):
    """msn's loading and decoding replaced by stubs; `calls` lists (method, prompt) per call."""
    calls, stub = [], StubGenerate()
    state = {"fail_at": None}

    def generate(model, prompt, max_new_tokens, **options):
        calls.append((options["method"], tuple(prompt)))
        if state["fail_at"] is not None and len(calls) == state["fail_at"]:
            raise RuntimeError("killed")
        return stub(prompt, options["method"], max_new_tokens)

    monkeypatch.setattr(msn, "load_model", lambda path, device, dtype: StubModel())
    monkeypatch.setattr(msn, "load_tokenizer", lambda path: CharTokenizer())
    monkeypatch.setattr(msn, "generate", generate, raising=False)
    return calls, state


def bench_argv(tmp_path, output, *extra):
    """Three one-turn questions, two methods."""
    questions = tmp_path / "questions.jsonl"
    lines = [{"question_id": i, "category": "qa", "turns": [f"question {i}?"]} for i in (1, 2, 3)]
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["bench", "--model", "stub", "--questions", str(questions), "--max-new-tokens", "4"]
    argv += ["--methods", "greedy", "jacobi", "--no-progress", "--output", str(output)]
    return [*argv, *extra]


@pytest.mark.parametrize("bad", ["a-file", "a-file/below"])
def test_bench_checks_the_output_directory_before_decoding(bench_stub, tmp_path, capsys, bad):
    calls, _ = bench_stub
    (tmp_path / "a-file").write_text("not a directory")
    assert cli_main(bench_argv(tmp_path, tmp_path / bad)) == 2
    assert "cannot write there" in capsys.readouterr().err
    assert calls == []


def test_bench_writes_answers_as_it_goes_and_resumes(bench_stub, tmp_path, capsys):
    calls, state = bench_stub
    output = tmp_path / "bench"
    state["fail_at"] = 2 + 2 * 2 + 1  # 2 warm-ups, questions 1 and 2 (two methods), then dies
    with pytest.raises(RuntimeError, match="killed"):
        cli_main(bench_argv(tmp_path, output))
    answered = [
        json.loads(line)["question_id"] for line in (output / "answers-greedy.jsonl").open()
    ]
    assert len(answered) == 2  # the finished questions are on disk
    with (output / "answers-jacobi.jsonl").open("a") as f:
        f.write('{"question_id": "cut sh')  # a line cut short by the kill

    calls.clear()
    state["fail_at"] = None
    assert cli_main(bench_argv(tmp_path, output)) == 0
    assert "resuming, 4 answers already in" in capsys.readouterr().err
    assert [method for method, _ in calls] == ["greedy", "jacobi"] * 2  # warm-up + question 3
    for method in ("greedy", "jacobi"):
        lines = (output / f"answers-{method}.jsonl").read_text().splitlines()
        assert [json.loads(line)["question_id"] for line in lines] == [*answered, 3]
    summary = json.loads((output / "summary.json").read_text())
    assert {row["turns"] for row in summary["rows"] if row["category"] == "overall"} == {3}

    # Answers of another run are not mixed in: refused, unless --restart.
    assert cli_main(bench_argv(tmp_path, output, "--max-new-tokens", "5")) == 2
    assert "holds answers of another run" in capsys.readouterr().err
    calls.clear()
    assert cli_main(bench_argv(tmp_path, output, "--max-new-tokens", "5", "--restart")) == 0
    assert len(calls) == 2 + 3 * 2


def test_bench_without_a_plotting_backend_still_reports(bench_stub, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    output = tmp_path / "bench"
    assert cli_main(bench_argv(tmp_path, output)) == 0
    assert "report.png not drawn" in capsys.readouterr().err
    assert (output / "report.md").is_file() and (output / "summary.json").is_file()
    assert not (output / "report.png").exists()


# -- 10. no silent coercions --------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [torch.tensor([[3.0, 4.0]]), torch.tensor([[True, False]]), [3, 4.5], [3, True], ["3"]],
    ids=["float-tensor", "bool-tensor", "float-in-list", "bool-in-list", "str-in-list"],
)
def test_non_integer_input_ids_are_refused(model, ids):
    with pytest.raises(ValueError, match="input_ids must hold integer token ids"):
        msn.generate(model, ids, max_new_tokens=2, method="greedy")


@pytest.mark.parametrize("eos", [1.0, [1, 2.5], torch.tensor([1.0]), True, -3])
def test_non_integer_eos_ids_are_refused(model, eos):
    with pytest.raises(ValueError, match="eos_token_id must be a token id"):
        msn.generate(model, [3, 4], max_new_tokens=2, method="greedy", eos_token_id=eos)


def test_integer_eos_ids_of_any_kind_still_work(model):
    for eos in (1, [1, 2], (1,), torch.tensor([1, 2]), []):
        msn.generate(model, [3, 4], max_new_tokens=2, method="greedy", eos_token_id=eos)


def test_a_tree_with_a_method_that_has_none_is_refused(tiny_checkpoint, model, capsys):
    with pytest.raises(ValueError, match="method='greedy' .* takes no tree"):
        msn.generate(model, [3, 4], max_new_tokens=2, method="greedy", tree="paper")
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--device", "cpu"]
    assert cli_main([*argv, "--method", "jacobi", "--tree", "chain:2"]) == 2
    assert "--tree only apply to --method tr-jacobi, not jacobi" in capsys.readouterr().err
    assert cli_main([*argv, "--method", "greedy", "--no-retrieval"]) == 2
    assert "--no-retrieval only apply to --method tr-jacobi" in capsys.readouterr().err


def test_an_empty_model_path_is_refused(tmp_path, monkeypatch, capsys):
    save_tiny_llama(tmp_path)  # the working directory holds a checkpoint: '' must not load it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the model path is empty"):
        msn.load_model("")
    assert cli_main(["generate", "--model", "", "--prompt", "x"]) == 2
    assert "--model is empty" in capsys.readouterr().err
    assert cli_main(["bench", "--model", " ", "--output", str(tmp_path / "b")]) == 2
    assert "--model is empty" in capsys.readouterr().err


@pytest.mark.parametrize("max_seq_len", [0, -5, 2.5, True])
def test_bad_max_seq_len_is_refused(tiny_checkpoint, max_seq_len):
    with pytest.raises(ValueError, match="max_seq_len must be a positive number of positions"):
        msn.load_model(tiny_checkpoint, max_seq_len=max_seq_len)


def test_an_unavailable_device_is_refused(tiny_checkpoint):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ValueError, match="device 'mps' is not available"):
        msn.load_model(tiny_checkpoint, device="mps")
    with pytest.raises(ValueError, match="unknown device"):
        msn.load_model(tiny_checkpoint, device="gpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_non_float_dtypes_are_refused(tiny_checkpoint, dtype):
    with pytest.raises(ValueError, match=f"unsupported dtype {dtype}"):
        msn.load_model(tiny_checkpoint, dtype=dtype)


# -- 11. a node that sees no key --------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [1, 2])
def test_a_node_that_sees_no_key_gets_zeros_from_both_kernels(num_splits):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1
    generator = torch.Generator().manual_seed(0)
    T, D = 4, 16
    q = torch.randn(2, 4, T, D, generator=generator).to(device)
    k = torch.randn(2, 2, 600, D, generator=generator).to(device)
    v = torch.randn(2, 2, 600, D, generator=generator).to(device)
    cache_lens = torch.tensor([0, 500], device=device)  # row 0 has no prefix, row 1 a long one
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
    mask[2] = False  # node 2 sees nothing: not even itself
    reference = tree_attention_reference(q, k, v, cache_lens, mask)
    triton = tree_attention_triton(q, k, v, cache_lens, mask, num_splits=num_splits)
    assert not reference.isnan().any() and not triton.isnan().any()
    zeros = torch.zeros(4, D, device=device)
    assert torch.equal(reference[0, :, 2], zeros) and torch.equal(triton[0, :, 2], zeros)
    torch.testing.assert_close(triton, reference, atol=1e-5, rtol=1e-5)
