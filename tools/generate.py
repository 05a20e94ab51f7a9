"""Sample text from a run, a checkpoint or an HF folder, with a KV cache on an eager device.

    python -m tools.generate outputs/RUN --prompt "def main(" --max-new-tokens 200
    python -m tools.generate outputs/RUN/checkpoints/step_00000300 --prompt "import " \\
        --temperature 0.8 --top-p 0.95 --seed 1
    python -m tools.generate outputs/RUN/hf --prompt "class "     # an HF Llama folder

A run folder means its newest complete checkpoint. The model is the run's (its config.yaml),
or the HF folder's config.json; the tokenizer is the one the run used (data.tokenizer in
config.yaml, next to the checkpoint or the exported folder), the HF folder's own when it holds
one, or --tokenizer. Temperature 0 is greedy decoding. The device is CUDA when present, else
the CPU (--device to choose).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.tokenizers import Tokenizer, build_tokenizer
from models.generation import generate
from models.llama import LlamaForCausalLM
from torchprime.errors import ConfigError


def run_config(folder: Path):
    """The TrainConfig of the run `folder` belongs to (output_dir/config.yaml), or None."""
    from train_config import TrainConfig

    for candidate in (folder, *folder.parents[:2]):
        path = candidate / "config.yaml"
        if path.is_file():
            merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
            return OmegaConf.to_object(merged)
    return None


def newest_checkpoint(run: Path) -> Path:
    from trainers.checkpoint import is_complete, step_dirs

    complete = [p for p in step_dirs(run / "checkpoints") if is_complete(p)]
    if not complete:
        raise ConfigError(f"{run}: no complete checkpoint under {run / 'checkpoints'}.")
    return complete[-1]


def load_model(path: Path, device: torch.device) -> tuple[LlamaForCausalLM, str | None]:
    """The model at `path` (HF folder, checkpoint or run), and the tokenizer its run used."""
    cfg = run_config(path)
    if (path / "config.json").is_file():
        from models.hf import load_hf

        model = load_hf(path)
        tokenizer = str(path) if (path / "tokenizer.json").is_file() else None
        return model.to(device).eval(), tokenizer or (cfg.data.tokenizer if cfg else None)
    if cfg is None:
        raise ConfigError(
            f"{path}: neither an HF folder (config.json) nor a run's folder or checkpoint "
            "(config.yaml in the run's output_dir)."
        )
    checkpoint = path if (path / "COMPLETE").is_file() else newest_checkpoint(path)
    from models import build_model
    from torchprime.backend import select_backend
    from torchprime.precision import resolve
    from trainers.checkpoint import CorruptCheckpoint, load_checkpoint

    # The checkpoint holds the weights in the run's parameter dtype (precision.params).
    model = build_model(cfg.model, resolve(cfg.precision, cfg.dtype).params)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))  # the RoPE buffers; weights are loaded
    try:
        state = {"model": model.state_dict(keep_vars=True)}
        load_checkpoint(checkpoint, state, select_backend("cpu", cpu_devices=1))
    except CorruptCheckpoint as e:
        raise ConfigError(f"{checkpoint}: cannot load this checkpoint: {e}.") from None
    return model.to(device).eval(), cfg.data.tokenizer


def sample(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    add_bos: bool = False,
) -> str:
    """The prompt's continuation as text."""
    ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(prompt)
    new = generate(model, ids, max_new_tokens, temperature, top_p, seed, tokenizer.eos_id)
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m tools.generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model", type=Path, help="a run's output_dir, a checkpoint or HF folder")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="byte or an HF tokenizer folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or not 0 < args.top_p <= 1 or args.temperature < 0:
        parser.exit(2, "error: --max-new-tokens >= 1, 0 < --top-p <= 1, --temperature >= 0.\n")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, run_tokenizer = load_model(args.model, device)
        tokenizer = build_tokenizer(args.tokenizer or run_tokenizer or "byte")
        cfg = run_config(args.model)
        text = sample(
            model,
            tokenizer,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.seed,
            add_bos=bool(cfg and cfg.data.add_bos),
        )
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
