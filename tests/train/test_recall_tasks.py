"""The recall tasks' generators: deterministic per seed, training and held-out disjoint,
answers only at query positions, and every answer present earlier in its sequence."""

import re

import numpy as np
import pytest

from mka.train.options import ConfigError, parse
from mka.train.recall_tasks import FILLER_IDS, HELDOUT, MQAR, TRAIN, Passkey, build_task

LENGTHS = (19, 64, 257)


def mqar(**kw):
    return MQAR(**{"vocab_size": 64, "num_kv_pairs": 4, "num_queries": 3, "filler": "random", **kw})


def test_examples_are_a_function_of_seed_stream_length_and_index():
    for task in (mqar(), Passkey(3, None, "random")):
        a, b = task.example(7, TRAIN, 64, 5), task.example(7, TRAIN, 64, 5)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.answers, b.answers)
        others = [task.example(8, TRAIN, 64, 5), task.example(7, HELDOUT, 64, 5), task.example(7, TRAIN, 64, 6)]
        assert all(not np.array_equal(a.tokens, o.tokens) for o in others)
        assert len(a.tokens) == 65 and a.tokens.dtype == np.int64


def _mqar_content(e, pairs=4):
    return e.tokens[:2 * pairs].tobytes(), e.tokens[e.answers].tobytes()


@pytest.mark.parametrize("filler", ["random", "repeat"])
def test_training_and_heldout_never_share_an_example_or_its_content(filler):
    """MQAR: no held-out (pairs, queries) among 3000 training ones. Passkey of 2 digits (100
    passkeys): the held-out passkeys never occur in training at all."""
    task = mqar(vocab_size=24, num_kv_pairs=2, num_queries=2, filler=filler)  # 4 keys, 4 values: tiny space
    train = {_mqar_content(task.example(0, TRAIN, 32, i), 2) for i in range(3000)}
    held = {_mqar_content(task.example(0, HELDOUT, 32, i), 2) for i in range(500)}
    assert len(train) > 50 and len(held) > 50 and not train & held
    pk = Passkey(2, None, filler)
    digits = lambda e: e.tokens[-2:].tobytes()  # noqa: E731
    train = {digits(pk.example(0, TRAIN, 40, i)) for i in range(2000)}
    held = {digits(pk.example(0, HELDOUT, 40, i)) for i in range(500)}
    assert len(train | held) == 100 and not train & held


@pytest.mark.parametrize("length", LENGTHS)
def test_mqar_answers_are_the_values_of_keys_given_at_the_start(length):
    task = mqar()
    for i in range(20):
        e = task.example(3, TRAIN, length, i)
        y = e.targets()
        assert np.array_equal(np.flatnonzero(y != -1), e.answers) and len(e.answers) == 3
        assert list(e.answers) == list(range(length - 5, length + 1, 2))  # the queries close the sequence
        keys, values = e.tokens[0:8:2], e.tokens[1:8:2]
        assert len(set(keys)) == 4 and all(FILLER_IDS <= k < 40 <= v < 64 for k, v in zip(keys, values))
        assert (e.tokens[8:length - 5] < FILLER_IDS).all()  # filler only between pairs and queries
        for pos in e.answers:  # the query is a key of the start; its target the value paired there
            (j,) = np.flatnonzero(keys == e.tokens[pos])
            assert y[pos] == values[j] == e.tokens[pos + 1]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_passkey_answers_follow_the_query_and_the_passkey_is_given_before(depth):
    task = Passkey(4, depth, "repeat")
    for length in LENGTHS:
        e = task.example(1, TRAIN, length, 0)
        digits = e.tokens[-4:]
        assert list(e.answers) == list(range(length - 4, length)) and e.tokens[length - 4] == task.query_id
        assert np.array_equal(e.targets()[e.answers], digits)
        (at,) = np.flatnonzero(e.tokens == task.pass_id)
        assert np.array_equal(e.tokens[at + 1:at + 5], digits)
        room = length + 1 - 10
        if depth is not None:
            assert at == round(depth * room)
        rest = np.delete(e.tokens, [*range(at, at + 5), *range(length - 4, length + 1)])
        assert len(rest) == room and (rest < FILLER_IDS).all()


def test_settings_pick_and_check_the_task(tmp_path):
    base = ["--out", str(tmp_path), "--seq-len", "64"]
    task = build_task(parse(["--task", "mqar", "--num-kv-pairs", "3", "--max-steps", "1", *base]))
    assert (task.vocab_size, task.pairs, task.queries, task.filler) == (256, 3, 3, "random")
    assert build_task(parse(["--task", "passkey", "--max-steps", "1", *base])).digits == 5
    errors = {
        ("--task", "mqar", "--data", "x.txt"): "--data 'x.txt' and --task mqar",
        ("--task", "mqar", "--epochs", "1"): "--max-steps",
        ("--task", "mqar", "--task-lengths", "32,128"): "--task-lengths: 128 exceeds --seq-len 64",
        ("--task", "mqar", "--eval-lengths", "8"): "--eval-lengths: 8 is shorter than one mqar example",
        ("--task", "mqar", "--task-lengths", "16,x"): "--task-lengths: expected a comma list",
        ("--task", "mqar", "--passkey-digits", "3"): "--passkey-digits is a setting of --task passkey",
        ("--task", "passkey", "--task-vocab", "99"): "--task-vocab is a setting of --task mqar",
        ("--task", "mqar", "--task-vocab", "20"): "--task-vocab 20: MQAR needs 16 filler ids",
        ("--task", "mqar", "--num-queries", "9"): "--num-queries 9",
        ("--data", "x.txt", "--task-lengths", "16"): "--task-lengths is a setting of --task",
        ("--data", "x.txt", "--task-filler", "repeat"): "--task-filler is a setting of --task",
        ("--task", "passkey", "--passkey-depth", "1.5"): "'passkey_depth': must be in [0, 1]",
    }
    for argv, message in errors.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse([*argv, *base, *([] if "--epochs" in argv else ["--max-steps", "1"])])
