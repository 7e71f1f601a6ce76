"""Hugging Face safetensors checkpoint -> this rank's Megatron parameters.

Each rank memory-maps the files and reads only the slices it owns (its TP chunk of each HF
tensor, only its pipeline stage's layers), so host memory stays well below the model size.
The checkpoint is validated against the model's config before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors import SafetensorError, safe_open

from sfpo_megatron.common.errors import CheckpointError
from sfpo_megatron.hf.mapping import fuse, hf_shapes, rules
from sfpo_megatron.models.arch import ModelArch
from sfpo_megatron.models.sharding import local_parameters

INDEX = "model.safetensors.index.json"


class HFCheckpoint:
    """The safetensors files of a HF checkpoint directory (one file, or shards with an index)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors in {self.directory} (model.load_weights=false starts from "
                f"random weights)"
            )
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        """safetensors dtype names (``F32``, ``BF16``...) by tensor name."""
        for name in files:
            path = self.directory / name
            with self._open(path) as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    self.location[key] = path
                    self.shapes[key] = tuple(view.get_shape())
                    self.dtypes[key] = view.get_dtype()

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {INDEX} but missing")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def validate(self, arch: ModelArch) -> None:
        """Every tensor the config implies is present with its shape, and nothing else is."""
        expected = hf_shapes(arch)
        present = set(self.location)
        missing = sorted(set(expected) - present)
        if missing:
            raise CheckpointError(
                f"{self.directory}: missing tensors {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (for its config.json)"
            )
        extra = sorted(present - set(expected) - self._tied_head(arch))
        if extra:
            raise CheckpointError(
                f"{self.directory}: tensors its config.json does not describe: "
                f"{extra[:5]}{' ...' if len(extra) > 5 else ''}"
            )
        for name, shape in expected.items():
            if self.shape(name) != shape:
                raise CheckpointError(
                    f"{self.directory}: {name} has shape {list(self.shape(name))}"
                    f", its config.json implies {list(shape)}"
                )

    def _tied_head(self, arch: ModelArch) -> set[str]:
        """A tied model may store lm_head.weight too, but only as a copy of the embedding."""
        if not arch.tie_word_embeddings or "lm_head.weight" not in self.location:
            return set()
        head, embedding = self.read("lm_head.weight"), self.read("model.embed_tokens.weight")
        if not torch.equal(head, embedding):
            raise CheckpointError(
                f"{self.directory}: tie_word_embeddings=true but lm_head.weight "
                f"differs from model.embed_tokens.weight"
            )
        return {"lm_head.weight"}

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """A tensor, or rows/columns ``start:stop`` of it along ``dim`` (only those are read).

        The file is mapped for this read only, so the pages it touched leave this process's
        resident memory right after: the import's peak stays near one tensor slice.
        """
        with self._open(self.location[name]) as handle:
            view = handle.get_slice(name)
            index = [slice(None)] * len(self.shapes[name])
            if dim is not None:
                index[dim] = slice(start, stop)
            return view[tuple(index)]


def _tp_chunk(checkpoint: HFCheckpoint, name: str, dim: int) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = checkpoint.shape(name)[dim] // tp
    return checkpoint.read(name, dim, rank * size, (rank + 1) * size)


def _vocab_rows(checkpoint: HFCheckpoint, name: str, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the padded vocabulary; rows past the real vocabulary are zero (they
    are masked out of the softmax and never looked up, so their value never matters)."""
    rows = param.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * rows
    real = checkpoint.shape(name)[0]
    stop = min(start + rows, real)
    part = (
        checkpoint.read(name, 0, start, stop)
        if stop > start
        else param.new_zeros(0, param.shape[1])
    )
    return torch.nn.functional.pad(part, (0, 0, 0, rows - part.shape[0]))


@torch.no_grad()
def load_hf_weights(chunks: list, arch: ModelArch, checkpoint: HFCheckpoint) -> None:
    """Copy this rank's slices of a validated checkpoint into its parameters.

    Call before the optimizer is built (it copies the params into its fp32 main params).
    """
    by_name = {rule.megatron: rule for rule in rules(arch)}
    heads_per_group = arch.num_attention_heads // arch.num_query_groups
    for name, param in local_parameters(chunks):
        rule = by_name[name]
        if rule.vocab_rows:
            local = _vocab_rows(checkpoint, rule.hf[0], param)
        elif getattr(param, "tensor_model_parallel", False):
            parts = [_tp_chunk(checkpoint, hf, param.partition_dim) for hf in rule.hf]
            local = fuse(rule, parts, arch.head_dim, heads_per_group)
        else:
            local = fuse(
                rule, [checkpoint.read(hf) for hf in rule.hf], arch.head_dim, heads_per_group
            )
        if local.shape != param.shape:
            raise CheckpointError(
                f"{name} from {list(rule.hf)}: slice shape "
                f"{list(local.shape)} != parameter shape {list(param.shape)}"
            )
        param.copy_(local)
