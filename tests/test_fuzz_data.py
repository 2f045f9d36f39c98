"""Fuzzing the data pipeline through `lars-ort train`: a malformed data file is one `error:` line and exit code 2,
with no traceback and nothing saved in the run directory.

The cases come from a seeded generator: each defect of test_data.BAD_DATA, random JSON values in each field,
random deep nesting, random extensions, and random byte damage of a valid file. Damage can leave a file valid
(a changed letter inside a string): such a file trains, so exit 0 is accepted for those cases only, with a
checkpoint to show for it.
"""

import json
import random
import string
from dataclasses import dataclass

import pytest

from lars_artifacts import load_bundle
from lars_ort.cli import main
from tiny import BAD_DATA, OK_LINE

SEED = 1234
VALID_LINES = [  # one line of each format
    {"text": "Who's there? Nay, answer me: stand, and unfold yourself."},
    {"prompt": "Long live the king!", "completion": " Bernardo?"},
    {"messages": [{"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": "Bernardo."}]},
    {"input_ids": [5, 6, 7, 8, 9, 10]},
]


@dataclass
class Case:
    name: str
    data: bytes
    bad_line: int | None = None  # the line the error must name
    damaged: bool = False        # random byte damage: the file may still be valid


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def random_scalar(rng: random.Random):
    return rng.choice([None, True, False, rng.randint(-10**30, 10**30), rng.uniform(-1e6, 1e6), float("nan"),
                       float("inf"), "".join(rng.choices(string.printable + "éß€😀", k=rng.randint(0, 12)))])


def random_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return random_scalar(rng)
    if roll < 0.75:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["role", "content", "text", "x"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def not_a_string(rng: random.Random):
    value = random_value(rng)
    if isinstance(value, str):  # a string the tokenizer cannot take instead
        return value + "\ud800"
    return value


def bad_token_ids(rng: random.Random, vocab: int):
    ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
    bad = rng.choice([None, True, 1.5, float("nan"), "7", [1, 2], [], {}, -1, vocab, 10**25])
    ids.insert(rng.randint(0, len(ids)), bad)
    return rng.choice([ids, ids, ids, random_scalar(rng), []])


def bad_messages(rng: random.Random):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    k = rng.randrange(len(messages))
    damage = rng.choice(["role", "content", "drop role", "drop content", "not an object", "not a list"])
    if damage == "not a list":
        return rng.choice([random_scalar(rng), {}, []])
    if damage == "not an object":
        messages[k] = random_scalar(rng)
    elif damage.startswith("drop"):
        del messages[k][damage.split()[1]]
    else:
        messages[k][damage] = not_a_string(rng)
    return messages


def random_field_case(rng: random.Random, vocab: int, i: int) -> Case:
    field = rng.choice(["text", "prompt", "completion", "input_ids", "messages"])
    if field == "input_ids":
        record = {"input_ids": bad_token_ids(rng, vocab)}
    elif field == "messages":
        record = {"messages": bad_messages(rng)}
    elif field == "text":
        record = {"text": not_a_string(rng)}
    else:
        record = {"prompt": "a", "completion": "b", field: not_a_string(rng)}
    records = rng.sample(VALID_LINES, rng.randint(0, 3))
    at = rng.randint(0, len(records))
    records.insert(at, record)
    return Case(f"field{i}.jsonl", jsonl(records), bad_line=at + 1)


def random_nesting_case(rng: random.Random, i: int) -> Case:
    depth = rng.choice([rng.randint(2, 50), rng.randint(900, 1100), rng.randint(10_000, 100_000)])
    opener, closer = rng.choice([("[", "]"), ('{"a": ', "}")])
    nested = opener * depth + "1" + closer * depth
    field = rng.choice([None, "text", "input_ids", "messages", "prompt"])
    line = nested if field is None else json.dumps({field: "PLACE", "completion": "x"}).replace('"PLACE"', nested)
    prefix = jsonl(rng.sample(VALID_LINES, rng.randint(0, 2)))
    return Case(f"nested{i}.jsonl", prefix + line.encode() + b"\n", bad_line=prefix.count(b"\n") + 1)


def random_extension_case(rng: random.Random, i: int) -> Case:
    while True:
        suffix = rng.choice(["", ".json", ".JSON", ".csv", ".parquet", ".tsv", ".jsonl.gz", ".txt.bak", ".md",
                             "." + "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(1, 6)))])
        if suffix.lower() not in (".txt", ".jsonl"):
            return Case(f"data{i}{suffix}", jsonl(VALID_LINES))


def byte_damage_case(rng: random.Random, i: int) -> Case:
    data = bytearray(jsonl(VALID_LINES))
    for _ in range(rng.randint(1, 2)):
        at = rng.randrange(len(data))
        action = rng.choice(["flip", "flip", "set", "insert", "delete", "truncate"])
        if action == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif action == "set":
            data[at] = rng.randrange(256)
        elif action == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif action == "delete":
            del data[at]
        else:
            del data[at:]
    return Case(f"damaged{i}.jsonl", bytes(data), damaged=True)


def generate_cases(vocab: int) -> list[Case]:
    rng = random.Random(SEED)
    cases = [Case(name, content if isinstance(content, bytes) else content.encode(),
                  bad_line=2 if content.startswith(OK_LINE if isinstance(content, str) else OK_LINE.encode()) else None)
             for name, content, _ in BAD_DATA]
    cases += [random_field_case(rng, vocab, i) for i in range(60)]
    cases += [random_nesting_case(rng, i) for i in range(15)]
    cases += [random_extension_case(rng, i) for i in range(15)]
    cases += [byte_damage_case(rng, i) for i in range(20)]
    return cases


CASES = generate_cases(vocab=384)  # the tiny models' vocabulary (tests/tiny.py), checked below


def train(bundle, data, out, capsys) -> tuple[int, str]:
    code = main(["train", str(bundle), "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "1",
                 "--seq-len", "16", "--no-progress", "--threads", "1"])
    return code, capsys.readouterr().err


def test_the_generator_is_large_and_reproducible(tiny_bundles):
    assert load_bundle(tiny_bundles["llama"]).manifest.vocab_size == 384
    assert len(CASES) >= 120 and len({c.name for c in CASES}) == len(CASES)
    assert [c.data for c in generate_cases(384)] == [c.data for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_data_is_one_error_line(tiny_bundles, tmp_path, capsys, case):
    data, out = tmp_path / case.name, tmp_path / "run"
    data.write_bytes(case.data)
    code, err = train(tiny_bundles["llama"], data, out, capsys)
    assert "Traceback" not in err, err
    if case.damaged and code == 0:  # the damage left a valid file
        assert (out / "checkpoints").is_dir(), err
        return
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert case.name in errors[0], errors[0]
    if case.bad_line:
        assert f"line {case.bad_line}:" in errors[0], errors[0]
    assert not (out / "checkpoints").exists()


def test_a_data_directory_is_one_error_line(tiny_bundles, tmp_path, capsys):
    code, err = train(tiny_bundles["llama"], tmp_path, tmp_path / "run", capsys)
    assert code == 2 and err.count("error:") == 1 and "is a directory" in err, err
