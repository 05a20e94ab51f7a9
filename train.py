"""Pretrain a model: `python train.py [+config=NAME] [group=option] [key=value ...]`.

The story of one run: compose and check the config, pick the backend, build the mesh, build the
model and shard it, stream the data, train, report.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.pipeline import TextBatches
from data.tokenizers import build_tokenizer
from models import build_model
from torchprime.attention import check_attention_kernel
from torchprime.backend import select_backend
from torchprime.errors import ConfigError
from torchprime.mesh import resolve_mesh
from torchprime.materialize import materialize
from torchprime.sharding import check_batch_divisible, plan_parameter_specs, replicated
from train_config import DTYPES, TrainConfig, mesh_size, register_schema, validate
from trainers import get_trainer_class
from trainers.base_trainer import TrainSummary

log = logging.getLogger("train")
register_schema()


@hydra.main(config_path="configs", config_name="default", version_base=None)
def main(raw: DictConfig) -> None:
    try:
        summary = run(raw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))


def run(raw: DictConfig) -> TrainSummary:
    # 1. The config: typed by the schema (Hydra already rejected unknown keys), then checked
    #    across keys. Nothing touches a device before it is known to be sound.
    cfg: TrainConfig = OmegaConf.to_object(raw)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    validate(cfg, tokenizer.vocab_size)
    output_dir = Path(cfg.output_dir)
    check_no_previous_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))

    # 2. The backend and its mesh. On XLA the mesh must cover every device; eager backends run
    #    on one device and only check the mesh against the model and batch.
    backend = select_backend(cfg.backend, cpu_devices=cfg.cpu_devices or mesh_size(cfg) or 1)
    mesh = resolve_mesh(
        cfg.ici_mesh, cfg.dcn_mesh, backend.device_count if backend.is_xla else None
    )
    check_batch_divisible(cfg.trainer.global_batch_size, mesh)
    check_attention_kernel(
        cfg.model.attention_kernel,
        cfg.model.attention_block_sizes,
        backend.device_kind,
        cfg.model.is_causal,
        cfg.data.block_size,
        uses_bias=False,  # concat packing makes no attention bias
    )
    log.info("backend: %s, mesh: %s", backend.describe(), mesh.describe())

    # 3. The model: shapes on the meta device, sharding planned and checked there, then each
    #    module initialized on the host (from the seed, or read from an HF checkpoint) and sent
    #    to the devices as shards.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, DTYPES[cfg.dtype])
    specs = plan_parameter_specs(model, cfg.model.sharding, mesh)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.model.pretrained_path:
        from models.hf import check_matches, hf_weights_init

        check_matches(cfg.model, cfg.model.pretrained_path)
        weights = hf_weights_init(cfg.model.pretrained_path)
        materialize(model, specs, mesh, backend, weights, generator)
        weights.check_all_used()
        log.info("model: weights from %s", cfg.model.pretrained_path)
    else:
        materialize(model, specs, mesh, backend, model.init_module_weights, generator)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters, %s", cfg.model.name, n_params / 1e6, cfg.dtype)
    if backend.is_xla and (left := replicated(specs)):
        log.info("sharding: %d parameters replicated (no pattern): %s", len(left), ", ".join(left))

    # 4. The data: this host's part of the stream, batched to its share of the global batch.
    host_batch = cfg.trainer.global_batch_size // backend.process_count
    batches = TextBatches(
        cfg.data, tokenizer, host_batch, backend.process_index, backend.process_count
    )

    # 5. Train.
    trainer = get_trainer_class(cfg.trainer.name)(
        cfg.trainer,
        model,
        backend,
        mesh,
        batches,
        output_dir,
        tokens_per_step=cfg.trainer.global_batch_size * cfg.data.block_size,
    )
    return trainer.train()


def check_no_previous_run(output_dir: Path) -> None:
    """Refuse to write over another run's metrics or checkpoints."""
    found = [p.name for p in (output_dir / "metrics.jsonl", output_dir / "checkpoints") if p.exists()]
    if found:
        raise ConfigError(
            f"output_dir={output_dir} already holds a run ({', '.join(found)}); choose another "
            "output_dir or run_name, or move that run away. Nothing was changed."
        )


def format_summary(s: TrainSummary) -> str:
    drop = 100 * (s.first_loss - s.last_loss) / s.first_loss if s.first_loss else 0.0
    lines = [
        "",
        "run finished",
        f"  steps         {s.steps}",
        f"  loss          {s.first_loss:.4f} -> {s.last_loss:.4f} ({drop:.0f}% lower)",
        f"  throughput    {s.tokens_per_sec:,.0f} tokens/s (after the first step)",
        f"  time          {s.elapsed_s:.1f} s",
    ]
    if s.compiles is not None:
        lines.append(f"  compilations  {s.compiles}")
    lines.append(f"  metrics       {s.metrics_path}")
    lines.append(f"  checkpoint    {s.checkpoint or '(none saved)'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
