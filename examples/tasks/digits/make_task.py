"""Writes the demo task: every one-digit sum and difference as one JSONL prompt set (the demo
trains and evaluates on it: it shows learning, not generalisation), and the
character tokenizer and config of the tiny model that learns them
(examples/models/tiny-digits).

    python examples/tasks/digits/make_task.py   # rewrites the shipped files
    python examples/tasks/digits/make_task.py --task-dir OUT/task --model-dir OUT/model

Regenerated files equal the shipped ones except for the ``transformers_version`` stamp that
``save_pretrained`` writes into ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE.parent.parent / "models" / "tiny-digits"
CHARACTERS = "0123456789+-="
SPECIAL = ("<pad>", "<eos>")
SEED = 7


def problems() -> list[dict[str, str]]:
    """Every a+b and every a-b >= 0 with one-digit a and b, tagged by operation."""
    rows = []
    for a in range(10):
        for b in range(10):
            rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "data_source": "add"})
            if a >= b:
                rows.append({"prompt": f"{a}-{b}=", "answer": str(a - b), "data_source": "sub"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def save_tokenizer(directory: Path) -> None:
    """One token per character plus <pad> (id 0) and <eos> (id 1). transformers loads it as
    Qwen2's tokenizer class (from config.json), whose default unknown token would add a 16th
    token: the unknown token is <pad> instead."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL + tuple(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL))
    directory.mkdir(parents=True, exist_ok=True)
    core.save(str(directory / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "unk_token": "<pad>",
        "model_max_length": 32,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def save_model_config(directory: Path) -> None:
    """A two-layer Qwen2 shape, small enough to train on two CPU cores in a minute."""
    from transformers import Qwen2Config

    Qwen2Config(
        vocab_size=len(SPECIAL) + len(CHARACTERS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    ).save_pretrained(directory)


def write_task(task_dir: Path, model_dir: Path) -> None:
    """problems.jsonl into ``task_dir``; the tokenizer and config.json into ``model_dir``."""
    rows = problems()
    random.Random(SEED).shuffle(rows)
    task_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(task_dir / "problems.jsonl", rows)
    save_tokenizer(model_dir)
    save_model_config(model_dir)
    print(f"{len(rows)} problems in {task_dir}; tokenizer and model config in {model_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task-dir", type=Path, default=HERE, help="where problems.jsonl goes")
    parser.add_argument(
        "--model-dir", type=Path, default=MODEL_DIR, help="where the tokenizer and config go"
    )
    args = parser.parse_args()
    write_task(args.task_dir, args.model_dir)


if __name__ == "__main__":
    main()
